"""Loading checkpoint files without running code: chatft's files with weights_only, DeepSpeed's
with an allow-list, crafted pickles refused by name before anything executes."""

from __future__ import annotations

import os

import pytest
import torch

from chatft.integrity import pickles


class _RunsCode:
    """Pickles as a call of os.system: what a crafted checkpoint does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_chatft_state_loads_with_weights_only(tmp_path):
    model = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(model.parameters(), betas=(0.9, 0.95), foreach=True)
    model(torch.ones(1, 3)).sum().backward()
    opt.step()
    scaler = torch.amp.GradScaler("cpu")
    torch.save({"model": model.state_dict(), "optimizer": opt.state_dict(),
                "scaler": scaler.state_dict(), "client_state": {"step": 3}}, tmp_path / "s.pt")
    state = pickles.load_data(tmp_path / "s.pt")
    assert state["client_state"] == {"step": 3}
    assert torch.equal(state["model"]["weight"], model.weight.detach())


def test_a_crafted_pickle_is_refused_by_name_and_nothing_runs(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "engine_state.pt"
    torch.save({"model": {}, "client_state": {"step": 1}, "x": _RunsCode(marker)}, path)
    with pytest.raises(pickles.UnsafeCheckpointError) as err:
        pickles.load_data(path)
    assert str(path) in str(err.value) and "system" in str(err.value)
    with pytest.raises(pickles.UnsafeCheckpointError):
        pickles.scan(path, pickles.DEEPSPEED_GLOBALS)  # DeepSpeed's allow-list does not help
    assert not marker.exists()


def test_deepspeed_classes_pass_the_scan_and_load_inside_the_block(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    path = tmp_path / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    scaler = DynamicLossScaler(init_scale=2.0 ** 16, scale_window=100, min_scale=1,
                               delayed_shift=2, consecutive_hysteresis=False)
    torch.save({"loss_scaler": scaler, "zero_stage": ZeroStageEnum.gradients,
                "fp32": [torch.ones(4)]}, path)
    with pytest.raises(pickles.UnsafeCheckpointError):
        pickles.load_data(path)  # not one of chatft's own files
    with pickles.deepspeed_loading([path]):
        # DeepSpeed's loader asks for weights_only=False; inside the block it is forced on
        state = torch.load(path, weights_only=False)
    assert state["loss_scaler"].cur_scale == 2.0 ** 16
    assert "TORCH_FORCE_WEIGHTS_ONLY_LOAD" not in os.environ  # restored after the block


def test_inside_the_block_a_pickle_the_scan_did_not_see_is_still_refused(tmp_path):
    marker = tmp_path / "ran"
    crafted = tmp_path / "late.pt"
    torch.save(_RunsCode(marker), crafted)
    with pytest.raises(pickles.UnsafeCheckpointError):
        with pickles.deepspeed_loading([]):
            torch.load(crafted, weights_only=False)
    assert not marker.exists()


def test_random_bytes_are_a_damaged_file_not_a_traceback(tmp_path):
    path = tmp_path / "engine_state.pt"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(pickles.DamagedCheckpointError, match="engine_state.pt"):
        pickles.load_data(path)
