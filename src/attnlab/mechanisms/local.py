"""Local and window attention, 1-D and 2-D: the sliding-window and Swin baselines and eleven seed mechanisms.

Every attention core here goes through :mod:`attnlab.ops.window` (query tiles attending to key regions, one SDPA call,
never an N x N matrix) or, for global attention over reduced keys, through :func:`attnlab.ops.attention`. Each class
has ``backend="fast"`` (the default) and ``backend="reference"``: the reference computes the same mechanism with a
dense mask / dense pooling matrices and :func:`attnlab.ops.reference_attention`, straight from the definitions, and
the tests compare the two on outputs and gradients.

Sizes that do not divide a window, stripe, block or pooling factor are handled inside: padding positions are never
keys (they are masked, not zero tokens) and never outputs (cropped). 2-D mechanisms take ``hw=(H, W)`` with tokens in
raster order.

Mechanisms (catalog ids): ``sliding-window`` and ``swin`` (baselines), ``neighborhood-attention-fast`` (#26),
``halonet`` (#5), ``cswin`` (#79), ``cat-rwin`` (#186), ``s2aformer`` (#57), ``hilo`` (#37), ``davit`` (#38),
``l2vit`` (#236), ``duoformer`` (#206), ``medusa`` (#36), ``chada-vit`` (#201).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import positive_int, shape_error
from ..ops import attention, native, reference_attention
from ..ops.window import (
    TilePlan, attention_tiles, band_mask, band_plan, block_mask, block_plan, combine_masks, combine_plans, dense_plan,
    gather_rows, neighborhood_mask, neighborhood_plan, neighborhood_starts, raster_causal, rolled_block_plan,
    scatter_rows, tile_attention, tiled_attention, window_expand, window_mean, window_partition, window_reverse,
    window_valid, windowed,
)
from ..registry import Caps, register
from .base import Mechanism
from .cache import KVCache
from .dense import MultiHeadAttention

_BACKENDS = ("fast", "reference")
_BIG = 1 << 20  # "covers any map": windows and kernels are clamped to the input, so this means "the whole axis"
_CAPS_2D = Caps(causal=False, bidirectional=True, dims=(2,), decode=False, padding=False)


# ---------------------------------------------------------------------------------------------- helpers


def _check_backend(backend: str) -> str:
    if backend not in _BACKENDS:
        raise shape_error("backend", f"one of {_BACKENDS}", repr(backend))
    return backend


def _pair(name: str, value, minimum: int = 1) -> tuple[int, int]:
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    if not (isinstance(value, (tuple, list)) and len(value) == 2):
        raise shape_error(name, "an int or a pair of ints", repr(value))
    return positive_int(name, value[0], minimum), positive_int(name, value[1], minimum)


def _head_dim(dim: int, heads: int, head_dim: int | None) -> int:
    positive_int("dim", dim)
    positive_int("heads", heads)
    hd = head_dim if head_dim is not None else dim // heads
    if hd < 1:
        raise shape_error("head_dim", "dim // heads >= 1 (or an explicit head_dim)", (dim, heads))
    return hd


def _heads(t: Tensor, heads: int) -> Tensor:
    return rearrange(t, "b n (h d) -> b h n d", h=heads)


def _merge(o: Tensor) -> Tensor:
    return rearrange(o, "b h n d -> b n (h d)")


def _qkv(linear: nn.Linear, x: Tensor, heads: int) -> tuple[Tensor, Tensor, Tensor]:
    q, k, v = rearrange(linear(x), "b n (three h d) -> three b h n d", three=3, h=heads)
    return q, k, v


def _as_map(x: Tensor, hw: tuple[int, int]) -> Tensor:
    return x.view(x.shape[0], hw[0], hw[1], x.shape[-1])


def _windows_plan(hw: tuple[int, int], window: tuple[int, int], shift: tuple[int, int] = (0, 0),
                  halo: tuple[int, int] = (0, 0), rolled: bool = True) -> TilePlan:
    """(Shifted, haloed) windows. ``rolled``: a shifted axis that the window divides is cut as Swin's cyclic roll
    (same visibility, one tile fewer per row and no partial tiles); not for in-window convolutions, which must not
    see the rolled-in end of the axis."""
    def axis(L, w, s, h):
        if rolled and s and not h and L % w == 0 and 0 < s < w:
            return rolled_block_plan(L, w, s)
        return block_plan(L, w, s, h)
    return combine_plans([axis(L, w, s, h) for L, w, s, h in zip(hw, window, shift, halo)])


def _windows_mask(hw, window, shift=(0, 0), halo=(0, 0), device=None) -> Tensor:
    return combine_masks([block_mask(L, w, s, h, device) for L, w, s, h in zip(hw, window, shift, halo)])


def _head_rows(linear: nn.Linear, heads: slice, n_heads: int, parts: int = 3) -> tuple[Tensor, Tensor | None]:
    """Rows of a ``(parts h d)``-laid-out projection that belong to a slice of heads (weight, bias)."""
    if heads.start == 0 and heads.stop == n_heads:
        return linear.weight, linear.bias
    w = linear.weight.view(parts, n_heads, -1, linear.in_features)[:, heads].reshape(-1, linear.in_features)
    b = None if linear.bias is None else linear.bias.view(parts, n_heads, -1)[:, heads].reshape(-1)
    return w, b


def _window_branch(x: Tensor, qkv: nn.Linear, heads: slice, n_heads: int, hw, window, shift=(0, 0), bias=None,
                   lepe: nn.Conv2d | None = None, head_dim: int | None = None) -> Tensor:
    """Fast (shifted) window attention for a slice of heads, by the token route: ``x (B, N, C)`` is gathered into
    the windows once, projected there, attended in one SDPA call and scattered back: ``(B, N, heads * d)``.

    Moving the input once instead of q, k and v three times is what makes small windows fast. ``lepe``: CSWin's
    depth-wise conv of V, computed in the windows (padding slots zeroed first = zero padding at window borders).
    """
    plan = _windows_plan(hw, window, shift, rolled=lepe is None)  # no halo: every window's keys are its queries
    B, nh = x.shape[0], heads.stop - heads.start
    w, b = _head_rows(qkv, heads, n_heads)
    q, k, v = rearrange(F.linear(gather_rows(x, plan.q_index), w, b), "bt t (three h d) -> three bt h t d",
                        three=3, h=nh)
    o = tile_attention(q, k, v, plan, B, bias=bias)
    if lepe is not None:
        d = head_dim
        valid = plan.q_valid.to(x.device).repeat(B, 1)[:, None, :, None]
        img = rearrange(v * valid, "bt h (wh ww) d -> bt (h d) wh ww", wh=window[0])
        pe = _depthwise(lepe, slice(heads.start * d, heads.stop * d))(img)
        o = o + rearrange(pe, "bt (h d) wh ww -> bt h (wh ww) d", h=nh)
    return scatter_rows(rearrange(o, "bt h t d -> bt t (h d)"), plan, B)


def _plain_windows(x: Tensor, qkv: nn.Linear, heads: int, hw, window, backend: str) -> Tensor:
    """Multi-head attention inside non-overlapping windows (no shift, no bias): ``(B, N, C) -> (B, N, heads * d)``."""
    if backend == "fast":
        return _window_branch(x, qkv, slice(0, heads), heads, hw, window)
    q, k, v = _qkv(qkv, x, heads)
    return _merge(reference_attention(q, k, v, attn_mask=_windows_mask(hw, window, device=x.device)))


def _shifts(hw: tuple[int, int], window: tuple[int, int], shift: bool) -> tuple[int, int]:
    # Swin's rule, per axis: no shift when the window already covers the axis.
    return tuple(min(w, L) // 2 if shift and L > w else 0 for L, w in zip(hw, window))


def _rel_index(window: tuple[int, int], table: tuple[int, int], halo: tuple[int, int] = (0, 0)) -> Tensor:
    """``(tq, tk)`` index into a ``(2 * table_h - 1) * (2 * table_w - 1)`` relative-offset table for one block.

    Query slot ``(iy, ix)`` of a ``window`` block and key slot ``(ay, ax)`` of its ``window + 2 * halo`` region are
    ``(ay - halo_h - iy, ax - halo_w - ix)`` apart (key minus query).
    """
    (bh, bw), (th, tw), (hh, hw_) = window, table, halo
    qy, qx = torch.meshgrid(torch.arange(bh), torch.arange(bw), indexing="ij")
    ky, kx = torch.meshgrid(torch.arange(bh + 2 * hh) - hh, torch.arange(bw + 2 * hw_) - hw_, indexing="ij")
    dy = ky.reshape(1, -1) - qy.reshape(-1, 1)
    dx = kx.reshape(1, -1) - qx.reshape(-1, 1)
    return (dy + th - 1) * (2 * tw - 1) + (dx + tw - 1)


def _dense_rel_index(hw: tuple[int, int], table: tuple[int, int]) -> Tensor:
    """``(N, N)`` index of the (key - query) offset of every pair of a map, clamped into the table."""
    y, x = torch.meshgrid(torch.arange(hw[0]), torch.arange(hw[1]), indexing="ij")
    y, x = y.reshape(-1), x.reshape(-1)
    dy = (y[None, :] - y[:, None]).clamp(1 - table[0], table[0] - 1)
    dx = (x[None, :] - x[:, None]).clamp(1 - table[1], table[1] - 1)
    return (dy + table[0] - 1) * (2 * table[1] - 1) + (dx + table[1] - 1)


def _masked_bias(bias: Tensor, keep: Tensor) -> Tensor:
    return bias.masked_fill(~keep, float("-inf"))


def _pool_matrix(hw: tuple[int, int], factor: int, dtype, device) -> Tensor:
    """Dense ``(N_cells, N)`` averaging matrix of ``factor x factor`` cells over the real pixels (reference paths)."""
    H, W = hw
    y, x = torch.meshgrid(torch.arange(H, device=device), torch.arange(W, device=device), indexing="ij")
    nw = -(-W // factor)
    cell = ((y // factor) * nw + x // factor).reshape(-1)
    n_cells = -(-H // factor) * nw
    m = (torch.arange(n_cells, device=device)[:, None] == cell[None, :]).to(dtype)
    return m / m.sum(-1, keepdim=True)


def _expand_matrix(hw: tuple[int, int], factor: int, dtype, device) -> Tensor:
    """Dense ``(N, N_cells)`` indicator: each pixel copies the cell it lies in (reference paths)."""
    p = _pool_matrix(hw, factor, dtype, device)
    return (p > 0).to(dtype).transpose(0, 1)


def _grid_of(n: int, hw) -> tuple[int, int]:
    if hw is not None:
        return int(hw[0]), int(hw[1])
    side = math.isqrt(n)
    return side, max(1, n // max(side, 1))


def _core_flops(batch: int, heads: int, head_dim: int, pairs: int) -> float:
    # QK^T and PV: 2 * d multiply-adds each per (query, key) pair
    return 4.0 * batch * heads * head_dim * pairs


# ================================================================================================ 1-D


def _sliding_window_flops(batch, n, heads, head_dim, causal=False, window=256, **_):
    w = min(window, n - 1)
    pairs = n * (w + 1) - w * (w + 1) // 2 if causal else n * (2 * w + 1) - w * (w + 1)
    return _core_flops(batch, heads, head_dim, pairs)


@register(
    "sliding-window", family="local", seed=False,
    paper="Longformer: The Long-Document Transformer", arxiv="2004.05150",
    complexity="O(N w d) time, O(N w) memory",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=True, padding=True),
    flops=_sliding_window_flops, exact_when=dict(window=_BIG),
    test_kwargs=dict(dim=32, heads=4, kv_heads=2, rope=True, window=3, tile=4),
    bench_kwargs=dict(window=512),
    summary="Each query attends to the keys at most `window` positions away (only earlier ones when causal).",
)
class SlidingWindowAttention(MultiHeadAttention):
    """Sliding-window (local band) attention: query ``i`` sees keys ``i - window .. i + window`` (``.. i`` if causal).

    Args: as :class:`~attnlab.mechanisms.dense.MultiHeadAttention` (``kv_heads``, ``head_dim``, ``rope``, ``bias``)
    plus ``window`` (keys on each side), ``tile`` (query tile length of the fast path; default from the window) and
    ``backend="fast" | "reference"``. Decoding with a :class:`KVCache` attends to the last ``window`` cached keys.
    """

    def __init__(self, dim: int, heads: int = 8, *, window: int = 256, tile: int | None = None,
                 backend: str = "fast", **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.window = positive_int("window", window, 0)
        self.tile = None if tile is None else positive_int("tile", tile)
        self.backend = _check_backend(backend)

    def attend(self, x, *, causal, key_padding_mask, hw, cache: KVCache | None):
        q, k, v = self.project(x, offset=0 if cache is None else cache.seq_len)
        if cache is not None:
            k, v, key_padding_mask = cache.append(k, v, key_padding_mask)
            # Only the last (new + window) keys can be seen: slice them so decoding costs O(window).
            start = max(0, k.shape[2] - q.shape[2] - self.window)
            k, v = k[:, :, start:], v[:, :, start:]
            key_padding_mask = None if key_padding_mask is None else key_padding_mask[:, start:]
        nq, nk = q.shape[2], k.shape[2]
        left, right = self.window, (0 if causal else self.window)
        if self.backend == "reference":
            o = reference_attention(q, k, v, attn_mask=band_mask(nq, nk, left, right, x.device),
                                    key_padding_mask=key_padding_mask)
        else:
            o = tiled_attention(q, k, v, band_plan(nq, nk, left, right, self.tile), key_padding_mask=key_padding_mask)
        return self.output(o)


# ============================================================================================ neighborhood


def _na_plan(grid, kernel, dilation, causal, tile) -> TilePlan:
    # Causal: a causal window on the first (row) axis, full windows on the others, then raster-order causality.
    plan = combine_plans([neighborhood_plan(L, k, d, causal and i == 0, t)
                          for i, (L, k, d, t) in enumerate(zip(grid, kernel, dilation, tile))])
    return raster_causal(plan) if causal and len(grid) > 1 else plan


def _na_mask(grid, kernel, dilation, causal, device) -> Tensor:
    mask = combine_masks([neighborhood_mask(L, k, d, causal and i == 0, device)
                          for i, (L, k, d) in enumerate(zip(grid, kernel, dilation))])
    return mask.tril() if causal else mask


def _na_tile_2d(kernel: int) -> int:
    # 2-D query tiles, measured fastest at 128^2 maps, 8 heads of 64 (forward): with the fused kernel (ops.native,
    # float32 CPU), which skips the key columns a row of queries does not see, 4 x 4 for k <= 9 (k = 7: 38 ms vs
    # 45 / 41 for 3 x 3 / 5 x 5), then 8 x 8 while the region fits the kernel's 2048 keys (k = 13: 83-85 ms vs 87-88
    # for 4 x 4; k = 31: 385-427 ms vs 447-482 for 6 x 6 and 864-989 for 16 x 16, whose 2116 keys go to SDPA);
    # through SDPA 8 x 8, and 16 x 16 for large kernels. The 1-D default comes from the plan builder.
    if native.available():
        if kernel <= 9:
            return 4
        for t in (8, 6):
            if (t + kernel - 1) ** 2 <= native.MAX_TILE[1]:
                return t
    return 8 if kernel <= 15 else 16


def _na_flops(batch, n, heads, head_dim, causal=False, kernel_size=7, dilation=1, hw=None, **_):
    grid = (n,) if hw is None else (int(hw[0]), int(hw[1]))
    k = _pair("kernel_size", kernel_size)[: len(grid)]
    d = _pair("dilation", dilation)[: len(grid)]
    pairs = _na_plan(grid, k, d, causal, (None, None)).pairs()
    return _core_flops(batch, heads, head_dim, pairs)


@register(
    "neighborhood-attention-fast", family="local", seed=True, catalog=26,
    paper="Faster Neighborhood Attention: Reducing the O(n^2) Cost of Self Attention at the Threadblock Level",
    arxiv="2403.04690",
    complexity="O(N k^D d) time (k = kernel, D = 1 or 2 dims), O(N * tile-region) memory",
    caps=Caps(causal=True, bidirectional=True, dims=(1, 2), decode=False, padding=False),
    flops=_na_flops, exact_when=dict(kernel_size=_BIG - 1, dilation=1),
    test_kwargs=dict(dim=32, heads=4, kernel_size=3, dilation=1, tile=2),
    bench_kwargs=dict(kernel_size=7),
    summary="Each token attends to its kernel_size nearest neighbours per axis (1-D or 2-D, dilated, optionally "
            "causal); the window shifts inward at the borders.",
)
class NeighborhoodAttention(Mechanism):
    """Neighborhood attention (NA) in 1-D and 2-D with dilation: on float32 CPU maps wide enough, the fused
    per-query kernel (exactly ``k_h x k_w`` keys per query, forward and backward); otherwise tiled attention (GEMMs,
    fused mask).

    Args:
        dim, heads, head_dim: widths.
        kernel_size: odd neighborhood size, an int or a per-axis pair for 2-D (clamped to the axis length).
        dilation: spacing of the neighbours (int or pair); positions form ``dilation`` interleaved groups.
        tile: query tile length per axis of the tiled path (default from the kernel); setting it keeps that path.
        backend: ``"fast"`` (per-query kernel or tiles) or ``"reference"`` (dense neighborhood mask).

    ``causal=True``: 1-D causal NA (keys ``i - kernel + 1 .. i``, as NATTEN). On 2-D maps, raster-order causal: the
    causal window on rows, the full window on columns, and in the query's own row only the columns up to it
    (PixelCNN-style), so that no token sees a later one in raster order.
    """

    def __init__(self, dim: int, heads: int = 8, *, kernel_size: int | tuple[int, int] = 7,
                 dilation: int | tuple[int, int] = 1, head_dim: int | None = None, qkv_bias: bool = True,
                 tile: int | tuple[int, int] | None = None, backend: str = "fast") -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.head_dim = _head_dim(dim, heads, head_dim)
        self.kernel_size = _pair("kernel_size", kernel_size)
        if any(k % 2 == 0 for k in self.kernel_size):
            raise shape_error("kernel_size", "odd sizes (a centred neighborhood)", kernel_size)
        self.dilation = _pair("dilation", dilation)
        self.tile = (None, None) if tile is None else _pair("tile", tile)
        self.backend = _check_backend(backend)
        self.qkv = nn.Linear(dim, 3 * heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(heads * self.head_dim, dim)

    def project(self, x, *, hw=None, offset=0):
        return _qkv(self.qkv, x, self.heads)

    def output(self, o):
        return self.proj(_merge(o))

    def _axes(self, grid):
        # A 1-D input uses the first entry of each per-axis setting.
        n = len(grid)
        tile = self.tile[:n]
        if n == 2 and self.tile == (None, None):
            tile = tuple(_na_tile_2d(k) for k in self.kernel_size)
        return self.kernel_size[:n], self.dilation[:n], tile

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        grid = (x.shape[1],) if hw is None else tuple(hw)
        kernel, dilation, tile = self._axes(grid)
        if self.backend == "fast" and not causal and self.tile == (None, None):
            y = self._per_query(x, grid, kernel, dilation)
            if y is not None:
                return y
        q, k, v = self.project(x)
        if self.backend == "reference":
            o = reference_attention(q, k, v, attn_mask=_na_mask(grid, kernel, dilation, causal, x.device))
        else:
            o = tiled_attention(q, k, v, _na_plan(grid, kernel, dilation, causal, tile))
        return self.output(o)

    def _per_query(self, x: Tensor, grid, kernel, dilation) -> Tensor | None:
        """The fused per-query kernel (:func:`attnlab.ops.native.neighborhood_attention`), or None where it does not
        apply (not float32 CPU, causal, a map narrower than 32 + dilation (kernel - 1) columns, a kernel longer
        than a dilation group).

        It wants channel-first operands: q, k and v are projected image row by image row as ``W x (heads d)``
        matrices (``W_qkv x_row^T``, the same GEMM as the token-major projection), and the output projection reads
        the kernel's rows the same way, so no transposed copy is made on either side."""
        (H, Wd), kern, dil = (grid, kernel, dilation) if len(grid) == 2 else ((1, *grid), (1, *kernel), (1, *dilation))
        rs, cs = neighborhood_starts(H, kern[0], dil[0]), neighborhood_starts(Wd, kern[1], dil[1])
        if rs is None or cs is None or not native.neighborhood_supports(x, (H, Wd), cs, kern, dil):
            return None
        B, hd = x.shape[0], self.heads * self.head_dim
        qkv = torch.matmul(self.qkv.weight, x.view(B, H, Wd, self.dim).transpose(-1, -2))  # (B, H, 3 hd, W)
        if self.qkv.bias is not None:
            qkv = qkv + self.qkv.bias[:, None]
        q, k, v = qkv.view(B, H, 3, self.heads, self.head_dim, Wd).permute(2, 0, 3, 4, 1, 5)  # (B, heads, d, H, W)
        o = native.neighborhood_attention(q, k, v, rs, cs, kern, dil)  # memory (B, H, heads, d, W)
        rows = o.permute(0, 3, 1, 2, 4).reshape(B, H, hd, Wd).transpose(-1, -2)  # (B, H, W, heads d), no copy
        return F.linear(rows, self.proj.weight, self.proj.bias).reshape(B, H * Wd, self.dim)


# ================================================================================================ Swin


def _swin_flops(batch, n, heads, head_dim, causal=False, window_size=7, shift=True, hw=None, **_):
    grid = _grid_of(n, hw)
    win = tuple(min(w, L) for w, L in zip(_pair("window_size", window_size), grid))
    pairs = _windows_plan(grid, win, _shifts(grid, win, shift)).pairs()
    return _core_flops(batch, heads, head_dim, pairs)


class _WindowMechanism(Mechanism):
    """Shared by the 2-D window mechanisms: one qkv projection, one output projection, head-split helpers."""

    def _init_proj(self, dim: int, heads: int, head_dim: int | None, qkv_bias: bool, backend: str) -> None:
        self.dim, self.heads = dim, heads
        self.head_dim = _head_dim(dim, heads, head_dim)
        self.backend = _check_backend(backend)
        self.qkv = nn.Linear(dim, 3 * heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(heads * self.head_dim, dim)

    def project(self, x, *, hw=None, offset=0):
        return _qkv(self.qkv, x, self.heads)

    def output(self, o):
        return self.proj(_merge(o))

    def _window_attention(self, q, k, v, hw, window, shift=(0, 0), halo=(0, 0), bias=None, dense_bias=None):
        """Attention of projected q, k, v inside (shifted, haloed) windows: ``bias`` for the fast (tiled) path,
        ``dense_bias()`` for the reference."""
        if self.backend == "reference":
            keep = _windows_mask(hw, window, shift, halo, q.device)
            if dense_bias is None:
                return reference_attention(q, k, v, attn_mask=keep)
            return reference_attention(q, k, v, attn_mask=_masked_bias(dense_bias(), keep))
        return tiled_attention(q, k, v, _windows_plan(hw, window, shift, halo), bias=bias)


@register(
    "swin", family="local", seed=False,
    paper="Swin Transformer: Hierarchical Vision Transformer using Shifted Windows", arxiv="2103.14030",
    complexity="O(N M^2 d) for M x M windows", caps=_CAPS_2D, flops=_swin_flops,
    exact_when=dict(window_size=_BIG, rel_pos_bias=False),
    test_kwargs=dict(dim=32, heads=4, window_size=2, shift=True),
    bench_kwargs=dict(window_size=8, shift=True),
    summary="Self-attention inside non-overlapping M x M windows, the window grid shifted by M/2 (SW-MSA), with a "
            "learned relative position bias.",
)
class SwinAttention(_WindowMechanism):
    """(Shifted) window multi-head self-attention of Swin, on maps of any size.

    Args: ``window_size`` (int or pair), ``shift`` (True = SW-MSA, the window grid moved by half a window; False =
    W-MSA; Swin alternates the two), ``rel_pos_bias`` (learned bias per relative offset and head), ``head_dim``,
    ``qkv_bias``, ``backend``. Windows larger than the map are clamped to it (and then not shifted, as in Swin).
    """

    def __init__(self, dim: int, heads: int = 8, *, window_size: int | tuple[int, int] = 7, shift: bool = True,
                 rel_pos_bias: bool = True, head_dim: int | None = None, qkv_bias: bool = True,
                 backend: str = "fast") -> None:
        super().__init__()
        self._init_proj(dim, heads, head_dim, qkv_bias, backend)
        self.window_size = _pair("window_size", window_size)
        self.shift = bool(shift)
        self.rel_table = None
        if rel_pos_bias:
            wh, ww = self.window_size
            if (2 * wh - 1) * (2 * ww - 1) > 1 << 22:
                raise shape_error("window_size", "a window small enough for a relative position table "
                                  "(or rel_pos_bias=False)", self.window_size)
            self.rel_table = nn.Parameter(torch.empty((2 * wh - 1) * (2 * ww - 1), heads))
            nn.init.trunc_normal_(self.rel_table, std=0.02)

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        hw = tuple(hw)
        win = tuple(min(w, L) for w, L in zip(self.window_size, hw))
        shift = _shifts(hw, win, self.shift)
        bias = dense = None
        if self.rel_table is not None:
            table = self.rel_table
            idx = _rel_index(win, self.window_size).to(x.device)
            bias = table[idx].permute(2, 0, 1).unsqueeze(0)  # (1, heads, tq, tk): same for every window
            dense = lambda: table[_dense_rel_index(hw, self.window_size).to(x.device)].permute(2, 0, 1)  # noqa: E731
        if self.backend == "fast":
            return self.proj(_window_branch(x, self.qkv, slice(0, self.heads), self.heads, hw, win, shift, bias))
        q, k, v = self.project(x)
        return self.output(self._window_attention(q, k, v, hw, win, shift, dense_bias=dense))


# ============================================================================================== HaloNet


def _halo_geometry(hw, block, halo):
    win = tuple(min(b, L) for b, L in zip(block, hw))
    halos = tuple(h if w < L else 0 for h, w, L in zip(halo, win, hw))
    return win, halos


def _halo_flops(batch, n, heads, head_dim, causal=False, block_size=8, halo_size=3, hw=None, **_):
    grid = _grid_of(n, hw)
    win, halos = _halo_geometry(grid, _pair("block_size", block_size), _pair("halo_size", halo_size, 0))
    return _core_flops(batch, heads, head_dim, _windows_plan(grid, win, halo=halos).pairs())


@register(
    "halonet", family="local", seed=True, catalog=5,
    paper="Scaling Local Self-Attention for Parameter Efficient Visual Backbones", arxiv="2103.12731",
    complexity="O(N (b + 2h)^2 d) for blocks b and halo h", caps=_CAPS_2D, flops=_halo_flops,
    exact_when=dict(block_size=_BIG, rel_pos=False),
    test_kwargs=dict(dim=32, heads=4, block_size=2, halo_size=1),
    bench_kwargs=dict(block_size=8, halo_size=3),
    summary="Blocked local attention: each b x b query block attends to its block grown by a halo of h pixels, "
            "with factorised 2-D relative position logits.",
)
class HaloAttention(_WindowMechanism):
    """HaloNet blocked local self-attention.

    The map is cut into non-overlapping ``block_size`` query blocks; each block's keys/values are the block extended
    by ``halo_size`` pixels on every side (pixels outside the map are masked). ``rel_pos`` adds HaloNet's relative
    logits ``q . (r_h[dy] + r_w[dx])`` (factorised by height and width, one table per axis, shared by heads).
    """

    def __init__(self, dim: int, heads: int = 8, *, block_size: int | tuple[int, int] = 8,
                 halo_size: int | tuple[int, int] = 3, rel_pos: bool = True, head_dim: int | None = None,
                 qkv_bias: bool = False, backend: str = "fast") -> None:
        super().__init__()
        self._init_proj(dim, heads, head_dim, qkv_bias, backend)
        self.block_size = _pair("block_size", block_size)
        self.halo_size = _pair("halo_size", halo_size, 0)
        self.rel_h = self.rel_w = None
        if rel_pos:
            if max(b + h for b, h in zip(self.block_size, self.halo_size)) > 1 << 16:
                raise shape_error("block_size", "blocks small enough for relative tables (or rel_pos=False)",
                                  self.block_size)
            span = [2 * (b + h) - 1 for b, h in zip(self.block_size, self.halo_size)]
            self.rel_h = nn.Parameter(torch.randn(span[0], self.head_dim) * self.head_dim ** -0.5)
            self.rel_w = nn.Parameter(torch.randn(span[1], self.head_dim) * self.head_dim ** -0.5)

    def _table(self) -> tuple[int, int]:
        return tuple(b + h for b, h in zip(self.block_size, self.halo_size))

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        hw = tuple(hw)
        win, halos = _halo_geometry(hw, self.block_size, self.halo_size)
        q, k, v = self.project(x)
        scale = self.head_dim ** -0.5
        bias = dense = None
        if self.rel_h is not None:
            th, tw = self._table()
            (bh, bw), (hh, hw_) = win, halos
            # Offset (key - query) along each axis for every (query slot, key slot) of a block and its halo region,
            # as an index into the tables r_h (2*th - 1 rows) and r_w (2*tw - 1 rows).
            qy, qx = torch.div(torch.arange(bh * bw), bw, rounding_mode="floor"), torch.arange(bh * bw) % bw
            ka = torch.arange((bh + 2 * hh) * (bw + 2 * hw_))
            ky, kx = torch.div(ka, bw + 2 * hw_, rounding_mode="floor") - hh, ka % (bw + 2 * hw_) - hw_
            idx_h = (ky[None, :] - qy[:, None] + th - 1).to(x.device)
            idx_w = (kx[None, :] - qx[:, None] + tw - 1).to(x.device)

            def bias(qt: Tensor, tiles=None) -> Tensor:  # qt (B*T', heads, tq, D) -> (B*T', heads, tq, tk), any tiles
                lh = (qt @ self.rel_h.transpose(0, 1).to(qt.dtype)) * scale
                lw = (qt @ self.rel_w.transpose(0, 1).to(qt.dtype)) * scale
                shape = (*qt.shape[:2], *idx_h.shape)
                return lh.gather(-1, idx_h.expand(shape)) + lw.gather(-1, idx_w.expand(shape))

            def dense() -> Tensor:
                y, xx = torch.meshgrid(torch.arange(hw[0], device=x.device), torch.arange(hw[1], device=x.device),
                                       indexing="ij")
                y, xx = y.reshape(-1), xx.reshape(-1)
                dy = (y[None, :] - y[:, None]).clamp(1 - th, th - 1) + th - 1
                dx = (xx[None, :] - xx[:, None]).clamp(1 - tw, tw - 1) + tw - 1
                lh = (q @ self.rel_h.transpose(0, 1).to(q.dtype)) * scale  # (B, heads, N, 2th-1)
                lw = (q @ self.rel_w.transpose(0, 1).to(q.dtype)) * scale
                shape = (*q.shape[:3], dy.shape[1])
                return lh.gather(-1, dy.expand(shape)) + lw.gather(-1, dx.expand(shape))

        return self.output(self._window_attention(q, k, v, hw, win, halo=halos, bias=bias, dense_bias=dense))


# ================================================================================================ CSWin


def _stripes(hw, split):
    """Window shapes of CSWin's two branches: vertical stripes (H x sw) and horizontal stripes (sw x W)."""
    return (hw[0], min(split, hw[1])), (min(split, hw[0]), hw[1])


def _cswin_flops(batch, n, heads, head_dim, causal=False, split_size=7, hw=None, **_):
    grid = _grid_of(n, hw)
    v_win, h_win = _stripes(grid, split_size)
    h1 = heads // 2
    pairs_v = _windows_plan(grid, v_win).pairs()
    pairs_h = _windows_plan(grid, h_win).pairs()
    return _core_flops(batch, 1, head_dim, h1 * pairs_v + (heads - h1) * pairs_h)


def _depthwise(conv: nn.Conv2d, channels: slice):
    """The depth-wise ``conv`` restricted to a slice of its channels, as a function of an image ``(B, c, h, w)``."""
    def fn(img: Tensor) -> Tensor:
        bias = None if conv.bias is None else conv.bias[channels]
        return F.conv2d(img, conv.weight[channels], bias, padding=conv.padding, groups=img.shape[1])
    return fn


@register(
    "cswin", family="local", seed=True, catalog=79,
    paper="CSWin Transformer: A General Vision Transformer Backbone with Cross-Shaped Windows", arxiv="2107.00652",
    complexity="O(N sw (H + W) d)", caps=_CAPS_2D, flops=_cswin_flops,
    exact_when=dict(split_size=_BIG, lepe=False),
    test_kwargs=dict(dim=32, heads=4, split_size=2),
    bench_kwargs=dict(split_size=8),
    summary="Cross-shaped window attention: half the heads attend within vertical stripes, half within horizontal "
            "stripes of width sw, plus LePE (a depth-wise 3x3 conv of V inside each stripe).",
)
class CSWinAttention(_WindowMechanism):
    """Cross-Shaped Window self-attention with Locally-enhanced Positional Encoding.

    Heads ``0 .. heads//2 - 1`` attend inside vertical stripes (full height, ``split_size`` columns), the others
    inside horizontal stripes (``split_size`` rows, full width). With ``lepe``, each branch adds a depth-wise 3x3
    convolution of its values, computed inside the same stripes (zero padding at stripe borders), to its output.
    """

    def __init__(self, dim: int, heads: int = 8, *, split_size: int = 7, lepe: bool = True,
                 head_dim: int | None = None, qkv_bias: bool = False, backend: str = "fast") -> None:
        super().__init__()
        self._init_proj(dim, heads, head_dim, qkv_bias, backend)
        self.split_size = positive_int("split_size", split_size)
        width = heads * self.head_dim
        self.lepe = nn.Conv2d(width, width, 3, padding=1, groups=width) if lepe else None

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        hw = tuple(hw)
        h1, d = self.heads // 2, self.head_dim
        branches = [(h, w) for h, w in zip((slice(0, h1), slice(h1, self.heads)), _stripes(hw, self.split_size))
                    if h.start < h.stop]
        if self.backend == "fast":
            outs = [_window_branch(x, self.qkv, h, self.heads, hw, w, lepe=self.lepe, head_dim=d) for h, w in branches]
            return self.proj(torch.cat(outs, dim=-1))
        q, k, v = self.project(x)
        outs = []
        for heads, win in branches:
            o = self._window_attention(q[:, heads], k[:, heads], v[:, heads], hw, win)
            if self.lepe is not None:
                vmap = _as_map(_merge(v[:, heads]), hw)
                pe = windowed(_depthwise(self.lepe, slice(heads.start * d, heads.stop * d)), vmap, win)
                o = o + _heads(pe.reshape(x.shape[0], -1, pe.shape[-1]), heads.stop - heads.start)
            outs.append(o)
        return self.output(torch.cat(outs, dim=1))


# ============================================================================================== CAT Rwin


class _DynamicPosBias(nn.Module):
    """CAT's dynamic relative position bias: an MLP from the (dy, dx) offset to one bias per head."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(2, width),
            nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, width),
            nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, width),
            nn.LayerNorm(width), nn.ReLU(), nn.Linear(width, heads),
        )

    def table(self, window: tuple[int, int], dtype, device) -> Tensor:
        """``((2wh-1) * (2ww-1), heads)``: the bias of every offset (key - query) of a window."""
        dy = torch.arange(1 - window[0], window[0], device=device)
        dx = torch.arange(1 - window[1], window[1], device=device)
        offsets = torch.stack(torch.meshgrid(dy, dx, indexing="ij"), dim=-1).reshape(-1, 2)
        return self.mlp(offsets.to(dtype))


def _rwin_windows(hw, split):
    sh, sw = split
    return (min(sh, hw[0]), min(sw, hw[1])), (min(sw, hw[0]), min(sh, hw[1]))


def _cat_flops(batch, n, heads, head_dim, causal=False, split_size=(4, 16), shift=True, hw=None, **_):
    grid = _grid_of(n, hw)
    h1 = heads // 2
    pairs = []
    for win in _rwin_windows(grid, _pair("split_size", split_size)):
        pairs.append(_windows_plan(grid, win, _shifts(grid, win, shift)).pairs())
    return _core_flops(batch, 1, head_dim, h1 * pairs[0] + (heads - h1) * pairs[1])


@register(
    "cat-rwin", family="local", seed=True, catalog=186,
    paper="Cross Aggregation Transformer for Image Restoration", arxiv="2211.13654",
    complexity="O(N sh sw d)", caps=_CAPS_2D, flops=_cat_flops,
    exact_when=dict(split_size=(_BIG, _BIG), position_bias=False, lcm=False),
    test_kwargs=dict(dim=32, heads=4, split_size=(2, 3), shift=True),
    bench_kwargs=dict(split_size=(4, 16), shift=True),
    summary="Rectangle-window attention: half the heads in sh x sw windows, half in sw x sh windows, with the "
            "axial shift, a dynamic position bias and a depth-wise conv Locality Complementary Module.",
)
class RectangleWindowAttention(_WindowMechanism):
    """Rectangle-Window Self-Attention (Rwin-SA) of the Cross Aggregation Transformer.

    Heads ``0 .. heads//2 - 1`` attend inside horizontal rectangles ``split_size = (sh, sw)``, the others inside the
    transposed vertical rectangles ``(sw, sh)``. ``shift``: the Axial-Shift -- each branch's window grid moves by half
    a window along both axes (CAT alternates shifted and unshifted blocks). ``position_bias``: CAT's dynamic
    position bias (an MLP of the relative offset). ``lcm``: the Locality Complementary Module, a depth-wise 3x3
    convolution of V over the whole map added to the attention output. A side ``>= H`` or ``>= W`` gives CAT's
    axial rectangles (full height or width).
    """

    def __init__(self, dim: int, heads: int = 8, *, split_size: int | tuple[int, int] = (4, 16), shift: bool = True,
                 position_bias: bool = True, lcm: bool = True, head_dim: int | None = None, qkv_bias: bool = False,
                 backend: str = "fast") -> None:
        super().__init__()
        self._init_proj(dim, heads, head_dim, qkv_bias, backend)
        self.split_size = _pair("split_size", split_size)
        self.shift = bool(shift)
        h1 = heads // 2
        width = max(4, dim // 32)
        self.pos = nn.ModuleList([_DynamicPosBias(width, n) for n in (h1, heads - h1) if n]) if position_bias \
            else None
        channels = heads * self.head_dim
        self.lcm = nn.Conv2d(channels, channels, 3, padding=1, groups=channels) if lcm else None

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        hw = tuple(hw)
        h1, fast = self.heads // 2, self.backend == "fast"
        q = k = v = None
        if not fast:
            q, k, v = self.project(x)
        outs, b = [], 0
        for heads, win in zip((slice(0, h1), slice(h1, self.heads)), _rwin_windows(hw, self.split_size)):
            if heads.start == heads.stop:
                continue
            shift = _shifts(hw, win, self.shift)
            bias = dense = None
            if self.pos is not None:
                table = self.pos[b].table(win, x.dtype, x.device)
                bias = table[_rel_index(win, win).to(x.device)].permute(2, 0, 1).unsqueeze(0)
                dense = lambda t=table, w=win: t[_dense_rel_index(hw, w).to(x.device)].permute(2, 0, 1)  # noqa: E731
            if fast:
                outs.append(_window_branch(x, self.qkv, heads, self.heads, hw, win, shift, bias))
            else:
                outs.append(_merge(self._window_attention(q[:, heads], k[:, heads], v[:, heads], hw, win, shift,
                                                          dense_bias=dense)))
            b += 1
        o = torch.cat(outs, dim=-1)
        if self.lcm is not None:
            w, bias_v = _head_rows(self.qkv, slice(0, self.heads), self.heads)
            n = self.heads * self.head_dim
            vmap = _as_map(F.linear(x, w[2 * n:], None if bias_v is None else bias_v[2 * n:]), hw)
            o = o + self.lcm(vmap.permute(0, 3, 1, 2)).flatten(2).transpose(1, 2)
        return self.proj(o)


# ============================================================================================= S2AFormer


def _s2a_flops(batch, n, heads, head_dim, causal=False, sr_ratio=2, qk_ratio=0.25, hw=None, **_):
    H, W = _grid_of(n, hw)
    nr = -(-H // sr_ratio) * -(-W // sr_ratio)
    dqk = max(1, round(head_dim * qk_ratio))
    return 2.0 * batch * heads * H * W * nr * (dqk + head_dim)


@register(
    "s2aformer", family="local", seed=True, catalog=57,
    paper="S2AFormer: Strip Self-Attention for Efficient Vision Transformer", arxiv="2505.22195",
    complexity="O(N (N / r^2) (d_qk + d))", caps=_CAPS_2D, flops=_s2a_flops,
    exact_when=dict(sr_ratio=1),
    test_kwargs=dict(dim=32, heads=4, sr_ratio=2, qk_ratio=0.5),
    bench_kwargs=dict(sr_ratio=4, qk_ratio=0.25),
    summary="Strip self-attention: K and V come from a map reduced r x r by a strided depth-wise conv, and Q and K "
            "are projected to few channels, so logits cost N * N/r^2 * d_qk.",
)
class StripSelfAttention(Mechanism):
    """Strip Self-Attention (SSA) of S2AFormer, as far as the abstract and our reading go.

    ``K, V = W_k x_r, W_v x_r`` with ``x_r = DWConv_{r x r, stride r}(x)`` (spatial reduction; the map is zero-padded
    to a multiple of ``r``), ``Q = W_q x``; Q and K have ``qk_dim = round(head_dim * qk_ratio)`` channels per head
    (channel compression), V keeps ``head_dim``. Softmax attention with scale ``qk_dim ** -0.5``.
    """

    def __init__(self, dim: int, heads: int = 8, *, sr_ratio: int = 2, qk_ratio: float = 0.25,
                 head_dim: int | None = None, qkv_bias: bool = True, backend: str = "fast") -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.head_dim = _head_dim(dim, heads, head_dim)
        if not (isinstance(qk_ratio, (int, float)) and 0 < qk_ratio <= 1):
            raise shape_error("qk_ratio", "a number in (0, 1]", repr(qk_ratio))
        self.qk_dim = max(1, round(self.head_dim * qk_ratio))
        self.sr_ratio = positive_int("sr_ratio", sr_ratio)
        self.backend = _check_backend(backend)
        self.q = nn.Linear(dim, heads * self.qk_dim, bias=qkv_bias)
        self.k = nn.Linear(dim, heads * self.qk_dim, bias=qkv_bias)
        self.v = nn.Linear(dim, heads * self.head_dim, bias=qkv_bias)
        self.sr = nn.Conv2d(dim, dim, kernel_size=self.sr_ratio, stride=self.sr_ratio, groups=dim)
        self.proj = nn.Linear(heads * self.head_dim, dim)

    def _reduce(self, x: Tensor, hw) -> Tensor:
        r = self.sr_ratio
        img = _as_map(x, hw).permute(0, 3, 1, 2)
        img = F.pad(img, (0, (-hw[1]) % r, 0, (-hw[0]) % r))
        return self.sr(img).flatten(2).transpose(1, 2)

    def project(self, x, *, hw=None, offset=0):
        xr = self._reduce(x, hw)
        return _heads(self.q(x), self.heads), _heads(self.k(xr), self.heads), _heads(self.v(xr), self.heads)

    def output(self, o):
        return self.proj(_merge(o))

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        q, k, v = self.project(x, hw=tuple(hw))
        if self.backend == "reference":
            return self.output(reference_attention(q, k, v))
        return self.output(narrow_qk_attention(q, k, v))


def narrow_qk_attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """Softmax attention whose queries/keys are narrower than the values, with scale ``d_qk ** -0.5``.

    The fused tile kernel (``ops.native``, float32 CPU) takes the narrow q / k as they are, in tiles of 256
    queries over all keys (1.6x faster than the padded SDPA below at 128 x 128, r = 4, d_qk 16 of 64: 160 vs 262 ms).
    Otherwise: SDPA's fused CPU kernel needs one head width for q, k and v, else it falls back to the materialising
    math path; zero-padding q and k to the value width leaves every logit unchanged and keeps the fused kernel (2-3x
    faster than the fallback, which also stores the N x N/r^2 logits).
    """
    dqk, dv = q.shape[-1], v.shape[-1]
    tile = min(256, q.shape[2])
    if q.shape[2] and k.shape[2] and native.supports(q, k, v, None, (tile, k.shape[2])):
        return tiled_attention(q, k, v, dense_plan(q.shape[2], k.shape[2], tile), scale=dqk ** -0.5)
    if dqk >= dv:
        return attention(q, k, v, scale=dqk ** -0.5)
    pad = (0, dv - dqk)
    return attention(F.pad(q, pad), F.pad(k, pad), v, scale=dqk ** -0.5)


# ================================================================================================= HiLo


def _hilo_split(heads: int, window: int, alpha: float) -> tuple[int, int]:
    if window == 1:  # a 1 x 1 window is plain MHSA: every head is Lo-Fi over unpooled keys (as in LITv2)
        return 0, heads
    lo = int(heads * alpha)
    return heads - lo, lo


def _hilo_flops(batch, n, heads, head_dim, causal=False, window_size=2, alpha=0.5, hw=None, **_):
    grid = _grid_of(n, hw)
    hi, lo = _hilo_split(heads, window_size, alpha)
    win = tuple(min(window_size, L) for L in grid)
    pairs_hi = _windows_plan(grid, win).pairs()
    cells = -(-grid[0] // window_size) * -(-grid[1] // window_size)
    return _core_flops(batch, 1, head_dim, hi * pairs_hi + lo * grid[0] * grid[1] * cells)


@register(
    "hilo", family="local", seed=True, catalog=37,
    paper="Fast Vision Transformers with HiLo Attention", arxiv="2205.13213",
    complexity="Hi-Fi O(N s^2 d) + Lo-Fi O(N (N / s^2) d)", caps=_CAPS_2D, flops=_hilo_flops,
    # Its q/k/v (project) are the Lo-Fi branch's: exact softmax on them is defined only when every head is Lo-Fi
    # (window 1), so there is no fidelity row at the bench setting; exact_when still proves that case.
    approximates_softmax=False,
    exact_when=dict(window_size=1),
    test_kwargs=dict(dim=32, heads=4, window_size=2, alpha=0.5),
    bench_kwargs=dict(window_size=4, alpha=0.5),
    summary="Heads split in two: Hi-Fi heads attend inside s x s windows, Lo-Fi heads attend from every pixel to "
            "the s x s average-pooled keys and values.",
)
class HiLoAttention(Mechanism):
    """HiLo attention (LITv2): high frequencies from local windows, low frequencies from pooled global keys.

    ``(1 - alpha)`` of the heads (Hi-Fi) run window attention in ``window_size`` windows; ``alpha`` of them (Lo-Fi)
    attend from every position to keys/values projected from the ``window_size``-average-pooled map. Each group has
    its own projections and output projection; the outputs are concatenated (``dim`` channels). ``window_size = 1``
    makes every head Lo-Fi over the unpooled map: plain multi-head attention. Pooling cells at the border average the
    pixels they cover.
    """

    def __init__(self, dim: int, heads: int = 8, *, window_size: int = 2, alpha: float = 0.5,
                 qkv_bias: bool = False, backend: str = "fast") -> None:
        super().__init__()
        positive_int("dim", dim)
        positive_int("heads", heads)
        if dim % heads:
            raise shape_error("dim", f"a multiple of heads = {heads} (HiLo concatenates head outputs to dim)", dim)
        if not (isinstance(alpha, (int, float)) and 0 <= alpha <= 1):
            raise shape_error("alpha", "a fraction in [0, 1]", repr(alpha))
        self.dim, self.heads, self.head_dim = dim, heads, dim // heads
        self.window_size = positive_int("window_size", window_size)
        self.backend = _check_backend(backend)
        self.h_heads, self.l_heads = _hilo_split(heads, self.window_size, alpha)
        hd = self.head_dim
        if self.h_heads:
            self.h_qkv = nn.Linear(dim, 3 * self.h_heads * hd, bias=qkv_bias)
            self.h_proj = nn.Linear(self.h_heads * hd, self.h_heads * hd)
        if self.l_heads:
            self.l_q = nn.Linear(dim, self.l_heads * hd, bias=qkv_bias)
            self.l_kv = nn.Linear(dim, 2 * self.l_heads * hd, bias=qkv_bias)
            self.l_proj = nn.Linear(self.l_heads * hd, self.l_heads * hd)

    def _pooled(self, x: Tensor, hw) -> Tensor:
        s = self.window_size
        if s == 1:
            return x
        if self.backend == "reference":
            return _pool_matrix(hw, s, x.dtype, x.device) @ x
        return window_mean(_as_map(x, hw), s).flatten(1, 2)

    def project(self, x, *, hw=None, offset=0):
        """The Lo-Fi projections (every head is Lo-Fi when ``window_size = 1``)."""
        k, v = rearrange(self.l_kv(self._pooled(x, hw)), "b n (two h d) -> two b h n d", two=2, h=self.l_heads)
        return _heads(self.l_q(x), self.l_heads), k, v

    def output(self, o):
        return self.l_proj(_merge(o))

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        hw = tuple(hw)
        outs = []
        if self.h_heads:
            win = tuple(min(self.window_size, L) for L in hw)
            outs.append(self.h_proj(_plain_windows(x, self.h_qkv, self.h_heads, hw, win, self.backend)))
        if self.l_heads:
            q, k, v = self.project(x, hw=hw)
            o = (reference_attention if self.backend == "reference" else attention)(q, k, v)
            outs.append(self.output(o))
        return torch.cat(outs, dim=-1)


# ================================================================================================ DaViT


_DAVIT_MODES = ("dual", "spatial", "channel")


def _davit_flops(batch, n, heads, head_dim, causal=False, window_size=7, mode="dual", hw=None, **_):
    grid = _grid_of(n, hw)
    total = 0.0
    if mode in ("dual", "spatial"):
        win = tuple(min(window_size, L) for L in grid)
        total += _core_flops(batch, heads, head_dim, _windows_plan(grid, win).pairs())
    if mode in ("dual", "channel"):
        total += 4.0 * batch * heads * grid[0] * grid[1] * head_dim * head_dim
    return total


def channel_group_attention(q: Tensor, k: Tensor, v: Tensor, *, reference: bool = False) -> Tensor:
    """DaViT channel attention per group: channel tokens ``Q^T, K^T, V^T`` (``(d, N)`` each), scale ``d ** -0.5``.

    ``q, k, v (B, G, N, d)`` -> ``(B, G, N, d)``: ``out^T = softmax(Q^T K / sqrt(d)) V^T``. The logits are
    ``d x d`` per group -- linear in the number of pixels.
    """
    d = q.shape[-1]
    if reference:  # the paper's equation, written out
        a = torch.softmax((q.transpose(-1, -2) @ k) * d ** -0.5, dim=-1)  # (B, G, d, d)
        return (a @ v.transpose(-1, -2)).transpose(-1, -2)
    if native.matmul_supports(q, k, v):  # the products on the token-major projections in place, forward and backward
        return native.channel_attention(q, k, v)
    # Two GEMMs reducing over the pixels, then out = V a^T in token layout (no transposed copy of the output).
    # SDPA is the wrong kernel here (d "tokens" of N features): measured 70-81 ms against 40 ms for this at
    # 128 x 128, 8 groups of 64; the native products take 20 ms.
    a = torch.matmul(q.transpose(-1, -2), k).mul_(d ** -0.5).softmax(-1)
    return torch.matmul(v, a.transpose(-1, -2))


@register(
    "davit", family="local", seed=True, catalog=38,
    paper="DaViT: Dual Attention Vision Transformers", arxiv="2204.03645",
    complexity="spatial O(N M^2 d) + channel O(N d^2) per group", caps=_CAPS_2D, flops=_davit_flops,
    exact_when=dict(mode="spatial", window_size=_BIG),
    test_kwargs=dict(dim=32, heads=4, window_size=2, mode="dual"),
    bench_kwargs=dict(window_size=8, mode="dual"),
    summary="Dual attention: spatial window attention (tokens = pixels) followed by channel group attention (tokens = "
            "channels, features = all pixels), both linear in the number of pixels.",
)
class DualAttention(Mechanism):
    """DaViT's two attentions in one mixer: ``mode="dual"`` applies spatial window attention then channel group
    attention (a DaViT block pair without the norms, MLPs and residuals between them, which belong to the model);
    ``"spatial"`` or ``"channel"`` runs one of them. Channel groups = heads."""

    def __init__(self, dim: int, heads: int = 8, *, window_size: int = 7, mode: str = "dual",
                 qkv_bias: bool = True, backend: str = "fast") -> None:
        super().__init__()
        if mode not in _DAVIT_MODES:
            raise shape_error("mode", f"one of {_DAVIT_MODES}", repr(mode))
        positive_int("heads", heads)
        if dim % heads:
            raise shape_error("dim", f"a multiple of heads = {heads} (channel groups)", dim)
        self.dim, self.heads, self.head_dim, self.mode = dim, heads, dim // heads, mode
        self.window_size = positive_int("window_size", window_size)
        self.backend = _check_backend(backend)
        if mode in ("dual", "spatial"):
            self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.proj = nn.Linear(dim, dim)
        if mode in ("dual", "channel"):
            self.qkv_c = nn.Linear(dim, 3 * dim, bias=qkv_bias)
            self.proj_c = nn.Linear(dim, dim)

    def project(self, x, *, hw=None, offset=0):
        return _qkv(self.qkv, x, self.heads)

    def output(self, o):
        return self.proj(_merge(o))

    def spatial(self, x: Tensor, hw) -> Tensor:
        win = tuple(min(self.window_size, L) for L in hw)
        return self.proj(_plain_windows(x, self.qkv, self.heads, hw, win, self.backend))

    def channel(self, x: Tensor) -> Tensor:
        q, k, v = _qkv(self.qkv_c, x, self.heads)
        return self.proj_c(_merge(channel_group_attention(q, k, v, reference=self.backend == "reference")))

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        hw = tuple(hw)
        if self.mode in ("dual", "spatial"):
            x = self.spatial(x, hw)
        if self.mode in ("dual", "channel"):
            x = self.channel(x)
        return x


# ================================================================================================ L2ViT


_L2VIT_BRANCHES = ("local", "global")


def _l2vit_flops(batch, n, heads, head_dim, causal=False, window_size=7, branch="local", hw=None, **_):
    grid = _grid_of(n, hw)
    if branch == "global":  # K^T V and Q (K^T V): 2 N d^2 multiply-adds each
        return 4.0 * batch * heads * grid[0] * grid[1] * head_dim * head_dim
    win = tuple(min(window_size, L) for L in grid)
    return _core_flops(batch, heads, head_dim, _windows_plan(grid, win).pairs())


class _ChannelNorm(nn.Module):
    """LayerNorm over the channels of an image ``(B, C, H, W)`` (per pixel, so batch elements stay independent)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(channels)

    def forward(self, img: Tensor) -> Tensor:
        return self.norm(img.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


@register(
    "l2vit", family="local", seed=True, catalog=236,
    paper="The Linear Attention Resurrection in Vision Transformer", arxiv="2501.16182",
    complexity="local O(N M^2 d); global O(N d^2)", caps=_CAPS_2D, flops=_l2vit_flops,
    exact_when=dict(branch="local", window_size=_BIG),
    test_kwargs=dict(dim=32, heads=4, window_size=2, branch="local"),
    bench_kwargs=dict(window_size=8, branch="local"),
    summary="L2ViT's two mixers: local window attention (LWA) and enhanced linear global attention (ReLU kernel, "
            "learned temperature, clamped denominator, plus the local concentration module).",
)
class L2ViTAttention(Mechanism):
    """The attentions of L2ViT, which alternates them block by block.

    ``branch="local"`` (LWA): multi-head attention inside non-overlapping ``window_size`` windows (no shift, no bias).
    ``branch="global"`` (LGA): ``out = ReLU(Q) (ReLU(K)^T V) * t / max(ReLU(Q) sum_j ReLU(K_j), 100)`` per head, with a
    learned temperature ``t``, then the local concentration module LCM (depth-wise k x k conv, GELU, norm, depth-wise
    k x k conv) applied to the normalised output and added to it.
    """

    def __init__(self, dim: int, heads: int = 8, *, window_size: int = 7, branch: str = "local",
                 lcm_kernel: int = 7, head_dim: int | None = None, qkv_bias: bool = True,
                 backend: str = "fast") -> None:
        super().__init__()
        if branch not in _L2VIT_BRANCHES:
            raise shape_error("branch", f"one of {_L2VIT_BRANCHES}", repr(branch))
        self.dim, self.heads, self.branch = dim, heads, branch
        self.head_dim = _head_dim(dim, heads, head_dim)
        self.window_size = positive_int("window_size", window_size)
        self.backend = _check_backend(backend)
        self.qkv = nn.Linear(dim, 3 * heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(heads * self.head_dim, dim)
        if branch == "global":
            k = positive_int("lcm_kernel", lcm_kernel)
            self.temperature = nn.Parameter(torch.full((heads, 1, 1), self.head_dim ** -0.5))
            self.lcm_norm = nn.LayerNorm(dim)
            self.lcm = nn.Sequential(
                nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim), nn.GELU(), _ChannelNorm(dim),
                nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim),
            )

    def project(self, x, *, hw=None, offset=0):
        return _qkv(self.qkv, x, self.heads)

    def output(self, o):
        return self.proj(_merge(o))

    def _linear(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        q, k = F.relu(q), F.relu(k)
        if self.backend == "reference":  # the N x N form: attention weights, then values
            a = q @ k.transpose(-1, -2)
            return (a @ v) * self.temperature / a.sum(-1, keepdim=True).clamp(min=100.0)
        denom = (q @ k.sum(dim=2, keepdim=True).transpose(-1, -2)).clamp(min=100.0)
        return (q @ (k.transpose(-1, -2) @ v)) * self.temperature / denom

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        hw = tuple(hw)
        if self.branch == "local":
            win = tuple(min(self.window_size, L) for L in hw)
            return self.proj(_plain_windows(x, self.qkv, self.heads, hw, win, self.backend))
        a = self.output(self._linear(*self.project(x)))
        img = _as_map(self.lcm_norm(a), hw).permute(0, 3, 1, 2)
        return a + self.lcm(img).flatten(2).transpose(1, 2)


# ============================================================================================ DuoFormer


_DUO_MODES = ("both", "scale")


def _duo_region(hw, region: int, scales: int) -> int:
    f = 2 ** (scales - 1)
    return min(region, f * -(-max(hw) // f))


def _duo_flops(batch, n, heads, head_dim, causal=False, scales=3, region=4, mode="both", hw=None, **_):
    grid = _grid_of(n, hw)
    R = _duo_region(grid, region, scales)
    n_regions = -(-grid[0] // R) * -(-grid[1] // R)
    tokens = sum((R // 2 ** s) ** 2 for s in range(scales))
    total = _core_flops(batch, heads, head_dim, n_regions * tokens * tokens)
    if mode == "both":
        total += _core_flops(batch, heads, head_dim, n_regions * n_regions)
    return total


@register(
    "duoformer", family="local", seed=True, catalog=206,
    paper="DuoFormer: Leveraging Hierarchical Representations by Local and Global Attention Vision Transformer",
    arxiv="2506.12982",
    complexity="scale-wise O(N (sum_s R^2/4^s) d) + patch-wise O((N/R^2)^2 d)", caps=_CAPS_2D, flops=_duo_flops,
    exact_when=dict(scales=1, region=_BIG, mode="scale"),
    test_kwargs=dict(dim=32, heads=4, scales=2, region=2, mode="both"),
    bench_kwargs=dict(scales=3, region=8, mode="both"),
    summary="Scale-wise (local) attention among the multi-scale tokens of each R x R region, plus patch-wise "
            "(global) attention among the regions.",
)
class ScaleWiseAttention(Mechanism):
    """DuoFormer's scale-wise + patch-wise attention on one feature map.

    DuoFormer attends over tokens from several CNN stages; here the scales are built from the input map itself:
    scale ``s`` is the map averaged over ``2^s x 2^s`` cells (``s = 0 .. scales-1``), plus a learned per-scale
    embedding. Scale-wise attention (local): inside every ``region x region`` area, all tokens of all scales that
    fall in it attend to each other; the full-resolution tokens are the output. Patch-wise attention (global,
    ``mode="both"``): one token per region (the mean of its coarsest-scale outputs) attends to all regions, and its
    result is added to every pixel of the region. ``region`` must be divisible by ``2^(scales-1)``.
    """

    def __init__(self, dim: int, heads: int = 8, *, scales: int = 3, region: int = 4, mode: str = "both",
                 head_dim: int | None = None, qkv_bias: bool = True, backend: str = "fast") -> None:
        super().__init__()
        if mode not in _DUO_MODES:
            raise shape_error("mode", f"one of {_DUO_MODES}", repr(mode))
        self.dim, self.heads, self.mode = dim, heads, mode
        self.head_dim = _head_dim(dim, heads, head_dim)
        self.scales = positive_int("scales", scales)
        self.region = positive_int("region", region)
        if self.region % 2 ** (self.scales - 1):
            raise shape_error("region", f"a multiple of 2^(scales-1) = {2 ** (self.scales - 1)}", region)
        self.backend = _check_backend(backend)
        self.scale_embed = nn.Parameter(torch.empty(self.scales, dim))
        nn.init.trunc_normal_(self.scale_embed, std=0.02)
        self.qkv = nn.Linear(dim, 3 * heads * self.head_dim, bias=qkv_bias)
        self.proj = nn.Linear(heads * self.head_dim, dim)
        if mode == "both":
            self.qkv_p = nn.Linear(dim, 3 * heads * self.head_dim, bias=qkv_bias)
            self.proj_p = nn.Linear(heads * self.head_dim, dim)

    def project(self, x, *, hw=None, offset=0):
        """Projections of the full-resolution tokens (scale 0)."""
        return _qkv(self.qkv, x + self.scale_embed[0], self.heads)

    def output(self, o):
        return self.proj(_merge(o))

    def _levels(self, x: Tensor, hw) -> list[Tensor]:
        """Maps ``(B, h_s, w_s, C)`` of every scale, with the scale embedding added."""
        xm = _as_map(x, hw)
        out = []
        for s in range(self.scales):
            f = 2 ** s
            if self.backend == "reference":
                m = (_pool_matrix(hw, f, x.dtype, x.device) @ x).view(x.shape[0], -(-hw[0] // f), -(-hw[1] // f), -1)
            else:
                m = xm if f == 1 else window_mean(xm, f)
            out.append(m + self.scale_embed[s])
        return out

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        hw = tuple(hw)
        R = _duo_region(hw, self.region, self.scales)
        levels = self._levels(x, hw)
        if self.backend == "reference":
            y, last = self._scale_reference(levels, hw, R)
        else:
            y, last = self._scale_fast(levels, hw, R)
        if self.mode == "both":
            y = y + self._patch(last, hw, R)
        return y

    def _scale_fast(self, levels, hw, R):
        B = levels[0].shape[0]
        toks, valid = [], []
        for s, m in enumerate(levels):
            w = R // 2 ** s
            toks.append(window_partition(m, w))  # (B, nh, nw, w*w, C)
            valid.append(window_valid(m.shape[1:3], w, m.device))  # (nh, nw, w*w)
        toks, valid = torch.cat(toks, dim=3), torch.cat(valid, dim=2)
        nh, nw, T = valid.shape
        q, k, v = rearrange(self.qkv(toks), "b nh nw t (three h d) -> three (b nh nw) h t d", three=3, h=self.heads)
        mask = None
        if not bool(valid.all()):
            mask = valid.reshape(1, nh * nw, 1, 1, T).expand(B, -1, -1, -1, -1).reshape(B * nh * nw, 1, 1, T)
        o = attention_tiles(q, k, v, mask)  # one small problem per region: the fused tile kernel where it runs
        o = self.proj(rearrange(o, "(b nh nw) h t d -> b nh nw t (h d)", b=B, nh=nh, nw=nw))
        y = window_reverse(o[:, :, :, : R * R], R, hw).reshape(B, -1, self.dim)
        wl = R // 2 ** (self.scales - 1)
        last = o[:, :, :, T - wl * wl:]
        vl = valid[:, :, T - wl * wl:].to(o.dtype)[None, ..., None]
        region_tokens = (last * vl).sum(3) / vl.sum(3)  # (B, nh, nw, C): mean of the coarsest outputs
        return y, region_tokens

    def _scale_reference(self, levels, hw, R):
        """All tokens of all scales in one sequence, with a dense "same region" mask."""
        B = levels[0].shape[0]
        seq, region_of = [], []
        for s, m in enumerate(levels):
            w = R // 2 ** s
            cy, cx = torch.meshgrid(torch.arange(m.shape[1], device=m.device), torch.arange(m.shape[2],
                                    device=m.device), indexing="ij")
            region_of.append(((cy // w) * -(-hw[1] // R) + cx // w).reshape(-1))
            seq.append(m.reshape(B, -1, self.dim))
        seq, region_of = torch.cat(seq, dim=1), torch.cat(region_of)
        q, k, v = _qkv(self.qkv, seq, self.heads)
        o = self.output(reference_attention(q, k, v, attn_mask=region_of[:, None] == region_of[None, :]))
        n0, nl = levels[0].shape[1] * levels[0].shape[2], levels[-1].shape[1] * levels[-1].shape[2]
        last_region = region_of[-nl:]
        n_regions = -(-hw[0] // R) * -(-hw[1] // R)
        member = (torch.arange(n_regions, device=seq.device)[:, None] == last_region[None, :]).to(o.dtype)
        region_tokens = (member / member.sum(-1, keepdim=True)) @ o[:, -nl:]  # (B, n_regions, C)
        return o[:, :n0], region_tokens.view(B, -(-hw[0] // R), -(-hw[1] // R), self.dim)

    def _patch(self, region_tokens: Tensor, hw, R) -> Tensor:
        B, nh, nw, C = region_tokens.shape
        q, k, v = _qkv(self.qkv_p, region_tokens.reshape(B, nh * nw, C), self.heads)
        o = (reference_attention if self.backend == "reference" else attention)(q, k, v)
        g = self.proj_p(_merge(o)).view(B, nh, nw, C)
        return window_expand(g, R, hw).reshape(B, -1, C)


# ================================================================================================ MEDUSA


def _medusa_flops(batch, n, heads, head_dim, causal=False, scales=3, body_dim=None, hw=None, dim=None, **_):
    H, W = _grid_of(n, hw)
    C = dim or heads * head_dim
    cb = body_dim or max(8, C // 2)
    cells = [-(-H // 2 ** s) * -(-W // 2 ** s) for s in range(scales)]
    total = 2.0 * cells[0] * C * cb  # stem
    for s in range(1, scales):  # the encoder's conv into level s; the decoder's at level s - 1, after upsampling
        total += 2.0 * (cells[s] + cells[s - 1]) * 9 * cb * cb
    for s in range(scales):  # the heads' map convs: one channel per value channel of the heads at scale s
        total += 2.0 * cells[s] * cb * sum(h * scales // heads == s for h in range(heads)) * head_dim
    total += 3.0 * H * W * heads * head_dim  # pool, gate, expand
    return batch * total


@register(
    "medusa", family="conv", seed=True, catalog=36,
    paper="MEDUSA: Multi-scale Encoder-Decoder Self-Attention Deep Neural Network Architecture for Medical Image "
          "Analysis", arxiv="2110.06063",
    complexity="O(N C c_b) (convolutional encoder-decoder body, sigmoid attention maps)", caps=_CAPS_2D,
    flops=_medusa_flops, exact_when=None, approximates_softmax=False,
    test_kwargs=dict(dim=32, heads=4, scales=2),
    bench_kwargs=dict(scales=3),
    summary="One shared encoder-decoder self-attention body whose heads emit sigmoid attention maps at several "
            "scales; each head gates its value channels at its scale.",
)
class MedusaAttention(Mechanism):
    """MEDUSA's "single body, multi-scale heads" selective attention, as a token mixer on one map (our reading).

    Body: a convolutional encoder (1x1 stem, then ``scales - 1`` stride-2 3x3 convs) and decoder (nearest upsampling,
    3x3 conv, skip connection) shared by all heads. Head ``h`` is assigned scale ``s = h * scales // heads``; its
    attention map ``A_h = sigmoid(1x1 conv(decoder level s))`` has the resolution ``ceil(H / 2^s) x ceil(W / 2^s)``
    and gates its value channels averaged over ``2^s x 2^s`` cells; the gated cells are broadcast back to pixels,
    heads are concatenated and projected. Not a softmax attention (``approximates_softmax=False``).
    """

    def __init__(self, dim: int, heads: int = 4, *, scales: int = 3, body_dim: int | None = None,
                 head_dim: int | None = None, qkv_bias: bool = True, backend: str = "fast") -> None:
        super().__init__()
        self.dim, self.heads = dim, heads
        self.head_dim = _head_dim(dim, heads, head_dim)
        self.scales = positive_int("scales", scales)
        if self.scales > heads:
            raise shape_error("scales", f"at most heads = {heads} (every scale needs a head)", scales)
        self.backend = _check_backend(backend)
        cb = body_dim or max(8, dim // 2)
        self.scale_of = [h * self.scales // heads for h in range(heads)]
        self.v = nn.Linear(dim, heads * self.head_dim, bias=qkv_bias)
        self.stem = nn.Conv2d(dim, cb, 1)
        self.down = nn.ModuleList([nn.Conv2d(cb, cb, 3, stride=2, padding=1) for _ in range(self.scales - 1)])
        self.up = nn.ModuleList([nn.Conv2d(cb, cb, 3, padding=1) for _ in range(self.scales - 1)])
        self.maps = nn.ModuleList([nn.Conv2d(cb, self.scale_of.count(s) * self.head_dim, 1)
                                   for s in range(self.scales)])
        self.proj = nn.Linear(heads * self.head_dim, dim)

    def attention_maps(self, x: Tensor, hw) -> list[Tensor]:
        """Per scale ``s``: sigmoid maps ``(B, ceil(H/2^s), ceil(W/2^s), heads_s * head_dim)``."""
        enc = [F.gelu(self.stem(_as_map(x, hw).permute(0, 3, 1, 2)))]
        for conv in self.down:
            enc.append(F.gelu(conv(enc[-1])))
        dec = [None] * self.scales
        dec[-1] = enc[-1]
        for s in range(self.scales - 2, -1, -1):
            up = F.interpolate(dec[s + 1], size=enc[s].shape[-2:], mode="nearest")
            dec[s] = F.gelu(self.up[s](up) + enc[s])
        return [torch.sigmoid(self.maps[s](dec[s])).permute(0, 2, 3, 1) for s in range(self.scales)]

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        return self.proj(self.gate(x, self.v(x), tuple(hw)))

    def gate(self, x: Tensor, v: Tensor, hw) -> Tensor:
        """The attention core, what the spec's FLOPs count: the body's maps from ``x (B, N, dim)`` gating the values
        ``v (B, N, heads * head_dim)`` at their scales; returns the heads concatenated, before the projection."""
        B = x.shape[0]
        maps = self.attention_maps(x, hw)
        outs, c = [], 0
        for s in range(self.scales):
            width = self.scale_of.count(s) * self.head_dim
            vs, f = v[..., c: c + width], 2 ** s
            if self.backend == "reference":
                pooled = _pool_matrix(hw, f, x.dtype, x.device) @ vs
                gated = pooled * maps[s].reshape(B, -1, width)
                outs.append(_expand_matrix(hw, f, x.dtype, x.device) @ gated)
            else:
                gated = maps[s] * window_mean(_as_map(vs, hw), f)
                outs.append(window_expand(gated, f, hw).reshape(B, -1, width))
            c += width
        return torch.cat(outs, dim=-1)


# ============================================================================================== ChAda-ViT


def _chada_flops(batch, n, heads, head_dim, causal=False, **_):
    return _core_flops(batch, heads, head_dim, n * n)


@register(
    "chada-vit", family="dense", seed=True, catalog=201,
    paper="ChAda-ViT: Channel Adaptive Attention for Joint Representation Learning of Heterogeneous Microscopy "
          "Images", arxiv="2311.15264",
    complexity="O((C_img n)^2 d) over all channel x patch tokens",
    caps=Caps(causal=False, bidirectional=True, dims=(1,), decode=False, padding=True),
    flops=_chada_flops, exact_when={},
    test_kwargs=dict(dim=32, heads=4, tokens_per_channel=4, max_channels=16),
    bench_kwargs=dict(tokens_per_channel=256, max_channels=256),
    summary="Inter-channel attention: every image channel is tokenised separately and all channel x patch tokens "
            "attend jointly; channel and patch embeddings tell them apart, padded channels are masked.",
)
class ChannelAdaptiveAttention(MultiHeadAttention):
    """ChAda-ViT's inter-channel attention layer.

    The input holds the patch tokens of each image channel one channel after the other: token ``t`` is patch
    ``t % tokens_per_channel`` of channel ``t // tokens_per_channel``. A learned channel embedding and a learned
    patch-position embedding (shared by all channels) are added, then exact multi-head attention runs over all
    tokens. Images with fewer channels are right-padded with whole channels and ``key_padding_mask`` hides them.
    """

    def __init__(self, dim: int, heads: int = 8, *, tokens_per_channel: int = 196, max_channels: int = 10,
                 **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.tokens_per_channel = positive_int("tokens_per_channel", tokens_per_channel)
        self.max_channels = positive_int("max_channels", max_channels)
        self.channel_embed = nn.Parameter(torch.empty(self.max_channels, dim))
        self.pos_embed = nn.Parameter(torch.empty(self.tokens_per_channel, dim))
        nn.init.trunc_normal_(self.channel_embed, std=0.02)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def embed(self, x: Tensor) -> Tensor:
        n, P = x.shape[1], self.tokens_per_channel
        if -(-n // P) > self.max_channels:
            raise shape_error("chada-vit input", f"at most max_channels * tokens_per_channel = "
                              f"{self.max_channels * P} tokens", n)
        t = torch.arange(n, device=x.device)
        return x + self.channel_embed[t // P] + self.pos_embed[t % P]

    def project(self, x, *, hw=None, offset=0):
        return super().project(self.embed(x), offset=offset)
