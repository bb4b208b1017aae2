"""The per-query neighborhood kernel (attnlab/ops/native/neighborhood.cpp): outputs and gradients equal the float64
reference with the neighborhood mask, on uniform and border blocks, every window-load mode, dilation, 1-D and 2-D,
paired and single query rows; bad input is refused with a clear error; the module takes it and falls back cleanly."""

from __future__ import annotations

import pytest
import torch

from attnlab.mechanisms import local as L
from attnlab.mechanisms.local import NeighborhoodAttention
from attnlab.ops import native, reference_attention
from attnlab.ops import window as W

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"fused kernel: {native.status()}")
TOL = dict(atol=2e-5, rtol=2e-5)

CASES = {  # B, heads, D, Dv, H, W, kernel, dilation
    "7x7, borders, 44 columns (a repeated last block)": (1, 2, 16, 16, 40, 44, (7, 7), (1, 1)),
    "5x7, values narrower than keys, two batches": (2, 3, 32, 20, 20, 45, (5, 7), (1, 1)),
    "dilation 2 x 2": (1, 2, 8, 8, 33, 50, (3, 5), (2, 2)),
    "dilation 3 on rows only": (1, 1, 8, 8, 31, 40, (3, 3), (3, 1)),
    "7x7 on 80 columns: regular blocks by aligned loads": (1, 2, 16, 16, 24, 80, (7, 7), (1, 1)),
    "3x5, regular blocks by aligned loads": (2, 2, 8, 12, 12, 64, (3, 5), (1, 1)),
    "5x3 on 48 columns, one regular block": (1, 3, 8, 8, 10, 48, (5, 3), (1, 1)),
    "13x13 on 64x64, head dim 64": (1, 2, 64, 64, 64, 64, (13, 13), (1, 1)),
    "head dim 80: logits summed over channel chunks (NA_DCH = 64)": (1, 2, 80, 24, 20, 40, (7, 7), (1, 1)),
    "31x31: border windows need per-offset loads": (1, 1, 33, 17, 48, 70, (31, 31), (1, 1)),
    "1-D, kernel 7": (1, 2, 16, 16, 1, 100, (1, 7), (1, 1)),
    "1-D, kernel 13, dilation 3": (2, 1, 16, 16, 1, 200, (1, 13), (1, 3)),
}


def starts(H, Wd, kernel, dilation):
    rs = W.neighborhood_starts(H, kernel[0], dilation[0]) if H > 1 else torch.zeros(1, dtype=torch.int32)
    return rs, W.neighborhood_starts(Wd, kernel[1], dilation[1])


def reference(q, k, v, kernel, dilation):
    """Dense float64 attention with the neighborhood mask, on channel-first operands."""
    B, h, _, H, Wd = q.shape
    grid, kern, dil = ((H, Wd), kernel, dilation) if H > 1 else ((Wd,), kernel[1:], dilation[1:])
    mask = L._na_mask(grid, kern, dil, False, "cpu")
    tok = [t.double().flatten(3).transpose(2, 3) for t in (q, k, v)]
    o = reference_attention(*tok, attn_mask=mask)
    return o.transpose(2, 3).reshape(B, h, v.shape[2], H, Wd)


def operands(B, heads, D, Dv, H, Wd, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(B, heads, D, H, Wd, generator=g) for _ in range(2))
    v = torch.randn(B, heads, Dv, H, Wd, generator=g)
    return [t.requires_grad_() for t in (q, k, v)]


@needs_kernel
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_and_gradients_equal_the_reference(case):
    """With and without the streaming mode (prefetches, stores past the caches; on by default only for operands over
    NA_STREAM_BYTES)."""
    B, heads, D, Dv, H, Wd, kernel, dilation = CASES[case]
    rs, cs = starts(H, Wd, kernel, dilation)
    q, k, v = operands(B, heads, D, Dv, H, Wd)
    assert native.neighborhood_supports(q, (H, Wd), cs, kernel, dilation)
    qd, kd, vd = (t.detach().double().requires_grad_() for t in (q, k, v))
    ref = reference(qd, kd, vd, kernel, dilation)
    g = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3))
    ref.backward(g.double())
    for stream in (False, True):
        for t in (q, k, v):
            t.grad = None
        out = native.neighborhood_attention(q, k, v, rs, cs, kernel, dilation, stream=stream)
        torch.testing.assert_close(out.double(), ref, **TOL)
        out.backward(g)
        for got, want in ((q, qd), (k, kd), (v, vd)):
            torch.testing.assert_close(got.grad.double(), want.grad, **TOL)


@needs_kernel
def test_row_interleaved_operands_and_thread_counts_give_the_same_result():
    """The module's layout (one image row's channels together) equals contiguous planes; 1 and 2 threads agree
    exactly (no thread adds into another's rows)."""
    B, heads, D, H, Wd = 2, 3, 16, 24, 40
    base = torch.randn(B, H, 3, heads, D, Wd)
    q, k, v = (base[:, :, i].permute(0, 2, 3, 1, 4) for i in range(3))
    rs, cs = starts(H, Wd, (5, 5), (1, 1))
    a = native.neighborhood_attention(q, k, v, rs, cs, (5, 5))
    b = native.neighborhood_attention(q.contiguous(), k.contiguous(), v.contiguous(), rs, cs, (5, 5))
    assert torch.equal(a, b)
    before = torch.get_num_threads()
    try:
        grads = []
        for n in (1, 2):
            torch.set_num_threads(n)
            qq, kk, vv = (t.detach().requires_grad_() for t in (q, k, v))
            native.neighborhood_attention(qq, kk, vv, rs, cs, (5, 5)).sum().backward()
            grads.append([t.grad for t in (qq, kk, vv)])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(x, y) for x, y in zip(*grads))


def test_window_starts_are_the_plan_semantics():
    """neighborhood_starts gives, per position, the first key of the window neighborhood_plan keeps."""
    for length, kernel, dilation in [(20, 7, 1), (23, 5, 2), (30, 3, 4), (9, 9, 1)]:
        s = W.neighborhood_starts(length, kernel, dilation)
        mask = W.neighborhood_mask(length, kernel, dilation)
        want = torch.zeros(length, length, dtype=torch.bool)
        for p in range(length):
            want[p, s[p] + dilation * torch.arange(kernel)] = True
        assert torch.equal(mask, want)
    assert W.neighborhood_starts(10, 7, 2) is None  # a group of 5 is shorter than the kernel


@needs_kernel
def test_what_the_kernel_does_not_take():
    x = torch.randn(1)
    vl = native.vector_width()
    assert vl in (4, 8, 16)
    _, cs = starts(1, vl - 1, (1, 3), (1, 1))
    assert not native.neighborhood_supports(x, (1, vl - 1), cs, (1, 3), (1, 1))  # under one vector of columns
    # border windows beyond two loads: 2 vl + 30 columns needed
    _, cs = starts(1, 2 * vl + 29, (1, 31), (1, 1))
    assert not native.neighborhood_supports(x, (1, 2 * vl + 29), cs, (1, 31), (1, 1))
    _, cs = starts(1, 2 * vl + 30, (1, 31), (1, 1))
    assert native.neighborhood_supports(x, (1, 2 * vl + 30), cs, (1, 31), (1, 1))
    _, cs = starts(1, 64, (1, 7), (1, 1))
    assert not native.neighborhood_supports(x.double(), (1, 64), cs, (1, 7), (1, 1))
    with native.disabled():
        assert not native.neighborhood_supports(x, (1, 64), cs, (1, 7), (1, 1))
    assert native.neighborhood_supports(x, (1, 64), cs, (1, 7), (1, 1))


@needs_kernel
def test_bad_input_is_refused_with_what_was_expected():
    q, k, v = operands(1, 1, 8, 8, 20, 32)
    rs, cs = starts(20, 32, (5, 5), (1, 1))
    with pytest.raises(ValueError, match=r"col_starts \(32,\)"):
        native.neighborhood_attention(q, k, v, rs, cs[:-1], (5, 5))
    with pytest.raises(ValueError, match="inside"):
        native.neighborhood_attention(q, k, v, rs, cs + 1, (5, 5))
    with pytest.raises(ValueError, match="float32"):
        native.neighborhood_attention(q.double(), k.double(), v.double(), rs, cs, (5, 5))
    with pytest.raises(ValueError, match=r"\(B, heads, D, H, W\)"):
        native.neighborhood_attention(q[0], k[0], v[0], rs, cs, (5, 5))


@needs_kernel
@pytest.mark.parametrize("grid,kernel,dilation", [((40, 44), 7, 1), ((1, 300), 7, 2), ((20, 7), 5, 1)])
def test_module_uses_the_kernel_where_it_applies_and_equals_the_reference(grid, kernel, dilation):
    """Outputs and gradients (input and both projections) of the module against its float64 reference, in training
    and in inference, on maps the per-query kernel takes and one it does not (the tile path)."""
    torch.manual_seed(0)
    m = NeighborhoodAttention(32, 4, kernel_size=kernel, dilation=dilation)
    ref = NeighborhoodAttention(32, 4, kernel_size=kernel, dilation=dilation, backend="reference").double()
    ref.load_state_dict(m.state_dict())
    hw = grid if grid[0] > 1 else None
    axes = grid if hw else (grid[1],)
    x = torch.randn(2, grid[0] * grid[1], 32, requires_grad=True)
    applies = m._per_query(x, axes, *m._axes(axes)[:2]) is not None
    assert applies == (grid != (20, 7))  # 7 columns: under one vector (of 8 or 16) or two loads (of 4); the tiles run
    y, y_ref = m(x, hw=hw), ref(x.double(), hw=hw)
    torch.testing.assert_close(y.double(), y_ref, **TOL)
    with torch.no_grad():
        torch.testing.assert_close(m(x, hw=hw), y)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, [x, m.qkv.weight, m.qkv.bias, m.proj.weight], g)
    want = torch.autograd.grad(y_ref, [x, ref.qkv.weight, ref.qkv.bias, ref.proj.weight], g.double())
    for a, b in zip(got, want):
        torch.testing.assert_close(a.double(), b.double(), **TOL)


def test_streaming_is_chosen_by_the_operands_size():
    """The streaming mode by default only when q, k and v together exceed NA_STREAM_BYTES (they then stream from
    memory); below it its prefetches only cost load slots."""
    def flag(heads, d, hw):
        q = torch.empty(1, heads, d, *hw, device="meta")
        return int(native._na_sizes(q, q, (7, 7), (1, 1), None)[-1])

    assert flag(8, 64, (128, 128)) == 1  # 96 MB: the bench's map
    assert flag(4, 32, (64, 64)) == 0  # 6 MB
    big = native.NA_STREAM_BYTES // (3 * 4 * 64 * 64) + 1  # heads of 64 channels on a 64-wide row, just over
    assert flag(1, 64, (big, 64)) == 1 and flag(1, 64, (big - 1, 64)) == 0
