"""Linear (kernel) attention, written once: feature maps and one causal scan in three interchangeable forms.

Kernel attention replaces ``exp(q . k / sqrt(d))`` by ``phi(q) . phi(k)`` for a feature map ``phi``; then

    o_i = sum_j w_ij (phi(q_i) . phi(k_j)) v_j  /  sum_j w_ij (phi(q_i) . phi(k_j))

where the sums run over the keys query ``i`` sees (all of them, or ``j <= i`` when causal) and ``w_ij`` is a decay
``prod_{t=j+1..i} g_t`` of per-token gates ``g_t in (0, 1]`` (all ones: plain linear attention; one constant per
head: Lightning / RetNet decay; data-dependent, per head or per feature: gated linear attention as in Liger).
Causal outputs need only a state carried left to right,

    S_t = g_t * S_{t-1} + phi(k_t) v_t^T        (F x Dv)        o_t = phi(q_t) S_t / phi(q_t) z_t
    z_t = g_t * z_{t-1} + phi(k_t)              (F)

and :func:`linear_attention` computes it in three forms that agree to rounding (tests/ops/test_linear.py):
``"recurrent"`` (the loop above, one token at a time: the decoding form), ``"parallel"`` (the masked quadratic
form ``((phi(Q) phi(K)^T) * D) V``, materialising) and ``"chunked"`` (quadratic inside chunks of ``chunk_size``
tokens, the state across chunks: Lightning Attention's intra/inter-block split, O(N) in time and memory).
The normaliser ``z`` rides along as an extra all-ones value column, so every form computes it with the same code.

Contract: ``q (B, Hq, N, F)``, ``k (B, Hkv, N, F)`` are *features* (already mapped), ``v (B, Hkv, N, Dv)``;
grouped query heads share their key/value head's state by broadcasting. ``key_padding_mask (B, N)`` (True = keep):
a padded token is skipped entirely (its key contributes nothing and its gate is 1). Outputs are computed in
float32 for half-precision inputs (float64 for float64) and returned in the input dtype. Normalised outputs
divide by the denominator floored at ``eps`` in magnitude: with non-negative kernels a zero denominator means a
zero numerator,
so rows that see nothing return 0, never NaN (a sign-indefinite kernel keeps its denominator's sign).
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

from ..errors import shape_error

__all__ = [
    "LinearState", "linear_attention", "elu_plus_one", "relu_features", "exp_features", "taylor_features",
    "taylor_feature_dim", "taylor_kernel", "positive_random_features", "orthogonal_gaussian", "binary_hash_features",
    "FORMS", "depthwise_conv1d",
]

FORMS = ("chunked", "parallel", "recurrent")


# ============================================================================================== feature maps


def elu_plus_one(x: Tensor) -> Tensor:
    """``phi(x) = elu(x) + 1 > 0`` (Katharopoulos et al., 2020), elementwise on ``(..., D)``."""
    return F.elu(x) + 1


def relu_features(x: Tensor) -> Tensor:
    """``phi(x) = max(x, 0)``, elementwise; a zero feature vector makes a zero kernel (handled by the normaliser)."""
    return F.relu(x)


def exp_features(x: Tensor, scale: Tensor | float = 1.0, *, row_shift: bool = False,
                 return_log_scale: bool = False):
    """``phi(x) = exp(scale * x)``, elementwise (the log-normal feature map of Linear Log-Normal attention).

    ``row_shift=True`` subtracts each row's largest exponent (a per-token constant: exact for *query* features of
    a normalised attention, where it cancels between numerator and denominator). ``return_log_scale=True`` returns
    ``(phi(x) / exp(a), a)`` with ``a`` the row's largest exponent, for *key* features, whose scale cannot cancel:
    pass ``a`` as :func:`linear_attention`'s ``key_log_weight`` and nothing overflows or underflows.
    """
    z = x * scale
    if row_shift:
        return torch.exp(z - z.detach().amax(dim=-1, keepdim=True))
    if return_log_scale:
        return _exp_with_log_scale(z, True)
    return torch.exp(z)


def taylor_feature_dim(d: int, order: int, *, symmetric: bool = False) -> int:
    """Width of :func:`taylor_features`: ``sum_p d^p`` (full tensor powers) or ``C(d + order, order)`` (symmetric)."""
    if symmetric:
        return math.comb(d + order, order)
    return sum(d ** p for p in range(order + 1))


_MONOMIALS: dict[tuple[int, int], tuple[Tensor, Tensor]] = {}


def _monomials(d: int, p: int) -> tuple[Tensor, Tensor]:
    """Index tuples ``(M, p)`` of the degree-``p`` monomials in ``d`` variables and their ``1 / sqrt(alpha!)``."""
    key = (d, p)
    if key not in _MONOMIALS:
        combos = list(itertools.combinations_with_replacement(range(d), p))
        idx = torch.tensor(combos, dtype=torch.long).reshape(len(combos), p)
        weight = torch.tensor([1.0 / math.sqrt(math.prod(math.factorial(c.count(i)) for i in set(c))) for c in combos],
                              dtype=torch.float64)
        _MONOMIALS[key] = (idx, weight)
    return _MONOMIALS[key]


def taylor_features(x: Tensor, order: int = 2, *, symmetric: bool = False) -> Tensor:
    """Features whose inner product is the Taylor polynomial of exp: ``phi(x) . phi(y) = sum_{p<=order} (x.y)^p / p!``.

    ``x (..., d)`` must already carry the attention scale (pass ``q * d ** -0.25`` for ``exp(q . k / sqrt(d))``).
    ``symmetric=False`` stacks the full tensor powers ``x^{(x)p} / sqrt(p!)`` (``d^p`` entries each; Based's
    map for ``order=2``); ``symmetric=True`` keeps one entry per monomial ``x^alpha / sqrt(alpha!)`` (|alpha| = p), the
    minimal basis of the symmetric tensor powers (``C(d + p - 1, p)`` entries each; symmetry-aware Taylor attention).
    Returns ``(..., taylor_feature_dim(d, order, symmetric=symmetric))``.
    """
    if order < 0:
        raise shape_error("taylor_features order", "an integer >= 0", order)
    parts = [torch.ones_like(x[..., :1])]
    if symmetric:
        for p in range(1, order + 1):
            idx, w = _monomials(x.shape[-1], p)
            parts.append(x[..., idx.to(x.device)].prod(dim=-1) * w.to(device=x.device, dtype=x.dtype))
    else:
        power = None
        for p in range(1, order + 1):
            power = x if power is None else (power.unsqueeze(-1) * x.unsqueeze(-2)).flatten(-2)
            parts.append(power / math.sqrt(math.factorial(p)))
    return torch.cat(parts, dim=-1)


def taylor_kernel(s: Tensor, order: int) -> Tensor:
    """The kernel the Taylor features compute, as a function of the scaled logit ``s = q . k / sqrt(d)``."""
    return sum(s ** p / math.factorial(p) for p in range(order + 1))


def orthogonal_gaussian(m: int, d: int, *, generator: torch.Generator | None = None,
                        dtype: torch.dtype = torch.float32) -> Tensor:
    """``(m, d)`` random projection with orthogonal rows in blocks of ``d`` and Gaussian row norms (Performer's ORF).

    Each block is the Q factor of a Gaussian matrix (exactly orthogonal rows); rows are then rescaled to the norms of
    independent ``N(0, I_d)`` vectors, so every row is marginally ``N(0, I_d)`` as the unbiased estimator needs.
    """
    g = torch.randn(math.ceil(m / d), d, d, generator=generator, dtype=torch.float64)
    qmat, r = torch.linalg.qr(g)  # batched: one orthogonal block per d rows
    # fix the signs by diag(R) so Q is Haar-distributed (LAPACK's sign convention would bias the directions)
    qmat = qmat * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)
    w = qmat.transpose(-1, -2).reshape(-1, d)[:m]
    norms = torch.randn(m, d, generator=generator, dtype=torch.float64).norm(dim=-1, keepdim=True)
    return (w * norms).to(dtype)


def _exp_with_log_scale(z: Tensor, return_log_scale: bool):
    # exp(z) as (exp(z - a), a) with a = the row maximum (detached: exp(z - a) * exp(a) keeps exp(z)'s gradient)
    a = z.detach().amax(dim=-1)
    f = torch.exp(z - a.unsqueeze(-1))
    return (f, a) if return_log_scale else f * torch.exp(a).unsqueeze(-1)


def positive_random_features(x: Tensor, proj: Tensor, *, is_query: bool, return_log_scale: bool = False):
    """Performer's positive random features (FAVOR+): ``phi(x) = exp(w_i . x - |x|^2 / 2) / sqrt(m)``.

    ``E[phi(q) . phi(k)] = exp(q . k)`` for rows ``w_i ~ N(0, I)``; ``x (..., d)`` carries the attention scale
    (pass ``q * d ** -0.25``), ``proj (m, d)``. Queries subtract their own largest exponent, a per-query constant
    that cancels in normalised attention. Keys cannot: with ``return_log_scale=True`` they return
    ``(phi(k) / exp(a), a)`` with ``a`` their largest exponent, for :func:`linear_attention`'s ``key_log_weight``
    (exact, and no over- or underflow at any scale); otherwise ``phi(k)`` itself.
    """
    proj = proj.to(dtype=x.dtype, device=x.device)
    logits = x @ proj.T - x.square().sum(dim=-1, keepdim=True) / 2 - math.log(proj.shape[0]) / 2
    if is_query:
        return torch.exp(logits - logits.detach().amax(dim=-1, keepdim=True))
    return _exp_with_log_scale(logits, return_log_scale)


def binary_hash_features(codes: Tensor) -> Tensor:
    """Features of the Hamming affinity of ``b``-bit codes ``h in {-1, +1}^b``: ``phi(h) = [sqrt(b), h] / sqrt(2)``.

    ``phi(h) . phi(h') = (b + h . h') / 2 = b - Hamming(h, h')``, the number of agreeing bits: non-negative, so
    the normalised linear attention over it is a proper weighted average (EcoFormer).
    """
    b = codes.shape[-1]
    return torch.cat([torch.full_like(codes[..., :1], math.sqrt(b)), codes], dim=-1) / math.sqrt(2)


# ================================================================================================ the scan


class LinearState(NamedTuple):
    """The causal state of one layer: ``kv (B, Hkv, F, Dv) = sum w phi(k) v^T`` and ``z (B, Hkv, F) = sum w phi(k)``
    (``z`` is None for unnormalised attention); with key log-weights, both are stored relative to ``exp(m)``,
    ``m (B, Hkv)`` the largest log-weight seen (``-inf`` before any key). Float32 (float64 for float64 inputs)."""

    kv: Tensor
    z: Tensor | None
    m: Tensor | None = None


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def linear_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    log_gate: Tensor | None = None,
    key_log_weight: Tensor | None = None,
    normalize: bool = True,
    eps: float = 1e-6,
    initial_state: LinearState | None = None,
    return_state: bool = False,
    form: str = "chunked",
    chunk_size: int = 64,
    reset_every: int | None = None,
    offset: int = 0,
):
    """Kernel attention over feature-mapped ``q (B, Hq, N, F)``, ``k (B, Hkv, N, F)`` and ``v (B, Hkv, N, Dv)``.

    Args:
        causal: query ``i`` sees keys ``j <= i`` (and the ``initial_state``: the tokens before this call).
        key_padding_mask: ``(B, N)`` bool, True = keep; padded tokens are skipped (no key, gate 1).
        log_gate: log of the decay gates, ``<= 0``, broadcastable to ``(B, Hkv, N)`` (one gate per head and token;
            a constant ``(1, Hkv, 1)`` is a fixed per-head decay) or ``(B, Hkv, N, F)`` (per feature). Causal only.
        key_log_weight: ``a (B, Hkv, N)``: key ``j``'s features are ``exp(a_j) * k_j``. Feature maps built on
            exp (random features, log-normal) pass their per-key scale here instead of multiplying it in: the scan
            keeps a running maximum of ``a`` like the online softmax, so nothing under- or overflows whatever the
            scale, and causality stays exact. Needs ``normalize=True``; not combined with gates or resets.
        normalize: divide by the normaliser ``phi(q) . z`` (False: Lightning / GLA style, no denominator).
        initial_state / return_state: continue from / also return the :class:`LinearState` (causal only).
        form: ``"chunked"`` (default, O(N)), ``"parallel"`` (materialises N x N) or ``"recurrent"`` (token loop).
        chunk_size: tokens per chunk of the chunked form.
        reset_every: the state restarts at every multiple of this many tokens (absolute positions, counting
            ``offset``): independent segments, as in RAT's intra-chunk recurrence. Causal only.
        offset: absolute position of the first token (decoding continues a sequence; only ``reset_every`` uses it).

    Returns ``out (B, Hq, N, Dv)`` in the dtype of ``q``, and the final :class:`LinearState` if ``return_state``.
    """
    B, Hq, N, Fd = _check(q, k, v, key_padding_mask, causal, log_gate, initial_state, form, chunk_size, reset_every,
                          key_log_weight, normalize)
    Hkv = k.shape[1]
    G = Hq // Hkv
    cd = _compute_dtype(q.dtype)
    qg = rearrange(q.to(cd), "b (h g) n f -> b h g n f", g=G)
    kc, vc = k.to(cd), v.to(cd)
    if normalize:  # the normaliser z = sum phi(k) is the state of an all-ones value column
        vc = torch.cat([vc, torch.ones_like(vc[..., :1])], dim=-1)
    g = None
    if log_gate is not None:
        g = log_gate.to(cd)
        g = g.expand(B, Hkv, N, Fd) if g.dim() == 4 else g.expand(B, Hkv, N)
    a = None
    if key_log_weight is not None:
        a = key_log_weight.to(cd).expand(B, Hkv, k.shape[2])
    if key_padding_mask is not None:
        keep = key_padding_mask[:, None, :, None]
        kc = kc.masked_fill(~keep, 0.0)
        if a is not None:
            a = a.masked_fill(~keep[..., 0], float("-inf"))
        if g is not None:  # a padded token neither decays the state nor enters it
            g = g.masked_fill(~(keep if g.dim() == 4 else keep[..., 0]), 0.0)
    s0 = None
    if initial_state is not None:
        s0 = initial_state.kv.to(cd)
        if normalize:
            s0 = torch.cat([s0, initial_state.z.to(cd).unsqueeze(-1)], dim=-1)

    m0 = None
    if a is not None:
        m0 = (initial_state.m.to(cd) if initial_state is not None and initial_state.m is not None
              else torch.full((B, Hkv), float("-inf"), dtype=cd, device=q.device))

    if not causal:
        if a is not None:  # one global reference: it cancels between numerator and denominator
            kc = kc * torch.exp(a - _finite_or_zero(a.detach().amax(dim=-1, keepdim=True))).unsqueeze(-1)
        kv = torch.einsum("bhnf,bhne->bhfe", kc, vc)
        o = qg @ kv.unsqueeze(2)
        state = kv
    elif a is not None:
        o, state, m0 = _weighted(qg, kc, vc, a, s0, m0, form, chunk_size)
    elif form == "recurrent":
        o, state = _recurrent(qg, kc, vc, g, s0, reset_every, offset)
    elif form == "parallel":
        o, state = _parallel(qg, kc, vc, g, s0, reset_every, offset)
    else:
        o, state = _chunked(qg, kc, vc, g, s0, chunk_size, reset_every, offset)

    if normalize:  # floor |den| at eps, keeping its sign (odd-order Taylor kernels can go negative)
        den = o[..., -1:]
        o = o[..., :-1] / torch.where(den.abs() < eps, torch.where(den < 0, -eps, eps), den)
    out = rearrange(o, "b h g n e -> b (h g) n e").to(q.dtype)
    if not return_state:
        return out
    if normalize:
        return out, LinearState(state[..., :-1], state[..., -1], m0)
    return out, LinearState(state, None)


def _check(q, k, v, key_padding_mask, causal, log_gate, initial_state, form, chunk_size, reset_every,
           key_log_weight, normalize):
    for name, t, layout in (("q", q, "(B, Hq, N, F)"), ("k", k, "(B, Hkv, N, F)"), ("v", v, "(B, Hkv, N, Dv)")):
        if not isinstance(t, Tensor) or t.dim() != 4 or not t.is_floating_point():
            got = f"shape {tuple(t.shape)}, {t.dtype}" if isinstance(t, Tensor) else type(t).__name__
            raise shape_error(f"linear_attention {name}", f"a 4-D floating-point tensor {layout}", got)
    B, Hq, N, Fd = q.shape
    if k.shape[0] != B or k.shape[3] != Fd or k.shape[1] == 0 or Hq % k.shape[1]:
        raise shape_error("linear_attention k", f"(B={B}, Hkv dividing Hq={Hq}, N, F={Fd})", tuple(k.shape))
    if tuple(v.shape[:3]) != tuple(k.shape[:3]):
        raise shape_error("linear_attention v", f"({k.shape[0]}, {k.shape[1]}, {k.shape[2]}, Dv) like k", tuple(v.shape))
    if causal and k.shape[2] != N:
        raise shape_error("linear_attention k", f"as many keys as queries (N={N}) when causal "
                          "(earlier tokens enter through initial_state)", tuple(k.shape))
    if key_padding_mask is not None and (key_padding_mask.dtype != torch.bool
                                         or tuple(key_padding_mask.shape) != (B, k.shape[2])):
        raise shape_error("linear_attention key_padding_mask", f"bool (B, N) = ({B}, {k.shape[2]})",
                          f"{key_padding_mask.dtype} {tuple(key_padding_mask.shape)}")
    if form not in FORMS:
        raise shape_error("linear_attention form", f"one of {FORMS}", repr(form))
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise shape_error("linear_attention chunk_size", "a positive integer", chunk_size)
    if reset_every is not None and not (isinstance(reset_every, int) and reset_every > 0):
        raise shape_error("linear_attention reset_every", "a positive integer or None", reset_every)
    if not causal and (log_gate is not None or initial_state is not None or reset_every is not None):
        raise ValueError("linear_attention: log_gate, initial_state and reset_every need causal=True "
                         "(expected causal=True, received causal=False)")
    if log_gate is not None:
        Hkv = k.shape[1]
        ok = log_gate.dim() in (3, 4)
        if ok:
            target = (B, Hkv, N, Fd) if log_gate.dim() == 4 else (B, Hkv, N)
            try:
                ok = torch.broadcast_shapes(log_gate.shape, target) == target
            except RuntimeError:
                ok = False
        if not ok:
            raise shape_error("linear_attention log_gate", f"broadcastable to (B, Hkv, N) = ({B}, {Hkv}, {N}) or "
                              f"(B, Hkv, N, F) = ({B}, {Hkv}, {N}, {Fd})", tuple(log_gate.shape))
    if key_log_weight is not None:
        target = (B, k.shape[1], k.shape[2])
        try:
            ok = key_log_weight.dim() == 3 and torch.broadcast_shapes(key_log_weight.shape, target) == target
        except RuntimeError:
            ok = False
        if not ok:
            raise shape_error("linear_attention key_log_weight", f"broadcastable to (B, Hkv, N) = {target}",
                              tuple(key_log_weight.shape))
        if not normalize or log_gate is not None or reset_every is not None:
            raise ValueError("linear_attention: key_log_weight expected with normalize=True and no log_gate or "
                             f"reset_every, received normalize={normalize}, log_gate/reset_every set")
    if initial_state is not None:
        want = (B, k.shape[1], Fd, v.shape[3])
        if tuple(initial_state.kv.shape) != want:
            raise shape_error("linear_attention initial_state.kv", f"(B, Hkv, F, Dv) = {want}",
                              tuple(initial_state.kv.shape))
    return B, Hq, N, Fd


# ---------------------------------------------------------------------------------------- recurrent form


def _recurrent(q, k, v, g, s0, reset_every, offset):
    """One token at a time: ``S = g_t S + phi(k_t) v_t^T``; ``o_t = phi(q_t) S``. Shapes as in :func:`_chunked`.

    With ``reset_every = L`` the segments are independent, so all of them step together: L steps, not N.
    """
    if reset_every is not None:
        return _recurrent_segments(q, k, v, g, s0, reset_every, offset)
    B, H, G, N, Fd = q.shape
    S = s0 if s0 is not None else q.new_zeros(B, H, Fd, v.shape[-1])
    outs = []
    for t in range(N):
        if reset_every is not None and (offset + t) % reset_every == 0:
            S = torch.zeros_like(S)
        if g is not None:
            a = g[:, :, t].exp()
            S = S * (a.unsqueeze(-1) if g.dim() == 4 else a[..., None, None])
        S = S + k[:, :, t, :, None] * v[:, :, t, None, :]
        outs.append(torch.einsum("bhgf,bhfe->bhge", q[:, :, :, t], S))
    o = torch.stack(outs, dim=3) if N else q.new_zeros(B, H, G, 0, v.shape[-1])
    return o, S


def _recurrent_segments(q, k, v, g, s0, L, offset):
    """The recurrence inside segments of ``L`` tokens (aligned to absolute positions), all segments at once."""
    B, H, G, N, Fd = q.shape
    E = v.shape[-1]
    lead = offset % L
    tail = (-(lead + N)) % L
    q, k, v = F.pad(q, (0, 0, lead, tail)), F.pad(k, (0, 0, lead, tail)), F.pad(v, (0, 0, lead, tail))
    if g is not None:
        g = F.pad(g, (0, 0, lead, tail) if g.dim() == 4 else (lead, tail))
    n = (lead + N + tail) // L
    qs = rearrange(q, "b h g (n l) f -> b h g n l f", l=L)
    ks, vs = rearrange(k, "b h (n l) f -> b h n l f", l=L), rearrange(v, "b h (n l) e -> b h n l e", l=L)
    gs = None if g is None else rearrange(g, "b h (n l) ... -> b h n l ...", l=L)
    S = v.new_zeros(B, H, n, Fd, E)
    if s0 is not None and lead:  # the call continues an open segment
        S = torch.cat([s0.unsqueeze(2), S[:, :, 1:]], dim=2)
    outs = []
    for t in range(L):
        if gs is not None:
            a = gs[:, :, :, t].exp()
            S = S * (a.unsqueeze(-1) if gs.dim() == 5 else a[..., None, None])
        S = S + ks[:, :, :, t, :, None] * vs[:, :, :, t, None, :]
        outs.append(torch.einsum("bhgnf,bhnfe->bhgne", qs[:, :, :, :, t], S))
    o = rearrange(torch.stack(outs, dim=4), "b h g n l e -> b h g (n l) e")[:, :, :, lead: lead + N]
    return o, S[:, :, -1]


# ----------------------------------------------------------------------------------------- parallel form


def _segment_ids(n: int, reset_every: int | None, offset: int, device) -> Tensor | None:
    if reset_every is None:
        return None
    return torch.div(torch.arange(offset, offset + n, device=device), reset_every, rounding_mode="floor")


def _parallel(q, k, v, g, s0, reset_every, offset):
    """The masked quadratic form ``o = ((phi(Q) phi(K)^T) * D) V + (phi(Q) * exp(c)) S0``; materialises N x N."""
    B, H, G, N, Fd = q.shape
    dev = q.device
    keep = torch.ones(N, N, dtype=torch.bool, device=dev).tril()
    seg = _segment_ids(N, reset_every, offset, dev)
    if seg is not None:
        keep &= seg[:, None] == seg[None, :]
    # the initial state reaches token i unless a segment starts at or before it (at offset itself included)
    sees_init = torch.ones(N, dtype=torch.bool, device=dev)
    if seg is not None:
        sees_init = (seg == offset // reset_every) & (offset % reset_every != 0)
    if g is None:
        A = (q @ k.unsqueeze(2).transpose(-1, -2)).masked_fill(~keep, 0.0)
        o = A @ v.unsqueeze(2)
        if s0 is not None:
            o = o + (q * sees_init[:, None]) @ s0.unsqueeze(2)
        last = keep[-1].to(v.dtype) if N else keep.new_zeros(0)
        state = torch.einsum("n,bhnf,bhne->bhfe", last, k, v)
        if s0 is not None and (N == 0 or sees_init[-1]):
            state = state + s0
        return o, state
    c = g.cumsum(dim=2)  # (B, H, N[, F]): log of the decay from the start of the call to token i
    if g.dim() == 3:
        diff = (c[..., :, None] - c[..., None, :]).masked_fill(~keep, float("-inf"))
        A = (q @ k.unsqueeze(2).transpose(-1, -2)) * diff.exp().unsqueeze(2)
        qdec = q * (c.exp() * sees_init)[:, :, None, :, None]
        kdec = k * (c[..., -1:] - c).exp().unsqueeze(-1) if N else k
        last_decay = c[..., -1].exp()[..., None, None] if N else 1.0
    else:
        diff = (c[..., :, None, :] - c[..., None, :, :]).masked_fill(~keep[..., None], float("-inf"))
        A = torch.einsum("bhgif,bhjf,bhijf->bhgij", q, k, diff.exp())
        qdec = q * (c.exp() * sees_init[:, None]).unsqueeze(2)
        kdec = k * (c[..., -1:, :] - c).exp() if N else k
        last_decay = c[..., -1, :].exp().unsqueeze(-1) if N else 1.0
    o = A @ v.unsqueeze(2)
    if s0 is not None:
        o = o + qdec @ s0.unsqueeze(2)
    last = keep[-1].to(v.dtype) if N else keep.new_zeros(0)
    state = torch.einsum("n,bhnf,bhne->bhfe", last, kdec, v)
    if s0 is not None and (N == 0 or sees_init[-1]):
        state = state + last_decay * s0
    return o, state


# ------------------------------------------------------------------------------------------ chunked form


# The per-feature-gate intra-chunk product builds (rows, C, C, F) tensors; this bounds their size (elements).
_GATED_BLOCK_ELEMENTS = 1 << 22


def _chunked(q, k, v, g, s0, C, reset_every, offset):
    """Quadratic inside chunks of ``C`` tokens, the state across chunks (Lightning Attention's tiling).

    ``q (B, H, G, N, F)``, ``k (B, H, N, F)``, ``v (B, H, N, E)``, ``g`` None or log gates ``(B, H, N[, F])``,
    ``s0 (B, H, F, E)`` or None. With ``reset_every`` the chunks are the segments (``C = reset_every``), aligned to
    absolute positions by left-padding ``offset % reset_every`` empty tokens, and no state crosses a chunk border.
    Returns ``o (B, H, G, N, E)`` and the state after the last token ``(B, H, F, E)``.
    """
    B, H, G, N, Fd = q.shape
    E = v.shape[-1]
    C = max(1, min(C, N))  # a short call (e.g. one decoding step) needs no padding to a full chunk
    lead = 0
    if reset_every is not None:
        C = reset_every
        lead = offset % C
        if lead == 0:
            s0 = None  # this call starts a new segment
    tail = (-(lead + N)) % C
    if lead or tail:  # empty tokens: zero key and value, gate 1 -- they change nothing
        q = F.pad(q, (0, 0, lead, tail))
        k = F.pad(k, (0, 0, lead, tail))
        v = F.pad(v, (0, 0, lead, tail))
        if g is not None:
            g = F.pad(g, (0, 0, lead, tail) if g.dim() == 4 else (lead, tail))
    n = (lead + N + tail) // C
    qc = rearrange(q, "b h g (n c) f -> b h g n c f", c=C)
    kc = rearrange(k, "b h (n c) f -> b h n c f", c=C)
    vc = rearrange(v, "b h (n c) e -> b h n c e", c=C)
    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()

    if g is None:
        A = (qc @ kc.unsqueeze(2).transpose(-1, -2)).masked_fill(~tril, 0.0)
        contrib = kc.transpose(-1, -2) @ vc  # (B, H, n, F, E): what each chunk adds to the state
        if reset_every is not None:
            before = torch.zeros_like(contrib)
        else:  # exclusive prefix sum over chunks
            before = torch.cat([torch.zeros_like(contrib[:, :, :1]), contrib[:, :, :-1]], dim=2).cumsum(dim=2)
        if s0 is not None:
            if reset_every is not None:
                before[:, :, 0] = s0
            else:
                before = before + s0.unsqueeze(2)
        o = A @ vc.unsqueeze(2) + qc @ before.unsqueeze(2)
        final = (before[:, :, -1] + contrib[:, :, -1]) if n else (s0 if s0 is not None else v.new_zeros(B, H, Fd, E))
    else:
        per_feature = g.dim() == 4
        if per_feature:
            b = rearrange(g, "b h (n c) f -> b h n c f", c=C).cumsum(dim=3)  # decay from the chunk start
            total = b[:, :, :, -1]  # (B, H, n, F)
            A = _gated_intra(qc, kc, b, tril)
            qdec = qc * b.exp().unsqueeze(2)
            kdec = kc * (total.unsqueeze(3) - b).exp()
            chunk_decay = total.exp().unsqueeze(-1)  # (B, H, n, F, 1)
        else:
            b = rearrange(g, "b h (n c) -> b h n c", c=C).cumsum(dim=3)
            total = b[..., -1]  # (B, H, n)
            diff = (b[..., :, None] - b[..., None, :]).masked_fill(~tril, float("-inf"))
            A = (qc @ kc.unsqueeze(2).transpose(-1, -2)) * diff.exp().unsqueeze(2)
            qdec = qc * b.exp()[:, :, None, :, :, None]
            kdec = kc * (total[..., None] - b).exp().unsqueeze(-1)
            chunk_decay = total.exp()[..., None, None]  # (B, H, n, 1, 1)
        contrib = kdec.transpose(-1, -2) @ vc  # (B, H, n, F, E)
        # the state entering each chunk: S_{c+1} = decay_c * S_c + contrib_c (a short loop over chunks)
        S = s0 if s0 is not None else v.new_zeros(B, H, Fd, E)
        befores = []
        for c in range(n):
            if reset_every is not None and c > 0:
                S = torch.zeros_like(S)
            befores.append(S)
            S = chunk_decay[:, :, c] * S + contrib[:, :, c]
        before = torch.stack(befores, dim=2) if n else v.new_zeros(B, H, 0, Fd, E)
        o = A @ vc.unsqueeze(2) + qdec @ before.unsqueeze(2)
        final = S
    o = rearrange(o, "b h g n c e -> b h g (n c) e")[:, :, :, lead: lead + N]
    return o, final


def _gated_intra(qc: Tensor, kc: Tensor, b: Tensor, tril: Tensor) -> Tensor:
    """``A_ij = sum_f q_if k_jf exp(b_if - b_jf)`` for ``j <= i`` inside each chunk (per-feature gates).

    The difference ``b_i - b_j <= 0`` is formed before exponentiating, so nothing overflows however strong the
    gates are (factoring it as ``exp(b_i) exp(-b_j)`` would overflow). Processed in blocks of chunks to bound memory.
    """
    B, H, G, n, C, Fd = qc.shape
    per_chunk = B * H * G * C * C * Fd
    step = max(1, _GATED_BLOCK_ELEMENTS // max(per_chunk, 1))
    blocks = []
    for s in range(0, n, step):
        bb = b[:, :, s: s + step]
        diff = (bb[..., :, None, :] - bb[..., None, :, :]).masked_fill(~tril[..., None], float("-inf"))
        blocks.append(torch.einsum("bhgncf,bhndf,bhncdf->bhgncd", qc[:, :, :, s: s + step], kc[:, :, s: s + step],
                                   diff.exp()))
    return torch.cat(blocks, dim=3) if blocks else qc.new_zeros(B, H, G, 0, C, C)


# ------------------------------------------------------------------------------- forms with key log-weights


def _finite_or_zero(m: Tensor) -> Tensor:
    # a reference of -inf (no key yet) is replaced by 0: exp(-inf - 0) = 0 instead of NaN
    return torch.where(torch.isfinite(m), m, torch.zeros_like(m))


def _weighted(q, k, v, a, s0, m0, form, C):
    """Causal kernel attention with key weights ``exp(a_j)`` kept relative to a running maximum (online softmax).

    Every term is ``exp(raw - reference)`` with ``raw <= reference``, so nothing overflows and keys far below the
    current maximum underflow to 0 exactly as they would in softmax. ``q (B, H, G, N, F)``, ``k (B, H, N, F)``,
    ``v (B, H, N, E)``, ``a (B, H, N)``, ``s0 (B, H, F, E)`` or None at reference ``m0 (B, H)``.
    Returns ``o``, the final state and its reference.
    """
    B, H, G, N, Fd = q.shape
    E = v.shape[-1]
    S = s0 if s0 is not None else v.new_zeros(B, H, Fd, E)
    ad = a.detach()
    if form == "recurrent":
        M, outs = m0, []
        for t in range(N):
            M_new = torch.maximum(M, ad[..., t])
            sh = _finite_or_zero(M_new)
            S = S * torch.exp(M - sh)[..., None, None] + torch.exp(a[..., t] - sh)[..., None, None] * (
                k[:, :, t, :, None] * v[:, :, t, None, :])
            M = M_new
            outs.append(torch.einsum("bhgf,bhfe->bhge", q[:, :, :, t], S))
        return (torch.stack(outs, dim=3) if N else q.new_zeros(B, H, G, 0, E)), S, M
    if form == "parallel":
        ref = torch.maximum(m0.unsqueeze(-1), ad.cummax(dim=-1).values)  # (B, H, N): query i's reference
        sh = _finite_or_zero(ref)
        keep = torch.ones(N, N, dtype=torch.bool, device=q.device).tril()
        W = torch.exp((a.unsqueeze(-2) - sh.unsqueeze(-1)).masked_fill(~keep, float("-inf")))  # (B, H, N, N)
        A = (q @ k.unsqueeze(2).transpose(-1, -2)) * W.unsqueeze(2)
        o = A @ v.unsqueeze(2) + (q @ S.unsqueeze(2)) * torch.exp(m0.unsqueeze(-1) - sh)[:, :, None, :, None]
        m_end = ref[..., -1] if N else m0
        sh_end = _finite_or_zero(m_end)
        state = torch.einsum("bhnf,bhne->bhfe", k * torch.exp(a - sh_end.unsqueeze(-1)).unsqueeze(-1), v)
        return o, state + S * torch.exp(m0 - sh_end)[..., None, None], m_end
    # chunked
    C = max(1, min(C, N))
    tail = (-N) % C
    if tail:
        q, k, v = F.pad(q, (0, 0, 0, tail)), F.pad(k, (0, 0, 0, tail)), F.pad(v, (0, 0, 0, tail))
        a = F.pad(a, (0, tail), value=float("-inf"))
        ad = a.detach()
    n = (N + tail) // C
    qc = rearrange(q, "b h g (n c) f -> b h g n c f", c=C)
    kc = rearrange(k, "b h (n c) f -> b h n c f", c=C)
    vc = rearrange(v, "b h (n c) e -> b h n c e", c=C)
    ac, acd = rearrange(a, "b h (n c) -> b h n c", c=C), rearrange(ad, "b h (n c) -> b h n c", c=C)
    local = acd.cummax(dim=-1).values  # running max inside each chunk
    chunk_max = local[..., -1]  # (B, H, n)
    # P_c: the reference of the state entering chunk c = max(m0, maxima of the chunks before c)
    prior = torch.cat([m0.unsqueeze(-1), chunk_max[..., :-1]], dim=-1).cummax(dim=-1).values
    ref = torch.maximum(prior.unsqueeze(-1), local)  # (B, H, n, C)
    sh = _finite_or_zero(ref)
    tril = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    W = torch.exp((ac.unsqueeze(-2) - sh.unsqueeze(-1)).masked_fill(~tril, float("-inf")))  # (B, H, n, C, C)
    A = (qc @ kc.unsqueeze(2).transpose(-1, -2)) * W.unsqueeze(2)
    contrib = (kc * torch.exp(ac - _finite_or_zero(chunk_max).unsqueeze(-1)).unsqueeze(-1)).transpose(-1, -2) @ vc
    befores, P = [], m0
    for c in range(n):
        befores.append(S)
        P_new = torch.maximum(P, chunk_max[..., c])
        sh_new = _finite_or_zero(P_new)[..., None, None]
        S = S * torch.exp(P[..., None, None] - sh_new) + contrib[:, :, c] * torch.exp(chunk_max[..., c, None, None]
                                                                                     - sh_new)
        P = P_new
    before = torch.stack(befores, dim=2)  # (B, H, n, F, E), chunk c's at reference prior[..., c]
    inter = (qc @ before.unsqueeze(2)) * torch.exp(prior.unsqueeze(-1) - sh)[:, :, None, :, :, None]
    o = A @ vc.unsqueeze(2) + inter
    return rearrange(o, "b h g n c e -> b h g (n c) e")[:, :, :, :N], S, P


# ========================================================================= depthwise 1-D convolution (CHELA)


def depthwise_conv1d(x: Tensor, weight: Tensor, bias: Tensor | None = None, *, causal: bool = True,
                     history: Tensor | None = None, method: str = "auto") -> Tensor:
    """Per-channel 1-D convolution along the sequence, ``x (B, N, C)``, ``weight (C, K)`` -> ``(B, N, C)``.

    Causal: ``y_t = sum_{j<K} w[:, j] x_{t-j}`` (``w[:, 0]`` weighs the current token; earlier tokens than the
    first are ``history (B, P, C)``, the last ``P <= K - 1`` inputs of a previous call, else zeros). Not causal: the
    kernel is centred, ``y_t = sum_j w[:, j] x_{t-j+c}`` with ``c = (K - 1) // 2``, zeros beyond both ends.
    ``method``: ``"direct"`` (``F.conv1d``, O(N K): the reference), ``"fft"`` (O(N log N), for long kernels) or
    ``"auto"`` (FFT from K = 64 on). Computed in float32 (float64 for float64 inputs), returned in ``x``'s dtype.
    """
    if x.dim() != 3 or weight.dim() != 2 or weight.shape[0] != x.shape[-1]:
        raise shape_error("depthwise_conv1d", "x (B, N, C) and weight (C, K)",
                          f"x {tuple(x.shape)}, weight {tuple(weight.shape)}")
    if method not in ("auto", "direct", "fft"):
        raise shape_error("depthwise_conv1d method", "'auto', 'direct' or 'fft'", repr(method))
    if history is not None and not causal:
        raise ValueError("depthwise_conv1d: history expected with causal=True, received causal=False")
    B, N, C = x.shape
    K = weight.shape[1]
    cd = _compute_dtype(x.dtype)
    xs = x.to(cd)
    P = 0
    if history is not None:
        P = history.shape[1]
        xs = torch.cat([history.to(cd), xs], dim=1)
    w = weight.to(cd)
    xt = rearrange(xs, "b n c -> b c n")
    if method == "direct" or (method == "auto" and K < 64):
        pad = (K - 1 - P, 0) if causal else (K - 1 - (K - 1) // 2, (K - 1) // 2)
        # conv1d is a cross-correlation: flipping the taps turns it into the convolution above
        y = F.conv1d(F.pad(xt, (max(pad[0], 0), pad[1])), w.flip(-1).unsqueeze(1), groups=C)
        y = y[..., y.shape[-1] - N:] if causal else y
    else:
        L = xt.shape[-1] + K - 1
        nfft = 1 << max(0, (L - 1).bit_length())
        full = torch.fft.irfft(torch.fft.rfft(xt, n=nfft) * torch.fft.rfft(w, n=nfft), n=nfft)
        # full[t] = sum_j w[j] x[t - j]: causal outputs are full[P : P + N], centred ones full[c : c + N]
        start = P if causal else (K - 1) // 2
        y = full[..., start: start + N]
    if bias is not None:
        y = y + bias.to(cd)[:, None]
    return rearrange(y, "b c n -> b n c").to(x.dtype)
