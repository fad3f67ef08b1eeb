import torch

from chatft.model.attention import avoid_cudnn_sdpa


def test_avoid_cudnn_sdpa_turns_only_cudnn_off():
    before = (torch.backends.cuda.cudnn_sdp_enabled(), torch.backends.cuda.flash_sdp_enabled(),
              torch.backends.cuda.mem_efficient_sdp_enabled(), torch.backends.cuda.math_sdp_enabled())
    try:
        torch.backends.cuda.enable_cudnn_sdp(True)
        avoid_cudnn_sdpa()
        assert torch.backends.cuda.cudnn_sdp_enabled() is False
        assert (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
                torch.backends.cuda.math_sdp_enabled()) == before[1:]
    finally:
        torch.backends.cuda.enable_cudnn_sdp(before[0])
