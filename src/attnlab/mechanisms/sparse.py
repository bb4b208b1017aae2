"""Sparse and routing attention: fixed patterns, region/cluster routing, estimated masks, block retrieval.

Every mechanism here is score -> select -> gather -> attend through :mod:`attnlab.ops.sparse` (one core, no per-file
copies). Each has two paths selected by ``impl``:

* ``impl="fast"`` (default): the selection is gathered into small dense panels and attended with the exact attention
  op (SDPA) -- the ``Nq x Nk`` matrix is never formed;
* ``impl="reference"``: the paper's equations written plainly -- the same selection expressed as a dense
  ``(N, N)`` mask in the original token order, fed to :func:`attnlab.ops.reference_attention`.

The two agree on outputs and gradients (tests/mechanisms/test_sparse.py). Discrete choices (top-k, cluster
assignment) carry no gradient, as in the papers; gradients flow through the attention over what was selected.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import shape_error
from ..ops import attention, merge_partials, reference_attention
from ..ops.sparse import (block_sparse_attention, dedup_blocks, local_blocks, pad_to, permute, pool_blocks,
                          merge_pairs, pair_attention, region_order, sort_by_group, topk_blocks, union_select,
                          unpermute)
from ..registry import Caps, dense_flops, register
from .dense import MultiHeadAttention

_IMPLS = ("fast", "reference")


class SparseMechanism(MultiHeadAttention):
    """Shared plumbing: q/k/v/o projections (from :class:`MultiHeadAttention`, optional RoPE/GQA) and the
    ``impl`` switch. Subclasses implement :meth:`fast` and :meth:`reference` on projected heads."""

    def __init__(self, dim: int, heads: int = 8, *, impl: str = "fast", **kwargs) -> None:
        if impl not in _IMPLS:
            raise shape_error("impl", f"one of {_IMPLS}", repr(impl))
        super().__init__(dim, heads, **kwargs)
        self.impl = impl

    def heads_out(self, q: Tensor, k: Tensor, v: Tensor, **kw) -> Tensor:
        return (self.fast if self.impl == "fast" else self.reference)(q, k, v, **kw)

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        q, k, v = self.project(x, hw=hw)
        return self.output(self.heads_out(q, k, v, causal=causal, key_padding_mask=key_padding_mask, hw=hw))

    def fast(self, q, k, v, *, causal, key_padding_mask, hw) -> Tensor:
        raise NotImplementedError

    def reference(self, q, k, v, *, causal, key_padding_mask, hw) -> Tensor:
        raise NotImplementedError


def _check_pos_int(name: str, value, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise shape_error(name, "a positive integer" + (" or None" if allow_none else ""), repr(value))


# ============================================================================================ BiFormer (#41)


@register(
    "biformer", family="sparse", seed=True, catalog=41,
    paper="BiFormer: Vision Transformer with Bi-Level Routing Attention", arxiv="2303.08810",
    complexity="O((HW)^{4/3} d) with S ~ (HW)^{1/3} regions per side",
    caps=Caps(causal=False, bidirectional=True, dims=(2,), decode=False, padding=False),
    flops=lambda batch, n, heads, head_dim, causal=False, n_win=7, topk=4, **_: (
        4.0 * batch * heads * n * min(topk, n_win * n_win) * math.ceil(n / (n_win * n_win)) * head_dim
        + 2.0 * batch * (n_win * n_win) ** 2 * heads * head_dim),
    exact_when=dict(topk="all", side_dwconv=0),
    test_kwargs=dict(dim=32, heads=4, n_win=2, topk=2),
    bench_kwargs=dict(n_win=8, topk=4),
    summary="Bi-level routing: region-mean affinity keeps the top-k key regions per query region, then "
            "token-to-token attention over the gathered regions (+ LePE depthwise conv on V).",
)
class BiLevelRoutingAttention(SparseMechanism):
    """Bi-Level Routing Attention (Zhu et al., CVPR 2023) on a 2-D token map.

    Args:
        dim, heads: width and heads (``head_dim = dim // heads``).
        n_win: regions per side ``S`` (the map is split into ``S x S`` regions, padded when it does not divide).
        topk: key regions kept per query region, or ``"all"`` (= dense attention).
        side_dwconv: kernel of the LePE depthwise convolution on V added to the output (0 = none).
        qk_scale: logit scale; default ``head_dim ** -0.5`` (the official code uses ``dim ** -0.5``).
        bias: bias in the q/k/v/o projections (True in the official code).
        impl: ``"fast"`` (gathered regions) or ``"reference"`` (dense mask).
    """

    def __init__(self, dim: int, heads: int = 8, *, n_win: int = 7, topk: int | str = 4, side_dwconv: int = 5,
                 qk_scale: float | None = None, bias: bool = True, impl: str = "fast", **kwargs) -> None:
        super().__init__(dim, heads, impl=impl, bias=bias, **kwargs)
        _check_pos_int("n_win", n_win)
        if topk != "all":
            _check_pos_int("topk", topk)
        if not isinstance(side_dwconv, int) or side_dwconv < 0 or (side_dwconv and side_dwconv % 2 == 0):
            raise shape_error("side_dwconv", "0 or an odd kernel size", repr(side_dwconv))
        if self.kv_heads != self.heads:
            raise shape_error("kv_heads", f"equal to heads ({heads}) for biformer (LePE acts on all value heads)",
                              self.kv_heads)
        self.n_win, self.topk, self.qk_scale = n_win, topk, qk_scale
        c = heads * self.head_dim
        self.lepe = nn.Conv2d(c, c, side_dwconv, padding=side_dwconv // 2, groups=c) if side_dwconv else None

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        q, k, v = self.project(x, hw=hw)
        o = self.heads_out(q, k, v, causal=causal, key_padding_mask=key_padding_mask, hw=hw)
        if self.lepe is not None:  # locally-enhanced positional encoding: depthwise conv of V on the map
            vmap = rearrange(v, "b h (y x) d -> b (h d) y x", y=hw[0])
            o = o + rearrange(self.lepe(vmap), "b (h d) y x -> b h (y x) d", h=self.heads)
        return self.output(o)

    def _k(self, regions: int) -> int:
        return regions if self.topk == "all" else min(self.topk, regions)

    def fast(self, q, k, v, *, causal, key_padding_mask, hw):
        perm, r, (nh, nw, rh, rw) = region_order(hw, self.n_win, device=q.device)
        whole = nh * rh == hw[0] and nw * rw == hw[1]
        if whole:  # the map divides into regions: region-major order is a strided copy, and no slot is padding
            regions = dict(nh=nh, rh=rh, nw=nw, rw=rw)
            qr, kr, vr = (rearrange(t, "b h (nh rh nw rw) d -> b h (nh nw rh rw) d", **regions) for t in (q, k, v))
            valid = None
        else:
            valid = (perm >= 0)[None, None]
            qr, kr, vr = (permute(t, perm[None, None]) for t in (q, k, v))  # region-major order, padding slots = 0
        # Routing on region means of the full (all-head) q and k; detached: no gradient flows through the choice.
        qbar = pool_blocks(qr.detach(), r, valid=valid)  # (B, H, regions, d)
        kbar = pool_blocks(kr.detach(), r, valid=valid)
        affinity = torch.einsum("bhnd,bhmd->bnm", qbar, kbar)  # sum over heads = dot product of full-width vectors
        idx = topk_blocks(affinity, self._k(affinity.shape[-1]))[:, None]  # (B, 1, regions, k), shared by heads
        o = block_sparse_attention(qr, kr, vr, idx, q_block=r, k_block=r, k_valid=valid, scale=self.qk_scale)
        if whole:
            return rearrange(o, "b h (nh nw rh rw) d -> b h (nh rh nw rw) d", **regions)
        return unpermute(o, perm[None, None], q.shape[2])

    def reference(self, q, k, v, *, causal, key_padding_mask, hw):
        # The paper's steps in raster order: region id per token, region means, top-k regions, dense masked softmax.
        H, W = hw
        _, r, (nh, nw, rh, rw) = region_order(hw, self.n_win)
        ys, xs = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        region = ((ys // rh) * nw + xs // rw).flatten().to(q.device)  # (N,)
        onehot = F.one_hot(region, nh * nw).to(q.dtype)  # (N, regions)
        mean = onehot / onehot.sum(0, keepdim=True)
        qbar = torch.einsum("bhnd,nr->bhrd", q.detach(), mean)
        kbar = torch.einsum("bhnd,nr->bhrd", k.detach(), mean)
        affinity = torch.einsum("bhnd,bhmd->bnm", qbar, kbar)
        chosen = torch.zeros_like(affinity, dtype=torch.bool)
        chosen.scatter_(-1, topk_blocks(affinity, self._k(nh * nw)), True)  # (B, regions, regions)
        keep = chosen[:, region][:, :, region]  # (B, N, N): key region chosen by the query's region
        return reference_attention(q, k, v, attn_mask=keep[:, None], scale=self.qk_scale)


# ================================================================================== shared small helpers


def _valid_len(key_padding_mask: Tensor | None, batch: int, n: int, device) -> Tensor:
    """``(B,)`` long: one past the last kept key of each sequence (``n`` without a mask, 0 if nothing is kept).

    Patterns that depend on "the end of the sequence" (random blocks, wrap-around groups) use it, so that right
    padding never changes what the real tokens attend to.
    """
    if key_padding_mask is None:
        return torch.full((batch,), n, dtype=torch.long, device=device)
    pos = torch.arange(1, n + 1, device=device)
    return (key_padding_mask.long() * pos).amax(-1)


def _merge(parts: list[tuple[Tensor, Tensor]], dtype: torch.dtype) -> Tensor:
    """Exact softmax over the union of disjoint key sets from normalised partial results ``(out, lse)``."""
    out, _ = merge_partials([(o.to(torch.float64 if dtype == torch.float64 else torch.float32), l) for o, l in parts])
    return out.to(dtype)


def _hash_uniform(*ints: Tensor) -> Tensor:
    """A deterministic uniform number in [0, 1) from integer tensors (broadcast): a counter-based RNG.

    Random sparse patterns are a *function* of (seed, head, query block, slot), so they do not depend on the
    sequence length, on the order of calls or on the global RNG: same seed, same pattern, on every call.
    """
    mask = (1 << 32) - 1
    h = torch.zeros((), dtype=torch.long, device=ints[0].device)
    for i, x in enumerate(ints):
        h = (h * 0x01000193 + (x.long() + 1) * (0x9E3779B1 + 2 * i)) & mask
        h = h ^ (h >> 16)
        h = (h * 0x045D9F3B) & mask
        h = h ^ (h >> 16)
    return h.to(torch.float64) / float(1 << 32)


# ==================================================================================== block-sparse baseline


def _bigbird_random(seed: int, heads: int, nqb: int, count: int, upper: Tensor, causal: bool) -> Tensor:
    """``(B, H, nqb, count)`` random key-block ids: uniform in ``[0, upper_b)`` (bidirectional) or over the past
    blocks ``[0, i]`` (causal); ``-1`` when the range is empty."""
    dev = upper.device
    h = torch.arange(heads, device=dev)[:, None, None]
    i = torch.arange(nqb, device=dev)[None, :, None]
    j = torch.arange(count, device=dev)[None, None, :]
    u = _hash_uniform(torch.tensor(seed, device=dev), h, i, j)  # (H, nqb, count)
    hi = (i + 1).expand(heads, nqb, count)[None] if causal else upper[:, None, None, None]
    if not causal:
        hi = torch.minimum(hi, torch.full_like(hi, 1 << 40))
    ids = (u[None] * hi).long()
    return torch.where(hi > 0, ids, torch.full_like(ids, -1)).expand(upper.shape[0], heads, nqb, count)


@register(
    "block-sparse", family="sparse", seed=False,
    paper="Big Bird: Transformers for Longer Sequences (with Longformer's local + global pattern)", arxiv="2007.14062",
    complexity="O(N b (2w + 1 + g + r) d)",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=False, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, block=64, window=1, globals=2, random=3, **_: (
        (0.5 if causal else 1.0) * 4.0 * batch * heads * head_dim
        * (n * min(n, block * ((window or n) * (1 if causal else 2) + 1 + globals + random))
           + min(n, globals * block) * n)),
    exact_when=dict(window=None),
    test_kwargs=dict(dim=32, heads=4, block=2, window=1, globals=1, random=1),
    bench_kwargs=dict(block=64, window=1, globals=2, random=3),
    summary="Fixed block pattern: a sliding window of blocks, global blocks that attend and are attended by all, "
            "and random blocks (BigBird ITC); the baseline of the sparse seeds.",
)
class BlockSparseAttention(SparseMechanism):
    """BigBird-style block-sparse attention (baseline).

    Args:
        block: tokens per block ``b``.
        window: neighbouring blocks on each side (causal: preceding blocks only); ``None`` = all (dense).
        globals: the first ``g`` blocks are global: every query attends them and they attend every key.
        random: random key blocks per query block (a fixed, seeded function of head and block index).
        seed: the random pattern's seed.
    """

    def __init__(self, dim: int, heads: int = 8, *, block: int = 64, window: int | None = 1, globals: int = 2,
                 random: int = 3, seed: int = 0, impl: str = "fast", **kwargs) -> None:
        super().__init__(dim, heads, impl=impl, **kwargs)
        _check_pos_int("block", block)
        if window is not None and (not isinstance(window, int) or window < 0):
            raise shape_error("window", "a non-negative integer or None", repr(window))
        for name, val in (("globals", globals), ("random", random)):
            if not isinstance(val, int) or val < 0:
                raise shape_error(name, "a non-negative integer", repr(val))
        self.block, self.window, self.globals, self.random, self.seed = block, window, globals, random, seed

    def _random(self, key_padding_mask, B, N, nqb, causal, device):
        upper = (_valid_len(key_padding_mask, B, N, device) + self.block - 1) // self.block
        return _bigbird_random(self.seed, self.heads, nqb, self.random, upper, causal)

    def fast(self, q, k, v, *, causal, key_padding_mask, hw):
        B, N = q.shape[0], q.shape[2]
        b = self.block
        nb = math.ceil(N / b)
        w = nb if self.window is None else self.window
        dev = q.device
        parts = [local_blocks(nb, nb, w, 0 if causal else w, device=dev)[None, None].expand(B, self.heads, nb, -1)]
        g = min(self.globals, nb)
        if g:
            parts.append(torch.arange(g, device=dev).expand(B, self.heads, nb, g))
        if self.random:
            parts.append(self._random(key_padding_mask, B, N, nb, causal, dev))
        idx = dedup_blocks(torch.cat(parts, dim=-1))
        if causal:  # global/random blocks after the query block are never attended
            idx = torch.where(idx > torch.arange(nb, device=dev)[:, None], torch.full_like(idx, -1), idx)
        out = block_sparse_attention(q, k, v, idx, q_block=b, k_block=b, causal=causal,
                                     key_padding_mask=key_padding_mask)
        if g:  # global query blocks attend every key (positions start at 0: causal stays top-left for them)
            ng = min(N, g * b)
            all_blocks = torch.arange(nb, device=dev).expand(1, 1, math.ceil(ng / b), nb)
            og = block_sparse_attention(q[:, :, :ng], k, v, all_blocks, q_block=b, k_block=b, causal=causal,
                                        key_padding_mask=key_padding_mask, q_pos=torch.arange(ng, device=dev))
            out = torch.cat([og, out[:, :, ng:]], dim=2)
        return out

    def reference(self, q, k, v, *, causal, key_padding_mask, hw):
        B, N = q.shape[0], q.shape[2]
        b = self.block
        nb = math.ceil(N / b)
        bi = torch.arange(N, device=q.device) // b
        dist = bi[:, None] - bi[None, :]
        keep = torch.ones(N, N, dtype=torch.bool, device=q.device) if self.window is None else dist.abs() <= self.window
        keep = keep | (bi[None, :] < self.globals) | (bi[:, None] < self.globals)
        keep = keep[None, None].expand(B, self.heads, N, N)
        if self.random:
            r = self._random(key_padding_mask, B, N, nb, causal, q.device)  # (B, H, nb, r)
            hit = (r[:, :, bi][..., None] == bi[None, None, None, None, :]).any(-2)  # (B, H, N, N)
            keep = keep | hit
        return reference_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=keep)


# ================================================================================ shifted group attention


def _s2_groups(n: int, group: int, heads: int, shifted_heads: int, valid_len: Tensor, wrap: bool) -> Tensor:
    """Group id of every token ``(B, H, n)`` for shifted short attention.

    Heads ``< heads - shifted_heads`` use groups ``i // G``; the last ``shifted_heads`` heads use groups shifted by
    half a group, ``(i + G/2) // G``. With ``wrap`` (LongLoRA's cyclic roll) the last half group, when the sequence's
    valid length is a multiple of G... more precisely when it has an even number of half groups, joins the first
    half group, as the roll by -G/2 makes them one group.
    """
    dev = valid_len.device
    i = torch.arange(n, device=dev)
    plain = (i // group).expand(valid_len.shape[0], n)
    shifted = (i + group // 2) // group
    shifted = shifted.expand(valid_len.shape[0], n)
    if wrap:
        halves = (valid_len + group // 2 - 1) // (group // 2)  # half groups per sequence
        groups_b = torch.where(halves % 2 == 0, halves // 2, torch.full_like(halves, 1 << 40))
        shifted = shifted % groups_b[:, None].clamp(min=1)
    is_shifted = (torch.arange(heads, device=dev) >= heads - shifted_heads)[None, :, None]
    return torch.where(is_shifted, shifted[:, None], plain[:, None])


class _ShiftedShortAttention(SparseMechanism):
    """Group attention in blocks of ``group`` tokens, half of the heads shifted by half a group (S2-Attn).

    Subclasses choose the wrap-around (LongLoRA's roll) and global sink tokens (SinkLoRA).
    """

    wrap: bool = True

    def __init__(self, dim: int, heads: int = 8, *, group: int | None = 64, sinks: int = 0, impl: str = "fast",
                 **kwargs) -> None:
        super().__init__(dim, heads, impl=impl, **kwargs)
        if group is not None and (not isinstance(group, int) or group < 2 or group % 2):
            raise shape_error("group", "an even integer >= 2, or None (one group = dense)", repr(group))
        if not isinstance(sinks, int) or sinks < 0:
            raise shape_error("sinks", "a non-negative integer", repr(sinks))
        self.group, self.sinks = group, sinks

    def _setup(self, q, key_padding_mask):
        B, N = q.shape[0], q.shape[2]
        G = self.group if self.group is not None else 2 * N  # one group holds everything: dense
        vl = _valid_len(key_padding_mask, B, N, q.device)
        groups = _s2_groups(N, G, self.heads, self.heads // 2 if self.group is not None else 0, vl, self.wrap)
        return G, vl, groups

    def fast(self, q, k, v, *, causal, key_padding_mask, hw):
        B, N, H, dev = q.shape[0], q.shape[2], self.heads, q.device
        G, vl, groups = self._setup(q, key_padding_mask)
        hb = G // 2
        nb = math.ceil(N / hb)
        b = torch.arange(nb, device=dev)
        plain = b ^ 1
        shifted = torch.where(b % 2 == 1, b + 1, b - 1)
        if self.wrap:  # the first and the last half group form one group when there is an even number of halves
            halves = ((vl + hb - 1) // hb)[:, None]
            even = halves % 2 == 0
            shifted = torch.where((b == 0) & even, halves - 1, shifted.expand(B, nb))
            shifted = torch.where((b == halves - 1) & even & (b > 0), torch.zeros_like(shifted), shifted)
        shifted = shifted.expand(B, nb)
        n_shift = H // 2 if self.group is not None else 0
        is_shifted = (torch.arange(H, device=dev) >= H - n_shift)[None, :, None]
        partner = torch.where(is_shifted, shifted[:, None], plain.expand(B, nb)[:, None])
        partner = torch.where((partner >= 0) & (partner < nb) & (partner != b), partner, torch.full_like(partner, -1))
        idx = torch.stack([b.expand(B, H, nb), partner], dim=-1)
        k_valid = None
        if self.sinks:  # sinks are attended separately (below) by every query; keep them out of the groups
            k_valid = (torch.arange(N, device=dev) >= self.sinks)[None, None]
        kw = dict(causal=causal, key_padding_mask=key_padding_mask)
        res = block_sparse_attention(q, k, v, idx, q_block=hb, k_block=hb, q_group=groups, k_group=groups,
                                     k_valid=k_valid, return_lse=bool(self.sinks), **kw)
        if not self.sinks:
            return res
        s = min(self.sinks, N)
        sink = block_sparse_attention(q, k[:, :, :s], v[:, :, :s], torch.zeros(1, 1, 1, 1, dtype=torch.long,
                                      device=dev), q_block=N, k_block=s, causal=causal, return_lse=True,
                                      q_pos=torch.arange(N, device=dev),
                                      key_padding_mask=None if key_padding_mask is None else key_padding_mask[:, :s])
        return _merge([res, sink], q.dtype)

    def reference(self, q, k, v, *, causal, key_padding_mask, hw):
        N = q.shape[2]
        _, _, groups = self._setup(q, key_padding_mask)
        keep = groups[..., :, None] == groups[..., None, :]  # (B, H, N, N): same group
        if self.sinks:
            keep = keep | (torch.arange(N, device=q.device) < self.sinks)
        return reference_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=keep)


@register(
    "longlora-s2", family="sparse", seed=False,
    paper="LongLoRA: Efficient Fine-tuning of Long-Context Large Language Models (S2-Attn)", arxiv="2309.12307",
    complexity="O(N G d)",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=False, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, group=64, **_: (
        (0.5 if causal else 1.0) * 4.0 * batch * heads * n * min(n, group or n) * head_dim),
    exact_when=dict(group=None),
    test_kwargs=dict(dim=32, heads=4, group=4),
    bench_kwargs=dict(group=256),
    summary="Shifted short attention: attention within groups of G tokens, half of the heads shifted by G/2 "
            "(cyclically, as LongLoRA's roll), so information flows between neighbouring groups.",
)
class ShiftedShortAttention(_ShiftedShortAttention):
    """LongLoRA's S2-Attn (baseline of SinkLoRA).

    Args:
        group: group size ``G`` (even); ``None`` = one group (dense attention).

    The shifted half of the heads groups tokens ``(i + G/2) // G``; as in LongLoRA's ``roll(-G/2)`` the last half
    group wraps around into the first group (when the sequence holds an even number of half groups). Causal masking
    is by true position, so inside the wrapped group the first tokens never see the last ones.
    """

    wrap = True

    def __init__(self, dim: int, heads: int = 8, *, group: int | None = 64, impl: str = "fast", **kwargs) -> None:
        super().__init__(dim, heads, group=group, sinks=0, impl=impl, **kwargs)


@register(
    "sinklora", family="sparse", seed=True, catalog=22,
    paper="SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models",
    arxiv="2406.05678",
    complexity="O(N (G + s) d)",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=False, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, group=64, sinks=4, **_: (
        (0.5 if causal else 1.0) * 4.0 * batch * heads * n * min(n, (group or n) + sinks) * head_dim),
    exact_when=dict(group=None),
    test_kwargs=dict(dim=32, heads=4, group=4, sinks=2),
    bench_kwargs=dict(group=256, sinks=4),
    summary="SF-Attn: shifted group attention whose shifted heads are reassembled into unshifted, non-wrapping "
            "groups, plus global attention to the first s 'sink' tokens.",
)
class SinkFixedAttention(_ShiftedShortAttention):
    """SinkLoRA's SF-Attn.

    Args:
        group: group size ``G`` (even); ``None`` = dense.
        sinks: number of initial tokens every query also attends (attention sinks).

    Differences from ``longlora-s2``: the shifted heads' groups do not wrap around (the segment that the cyclic
    roll moved to the end is returned to its own position: the first half group stands alone), and the ``s``
    sink tokens are visible to every query. The H2O KV-cache eviction SinkLoRA uses at inference is a cache
    policy, not part of this layer.
    """

    wrap = False

    def __init__(self, dim: int, heads: int = 8, *, group: int | None = 64, sinks: int = 4, impl: str = "fast",
                 **kwargs) -> None:
        super().__init__(dim, heads, group=group, sinks=sinks, impl=impl, **kwargs)


# ================================================================================ Routing Transformer (#9)


def _routing_flops(batch, n, heads, head_dim, causal, clusters, window, local_window, local_heads) -> float:
    local = heads // 2 if local_heads is None else local_heads
    span = (1 if causal else 2) * (local * min(n, local_window or n) + (heads - local) * min(n, window or n))
    return (0.5 if causal else 1.0) * 4.0 * batch * head_dim * n * span + 2.0 * batch * heads * n * clusters * head_dim


def _local_attention(q, k, v, window: int | None, *, causal, key_padding_mask, q_pos=None, k_pos=None,
                     q_group=None, k_group=None, k_valid=None, return_lse=False):
    """Sliding-window attention through the block core: keys with ``|pos_i - pos_j| < window`` (causal:
    ``0 <= pos_i - pos_j < window``), in blocks of ``window`` so each query block needs its own and the neighbouring
    key blocks. ``window=None`` is unbounded (all keys, still through the same core)."""
    N = q.shape[2]
    w = N if window is None else min(window, N)
    nb = math.ceil(N / w)
    idx = local_blocks(nb, nb, 1, 0 if causal else 1, device=q.device)[None, None]
    win = None if window is None else (window - 1, 0 if causal else window - 1)
    return block_sparse_attention(q, k, v, idx, q_block=w, k_block=w, causal=causal, key_padding_mask=key_padding_mask,
                                  q_pos=q_pos, k_pos=k_pos, window=win, q_group=q_group, k_group=k_group,
                                  k_valid=k_valid, return_lse=return_lse)


def _layer_norm(x: Tensor) -> Tensor:
    """Layer norm without scale or bias over the last dim (the Routing Transformer normalises q/k before routing)."""
    return F.layer_norm(x, x.shape[-1:])


@register(
    "routing-transformer", family="sparse", seed=True, catalog=9,
    paper="Efficient Content-Based Sparse Attention with Routing Transformers", arxiv="2003.05997",
    complexity="O(N w d + N C d); O(N^1.5 d) with C = w = sqrt(N)",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=False, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, clusters=8, window=128, local_window=128, local_heads=None,
    **_: _routing_flops(batch, n, heads, head_dim, causal, clusters, window, local_window, local_heads),
    exact_when=dict(clusters=1, window=None, local_heads=0),
    test_kwargs=dict(dim=32, heads=4, clusters=3, window=3, local_window=3, local_heads=2, update_centroids=False),
    bench_kwargs=dict(clusters=16, window=128, local_window=128),
    summary="Online k-means routing: queries/keys (shared, normalised) go to their nearest centroid; each routing "
            "head attends within its cluster (a window in cluster-sorted order), the other heads attend locally.",
)
class RoutingAttention(SparseMechanism):
    """Routing attention (Roy et al., TACL 2021).

    Args:
        clusters: k-means centroids per routing head ``C``.
        window: routing heads attend to the ``window`` nearest same-cluster tokens in (cluster, position) order --
            causal: the ``window`` most recent ones; ``None`` = the whole cluster.
        local_heads: heads doing local sliding-window attention (default ``heads // 2``, as in the paper's mix);
            the rest route.
        local_window: window of the local heads (``None`` = unbounded).
        update_centroids: in training mode, move the centroids toward the mean of their assigned vectors
            (exponential moving average with ``decay``), the paper's online mini-batch k-means.

    Routing heads share queries and keys (``k = q``, layer-normalised without scale), as the paper does for
    decoders, so that one assignment orders each head's tokens. Assignments are argmin distances to the
    centroids: discrete, no gradient (the centroids learn only through the moving average).
    """

    def __init__(self, dim: int, heads: int = 8, *, clusters: int = 8, window: int | None = 128,
                 local_heads: int | None = None, local_window: int | None = 128, update_centroids: bool = True,
                 decay: float = 0.999, impl: str = "fast", **kwargs) -> None:
        super().__init__(dim, heads, impl=impl, **kwargs)
        _check_pos_int("clusters", clusters)
        _check_pos_int("window", window, allow_none=True)
        _check_pos_int("local_window", local_window, allow_none=True)
        local_heads = heads // 2 if local_heads is None else local_heads
        if not isinstance(local_heads, int) or not 0 <= local_heads <= heads:
            raise shape_error("local_heads", f"an integer in [0, heads={heads}]", repr(local_heads))
        if self.kv_heads != heads:
            raise shape_error("kv_heads", f"equal to heads ({heads}): routing heads share q and k", self.kv_heads)
        if not 0.0 <= decay < 1.0:
            raise shape_error("decay", "a float in [0, 1)", repr(decay))
        self.clusters, self.window, self.local_heads, self.local_window = clusters, window, local_heads, local_window
        self.update_centroids, self.decay = update_centroids, decay
        routing = heads - local_heads
        means = _layer_norm(torch.randn(routing, clusters, self.head_dim))
        self.register_buffer("centroids", means)

    def project(self, x: Tensor, *, hw=None, offset: int = 0):
        q, k, v = super().project(x, hw=hw, offset=offset)
        L = self.local_heads
        if L == self.heads:
            return q, k, v
        r = _layer_norm(q[:, L:])  # routing heads: shared, normalised queries/keys
        return torch.cat([q[:, :L], r], 1), torch.cat([k[:, :L], r], 1), v

    def assign(self, r: Tensor) -> Tensor:
        """Nearest centroid ``(B, Hr, N)`` of routing vectors ``r (B, Hr, N, d)`` (padded tokens too: they still
        query; as keys they are masked)."""
        c = self.centroids.to(r.dtype)
        # argmin |r - c|^2 = argmax (r.c - |c|^2 / 2); ties go to the lower cluster id
        score = torch.einsum("bhnd,hcd->bhnc", r.detach(), c) - 0.5 * c.square().sum(-1)[None, :, None, :]
        return score.argmax(-1)

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        q, k, v = self.project(x, hw=hw)
        out = self.heads_out(q, k, v, causal=causal, key_padding_mask=key_padding_mask, hw=hw)
        if self.training and self.update_centroids and self.local_heads < self.heads:
            self._ema_update(q[:, self.local_heads:], key_padding_mask)
        return self.output(out)

    @torch.no_grad()
    def _ema_update(self, r: Tensor, key_padding_mask: Tensor | None) -> None:
        onehot = F.one_hot(self.assign(r), self.clusters).to(r.dtype)
        if key_padding_mask is not None:  # padding does not move the centroids
            onehot = onehot * key_padding_mask[:, None, :, None].to(r.dtype)
        count = onehot.sum((0, 2))  # (Hr, C)
        total = torch.einsum("bhnc,bhnd->hcd", onehot, r.detach())
        mean = total / count.clamp(min=1)[..., None]
        new = self.decay * self.centroids + (1 - self.decay) * mean.to(self.centroids.dtype)
        self.centroids.copy_(torch.where(count[..., None] > 0, new, self.centroids))

    def fast(self, q, k, v, *, causal, key_padding_mask, hw):
        L, N = self.local_heads, q.shape[2]
        outs = []
        if L:
            outs.append(_local_attention(q[:, :L], k[:, :L], v[:, :L], self.local_window, causal=causal,
                                         key_padding_mask=key_padding_mask))
        if L < self.heads:
            r, vr = q[:, L:], v[:, L:]
            a = self.assign(r)
            perm, _ = sort_by_group(a)  # group-by-assignment: (cluster, position) order per head
            rs, vs, gs = permute(r, perm), permute(vr, perm), a.gather(-1, perm)
            kv = None if key_padding_mask is None else key_padding_mask[:, None].expand_as(a).gather(-1, perm)
            slot = torch.arange(N, device=q.device)
            o = _local_attention(rs, rs, vs, self.window, causal=causal, key_padding_mask=None, q_pos=slot, k_pos=slot,
                                 q_group=gs, k_group=gs, k_valid=kv)
            outs.append(unpermute(o, perm, N))
        return torch.cat(outs, dim=1)

    def reference(self, q, k, v, *, causal, key_padding_mask, hw):
        # Dense masks in the original order: local heads |i - j| < w; routing heads same cluster and within
        # ``window`` in rank-within-cluster (the number of earlier tokens of the same cluster).
        L, N, dev = self.local_heads, q.shape[2], q.device
        i = torch.arange(N, device=dev)
        keeps = []
        if L:
            near = (i[:, None] - i[None, :]).abs() < (self.local_window or N)
            keeps.append(near[None, None].expand(q.shape[0], L, N, N))
        if L < self.heads:
            a = self.assign(q[:, L:])
            same = a[..., :, None] == a[..., None, :]  # (B, Hr, N, N)
            rank = (same & (i[None, :] < i[:, None])).sum(-1)  # earlier tokens of the same cluster
            close = (rank[..., :, None] - rank[..., None, :]).abs() < (self.window or N)
            keeps.append(same & close)
        keep = torch.cat(keeps, dim=1)
        return reference_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=keep)


# ============================================================================================== SEA (#53)


def _log_features(x: Tensor, w: Tensor) -> Tensor:
    """Log of Performer's positive random features ``phi(x) = exp(w x - |x|^2 / 2) / sqrt(r)`` (without the constant):
    ``phi(q) . phi(k)`` is an unbiased estimate of ``exp(q . k)``. ``x (B, H, N, d)`` (already scaled by ``d^-1/4``),
    ``w (r, d)`` -> ``(B, H, N, r)``."""
    return x @ w.to(x.dtype).t() - 0.5 * x.square().sum(-1, keepdim=True)


def _log_matmul(a: Tensor, b: Tensor) -> Tensor:
    """``log(exp(a) @ exp(b)^T)`` computed stably: ``a (..., n, r)``, ``b (..., m, r)`` (rows of ``-inf`` allowed)."""
    ma = a.amax(-1, keepdim=True)
    mb = b.amax(-1, keepdim=True)
    ma = torch.where(torch.isfinite(ma), ma, torch.zeros_like(ma))
    mb = torch.where(torch.isfinite(mb), mb, torch.zeros_like(mb))
    return torch.log((a - ma).exp() @ (b - mb).exp().transpose(-1, -2)) + ma + mb.transpose(-1, -2)


@register(
    "sea", family="sparse", seed=True, catalog=53,
    paper="SEA: Sparse Linear Attention with Estimated Attention Mask", arxiv="2310.01777",
    complexity="O(N (N/b) r) estimate (chunked, O(N k) memory) + O(N k b d) sparse attention",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=False, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, block=64, topk=8, features=None, **_: (
        2.0 * batch * heads * n * math.ceil(n / block) * (features or head_dim)
        + 4.0 * batch * heads * n * min(n, topk * block) * head_dim * (0.5 if causal else 1.0)),
    exact_when=dict(topk="all"),
    test_kwargs=dict(dim=32, heads=4, block=2, topk=2),
    bench_kwargs=dict(block=64, topk=8),
    summary="Estimate each query's attention mass per key block with a random-feature (Performer) kernel in "
            "linear attention form, keep the top-k blocks per query, run exact softmax on them only.",
)
class SEAAttention(SparseMechanism):
    """Sparse attention with an estimated attention mask (Lee et al., ICLR 2024).

    Args:
        block: key tokens per estimated column ``b`` (the compressed attention matrix has ``ceil(N / b)`` columns).
        topk: blocks kept per query (``"all"`` = dense); causal: the query's own block plus the top ``k - 1``
            earlier blocks, so no choice depends on a later key.
        features: random features ``r`` of the estimator (default ``head_dim``).
        chunk: queries whose estimate rows (and gathered pairs) are held at once (memory ``O(chunk * N / b)``).

    The estimate of query ``i`` for block ``c`` is ``log sum_{j in c} phi(q_i) . phi(k_j)`` with
    ``phi`` Performer's positive random features (an unbiased kernel estimate of ``exp(q.k / sqrt(d))``),
    computed in linear-attention form from per-block feature sums. Top-k is discrete (no gradient, as in
    the paper: "estimation gradient is cut here"); the estimator has no trained parameters here.
    """

    def __init__(self, dim: int, heads: int = 8, *, block: int = 64, topk: int | str = 8, features: int | None = None,
                 chunk: int = 1024, impl: str = "fast", **kwargs) -> None:
        super().__init__(dim, heads, impl=impl, **kwargs)
        _check_pos_int("block", block)
        _check_pos_int("chunk", chunk)
        if topk != "all":
            _check_pos_int("topk", topk)
        r = features or self.head_dim
        _check_pos_int("features", r)
        self.block, self.topk, self.chunk = block, topk, chunk
        self.register_buffer("features", torch.randn(r, self.head_dim))

    def select(self, q: Tensor, k: Tensor, causal: bool, key_padding_mask: Tensor | None) -> Tensor:
        """Per-query key blocks ``(B, H, N, k')`` (``-1`` = none) from the kernel estimate, in query chunks."""
        B, H, N, d = q.shape
        b, dev = self.block, q.device
        nb = math.ceil(N / b)
        G = self.heads // self.kv_heads
        scale = d ** -0.25
        lk = _log_features(k.detach() * scale, self.features)  # (B, Hkv, N, r)
        if key_padding_mask is not None:
            lk = lk.masked_fill(~key_padding_mask[:, None, :, None], float("-inf"))
        # log of the per-block feature sums S_c (padding -> -inf, i.e. contributes nothing)
        lk = rearrange(pad_to(lk, b, 2, float("-inf")), "b h (n s) r -> b h n s r", s=b).logsumexp(-2)
        lk = lk.repeat_interleave(G, dim=1)
        has_key = torch.isfinite(lk).any(-1)  # (B, H, nb): blocks with a kept key
        kk = nb if self.topk == "all" else min(self.topk, nb)
        out = []
        for s0 in range(0, N, self.chunk):
            s1 = min(N, s0 + self.chunk)
            lq = _log_features(q[:, :, s0:s1].detach() * scale, self.features)
            est = _log_matmul(lq, lk)  # (B, H, chunk, nb): log estimated mass per block
            allowed = has_key[:, :, None, :]
            if causal:
                own = (torch.arange(s0, s1, device=dev) + (k.shape[2] - N)) // b
                past = torch.arange(nb, device=dev)[None, :] < own[:, None]
                sel = topk_blocks(est, kk - 1, allowed=allowed & past) if kk > 1 else est.new_empty(
                    B, H, s1 - s0, 0, dtype=torch.long)
                sel = torch.cat([own.expand(B, H, -1)[..., None], sel], dim=-1)
            else:
                sel = topk_blocks(est, kk, allowed=allowed)
            out.append(sel)
        return torch.cat(out, dim=2)

    def fast(self, q, k, v, *, causal, key_padding_mask, hw):
        sel = self.select(q, k, causal, key_padding_mask)
        out, lse = pair_attention(q, k, v, sel, k_block=self.block, causal=causal, key_padding_mask=key_padding_mask,
                                  chunk=self.chunk)
        return merge_pairs(out, lse)[0].to(q.dtype)  # the selected blocks are disjoint: exact softmax over their union

    def reference(self, q, k, v, *, causal, key_padding_mask, hw):
        sel = self.select(q, k, causal, key_padding_mask)  # the estimated mask, then dense masked softmax
        kb = torch.arange(k.shape[2], device=q.device) // self.block
        keep = (sel[..., None, :] == kb[:, None]).any(-1)  # (B, H, N, N)
        return reference_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=keep)


# ============================================================================================ Landmark (#231)


@register(
    "landmark-attention", family="sparse", seed=True, catalog=231,
    paper="Landmark Attention: Random-Access Infinite Context Length for Transformers", arxiv="2305.16300",
    complexity="O(N (N/b) d) landmark scores (chunked) + O(N (k + 1) b d) attention",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=True, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, block=64, topk=4, **_: (
        2.0 * batch * heads * n * math.ceil(n / block) * head_dim
        + 6.0 * batch * heads * n * min(n, ((topk if topk is not None else math.ceil(n / block)) + 1) * block)
        * head_dim * (0.5 if causal and topk is None else 1.0)),
    exact_when=None,
    test_kwargs=dict(dim=32, heads=4, block=3, topk=2),
    bench_kwargs=dict(block=64, topk=4),
    summary="A landmark per block of b tokens gates it: a query's softmax runs over its own block's tokens and the "
            "landmarks; each landmark's weight is spread over its block (grouped softmax); only the top-k "
            "landmark blocks are retrieved.",
)
class LandmarkAttention(SparseMechanism):
    """Landmark attention (Mohtashami & Jaggi, NeurIPS 2023) with block retrieval and decoding.

    Args:
        block: tokens per block ``b``.
        topk: landmark blocks retrieved per query (the paper's inference); ``None`` = every earlier block (the
            paper's training form, the full grouped softmax).
        chunk: queries whose landmark scores are held at once.

    For query ``i`` in block ``c(i)`` with logits ``l_ij``, landmark logits ``s_ig = q_i . L_g / sqrt(d)`` and
    ``lse_ig = log sum_{j in g} exp(l_ij)``::

        p_ij = exp(l_ij) / Z                     j in c(i) (causal: j <= i)
        p_ij = exp(s_ig) / Z * exp(l_ij - lse_ig)   j in a retrieved block g
        Z    = sum_{j in c(i)} exp(l_ij) + sum_{retrieved g} exp(s_ig)

    i.e. a softmax over own-block tokens and landmarks whose landmark mass is spread over its block by the
    block's own softmax. It is one softmax over the retrieved tokens with per-block bias ``s_ig - lse_ig``,
    which the shared core computes as per-(query, block) softmax partials (:func:`pair_attention`) merged with the
    landmark logits as block weights. Causal: only blocks before ``c(i)`` are retrievable;
    bidirectional: every other block.

    The paper inserts a landmark *token* after every block, whose hidden state (computed by the lower layers)
    gives its key. A single layer has no such token, so the landmark of block ``g`` is the key projection of a
    learned landmark embedding plus the mean of the block's inputs: ``L_g = W_k (e_L + mean_{j in g} x_j)``.
    """

    def __init__(self, dim: int, heads: int = 8, *, block: int = 64, topk: int | None = 4, chunk: int = 1024,
                 impl: str = "fast", **kwargs) -> None:
        if kwargs.get("rope"):
            raise shape_error("rope", "False for landmark-attention (landmark keys carry no position)", True)
        super().__init__(dim, heads, impl=impl, **kwargs)
        _check_pos_int("block", block)
        _check_pos_int("topk", topk, allow_none=True)
        _check_pos_int("chunk", chunk)
        self.block, self.topk, self.chunk = block, topk, chunk
        self.landmark = nn.Parameter(torch.randn(dim) * dim ** -0.5)

    # ---------------------------------------------------------------------------------------- landmarks
    def landmark_keys(self, sums: Tensor, counts: Tensor) -> tuple[Tensor, Tensor]:
        """Landmark keys ``(B, Hkv, nb, d)`` and validity ``(B, nb)`` from per-block input sums and kept counts."""
        mean = sums / counts.clamp(min=1)[..., None].to(sums.dtype)
        lk = rearrange(self.k_proj(self.landmark.to(sums.dtype) + mean), "b n (h d) -> b h n d", h=self.kv_heads)
        return lk, counts > 0

    def _block_stats(self, x: Tensor, key_padding_mask: Tensor | None) -> tuple[Tensor, Tensor]:
        keep = None if key_padding_mask is None else key_padding_mask[:, None]
        sums = pool_blocks(x[:, None], self.block, valid=keep, mode="sum")[:, 0]  # (B, nb, C)
        n = x.shape[1]
        kept = torch.ones(x.shape[0], n, dtype=torch.long, device=x.device) if key_padding_mask is None \
            else key_padding_mask.long()
        counts = rearrange(pad_to(kept, self.block, 1), "b (n s) -> b n s", s=self.block).sum(-1)
        return sums, counts

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        offset = 0 if cache is None else cache.seq_len
        q, k, v = self.project(x, offset=offset)
        if cache is None:
            sums, counts = self._block_stats(x, key_padding_mask)
            kpm = key_padding_mask
        else:
            k, v, kpm = cache.append(k, v, key_padding_mask)
            sums, counts = self._cache_stats(cache, x, key_padding_mask, offset)
        lk, lk_ok = self.landmark_keys(sums, counts)
        q_pos = torch.arange(offset, offset + x.shape[1], device=x.device)
        fn = self.grouped if self.impl == "fast" else self.grouped_reference
        return self.output(fn(q, k, v, lk, lk_ok, causal=causal, key_padding_mask=kpm, q_pos=q_pos))

    def _cache_stats(self, cache, x, key_padding_mask, offset):
        """Per-block input sums and counts over everything seen, kept in ``cache.state`` across decode steps."""
        B, n, C = x.shape
        nb = math.ceil((offset + n) / self.block)
        st = cache.state.setdefault("landmark", {"sums": x.new_zeros(B, 0, C), "counts": torch.zeros(
            B, 0, dtype=torch.long, device=x.device)})
        grow = nb - st["sums"].shape[1]
        if grow > 0:
            st["sums"] = torch.cat([st["sums"], x.new_zeros(B, grow, C)], 1)
            st["counts"] = torch.cat([st["counts"], st["counts"].new_zeros(B, grow)], 1)
        blk = torch.arange(offset, offset + n, device=x.device) // self.block
        kept = torch.ones(B, n, dtype=torch.long, device=x.device) if key_padding_mask is None \
            else key_padding_mask.long()
        st["sums"] = st["sums"].index_add(1, blk, x * kept[..., None].to(x.dtype))
        st["counts"] = st["counts"].index_add(1, blk, kept)
        return st["sums"], st["counts"]

    # -------------------------------------------------------------------------------------- retrieval
    def _allowed(self, q_pos: Tensor, nb: Tensor | int, causal: bool, device) -> Tensor:
        own = q_pos // self.block
        c = torch.arange(nb, device=device)
        return (c[None, :] < own[:, None]) if causal else (c[None, :] != own[:, None])

    def retrieve(self, q: Tensor, lk: Tensor, lk_ok: Tensor, causal: bool, q_pos: Tensor) -> tuple[Tensor, Tensor]:
        """Per-query retrieved blocks ``(B, H, Nq, t)`` (``-1`` = none) and their landmark logits, in query chunks."""
        B, H, Nq, d = q.shape
        nb = lk.shape[2]
        lk = lk.repeat_interleave(H // lk.shape[1], dim=1)
        kk = nb if self.topk is None else min(self.topk, nb)
        sels, logits = [], []
        for c0 in range(0, Nq, self.chunk):
            c1 = min(Nq, c0 + self.chunk)
            s = torch.einsum("bhnd,bhcd->bhnc", q[:, :, c0:c1], lk) * d ** -0.5
            allowed = self._allowed(q_pos[c0:c1], nb, causal, q.device)[None, None] & lk_ok[:, None, None, :]
            sel = topk_blocks(s, kk, allowed=allowed)
            sels.append(sel)
            logits.append(s.gather(-1, sel.clamp(min=0)))
        return torch.cat(sels, 2), torch.cat(logits, 2)

    def grouped(self, q, k, v, lk, lk_ok, *, causal, key_padding_mask, q_pos):
        B, H, Nq, _ = q.shape
        sel, s = self.retrieve(q, lk, lk_ok, causal, q_pos)
        own = (q_pos // self.block).expand(B, H, Nq)[..., None]
        # Per (query, block) softmax partials; the own block keeps its log-sum-exp, a retrieved block's weight is its
        # landmark logit instead (the grouped softmax), then one exact merge.
        out, lse = pair_attention(q, k, v, torch.cat([own, sel], -1), k_block=self.block, causal=causal,
                                  key_padding_mask=key_padding_mask, q_pos=q_pos, chunk=self.chunk)
        has_keys = torch.isfinite(lse[..., 1:])  # a retrieved block whose keys are all padding carries no weight
        weight = torch.cat([lse[..., :1], torch.where((sel >= 0) & has_keys, s.to(lse.dtype),
                                                      torch.full_like(lse[..., 1:], float("-inf")))], -1)
        return merge_pairs(out, weight)[0].to(q.dtype)

    def grouped_reference(self, q, k, v, lk, lk_ok, *, causal, key_padding_mask, q_pos):
        # The grouped softmax of the paper written out densely: (Nq, Nk) logits, per-block log-sum-exps, landmark
        # logits, one outer softmax over own-block tokens and retrieved landmarks, landmark mass spread by block.
        B, H, Nq, d = q.shape
        Nk, b = k.shape[2], self.block
        G = H // k.shape[1]
        kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        l = torch.einsum("bhnd,bhmd->bhnm", q, kr) * d ** -0.5
        kb = torch.arange(Nk, device=q.device) // b
        own = q_pos // b
        ok = torch.ones_like(l, dtype=torch.bool) if key_padding_mask is None else key_padding_mask[:, None, None, :]
        ok = ok.expand_as(l)
        if causal:
            ok = ok & (torch.arange(Nk, device=q.device)[None, :] <= q_pos[:, None])
        onehot = F.one_hot(kb, math.ceil(Nk / b)).bool()  # (Nk, nb)
        lse = l[..., None].masked_fill(~(onehot & ok[..., None]), float("-inf")).logsumexp(-2)  # (B, H, Nq, nb)
        sel, s = self.retrieve(q, lk, lk_ok, causal, q_pos)
        retrieved = (sel[..., None] == torch.arange(lse.shape[-1], device=q.device)).any(-2)  # (B, H, Nq, nb)
        s_full = torch.einsum("bhnd,bhcd->bhnc", q, lk.repeat_interleave(G, 1)) * d ** -0.5
        own_tok = ok & (kb[None, :] == own[:, None])
        outer = torch.cat([l.masked_fill(~own_tok, float("-inf")), s_full.masked_fill(~retrieved, float("-inf"))], -1)
        empty = torch.isneginf(outer).all(-1, keepdim=True)  # nothing visible: output 0 (and finite gradients)
        w = torch.softmax(outer.masked_fill(empty, 0.0), -1) * ~empty
        w_tok, w_lm = w[..., :Nk], w[..., Nk:]
        lse_safe = torch.where(torch.isfinite(lse), lse, torch.zeros_like(lse))
        inner = torch.exp((l - lse_safe[..., kb]).masked_fill(~ok, float("-inf")))  # softmax within each block
        p = w_tok + w_lm[..., kb] * inner * (kb[None, :] != own[:, None])
        return (p @ vr).to(q.dtype)


# ================================================================================== S2-Attention (#250)


@register(
    "s2-attention", family="sparse", seed=True, catalog=250,
    paper="Efficient LLM Training and Serving with Heterogeneous Context Sharding among Attention Heads",
    arxiv="2407.17678",
    complexity="O(N b (l + N / (s b)) d): local blocks plus a 1/s strided shard per head",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=True, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, block=64, local_blocks=4, vert_stride=8, **_: (
        (0.5 if causal else 1.0) * 4.0 * batch * heads * n * head_dim
        * min(n, block * (local_blocks * (1 if causal else 2)) + n / vert_stride)),
    exact_when=dict(vert_stride=1),
    test_kwargs=dict(dim=32, heads=4, block=2, local_blocks=1, vert_stride=3),
    bench_kwargs=dict(block=64, local_blocks=4, vert_stride=8),
    summary="Sparsely-sharded attention: every head sees its local blocks plus a strided shard of the key blocks, "
            "offset per head so that the heads' shards together cover the whole context.",
)
class S2Attention(SparseMechanism):
    """S2-Attention (DKernel's local-stride pattern with heterogeneous heads).

    Args:
        block: tokens per block ``b``.
        local_blocks: key blocks at block distance ``< l`` are always kept (causal: the preceding ones).
        vert_stride: stride ``s`` of the shard: head ``h`` keeps key blocks ``c`` with
            ``(c + h * max(1, s // H) + 1) % s == 0``; ``s = 1`` keeps everything (dense).

    The heads' shards are offset from one another (heterogeneous), so their union covers every block when
    ``H * max(1, s // H) >= s``. Decoding keeps the full KV cache (DKernel's per-head cache reduction needs a
    per-head cache layout, which the shared ``KVCache`` does not have).
    """

    def __init__(self, dim: int, heads: int = 8, *, block: int = 64, local_blocks: int = 4, vert_stride: int = 8,
                 impl: str = "fast", **kwargs) -> None:
        super().__init__(dim, heads, impl=impl, **kwargs)
        _check_pos_int("block", block)
        _check_pos_int("local_blocks", local_blocks)
        _check_pos_int("vert_stride", vert_stride)
        self.block, self.local_blocks, self.vert_stride = block, local_blocks, vert_stride

    def _in_shard(self, kb: Tensor) -> Tensor:
        """``(H, ...)`` bool: key block ids ``kb`` in each head's strided shard."""
        step = max(1, self.vert_stride // self.heads)
        h = torch.arange(self.heads, device=kb.device).view(-1, *([1] * kb.dim()))
        return (kb[None] + h * step + 1) % self.vert_stride == 0

    def _keep_blocks(self, qb: Tensor, kb: Tensor, causal: bool) -> Tensor:
        """``(H, len(qb), len(kb))`` bool block pattern for query blocks ``qb`` and key blocks ``kb``."""
        d = qb[:, None] - kb[None, :]
        near = (d >= 0) & (d < self.local_blocks) if causal else d.abs() < self.local_blocks
        keep = near[None] | self._in_shard(kb)[:, None, :]
        if causal:
            keep = keep & (d >= 0)[None]
        return keep

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        offset = 0 if cache is None else cache.seq_len
        q, k, v = self.project(x, offset=offset)
        kpm = key_padding_mask
        if cache is not None:
            k, v, kpm = cache.append(k, v, key_padding_mask)
        return self.output(self.heads_out(q, k, v, causal=causal, key_padding_mask=kpm, hw=hw))

    def fast(self, q, k, v, *, causal, key_padding_mask, hw):
        Nq, Nk, b, dev = q.shape[2], k.shape[2], self.block, q.device
        nkb = math.ceil(Nk / b)
        q_pos = torch.arange(Nq, device=dev) + (Nk - Nq)  # absolute positions (bottom-right, as decoding)
        qb = q_pos // b
        keep = self._keep_blocks(torch.unique(qb), torch.arange(nkb, device=dev), causal)  # (H, nqb', nkb)
        t = int(keep.sum(-1).max())
        ids = torch.where(keep, torch.arange(nkb, device=dev), torch.full_like(keep, nkb, dtype=torch.long))
        ids = ids.sort(-1).values[..., :t]
        sel = torch.where(ids == nkb, torch.full_like(ids, -1), ids)[:, qb - qb[0]][None]  # (1, H, Nq, t)
        aligned = (Nk - Nq) % b == 0
        bq = b if aligned else 1  # after a decode step the query blocks no longer line up with the key blocks
        idx, q_keep = union_select(sel, bq)
        return block_sparse_attention(q, k, v, idx, q_block=bq, k_block=b, q_keep=None if aligned else q_keep,
                                      causal=causal, key_padding_mask=key_padding_mask)

    def reference(self, q, k, v, *, causal, key_padding_mask, hw):
        Nq, Nk, b, dev = q.shape[2], k.shape[2], self.block, q.device
        qb = (torch.arange(Nq, device=dev) + Nk - Nq) // b
        kb = torch.arange(Nk, device=dev) // b
        d = qb[:, None] - kb[None, :]
        near = (d >= 0) & (d < self.local_blocks) if causal else d.abs() < self.local_blocks
        step = max(1, self.vert_stride // self.heads)
        h = torch.arange(self.heads, device=dev)[:, None, None]
        shard = (kb[None, None, :] + h * step + 1) % self.vert_stride == 0
        keep = (near[None] | shard)[None]  # (1, H, Nq, Nk)
        return reference_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=keep)


# ================================================================================ CCA-Attention (#32)


@register(
    "cca-attention", family="sparse", seed=True, catalog=32,
    paper="Core Context Aware Attention for Long Context Language Modeling", arxiv="2412.12465",
    complexity="O(N (N/g + w + g) d)",
    caps=Caps(causal=True, bidirectional=False, dims=(1,), decode=False, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=True, group=16, window=1024, **_: (
        2.0 * batch * heads * n * head_dim * (min(n, n / group) + min(n, window + group))
        + 4.0 * batch * heads * n * head_dim),
    exact_when=dict(group=1),
    test_kwargs=dict(dim=32, heads=4, group=2, window=3),
    bench_kwargs=dict(group=16, window=256),
    summary="Globality-pooling (each group of g tokens merged into one core token, weighted by its last query's "
            "attention) plus locality-preserved attention over the window, fused in one softmax.",
)
class CoreContextAwareAttention(SparseMechanism):
    """Core Context Aware attention (Chen et al., ICML 2025), causal.

    Args:
        group: tokens per group ``g`` merged into one core token.
        window: local window ``w``: the most recent tokens are attended one by one.

    The earlier context is split into groups of ``g``; group ``p`` becomes a core token
    ``k~_p = sum_j a_j k_j``, ``v~_p = sum_j a_j v_j`` with ``a = softmax_j(q_last . k_j / sqrt(d))`` over the group
    (``q_last`` = the group's last query: its significance weights). Query ``i`` attends, in **one** softmax, to the
    core tokens of the ``P_i = floor((i + 1 - w) / g)`` groups entirely before its window and to every raw token
    from ``P_i g`` to ``i`` (the window plus the unfinished group), so every earlier token is covered exactly once.
    ``group=1`` makes every core token the token itself: exact causal attention.
    """

    def __init__(self, dim: int, heads: int = 8, *, group: int = 16, window: int = 1024, impl: str = "fast",
                 **kwargs) -> None:
        super().__init__(dim, heads, impl=impl, **kwargs)
        _check_pos_int("group", group)
        _check_pos_int("window", window)
        if self.kv_heads != heads:
            raise shape_error("kv_heads", f"equal to heads ({heads}): core tokens are pooled per query head",
                              self.kv_heads)
        self.group, self.window = group, window

    def core_tokens(self, q, k, v, key_padding_mask):
        """Core tokens ``(B, H, P, d)`` (keys, values), their validity ``(B, P)`` and visibility positions ``(P,)``."""
        B, H, N, d = q.shape
        g = self.group
        P = N // g
        qb = rearrange(q[:, :, : P * g], "b h (p s) d -> b h p s d", s=g)
        kb = rearrange(k[:, :, : P * g], "b h (p s) d -> b h p s d", s=g)
        vb = rearrange(v[:, :, : P * g], "b h (p s) d -> b h p s d", s=g)
        logits = torch.einsum("bhpd,bhpsd->bhps", qb[..., -1, :], kb) * d ** -0.5
        ok = torch.ones(B, P, g, dtype=torch.bool, device=q.device)
        if key_padding_mask is not None:
            ok = rearrange(key_padding_mask[:, : P * g], "b (p s) -> b p s", s=g)
        logits = logits.masked_fill(~ok[:, None], float("-inf"))
        valid = ok.any(-1)
        w = torch.softmax(logits.masked_fill(~valid[:, None, :, None], 0.0), -1) * valid[:, None, :, None]
        kc = torch.einsum("bhps,bhpsd->bhpd", w, kb)
        vc = torch.einsum("bhps,bhpsd->bhpd", w, vb)
        visible_from = (torch.arange(P, device=q.device) + 1) * g + self.window - 1  # first query that sees core p
        return kc, vc, valid, visible_from

    def _raw_start(self, N: int, device) -> Tensor:
        i = torch.arange(N, device=device)
        return ((i + 1 - self.window).clamp(min=0) // self.group) * self.group  # P_i * g

    def fast(self, q, k, v, *, causal, key_padding_mask, hw):
        N, dev = q.shape[2], q.device
        kc, vc, valid, visible_from = self.core_tokens(q, k, v, key_padding_mask)
        pos = torch.arange(N, device=dev)
        b = min(N, self.window + self.group)  # a query block's raw keys lie in its own and the previous key block
        nb = math.ceil(N / b)
        raw = block_sparse_attention(q, k, v, local_blocks(nb, nb, 1, 0, device=dev)[None, None], q_block=b,
                                     k_block=b, causal=True, key_padding_mask=key_padding_mask,
                                     key_lo=self._raw_start(N, dev)[None, None], return_lse=True)
        P = kc.shape[2]
        if P == 0:
            return raw[0]
        kblk = min(P, 256)
        ncb = math.ceil(P / kblk)
        qblk = min(N, 256)
        core = block_sparse_attention(q, kc, vc, torch.arange(ncb, device=dev).expand(1, 1, math.ceil(N / qblk), ncb),
                                      q_block=qblk, k_block=kblk, causal=True, q_pos=pos, k_pos=visible_from,
                                      k_valid=valid[:, None], return_lse=True)
        return _merge([raw, core], q.dtype)

    def reference(self, q, k, v, *, causal, key_padding_mask, hw):
        # One softmax over [core tokens ; raw tokens] with the paper's mask, written densely.
        N, dev = q.shape[2], q.device
        kc, vc, valid, visible_from = self.core_tokens(q, k, v, key_padding_mask)
        i = torch.arange(N, device=dev)[:, None]
        pool_mask = i >= visible_from[None, :]  # (N, P)
        j = torch.arange(N, device=dev)[None, :]
        window_mask = (j <= i) & (j >= self._raw_start(N, dev)[:, None])  # (N, N)
        keep = torch.cat([pool_mask, window_mask], -1)[None, None]
        kpm = None
        if key_padding_mask is not None or not bool(valid.all()):
            kk = key_padding_mask
            if kk is None:
                kk = torch.ones(q.shape[0], N, dtype=torch.bool, device=dev)
            kpm = torch.cat([valid, kk], -1)
        return reference_attention(q, torch.cat([kc, k], 2), torch.cat([vc, v], 2), attn_mask=keep,
                                   key_padding_mask=kpm)


# ============================================================================ Dynamic Mask Attention (#244)


@register(
    "dma-dynamic-mask", family="sparse", seed=True, catalog=244,
    paper="Trainable Dynamic Mask Sparse Attention", arxiv="2508.02124",
    complexity="O(N (w + b) d) attention + O(N^2 / b) key ranking",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=False, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, keep=256, block=64, **_: (
        4.0 * batch * heads * n * min(n, (keep or n) + block) * head_dim),
    exact_when=None,
    test_kwargs=dict(dim=32, heads=4, keep=3, block=2),
    bench_kwargs=dict(keep=256, block=64),
    summary="Content-aware dynamic mask from the values: a per-key bias A * softplus(W v) both ranks the keys (each "
            "query block keeps the top-w earlier keys plus its own block) and is added to the kept logits.",
)
class DynamicMaskAttention(SparseMechanism):
    """Dynamic Mask Attention (DMA, Shi et al., 2025; the attention of the Doge models).

    Args:
        keep: keys kept per query block by the dynamic mask (the paper's ``window_size``); ``None`` = all.
        block: query block ``b``; each query always keeps its own block (position-aware part).

    For every key ``j`` and KV head ``h`` a content bias is computed from the value projections,
    ``delta_hj = A_h * softplus((W_dt v_j)_h)``. The mask keeps, for each query block, the ``keep`` keys with the
    largest ``delta`` among the keys before the block (bidirectional: outside the block) together with the block
    itself; attention is ``softmax(q k / sqrt(d) + delta)`` over the kept keys. The ranking is discrete (detached,
    as in the official ``topk_mask``); ``A`` and ``W_dt`` learn through the bias added to the logits.
    """

    def __init__(self, dim: int, heads: int = 8, *, keep: int | None = 256, block: int = 64, impl: str = "fast",
                 **kwargs) -> None:
        super().__init__(dim, heads, impl=impl, **kwargs)
        _check_pos_int("keep", keep, allow_none=True)
        _check_pos_int("block", block)
        self.keep, self.block = keep, block
        self.dt_proj = nn.Linear(self.kv_heads * self.head_dim, self.kv_heads, bias=False)
        self.A = nn.Parameter(torch.randn(self.kv_heads) * 0.02)

    def delta(self, v: Tensor) -> Tensor:
        """Per-key dynamic bias ``(B, Hkv, N)`` from the values."""
        dt = self.dt_proj(rearrange(v, "b h n d -> b n (h d)"))
        return rearrange(self.A.to(v.dtype) * F.softplus(dt), "b n h -> b h n")

    def _candidates(self, delta: Tensor, causal: bool, key_padding_mask, nq: int):
        """Top-``keep`` keys per query block ``(B, Hkv, nqb, k)`` (``-1`` = none)."""
        B, H, N = delta.shape
        b = self.block
        nqb = math.ceil(nq / b)
        j = torch.arange(N, device=delta.device)
        start = torch.arange(nqb, device=delta.device) * b + (N - nq)
        blk_of = (j[None, :] - (N - nq)).div(b, rounding_mode="floor")
        own = torch.arange(nqb, device=delta.device)[:, None]
        allowed = (j[None, :] < start[:, None]) if causal else (blk_of != own)
        allowed = allowed[None, None]
        if key_padding_mask is not None:
            allowed = allowed & key_padding_mask[:, None, None, :]
        k = N if self.keep is None else min(self.keep, N)
        return topk_blocks(delta[:, :, None, :].expand(B, H, nqb, N), k, allowed=allowed)

    def fast(self, q, k, v, *, causal, key_padding_mask, hw):
        B, Nq, Nk, dev = q.shape[0], q.shape[2], k.shape[2], q.device
        b = self.block
        delta = self.delta(v)
        top = self._candidates(delta, causal, key_padding_mask, Nq)
        nqb = top.shape[2]
        own = torch.arange(nqb, device=dev)[:, None] * b + torch.arange(b, device=dev) + (Nk - Nq)
        own = torch.where(own < Nk, own, torch.full_like(own, -1)).expand(B, self.kv_heads, nqb, b)
        idx = torch.cat([top, own], -1)  # token ids (key "blocks" of one token)
        bias = delta.gather(-1, idx.clamp(min=0).flatten(2)).view_as(idx) * (idx >= 0)
        return block_sparse_attention(q, k, v, idx, q_block=b, k_block=1, causal=causal,
                                      key_padding_mask=key_padding_mask, block_bias=bias)

    def reference(self, q, k, v, *, causal, key_padding_mask, hw):
        Nq, Nk, dev = q.shape[2], k.shape[2], q.device
        delta = self.delta(v)
        top = self._candidates(delta, causal, key_padding_mask, Nq)  # (B, Hkv, nqb, k)
        qb = torch.arange(Nq, device=dev) // self.block
        kb = (torch.arange(Nk, device=dev) - (Nk - Nq)).div(self.block, rounding_mode="floor")
        chosen = (top[:, :, qb, :, None] == torch.arange(Nk, device=dev)).any(-2)  # (B, Hkv, Nq, Nk)
        keep = chosen | (kb[None, :] == qb[:, None])
        G = self.heads // self.kv_heads
        add = (delta[:, :, None, :].expand_as(keep)).masked_fill(~keep, float("-inf")).repeat_interleave(G, 1)
        return reference_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=add)


# ==================================================================== SSA: stochastic key subsampling (#35)


@register(
    "ssa-info-pathways", family="sparse", seed=True, catalog=35,
    paper="The Information Pathways Hypothesis: Transformers are Dynamic Self-Ensembles", arxiv="2306.01705",
    complexity="training O(N^2 d / s) (subsampling factor s); inference O(N^2 d) dense",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=False, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, subsample=4, **_: dense_flops(batch, n, heads, head_dim,
                                                                                        causal) / subsample,
    exact_when=dict(subsample=1),
    test_kwargs=dict(dim=32, heads=4, block=2, subsample=2),
    bench_kwargs=dict(block=64, subsample=4),
    summary="Stochastically subsampled self-attention: in training each query block attends its own block plus a "
            "locally biased random 1/s of the other key blocks (resampled per step); dense at inference.",
)
class StochasticSubsampledAttention(SparseMechanism):
    """SSA (Hussain, Zaki, Subramanian, KDD 2023): structured, locally biased key subsampling during training.

    Args:
        block: key/query block ``b`` (the sampling unit).
        subsample: factor ``s``: a query block keeps ``ceil(n / s)`` of its ``n`` other admissible key blocks.
        locality: exponent ``alpha`` of the sampling weight ``|i - c|^-alpha`` (locally biased; 0 = uniform).
        seed: seed of the sampling; the sample is a fixed function of ``(seed, step, head, query block, key block)``.

    In training mode (``module.train()``) every query block attends its own block and a sample of the other key
    blocks drawn without replacement by Gumbel top-k with weights ``|i - c|^-alpha`` (causal: earlier blocks only);
    in eval mode it is dense softmax attention. The sample changes when ``step`` changes: call :meth:`resample`
    (or set ``module.step``) once per training step -- a forward never changes it, so a step's forward and
    backward see the same pathways. The sampling is discrete: gradients flow through the kept keys only.
    """

    def __init__(self, dim: int, heads: int = 8, *, block: int = 64, subsample: int = 4, locality: float = 1.0,
                 seed: int = 0, impl: str = "fast", **kwargs) -> None:
        super().__init__(dim, heads, impl=impl, **kwargs)
        _check_pos_int("block", block)
        _check_pos_int("subsample", subsample)
        if not locality >= 0:
            raise shape_error("locality", "a non-negative exponent", repr(locality))
        self.block, self.subsample, self.locality, self.seed = block, subsample, float(locality), seed
        self.step = 0

    def resample(self) -> None:
        """Draw new pathways for the next forward (call once per training step)."""
        self.step += 1

    def sample(self, B: int, N: int, causal: bool, key_padding_mask, device) -> Tensor:
        """Key blocks ``(B, H, nb, t)`` per query block: its own block first, then the sampled ones (-1 = none)."""
        b, H = self.block, self.heads
        nb = math.ceil(N / b)
        i = torch.arange(nb, device=device)
        c = torch.arange(nb, device=device)
        upper = (_valid_len(key_padding_mask, B, N, device) + b - 1) // b  # blocks holding kept keys
        admissible = (c[None, :] < i[:, None]) if causal else (c[None, :] != i[:, None])
        admissible = admissible[None] & (c[None, None, :] < upper[:, None, None])  # (B, nb, nb)
        n_adm = admissible.sum(-1)
        k = (n_adm + self.subsample - 1) // self.subsample  # (B, nb)
        u = _hash_uniform(torch.tensor(self.seed, device=device), torch.tensor(self.step, device=device),
                          torch.arange(H, device=device)[:, None, None], i[None, :, None], c[None, None, :])
        dist = (i[:, None] - c[None, :]).abs().clamp(min=1).to(torch.float64)
        gumbel = -torch.log(-torch.log(u.clamp(1e-12, 1 - 1e-12)))
        score = (gumbel - self.locality * torch.log(dist))[None].expand(B, H, nb, nb)  # Gumbel top-k = weighted sample
        order = torch.sort(score.masked_fill(~admissible[:, None], float("-inf")), dim=-1, descending=True,
                           stable=True).indices
        kmax = max(1, int(k.max()))
        order = order[..., :kmax]
        rank = torch.arange(kmax, device=device)
        chosen = torch.where(rank < k[:, None, :, None], order, torch.full_like(order, -1))
        return torch.cat([i.expand(B, H, nb)[..., None], chosen], -1)

    def fast(self, q, k, v, *, causal, key_padding_mask, hw):
        if not self.training or self.subsample == 1:
            return attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
        idx = dedup_blocks(self.sample(q.shape[0], q.shape[2], causal, key_padding_mask, q.device))
        return block_sparse_attention(q, k, v, idx, q_block=self.block, k_block=self.block, causal=causal,
                                      key_padding_mask=key_padding_mask)

    def reference(self, q, k, v, *, causal, key_padding_mask, hw):
        if not self.training or self.subsample == 1:
            return reference_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask)
        N = q.shape[2]
        sel = self.sample(q.shape[0], N, causal, key_padding_mask, q.device)  # (B, H, nb, t)
        blk = torch.arange(N, device=q.device) // self.block
        keep = (sel[:, :, blk, :, None] == blk).any(-2)  # (B, H, N, N): key's block was drawn for query's block
        return reference_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=keep)


# ============================================================================== All-or-Here Attention (#170)


@register(
    "aha-all-or-here", family="sparse", seed=True, catalog=170,
    paper="Learning When Not to Attend Globally (All-or-Here Attention)", arxiv=None,
    complexity="O(N w d + N_global N d), N_global = tokens-heads routed to full attention",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=False, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, window=256, global_fraction=0.1, **_: (
        (0.5 if causal else 1.0) * 4.0 * batch * heads * n * head_dim
        * (min(n, (window or n) * (1 if causal else 2)) + global_fraction * n)),
    exact_when=dict(window=None),
    test_kwargs=dict(dim=32, heads=4, window=3),
    bench_kwargs=dict(window=256),
    conformance_skip={"gradcheck": "the router is trained through a surrogate gradient (the chosen branch scaled by "
                                   "p / stopgrad(p)); the forward is piecewise constant in the router, so finite "
                                   "differences cannot see it. The q/k/v gradients are checked against the dense "
                                   "reference in tests/mechanisms/test_sparse.py."},
    summary="A binary router per head and token chooses full attention or sliding-window attention; only the "
            "routed-global token-heads pay for attention over the whole context.",
)
class AllOrHereAttention(SparseMechanism):
    """All-or-Here attention (Luo et al., 2025).

    Args:
        window: sliding window of the "here" branch (causal: ``0 <= i - j < w``; bidirectional: ``|i - j| < w``);
            ``None`` = unbounded (then both branches are full attention: exact softmax).
        threshold: a token-head goes global when ``sigmoid(router(x))`` exceeds it.

    ``p_hi = sigmoid(w_h . x_i + b_h)``; head ``h`` of token ``i`` uses full attention when ``p_hi > threshold``,
    else local attention. The routing decision is binary (hard) in the forward pass; the router learns through the
    chosen branch scaled by ``p / stopgrad(p)`` (``p`` the probability of the chosen branch), which leaves the
    output unchanged and gives the router the gradient ``<dL/dy, y> / p`` of the branch it picked.
    """

    def __init__(self, dim: int, heads: int = 8, *, window: int | None = 256, threshold: float = 0.5,
                 impl: str = "fast", **kwargs) -> None:
        super().__init__(dim, heads, impl=impl, **kwargs)
        _check_pos_int("window", window, allow_none=True)
        if not 0.0 < threshold < 1.0:
            raise shape_error("threshold", "a probability in (0, 1)", repr(threshold))
        self.window, self.threshold = window, threshold
        self.router = nn.Linear(dim, heads)
        nn.init.normal_(self.router.weight, std=dim ** -0.5)
        nn.init.zeros_(self.router.bias)

    def route(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(hard (B, H, N) bool: global?, scale (B, H, N, 1): p / stopgrad(p) of the chosen branch)``."""
        p = torch.sigmoid(self.router(x)).transpose(1, 2)
        hard = p > self.threshold
        chosen = torch.where(hard, p, 1 - p)
        return hard, (chosen / chosen.detach())[..., None]

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        q, k, v = self.project(x, hw=hw)
        hard, scale = self.route(x)
        fn = self.fast if self.impl == "fast" else self.reference
        return self.output(fn(q, k, v, hard, causal=causal, key_padding_mask=key_padding_mask) * scale)

    def fast(self, q, k, v, hard, *, causal, key_padding_mask):
        B, H, N, d = q.shape
        out = _local_attention(q, k, v, self.window, causal=causal, key_padding_mask=key_padding_mask)
        if self.window is None or not bool(hard.any()):
            return out
        # group-by-assignment: global token-heads first (in position order), attend every key, scatter back
        perm, _ = sort_by_group((~hard).long())
        m = int(hard.sum(-1).max())
        sel = perm[..., :m]
        sel = torch.where(hard.gather(-1, sel), sel, torch.full_like(sel, -1))
        qg = permute(q, sel)
        kb = 256
        nkb = math.ceil(N / kb)
        qb = min(m, 64)
        og = block_sparse_attention(qg, k, v, torch.arange(nkb, device=q.device).expand(1, 1, math.ceil(m / qb), nkb),
                                    q_block=qb, k_block=kb, causal=causal, key_padding_mask=key_padding_mask,
                                    q_pos=sel.clamp(min=0))
        glob = unpermute(og, sel, N)
        return torch.where(hard[..., None], glob, out)

    def reference(self, q, k, v, hard, *, causal, key_padding_mask):
        N = q.shape[2]
        i = torch.arange(N, device=q.device)
        near = (i[:, None] - i[None, :]).abs() < (self.window or N)
        keep = hard[..., None] | near  # global rows see everything, the others their window
        return reference_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=keep)


# ============================================================================== MRA attention (#184)


@register(
    "mra-attention", family="sparse", seed=True, catalog=184,
    paper="Multi Resolution Analysis (MRA) for Approximate Self-Attention", arxiv="2207.10284",
    complexity="O(N r b d + (N/b)^2 d): r high-resolution blocks per row, low resolution elsewhere",
    caps=Caps(causal=False, bidirectional=True, dims=(1,), decode=False, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, block=32, blocks_per_row=4, **_: (
        4.0 * batch * heads * n * min(n, block * (blocks_per_row or n)) * head_dim
        + 4.0 * batch * heads * (n / block) ** 2 * head_dim),
    exact_when=dict(blocks_per_row=None),
    test_kwargs=dict(dim=32, heads=4, block=2, blocks_per_row=2),
    bench_kwargs=dict(block=32, blocks_per_row=4),
    summary="Two resolutions: block-averaged (low-resolution) scores everywhere, exact token scores in the block "
            "pairs with the highest low-resolution scores (a global budget), one normalisation over both.",
)
class MRAAttention(SparseMechanism):
    """MRA-2 attention (Zeng et al., ICML 2022).

    Args:
        block: block size ``b`` of the low resolution (32 in the paper).
        blocks_per_row: high-resolution budget: ``r`` times the number of query blocks, chosen globally per head
            among all block pairs by low-resolution score; ``None`` = every pair (exact softmax attention).
        mode: ``"full"`` (MRA-2: low resolution fills the unselected blocks) or ``"sparse"`` (MRA-2-s: they are
            dropped).
        diagonal: the diagonal block band of this width is always refined (the paper's diagonal prior).

    With block means ``Q^_I``, ``K^_J``, ``V^_J`` over kept tokens, counts ``c_J`` and
    ``L_IJ = Q^_I . K^_J / sqrt(d)``::

        y_i = [ sum_{J sel} sum_{j in J} e^{l_ij} v_j + sum_{J not sel} c_J e^{L_IJ} V^_J ]
              / [ sum_{J sel} sum_{j in J} e^{l_ij}     + sum_{J not sel} c_J e^{L_IJ} ]

    i.e. an unselected block acts as ``c_J`` copies of one averaged token. The fast path computes the two parts
    as partials (gathered high-resolution blocks; low-resolution attention over block means with bias ``log c_J``)
    and merges them exactly. Selection is discrete (no gradient); in ``"full"`` mode gradients reach q/k/v
    through both resolutions, as in the official implementation.
    """

    def __init__(self, dim: int, heads: int = 8, *, block: int = 32, blocks_per_row: int | None = 4,
                 mode: str = "full", diagonal: int = 1, impl: str = "fast", **kwargs) -> None:
        super().__init__(dim, heads, impl=impl, **kwargs)
        _check_pos_int("block", block)
        _check_pos_int("blocks_per_row", blocks_per_row, allow_none=True)
        if mode not in ("full", "sparse"):
            raise shape_error("mode", "'full' or 'sparse'", repr(mode))
        if not isinstance(diagonal, int) or diagonal < 0:
            raise shape_error("diagonal", "a non-negative integer", repr(diagonal))
        self.block, self.blocks_per_row, self.mode, self.diagonal = block, blocks_per_row, mode, diagonal

    def low_resolution(self, q, k, v, key_padding_mask):
        """Block means ``Q^, K^, V^ (B, H, nb, d)``, counts ``(B, 1, nb)``, low-resolution logits ``(B, H, nb, nb)``."""
        G = self.heads // self.kv_heads
        valid = None if key_padding_mask is None else key_padding_mask[:, None]
        qh = pool_blocks(q, self.block, valid=valid)
        kh = pool_blocks(k, self.block, valid=valid).repeat_interleave(G, 1)
        vh = pool_blocks(v, self.block, valid=valid).repeat_interleave(G, 1)
        kept = torch.ones(q.shape[0], q.shape[2], device=q.device) if key_padding_mask is None \
            else key_padding_mask.to(q.dtype)
        count = rearrange(pad_to(kept, self.block, 1), "b (n s) -> b n s", s=self.block).sum(-1)[:, None]
        logits = qh @ kh.transpose(-1, -2) * q.shape[-1] ** -0.5
        return qh, kh, vh, count.to(q.dtype), logits

    def select(self, logits: Tensor, count: Tensor) -> Tensor:
        """High-resolution block pairs ``(B, H, nb, nb)`` bool: the global top ``r * (query blocks)`` per head."""
        B, H, nb, _ = logits.shape
        nonempty = count[:, 0] > 0  # (B, nb)
        if self.blocks_per_row is None:  # every pair with a kept key (padded queries still attend, like softmax)
            return nonempty[:, None, None, :].expand(B, H, nb, nb)
        pair_ok = nonempty[:, None, :, None] & nonempty[:, None, None, :]  # padded query blocks use no budget
        lg = logits.detach()
        row_max = lg.masked_fill(~pair_ok, float("-inf")).amax(-1, keepdim=True)
        score = lg - torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
        I = torch.arange(nb, device=lg.device)
        prior = (I[:, None] - I[None, :]).abs() <= self.diagonal // 2 if self.diagonal else torch.zeros(
            nb, nb, dtype=torch.bool, device=lg.device)
        score = torch.where(prior, torch.full_like(score, 1e30), score).masked_fill(~pair_ok, float("-inf"))
        budget = (self.blocks_per_row * nonempty.sum(-1)).clamp(max=nb * nb)  # (B,)
        order = torch.sort(score.flatten(2), dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(nb * nb, device=lg.device).expand_as(order))
        chosen = (rank < budget[:, None, None]).view(B, H, nb, nb)
        return chosen & pair_ok

    def fast(self, q, k, v, *, causal, key_padding_mask, hw):
        N, b = q.shape[2], self.block
        qh, kh, vh, count, logits = self.low_resolution(q, k, v, key_padding_mask)
        chosen = self.select(logits, count)
        nb = chosen.shape[-1]
        ids = torch.where(chosen, torch.arange(nb, device=q.device), torch.full_like(chosen, nb, dtype=torch.long))
        ids = ids.sort(-1).values
        t = max(1, int(chosen.sum(-1).max()))
        idx = torch.where(ids[..., :t] == nb, torch.full_like(ids[..., :t], -1), ids[..., :t])
        high = block_sparse_attention(q, k, v, idx, q_block=b, k_block=b, key_padding_mask=key_padding_mask,
                                      return_lse=True)
        if self.mode == "sparse":
            return high[0]
        bias = torch.log(count)[:, :, None, :].expand_as(logits).masked_fill(chosen, float("-inf"))
        lo, lo_lse = attention(qh, kh, vh, attn_mask=bias, return_lse=True)  # block-mean queries, one row per block
        lo = lo.repeat_interleave(b, 2)[:, :, :N]
        lo_lse = lo_lse.repeat_interleave(b, 2)[:, :, :N]
        return _merge([high, (lo, lo_lse)], q.dtype)

    def reference(self, q, k, v, *, causal, key_padding_mask, hw):
        # The MRA-2 formula written densely: (N + nb) "keys" -- every token, then every block mean.
        N, d, b = q.shape[2], q.shape[-1], self.block
        G = self.heads // self.kv_heads
        qh, kh, vh, count, logits = self.low_resolution(q, k, v, key_padding_mask)
        chosen = self.select(logits, count)
        blk = torch.arange(N, device=q.device) // b
        kr, vr = k.repeat_interleave(G, 1), v.repeat_interleave(G, 1)
        tok = (q @ kr.transpose(-1, -2)) * d ** -0.5  # (B, H, N, N)
        ok = chosen[:, :, blk][:, :, :, blk]
        if key_padding_mask is not None:
            ok = ok & key_padding_mask[:, None, None, :]
        tok = tok.masked_fill(~ok, float("-inf"))
        if self.mode == "full":
            lowl = (logits + torch.log(count)[:, :, None, :]).masked_fill(chosen, float("-inf"))[:, :, blk]
            allk = torch.cat([tok, lowl], -1)
            allv = torch.cat([vr, vh], 2)
        else:
            allk, allv = tok, vr
        empty = torch.isneginf(allk).all(-1, keepdim=True)
        p = torch.softmax(allk.masked_fill(empty, 0.0), -1) * ~empty
        return (p @ allv).to(q.dtype)


# ============================================================================ Superlinear attention (#66)


@register(
    "superlinear-attn", family="sparse", seed=True, catalog=66,
    paper="Superlinear Multi-Step Attention", arxiv=None,
    complexity="O(L^{3/2} d) with span ~ sqrt(L) (N = 2 steps: span search + span attention)",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=True, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=True, span=64, topk=4, **_: (
        2.0 * batch * heads * n * math.ceil(n / span) * head_dim
        + 4.0 * batch * heads * n * min(n, ((topk if topk != "all" else n) + 1) * span) * head_dim),
    exact_when=dict(topk="all"),
    test_kwargs=dict(dim=32, heads=4, span=3, topk=1),
    bench_kwargs=dict(span=64, topk=4),
    summary="Two-step (jump-search-like) attention: span search scores every span by its boundary key and keeps "
            "the top-k spans, then standard attention runs over the selected spans plus the query's own span.",
)
class SuperlinearAttention(SparseMechanism):
    """Superlinear multi-step attention, the paper's N = 2 baseline (span search + span attention).

    Args:
        span: span length ``s`` (``~ sqrt(L)`` gives the O(L^{3/2}) instantiation).
        topk: spans selected per query by the span search; ``"all"`` = every span (exact softmax attention).
        chunk: queries whose span scores are held at once.

    Step 1, span search (the jump of jump search): query ``i`` scores every admissible span ``c`` by its boundary
    key -- the last (kept) key of the span, ``s_ic = q_i . k_last(c) / sqrt(d)`` -- and keeps the ``topk`` best
    (causal: complete spans before its own). Step 2, span attention: standard softmax attention restricted to the
    selected spans plus the query's own span (causal-masked). Every position can be selected (structural
    non-exclusion); cost ``O(L (L/s + (k + 1) s) d)``. The selection is discrete; the boundary keys are ordinary
    keys, trained through the attention. Decoding keeps the keys in the ``KVCache``; spans are read from it.
    """

    def __init__(self, dim: int, heads: int = 8, *, span: int = 64, topk: int | str = 4, chunk: int = 1024,
                 impl: str = "fast", **kwargs) -> None:
        super().__init__(dim, heads, impl=impl, **kwargs)
        _check_pos_int("span", span)
        _check_pos_int("chunk", chunk)
        if topk != "all":
            _check_pos_int("topk", topk)
        self.span, self.topk, self.chunk = span, topk, chunk

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        offset = 0 if cache is None else cache.seq_len
        q, k, v = self.project(x, offset=offset)
        kpm = key_padding_mask
        if cache is not None:
            k, v, kpm = cache.append(k, v, key_padding_mask)
        return self.output(self.heads_out(q, k, v, causal=causal, key_padding_mask=kpm, hw=hw))

    def search(self, q: Tensor, k: Tensor, causal: bool, key_padding_mask: Tensor | None) -> Tensor:
        """Step 1: per-query spans ``(B, H, Nq, 1 + k')``: the own span, then the selected ones (-1 = none)."""
        B, H, Nq, d = q.shape
        Nk, s, dev = k.shape[2], self.span, q.device
        valid = None if key_padding_mask is None else key_padding_mask[:, None]
        boundary = pool_blocks(k.detach(), s, valid=valid, mode="last").repeat_interleave(H // k.shape[1], 1)
        has_key = torch.ones(B, math.ceil(Nk / s), dtype=torch.bool, device=dev) if key_padding_mask is None else \
            rearrange(pad_to(key_padding_mask, s, 1, False), "b (n t) -> b n t", t=s).any(-1)
        ns = boundary.shape[2]
        kk = ns if self.topk == "all" else min(self.topk, ns)
        own = (torch.arange(Nq, device=dev) + Nk - Nq) // s
        c = torch.arange(ns, device=dev)
        out = []
        for c0 in range(0, Nq, self.chunk):
            c1 = min(Nq, c0 + self.chunk)
            score = torch.einsum("bhnd,bhcd->bhnc", q[:, :, c0:c1].detach(), boundary) * d ** -0.5
            o = own[c0:c1, None]
            allowed = (c[None, :] < o) if causal else (c[None, :] != o)
            sel = topk_blocks(score, kk, allowed=allowed[None, None] & has_key[:, None, None, :])
            out.append(torch.cat([o.expand(B, H, -1, 1), sel], -1))
        return torch.cat(out, 2)

    def fast(self, q, k, v, *, causal, key_padding_mask, hw):
        sel = self.search(q, k, causal, key_padding_mask)
        out, lse = pair_attention(q, k, v, sel, k_block=self.span, causal=causal, key_padding_mask=key_padding_mask,
                                  chunk=self.chunk)
        return merge_pairs(out, lse)[0].to(q.dtype)  # step 2: one softmax over the union of the spans

    def reference(self, q, k, v, *, causal, key_padding_mask, hw):
        sel = self.search(q, k, causal, key_padding_mask)
        kspan = torch.arange(k.shape[2], device=q.device) // self.span
        keep = (sel[..., None, :] == kspan[:, None]).any(-1)  # (B, H, Nq, Nk)
        return reference_attention(q, k, v, causal=causal, key_padding_mask=key_padding_mask, attn_mask=keep)
