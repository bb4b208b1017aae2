"""Local and window attention, written once: 1-D sliding windows, 2-D windows / stripes / rectangles / halos and
(dilated) neighborhoods, all as *query tiles attending to a key region* without ever forming the N x N matrix.

How it works. Every local pattern is described per axis by a :class:`TilePlan`: the queries are cut into tiles of
``tq`` positions, each tile gets one contiguous-in-its-group key region of ``tk`` positions that contains every key any
of its queries may see, and a boolean ``keep (T, tq, tk)`` says which of those keys each query actually sees. A 2-D
pattern is the outer product of two 1-D plans (:func:`combine_plans`). :func:`tiled_attention` then attends within
the tiles exactly, at cost ``O(N * tk * d)`` and memory ``O(N * tk)``:

- float32 on the CPU, tiles of up to 512 queries and 2048 keys: the fused kernel of :mod:`attnlab.ops.native` reads
  each tile's query and key rows in place (by the plan's indices) and writes every output to its position -- nothing
  is gathered, nothing scattered; about twice SDPA's speed on 64-token tiles;
- otherwise: query tiles and key regions are gathered, folded into the batch dimension and passed to
  :func:`attnlab.ops.attention` (torch SDPA), in bounded groups (fully visible tiles without a mask), gathered into
  buffers reused between no-grad calls (see ``_WORKSPACE``; :func:`release_workspace` frees them).

Shifted windows (Swin's roll, CAT's axial shift) keep the rolled-in ends of the map apart inside their edge windows.
On the fused kernel those windows run *by regions* (``_regions``): each edge window's slots are reordered so that
every region is a run, each query then sees one exact key range, the hidden pairs are never computed, and a bias
shared by the windows becomes one mask per class of window instead of one per window.

Window mechanisms whose key regions are their query tiles can instead gather the *input* once (:func:`gather_rows`),
project inside the windows and call :func:`tile_attention` directly, then :func:`scatter_rows` -- one copy of the
input instead of three of q, k, v. :func:`attention_tiles` is the single dispatch (fused kernel or SDPA) for any batch
of small problems.

Builders (per axis, every size allowed, nothing needs to divide):

- :func:`band_plan` -- sliding window: query ``i`` sees keys ``j`` with ``-left <= j - p(i) <= right`` (bottom-right
  aligned when there are fewer queries than keys, as in decoding);
- :func:`neighborhood_plan` -- neighborhood attention (Hassani et al.): each query sees exactly ``kernel`` keys of its
  dilation group, the window *shifted inward* at the borders (never zero-padded); optionally causal;
- :func:`block_plan` -- non-overlapping blocks (Swin windows, CSWin stripes, CAT rectangles) with an optional shift of
  the block grid (Swin's shifted windows: the cyclic roll plus mask is equivalent to blocks whose boundaries are moved
  by the shift) and an optional halo (HaloNet: each block's keys extend ``halo`` positions on each side).

Each builder has a dense twin (:func:`band_mask`, :func:`neighborhood_mask`, :func:`block_mask`, combined in 2-D by
:func:`combine_masks`) written straight from the definition; reference paths use those with
:func:`attnlab.ops.reference_attention`, and the tests check plan against mask.

Also here: window partition / reverse with zero padding for sizes that do not divide (:func:`window_partition`,
:func:`window_reverse`), masked window means (:func:`window_mean`) and their inverse broadcast (:func:`window_expand`),
and a per-window map function (:func:`windowed`) for window-local convolutions.
"""

from __future__ import annotations

import inspect
import math
import threading
from dataclasses import dataclass
from functools import lru_cache
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..errors import positive_int, shape_error
from . import native
from .softmax import attention, check_inputs

__all__ = [
    "TilePlan", "band_plan", "dense_plan", "neighborhood_plan", "neighborhood_starts", "block_plan",
    "rolled_block_plan", "combine_plans", "raster_causal",
    "band_mask", "neighborhood_mask", "block_mask", "combine_masks",
    "tiled_attention", "tile_attention", "attention_tiles", "release_workspace", "gather_tiles", "scatter_tiles",
    "gather_rows", "scatter_rows",
    "window_partition", "window_reverse", "window_valid", "window_mean", "window_expand", "windowed",
]


# Plans and masks are cached per size. They hold O(N * tk) tensors (tens of MB at N = 8k), so the caches stay small:
# a model sees few distinct sizes, and an evicted plan is rebuilt in milliseconds.
_CACHE = 32


# ------------------------------------------------------------------------------------------------ plans


@dataclass(frozen=True, eq=False)
class TilePlan:
    """Queries in tiles, each tile with one key region (tensors on CPU until :meth:`to`).

    ``q_index (T, tq)``: flat position of each query slot (clamped into range for padding slots);
    ``q_valid (T, tq)``: False for padding slots (their outputs are dropped);
    ``k_index (T, tk)``: flat position of each key slot of the tile's region (clamped into range);
    ``keep (T, tq, tk)``: which key each query sees, or None when every query sees every key of its region;
    ``inverse (q_len,)``: the slot ``t * tq + i`` that holds each real query position;
    ``k_window``: ``(pad_left, stride)`` when tile ``t``'s key region is positions
    ``t * stride - pad_left + [0, tk)`` (out-of-range positions masked in ``keep``) -- the regions are then a strided
    view of the zero-padded keys (no gather copy); None otherwise.
    Padding slots never have an all-False row unless the real query they copy has one.
    """

    q_len: int
    k_len: int
    q_index: Tensor
    q_valid: Tensor
    k_index: Tensor
    keep: Tensor | None
    inverse: Tensor
    k_window: tuple[int, int] | None = None

    @property
    def tiles(self) -> int:
        return self.q_index.shape[0]

    @property
    def tq(self) -> int:
        return self.q_index.shape[1]

    @property
    def tk(self) -> int:
        return self.k_index.shape[1]

    def pairs(self) -> int:
        """Number of (real query, visible key) pairs: the useful work of one head, in dot products."""
        if self.keep is None:
            return int(self.q_valid.sum()) * self.tk
        return int((self.keep & self.q_valid[:, :, None]).sum())

    def to(self, device: torch.device | str) -> "TilePlan":
        device = torch.device(device)
        if self.q_index.device == device:
            return self
        return _plan_to(self, str(device))


@lru_cache(maxsize=_CACHE)
def _plan_to(plan: TilePlan, device: str) -> TilePlan:
    move = lambda t: None if t is None else t.to(device)  # noqa: E731
    return TilePlan(plan.q_len, plan.k_len, move(plan.q_index), move(plan.q_valid), move(plan.k_index),
                    move(plan.keep), move(plan.inverse), plan.k_window)


def _finish(q_len, k_len, q_index, q_valid, k_index, keep, inverse, k_window=None) -> TilePlan:
    if keep is not None and bool(keep.all()):
        keep = None  # nothing to mask: SDPA runs its unmasked kernel
    return TilePlan(q_len, k_len, q_index.contiguous(), q_valid.contiguous(), k_index.contiguous(),
                    None if keep is None else keep.contiguous(), inverse.contiguous(), k_window)


@lru_cache(maxsize=_CACHE)
def _additive_keep(plan: TilePlan, dtype: torch.dtype, device: str) -> Tensor:
    """``plan.keep`` as an additive ``(T, 1, tq, tk)`` mask (0 / -inf): SDPA adds it without converting a bool mask
    on every call."""
    keep = plan.keep.to(device)
    return torch.zeros(keep.shape, dtype=dtype, device=device).masked_fill_(~keep, float("-inf")).unsqueeze(1)


def _auto_tile(span: int) -> int:
    # Query tile length for band-like plans. The key region is tile + span - 1 long, so small tiles waste little on
    # masked keys; SDPA stays efficient down to ~64-row tiles. Measured on 2 CPU cores (N = 8k, d = 64): tiles of
    # ~span/8 reach ~70% of dense SDPA's rate on useful FLOPs, span/2 only ~55%.
    return int(min(256, max(32, 2 ** round(math.log2(max(span, 2) / 8)))))


@lru_cache(maxsize=_CACHE)
def band_plan(q_len: int, k_len: int, left: int, right: int, tile: int | None = None) -> TilePlan:
    """Sliding window on one axis: query ``i`` (position ``p = i + k_len - q_len``) sees keys ``p-left .. p+right``.

    ``right = 0`` is the causal sliding window (Mistral / Longformer-causal); ``left = right = w`` the bidirectional
    one. Tiles of ``tile`` queries (default from the window span) attend to a region of
    ``min(tile + left + right, k_len)`` keys, shifted inside ``[0, k_len)`` so that no key slot is out of range.
    """
    positive_int("band_plan q_len", q_len, 0)
    positive_int("band_plan k_len", k_len, 1)
    positive_int("band_plan left", left, 0)
    positive_int("band_plan right", right, 0)
    if q_len == 0:
        raise shape_error("band_plan q_len", "at least one query", q_len)
    left, right = min(left, k_len - 1), min(right, k_len - 1)
    tile = min(positive_int("band_plan tile", tile) if tile is not None else _auto_tile(left + right + 1), q_len)
    off = k_len - q_len
    T = -(-q_len // tile)
    slots = torch.arange(T * tile).view(T, tile)
    q_valid = slots < q_len
    qi = slots.clamp(max=q_len - 1)
    pos = qi + off
    # The union of the windows of a tile spans <= tile + left + right keys from (first query - left).
    start = slots[:, 0] + off - left
    span = tile + left + right
    if 2 * span <= k_len:
        # Small window: regions at a fixed stride, out-of-range keys masked -> a strided view of padded keys.
        kpos = start[:, None] + torch.arange(span)
        keep = (kpos >= 0) & (kpos < k_len)
        k_window = (left - off, tile)
    else:
        # Wide window: regions of min(span, k_len) keys moved inside [0, k_len) (still a superset of the union).
        tk = min(span, k_len)
        kpos = start.clamp(min=0, max=k_len - tk)[:, None] + torch.arange(tk)
        keep = torch.ones(kpos.shape, dtype=torch.bool)
        k_window = None
    rel = kpos[:, None, :] - pos[:, :, None]
    keep = keep[:, None, :] & (rel >= -left) & (rel <= right)
    return _finish(q_len, k_len, qi, q_valid, kpos.clamp(0, k_len - 1), keep, torch.arange(q_len), k_window)


@lru_cache(maxsize=_CACHE)
def dense_plan(q_len: int, k_len: int, tile: int) -> TilePlan:
    """Every query sees every key, in query tiles of ``tile``: full attention as tiles (for the fused kernel, e.g.
    queries and keys of another width than the values, which SDPA's fused kernel does not take)."""
    tile = positive_int("tile", tile)
    T = -(-q_len // tile)
    slots = torch.arange(T * tile)
    return _finish(q_len, k_len, slots.clamp(max=q_len - 1).view(T, tile), (slots < q_len).view(T, tile),
                   torch.arange(k_len).expand(T, k_len), None, torch.arange(q_len))


@lru_cache(maxsize=_CACHE)
def neighborhood_plan(length: int, kernel: int, dilation: int = 1, causal: bool = False,
                      tile: int | None = None) -> TilePlan:
    """Neighborhood attention on one axis (NAT / Faster Neighborhood Attention semantics).

    Positions split into ``dilation`` interleaved groups (``p % dilation``); inside a group of length ``L_g`` query
    ``u`` sees the ``k_g = min(kernel, L_g)`` keys starting at ``clamp(u - kernel // 2, 0, L_g - k_g)``: the window
    keeps its size and shifts inward at the borders. Causal: keys ``max(0, u - kernel + 1) .. u``. A kernel larger
    than the axis is clamped (the neighborhood becomes the whole group), so ``kernel >= length`` with
    ``dilation = 1`` is exact attention.
    """
    L, kernel, d = _neighborhood_args(length, kernel, dilation)
    d = min(d, L)
    Lmax = -(-L // d)
    tile = min(positive_int("neighborhood tile", tile) if tile is not None else _auto_tile(kernel), Lmax)
    Tg = -(-Lmax // tile)
    tk = min(tile + min(kernel, Lmax) - 1, Lmax)
    g = torch.arange(d)[:, None, None]
    u = (torch.arange(Tg)[:, None] * tile + torch.arange(tile))[None]  # (1, Tg, tile) index inside the group
    Lg = (L - g + d - 1) // d  # (d, 1, 1) group lengths
    q_valid = u < Lg
    uc = torch.minimum(u, Lg - 1)
    s, e = _neighborhood_window(uc, Lg, kernel, causal)
    # Window starts never decrease along u and grow by at most one per step, so the windows of a tile lie in
    # [s(first), s(first) + tile + kernel - 1); clamp that region into [0, L_g) when it fits.
    region = torch.minimum(s[..., :1], (Lg - tk).clamp(min=0))  # (d, Tg, 1)
    kv = region + torch.arange(tk)  # (d, Tg, tk) key index inside the group
    keep = (kv[:, :, None, :] >= s[..., None]) & (kv[:, :, None, :] < e[..., None]) & (kv < Lg)[:, :, None, :]
    q_index = (g + d * uc).reshape(d * Tg, tile)
    k_index = (g + d * torch.minimum(kv, Lg - 1)).reshape(d * Tg, tk)
    p = torch.arange(L)
    up = p // d
    inverse = ((p % d) * Tg + up // tile) * tile + up % tile
    return _finish(L, L, q_index, q_valid.expand(d, Tg, tile).reshape(d * Tg, tile), k_index,
                   keep.reshape(d * Tg, tile, tk), inverse)


def _neighborhood_args(length, kernel, dilation) -> tuple[int, int, int]:
    L = positive_int("neighborhood length", length)
    kernel = positive_int("neighborhood kernel_size", kernel)
    if kernel % 2 == 0:
        raise shape_error("neighborhood kernel_size", "an odd integer (a centred window)", kernel)
    return L, kernel, positive_int("neighborhood dilation", dilation)


def _neighborhood_window(u: Tensor, Lg: Tensor, kernel: int, causal: bool) -> tuple[Tensor, Tensor]:
    """First and one-past-last key (indices inside the dilation group) of query ``u`` in a group of ``Lg``."""
    if causal:
        return (u - kernel + 1).clamp(min=0), u + 1
    s = torch.minimum((u - kernel // 2).clamp(min=0), Lg - Lg.clamp(max=kernel))
    return s, s + Lg.clamp(max=kernel)


@lru_cache(maxsize=_CACHE)
def neighborhood_starts(length: int, kernel: int, dilation: int = 1) -> Tensor | None:
    """Non-causal neighborhood attention on one axis as window starts: ``(length,)`` int32, query ``p`` sees
    positions ``start[p] + dilation * j`` for ``j < kernel`` (the semantics of :func:`neighborhood_plan`). None when
    some dilation group is shorter than the kernel (its window is clamped to fewer keys)."""
    L, kernel, d = _neighborhood_args(length, kernel, dilation)
    if kernel > L // d:  # the shortest group has L // d positions
        return None
    p = torch.arange(L)
    g = p % d
    s, _ = _neighborhood_window(p // d, (L - g + d - 1) // d, kernel, False)
    return (g + d * s).to(torch.int32)


def _block_geometry(length: int, block: int, shift: int) -> tuple[int, int]:
    """Effective block size and the number of virtual positions before 0 in the first block (the shift)."""
    b = min(block, length)
    if b == length:  # one block covers the axis: no shift (as Swin does when the map fits in a window)
        return b, 0
    return b, (b - shift % b) % b


@lru_cache(maxsize=_CACHE)
def block_plan(length: int, block: int, shift: int = 0, halo: int = 0) -> TilePlan:
    """Non-overlapping blocks of ``block`` positions; the block grid moved by ``shift``; keys extended by ``halo``.

    Blocks have boundaries at positions ``= shift (mod block)``: with ``shift = 0`` these are Swin / CSWin / CAT
    windows, with ``shift = block // 2`` Swin's shifted windows (the pieces at both ends are their own blocks, exactly
    what Swin's cyclic roll + attention mask computes). Every query of a block sees every key of
    ``[block start - halo, block end + halo)`` inside the axis (HaloNet). A block larger than the axis is clamped.
    """
    L = positive_int("block length", length)
    b, lead = _block_geometry(L, positive_int("block size", block), positive_int("block shift", shift, 0))
    h = min(positive_int("block halo", halo, 0), L - 1) if b < L else 0
    T = -(-(L + lead) // b)
    starts = torch.arange(T) * b - lead
    qpos = starts[:, None] + torch.arange(b)
    q_valid = (qpos >= 0) & (qpos < L)
    kpos = starts[:, None] - h + torch.arange(b + 2 * h)
    k_valid = (kpos >= 0) & (kpos < L)
    keep = k_valid[:, None, :].expand(T, b, b + 2 * h)
    return _finish(L, L, qpos.clamp(0, L - 1), q_valid, kpos.clamp(0, L - 1), keep, torch.arange(L) + lead)


@lru_cache(maxsize=_CACHE)
def rolled_block_plan(length: int, block: int, shift: int) -> TilePlan:
    """Swin's shifted windows as its paper computes them: the axis cyclically rolled by ``-shift``, cut into
    ``length / block`` blocks, and in the last block (which holds both ends of the axis) the two ends kept apart.

    Sees exactly what ``block_plan(length, block, shift)`` sees, in ``length / block`` full tiles instead of
    ``length / block + 1`` with two partial ones: on a 128 x 128 map with 8 x 8 windows, 256 tiles instead of 289.
    The roll costs nothing -- a tile's slots are just other positions. ``length`` must be a multiple of ``block``
    and ``0 < shift < block``.
    """
    L, b = positive_int("block length", length), positive_int("block size", block)
    shift = positive_int("block shift", shift)
    if L % b or shift >= b:
        raise shape_error("rolled_block_plan", "a length divisible by the block and 0 < shift < block",
                          f"length {L}, block {b}, shift {shift}")
    T = L // b
    rolled = torch.arange(L).view(T, b)
    pos = (rolled + shift) % L
    seg = (rolled >= L - b).long() + (rolled >= L - shift).long()  # 0 inside, 1 and 2: the two ends
    keep = seg[:, :, None] == seg[:, None, :]
    return _finish(L, L, pos, torch.ones(T, b, dtype=torch.bool), pos, keep, (torch.arange(L) - shift) % L)


def combine_plans(plans: Sequence[TilePlan]) -> TilePlan:
    """The plan of a grid (raster order, last axis fastest) from one plan per axis: tiles and masks are products."""
    if len(plans) == 0:
        raise shape_error("combine_plans", "at least one axis plan", 0)
    if len(plans) == 1:
        return plans[0]
    return _combine(tuple(plans))


@lru_cache(maxsize=_CACHE)
def _combine(plans: tuple[TilePlan, ...]) -> TilePlan:
    out = plans[0]
    for b in plans[1:]:
        out = _combine2(out, b)
    return out


def _combine2(a: TilePlan, b: TilePlan) -> TilePlan:
    Ta, Tb, tqa, tqb, tka, tkb = a.tiles, b.tiles, a.tq, b.tq, a.tk, b.tk
    q_index = a.q_index[:, None, :, None] * b.q_len + b.q_index[None, :, None, :]
    q_valid = a.q_valid[:, None, :, None] & b.q_valid[None, :, None, :]
    k_index = a.k_index[:, None, :, None] * b.k_len + b.k_index[None, :, None, :]
    keep = None
    if a.keep is not None or b.keep is not None:
        ka = a.keep if a.keep is not None else torch.ones(Ta, tqa, tka, dtype=torch.bool)
        kb = b.keep if b.keep is not None else torch.ones(Tb, tqb, tkb, dtype=torch.bool)
        keep = (ka[:, None, :, None, :, None] & kb[None, :, None, :, None, :]).reshape(Ta * Tb, tqa * tqb, tka * tkb)
    ta, ia = a.inverse // tqa, a.inverse % tqa
    tb, ib = b.inverse // tqb, b.inverse % tqb
    inverse = ((ta[:, None] * Tb + tb[None, :]) * tqa + ia[:, None]) * tqb + ib[None, :]
    return _finish(a.q_len * b.q_len, a.k_len * b.k_len, q_index.reshape(Ta * Tb, tqa * tqb),
                   q_valid.reshape(Ta * Tb, tqa * tqb), k_index.reshape(Ta * Tb, tka * tkb), keep, inverse.reshape(-1))


@lru_cache(maxsize=_CACHE)
def raster_causal(plan: TilePlan) -> TilePlan:
    """``plan`` without the keys that come after their query in flat (raster) order: causality on a grid.

    Used for causal 2-D neighborhoods (causal window on the row axis, full window on the column axis, then this):
    earlier rows contribute their whole column neighborhood, the current row only the columns up to the query --
    the PixelCNN-style raster-causal neighborhood. A query always keeps itself.
    """
    keep = plan.k_index[:, None, :] <= plan.q_index[:, :, None]
    if plan.keep is not None:
        keep = keep & plan.keep
    return _finish(plan.q_len, plan.k_len, plan.q_index, plan.q_valid, plan.k_index, keep, plan.inverse)


# ------------------------------------------------------------------------------------- dense definitions


def band_mask(q_len: int, k_len: int, left: int, right: int, device=None) -> Tensor:
    """Bool ``(q_len, k_len)``: key ``j`` visible from query ``i`` iff ``-left <= j - (i + k_len - q_len) <= right``."""
    p = torch.arange(q_len, device=device)[:, None] + (k_len - q_len)
    j = torch.arange(k_len, device=device)[None, :]
    return (j >= p - left) & (j <= p + right)


def neighborhood_mask(length: int, kernel: int, dilation: int = 1, causal: bool = False, device=None) -> Tensor:
    """Bool ``(length, length)`` neighborhood pattern, from the definition (see :func:`neighborhood_plan`)."""
    d = min(dilation, length)
    p = torch.arange(length, device=device)
    group, u = p % d, p // d
    L_g = (length - group + d - 1) // d  # length of each position's dilation group
    k_g = L_g.clamp(max=kernel)
    if causal:
        start, end = (u - kernel + 1).clamp(min=0), u + 1
    else:
        start = torch.minimum((u - kernel // 2).clamp(min=0), L_g - k_g)
        end = start + k_g
    same_group = group[:, None] == group[None, :]
    return same_group & (u[None, :] >= start[:, None]) & (u[None, :] < end[:, None])


def block_mask(length: int, block: int, shift: int = 0, halo: int = 0, device=None) -> Tensor:
    """Bool ``(length, length)`` block pattern, from the definition (see :func:`block_plan`)."""
    b, lead = _block_geometry(length, block, shift)
    halo = halo if b < length else 0
    p = torch.arange(length, device=device)
    start = (p + lead) // b * b - lead  # first position of each query's block
    return (p[None, :] >= start[:, None] - halo) & (p[None, :] < start[:, None] + b + halo)


def combine_masks(masks: Sequence[Tensor]) -> Tensor:
    """Dense mask of a grid in raster order from one ``(L_q, L_k)`` mask per axis (their outer product)."""
    out = masks[0]
    for m in masks[1:]:
        out = (out[:, None, :, None] & m[None, :, None, :]).reshape(out.shape[0] * m.shape[0], -1)
    return out


# -------------------------------------------------------------------------------------------- attention


def gather_tiles(x: Tensor, index: Tensor) -> Tensor:
    """``x (B, H, N, D)``, ``index (T, t)`` -> ``(B*T, H, t, D)``: the rows of every tile, tiles folded into batch.

    One gather in token-major layout, read through the strides of ``x`` (no copy of a strided projection view
    first); the result is a transposed view of a contiguous ``(B*T, t, H, D)`` tensor, which SDPA reads directly.
    """
    B, H, _, D = x.shape
    T, t = index.shape
    xt, flat = x.transpose(1, 2), index.reshape(-1)
    # index_select first copies a strided source to contiguous memory: cheapest while it fits in cache; beyond that
    # advanced indexing, which gathers through the strides, moves half the bytes (measured: 2x faster at 16k x 512).
    g = xt.index_select(1, flat) if x.numel() < _SMALL else xt[:, flat]
    return g.view(B * T, t, H, D).transpose(1, 2)


_SMALL = 1 << 21  # elements (8 MB of fp32)


def scatter_tiles(o: Tensor, plan: TilePlan, batch: int) -> Tensor:
    """Tile outputs ``(B*T, H, tq, Dv)`` -> ``(B, H, q_len, Dv)`` in position order (padding slots dropped).

    Large outputs: one gather, query ``p`` reads slot ``inverse[p]`` of the 5-D view ``(B, T, H, tq, Dv)``; the result
    is a permuted view of a token-major ``(q_len, B, H, Dv)`` tensor (``b h n d -> b n (h d)`` is then free for B = 1).
    """
    _, H, tq, Dv = o.shape
    if o.numel() < _SMALL:
        flat = o.transpose(1, 2).reshape(batch, plan.tiles * tq, H, Dv)
        return flat.index_select(1, plan.inverse).transpose(1, 2)
    o5 = o.view(batch, plan.tiles, H, tq, Dv)
    return o5[:, plan.inverse // tq, :, plan.inverse % tq].permute(1, 2, 0, 3)


BiasFn = Callable[..., Tensor]  # bias(qt) or bias(qt, tiles), see tiled_attention


def tiled_attention(q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, *, scale: float | None = None,
                    key_padding_mask: Tensor | None = None, bias: Tensor | BiasFn | None = None,
                    return_lse: bool = False):
    """Exact softmax attention restricted to a :class:`TilePlan`, without forming the N x N matrix.

    ``q (B, Hq, q_len, D)``, ``k, v (B, Hkv, k_len, D[v])`` in flat (raster) order; GQA by broadcasting.
    ``key_padding_mask (B, k_len)`` bool, True = keep. ``bias``: additive logits (already scaled): a 4-D tensor
    broadcastable to ``(B*T, Hq, tq, tk)`` (e.g. ``(1, Hq, tq, tk)``, the same for every tile), a 5-D tensor
    broadcastable to ``(B, T, Hq, tq, tk)``, or a function returning a 4-D tensor for given query tiles
    (content-dependent relative positions): ``bias(qt)`` is called once with every tile ``(B*T, Hq, tq, D)``,
    ``bias(qt, tiles)`` per group of tiles, ``tiles`` (a slice or an index tensor into the plan's tiles) saying which
    (preferred: groups keep temporaries small). A query that sees no key returns 0.
    Returns ``(B, Hq, q_len, Dv)``, a transposed view of a token-major ``(B, q_len, Hq, Dv)`` tensor; with
    ``return_lse`` also the log-sum-exp ``(B, Hq, q_len)`` over each query's visible keys (float32/64, ``-inf``
    where none), to merge with attention over other key sets (computed by the chunked exact op: SDPA returns none).

    Float32 CPU tiles within ``native.MAX_TILE`` and no callable bias: the fused kernel reads every tile's rows in
    place and writes the output (nothing gathered). Otherwise tiles are processed in groups whose gathered q / k / v
    tiles stay under ``_CHUNK_BYTES``: large temporaries are fresh ``mmap`` pages the kernel must fault in and zero
    on every call (measured: gathering 100 MB of key tiles took 150 ms fresh, 25 ms into warm memory); small ones
    are recycled by the allocator and stay in cache. Each group is gathered, attended (:func:`attention_tiles`) and
    written to the output.
    """
    s = check_inputs(q, k, v, key_padding_mask, None, scale)
    if s.q_len != plan.q_len or s.kv_len != plan.k_len:
        raise shape_error("tiled_attention", f"q_len = {plan.q_len} and k_len = {plan.k_len} (the plan's)",
                          f"q_len = {s.q_len}, k_len = {s.kv_len}")
    plan = plan.to(q.device)
    B, T, tq, tk = s.batch, plan.tiles, plan.tq, plan.tk
    if not callable(bias) and native.supports(q, k, v, None, (tq, tk)):
        return _tiled_native(q, k, v, plan, s.batch, scale, key_padding_mask, bias, return_lse)
    in_order = _in_order(plan)
    if plan.k_window is not None:  # strided views of the zero-padded keys: nothing is gathered
        kw, vw = (_window_view(t, *plan.k_window, T, tk) for t in (k, v))
    else:  # gathers read token rows: one contiguous (B, N, H*D) copy makes each group's index_select a memcpy
        kw, vw = _rows(k), _rows(v)
    qr = None if in_order else _rows(q)
    whole = callable(bias) and not _takes_tiles(bias)  # bias(qt) expects every tile at once, in plan order
    groups, slots = _schedule(plan, whole or plan.k_window is not None)
    # bytes a tile gathers: its queries (unless in order), its keys and values (unless strided views)
    q_bytes = 0 if in_order else tq * s.q_heads * s.head_dim
    kv_bytes = 0 if plan.k_window is not None else tk * s.kv_heads * (s.head_dim + s.v_dim)
    row_bytes = q.element_size() * B * (q_bytes + kv_bytes)
    step = T if whole or row_bytes == 0 else max(1, _CHUNK_BYTES // row_bytes)
    reuse = not torch.is_grad_enabled() and not getattr(_WORKSPACE, "busy", False)
    outs, lses = [], []
    try:
        _WORKSPACE.busy = reuse or getattr(_WORKSPACE, "busy", False)
        for g in groups:
            for c0 in range(0, g.size, step):
                tiles = g.part(c0, c0 + step)
                if isinstance(tiles, slice) and in_order:
                    qt = _tile_rows(q, T, tq, tiles.start, tiles.stop)
                else:
                    qr = _rows(q) if qr is None else qr
                    qt = _gather(qr, g.q_index[c0: c0 + step], s.q_heads, "q" if reuse else None)
                if plan.k_window is not None:
                    kt, vt = (_window_slice(t, tiles.start, tiles.stop) for t in (kw, vw))
                else:
                    kt, vt = (_gather(t, g.k_index[c0: c0 + step], s.kv_heads, r if reuse else None)
                              for t, r in ((kw, "k"), (vw, "v")))
                o = _attend(qt, kt, vt, plan, B, tiles, g, scale, key_padding_mask, bias, return_lse)
                if return_lse:
                    o, lse = o
                    lses.append(lse.transpose(1, 2).unflatten(0, (B, -1)))  # (B, Tc, tq, Hq)
                outs.append(o.transpose(1, 2).unflatten(0, (B, -1)))  # (B, Tc, tq, Hq, Dv), token-major from SDPA
    finally:
        if reuse:
            _WORKSPACE.busy = False
    o = _untile(outs, B, T * tq, plan.q_len, slots).transpose(1, 2)
    if not return_lse:
        return o
    return o, _untile(lses, B, T * tq, plan.q_len, slots).transpose(1, 2)


def _tiled_native(q: Tensor, k: Tensor, v: Tensor, plan: TilePlan, B: int, scale, key_padding_mask, bias,
                  return_lse: bool):
    """:func:`tiled_attention` by the fused kernel reading each tile's rows in place (nothing gathered, outputs
    written to their positions): the plan's mask and a tensor bias become one additive ``(B|1, T, Hq|1, tq, tk)``,
    or, for windows whose regions line up (:func:`_regions`), a few shared masks and exact key ranges."""
    T = plan.tiles
    by_regions = _by_regions(plan, bias, q.dtype) if key_padding_mask is None else None
    if by_regions is not None:
        r, mask, sel = by_regions
        return native.indexed_attention(q, k, v, r.positions, r.positions, r.valid, mask, None, scale, return_lse,
                                        r.k_range, sel)
    q_valid, mask, ranges = _native_args(plan, q.dtype, str(q.device))
    if bias is not None:
        b = _fold_bias(bias, B, T).to(q.dtype)
        b = b.unsqueeze(0) if b.shape[0] == 1 else b.unflatten(0, (B, T))
        mask = b if mask is None else b + mask
    return native.indexed_attention(q, k, v, plan.q_index, plan.k_index, q_valid, mask, key_padding_mask,
                                    scale, return_lse, ranges)


@lru_cache(maxsize=_CACHE)
def _native_args(plan: TilePlan, dtype: torch.dtype, device: str):
    """What the fused kernel needs of a plan besides its indices, prepared once per plan: the padding slots as uint8
    (None when there are none), the mask as additive ``(1, T, 1, tq, tk)`` logits and each query's key range (both
    None when every query sees its whole region)."""
    q_valid = None if bool(plan.q_valid.all()) else plan.q_valid.to(torch.uint8)
    if plan.keep is None:
        return q_valid, None, None
    return q_valid, _additive_keep(plan, dtype, device).unsqueeze(0), native.key_ranges(plan.keep)


@dataclass(frozen=True, eq=False)
class _Regions:
    """A window plan's tiles with each tile's slots reordered so that every query sees one contiguous run of keys.

    ``cls (T,)``: each tile's class (tiles of a class share order and mask: Swin's shifted windows have four --
    inside, two edges, the corner); ``orders (U, tq)``: each class's new slot order (the same for its queries and
    keys; tile t's is ``orders[cls[t]]``) and ``keeps (U, tq, tk)`` its mask in that order; ``k_range (T, tq, 2)``
    int32: each reordered query's visible keys, exactly (nothing else hidden); ``positions (T, tq)``: the plan's positions
    in the new order, and ``valid`` its padding slots in that order (uint8; None when there are none); ``slots (T,
    tq)``: the new order as slots of window-ordered tiles (``t * tq + order``)."""

    k_range: Tensor
    cls: Tensor
    orders: Tensor
    keeps: Tensor
    positions: Tensor
    valid: Tensor | None
    slots: Tensor


_MAX_CLASSES = 64  # more distinct tile masks than this: not windows with a few kinds of edge


@lru_cache(maxsize=_CACHE)
def _regions(plan: TilePlan) -> _Regions | None:
    """The :class:`_Regions` of a plan whose tiles attend within themselves (keys = queries, slot for slot) and whose
    masks group the slots into regions (Swin's and CAT's shifted windows: the rolled-in ends of the map kept apart),
    or None. The fused kernel then skips the hidden pairs of every edge tile (their regions are whole blocks of
    rows and columns) and needs no mask at all; without it every edge tile computes its whole ``tq x tk`` block
    and reads a mask per tile (6-8% of a 128 x 128 map's pairs, hidden, for 8 x 8 and 4 x 16 windows)."""
    if plan.keep is None or plan.tq != plan.tk or not torch.equal(plan.q_index, plan.k_index):
        return None
    T, tq, tk = plan.keep.shape
    keeps, cls = torch.unique(plan.keep.reshape(T, tq * tk), dim=0, return_inverse=True)
    if keeps.shape[0] > _MAX_CLASSES:
        return None
    keeps = keeps.view(-1, tq, tk)
    cols = torch.arange(tk)
    orders, reordered, ranges = [], [], []
    for keep in keeps:
        first = torch.where(keep.any(1), keep.to(torch.int8).argmax(1), tk)  # a region's slots share their first key
        order = torch.sort(first, stable=True).indices
        kp = keep[order][:, order]
        r = native.key_ranges(kp[None])[0]
        if not torch.equal(kp, (cols >= r[:, :1]) & (cols < r[:, 1:])):  # not regions: some query's keys not a run
            return None
        orders.append(order)
        reordered.append(kp)
        ranges.append(r)
    orders, keeps, ranges = torch.stack(orders), torch.stack(reordered), torch.stack(ranges)
    order = orders[cls]
    valid = None if bool(plan.q_valid.all()) else plan.q_valid.gather(1, order).to(torch.uint8)
    return _Regions(ranges[cls], cls, orders, keeps, plan.q_index.gather(1, order), valid,
                    torch.arange(T)[:, None] * tq + order)


def _by_regions(plan: TilePlan, bias, dtype: torch.dtype) -> tuple[_Regions, Tensor | None, Tensor | None] | None:
    """The fused kernel's arguments for a plan with :func:`_regions` -- the regions, the masks and each tile's mask --
    or None (no regions, or a bias the tiles do not share: per tile, or computed from the queries). Without a bias
    there is no mask (the key ranges hide all there is to hide); with one, one ``(Hq | 1, tq, tk)`` mask per class of
    tile, the bias reordered as the class's slots and hidden outside its keeps."""
    regions = _regions(plan)
    if regions is None or bias is None:
        return None if regions is None else (regions, None, None)
    if callable(bias) or bias.dim() not in (4, 5) or any(n != 1 for n in bias.shape[:-3]):
        return None
    o = regions.orders
    tq, tk = regions.keeps.shape[1:]
    b = bias.to(dtype).reshape(bias.shape[-3:]).expand(-1, tq, tk)
    masks = b[:, o[:, :, None], o[:, None, :]].transpose(0, 1)  # (U, Hq | 1, tq, tk)
    return regions, masks.masked_fill(~regions.keeps[:, None], float("-inf")), regions.cls.to(torch.int32)


def _untile(parts: list[Tensor], B: int, rows: int, q_len: int, slots: Tensor | None) -> Tensor:
    """Per-group results ``(B, Tc, tq, ...)`` -> ``(B, q_len, ...)`` in token order."""
    o = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
    o = o.reshape(B, rows, *o.shape[3:])
    return o[:, :q_len] if slots is None else o.index_select(1, slots)


# Gathered tiles are temporaries of up to T * tk * H * D elements (100 MB per tensor for 7 x 7 neighborhoods on a
# 128 x 128 map): fresh allocations that large are new mmap pages the kernel must fault in and zero on every call
# (measured: gathering 100 MB of key tiles took 150 ms into fresh memory, 25 ms into warm memory). Without autograd
# (nothing saves the tiles for backward) they are gathered into per-thread buffers that live on between calls, at
# most _WORKSPACE_BYTES each (q, k, v); tiles are processed in groups of at most _CHUNK_BYTES so that peak memory
# stays bounded for any map size. Each group is a few large operations (index_select, one SDPA call).
_CHUNK_BYTES = 96 << 20
_WORKSPACE_BYTES = 256 << 20
_WORKSPACE = threading.local()


def release_workspace() -> None:
    """Free this thread's gather buffers (kept between no-grad calls of :func:`tiled_attention`) and the fused
    kernel's idle result buffers (:func:`attnlab.ops.native.release_workspace`)."""
    _WORKSPACE.__dict__.pop("buffers", None)
    native.release_workspace()


def _buffer(role: str, numel: int, like: Tensor) -> Tensor | None:
    if numel * like.element_size() > _WORKSPACE_BYTES:
        return None
    bufs = _WORKSPACE.__dict__.setdefault("buffers", {})
    b = bufs.get(role)
    if b is None or b.numel() < numel or b.dtype != like.dtype or b.device != like.device:
        b = bufs[role] = torch.empty(numel, dtype=like.dtype, device=like.device)
    return b[:numel]


def _rows(x: Tensor) -> Tensor:
    """``x (B, H, N, D)`` -> its token rows ``(B, N, H*D)``, contiguous (a view when ``x`` is token-major)."""
    return x.transpose(1, 2).flatten(2).contiguous()


def _gather(rows: Tensor, index: Tensor, heads: int, buffer: str | None = None) -> Tensor:
    """Rows ``(B, N, H*D)`` at ``index (Tc, t)`` -> tiles ``(B*Tc, H, t, D)`` (a transposed token-major view);
    into this thread's ``buffer`` role (see ``_WORKSPACE``) when given."""
    B, _, C = rows.shape
    Tc, t = index.shape
    flat = index.reshape(-1)
    out = None if buffer is None else _buffer(buffer, B * flat.numel() * C, rows)
    if out is None:
        g = rows.index_select(1, flat)
    else:
        g = torch.index_select(rows, 1, flat, out=out.view(B, flat.numel(), C))
    return g.view(B * Tc, t, heads, C // heads).transpose(1, 2)


def _tile_rows(x: Tensor, T: int, t: int, t0: int, t1: int) -> Tensor:
    """Tiles ``t0 .. t1`` of in-order queries ``x (B, H, T*t, D)`` as ``(B*Tc, H, t, D)``."""
    B, H, _, D = x.shape
    return x[:, :, t0 * t: t1 * t].transpose(1, 2).reshape(B * (t1 - t0), t, H, D).transpose(1, 2)


@dataclass(frozen=True, eq=False)
class _Group:
    """Tiles attended together: a contiguous range (``tiles`` a slice) or any set (an index tensor), with their query
    and key indices. ``mask``: "none" (every query sees every key of its region: SDPA's unmasked kernel) or "own"
    (the plan's per-tile mask)."""

    tiles: slice | Tensor
    mask: str
    q_index: Tensor
    k_index: Tensor

    @property
    def size(self) -> int:
        return self.q_index.shape[0]

    def part(self, a: int, b: int) -> slice | Tensor:
        if isinstance(self.tiles, slice):
            return slice(self.tiles.start + a, min(self.tiles.start + b, self.tiles.stop))
        return self.tiles[a:b]


@lru_cache(maxsize=_CACHE)
def _schedule(plan: TilePlan, contiguous: bool) -> tuple[tuple[_Group, ...], Tensor | None]:
    """The groups of tiles to attend, and the output slot of every query in the order they are processed (None when
    that is position order: the output is then a view).

    Tiles whose queries see their whole region (blocks and halos away from the border, Swin windows away from the
    shifted edges) form one group without a mask when they are at least a quarter of the tiles: SDPA then runs its
    unmasked kernel on them. ``contiguous``: keep the plan's order (strided key views, or a bias over all tiles).
    """
    T = plan.tiles
    whole = (_Group(slice(0, T), "none" if plan.keep is None else "own", plan.q_index, plan.k_index),)
    slots = None if _in_order(plan) else plan.inverse
    if plan.keep is None or contiguous:
        return whole, slots
    full = plan.keep.reshape(T, -1).all(1)
    n = int(full.sum())
    if n < T / 4 or n == T:
        return whole, slots
    order = torch.cat([full.nonzero().flatten(), (~full).nonzero().flatten()])
    groups = tuple(_Group(tiles, mask, plan.q_index[tiles], plan.k_index[tiles])
                   for tiles, mask in ((order[:n], "none"), (order[n:], "own")))
    rank = torch.empty(T, dtype=torch.long)
    rank[order] = torch.arange(T)
    tq = plan.tq
    return groups, rank[plan.inverse // tq] * tq + plan.inverse % tq


def _takes_tiles(fn: BiasFn) -> bool:
    """Whether a bias function takes ``(qt, tiles)`` (it can then be called on any group of tiles) or ``(qt)``."""
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return False
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params) >= 2


def _attend(qt: Tensor, kt: Tensor, vt: Tensor, plan: TilePlan, B: int, tiles: slice | Tensor,
            group: _Group | None, scale, key_padding_mask, bias, return_lse: bool = False):
    """Attention of the tiles ``tiles`` of ``plan`` (their q, k, v tiles given): one SDPA call. ``group``: their
    :class:`_Group` (None: the plan's per-tile mask)."""
    T, tq, tk = plan.tiles, plan.tq, plan.tk
    Tc = qt.shape[0] // B
    keep = None if plan.keep is None or (group is not None and group.mask == "none") else plan.keep[tiles]
    if key_padding_mask is None and bias is None:
        if keep is None or (group is not None and group.mask == "none"):
            mask = None
        else:
            mask = _additive_keep(plan, qt.dtype, str(qt.device))[tiles]
            if B > 1:
                mask = mask[None].expand(B, *mask.shape).reshape(B * Tc, 1, tq, tk)
        return attention_tiles(qt, kt, vt, mask, scale, return_lse)
    if key_padding_mask is not None:
        kpm = key_padding_mask.index_select(1, plan.k_index[tiles].reshape(-1)).view(B, Tc, 1, tk)
        keep = kpm if keep is None else keep[None] & kpm  # (B, Tc, tq | 1, tk)
    if keep is not None:
        keep = keep[None] if keep.dim() == 3 else keep
        rows = keep.shape[2]
        keep = keep.expand(B, Tc, rows, tk).reshape(B * Tc, 1, rows, tk)
    mask = keep
    if bias is not None:
        if callable(bias):
            b = bias(qt, tiles) if _takes_tiles(bias) else bias(qt)
        else:
            b = _fold_bias(bias, B, T, tiles)
        b = b.to(qt.dtype)
        mask = b if keep is None else b.masked_fill(~keep, float("-inf"))
    return attention_tiles(qt, kt, vt, mask, scale, return_lse)


def attention_tiles(qt: Tensor, kt: Tensor, vt: Tensor, mask: Tensor | None = None, scale: float | None = None,
                    return_lse: bool = False):
    """Exact attention within each of many small problems ``(T, H, t, D)`` (tiles in the batch dimension), ``mask``
    an ``attn_mask`` for them: the fused CPU kernel of :mod:`attnlab.ops.native` where it takes them (float32, tiles
    within ``native.MAX_TILE``), :func:`attnlab.ops.attention` (SDPA, or the chunked op for the lse) otherwise."""
    if native.supports(qt, kt, vt, mask):
        return native.tile_attention(qt, kt, vt, mask, scale, return_lse)
    return attention(qt, kt, vt, attn_mask=mask, scale=scale, return_lse=return_lse)


def tile_attention(qt: Tensor, kt: Tensor, vt: Tensor, plan: TilePlan, batch: int, *, scale: float | None = None,
                   key_padding_mask: Tensor | None = None, bias: Tensor | BiasFn | None = None,
                   return_lse: bool = False):
    """The attention step of :func:`tiled_attention` on tensors already in tile layout.

    ``qt (B*T, Hq, tq, D)``, ``kt, vt (B*T, Hkv, tk, D[v])`` (tile ``t`` of batch element ``b`` at ``b * T + t``), as
    produced by :func:`gather_tiles` -- or by projecting :func:`gather_rows` of the input, which moves the input once
    instead of q, k and v (window mechanisms do that). ``key_padding_mask (B, k_len)`` and ``bias`` as in
    :func:`tiled_attention`. Returns ``(B*T, Hq, tq, Dv)`` (and the log-sum-exp ``(B*T, Hq, tq)`` with
    ``return_lse``, computed by the chunked exact op since SDPA does not return it); one attention call.
    """
    plan = plan.to(qt.device)
    B, T, tq, tk = batch, plan.tiles, plan.tq, plan.tk
    if qt.shape[0] != B * T or qt.shape[-2] != tq or kt.shape[0] != B * T or kt.shape[-2] != tk:
        raise shape_error("tile_attention", f"q tiles (B*T, Hq, {tq}, D), k/v tiles (B*T, Hkv, {tk}, D) with "
                          f"B*T = {B * T}", f"q {tuple(qt.shape)}, k {tuple(kt.shape)}")
    if key_padding_mask is None:
        out = _tiles_by_regions(qt, kt, vt, plan, B, scale, bias, return_lse)
        if out is not None:
            return out
    return _attend(qt, kt, vt, plan, B, slice(0, T), None, scale, key_padding_mask, bias, return_lse)


def _tiles_by_regions(qt: Tensor, kt: Tensor, vt: Tensor, plan: TilePlan, B: int, scale, bias, return_lse: bool):
    """:func:`tile_attention` by the fused kernel for a plan with :func:`_regions`: the tiles' rows read in place in
    each class's slot order (outputs written back to their own slots). None where that does not apply: no regions,
    a bias that is not shared by the tiles, tiles the kernel does not take or whose rows are not evenly spaced."""
    by_regions = _by_regions(plan, bias, qt.dtype)
    if by_regions is None or not native.supports(qt, kt, vt, None):
        return None
    regions, mask, sel = by_regions
    T, tq = plan.tiles, plan.tq
    flat = []
    for t in (qt, kt, vt):  # (B*T, H, tq, D) -> (B, H, T*tq, D), a view when the tiles are token-major
        if T > 1 and t.stride(0) != tq * t.stride(2):
            return None
        flat.append(t.unflatten(0, (B, T)).transpose(1, 2).flatten(2, 3))
    res = native.indexed_attention(*flat, regions.slots, regions.slots, None, mask, None, scale, return_lse,
                                   regions.k_range, sel)
    o, lse = res if return_lse else (res, None)
    Hq, Dv = o.shape[1], o.shape[3]
    o = o.transpose(1, 2).reshape(B * T, tq, Hq, Dv).transpose(1, 2)  # (B*T, Hq, tq, Dv), token-major
    if not return_lse:
        return o
    return o, lse.unflatten(2, (T, tq)).transpose(1, 2).flatten(0, 1)


def gather_rows(x: Tensor, index: Tensor) -> Tensor:
    """``x (B, N, C)``, ``index (T, t)`` -> ``(B*T, t, C)``: token features in tile layout (one copy)."""
    B, _, C = x.shape
    T, t = index.shape
    flat = index.to(x.device).reshape(-1)
    g = x.index_select(1, flat) if x.is_contiguous() or x.numel() < _SMALL else x[:, flat]
    return g.view(B * T, t, C)


def scatter_rows(y: Tensor, plan: TilePlan, batch: int) -> Tensor:
    """Inverse of :func:`gather_rows` for a plan's queries: ``(B*T, tq, C)`` -> ``(B, q_len, C)``."""
    C = y.shape[-1]
    return y.reshape(batch, plan.tiles * plan.tq, C).index_select(1, plan.inverse.to(y.device))


@lru_cache(maxsize=_CACHE)
def _in_order(plan: TilePlan) -> bool:
    return plan.q_len == plan.tiles * plan.tq and bool(
        torch.equal(plan.q_index.reshape(-1), torch.arange(plan.q_len, device=plan.q_index.device)))


def _window_view(x: Tensor, pad_left: int, stride: int, T: int, tk: int) -> Tensor:
    """Key regions ``t * stride - pad_left + [0, tk)`` of ``x (B, H, N, D)`` as ``(B, T, H, tk, D)``: a strided view
    of the zero-padded keys (padding positions are masked by the plan)."""
    B, H, N, D = x.shape
    pad_right = max(0, (T - 1) * stride + tk - N - pad_left)
    xp = F.pad(x.transpose(1, 2), (0, 0, 0, 0, max(pad_left, 0), pad_right))
    if pad_left < 0:
        xp = xp[:, -pad_left:]
    return xp.unfold(1, tk, stride)[:, :T].permute(0, 1, 2, 4, 3)  # (B, T, H, tk, D)


def _window_slice(view: Tensor, t0: int, t1: int) -> Tensor:
    """Tiles ``t0 .. t1`` of a :func:`_window_view` as ``(B*Tc, H, tk, D)`` (a view when ``B == 1``)."""
    return view[:, t0:t1].flatten(0, 1)


def _fold_bias(bias: Tensor, B: int, T: int, tiles: slice | Tensor = slice(None)) -> Tensor:
    """A tensor bias for the tiles ``tiles``, as ``(B*Tc | 1, Hq, tq, tk)``."""
    whole = isinstance(tiles, slice) and tiles.indices(T) == (0, T, 1)
    if bias.dim() == 4:
        if bias.shape[0] == 1 or whole:
            return bias
        if bias.shape[0] != B * T:
            raise shape_error("tiled_attention bias", f"a 4-D bias with 1 or B*T = {B * T} rows", tuple(bias.shape))
        return bias.unflatten(0, (B, T))[:, tiles].flatten(0, 1)
    if bias.dim() != 5:
        raise shape_error("tiled_attention bias", "a 4-D (B*T, Hq, tq, tk) or 5-D (B, T, Hq, tq, tk) tensor",
                          tuple(bias.shape))
    b = bias.expand(B, T, *bias.shape[2:])[:, tiles]
    return b.reshape(-1, *bias.shape[2:])


# -------------------------------------------------------------------------------- window partition tools


def _pair(w) -> tuple[int, int]:
    return (w, w) if isinstance(w, int) else (int(w[0]), int(w[1]))


def window_partition(x: Tensor, window: int | tuple[int, int]) -> Tensor:
    """``x (B, H, W, C)`` -> ``(B, nh, nw, wh*ww, C)`` non-overlapping windows, zero-padded at the bottom/right."""
    wh, ww = _pair(window)
    H, W = x.shape[1:3]
    ph, pw = (-H) % wh, (-W) % ww
    if ph or pw:
        x = F.pad(x, (0, 0, 0, pw, 0, ph))
    return rearrange(x, "b (nh wh) (nw ww) c -> b nh nw (wh ww) c", wh=wh, ww=ww)


def window_reverse(windows: Tensor, window: int | tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """Inverse of :func:`window_partition`: ``(B, nh, nw, wh*ww, C)`` -> ``(B, H, W, C)``, padding cropped."""
    wh, ww = _pair(window)
    x = rearrange(windows, "b nh nw (wh ww) c -> b (nh wh) (nw ww) c", wh=wh, ww=ww)
    return x[:, : hw[0], : hw[1]]


def window_valid(hw: tuple[int, int], window: int | tuple[int, int], device=None) -> Tensor:
    """Bool ``(nh, nw, wh*ww)``: which window slots of :func:`window_partition` hold real (not padding) pixels."""
    ones = torch.ones(1, hw[0], hw[1], 1, dtype=torch.bool, device=device)
    return window_partition(ones, window)[0, ..., 0]


def window_mean(x: Tensor, window: int | tuple[int, int]) -> Tensor:
    """``x (B, H, W, C)`` -> ``(B, ceil(H/wh), ceil(W/ww), C)``: mean over the real pixels of each window.

    Padding is excluded from the mean (unlike average pooling over a zero-padded map), so border cells are plain
    averages of the pixels they cover.
    """
    H, W = x.shape[1:3]
    count = window_valid((H, W), window, x.device).sum(-1).to(x.dtype)  # (nh, nw)
    return window_partition(x, window).sum(-2) / count[..., None]


def window_expand(cells: Tensor, window: int | tuple[int, int], hw: tuple[int, int]) -> Tensor:
    """``cells (B, nh, nw, C)`` -> ``(B, H, W, C)``: every pixel takes the value of the window it lies in."""
    wh, ww = _pair(window)
    x = cells.repeat_interleave(wh, dim=1).repeat_interleave(ww, dim=2)
    return x[:, : hw[0], : hw[1]]


def windowed(fn: Callable[[Tensor], Tensor], x: Tensor, window: int | tuple[int, int]) -> Tensor:
    """Apply ``fn`` to every window of ``x (B, H, W, C)`` independently, as an image ``(B', C, wh, ww)``.

    Windows are zero-padded where the map does not divide, so a convolution ``fn`` sees zeros across window borders
    (CSWin's LePE is computed this way). Returns ``(B, H, W, C')``.
    """
    wh, ww = _pair(window)
    H, W = x.shape[1:3]
    w = window_partition(x, (wh, ww))
    B, nh, nw = w.shape[:3]
    img = rearrange(w, "b nh nw (wh ww) c -> (b nh nw) c wh ww", wh=wh, ww=ww)
    out = fn(img)
    out = rearrange(out, "(b nh nw) c wh ww -> b nh nw (wh ww) c", b=B, nh=nh, nw=nw)
    return window_reverse(out, (wh, ww), (H, W))
