"""GPU tests (``pytest -m gpu`` on a CUDA machine): the kernels and engines CPU runs cannot
reach. Small models, fast; the same invariants as the CPU suite, in bf16 where it applies."""

from __future__ import annotations

import json

import pytest
import torch

from tests.train.conftest import run_chatft, step_losses
from tests.train.test_train_loss import _grads, samples, tiny_model

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
SYSTEM = "现在你要扮演皇帝身边的女人--甄嬛."


def test_liger_fused_linear_cross_entropy_equals_chunked():
    pytest.importorskip("liger_kernel")
    from chatft.train.loss import CausalLMLoss
    from chatft.train.batching import pack

    torch.manual_seed(0)
    model = tiny_model(hidden=128, heads=2).cuda()
    batch = pack(samples(6)).to("cuda")
    out = {}
    for kernel in ("chunked", "liger"):
        model.zero_grad(set_to_none=True)
        loss, n = CausalLMLoss(model, kernel)(batch.input_ids, batch.position_ids, batch.targets)
        loss.backward()
        out[kernel] = (loss.detach(), _grads(model))
    torch.testing.assert_close(out["liger"][0], out["chunked"][0], rtol=1e-4, atol=1e-4)
    for k, g in out["chunked"][1].items():
        torch.testing.assert_close(out["liger"][1][k], g, rtol=1e-3, atol=1e-5, msg=k)


@pytest.mark.parametrize("attn", ["varlen", "flex_attention"])
def test_packed_attention_kernels_equal_sdpa_on_cuda(attn):
    from chatft.model.attention import register
    from chatft.train.batching import pack
    from chatft.train.loss import CausalLMLoss

    register()
    batch = pack(samples(5)).to("cuda")
    losses = {}
    for impl in ("sdpa", attn):
        model = tiny_model(impl, hidden=128, heads=2).cuda().to(torch.bfloat16)
        losses[impl], _ = CausalLMLoss(model)(batch.input_ids, batch.position_ids, batch.targets)
    torch.testing.assert_close(losses[attn].float(), losses["sdpa"].float(), rtol=2e-2, atol=2e-2)


@pytest.fixture(scope="module")
def gpu_runs(tmp_path_factory, tiny_qwen2_gpu_dir, chat_small):
    root = tmp_path_factory.mktemp("gpu")
    common = ["--model", tiny_qwen2_gpu_dir, "--data", chat_small, "--system", SYSTEM,
              "--max_steps", "4", "--learning_rate", "1e-3", "--save_steps", "2", "--seed", "7"]
    layouts = {"plain_fp32": ["--per_device_train_batch_size", "8", "--precision", "fp32",
                              "--liger_kernel", "off"],
               "plain_bf16": ["--per_device_train_batch_size", "8", "--precision", "bf16",
                              "--attn_implementation", "varlen"],
               # compile with Liger on "auto": chatft leaves Liger's layer kernels out
               "compiled_bf16": ["--per_device_train_batch_size", "8", "--precision", "bf16",
                                 "--attn_implementation", "varlen", "--compile", "true"]}
    if torch.cuda.device_count() >= 2:
        layouts["zero2_fp32"] = ["--per_device_train_batch_size", "4", "--nproc", "2",
                                 "--zero_stage", "2", "--precision", "fp32", "--liger_kernel", "off"]
        layouts["zero3_bf16"] = ["--per_device_train_batch_size", "4", "--nproc", "2",
                                 "--zero_stage", "3", "--precision", "bf16"]
    out = {}
    for name, extra in layouts.items():
        out[name] = root / name
        run_chatft("train", *common, "--output_dir", out[name], *extra, timeout=1200)
    return out


def test_engines_train_and_export_on_gpu(gpu_runs):
    for name, folder in gpu_runs.items():
        losses = step_losses(folder)
        assert len(losses) == 4 and losses[-1] < losses[0], name
        check = json.loads((folder / "final" / "chatft_export_check.json").read_text())
        assert check["max_rel_diff"] <= check["tolerance"], name


def test_zero2_equals_one_process_on_gpu_in_fp32(gpu_runs):
    if "zero2_fp32" not in gpu_runs:
        pytest.skip("needs 2 GPUs")
    # TF32 and kernel choice differ slightly between layouts on GPU: looser than the CPU test
    assert step_losses(gpu_runs["zero2_fp32"]) == pytest.approx(step_losses(gpu_runs["plain_fp32"]),
                                                                rel=1e-3)


def test_compiled_model_trains_like_the_eager_one(gpu_runs):
    # Same seed, data and weights: the first step's loss comes before any update, so only
    # kernel rounding (bf16, inductor's fusions vs Liger's) separates the two.
    compiled, eager = step_losses(gpu_runs["compiled_bf16"]), step_losses(gpu_runs["plain_bf16"])
    assert compiled[0] == pytest.approx(eager[0], rel=2e-2)
    assert compiled[-1] < compiled[0]
