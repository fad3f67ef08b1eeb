import torch

from bench.bf16_lost_updates import lost_fraction


def test_lost_fraction_by_hand():
    # bf16 keeps 8 significant bits: next to 1.0 its spacing is 2**-7, so +1e-5 rounds back to
    # 1.0 (lost); next to 0.0 and 1e-3 (spacing 2**-17) the same update survives.
    w = torch.tensor([1.0, 0.0, 1e-3, -1.0])
    assert lost_fraction([w], 1e-5, torch.bfloat16) == (2, 4)
    assert lost_fraction([w], 1e-5, torch.float32) == (0, 4)
    assert lost_fraction([w, w], 0.5, torch.bfloat16) == (0, 8)
