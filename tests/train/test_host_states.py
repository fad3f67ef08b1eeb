"""Host storage of optimizer moments: the slab arena and moving torchao's state tensors."""

from __future__ import annotations

import torch

from chatft.train.host_states import HostArena, copy_into, copy_to, empty_host_like, nbytes


def test_arena_carves_aligned_disjoint_tensors_from_slabs():
    arena = HostArena(pin=False, slab_bytes=1024)
    a = arena.empty_like(torch.zeros(100, dtype=torch.uint8))  # slab 0 at 0
    b = arena.empty_like(torch.zeros(3, 7, dtype=torch.float32))  # slab 0 at 512 (84 bytes)
    c = arena.empty_like(torch.zeros(200, dtype=torch.float32))  # 800 bytes: a new slab
    d = arena.empty_like(torch.zeros(600, dtype=torch.float32))  # 2400 bytes: its own
    assert (a.shape, b.shape, b.dtype, c.shape) == ((100,), (3, 7), torch.float32, (200,))
    assert b.data_ptr() - a.data_ptr() == 512 and b.data_ptr() % 4 == 0
    assert arena.used == [512 + 84, 800] and arena.reserved_bytes == 2 * 1024 + 2400
    for t, v in ((a, 1), (b, 2.5), (c, -1.0), (d, 7.0)):
        t.fill_(v)
    assert a.eq(1).all() and b.eq(2.5).all() and c.eq(-1).all() and d.eq(7).all()


def test_torchao_states_move_bit_for_bit():
    from chatft.train.optim_choice import torchao_optim

    torchao_optim()
    from torchao.optim.subclass_4bit import OptimState4bit
    from torchao.optim.subclass_8bit import OptimState8bit

    for cls, block in ((OptimState8bit, 256), (OptimState4bit, 128)):
        state = cls.zeros((64, 128), True, block)
        state.copy_(torch.randn(64, 128))  # quantize something
        moved = copy_to(state, torch.device("cpu"))
        assert type(moved) is cls and moved.codes.data_ptr() != state.codes.data_ptr()
        assert torch.equal(moved.dequantize(), state.dequantize())
        host = empty_host_like(state, HostArena(pin=False, slab_bytes=1 << 16))
        copy_into(host, moved)
        assert torch.equal(host.dequantize(), state.dequantize())
        assert nbytes(state) == state.codes.numel() + 4 * state.scale.numel() + 4 * state.qmap.numel()
