"""Sparse attention, written once: score -> top-k -> gather K/V -> attend, at token, block, region and span level.

Every sparse, routing and retrieval mechanism in attnlab is the same three steps:

1. **score** coarse units (blocks of keys, 2-D regions, spans, clusters) against queries or query blocks, usually on
   pooled vectors (:func:`pool_blocks`);
2. **select** the units each query block keeps (:func:`topk_blocks`, plus fixed patterns: local, global, random);
3. **attend** from each query block over the union of its selected key blocks (:func:`block_sparse_attention`).

Step 3 never forms the ``Nq x Nk`` matrix: the selected key blocks are gathered into a ``(query block, t * k_block)``
panel and exact softmax attention runs over that panel through :func:`attnlab.ops.attention` (torch SDPA) or, when the
log-sum-exp is needed for merging, :func:`attnlab.ops.chunked_attention`. Memory is O(Nq * t * k_block), processed in
slices of query blocks so that the gathered panel stays under a fixed budget.

Region-level (2-D) selection is block-level selection after the map is permuted into region-major order
(:func:`region_order`); group-by-assignment (clusters, buckets, head shards) sorts tokens by their group
(:func:`sort_by_group`), attends blocks of the sorted order with a same-group mask, and scatters back
(:func:`unpermute`). Token-level selection (each query its own key blocks or spans) is group-by-assignment on
(query, block) pairs: :func:`pair_attention` buckets the pairs by key block, attends each bucket through the same
core and returns per-pair partials, which :func:`merge_pairs` (the shared online-softmax merge) combines -- or a
grouped softmax re-weights (landmark attention). Token-level masks inside a gathered panel (causal, sliding window,
per-query key ranges, same group, padding) are computed from per-token *coordinates*, so permuted orders stay exact.

Shapes (DESIGN.md): ``q (B, Hq, Nq, D)``, ``k (B, Hkv, Nk, D)``, ``v (B, Hkv, Nk, Dv)``, ``Hq % Hkv == 0``.
A selection ``idx (B, Hi, nqb, t)`` (``Hi`` in ``{1, Hkv, Hq}``) lists, for query block ``i``, the key blocks it
attends; ``-1`` marks an empty slot. Duplicated block ids must be removed first (:func:`dedup_blocks`): a block listed
twice would be attended twice.
"""

from __future__ import annotations

import math

import torch
from einops import rearrange
from torch import Tensor

from ..errors import shape_error
from .online import merge_partials
from .softmax import attention, check_inputs, reference_attention

__all__ = [
    "block_sparse_attention", "block_sparse_reference", "pair_attention", "merge_pairs", "union_select",
    "selection_mask", "pool_blocks", "block_counts", "topk_blocks", "dedup_blocks", "local_blocks", "region_order",
    "sort_by_group", "permute", "unpermute", "pad_to", "GATHER_BUDGET",
]

# Elements (B * Hq * query blocks * t * k_block * (D + Dv)) of gathered K/V held at once; the query blocks are
# processed in slices that stay under it, so peak memory does not grow with Nq * Nk.
GATHER_BUDGET = 1 << 24


# ------------------------------------------------------------------------------------------------ helpers


def pad_to(x: Tensor, multiple: int, dim: int, value: float | bool = 0) -> Tensor:
    """Pad ``x`` at the end of ``dim`` to a multiple of ``multiple``."""
    n = x.shape[dim]
    extra = (-n) % multiple
    if extra == 0:
        return x
    shape = list(x.shape)
    shape[dim] = extra
    return torch.cat([x, x.new_full(shape, value)], dim=dim)


def _meta(t: Tensor | None, default: Tensor, batch: int, heads: int, n: int, what: str) -> Tensor:
    """Expand per-token metadata ``(B|1, 1|heads, n)`` (or ``(n,)``) to ``(B, heads, n)`` (a view, no copy)."""
    if t is None:
        t = default
    if t.dim() == 1:
        t = t[None, None]
    if t.dim() != 3 or t.shape[-1] != n or t.shape[0] not in (1, batch) or t.shape[1] not in (1, heads):
        raise shape_error(what, f"(B|1, 1|{heads}, {n}) or ({n},)", tuple(t.shape))
    return t.expand(batch, heads, n)


def _heads_to(t: Tensor, heads: int, what: str) -> Tensor:
    """Map a tensor with head dim 1, ``heads // g`` or ``heads`` (dim 1) to ``heads`` (expand or repeat)."""
    h = t.shape[1]
    if h == heads:
        return t
    if h == 1:
        return t.expand(t.shape[0], heads, *t.shape[2:])
    if heads % h:
        raise shape_error(what, f"a head dimension of 1 or a divisor of {heads}", h)
    return t.repeat_interleave(heads // h, dim=1)


# ------------------------------------------------------------------------------------------- selection


def pool_blocks(x: Tensor, block: int, *, valid: Tensor | None = None, mode: str = "mean") -> Tensor:
    """Pool ``x (B, H, N, D)`` over consecutive blocks of ``block`` tokens -> ``(B, H, ceil(N / block), D)``.

    ``valid (B|1, 1|H, N)`` bool marks tokens that count (padding does not). Modes:
    ``"mean"`` (average of the valid tokens), ``"sqrt"`` (size-normalised: sum / sqrt(count), so that dot products
    with a pooled key scale like the block's log-sum-exp rather than its average), ``"sum"``, ``"max"`` and
    ``"last"`` (the last valid token of the block: a landmark/representative token). A block with no valid token
    pools to 0 (callers mask such blocks out of selection with :func:`block_counts`).
    """
    B, H, N, D = x.shape
    if valid is None and mode == "mean" and N % block == 0:  # whole blocks, all valid: one reduction kernel
        return x.reshape(B, H, N // block, block, D).mean(-2)
    vm = None if valid is None else _meta(valid, valid, B, H, N, "pool_blocks valid").to(x.dtype)
    xb = rearrange(pad_to(x if vm is None else x * vm[..., None], block, 2), "b h (n s) d -> b h n s d", s=block)
    if vm is None:
        vm = torch.ones(1, 1, N, dtype=x.dtype, device=x.device).expand(B, H, N)
    cnt_tok = rearrange(pad_to(vm, block, 2), "b h (n s) -> b h n s", s=block)
    count = cnt_tok.sum(-1, keepdim=True)
    if mode == "sum":
        return xb.sum(-2)
    if mode == "mean":
        return xb.sum(-2) / count.clamp(min=1)
    if mode == "sqrt":
        return xb.sum(-2) / count.clamp(min=1).sqrt()
    if mode == "max":
        filled = xb.masked_fill(cnt_tok[..., None] == 0, float("-inf")).amax(-2)
        return torch.where(count > 0, filled, torch.zeros_like(filled))
    if mode == "last":
        # index of the last valid token in each block (0 when the block is empty, then zeroed by the count)
        pos = torch.arange(block, device=x.device, dtype=x.dtype)
        last = torch.where(cnt_tok > 0, pos, torch.full_like(pos, -1)).argmax(-1)
        picked = xb.gather(-2, last[..., None, None].expand(*last.shape, 1, D)).squeeze(-2)
        return picked * (count > 0)
    raise shape_error("pool_blocks mode", "'mean', 'sqrt', 'sum', 'max' or 'last'", repr(mode))


def block_counts(valid: Tensor | None, n: int, block: int, device=None) -> Tensor:
    """Number of valid tokens per block, ``(B|1, H|1, ceil(n / block))`` long (all full when ``valid`` is None)."""
    if valid is None:
        valid = torch.ones(1, 1, n, dtype=torch.bool, device=device)
    if valid.dim() == 1:
        valid = valid[None, None]
    return rearrange(pad_to(valid.long(), block, -1), "... (n s) -> ... n s", s=block).sum(-1)


def topk_blocks(scores: Tensor, k: int, *, allowed: Tensor | None = None, sort: bool = True) -> Tensor:
    """Indices of the ``k`` highest ``scores (..., nq, nb)`` per row, ``(..., nq, min(k, nb))`` long.

    ``allowed`` (bool, broadcastable) excludes entries; a row with fewer than ``k`` allowed entries gets ``-1`` in
    the remaining slots. Ties are broken toward the lower index (deterministic). No gradient flows through the
    choice (it is discrete); gradients reach the scores only where a mechanism multiplies by them.
    """
    nb = scores.shape[-1]
    k = min(int(k), nb)
    s = scores.detach()
    if allowed is not None:
        s = s.masked_fill(~allowed, float("-inf"))
    # A stable descending sort breaks ties (pooled padding, identical blocks) toward the lower index, always.
    val, idx = torch.sort(s, dim=-1, descending=True, stable=True)
    val, idx = val[..., :k], idx[..., :k]
    idx = torch.where(torch.isneginf(val), torch.full_like(idx, -1), idx)
    if sort:
        idx = torch.sort(torch.where(idx < 0, torch.full_like(idx, nb), idx), dim=-1).values
        idx = torch.where(idx == nb, torch.full_like(idx, -1), idx)
    return idx


def dedup_blocks(idx: Tensor) -> Tensor:
    """Each row of ``idx (..., t)`` sorted, repeated block ids dropped and ``-1`` slots moved to the end
    (so each block is attended once and the first ``count`` slots hold the distinct blocks)."""
    big = torch.iinfo(idx.dtype).max
    s = torch.sort(torch.where(idx < 0, torch.full_like(idx, big), idx), dim=-1).values
    dup = torch.zeros_like(s, dtype=torch.bool)
    dup[..., 1:] = s[..., 1:] == s[..., :-1]
    s = torch.sort(torch.where(dup, torch.full_like(s, big), s), dim=-1).values
    return torch.where(s == big, torch.full_like(s, -1), s)


def local_blocks(nqb: int, nkb: int, before: int, after: int, *, device=None, offset: int = 0) -> Tensor:
    """``(nqb, before + 1 + after)`` key-block ids ``i + offset - before .. i + offset + after``; out of range: -1."""
    i = torch.arange(nqb, device=device)[:, None] + offset
    idx = i + torch.arange(-before, after + 1, device=device)
    return torch.where((idx >= 0) & (idx < nkb), idx, torch.full_like(idx, -1))


def selection_mask(idx: Tensor, q_block: int, k_block: int, nq: int, nk: int) -> Tensor:
    """Dense bool ``(B, Hi, nq, nk)``: True where query ``i``'s block lists the block of key ``j`` (for references)."""
    B, Hi, nqb, t = idx.shape
    nkb = math.ceil(nk / k_block)
    hit = torch.zeros(B, Hi, nqb, nkb + 1, dtype=torch.bool, device=idx.device)
    hit.scatter_(-1, torch.where(idx < 0, torch.full_like(idx, nkb), idx), True)
    hit = hit[..., :nkb]
    dense = hit.repeat_interleave(q_block, dim=2).repeat_interleave(k_block, dim=3)
    return dense[:, :, :nq, :nk]


# ------------------------------------------------------------------------------------------- orderings


def region_order(hw: tuple[int, int], n_win: int | tuple[int, int], device=None) -> tuple[Tensor, int, tuple]:
    """Raster tokens of an ``H x W`` map -> region-major order over ``n_win x n_win`` regions (BiFormer's partition).

    Regions are ``rh = ceil(H / n_win)`` by ``rw = ceil(W / n_win)`` tokens; the map is padded at the bottom/right to
    whole regions (and the region count reduced so that no region is only padding). Returns
    ``(perm, r, (nh, nw, rh, rw))`` with ``r = rh * rw``, where ``perm (nh * nw * r,)`` holds, for each slot of the
    region-major sequence, the raster index of its token, or ``-1`` for a padding slot. Region ``g`` occupies slots
    ``g * r .. (g + 1) * r - 1``, so regions are blocks of size ``r`` for :func:`block_sparse_attention`.
    """
    H, W = hw
    nh, nw = (n_win, n_win) if isinstance(n_win, int) else n_win
    nh, nw = max(1, min(nh, H)), max(1, min(nw, W))
    rh, rw = math.ceil(H / nh), math.ceil(W / nw)
    nh, nw = math.ceil(H / rh), math.ceil(W / rw)  # no region made only of padding
    ys = torch.arange(nh * rh, device=device)[:, None]
    xs = torch.arange(nw * rw, device=device)[None, :]
    raster = torch.where((ys < H) & (xs < W), ys * W + xs, torch.full_like(ys * xs, -1))
    perm = rearrange(raster, "(nh rh) (nw rw) -> (nh nw rh rw)", rh=rh, rw=rw)
    return perm, rh * rw, (nh, nw, rh, rw)


def sort_by_group(group: Tensor, pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Order tokens by ``(group, position)``: ``group (B, H, N)`` long -> ``(perm, inv)`` both ``(B, H, N)``.

    ``perm[..., s]`` is the token in sorted slot ``s``; ``inv[..., n]`` is the slot of token ``n``. The sort is stable,
    so within a group tokens keep their order (causal masks by position stay meaningful in sorted order).
    """
    N = group.shape[-1]
    if pos is None:
        pos = torch.arange(N, device=group.device)
    key = group * N + pos
    perm = torch.argsort(key, dim=-1, stable=True)
    inv = torch.empty_like(perm)
    inv.scatter_(-1, perm, torch.arange(N, device=group.device).expand_as(perm))
    return perm, inv


def permute(x: Tensor, perm: Tensor) -> Tensor:
    """``x (B, Hx, N, D)`` gathered along N by ``perm (B|1, H|1, M)`` or ``(M,)`` (-1 slots -> zeros).

    ``Hx`` must be 1, ``H`` or divide ``H`` (query heads sharing a KV head). Returns ``(B, max(Hx, H), M, D)``.
    """
    if perm.dim() == 1 or (perm.shape[0] == 1 and perm.shape[1] == 1):  # one order for every sequence and head
        p = perm.reshape(-1)
        out = x.index_select(2, p.clamp(min=0))
        return out * (p >= 0)[:, None].to(out.dtype) if bool((p < 0).any()) else out
    B = max(x.shape[0], perm.shape[0])
    H = max(x.shape[1], perm.shape[1])
    x = _heads_to(x.expand(B, *x.shape[1:]), H, "permute x")
    p = _heads_to(perm.expand(B, *perm.shape[1:]), H, "permute perm")
    out = x.gather(2, p.clamp(min=0)[..., None].expand(*p.shape, x.shape[-1]))
    return out * (p >= 0)[..., None].to(out.dtype) if bool((p < 0).any()) else out


def unpermute(y: Tensor, perm: Tensor, n: int) -> Tensor:
    """Inverse of :func:`permute` for a permutation of ``n`` tokens plus ``-1`` padding slots:
    ``y (B, H, M, D)`` in slot order -> ``(B, H, n, D)`` in token order (padding slots are dropped)."""
    B, H, M, D = y.shape
    if perm.dim() == 1 or (perm.shape[0] == 1 and perm.shape[1] == 1):
        p = perm.reshape(-1)
        slot = torch.empty(n, dtype=torch.long, device=p.device)
        keep = p >= 0
        slot[p[keep]] = torch.arange(M, device=p.device)[keep]
        return y.index_select(2, slot)
    p = perm.expand(B, H, M)
    idx = torch.where(p >= 0, p, torch.full_like(p, n))
    out = y.new_zeros(B, H, n + 1, D)
    out = out.scatter(2, idx[..., None].expand(B, H, M, D), y)
    return out[:, :, :n]


# ----------------------------------------------------------------------------------------- the core op


def _blocked_rows(x: Tensor, block: int, fill=0) -> Tensor:
    """``x (B, H, N, ...)`` -> ``(B * H * ceil(N / block), block * prod(...))``: one row per block, for index_select."""
    xb = pad_to(x, block, 2, fill)
    return xb.reshape(xb.shape[0] * xb.shape[1] * (xb.shape[2] // block), -1)


def union_select(sel: Tensor, q_block: int, values: Tensor | None = None):
    """Token-level selections -> block-level ones: per query block, the union of the key blocks its queries chose.

    ``sel (B, H, Nq, k)`` lists, per query, its key blocks (``-1`` = none; no repeats within a row). Returns
    ``idx (B, H, nqb, t)`` (the union per query block, ``t`` = the largest union size) and ``q_keep (B, H, Nq, t)``
    (which of those blocks each query chose), for :func:`block_sparse_attention`; with ``values (B, H, Nq, k)``
    also those values moved to the union slots ``(B, H, Nq, t)`` (0 where not chosen), e.g. per-query block biases.
    Queries of one block share one gathered panel, so a token-level selection costs one panel per query *block*.
    """
    B, H, Nq, k = sel.shape
    u = dedup_blocks(rearrange(pad_to(sel, q_block, 2, -1), "b h (n s) k -> b h n (s k)", s=q_block))
    t = max(1, int((u >= 0).sum(-1).max())) if u.numel() else 1
    idx = u[..., :t]
    rows = idx.repeat_interleave(q_block, dim=2)[:, :, :Nq]  # each query's block list
    hit = (rows[..., :, None] == sel[..., None, :]) & (rows >= 0)[..., None]  # (B, H, Nq, t, k)
    q_keep = hit.any(-1)
    if values is None:
        return idx, q_keep
    return idx, q_keep, (hit.to(values.dtype) * values[..., None, :]).sum(-1)


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    *,
    q_block: int,
    k_block: int,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    k_valid: Tensor | None = None,
    q_pos: Tensor | None = None,
    k_pos: Tensor | None = None,
    q_group: Tensor | None = None,
    k_group: Tensor | None = None,
    window: tuple[int | None, int | None] | None = None,
    key_lo: Tensor | None = None,
    block_bias: Tensor | None = None,
    q_keep: Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    budget: int | None = None,
):
    """Exact softmax attention of each query block over the union of its selected key blocks.

    Args:
        q, k, v: ``(B, Hq, Nq, D)``, ``(B, Hkv, Nk, D)``, ``(B, Hkv, Nk, Dv)``.
        idx: ``(B|1, Hi, ceil(Nq / q_block), t)`` long key-block ids per query block, ``-1`` = empty slot;
            ``Hi`` is 1 (shared by all heads), ``Hkv`` or ``Hq``. Entries must be unique per row (:func:`dedup_blocks`).
        q_block, k_block: block sizes (the last block of each may be partial; it is padded and masked).
        causal: keep key ``j`` for query ``i`` only when ``k_pos[j] <= q_pos[i]``.
        key_padding_mask: ``(B, Nk)`` bool, True = keep; ``k_valid (B|1, 1|Hkv, Nk)`` is the same per head.
        q_pos, k_pos: token coordinates ``(B|1, 1|Hq, Nq)`` / ``(B|1, 1|Hkv, Nk)`` used by ``causal`` and ``window``;
            default bottom-right aligned positions ``arange(Nq) + Nk - Nq`` and ``arange(Nk)``. Pass them when q/k are
            in a permuted order (regions, clusters) so masks follow the original positions.
        q_group, k_group: optional group ids of the same layouts (``k_group`` may also be per query head,
            ``(B|1, Hq, Nk)``); a key is kept only if its group equals the query's.
        window: ``(left, right)``: keep keys with ``q_pos - left <= k_pos <= q_pos + right`` (``None`` = unbounded).
        key_lo: ``(B|1, 1|Hq, Nq)`` per-query lower bound: keep keys with ``k_pos >= key_lo[i]`` (spans whose start
            varies by query, e.g. the raw part of core-token attention).
        block_bias: ``(B|1, Hi, nqb, t)`` float added to the logits of every key of that selected block (soft
            routing weights), or ``(B|1, Hi, Nq, t)`` per query (landmark gates); differentiable.
        q_keep: ``(B|1, Hi, Nq, t)`` bool: query ``i`` keeps slot ``s`` of its block's list only where True
            (token-level selection, see :func:`union_select`).
        scale: logit scale, default ``D ** -0.5``.
        return_lse: also return the log-sum-exp ``(B, Hq, Nq)`` (for :func:`attnlab.ops.merge_partials`).
        budget: cap on gathered K/V elements held at once (default :data:`GATHER_BUDGET`).

    Returns ``out (B, Hq, Nq, Dv)`` (and ``lse``). A query that keeps no key returns 0 (lse ``-inf``). Gradients flow
    to q, k, v (and ``block_bias``) for the selection given; the selection itself is discrete.
    """
    s = check_inputs(q, k, v, key_padding_mask, None, scale)
    B, Hq, Hkv, Nq, Nk, D, Dv = s.batch, s.q_heads, s.kv_heads, s.q_len, s.kv_len, s.head_dim, s.v_dim
    if q_block < 1 or k_block < 1:
        raise shape_error("q_block, k_block", "positive block sizes", (q_block, k_block))
    nqb, nkb = math.ceil(Nq / q_block), math.ceil(Nk / k_block)
    if idx.dim() != 4 or idx.shape[0] not in (1, B) or idx.shape[2] != nqb or idx.dtype not in (torch.long, torch.int):
        raise shape_error("idx", f"a long tensor (B|1, Hi, nqb={nqb}, t)", f"{idx.dtype} of shape {tuple(idx.shape)}")
    if idx.numel() and int(idx.max()) >= nkb:
        raise shape_error("idx", f"key-block ids < {nkb} (or -1)", int(idx.max()))
    scale = D ** -0.5 if scale is None else float(scale)
    dev = q.device
    t = idx.shape[-1]
    idx = _heads_to(idx.expand(B, *idx.shape[1:]), Hq, "idx")
    empty_slot = idx < 0
    idx_c = idx.clamp(min=0)

    # ---- K/V and per-token metadata as one row per key block; a (q head, key block) pair maps to the row of its
    # KV head (GQA without copying K/V). index_select on rows is far cheaper than advanced indexing on CPU.
    G = Hq // Hkv
    k_rows, v_rows = _blocked_rows(k, k_block), _blocked_rows(v, k_block)
    base = (torch.arange(B, device=dev)[:, None] * Hkv + torch.arange(Hq, device=dev)[None, :] // G) * nkb
    flat = (base[:, :, None, None] + idx_c).reshape(B, Hq, nqb * t)  # row id of every selected block
    base_q = (torch.arange(B, device=dev)[:, None] * Hq + torch.arange(Hq, device=dev)[None, :]) * nkb
    flat_q = (base_q[:, :, None, None] + idx_c).reshape(B, Hq, nqb * t)  # rows of tables kept per query head
    group_rows = None
    valid = torch.ones(1, 1, Nk, dtype=torch.bool, device=dev)
    if key_padding_mask is not None:
        valid = valid & key_padding_mask[:, None, :]
    if k_valid is not None:
        valid = valid & _meta(k_valid, None, B, Hkv, Nk, "k_valid")
    need_valid = Nk % k_block != 0 or key_padding_mask is not None or k_valid is not None or bool(empty_slot.any())
    kmeta = {"valid": _blocked_rows(valid.expand(B, Hkv, Nk), k_block, False)}
    qmeta = {}
    use_pos = causal or window is not None or key_lo is not None
    if use_pos:
        if key_lo is not None:
            lo = pad_to(_meta(key_lo, None, B, Hq, Nq, "key_lo"), q_block, 2)
            qmeta["lo"] = rearrange(lo, "b h (n s) -> b h n s", s=q_block)
        qp = _meta(q_pos, torch.arange(Nq, device=dev) + (Nk - Nq), B, Hq, Nq, "q_pos")
        kp = _meta(k_pos, torch.arange(Nk, device=dev), B, Hkv, Nk, "k_pos")
        qmeta["pos"] = rearrange(pad_to(qp, q_block, 2), "b h (n s) -> b h n s", s=q_block)
        kmeta["pos"] = _blocked_rows(kp, k_block)
    if q_group is not None or k_group is not None:
        if q_group is None or k_group is None:
            raise shape_error("q_group, k_group", "both or neither", "only one")
        qmeta["group"] = rearrange(pad_to(_meta(q_group, None, B, Hq, Nq, "q_group"), q_block, 2, -1),
                                   "b h (n s) -> b h n s", s=q_block)
        # key groups may differ per query head even when K/V heads are shared (e.g. shifted heads under GQA)
        per_q = k_group.dim() == 3 and k_group.shape[1] == Hq and Hq != Hkv
        kg = _meta(k_group, None, B, Hq if per_q else Hkv, Nk, "k_group")
        kmeta["group"] = _blocked_rows(kg, k_block, -2)
        group_rows = flat_q if per_q else None
    bias = None
    if block_bias is not None:
        bias = _heads_to(block_bias.expand(B, *block_bias.shape[1:]), Hq, "block_bias")
        if bias.shape[2:] not in ((nqb, t), (Nq, t)):
            raise shape_error("block_bias", f"(B|1, Hi, {nqb} or {Nq}, {t})", tuple(block_bias.shape))
        if bias.shape[2] == Nq and not (Nq == nqb and q_block == 1):  # per query: (B, Hq, nqb, bq, t)
            bias = rearrange(pad_to(bias, q_block, 2), "b h (n s) t -> b h n s t", s=q_block)
        else:
            bias = bias[:, :, :, None, :]
    qk = None
    if q_keep is not None:
        qk = _heads_to(q_keep.expand(B, *q_keep.shape[1:]), Hq, "q_keep")
        if qk.shape[2:] != (Nq, t):
            raise shape_error("q_keep", f"(B|1, Hi, {Nq}, {t})", tuple(q_keep.shape))
        qk = rearrange(pad_to(qk, q_block, 2, False), "b h (n s) t -> b h n s t", s=q_block)
    qb = rearrange(pad_to(q, q_block, 2), "b h (n s) d -> b h n s d", s=q_block)
    fdt = torch.float64 if q.dtype == torch.float64 else torch.float32

    budget = GATHER_BUDGET if budget is None else budget
    per_block = B * Hq * t * k_block * (D + Dv)
    step = max(1, min(nqb, budget // max(per_block, 1)))
    outs, lses = [], []
    for c0 in range(0, nqb, step):
        c1 = min(nqb, c0 + step)
        sl = slice(c0, c1)
        n = c1 - c0
        rows = flat[:, :, c0 * t: c1 * t].reshape(-1)
        M = B * Hq * n

        def pick(table: Tensor, by=None) -> Tensor:  # selected blocks' metadata as (B, Hq, n, 1, t * bk)
            r = rows if by is None else by[:, :, c0 * t: c1 * t].reshape(-1)
            return table.index_select(0, r).reshape(B, Hq, n, 1, t * k_block)

        ks = k_rows.index_select(0, rows).reshape(M, 1, t * k_block, D)
        vs = v_rows.index_select(0, rows).reshape(M, 1, t * k_block, Dv)
        keep = None
        if need_valid:
            ok = kmeta["valid"].index_select(0, rows).reshape(B, Hq, n, t, k_block) & ~empty_slot[:, :, sl, :, None]
            keep = ok.reshape(B, Hq, n, 1, t * k_block)
        if use_pos:
            kpos = pick(kmeta["pos"])
            qpos = qmeta["pos"][:, :, sl, :, None]
            part = None
            if causal:
                part = kpos <= qpos
            if window is not None:
                left, right = window
                if left is not None:
                    w = kpos >= qpos - left
                    part = w if part is None else part & w
                if right is not None:
                    w = kpos <= qpos + right
                    part = w if part is None else part & w
            if key_lo is not None:
                w = kpos >= qmeta["lo"][:, :, sl, :, None]
                part = w if part is None else part & w
            if part is not None:
                keep = part if keep is None else keep & part
        if "group" in qmeta:
            kg = pick(kmeta["group"], group_rows)
            part = kg == qmeta["group"][:, :, sl, :, None]
            keep = part if keep is None else keep & part
        if qk is not None:
            part = qk[:, :, sl, :, :, None].expand(B, Hq, n, q_block, t, k_block)
            part = part.reshape(B, Hq, n, q_block, t * k_block)
            keep = part if keep is None else keep & part
        # One additive float mask (0 / -inf, plus any block bias); SDPA would expand a bool mask to full size first.
        mask = None
        if bias is not None:
            rb = bias.shape[3]
            mask = bias[:, :, sl, :, :, None].expand(B, Hq, n, rb, t, k_block).reshape(B, Hq, n, rb, t * k_block)
            mask = mask.to(fdt)
        if keep is not None:
            base_mask = torch.zeros((), dtype=fdt, device=dev) if mask is None else mask
            mask = torch.where(keep, base_mask, torch.full((), float("-inf"), dtype=fdt, device=dev))
        if mask is not None:
            r = mask.shape[3]  # 1 when only key-side masks apply: SDPA broadcasts it over the block's queries
            mask = mask.expand(B, Hq, n, r, t * k_block).reshape(M, 1, r, t * k_block)
        res = attention(qb[:, :, sl].reshape(M, 1, q_block, D), ks, vs, attn_mask=mask, scale=scale,
                        return_lse=return_lse)
        if return_lse:
            o, l = res
            lses.append(l.reshape(B, Hq, n * q_block))
        else:
            o = res
        outs.append(o.reshape(B, Hq, n * q_block, Dv))
    # (one slice, the common case: no copy)
    out = (outs[0] if len(outs) == 1 else torch.cat(outs, dim=2))[:, :, :Nq]
    if return_lse:
        return out, (lses[0] if len(lses) == 1 else torch.cat(lses, dim=2))[:, :, :Nq]
    return out


def block_sparse_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    idx: Tensor,
    *,
    q_block: int,
    k_block: int,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
):
    """Dense reference of :func:`block_sparse_attention` (default positions, no groups/window/bias):
    :func:`attnlab.ops.reference_attention` with the selection as an explicit ``(Nq, Nk)`` mask."""
    Hq, Nq, Nk = q.shape[1], q.shape[2], k.shape[2]
    keep = _heads_to(selection_mask(idx, q_block, k_block, Nq, Nk), Hq, "idx")
    return reference_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=keep,
                               scale=scale, return_lse=return_lse)


# ------------------------------------------------------------------------- token-level selection, pair-major


def pair_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    sel: Tensor,
    *,
    k_block: int,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    q_pos: Tensor | None = None,
    scale: float | None = None,
    chunk: int = 2048,
    pair_block: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Attention of every (query, selected key block) pair, for per-query selections: ``(out, lse)`` per pair.

    ``sel (B, Hq, Nq, t)`` lists each query's key blocks (``-1`` = empty slot). Returns ``out (B, Hq, Nq, t, Dv)``
    and ``lse (B, Hq, Nq, t)``: softmax attention of query ``i`` over block ``sel[i, s]`` alone (``-inf`` for
    empty slots or blocks with no visible key). :func:`merge_pairs` combines them exactly into attention over the
    union; a grouped softmax (landmark attention) combines them with its own block weights instead.

    When every query picks its own blocks, gathering ``t`` blocks per query moves ``t * k_block`` keys per query.
    This path is group-by-assignment on the pairs instead: pairs are bucketed by key block (each block's pairs
    padded to a multiple of ``pair_block``), every bucket attends its one block through
    :func:`block_sparse_attention` (one gathered panel per ``pair_block`` pairs, ~optimal FLOPs), and results
    are scattered back to (query, slot) order. Queries are processed ``chunk`` at a time, so memory is
    O(chunk * t * D). Causal masks use ``q_pos`` (default bottom-right positions).
    """
    B, Hq, Nq, D = q.shape
    Nk, Dv = k.shape[2], v.shape[-1]
    t = sel.shape[-1]
    dev = q.device
    nkb = math.ceil(Nk / k_block)
    if sel.shape[:3] != (B, Hq, Nq):
        raise shape_error("sel", f"(B, Hq, Nq, t) = ({B}, {Hq}, {Nq}, t)", tuple(sel.shape))
    pos_all = torch.arange(Nq, device=dev) + (Nk - Nq) if q_pos is None else q_pos.reshape(-1)
    outs, lses = [], []
    for c0 in range(0, Nq, chunk):
        c1 = min(Nq, c0 + chunk)
        n = c1 - c0
        s = sel[:, :, c0:c1].reshape(B, Hq, n * t)
        P = pair_block or int(min(64, max(8, 2 ** math.floor(math.log2(max(1, n * t / nkb))))))
        blk = torch.where(s < 0, torch.full_like(s, nkb), s)  # empty slots go to a bucket of their own
        counts = torch.zeros(B, Hq, nkb + 1, dtype=torch.long, device=dev).scatter_add_(-1, blk, torch.ones_like(blk))
        padded = (counts + P - 1) // P * P
        padded[..., nkb] = 0  # empty pairs are not attended
        start = torch.cumsum(padded, -1) - padded
        order = torch.argsort(blk, dim=-1, stable=True)
        sorted_blk = blk.gather(-1, order)
        first = torch.cumsum(counts, -1) - counts  # first sorted index of each bucket
        rank = torch.arange(n * t, device=dev) - first.gather(-1, sorted_blk)
        slot_sorted = start.gather(-1, sorted_blk) + rank  # slot of each sorted pair
        slot = torch.empty_like(slot_sorted).scatter_(-1, order, slot_sorted)  # slot of each pair, (query, slot) order
        total = int(padded.sum(-1).max())
        total = max(P, (total + P - 1) // P * P)
        real = s >= 0
        slot = torch.where(real, slot, torch.full_like(slot, total))  # empty pairs -> a discarded extra slot
        qi = torch.arange(c0, c1, device=dev).repeat_interleave(t)  # query of each pair
        src = torch.full((B, Hq, total + 1), -1, dtype=torch.long, device=dev).scatter_(-1, slot, qi.expand(B, Hq, -1))
        src = src[..., :total]
        qs = permute(q, src)  # (B, Hq, total, D), zeros at padding slots
        qpos = torch.where(src >= 0, pos_all[src.clamp(min=0)], torch.zeros_like(src))
        # block of every pseudo-query block: the bucket whose padded range contains it
        ends = torch.cumsum(padded[..., :nkb], -1)
        pb = torch.arange(0, total, P, device=dev)
        idx = torch.searchsorted(ends.contiguous(), pb.expand(B, Hq, -1).contiguous(), right=True)
        idx = torch.where(idx >= nkb, torch.full_like(idx, -1), idx)[..., None]  # (B, Hq, total / P, 1)
        o, l = block_sparse_attention(qs, k, v, idx, q_block=P, k_block=k_block, causal=causal,
                                      key_padding_mask=key_padding_mask, q_pos=qpos, scale=scale, return_lse=True)
        keep = real.reshape(B, Hq, n, t)
        g = slot.clamp(max=total - 1)
        o = o.gather(2, g[..., None].expand(B, Hq, n * t, Dv)).reshape(B, Hq, n, t, Dv) * keep[..., None]
        l = l.gather(2, g).reshape(B, Hq, n, t).masked_fill(~keep, float("-inf"))
        outs.append(o)
        lses.append(l)
    return torch.cat(outs, 2), torch.cat(lses, 2)


def merge_pairs(out: Tensor, lse: Tensor) -> tuple[Tensor, Tensor]:
    """Exact softmax over the union of disjoint key sets from per-slot partials ``out (..., t, Dv)``,
    ``lse (..., t)`` (e.g. from :func:`pair_attention`), via the shared online-softmax merge."""
    parts = [(out[..., s, :], lse[..., s]) for s in range(out.shape[-2])]
    return merge_partials(parts)
