"""The fused CPU tile kernel (attnlab/ops/native): built here, equal to the reference on outputs, log-sum-exp and
gradients (q, k, v, mask, and through the lse), and a clean fallback to SDPA when it cannot be built."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnlab.ops import native, reference_attention
from attnlab.ops import window as W

needs_kernel = pytest.mark.skipif(not native.available(), reason=f"fused tile kernel: {native.status()}")
TOL = dict(atol=2e-5, rtol=2e-5)


def test_kernel_builds_where_a_compiler_exists():
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler on this machine")
    assert native.available(), native.status()
    assert native.status() == "ok"


def tiles(T, Hq, Hkv, tq, tk, D, Dv, seed=0):
    """Token-major tiles viewed as (T, H, t, D), as window.py produces them."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(T, tq, Hq, D, generator=g).transpose(1, 2)
    k = torch.randn(T, tk, Hkv, D, generator=g).transpose(1, 2)
    v = torch.randn(T, tk, Hkv, Dv, generator=g).transpose(1, 2)
    return [t.detach().requires_grad_() for t in (q, k, v)]


CASES = {  # T, Hq, Hkv, tq, tk, D, Dv, mask kind
    "64x64 d64": (3, 4, 4, 64, 64, 64, 64, None),
    "gqa, odd sizes": (3, 6, 2, 13, 37, 20, 24, "float-tile"),
    "neighborhood-like": (2, 3, 1, 49, 196, 32, 32, "bool-tile"),
    "one query one key": (2, 2, 2, 1, 1, 16, 16, None),
    "bias per head, shared by tiles": (4, 2, 2, 17, 17, 8, 8, "float-head"),
    "bias per tile and head": (2, 2, 1, 16, 33, 48, 40, "float-full"),
    # key columns in one register block: logits and softmax fused (up to 64 keys), with and without a mask
    "fused, mask, a query sees nothing": (3, 2, 2, 20, 48, 16, 16, "float-tile"),
    "fused, bias per head, 32 keys": (2, 2, 2, 9, 32, 8, 16, "float-head"),
    "fused, mask, more queries than keys": (2, 2, 1, 40, 16, 16, 16, "float-full"),
    "84 keys (DuoFormer's regions): two passes": (2, 2, 2, 84, 84, 64, 64, None),
}


def make_mask(kind, T, H, tq, tk, seed=1):
    if kind is None:
        return None
    g = torch.Generator().manual_seed(seed)
    shape = {"float-tile": (T, 1, tq, tk), "bool-tile": (T, 1, tq, tk), "float-head": (1, H, tq, tk),
             "float-full": (T, H, tq, tk)}[kind]
    hidden = torch.rand(shape, generator=g) < 0.4
    hidden[(0,) * (len(shape) - 1)] = True  # one query of the first tile sees no key at all
    if kind.startswith("bool"):
        return ~hidden
    return torch.randn(shape, generator=g).masked_fill(hidden, float("-inf")).requires_grad_()


@needs_kernel
@pytest.mark.parametrize("case", list(CASES))
def test_outputs_lse_and_gradients_equal_the_reference(case):
    T, Hq, Hkv, tq, tk, D, Dv, kind = CASES[case]
    q, k, v = tiles(T, Hq, Hkv, tq, tk, D, Dv)
    mask = make_mask(kind, T, Hq, tq, tk)
    assert native.supports(q, k, v, mask)
    o, lse = native.tile_attention(q, k, v, mask, return_lse=True)
    assert o.shape == (T, Hq, tq, Dv) and lse.shape == (T, Hq, tq)

    leaves = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    rq, rk, rv = ref_leaves[:3]
    rmask = ref_leaves[3] if len(ref_leaves) > 3 else (None if mask is None else mask)
    ro, rlse = reference_attention(rq, rk, rv, attn_mask=rmask, return_lse=True)
    torch.testing.assert_close(o.double(), ro, **TOL)
    torch.testing.assert_close(lse.double(), rlse, **TOL)  # -inf where a query sees nothing
    if kind is not None:
        assert lse[0, 0, 0] == float("-inf") and torch.equal(o[0, 0, 0], torch.zeros(Dv))

    # gradients through the output and through the lse (merged attention uses it)
    w = torch.randn(o.shape, generator=torch.Generator().manual_seed(2))
    wl = torch.randn(lse.shape, generator=torch.Generator().manual_seed(3))
    finite = lambda x: x.masked_fill(torch.isinf(x), 0)  # noqa: E731
    g = torch.autograd.grad((o * w).sum() + (finite(lse) * wl).sum(), leaves)
    rg = torch.autograd.grad((ro * w.double()).sum() + (finite(rlse) * wl.double()).sum(), ref_leaves)
    for a, b in zip(g, rg):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a.double(), b, **TOL)


@needs_kernel
def test_scale_and_non_contiguous_keys():
    q, k, v = tiles(2, 2, 2, 16, 24, 16, 16)
    k_strided = k.detach().transpose(2, 3).contiguous().transpose(2, 3).requires_grad_()  # last dim not unit stride
    o = native.tile_attention(q, k_strided, v, scale=0.3)
    ref = reference_attention(q.double(), k_strided.double(), v.double(), scale=0.3)
    torch.testing.assert_close(o.double(), ref, **TOL)


def test_rejects_incompatible_heads():
    q, k, v = tiles(1, 3, 2, 4, 4, 8, 8)
    if not native.available():
        pytest.skip(native.status())
    with pytest.raises(ValueError, match="multiple of key heads"):
        native.tile_attention(q, k, v)


def test_supports_only_float32_cpu_tiles_up_to_the_limit():
    q, k, v = tiles(1, 2, 2, 8, 8, 8, 8)
    assert not native.supports(q.double(), k.double(), v.double(), None)
    assert not native.supports(q.bfloat16(), k.bfloat16(), v.bfloat16(), None)
    assert not native.supports(*tiles(1, 1, 1, native.MAX_TILE[0] + 1, 8, 8, 8), None)
    assert not native.supports(*tiles(1, 1, 1, 8, native.MAX_TILE[1] + 1, 8, 8), None)
    with native.disabled():
        assert not native.supports(q, k, v, None)
    assert native.supports(q, k, v, None) == native.available()


# ------------------------------------------------------------------- through tiled_attention, vs the SDPA path


def plans():
    na = W.neighborhood_plan(11, 5, tile=4)
    return {
        "band": (W.band_plan(70, 70, 9, 9, 16), 70),
        "band-causal": (W.band_plan(70, 70, 9, 0, 16), 70),
        "neighborhood 2-D": (W.combine_plans([na, na]), 121),
        "shifted blocks 2-D": (W.combine_plans([W.block_plan(10, 4, 2), W.block_plan(10, 4, 2)]), 100),
        "halo blocks 2-D": (W.combine_plans([W.block_plan(12, 4, 0, 2)] * 2), 144),
        "dense in query tiles": (W.dense_plan(50, 50, 16), 50),
    }


@needs_kernel
@pytest.mark.parametrize("name", list(plans()))
def test_tiled_attention_same_with_and_without_the_kernel(name):
    plan, n = plans()[name]
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, n, 16, generator=g).requires_grad_()
    k, v = (torch.randn(2, 2, n, 16, generator=g).requires_grad_() for _ in range(2))  # grouped heads
    kpm = torch.ones(2, n, dtype=torch.bool)
    kpm[1, 3:9] = False
    table = torch.randn(4, plan.tq, plan.tk, generator=g).requires_grad_()  # a bias shared by tiles, per head
    leaves = (q, k, v, table)

    def run():
        o = W.tiled_attention(q, k, v, plan, key_padding_mask=kpm, bias=table[None])
        return o, torch.autograd.grad((o * o.detach().sin()).sum(), leaves)

    o_fast, g_fast = run()
    with native.disabled():
        o_sdpa, g_sdpa = run()
    torch.testing.assert_close(o_fast, o_sdpa, **TOL)
    for a, b in zip(g_fast, g_sdpa):
        torch.testing.assert_close(a, b, **TOL)


# --------------------------------------------------------------------------------------------- fallback


@pytest.fixture
def fresh_state(monkeypatch, tmp_path):
    """A module state that has not tried to build yet, with an empty cache (restored afterwards)."""
    monkeypatch.setattr(native, "_LIB", None)
    monkeypatch.setattr(native, "_STATUS", None)
    monkeypatch.setenv("ATTNLAB_CACHE", str(tmp_path))


def test_no_compiler_means_the_sdpa_path(fresh_state, monkeypatch):
    monkeypatch.setenv("CXX", "/nonexistent/g++")
    assert not native.available()
    assert native.status().startswith("unavailable") and "nonexistent" in native.status()
    q, k, v = (torch.randn(1, 2, 30, 8) for _ in range(3))
    assert not native.supports(q, k, v, None)
    out = W.tiled_attention(q, k, v, W.band_plan(30, 30, 3, 3, 8))  # still works, through SDPA
    ref = reference_attention(q, k, v, attn_mask=W.band_mask(30, 30, 3, 3))
    torch.testing.assert_close(out, ref, **TOL)


def test_environment_switch_disables_the_kernel(fresh_state, monkeypatch):
    monkeypatch.setenv("ATTNLAB_NATIVE", "0")
    assert not native.available()
    assert native.status() == "disabled by ATTNLAB_NATIVE=0"


def test_a_compile_error_is_reported_not_raised(fresh_state, monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("this is not C++\n")
    monkeypatch.setattr(native, "_SOURCES", (broken,))
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    assert not native.available()
    assert "failed" in native.status()
    assert not list((tmp_path / "kernels").glob("*.so"))  # no partial library left behind


def test_a_compiler_without_openmp_still_builds_the_kernels(fresh_state, monkeypatch, tmp_path):
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    monkeypatch.setattr(native, "_OPENMP", "-fno-such-openmp-flag")  # as a compiler that rejects -fopenmp
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)  # the std::thread split
    assert native.available(), native.status()
    assert len(list((tmp_path / "kernels").glob("tile_attention-*.so"))) == 1
    q, k, v = tiles(3, 2, 2, 16, 16, 16, 16)
    ref = reference_attention(q.double(), k.double(), v.double())
    torch.testing.assert_close(native.tile_attention(q, k, v).double(), ref, **TOL)


# ------------------------------------------------------------------------------- pooled result buffers


def test_pool_reuses_a_buffer_only_after_its_tensor_is_gone():
    pool = native._Pool()
    n = pool.MIN_BYTES // 4
    a = pool.empty(2, n)
    b = pool.empty(2, n)
    assert a.data_ptr() != b.data_ptr()  # both alive: distinct memory
    ptr = a.data_ptr()
    view = a[0]  # a view keeps the buffer alive too
    del a
    c = pool.empty(2, n)
    assert c.data_ptr() != ptr
    del view
    assert pool.empty(2, n).data_ptr() == ptr  # a's buffer, returned once nothing referenced it
    small = pool.empty(3)  # below MIN_BYTES: an ordinary tensor
    assert small.numel() == 3


def test_pool_returns_buffers_of_the_same_size():
    pool = native._Pool()
    n = pool.MIN_BYTES // 4
    a = pool.empty(n)
    ptr = a.data_ptr()
    assert ptr % 64 == 0  # on a cache line: the kernels stream whole output lines
    del a
    assert n * 4 <= pool.idle_bytes < n * 4 + 64
    assert pool.empty(n).data_ptr() == ptr
    pool.clear()
    assert pool.idle_bytes == 0


@needs_kernel
def test_outputs_saved_for_backward_survive_later_calls():
    """Two calls before one backward: the first call's saved output must not be overwritten by the second's."""
    q, k, v = tiles(64, 4, 4, 64, 64, 16, 16)  # an output above the pool's minimum size
    assert q.numel() * 4 >= native._Pool.MIN_BYTES
    o1 = native.tile_attention(q, k, v)
    g1 = torch.autograd.grad(o1.sum(), (q, k, v), retain_graph=True)
    o2 = native.tile_attention(q * 2, k, v)  # a second output while the first is alive
    assert o1.data_ptr() != o2.data_ptr()
    g1_again = torch.autograd.grad(o1.sum(), (q, k, v))
    for a, b in zip(g1, g1_again):
        torch.testing.assert_close(a, b)


@needs_kernel
def test_narrow_query_key_attention_same_with_and_without_the_kernel():
    """S2AFormer's attention: q and k narrower than v (the kernel takes them as they are; SDPA needs them padded)."""
    from attnlab.mechanisms.local import narrow_qk_attention

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 3, 300, 8, generator=g).requires_grad_()
    k = torch.randn(2, 3, 40, 8, generator=g).requires_grad_()
    v = torch.randn(2, 3, 40, 24, generator=g).requires_grad_()
    o = narrow_qk_attention(q, k, v)
    with native.disabled():
        ref = narrow_qk_attention(q, k, v)
    torch.testing.assert_close(o, ref, **TOL)
    w = torch.randn(o.shape, generator=g)
    for a, b in zip(torch.autograd.grad((o * w).sum(), (q, k, v)), torch.autograd.grad((ref * w).sum(), (q, k, v))):
        torch.testing.assert_close(a, b, **TOL)


def test_key_ranges_bound_every_visible_key():
    g = torch.Generator().manual_seed(0)
    keep = torch.rand(3, 5, 9, generator=g) < 0.3
    keep[0, 0] = False  # a query that sees nothing: (0, 0)
    r = native.key_ranges(keep)
    assert r.dtype == torch.int32 and r.shape == (3, 5, 2)
    for t in range(3):
        for i in range(5):
            seen = keep[t, i].nonzero().flatten().tolist()
            assert tuple(r[t, i].tolist()) == ((seen[0], seen[-1] + 1) if seen else (0, 0))


@needs_kernel
def test_a_mask_that_is_not_4d_is_refused_with_its_shape():
    q, k, v = tiles(2, 2, 2, 4, 4, 16, 16)
    with pytest.raises(ValueError, match=r"4-D mask .* got \(4, 4\)"):
        native.tile_attention(q, k, v, torch.zeros(4, 4))


def test_the_built_library_is_reused_not_rebuilt(fresh_state, monkeypatch):
    if shutil.which("g++") is None:
        pytest.skip("no g++")
    native._build()
    (lib,) = (native.cache_dir() / "kernels").glob("tile_attention-*.so")
    stamp = lib.stat().st_mtime_ns
    calls = []
    real_run = native.subprocess.run
    monkeypatch.setattr(native.subprocess, "run", lambda *a, **kw: calls.append(a) or real_run(*a, **kw))
    native._build()  # same source, flags and CPU: the cached library, no compiler call
    assert not calls and lib.stat().st_mtime_ns == stamp


# ------------------------------------------------------------------ strided products and channel attention


@needs_kernel
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("a_by", ["rows", "columns"])
def test_matmul_equals_torch_on_strided_operands(a_by, threads, monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)  # the split into K parts depends on it
    g = torch.Generator().manual_seed(0)
    B, G, M, K, N = 2, 3, 300, 290, 32  # M over one 256-row block, K over two 128-column panels
    if a_by == "rows":  # token-major: (B, M, G, K) viewed as (B, G, M, K)
        a = torch.randn(B, M, G, K, generator=g).transpose(1, 2)
    else:  # a transposed view: (B, K, G, M) -> (B, G, M, K), unit row stride
        a = torch.randn(B, K, G, M, generator=g).permute(0, 2, 3, 1)
    b = torch.randn(B, K, G, N, generator=g).transpose(1, 2)
    want = a.double() @ b.double()
    torch.testing.assert_close(native.matmul(a, b).double(), want, atol=1e-4, rtol=1e-5)
    out = torch.randn(B, G, M, N, generator=g)
    before = out.clone()
    native.matmul(a, b, out, accumulate=True)
    torch.testing.assert_close(out.double(), before.double() + want, atol=1e-4, rtol=1e-5)
    shared = torch.randn(1, G, K, N, generator=g).expand(B, G, K, N)  # b broadcast over the batch (stride 0)
    torch.testing.assert_close(native.matmul(a, shared).double(), a.double() @ shared.double(), atol=1e-4, rtol=1e-5)


@needs_kernel
def test_matmul_over_an_empty_reduction_is_zero_or_unchanged():
    a, b = torch.randn(1, 2, 5, 0), torch.randn(1, 2, 0, 16)
    assert native.matmul(a, b).abs().sum() == 0
    out = torch.ones(1, 2, 5, 16)
    assert torch.equal(native.matmul(a, b, out, accumulate=True), torch.ones(1, 2, 5, 16))


@needs_kernel
def test_matmul_refuses_what_it_cannot_take_with_the_shapes():
    with pytest.raises(ValueError, match=r"a \(B, G, M, K\) and b \(B, G, K, N\), got \(1, 2, 5, 7\) and \(1, 2, 6, 16\)"):
        native.matmul(torch.randn(1, 2, 5, 7), torch.randn(1, 2, 6, 16))
    with pytest.raises(ValueError, match="N a multiple of 16.*N = 12"):
        native.matmul(torch.randn(1, 2, 5, 7), torch.randn(1, 2, 7, 12))
    with pytest.raises(ValueError, match="float32"):
        native.matmul(torch.randn(1, 2, 5, 7, dtype=torch.float64), torch.randn(1, 2, 7, 16, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"expected out \(1, 2, 5, 16\)"):
        native.matmul(torch.randn(1, 2, 5, 7), torch.randn(1, 2, 7, 16), torch.empty(1, 2, 5, 32))


@needs_kernel
def test_channel_attention_equals_the_papers_equation_on_outputs_and_gradients():
    from attnlab.mechanisms.local import channel_group_attention
    g = torch.Generator().manual_seed(0)
    B, G, N, d = 2, 3, 300, 16
    q, k, v = (torch.randn(B, N, G, d, generator=g).transpose(1, 2).requires_grad_() for _ in range(3))
    assert native.matmul_supports(q, k, v)
    o = native.channel_attention(q, k, v)
    assert o.transpose(1, 2).is_contiguous()  # token-major: the heads merge without a copy
    ref = channel_group_attention(*(t.double() for t in (q, k, v)), reference=True)
    torch.testing.assert_close(o.double(), ref, atol=1e-5, rtol=1e-5)
    w = torch.randn(o.shape, generator=g)
    mine = torch.autograd.grad((o * w).sum(), (q, k, v))
    want = torch.autograd.grad((ref * w.double()).sum(), (q, k, v))
    for a, b in zip(mine, want):
        torch.testing.assert_close(a.double(), b.double(), atol=1e-4, rtol=1e-4)


def test_channel_attention_is_taken_only_for_float32_widths_of_16():
    q = torch.randn(1, 2, 10, 16)
    assert native.matmul_supports(q) == native.available()
    assert not native.matmul_supports(torch.randn(1, 2, 10, 8))
    assert not native.matmul_supports(q.double())
    with native.disabled():
        assert not native.matmul_supports(q)


# ------------------------------------------------------------- key ranges alone, and masks shared by tiles


def ranges_keep(ranges, tk):
    cols = torch.arange(tk)
    return (cols >= ranges[..., :1]) & (cols < ranges[..., 1:])


@needs_kernel
@pytest.mark.parametrize("tk", [48, 64, 100])  # one register block of keys (fused), and two passes
def test_key_ranges_alone_hide_every_key_outside_them(tk):
    """``k_range`` without a mask is exact: each query sees its run of keys and nothing else -- runs not on vector
    boundaries, runs that differ inside a block of rows, and an empty run."""
    T, tq, H, D = 3, 24, 2, 16
    g = torch.Generator().manual_seed(4)
    first = torch.randint(0, tk - 1, (T, tq), generator=g)
    last = torch.minimum(first + torch.randint(1, 40, (T, tq), generator=g), torch.tensor(tk))
    ranges = torch.stack([first, last], -1).to(torch.int32)
    ranges[0, :8] = torch.tensor([16, 48 if tk >= 48 else tk])  # a whole block of rows on one vector-aligned run
    ranges[1, 3] = 0  # a query that sees nothing: (0, 0)
    q, k, v = (torch.randn(1, H, T * n, D, generator=g).requires_grad_() for n in (tq, tk, tk))
    qi = torch.arange(T * tq).view(T, tq)
    ki = torch.arange(T * tk).view(T, tk)
    o, lse = native.indexed_attention(q, k, v, qi, ki, None, k_range=ranges, return_lse=True)

    keep = ranges_keep(ranges.long(), tk)
    tiles = [t.detach().double().view(H, T, -1, D).transpose(0, 1).requires_grad_() for t in (q, k, v)]
    ro, rlse = reference_attention(*tiles, attn_mask=keep[:, None], return_lse=True)
    torch.testing.assert_close(o.double().view(H, T, tq, D).transpose(0, 1), ro, **TOL)
    torch.testing.assert_close(lse.double().view(H, T, tq).transpose(0, 1), rlse, **TOL)
    assert torch.equal(o[0, :, tq + 3], torch.zeros(H, D))
    w = torch.randn(o.shape, generator=g)
    grads = torch.autograd.grad((o * w).sum(), (q, k, v))
    ref = torch.autograd.grad((ro * w.double().view(H, T, tq, D).transpose(0, 1)).sum(), tiles)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a.double().view(H, T, -1, D).transpose(0, 1), b, **TOL)


@needs_kernel
def test_tiles_take_shared_masks_by_index_with_gradients_per_mask():
    """``mask_index``: tile t adds ``mask[mask_index[t]]`` (-1: nothing); each shared mask's gradient is the sum over
    the tiles that take it -- the same as expanding the masks to one per tile."""
    T, tq, tk, H, D = 5, 16, 32, 2, 16
    g = torch.Generator().manual_seed(5)
    masks = torch.randn(3, H, tq, tk, generator=g).masked_fill(torch.rand(3, H, tq, tk, generator=g) < 0.3,
                                                               float("-inf")).requires_grad_()
    sel = torch.tensor([2, -1, 0, 2, 1])
    q, k, v = (torch.randn(1, H, T * n, D, generator=g).requires_grad_() for n in (tq, tk, tk))
    qi, ki = torch.arange(T * tq).view(T, tq), torch.arange(T * tk).view(T, tk)
    o = native.indexed_attention(q, k, v, qi, ki, None, masks, mask_index=sel)

    per_tile = torch.cat([masks, torch.zeros(1, H, tq, tk)])[sel]  # slot -1 -> the zero mask
    o_ref = native.indexed_attention(q, k, v, qi, ki, None, per_tile[None])
    torch.testing.assert_close(o, o_ref, **TOL)
    w = torch.randn(o.shape, generator=g)
    for a, b in zip(torch.autograd.grad((o * w).sum(), (q, k, v, masks)),
                    torch.autograd.grad((o_ref * w).sum(), (q, k, v, masks))):
        torch.testing.assert_close(a, b, **TOL)


@needs_kernel
def test_a_bad_mask_index_is_refused_with_what_was_expected():
    q, k, v = (torch.randn(1, 2, 8, 16) for _ in range(3))
    qi = ki = torch.arange(8).view(2, 4)
    masks = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ValueError, match=r"mask_index needs a \(2,\) index"):
        native.indexed_attention(q, k, v, qi, ki, None, masks, mask_index=torch.tensor([0, 1, 1]))
    with pytest.raises(ValueError, match=r"must be in \[-1, 2\), got 0 \.\. 2"):
        native.indexed_attention(q, k, v, qi, ki, None, masks, mask_index=torch.tensor([0, 2]))
    with pytest.raises(ValueError, match="mask_index needs"):
        native.indexed_attention(q, k, v, qi, ki, None, None, mask_index=torch.tensor([0, 1]))


def rolled_windows():
    """Swin's shifted windows on a 12 x 12 map: 4 x 4 windows rolled by 2 (regions on vector boundaries after
    reordering) and 4 x 6 windows rolled by (2, 3) (regions of 6 and 12 slots: ranges inside vectors)."""
    return {"4x4 by 2": W.combine_plans([W.rolled_block_plan(12, 4, 2)] * 2),
            "4x6 by (2, 3)": W.combine_plans([W.rolled_block_plan(12, 4, 2), W.rolled_block_plan(12, 6, 3)])}


def test_window_regions_reorder_every_edge_tile_into_runs():
    for plan in rolled_windows().values():
        r = W._regions(plan)
        assert r is not None and r.orders.shape[0] == 4  # inside, 2 edges, corner: only the inside sees all its keys
        assert int(r.keeps.flatten(1).all(1).sum()) == 1
        for t in range(plan.tiles):
            o = r.orders[r.cls[t]]
            assert torch.equal(torch.sort(o).values, torch.arange(plan.tq))  # a permutation of the tile's slots
            assert torch.equal(plan.keep[t][o][:, o], ranges_keep(r.k_range[t].long(), plan.tk))
    assert W._regions(W.combine_plans([W.neighborhood_plan(11, 5, tile=4)] * 2)) is None  # neighbourhoods: no runs
    assert W._regions(W.band_plan(40, 40, 4, 4, 8)) is None  # keys are not the tile's queries


@needs_kernel
@pytest.mark.parametrize("name", list(rolled_windows()))
@pytest.mark.parametrize("with_bias", [False, True])
def test_window_regions_path_same_as_sdpa(name, with_bias, monkeypatch):
    """Shifted windows by regions (reordered slots, key ranges, one mask per class of tile) -- through
    tiled_attention (rows read in place) and tile_attention (tiles already gathered) -- equal the SDPA path on
    outputs, log-sum-exp and gradients, a shared bias included."""
    plan = rolled_windows()[name]
    calls = []
    kernel = native.indexed_attention

    def spy(*args, **kw):  # the regions path: exact key ranges, and masks by class only with a bias
        calls.append((args[10] is W._regions(plan).k_range, args[11] is not None))
        return kernel(*args, **kw)

    monkeypatch.setattr(native, "indexed_attention", spy)
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 144, 4, 16, generator=g).transpose(1, 2).requires_grad_()
    k, v = (torch.randn(2, 144, 2, 16, generator=g).transpose(1, 2).requires_grad_() for _ in range(2))
    table = torch.randn(1, 4, plan.tq, plan.tk, generator=g).requires_grad_() if with_bias else None
    leaves = (q, k, v) + ((table,) if with_bias else ())

    def tiles(t):
        return t.transpose(1, 2).index_select(1, plan.q_index.reshape(-1)).view(-1, plan.tq, t.shape[1], 16) \
            .transpose(1, 2)

    def run(tiled):
        if tiled:
            o, lse = W.tiled_attention(q, k, v, plan, bias=table, return_lse=True)
        else:
            o, lse = W.tile_attention(tiles(q), tiles(k), tiles(v), plan, 2, bias=table, return_lse=True)
        return (o, lse), torch.autograd.grad((o * o.detach().sin()).sum() + lse.sum(), leaves)

    for tiled in (True, False):
        fast = run(tiled)
        with native.disabled():
            sdpa = run(tiled)
        for a, b in zip(fast[0] + fast[1], sdpa[0] + sdpa[1]):
            torch.testing.assert_close(a, b, **TOL)
    assert calls == [(True, with_bias)] * 2


@needs_kernel
def test_an_output_large_enough_to_be_streamed_equals_sdpa():
    """Outputs of 8 MB and more are written by non-temporal stores (STREAM_BYTES in tile_attention.cpp): 10 MB here,
    from the pool, whose buffers start on a cache line."""
    T, H, t, D = 160, 4, 64, 64  # 160 * 4 * 64 * 64 floats = 10 MB of output
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(T, t, H, D, generator=g).transpose(1, 2) for _ in range(3))
    o = native.tile_attention(q, k, v)
    assert o.untyped_storage().data_ptr() % 64 == 0
    torch.testing.assert_close(o, torch.nn.functional.scaled_dot_product_attention(q, k, v), **TOL)


def _cpu_flags() -> set[str]:
    try:
        return {f for ln in open("/proc/cpuinfo") if ln.startswith("flags") for f in ln.split(":")[1].split()}
    except OSError:
        return set()


@pytest.mark.slow
@pytest.mark.parametrize("march,width,flag", [("x86-64", 4, "sse2"), ("x86-64-v3", 8, "avx2"),
                                              ("x86-64-v4", 16, "avx512f")])
def test_every_vector_width_this_cpu_runs_equals_the_reference(march, width, flag, tmp_path):
    """The kernels built for another vector width (ATTNLAB_NATIVE_MARCH) pass this file's and the neighbourhood
    kernel's tests: the register blocks, transposes, reductions and border permutes are written for any width, and
    a build that only the development machine's width exercises (session 12: the AVX-512 build did not compile for
    AVX2) fails here first."""
    if shutil.which("g++") is None or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("needs g++ on x86-64")
    if flag not in _cpu_flags():
        pytest.skip(f"this CPU has no {flag}")
    env = dict(os.environ, ATTNLAB_NATIVE_MARCH=march, ATTNLAB_CACHE=str(tmp_path))
    here = Path(__file__).parent
    probe = "from attnlab.ops import native; print(native.status(), native.vector_width())"
    out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=900)
    assert out.stdout.split()[-2:] == ["ok", str(width)], out.stdout + out.stderr
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(here / "test_native.py"),
                          str(here / "test_native_neighborhood.py"), "-m", "not slow"], env=env, capture_output=True,
                         text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
