"""Host storage of optimizer moments: the slab arena and moving torchao's state tensors."""

from __future__ import annotations

import torch

from chatft.train.host_states import HostArena, copy_into, copy_to, empty_host_like, nbytes


def test_arena_carves_aligned_disjoint_tensors_from_slabs_of_one_dtype_each():
    arena = HostArena(pin=False, slab_bytes=1024)
    a = arena.empty_like(torch.zeros(100, dtype=torch.uint8))  # uint8 slab 0 at 0
    b = arena.empty_like(torch.zeros(3, 7, dtype=torch.float32))  # fp32 slab 0 at 0 (84 bytes)
    c = arena.empty_like(torch.zeros(200, dtype=torch.float32))  # 800 bytes: a new fp32 slab
    d = arena.empty_like(torch.zeros(600, dtype=torch.float32))  # 2400 bytes: its own
    e = arena.empty_like(torch.zeros(10, dtype=torch.float32))  # fp32 slab 0 at 512
    assert (a.shape, b.shape, b.dtype, c.shape) == ((100,), (3, 7), torch.float32, (200,))
    assert e.data_ptr() - b.data_ptr() == 512 and e.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
    assert arena.used == {torch.uint8: [100], torch.float32: [512 + 40, 800]}
    assert arena.reserved_bytes == 3 * 1024 + 2400
    assert all(s.dtype == dt for dt, slabs in arena.slabs.items() for s in slabs)
    for t, v in ((a, 1), (b, 2.5), (c, -1.0), (d, 7.0), (e, 3.0)):
        t.fill_(v)
    assert a.eq(1).all() and b.eq(2.5).all() and c.eq(-1).all() and d.eq(7).all() and e.eq(3).all()


def test_moments_in_slabs_save_and_load(tmp_path):
    """A checkpoint stores the optimizer's moments as views of their slabs: torch.save must
    accept them (it refuses one storage viewed as uint8 codes and fp32 scales) and torch.load
    must give the same bits back."""
    from chatft.train.optim_choice import torchao_optim

    torchao_optim()
    from torchao.optim.subclass_8bit import OptimState8bit

    arena = HostArena(pin=False, slab_bytes=1 << 16)
    states = []
    for seed in range(3):
        torch.manual_seed(seed)
        state = OptimState8bit.zeros((64, 128), True, 256)
        state.copy_(torch.randn(64, 128))
        host = empty_host_like(state, arena)
        copy_into(host, state)
        states.append(host)
    plain = arena.empty_like(torch.zeros(5, dtype=torch.bfloat16)).fill_(1.5)
    torch.save({"states": states, "plain": plain}, tmp_path / "s.pt")
    loaded = torch.load(tmp_path / "s.pt", weights_only=False)
    for a, b in zip(states, loaded["states"]):
        assert torch.equal(a.dequantize(), b.dequantize())
    assert torch.equal(loaded["plain"], plain)


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
