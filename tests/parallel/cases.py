"""Checks that run on every rank of a process group (or on one process without a group, P = 1).

Each case builds the *full* inputs from a seed on every rank, computes the single-process answer with
:func:`attnlab.ops.attention` (or ``mha``) on the full sequence, runs the distributed method on this rank's share
and compares this rank's share of outputs and gradients. A case raises ``AssertionError`` on a mismatch.
``run_cases`` is what the spawned ranks execute; it returns ``{case name: None or the failure text}``.
"""

from __future__ import annotations

import gc
import traceback
import types

import torch
import torch.distributed as dist

import attnlab
from attnlab import UnsupportedError
from attnlab.mechanisms import KVCache
from attnlab.ops import attention
from attnlab.parallel import (comm_stats, gather_sequence, layout_segments, ring_attention, shard_sequence,
                              tree_attention)

F64 = dict(atol=1e-10, rtol=1e-9)
F32 = dict(atol=2e-5, rtol=1e-4)


def _randn(g: torch.Generator, *shape, dtype=torch.float64) -> torch.Tensor:
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype)


def _padding(batch: int, n: int) -> torch.Tensor:
    """Sequence 0 padded at the end, sequence 1 at the front (its first queries then see no key under causal)."""
    mask = torch.ones(batch, n, dtype=torch.bool)
    mask[0, n - max(1, n // 3):] = False
    if batch > 1:
        mask[1, : min(2, n - 1)] = False
    return mask


def _finite(t: torch.Tensor) -> torch.Tensor:
    # Empty rows have lse = -inf; keep them out of the loss (their gradient is 0 either way).
    return torch.where(torch.isfinite(t), t, torch.zeros_like(t))


def _share_fn(rank: int, world: int, layout: str, lengths: list[int] | None):
    """x -> this rank's share along ``dim``: the layout's split, or explicit contiguous ``lengths``."""
    if lengths is None:
        return lambda x, dim: shard_sequence(x, rank=rank, world=world, layout=layout, dim=dim)
    start = sum(lengths[:rank])
    return lambda x, dim: x.narrow(dim, start, lengths[rank])


def _close(a, b, what, tol=F64):
    torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{what}: {m}")


def _ring(rank, world, *, causal, layout="zigzag", n=None, lengths=None, dtype=torch.float64, pad=True, seed=0,
          heads=(4, 2), dims=(8, 6), chunks=(3, 4), tol=F64):
    """ring_attention on this rank's share == attention on the full sequence: out, lse, dq, dk, dv."""
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths) if lengths is not None else n
    B, (Hq, Hkv), (D, Dv) = 2, heads, dims
    q, k = _randn(g, B, Hq, n, D), _randn(g, B, Hkv, n, D)
    v = _randn(g, B, Hkv, n, Dv)
    mask = _padding(B, n) if pad else None
    g_out, g_lse = _randn(g, B, Hq, n, Dv), _randn(g, B, Hq, n)
    full = [t.requires_grad_() for t in (q, k, v)]
    out, lse = attention(*full, causal=causal, key_padding_mask=mask, return_lse=True)
    ref_grads = torch.autograd.grad((out * g_out).sum() + (_finite(lse) * g_lse).sum(), full)

    share = _share_fn(rank, world, layout, lengths)
    local = [share(t.detach(), 2).to(dtype).requires_grad_() for t in full]
    o, l = ring_attention(*local, causal=causal, key_padding_mask=None if mask is None else share(mask, 1),
                          layout=layout, return_lse=True, q_chunk=chunks[0], k_chunk=chunks[1])
    grads = torch.autograd.grad((o * share(g_out, 2).to(dtype)).sum() + (_finite(l) * share(g_lse, 2)).sum(), local)
    assert o.dtype == dtype and o.shape == share(out, 2).shape
    _close(o.double(), share(out, 2).detach(), f"rank {rank} output", tol)
    _close(l.double(), share(lse, 2).detach(), f"rank {rank} log-sum-exp", tol)
    for name, got, ref in zip("qkv", grads, ref_grads):
        _close(got.double(), share(ref, 2), f"rank {rank} d{name}", tol)


def ring_bidirectional_zigzag(rank, world):
    _ring(rank, world, causal=False, n=4 * world + 3)


def ring_causal_zigzag(rank, world):
    _ring(rank, world, causal=True, n=4 * world + 3)


def ring_causal_zigzag_even(rank, world):
    _ring(rank, world, causal=True, n=6 * world, heads=(3, 3), dims=(5, 5), pad=False)


def ring_causal_zigzag_tiny(rank, world):
    # N = P + 1 < 2P: some chunks are empty and some ranks hold a single token.
    _ring(rank, world, causal=True, n=world + 1)


def ring_causal_contiguous_uneven(rank, world):
    _ring(rank, world, causal=True, layout="contiguous", lengths=[5, 1, 7, 2][:world] if world > 1 else [9])


def ring_bidirectional_contiguous_empty_share(rank, world):
    _ring(rank, world, causal=False, layout="contiguous", lengths=[4, 0, 6, 3][:world] if world > 1 else [7])


def ring_causal_float32_default_chunks(rank, world):
    _ring(rank, world, causal=True, n=40 * world + 5, dtype=torch.float32, heads=(4, 1), dims=(16, 16),
          chunks=(512, 1024), tol=F32)


def ring_bfloat16_forward(rank, world):
    """bf16 shares: finite and within bf16 error of the float64 answer."""
    g = torch.Generator().manual_seed(3)
    n = 8 * world + 1
    q, k, v = (_randn(g, 1, 2, n, 16) for _ in range(3))
    mask = _padding(1, n)
    ref = attention(q, k, v, causal=True, key_padding_mask=mask)
    share = _share_fn(rank, world, "zigzag", None)
    o = ring_attention(*(share(t, 2).bfloat16() for t in (q, k, v)), causal=True, key_padding_mask=share(mask, 1))
    assert o.dtype == torch.bfloat16 and torch.isfinite(o).all(), f"rank {rank}: bf16 output not finite"
    _close(o.double(), share(ref, 2), f"rank {rank} bf16 output", dict(atol=3e-2, rtol=3e-2))


def ring_comm_volume(rank, world):
    """Forward: P - 1 hops of this rank's K+V (and mask) block; backward adds P - 1 K/V hops and P dK/dV hops."""
    B, H, n, D = 1, 2, 4 * world, 8
    q, k, v = (torch.randn(B, H, n // world, D, dtype=torch.float64, requires_grad=True) for _ in range(3))
    kv_bytes = 2 * k.numel() * k.element_size()
    with comm_stats() as fwd:
        o = ring_attention(q, k, v, causal=True)
    with comm_stats() as bwd:
        o.sum().backward()
    assert fwd["messages"] == 2 * (world - 1), f"rank {rank}: {fwd} forward, expected 2 (P - 1) messages (K, V)"
    p2p = fwd["bytes_sent"] - 9 * 8 * (world > 1)  # minus the all-gather of nine int64 shape fields
    assert p2p == (world - 1) * kv_bytes, f"rank {rank}: forward sent {p2p} bytes, expected {(world - 1) * kv_bytes}"
    # The dK/dV accumulators are float64 here, like K/V: 2P - 1 blocks leave each rank in backward.
    assert bwd["bytes_sent"] == (2 * world - 1) * kv_bytes * (world > 1), f"rank {rank}: backward sent {bwd}"


def ring_mismatched_calls_raise_everywhere(rank, world):
    """A rank with different heads makes every rank raise ValueError (no hang)."""
    if world == 1:
        return
    heads = 2 if rank == world - 1 else 4
    q = k = v = torch.randn(1, heads, 3, 8)
    try:
        ring_attention(q, k, v)
    except ValueError as e:
        assert "rank" in str(e) and "expected" in str(e), str(e)
    else:
        raise AssertionError(f"rank {rank}: mismatched heads did not raise")


def _tree(rank, world, *, causal, nq, lengths, pad=True, splits=1, round_robin=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(lengths)
    q, k, v = _randn(g, 2, 4, nq, 8), _randn(g, 2, 2, n, 8), _randn(g, 2, 2, n, 6)
    mask = _padding(2, n) if pad else None
    ref, ref_lse = attention(q, k, v, causal=causal, key_padding_mask=mask, return_lse=True)
    if round_robin:  # token t on rank t % P: positions must be given
        idx = torch.arange(rank, n, world)
        kw = dict(key_positions=idx, query_positions=torch.arange(n - nq, n)) if causal else {}
    else:
        start = sum(lengths[:rank])
        idx, kw = torch.arange(start, start + lengths[rank]), {}
    with torch.no_grad():
        out, lse = tree_attention(q, k[:, :, idx], v[:, :, idx], causal=causal, splits=splits, return_lse=True,
                                  key_padding_mask=None if mask is None else mask[:, idx], **kw)
    _close(out, ref, f"rank {rank} tree output")
    _close(lse, ref_lse, f"rank {rank} tree log-sum-exp")


def _lengths(world, n=11):
    # Uneven, and the last rank's shard is the largest: the decoded queries sit at the very end.
    if world == 1:
        return [n]
    base = [2, 0, 3, 1][: world - 1]
    return base + [n - sum(base)]


def tree_decode_one_token(rank, world):
    for causal in (True, False):
        _tree(rank, world, causal=causal, nq=1, lengths=_lengths(world))


def tree_decode_chunk_causal_splits(rank, world):
    _tree(rank, world, causal=True, nq=4, lengths=_lengths(world, 13), splits=2)


def tree_round_robin_positions(rank, world):
    _tree(rank, world, causal=True, nq=3, lengths=[12], round_robin=True, splits=3)


def tree_gradients_refused_across_processes(rank, world):
    q = torch.randn(1, 2, 1, 4, requires_grad=True)
    k = v = torch.randn(1, 2, 3, 4)
    if world == 1:  # one process: differentiable like any op
        tree_attention(q, k, v).sum().backward()
        assert q.grad is not None
        return
    try:
        tree_attention(q, k, v)
    except UnsupportedError:
        return
    raise AssertionError(f"rank {rank}: tree_attention with requires_grad inputs did not raise")


def _reference_mha(module, seed_kwargs):
    ref = attnlab.create("mha", **seed_kwargs).double()
    ref.load_state_dict(module.state_dict())
    return ref


def mechanism_ring_self_attention(rank, world):
    """The module on shares == mha on the full sequence: outputs, input grads, all-reduced parameter grads."""
    for layout, causal in (("zigzag", True), ("contiguous", False)):
        kw = dict(dim=24, heads=4, kv_heads=2, rope=True)
        torch.manual_seed(0)
        m = attnlab.create("ring-self-attention", layout=layout, q_chunk=3, k_chunk=4, **kw).double()
        ref = _reference_mha(m, kw)
        g = torch.Generator().manual_seed(1)
        n = 5 * world + 2
        x, gy = _randn(g, 2, n, 24), _randn(g, 2, n, 24)
        mask = _padding(2, n)
        xf = x.clone().requires_grad_()
        (ref(xf, causal=causal, key_padding_mask=mask) * gy).sum().backward()
        share = _share_fn(rank, world, layout, None)
        xl = share(x, 1).requires_grad_()
        y = m(xl, causal=causal, key_padding_mask=share(mask, 1))
        (y * share(gy, 1)).sum().backward()
        _close(y, share(ref(x, causal=causal, key_padding_mask=mask), 1).detach(), f"rank {rank} {layout} output")
        _close(xl.grad, share(xf.grad, 1), f"rank {rank} {layout} input grad")
        for (name, p), p_ref in zip(m.named_parameters(), ref.parameters()):
            grad = p.grad.clone()
            if dist.is_initialized():
                dist.all_reduce(grad)  # each rank holds its tokens' share of the parameter gradient
            _close(grad, p_ref.grad, f"rank {rank} {layout} grad of {name}")
        full = gather_sequence(y.detach(), layout=layout, dim=1)
        _close(full, ref(x, causal=causal, key_padding_mask=mask).detach(), f"rank {rank} gathered output")


def mechanism_tree_attention_decode(rank, world):
    """Prefill + decode with a sharded cache == mha's full causal forward, on every rank; also without a cache."""
    kw = dict(dim=24, heads=4, kv_heads=2, rope=True)
    torch.manual_seed(0)
    m = attnlab.create("tree-attention", splits=2, **kw).double()
    ref = _reference_mha(m, kw)
    g = torch.Generator().manual_seed(2)
    n = 12
    x = _randn(g, 2, n, 24)
    mask = torch.ones(2, n, dtype=torch.bool)
    mask[0, 1:4] = False  # padding inside the prompt
    with torch.no_grad():
        full = ref(x, causal=True, key_padding_mask=mask)
        cache = KVCache()
        parts = [m(x[:, :5], causal=True, key_padding_mask=mask[:, :5], cache=cache)]
        for t in range(5, 9):
            parts.append(m(x[:, t: t + 1], causal=True, cache=cache))
        parts.append(m(x[:, 9:], causal=True, cache=cache))
        _close(torch.cat(parts, dim=1), full, f"rank {rank} tree decode")
        local = len(cache)
        expected = len(range(rank, n, world))
        assert local == expected, f"rank {rank}: holds {local} cached tokens, expected {expected} (round-robin)"
        for causal in (True, False):
            _close(m(x, causal=causal, key_padding_mask=mask), ref(x, causal=causal, key_padding_mask=mask),
                   f"rank {rank} tree forward causal={causal}")


def gather_round_trip(rank, world):
    x = torch.arange(2 * (3 * world + 1)).view(2, -1)
    for layout in ("zigzag", "contiguous"):
        local = shard_sequence(x, rank=rank, world=world, layout=layout, dim=1)
        assert torch.equal(gather_sequence(local, layout=layout, dim=1), x), f"rank {rank}: {layout} round trip"
    segs = layout_segments([len(shard_sequence(torch.arange(9), rank=r, world=world, layout="zigzag", dim=0))
                            for r in range(world)], "zigzag")
    assert sum(s.length for ss in segs for s in ss) == 9


def ring_graph_holds_no_process_group(rank, world):
    """An output's autograd graph does not keep the default group alive: a graph still alive at interpreter exit
    would keep it past destroy_process_group() and tear it down during finalisation, where gloo's threads abort the
    process (3 runs in 37 of the docs/parallel.md script did). Walks what the graph references, modules,
    functions and classes aside (they reach the whole torch.distributed state)."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (shard_sequence(_randn(g, 1, 2, 8 * world, 4), rank=rank, world=world, dim=2).requires_grad_()
               for _ in range(3))
    out = ring_attention(q, k, v, causal=True)
    group = dist.group.WORLD if world > 1 else None
    seen, todo = set(), [out.grad_fn]
    while todo:
        obj = todo.pop()
        if id(obj) in seen or isinstance(obj, (types.ModuleType, types.FunctionType, type)):
            continue
        seen.add(id(obj))
        assert group is None or obj is not group, "ring_attention's autograd graph holds the default process group"
        todo.extend(gc.get_referents(obj))
    assert len(seen) > 3, f"the walk reached only {len(seen)} objects: it no longer sees the graph's state"
    out.sum().backward()


CASES = {f.__name__: f for f in (
    ring_bidirectional_zigzag, ring_causal_zigzag, ring_causal_zigzag_even, ring_causal_zigzag_tiny,
    ring_causal_contiguous_uneven, ring_bidirectional_contiguous_empty_share, ring_causal_float32_default_chunks,
    ring_bfloat16_forward, ring_comm_volume, ring_mismatched_calls_raise_everywhere,
    tree_decode_one_token, tree_decode_chunk_causal_splits, tree_round_robin_positions,
    tree_gradients_refused_across_processes, mechanism_ring_self_attention, mechanism_tree_attention_decode,
    gather_round_trip, ring_graph_holds_no_process_group,
)}


def run_cases(rank: int, world: int, names: list[str]) -> dict[str, str | None]:
    """Run the named cases in order on this rank; ``{name: None}`` on success, else the traceback."""
    torch.set_num_threads(1)
    results = {}
    for name in names:
        try:
            CASES[name](rank, world)
            results[name] = None
        except Exception:  # noqa: BLE001 - reported per case by the parent test
            results[name] = traceback.format_exc()
    return results
