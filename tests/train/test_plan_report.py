"""The memory planner's ranking: the recommendation is the fastest strategy that fits, the 7B
small-memory modes on a 24 GiB GPU, and the printed table and JSON."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest

from chatft.train.plan.cost import GIB, Job, Strategy, estimate
from chatft.train.plan.report import fewest_checkpoint_layers, format_plan, make_plan, plan_to_json
from chatft.train.plan.shape import ModelShape
from tests.train.conftest import QWEN2_7B

SEVEN_B = ModelShape.from_config(QWEN2_7B)


def test_seven_b_on_a_24_gib_gpu():
    budget = 24 * GIB
    job = Job(SEVEN_B, tokens=4096, gpus=1)
    full_offload = Strategy("deepspeed", 3, offload_optimizer=True, offload_param=True)
    k = fewest_checkpoint_layers(job, full_offload, budget)
    assert k is not None and 0 < k <= 28
    fit = estimate(job, replace(full_offload, checkpoint_layers=k))
    assert fit.gpu_bytes <= 0.95 * budget
    # plain bf16 holds 16 bytes per parameter on the GPU: never fits, recomputing or not
    assert fewest_checkpoint_layers(job, Strategy("torch"), budget) is None
    assert estimate(job, Strategy("torch", checkpoint_layers=28)).gpu_gib > 113
    # Host: DeepSpeed keeps 20 bytes per parameter of this mode on the host (bf16 parameters 2,
    # fp32 masters 4, Adam 8, fp32 gradients 4, bf16 gradient buffer 2): 141.8 GiB for 7.6B,
    # so the mode needs ~160 GiB of host memory with the export at the end, not 128 GiB.
    assert fit.host_parts["offloaded states"] == 20 * SEVEN_B.n_params
    assert 150 < fit.host_gib < 165 and fit.host_phase == "export"
    everything = make_plan(job, budget, 128 * GIB)
    fp32_adamw = [r.strategy for r in everything.rows if not r.strategy.lean_options]
    plan = make_plan(job, budget, 128 * GIB, strategies=fp32_adamw)
    row = plan.row(replace(full_offload, checkpoint_layers=k))
    assert row is not None and row.fits_gpu and not row.fits_host
    assert plan.recommended is None  # nothing with fp32 AdamW fits 24 GiB + 128 GiB
    assert "nothing fits" in format_plan(plan).splitlines()[-1]
    # with a larger host, an offloading strategy is the one that fits a 24 GiB GPU
    roomy = make_plan(job, budget, 192 * GIB, strategies=fp32_adamw).recommended
    assert roomy is not None and roomy.strategy.offload_optimizer
    # the lean choices fit 128 GiB (tests/train/test_plan_lean.py): 8-bit moments in host
    # memory, the step in backward
    assert everything.recommended is not None
    assert everything.recommended.strategy.optimizer_states == "host"


def test_recommendation_is_the_fastest_that_fits():
    for gpus, gpu, host in ((1, 141, 128), (4, 141, 512), (1, 24, 192), (2, 80, 256)):
        plan = make_plan(Job(SEVEN_B, tokens=8192, gpus=gpus), gpu * GIB, host * GIB)
        fitting = [r for r in plan.rows if r.fits]
        # fp32 AdamW wherever it fits; lean optimizer choices only where it does not
        fitting = [r for r in fitting if not r.strategy.lean_options] or fitting
        assert fitting and plan.recommended in fitting
        assert plan.recommended.relative_speed == max(r.relative_speed for r in fitting)
        assert max(r.relative_speed for r in plan.rows) == pytest.approx(1.0)
        for r in plan.rows:
            assert r.fits_gpu == (r.estimate.gpu_device_bytes <= 0.95 * gpu * GIB)
        if gpus > 1:
            assert all(r.strategy.backend == "deepspeed" for r in plan.rows)
    # one H200: plain PyTorch with recomputation of some layers beats offloading
    plan = make_plan(Job(SEVEN_B, tokens=8192), 141 * GIB, 128 * GIB)
    rec = plan.recommended.strategy
    assert rec.backend == "torch" and 0 < rec.checkpoint_layers < 28
    # more recomputation, fewer GiB and less speed; offload is the slowest
    none, some = plan.row(Strategy("torch")), plan.row(rec)
    assert none.estimate.gpu_bytes > some.estimate.gpu_bytes and none.relative_speed > some.relative_speed
    offload = [r for r in plan.rows if r.strategy.offload_optimizer]
    assert max(r.relative_speed for r in offload) < min(r.relative_speed for r in plan.rows
                                                         if not r.strategy.offload_optimizer)


def test_format_and_json():
    plan = make_plan(Job(SEVEN_B, tokens=8192), 141 * GIB, 128 * GIB)
    text = format_plan(plan)
    lines = text.splitlines()
    assert lines[-1].startswith("recommended: plain, recompute ")
    assert "--gradient_checkpointing on --checkpoint_layers" in lines[-1]
    header = next(i for i, line in enumerate(lines) if line.startswith("strategy"))
    rows = lines[header + 1:header + 1 + len(plan.rows)]
    end = lines[header].index("GPU GiB") + len("GPU GiB")
    for row, r in zip(rows, plan.rows):
        assert row[:end].endswith(f"{r.estimate.gpu_gib:.1f}")  # right-aligned, one decimal
    data = json.loads(json.dumps(plan_to_json(plan)))
    assert data["job"]["model"]["n_params"] == 7_615_616_512
    assert data["recommended"]["options"] == plan.recommended.strategy.options(28)
    assert len(data["rows"]) == len(plan.rows)
