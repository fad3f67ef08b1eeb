"""The planner's calibration: the fit on synthetic measurements, and the committed constants
against the peaks measured on H200 (bench/results/plan_measurements_h200.json): every run within
±15%, the defaults equal to the refit, and the stored token budgets equal to what ``chatft plan``
derives from the data."""

from __future__ import annotations

import json
from dataclasses import asdict, replace

import pytest

from bench.lib.plan_calibration import (DEFAULT_RUNS, TOLERANCE, Measurement, Measurements,
                                        evaluate, fit_calibration, job_and_strategy,
                                        load_measurements, main, outside_allocator_gib, refit,
                                        rounded)
from chatft.train.plan.cost import DEFAULT_CALIBRATION, GIB, Calibration, Job, Strategy, estimate
from chatft.train.plan.shape import ModelShape
from tests.train.conftest import QWEN2_7B

SEVEN_B = ModelShape.from_config(QWEN2_7B)


def test_fit_reproduces_synthetic_measurements():
    truth = Calibration(activation_factor=1.23, gpu_fixed_gib=2.5, host_process_gib=4.25)
    rows = []
    for tokens, k, strategy in ((2048, 0, Strategy("torch")), (8192, 0, Strategy("torch")),
                                (8192, 28, Strategy("torch")),
                                (4096, 14, Strategy("deepspeed", 3, True, True))):
        job = Job(SEVEN_B, tokens=tokens)
        s = replace(strategy, checkpoint_layers=k)
        e = estimate(job, s, truth)
        rows.append(Measurement(job, s, e.gpu_gib, e.host_gib))
    fitted = fit_calibration(rows)
    assert fitted.activation_factor == pytest.approx(1.23, rel=1e-9)
    assert fitted.gpu_fixed_gib == pytest.approx(2.5, rel=1e-9)
    assert fitted.host_process_gib == pytest.approx(4.25, rel=1e-9)
    # one row: only the factor moves
    one = fit_calibration(rows[1:2], replace(truth, activation_factor=1.0))
    assert one.activation_factor == pytest.approx(1.23, rel=1e-9) and one.gpu_fixed_gib == 2.5


def test_fit_keeps_the_fixed_part_at_zero_or_above():
    truth = Calibration(activation_factor=1.1, gpu_fixed_gib=0.0)
    rows = []
    for tokens in (1024, 4096, 8192):
        job = Job(SEVEN_B, tokens=tokens)
        e = estimate(job, Strategy("torch"), truth)
        rows.append(Measurement(job, Strategy("torch"), e.gpu_gib))
    # the smallest run measured 1 GiB lower: the unconstrained line would cross below zero
    rows[0] = replace(rows[0], gpu_gib=rows[0].gpu_gib - 1.0)
    fitted = fit_calibration(rows)
    assert fitted.gpu_fixed_gib == 0.0
    # the line through the origin, weighted by 1/measured^2, from the activations themselves
    acts = [estimate(r.job, r.strategy, replace(truth, activation_factor=1.0)).gpu_parts["activations"] / GIB
            for r in rows]
    states = [estimate(r.job, r.strategy, truth).gpu_gib - 1.1 * a for r, a in zip(rows, acts)]
    w = [1 / r.gpu_gib ** 2 for r in rows]
    expect = sum(wi * a * (r.gpu_gib - st) for wi, a, r, st in zip(w, acts, rows, states)) / \
        sum(wi * a * a for wi, a in zip(w, acts))
    assert fitted.activation_factor == pytest.approx(expect, rel=1e-6) and expect < 1.1




@pytest.fixture(scope="module")
def measured():
    ms = load_measurements(DEFAULT_RUNS)
    return ms, {r.id: job_and_strategy(ms, r) for r in ms.runs}


def test_committed_calibration_reproduces_every_measured_run(measured):
    ms, jobs = measured
    assert len(ms.runs) == 12
    assert [r.id for r in ms.runs if r.validation] == ["1gpu_plain_varlen_none_3epochs",
                                                       "1gpu_plain_varlen_none_noliger_6steps"]
    rows = {r["id"]: r for r in evaluate(ms, jobs, DEFAULT_CALIBRATION)}
    for run in ms.runs:
        row = rows[run.id]
        assert abs(row["gpu_error"]) <= TOLERANCE, (run.id, row["gpu_predicted_gib"], run.gpu_gib)
        if run.host_gib is not None and run.host_in_fit:
            assert abs(row["host_error"]) <= TOLERANCE, (run.id, row["host_predicted_gib"], run.host_gib)
    # the runs span what the planner models: plain and every DeepSpeed mode measured, 1 and 4 GPUs
    kinds = {(j.gpus, s.backend, s.zero_stage, s.offload_optimizer, s.offload_param)
             for j, s in jobs.values()}
    assert kinds == {(1, "torch", 0, False, False), (4, "deepspeed", 2, False, False),
                     (4, "deepspeed", 3, False, False), (1, "deepspeed", 2, True, False),
                     (1, "deepspeed", 3, True, True)}


def test_a_known_run_by_hand(measured):
    # 4 H200, ZeRO-2, 2,496 tokens: bf16 weights 2P, a quarter of the bf16 gradients, fp32
    # masters and Adam moments (14 bytes/4 per parameter), two 5e8-element bf16 buckets.
    ms, jobs = measured
    job, strategy = jobs["4gpu_zero2_sdpa_none_3epochs"]
    P = 7_615_616_512
    assert (job.model.n_params, job.tokens, job.gpus, strategy.zero_stage) == (P, 2496, 4, 2)
    e = next(r for r in evaluate(ms, jobs, DEFAULT_CALIBRATION) if r["id"] == "4gpu_zero2_sdpa_none_3epochs")
    states = (2 * P + 2 * P / 4 + 12 * P / 4 + 2 * 2 * 500_000_000) / 2**30
    parts = e["gpu_parts_gib"]
    assert sum(v for k, v in parts.items() if k not in ("activations", "fixed")) == \
        pytest.approx(states, abs=0.01)
    assert e["gpu_measured_gib"] == 53.453


def test_defaults_are_the_refit(measured):
    ms, jobs = measured
    assert asdict(rounded(refit(ms, jobs))) == asdict(DEFAULT_CALIBRATION)
    # validation runs take no part in the fit: dropping them changes nothing, fitting on them
    # too would (they pull the host term down)
    fitting = Measurements(ms.meta, [r for r in ms.runs if not r.validation])
    assert refit(fitting, jobs) == refit(ms, jobs)
    everything = Measurements(ms.meta, [replace(r, validation=False) for r in ms.runs])
    assert rounded(refit(everything, jobs)) != DEFAULT_CALIBRATION
    context, comm = outside_allocator_gib(ms.runs)
    # nvidia-smi's used memory minus torch's reserved: 0.64-0.75 GiB alone, 2.05 with NCCL
    assert 0.6 < context < 0.8 and 1.0 < comm < 1.5


def test_stored_token_budgets_are_chatft_plans_and_the_script_reports(tmp_path, huanhuan_path,
                                                                      qwen_tiktoken, capsys):
    shared = tmp_path / "shared"  # the layout the script reads, whichever folders hold the files
    (shared / "data").mkdir(parents=True)
    (shared / "assets").mkdir()
    (shared / "data" / "huanhuan.json").symlink_to(huanhuan_path)
    (shared / "assets" / "qwen.tiktoken").symlink_to(qwen_tiktoken)
    out = tmp_path / "result.json"
    rc = main(["--shared", str(shared), "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out.strip().splitlines()
    last = json.loads(printed[-1])
    assert last["all_within_tolerance_current"] and last["max_abs_gpu_error_current"] <= TOLERANCE
    assert printed[0].split()[:3] == ["run", "tokens", "mb"]
    result = json.loads(out.read_text())
    assert [r["tokens_match_stored"] for r in result["runs"]] == [True] * 12
    assert result["measurements"]["hardware"]["gpu"] == "NVIDIA H200"
    assert result["command"].startswith("python bench/plan_calibration.py")
