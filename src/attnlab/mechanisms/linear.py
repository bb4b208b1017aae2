"""Linear, kernel and recurrent attention: every mechanism here runs on the one scan in :mod:`attnlab.ops.linear`
(or, for Aaren, on the online-softmax merge of :mod:`attnlab.ops.online`).

Kernel attention on the scan: ``linear-attention`` (elu + 1), ``performer`` (positive random features),
``lightning-attention`` / ``lightning-attention-2`` (decay), ``based`` (Taylor + sliding window),
``symmetric-taylor-attn`` (minimal Taylor basis), ``linear-log-normal`` (exp features + block diagonal),
``ecoformer`` (binary hash codes), ``fast-factorizable`` (Fastmax), ``liger`` (gated, from an attention layer's
weights). Others: ``aaren`` (softmax prefix scan), ``rat-recurrence-attn`` (chunk-reset recurrence on the scan +
attention over chunks), ``agent-attention`` (agent tokens), ``infsa`` (Neumann series / Linear-InfSA).
``titans`` is in memory.py, ``cas-vit`` in conv.py.

A kernel mechanism is three choices on top of :class:`KernelAttention`: its feature map (:meth:`features`), its
gates (:meth:`log_gate`, none by default) and what it does around the scan (projections, norms, output gates).
The scan form (``form="chunked" | "parallel" | "recurrent"``) is a constructor option of every one of them, so
tests check the three forms against each other on the whole module; decoding keeps the scan's state in
``cache.state`` (O(1) per layer) and continues it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from ..errors import shape_error
from ..ops import reference_attention
from ..ops.linear import (
    FORMS, depthwise_conv1d, elu_plus_one, exp_features, linear_attention, orthogonal_gaussian, positive_random_features,
    taylor_feature_dim, taylor_features,
)
from ..ops.online import SoftmaxState, merge
from ..ops.positions import apply_rope, rope_cos_sin
from ..ops.window import band_plan, tiled_attention
from ..registry import Caps, register
from .base import Mechanism
from .cache import KVCache

_CAUSAL_AND_BI = Caps(causal=True, bidirectional=True, dims=(1, 2), decode=True, padding=True)
_CAUSAL_ONLY = Caps(causal=True, bidirectional=False, dims=(1,), decode=True, padding=True)


def kernel_flops(feature_dim, value_dim=None):
    """FLOPs of a kernel attention core: ``4 B H N F Dv`` (state update ``phi(k) v^T`` and read-out ``phi(q) S``).

    ``feature_dim(head_dim, **kwargs)`` gives F; the same count holds causal or not (the recurrent form's cost).
    """
    def flops(batch, n, heads, head_dim, causal=False, **kw):
        f = feature_dim(head_dim, **kw)
        dv = head_dim if value_dim is None else value_dim(head_dim, **kw)
        return 4.0 * batch * heads * n * f * dv
    return flops


def _advance(cache: KVCache | None, n: int) -> None:
    # Recurrent mechanisms keep no keys in the cache, so they move its position counter themselves.
    if cache is not None:
        cache.seen += n


def _check_heads(dim: int, heads: int, head_dim: int | None) -> int:
    if heads < 1:
        raise shape_error("heads", "a positive integer", heads)
    head_dim = head_dim or dim // heads
    if head_dim < 1:
        raise shape_error("head_dim", "dim // heads >= 1 (or an explicit head_dim)", (dim, heads))
    return head_dim


def _check_form(form: str, chunk_size: int) -> None:
    if form not in FORMS:
        raise shape_error("form", f"one of {FORMS}", repr(form))
    if not (isinstance(chunk_size, int) and chunk_size > 0):
        raise shape_error("chunk_size", "a positive integer", chunk_size)


# ================================================================================================ the base


class KernelAttention(Mechanism):
    """Multi-head kernel attention: ``o = phi(q) S / phi(q) z`` with ``S = sum phi(k) v^T`` (see ops/linear.py).

    Subclasses choose :meth:`features` (and optionally :meth:`log_gate`, :attr:`normalize`, :meth:`finish`).

    Args:
        dim, heads, head_dim: model width, heads, per-head width (default ``dim // heads``).
        qk_dim: width of the q/k projections per head when the feature map wants a different one (Based).
        form: ``"chunked"`` (default, O(N)), ``"parallel"`` (N x N, the reference) or ``"recurrent"`` (token loop).
        chunk_size: tokens per chunk of the chunked form.
        eps: the normaliser's floor.
    """

    normalize: bool = True
    state_key = "linear"

    def __init__(self, dim: int, heads: int = 8, *, head_dim: int | None = None, qk_dim: int | None = None,
                 bias: bool = False, form: str = "chunked", chunk_size: int = 64, eps: float = 1e-6) -> None:
        super().__init__()
        head_dim = _check_heads(dim, heads, head_dim)
        _check_form(form, chunk_size)
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.qk_dim = qk_dim or head_dim
        self.form, self.chunk_size, self.eps = form, chunk_size, eps
        self.q_proj = nn.Linear(dim, heads * self.qk_dim, bias=bias)
        self.k_proj = nn.Linear(dim, heads * self.qk_dim, bias=bias)
        self.v_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)

    # -------------------------------------------------------------------------------- what subclasses choose
    def features(self, q: Tensor, k: Tensor) -> tuple[Tensor, ...]:
        """``phi(q), phi(k)`` of ``q, k (B, H, N, qk_dim)``, each ``(B, H, N, F)``; exp-based maps may add a third,
        the keys' log-scale ``(B, H, N)`` (see ``key_log_weight`` in :func:`attnlab.ops.linear.linear_attention`)."""
        raise NotImplementedError

    def log_gate(self, x: Tensor, q: Tensor, k: Tensor) -> Tensor | None:
        """Log decay gates broadcastable to ``(B, H, N)`` or ``(B, H, N, F)``; None = no decay."""
        return None

    def finish(self, o: Tensor, x: Tensor) -> Tensor:
        """Map the scan output ``(B, H, N, head_dim)`` to ``(B, N, C)``."""
        return self.output(o)

    # ------------------------------------------------------------------------------------------ machinery
    def project(self, x: Tensor, *, hw=None, offset: int = 0) -> tuple[Tensor, Tensor, Tensor]:
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.heads)
        return q, k, v

    def output(self, o: Tensor) -> Tensor:
        return self.o_proj(rearrange(o, "b h n d -> b n (h d)"))

    def scan(self, fq: Tensor, fk: Tensor, v: Tensor, *, causal: bool, key_padding_mask: Tensor | None,
             log_gate: Tensor | None = None, key_log_weight: Tensor | None = None, cache: KVCache | None = None,
             **kw) -> Tensor:
        """Run the core; with a cache, continue from and store its :class:`LinearState`."""
        state = None if cache is None else cache.state.get(self.state_key)
        out = linear_attention(fq, fk, v, causal=causal, key_padding_mask=key_padding_mask, log_gate=log_gate,
                               key_log_weight=key_log_weight,
                               normalize=self.normalize, eps=self.eps, initial_state=state,
                               return_state=cache is not None, form=self.form, chunk_size=self.chunk_size, **kw)
        if cache is None:
            return out
        out, cache.state[self.state_key] = out
        return out

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        q, k, v = self.project(x)
        fq, fk, *log_scale = self.features(q, k)
        o = self.scan(fq, fk, v, causal=causal, key_padding_mask=key_padding_mask,
                      log_gate=self.log_gate(x, q, k) if causal else None,
                      key_log_weight=log_scale[0] if log_scale else None, cache=cache)
        _advance(cache, x.shape[1])
        return self.finish(o, x)


# ========================================================================================= linear attention


@register(
    "linear-attention", family="linear", seed=False,
    paper="Transformers are RNNs: Fast Autoregressive Transformers with Linear Attention", arxiv="2006.16236",
    complexity="O(N d^2) time, O(d^2) state", caps=_CAUSAL_AND_BI,
    flops=kernel_flops(lambda d, **kw: d),
    test_kwargs=dict(dim=32, heads=4, chunk_size=4),
    summary="Kernel attention with phi(x) = elu(x) + 1: an RNN with a d x d state when causal.",
)
class LinearAttention(KernelAttention):
    """Katharopoulos et al. (2020): ``phi(x) = elu(x) + 1``, normalised; see docs/mechanisms/linear-attention.md."""

    def features(self, q, k):
        return elu_plus_one(q), elu_plus_one(k)


# ================================================================================================ performer


@register(
    "performer", family="linear", seed=False,
    paper="Rethinking Attention with Performers", arxiv="2009.14794",
    complexity="O(N m d) time, O(m d) state (m random features)", caps=_CAUSAL_AND_BI,
    flops=kernel_flops(lambda d, nb_features=None, **kw: nb_features or max(1, int(d * math.log(d)))),
    test_kwargs=dict(dim=32, heads=4, nb_features=16, chunk_size=4),
    summary="FAVOR+: positive orthogonal random features whose inner products estimate exp(q . k / sqrt(d)) "
            "without bias.",
)
class Performer(KernelAttention):
    """Performer (Choromanski et al., 2021) with FAVOR+ positive orthogonal random features.

    Args:
        nb_features: random features m (default ``d log d``). The projection is a buffer drawn at construction
            (from torch's global generator, so it follows ``torch.manual_seed``); :meth:`redraw` draws a new one.
    """

    def __init__(self, dim: int, heads: int = 8, *, nb_features: int | None = None, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        d = self.qk_dim
        self.nb_features = nb_features or max(1, int(d * math.log(d)))
        self.register_buffer("projection", orthogonal_gaussian(self.nb_features, d))

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw a new random projection (Performer redraws periodically during training)."""
        self.projection.copy_(orthogonal_gaussian(self.nb_features, self.qk_dim, generator=generator))

    def features(self, q, k):
        scale = self.qk_dim ** -0.25  # splits the softmax's 1/sqrt(d) between q and k
        fk, log_scale = positive_random_features(k * scale, self.projection, is_query=False, return_log_scale=True)
        return positive_random_features(q * scale, self.projection, is_query=True), fk, log_scale


# ================================================================================================ lightning


def alibi_slopes(heads: int) -> Tensor:
    """ALiBi's geometric head slopes ``2^(-8 i / H)``, i = 1..H (interleaved for a non-power-of-two H)."""
    def power_of_two(n):
        return [2.0 ** (-8.0 * (i + 1) / n) for i in range(n)]
    p = 2 ** math.floor(math.log2(heads))
    slopes = power_of_two(p)
    if p < heads:
        slopes += power_of_two(2 * p)[0::2][: heads - p]
    return torch.tensor(slopes, dtype=torch.float32)


class _Lightning(KernelAttention):
    """Decayed linear attention without a denominator, ``o_t = sum_{s<=t} lambda^{t-s} (q_t . k_s) v_s``."""

    normalize = False

    def log_gate(self, x, q, k):
        return -self.slopes.to(x.dtype).view(1, -1, 1)  # log(lambda_h) = -slope_h, the same for every token


@register(
    "lightning-attention", family="linear", seed=True, catalog=213,
    paper="Various Lengths, Constant Speed: Efficient Language Modeling with Lightning Attention",
    arxiv="2405.17381", complexity="O(N d^2) time, O(d^2) state; intra-block quadratic, inter-block recurrent",
    caps=_CAUSAL_ONLY, flops=kernel_flops(lambda d, **kw: d),
    test_kwargs=dict(dim=32, heads=4, chunk_size=4),
    summary="TransNormerLLM's attention layer: SiLU q/k/v, per-head exponential decay, tiled linear attention "
            "(quadratic inside blocks, KV state across), LayerNorm and a sigmoid output gate.",
)
class LightningAttention(_Lightning):
    """The TNL (TransNormerLLM) attention layer computed with Lightning Attention.

    ``q, k, v = silu(x W)``; ``o = LayerNorm(lightning(q, k, v; lambda_h)) * sigmoid(x U1 U2)``; ``y = o W_o``, with
    ``lambda_h = exp(-s_h (1 - l / (L - 1) + 1e-5))``: ALiBi slopes ``s_h`` scaled down with the layer index ``l``
    of ``L`` layers (``layer_idx``, ``num_layers``), so deep layers remember longer.
    """

    def __init__(self, dim: int, heads: int = 8, *, layer_idx: int = 0, num_layers: int = 12, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        if not (0 <= layer_idx < max(num_layers, 1)):
            raise shape_error("layer_idx", f"0 <= layer_idx < num_layers = {num_layers}", layer_idx)
        depth = 1 - layer_idx / (num_layers - 1) if num_layers > 1 else 1.0
        self.register_buffer("slopes", alibi_slopes(heads) * (depth + 1e-5), persistent=False)
        inner = heads * self.head_dim
        self.norm = nn.LayerNorm(inner)
        self.gate = nn.Sequential(nn.Linear(dim, self.head_dim, bias=False), nn.Linear(self.head_dim, inner, bias=False))

    def project(self, x, *, hw=None, offset=0):
        return tuple(F.silu(t) for t in super().project(x))

    def features(self, q, k):
        return q, k  # the SiLU is applied in project(); the kernel is the plain dot product

    def finish(self, o, x):
        o = self.norm(rearrange(o, "b h n d -> b n (h d)")) * torch.sigmoid(self.gate(x))
        return self.o_proj(o)


def srms_norm(x: Tensor, eps: float = 1e-6) -> Tensor:
    """Simple RMS norm without a weight (TransNormer's SRMSNorm), over the last dimension, computed in float32."""
    xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
    return (xf * torch.rsqrt(xf.square().mean(dim=-1, keepdim=True) + eps)).to(x.dtype)


@register(
    "lightning-attention-2", family="linear", seed=True, catalog=204,
    paper="Lightning Attention-2: A Free Lunch for Handling Unlimited Sequence Lengths in Large Language Models",
    arxiv="2401.04658", complexity="O(N d^2) time, O(d^2) state; constant speed in N",
    caps=_CAUSAL_ONLY, flops=kernel_flops(lambda d, **kw: d),
    test_kwargs=dict(dim=32, heads=4, chunk_size=4),
    summary="Causal linear attention with per-head decay by tiling: masked (QK^T . M)V inside a block, the "
            "accumulated K^T V state across blocks, no cumsum.",
)
class LightningAttention2(_Lightning):
    """Lightning Attention-2: ``O = ((Q K^T) * M) V`` with ``M_ts = lambda_h^(t-s)``, computed block-wise.

    Args:
        decay: per-head decay ``lambda_h = exp(-s_h)`` with ALiBi slopes (False: Lightning's no-decay kernel).
        activation: on q and k, ``"silu"`` (TNL's choice, default), ``"elu+1"`` or ``"none"``.
        The per-head output is normalised by a weightless RMS norm (SRMSNorm) since there is no denominator.
    """

    _ACTS = {"silu": F.silu, "elu+1": elu_plus_one, "none": lambda t: t}

    def __init__(self, dim: int, heads: int = 8, *, decay: bool = True, activation: str = "silu", **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        if activation not in self._ACTS:
            raise shape_error("activation", f"one of {tuple(self._ACTS)}", repr(activation))
        self.decay, self.activation = decay, activation
        self.register_buffer("slopes", alibi_slopes(heads), persistent=False)

    def features(self, q, k):
        act = self._ACTS[self.activation]
        return act(q), act(k)  # no 1/sqrt(d): the operator has none, and the SRMSNorm after it is scale-free

    def log_gate(self, x, q, k):
        return super().log_gate(x, q, k) if self.decay else None

    def finish(self, o, x):
        return self.output(srms_norm(o))


# ==================================================================================================== based


def _ones(batch: int, n: int, device) -> Tensor:
    return torch.ones(batch, n, dtype=torch.bool, device=device)


def windowed(q: Tensor, k: Tensor, v: Tensor, window: int, *, causal: bool, key_padding_mask: Tensor | None,
             cache: KVCache | None, key: str, return_lse: bool = False):
    """Exact softmax attention in a sliding window -- query ``i`` sees keys ``i - window < j <= i`` (causal) or
    ``|i - j| < window`` -- on the band plan of :mod:`attnlab.ops.window` (O(N * window) time and memory).

    ``q, k, v (B, H, N, D)``; ``return_lse=True`` also returns the log-sum-exp ``(B, H, N)``, to merge with other
    key sets exactly. With a cache, the call continues from the last ``window - 1`` keys kept in
    ``cache.state[key]`` (an O(window) state, independent of the context length): the band is bottom-right aligned,
    so those earlier keys are the past of the new queries.
    """
    if not (isinstance(window, int) and window >= 1):
        raise shape_error("windowed window", "a positive integer", window)
    if cache is not None:
        causal = True
        pk, pv, pm = cache.state.get(key, (k[:, :, :0], v[:, :, :0], None))
        B, n, p = q.shape[0], q.shape[2], pk.shape[2]
        k, v = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        if pm is not None or key_padding_mask is not None:
            key_padding_mask = torch.cat([pm if pm is not None else _ones(B, p, q.device),
                                          key_padding_mask if key_padding_mask is not None
                                          else _ones(B, n, q.device)], dim=1)
        tail = k.shape[2] - max(window - 1, 0)
        cache.state[key] = (k[:, :, tail:], v[:, :, tail:],
                            None if key_padding_mask is None else key_padding_mask[:, tail:])
    if q.shape[2] == 0:
        o = q.new_zeros(*q.shape[:3], v.shape[-1])
        return (o, q.new_full(q.shape[:3], float("-inf"))) if return_lse else o
    plan = band_plan(q.shape[2], k.shape[2], window - 1, 0 if causal else window - 1)
    return tiled_attention(q, k, v, plan, key_padding_mask=key_padding_mask, return_lse=return_lse)


@register(
    "based", family="linear", seed=True, catalog=246,
    paper="Simple linear attention language models balance the recall-throughput tradeoff", arxiv="2402.18668",
    complexity="O(N (d' ^2 d + w d)) time; state O(d'^2 d + w d)", caps=Caps(causal=True, bidirectional=True,
                                                                             dims=(1,), decode=True, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, feature_dim=16, window=64, **kw: (
        4.0 * batch * heads * n * taylor_feature_dim(feature_dim, 2) * head_dim
        + 4.0 * batch * heads * n * min(window, n) * head_dim / (2 if causal else 1)),
    exact_when=dict(parts="window", window=1 << 30),
    test_kwargs=dict(dim=32, heads=4, feature_dim=4, window=3, chunk_size=4),
    summary="Taylor (2nd-order) linear attention with a small feature dimension plus exact sliding-window softmax; "
            "feature dimension and window dial the recurrent state size.",
)
class Based(KernelAttention):
    """BASED: linear attention with the 2nd-order Taylor feature map of ``exp(q . k / sqrt(d'))`` on ``d'``-wide
    q/k projections, plus sliding-window softmax attention; the two outputs are summed.

    Args:
        feature_dim: ``d'``, the q/k width of the linear part (state ``(1 + d' + d'^2) x head_dim`` per head).
        window: the sliding window ``w`` (keys ``i - w < j <= i``; ``|i - j| < w`` when bidirectional).
        parts: ``"both"`` (default), ``"linear"`` or ``"window"`` -- one part alone, e.g. to test each.
        rope: rotary positions on the window part's q/k (the linear part is position-free, as in the paper).
    """

    state_key = "based.linear"
    _PARTS = ("both", "linear", "window")

    def __init__(self, dim: int, heads: int = 8, *, feature_dim: int = 16, window: int = 64, parts: str = "both",
                 rope: bool = True, **kwargs) -> None:
        super().__init__(dim, heads, qk_dim=feature_dim, **kwargs)
        if parts not in self._PARTS:
            raise shape_error("parts", f"one of {self._PARTS}", repr(parts))
        if not (isinstance(window, int) and window >= 1):
            raise shape_error("window", "a positive integer", window)
        if rope and self.head_dim % 2:
            raise shape_error("head_dim", "an even head_dim when rope=True", self.head_dim)
        self.feature_dim, self.window, self.parts, self.rope = feature_dim, window, parts, rope
        inner = heads * self.head_dim
        # the window part is a separate softmax layer in the paper's hybrid: its own projections
        self.wq_proj = nn.Linear(dim, inner, bias=False)
        self.wk_proj = nn.Linear(dim, inner, bias=False)
        self.wv_proj = nn.Linear(dim, inner, bias=False)
        self.wo_proj = nn.Linear(inner, dim, bias=False)
        if parts == "window":
            for p in (self.q_proj, self.k_proj, self.v_proj, self.o_proj):
                p.requires_grad_(False)
        if parts == "linear":
            for p in (self.wq_proj, self.wk_proj, self.wv_proj, self.wo_proj):
                p.requires_grad_(False)

    def features(self, q, k):
        scale = self.feature_dim ** -0.25  # phi(q) . phi(k) = 1 + s + s^2 / 2 with s = q . k / sqrt(d')
        return taylor_features(q * scale, 2), taylor_features(k * scale, 2)

    # the window part is exact softmax attention on these projections (reference_forward uses them)
    def project(self, x, *, hw=None, offset=0):
        q = rearrange(self.wq_proj(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.wk_proj(x), "b n (h d) -> b h n d", h=self.heads)
        v = rearrange(self.wv_proj(x), "b n (h d) -> b h n d", h=self.heads)
        if self.rope:
            pos = torch.arange(offset, offset + x.shape[1], device=x.device)
            cos, sin = rope_cos_sin(pos, self.head_dim, dtype=q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def output(self, o):
        return self.wo_proj(rearrange(o, "b h n d -> b n (h d)"))

    def linear_part(self, x, *, causal, key_padding_mask, cache):
        q, k, v = KernelAttention.project(self, x)
        fq, fk = self.features(q, k)
        o = self.scan(fq, fk, v, causal=causal, key_padding_mask=key_padding_mask, cache=cache)
        return self.o_proj(rearrange(o, "b h n d -> b n (h d)"))

    def window_part(self, x, *, causal, key_padding_mask, cache):
        q, k, v = self.project(x, offset=0 if cache is None else cache.seq_len)
        return self.output(windowed(q, k, v, self.window, causal=causal, key_padding_mask=key_padding_mask,
                                    cache=cache, key="based.window"))

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        y = 0
        if self.parts in ("both", "linear"):
            y = y + self.linear_part(x, causal=causal, key_padding_mask=key_padding_mask, cache=cache)
        if self.parts in ("both", "window"):
            y = y + self.window_part(x, causal=causal, key_padding_mask=key_padding_mask, cache=cache)
        _advance(cache, x.shape[1])
        return y


# ==================================================================================== symmetric Taylor (SATA)


@register(
    "symmetric-taylor-attn", family="linear", seed=True, catalog=135,
    paper="Self-Attention at Constant Cost per Token via Symmetry-Aware Taylor Approximation", arxiv="2602.00294",
    complexity="O(N C(d_k + P, P) d_v) time; the same state per head, constant per token",
    caps=_CAUSAL_AND_BI,
    flops=kernel_flops(lambda d, qk_dim=8, order=4, **kw: taylor_feature_dim(qk_dim, order, symmetric=True)),
    test_kwargs=dict(dim=32, heads=4, qk_dim=2, order=4, chunk_size=4),
    bench_kwargs=dict(qk_dim=8, order=4),
    summary="exp(q . k / sqrt(d)) by its Taylor series to order P, each power in the minimal basis of symmetric "
            "monomials: linear attention that approaches softmax as P grows, at constant cost per token.",
)
class SymmetricTaylorAttention(KernelAttention):
    """Symmetry-aware Taylor attention (Heinsen & Kozachkov, 2026).

    ``exp(s) ~ sum_{p<=P} s^p / p!`` with ``s = q . k / sqrt(d_k)``; each ``(q . k)^p`` is an inner product of
    the unique degree-``p`` monomials of q and k, weighted by ``1 / sqrt(alpha!)`` (``C(d_k + p - 1, p)`` entries
    instead of ``d_k^p``): features ``taylor_features(x / d_k^(1/4), P, symmetric=True)``.

    Args:
        qk_dim: ``d_k``, the query/key width per head (small: the basis grows like ``d_k^P / P!``), default 8.
        order: ``P``, the highest power (default 4; even orders keep the kernel positive, odd ones can make the
            normaliser cross zero for strongly negative logits).
    """

    def __init__(self, dim: int, heads: int = 8, *, qk_dim: int = 8, order: int = 4, **kwargs) -> None:
        if not (isinstance(order, int) and order >= 0):
            raise shape_error("order", "an integer >= 0", order)
        super().__init__(dim, heads, qk_dim=qk_dim, **kwargs)
        self.order = order

    def features(self, q, k):
        scale = self.qk_dim ** -0.25
        return (taylor_features(q * scale, self.order, symmetric=True),
                taylor_features(k * scale, self.order, symmetric=True))


# ========================================================================================= linear log-normal


def block_diagonal_attention(q: Tensor, k: Tensor, v: Tensor, block: int, *, causal: bool,
                             key_padding_mask: Tensor | None = None, offset: int = 0) -> Tensor:
    """Exact softmax attention inside consecutive blocks of ``block`` tokens (blocks aligned to absolute positions
    ``offset + i``). ``q, k, v (B, H, N, D)``; O(N * block)."""
    B, H, N, D = q.shape
    lead = offset % block
    tail = (-(lead + N)) % block
    valid = torch.ones(B, N, dtype=torch.bool, device=q.device) if key_padding_mask is None else key_padding_mask
    pad = lambda t: F.pad(t, (0, 0, lead, tail))  # noqa: E731
    qb, kb, vb = (rearrange(pad(t), "b h (n s) d -> (b n) h s d", s=block) for t in (q, k, v))
    mb = rearrange(F.pad(valid, (lead, tail), value=False), "b (n s) -> (b n) s", s=block)
    out = reference_attention(qb, kb, vb, causal=causal, key_padding_mask=mb)
    return rearrange(out, "(b n) h s d -> b h (n s) d", b=B)[:, :, lead: lead + N]


# moment-matching fit of the paper's official code: sigma_lln^2 = 2 a sigma_tilde^2 + b against sigma_sm^2
_LLN_A, _LLN_B = 0.14855178144710912, -0.35487039130661086


@register(
    "linear-log-normal", family="linear", seed=True, catalog=122,
    paper="Linear Log-Normal Attention with Unbiased Concentration", arxiv="2311.13541",
    complexity="O(N d^2 + N b d) time; state O(d^2 + b d)", caps=_CAUSAL_AND_BI,
    flops=lambda batch, n, heads, head_dim, causal=False, diag=True, **kw: (
        4.0 * batch * heads * n * head_dim * head_dim + (4.0 * batch * heads * n * head_dim * head_dim if diag else 0)),
    test_kwargs=dict(dim=32, heads=4, chunk_size=4, block=3),
    summary="Linear attention with exponential feature maps exp(alpha q), exp(beta k) whose log-normal attention "
            "weights are moment-matched to softmax's concentration, averaged with block-diagonal softmax (LLN+Diag).",
)
class LinearLogNormalAttention(KernelAttention):
    """LLN attention (Nahshan et al., ICLR 2024): ``phi_q(q) = exp(alpha q)``, ``phi_k(k) = exp(beta k)``.

    Moment matching (the official code's fit): ``sigma~^2 = (sigma_q^2 sigma_k^2 - b) / (2 a)`` with
    ``a = 0.1486, b = -0.3549``, ``alpha = sigma~ / sigma_q``, ``beta = sigma~ / sigma_k``. ``sigma_q, sigma_k`` are
    buffers set by :meth:`calibrate` (default 1), so a forward never reads statistics of other tokens or other
    sequences. With ``diag=True`` (LLN+Diag) the output averages LLN and softmax attention inside blocks of
    ``block`` tokens (default: head_dim), which restores sharp short-range attention.
    """

    state_key = "lln.linear"

    def __init__(self, dim: int, heads: int = 8, *, diag: bool = True, block: int | None = None, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        self.diag = diag
        self.block = block or self.head_dim
        if not (isinstance(self.block, int) and self.block >= 1):
            raise shape_error("block", "a positive integer", block)
        self.register_buffer("sigma_q", torch.ones(()))
        self.register_buffer("sigma_k", torch.ones(()))

    @torch.no_grad()
    def calibrate(self, x: Tensor) -> None:
        """Set ``sigma_q, sigma_k`` to the standard deviations of this module's q and k on ``x`` (the paper does it
        on every batch; here it is explicit, e.g. once per training step or on a calibration batch)."""
        q, k, _ = self.project(x)
        self.sigma_q.copy_(q.std())
        self.sigma_k.copy_(k.std())

    def temperatures(self) -> tuple[Tensor, Tensor]:
        """``alpha, beta`` from the moment-matching equation."""
        sq, sk = self.sigma_q.clamp_min(1e-6), self.sigma_k.clamp_min(1e-6)
        tilde = ((sq.square() * sk.square() - _LLN_B) / (2 * _LLN_A)).sqrt()
        return tilde / sq, tilde / sk

    def features(self, q, k):
        alpha, beta = self.temperatures()
        fk, log_scale = exp_features(k, beta.to(k.dtype), return_log_scale=True)
        return exp_features(q, alpha.to(q.dtype), row_shift=True), fk, log_scale

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        q, k, v = self.project(x)
        fq, fk, log_scale = self.features(q, k)
        o = self.scan(fq, fk, v, causal=causal, key_padding_mask=key_padding_mask, key_log_weight=log_scale,
                      cache=cache)
        if self.diag:
            o = 0.5 * (o + self._block_diag(q, k, v, causal=causal, key_padding_mask=key_padding_mask, cache=cache))
        _advance(cache, x.shape[1])
        return self.output(o)

    def _block_diag(self, q, k, v, *, causal, key_padding_mask, cache):
        if cache is None:
            return block_diagonal_attention(q, k, v, self.block, causal=causal, key_padding_mask=key_padding_mask)
        # decoding: the keys of the current block so far (< block tokens) are the only state this part needs
        offset = cache.seq_len
        pk, pv, pm = cache.state.get("lln.block", (k[:, :, :0], v[:, :, :0], None))
        p = pk.shape[2]
        n = q.shape[2]
        kk, vv = torch.cat([pk, k], dim=2), torch.cat([pv, v], dim=2)
        qq = torch.cat([torch.zeros_like(pk), q], dim=2)  # dummy queries for the past positions, dropped below
        mask = None
        if pm is not None or key_padding_mask is not None:
            ones = lambda m: torch.ones(q.shape[0], m, dtype=torch.bool, device=q.device)  # noqa: E731
            mask = torch.cat([pm if pm is not None else ones(p), key_padding_mask if key_padding_mask is not None
                              else ones(n)], dim=1)
        o = block_diagonal_attention(qq, kk, vv, self.block, causal=True, key_padding_mask=mask, offset=offset - p)
        keep = (offset + n) % self.block  # tokens of the block still open after this call
        tail = kk.shape[2] - keep
        cache.state["lln.block"] = (kk[:, :, tail:], vv[:, :, tail:], None if mask is None else mask[:, tail:])
        return o[:, :, p:]


# ==================================================================================================== aaren


def prefix_softmax_scan(scores: Tensor, v: Tensor) -> Tensor:
    """All prefix softmax averages ``o_t = sum_{j<=t} softmax(s_{1..t})_j v_j`` by a parallel (Hillis-Steele)
    prefix scan of online-softmax states with :func:`attnlab.ops.online.merge`: log2(N) rounds of O(N) merges.

    ``scores (..., N)`` (masked keys ``-inf``), ``v (..., N, Dv)``; returns the scan's states ``(m, l, acc)``.
    """
    n = scores.shape[-1]
    m, l, acc = scores, torch.isfinite(scores).to(scores.dtype), v * torch.isfinite(scores).unsqueeze(-1)
    shift = 1
    while shift < n:
        a = SoftmaxState(m[..., :-shift], l[..., :-shift], acc[..., :-shift, :])
        b = SoftmaxState(m[..., shift:], l[..., shift:], acc[..., shift:, :])
        merged = merge(a, b)  # token t absorbs the state of tokens (t - 2*shift, t - shift]
        m = torch.cat([m[..., :shift], merged.m], dim=-1)
        l = torch.cat([l[..., :shift], merged.l], dim=-1)
        acc = torch.cat([acc[..., :shift, :], merged.acc], dim=-2)
        shift *= 2
    return SoftmaxState(m, l, acc)


def _finish_states(state: SoftmaxState) -> Tensor:
    m, l, acc = state
    return acc / torch.where(l == 0, torch.ones_like(l), l).unsqueeze(-1)


@register(
    "aaren", family="linear", seed=True, catalog=242,
    paper="Attention as an RNN", arxiv="2405.13956",
    complexity="O(N log N d) parallel prefix scan; O(d) state per head when decoding",
    caps=_CAUSAL_AND_BI, exact_when={},
    flops=lambda batch, n, heads, head_dim, causal=False, **kw: 4.0 * batch * heads * n * head_dim,
    test_kwargs=dict(dim=32, heads=4),
    summary="Softmax attention of a learned query over the prefix, for every prefix at once by a parallel scan of "
            "(max, sum, weighted sum) states; updates with a new token in O(1).",
)
class Aaren(Mechanism):
    """Aaren (Feng et al., 2024): ``o_t = softmax(q . k_{1..t} / sqrt(d)) v_{1..t}`` with a learned query ``q`` per
    head (not tied to the input token), computed for all ``t`` by a prefix scan of online-softmax states.

    Args:
        form: ``"scan"`` (default, the parallel prefix scan) or ``"recurrent"`` (token by token, the RNN view).
        Non-causal: every output is the attention over all keys (the many-to-one output, broadcast).
    """

    _FORMS = ("scan", "recurrent")

    def __init__(self, dim: int, heads: int = 8, *, head_dim: int | None = None, bias: bool = False,
                 form: str = "scan") -> None:
        super().__init__()
        head_dim = _check_heads(dim, heads, head_dim)
        if form not in self._FORMS:
            raise shape_error("form", f"one of {self._FORMS}", repr(form))
        self.dim, self.heads, self.head_dim, self.form = dim, heads, head_dim, form
        self.query = nn.Parameter(torch.randn(heads, head_dim) * head_dim ** -0.5)
        self.k_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, heads * head_dim, bias=bias)
        self.o_proj = nn.Linear(heads * head_dim, dim, bias=bias)

    def project(self, x, *, hw=None, offset=0):
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.heads)
        q = self.query.to(x.dtype)[None, :, None, :].expand(x.shape[0], -1, x.shape[1], -1)
        return q, k, v

    def output(self, o):
        return self.o_proj(rearrange(o, "b h n d -> b n (h d)"))

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        _, k, v = self.project(x)
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        s = torch.einsum("hd,bhnd->bhn", self.query.to(cd), k.to(cd)) * self.head_dim ** -0.5
        if key_padding_mask is not None:
            s = s.masked_fill(~key_padding_mask[:, None, :], float("-inf"))
        vc = v.to(cd)
        if not causal:
            m = s.amax(dim=-1, keepdim=True)
            p = torch.exp(s - torch.where(torch.isfinite(m), m, torch.zeros_like(m)))
            o = (p.unsqueeze(-1) * vc).sum(-2, keepdim=True) / p.sum(-1, keepdim=True).clamp_min(
                torch.finfo(cd).tiny).unsqueeze(-1)
            o = torch.where(torch.isfinite(m).unsqueeze(-1), o, torch.zeros_like(o)).expand_as(vc)
            return self.output(o.to(x.dtype))
        init = None if cache is None else cache.state.get("aaren")
        if self.form == "scan":
            states = prefix_softmax_scan(s, vc)
            if init is not None:  # fold in the past: one merge with the carried state, broadcast over positions
                states = merge(SoftmaxState(init.m.unsqueeze(-1), init.l.unsqueeze(-1), init.acc.unsqueeze(-2)),
                               states)
        else:
            states = self._recurrent(s, vc, init)
        if cache is not None:
            cache.state["aaren"] = SoftmaxState(states.m[..., -1], states.l[..., -1], states.acc[..., -1, :])
        _advance(cache, x.shape[1])
        return self.output(_finish_states(states).to(x.dtype))

    @staticmethod
    def _recurrent(s: Tensor, v: Tensor, init: SoftmaxState | None) -> SoftmaxState:
        B, H, N = s.shape
        state = init if init is not None else SoftmaxState(
            s.new_full((B, H), float("-inf")), s.new_zeros(B, H), v.new_zeros(B, H, v.shape[-1]))
        ms, ls, accs = [], [], []
        for t in range(N):
            fin = torch.isfinite(s[..., t])
            tok = SoftmaxState(s[..., t], fin.to(s.dtype), v[..., t, :] * fin.unsqueeze(-1))
            state = merge(state, tok)
            ms.append(state.m), ls.append(state.l), accs.append(state.acc)
        return SoftmaxState(torch.stack(ms, -1), torch.stack(ls, -1), torch.stack(accs, -2))


# ==================================================================================================== liger


@register(
    "liger", family="linear", seed=True, catalog=202,
    paper="Liger: Linearizing Large Language Models to Gated Recurrent Structures", arxiv="2503.01496",
    complexity="O(N (d^2 + w d)) time; state O(d^2 + w d) per head",
    caps=_CAUSAL_ONLY,
    flops=lambda batch, n, heads, head_dim, causal=True, window=64, **kw: (
        4.0 * batch * heads * n * head_dim * head_dim + 2.0 * batch * heads * n * min(window, n) * head_dim),
    test_kwargs=dict(dim=32, heads=4, kv_heads=2, window=3, chunk_size=4),
    summary="Liger Attention: an attention layer's own q/k/v weights reused as gated linear attention (gates "
            "pooled from the key projection, softmax feature maps) mixed half-half with sliding-window softmax.",
)
class Liger(KernelAttention):
    """Liger (Lan et al., 2025), the GLA variant of its official code, with Liger Attention's hybrid.

    Built from an attention layer's weights with no new parameters: ``q, k, v = x W_q, x W_k, x W_v`` (the
    pretrained projections), feature maps ``softmax(q), softmax(k)`` over the head dimension, per-feature gates
    ``log g = logsigmoid(x W_k) / 16`` reusing the key projection, and the gated recurrence
    ``S_t = diag(g_t) S_{t-1} + phi(k_t) v_tᵀ``, ``o_t = phi(q_t) S_t`` (no denominator). Liger Attention averages
    it with sliding-window softmax attention (RoPE, window 64) on the same projections: ``o = (o_gla + o_swa) / 2``.
    Use :meth:`from_attention` to linearise an existing ``mha``/``gqa`` module.
    """

    normalize = False
    state_key = "liger.gla"

    def __init__(self, dim: int, heads: int = 8, *, kv_heads: int | None = None, window: int = 64,
                 rope: bool = True, rope_base: float = 10000.0, gate_normalizer: float = 16.0,
                 chunk_size: int = 32, **kwargs) -> None:
        super().__init__(dim, heads, chunk_size=chunk_size, **kwargs)
        kv_heads = heads if kv_heads is None else kv_heads
        if kv_heads < 1 or heads % kv_heads:
            raise shape_error("heads / kv_heads", "positive with heads divisible by kv_heads", (heads, kv_heads))
        if not (isinstance(window, int) and window >= 1):
            raise shape_error("window", "a positive integer", window)
        if rope and self.head_dim % 2:
            raise shape_error("head_dim", "an even head_dim when rope=True", self.head_dim)
        self.kv_heads, self.window, self.rope, self.rope_base = kv_heads, window, rope, rope_base
        self.gate_normalizer = gate_normalizer
        bias = self.q_proj.bias is not None
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=bias)

    @classmethod
    def from_attention(cls, attn: Mechanism, **kwargs) -> "Liger":
        """A Liger layer with the q/k/v/o weights of an attention module (``mha``, ``gqa``, ``mqa``): no new
        parameters (the paper then recovers quality with LoRA fine-tuning)."""
        layer = cls(attn.dim, attn.heads, kv_heads=getattr(attn, "kv_heads", attn.heads),
                    head_dim=attn.head_dim, bias=attn.q_proj.bias is not None, **kwargs)
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(layer, name).load_state_dict(getattr(attn, name).state_dict())
        return layer.to(dtype=attn.q_proj.weight.dtype, device=attn.q_proj.weight.device)

    def project(self, x, *, hw=None, offset=0):
        q = rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.k_proj(x), "b n (h d) -> b h n d", h=self.kv_heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.kv_heads)
        return q, k, v

    def features(self, q, k):
        return torch.softmax(q, dim=-1), torch.softmax(k, dim=-1)

    def log_gate(self, x, q, k):
        return F.logsigmoid(k) / self.gate_normalizer  # per feature: the key projection doubles as the gate

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        q, k, v = self.project(x)
        fq, fk = self.features(q, k)
        o_gla = self.scan(fq, fk, v, causal=True, key_padding_mask=key_padding_mask, log_gate=self.log_gate(x, q, k),
                          cache=cache)
        if self.rope:
            start = 0 if cache is None else cache.seq_len
            cos, sin = rope_cos_sin(torch.arange(start, start + x.shape[1], device=x.device), self.head_dim,
                                    base=self.rope_base, dtype=q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o_swa = windowed(q, k, v, self.window, causal=True, key_padding_mask=key_padding_mask, cache=cache,
                         key="liger.window")
        _advance(cache, x.shape[1])
        return self.output(0.5 * (o_gla + o_swa))


# ========================================================================================== agent attention


def adaptive_pool_matrix(mask: Tensor, bins: int) -> Tensor:
    """``(B, bins, N)`` averaging matrix of adaptive average pooling over each sequence's *kept* tokens.

    Token ``j`` with rank ``r`` among the ``L`` kept tokens belongs to bin ``i`` when
    ``floor(i L / bins) <= r < ceil((i + 1) L / bins)`` (``AdaptiveAvgPool1d``'s bins, over the kept tokens only,
    so padding changes nothing); a sequence with no kept token gets an all-zero matrix.
    """
    mask = mask.to(torch.long)
    L = mask.sum(dim=1, keepdim=True)  # (B, 1)
    rank = mask.cumsum(dim=1) - 1  # (B, N)
    i = torch.arange(bins, device=mask.device).view(1, bins, 1)
    start = torch.div(i * L.unsqueeze(-1), bins, rounding_mode="floor")
    end = -torch.div(-(i + 1) * L.unsqueeze(-1), bins, rounding_mode="floor")  # ceil
    member = (rank.unsqueeze(1) >= start) & (rank.unsqueeze(1) < end) & mask.bool().unsqueeze(1)
    member = member.to(torch.float32)
    return member / member.sum(dim=-1, keepdim=True).clamp_min(1)


@register(
    "agent-attention", family="linear", seed=True, catalog=46,
    approximates_softmax=False,  # its own token mixer, not an estimate of softmax attention: no fidelity row
    paper="Agent Attention: On the Integration of Softmax and Linear Attention", arxiv="2312.08874",
    complexity="O(N n d) time, n agent tokens", caps=Caps(causal=False, bidirectional=True, dims=(1, 2),
                                                          decode=False, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, agents=49, **kw: 8.0 * batch * heads * n * agents * head_dim,
    test_kwargs=dict(dim=32, heads=4, agents=4),
    summary="n agent tokens pooled from the queries first aggregate the values by softmax over the keys, then "
            "broadcast them back by softmax over the agents: a generalised linear attention; plus a depthwise "
            "convolution of the values.",
)
class AgentAttention(Mechanism):
    """Agent Attention (Han et al., 2024): the quadruple (Q, A, K, V).

    ``A = pool(Q)`` (adaptive average pooling to ``agents`` tokens: a ``sqrt(agents)^2`` grid on 2-D maps),
    ``V_A = softmax(A Kᵀ / sqrt(d)) V`` (agent aggregation), ``O = softmax(Q Aᵀ / sqrt(d)) V_A`` (agent
    broadcast), ``y = (O + DWC(V)) W_o`` with a 3x3 depthwise convolution of the values (1-D sequences are 1 x N
    maps). Non-causal (agents pool over all queries).
    """

    def __init__(self, dim: int, heads: int = 8, *, agents: int = 49, head_dim: int | None = None,
                 bias: bool = False) -> None:
        super().__init__()
        head_dim = _check_heads(dim, heads, head_dim)
        if not (isinstance(agents, int) and agents >= 1):
            raise shape_error("agents", "a positive integer", agents)
        self.dim, self.heads, self.head_dim, self.agents = dim, heads, head_dim, agents
        inner = heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(dim, inner, bias=bias)
        self.v_proj = nn.Linear(dim, inner, bias=bias)
        self.o_proj = nn.Linear(inner, dim, bias=bias)
        self.dwc = nn.Conv2d(inner, inner, 3, padding=1, groups=inner)

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        from ..errors import UnsupportedError
        from ..ops import attention
        if hw is not None and key_padding_mask is not None:
            raise UnsupportedError(self.spec.id, "key_padding_mask with 2-D input (hw=...)")
        B, N, _ = x.shape
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if hw is None:
            mask = key_padding_mask if key_padding_mask is not None else _ones(B, N, x.device)
            agents = adaptive_pool_matrix(mask, self.agents).to(q.dtype) @ q  # (B, n, inner)
            h, w = 1, N
        else:
            h, w = hw
            side = max(1, round(math.sqrt(self.agents)))
            grid = rearrange(q, "b (h w) c -> b c h w", h=h)
            agents = rearrange(F.adaptive_avg_pool2d(grid, (side, side)), "b c h w -> b (h w) c")
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads)  # noqa: E731
        qh, kh, vh, ah = split(q), split(k), split(v), split(agents)
        agent_v = attention(ah, kh, vh, key_padding_mask=key_padding_mask)  # agents aggregate the values
        o = attention(qh, ah, agent_v)  # and broadcast them to the queries
        if key_padding_mask is not None:
            v = v.masked_fill(~key_padding_mask.unsqueeze(-1), 0.0)  # padded values do not leak through the conv
        local = rearrange(self.dwc(rearrange(v, "b (h w) c -> b c h w", h=h)), "b c h w -> b (h w) c")
        return self.o_proj(rearrange(o, "b h n d -> b n (h d)") + local)


# ====================================================================================================== RAT


@register(
    "rat-recurrence-attn", family="linear", seed=True, catalog=237,
    approximates_softmax=False,  # its own token mixer, not an estimate of softmax attention: no fidelity row
    paper="RAT: Bridging RNN Efficiency and Attention Accuracy in Language Modeling", arxiv="2507.04416",
    complexity="O(N L d + N (N / L) d) time; KV cache N / L per head", caps=_CAUSAL_ONLY,
    flops=lambda batch, n, heads, head_dim, causal=True, chunk=16, **kw: (
        6.0 * batch * heads * n * head_dim + 2.0 * batch * heads * n * (n / chunk) * head_dim),
    test_kwargs=dict(dim=32, heads=4, chunk=3),
    summary="Gated linear recurrence inside chunks of L tokens, softmax attention over the chunks' final "
            "key/value states (plus the token's own running state): L interpolates between attention and an RNN.",
)
class RecurrenceAttention(Mechanism):
    """RAT (Wei et al., 2025), the layer of the official code without its pre-norm and residual.

    ``z, x, g = sigmoid(x W_z), x W_x, sigmoid(x W_g + b_g)``; q and k from ``ngroups`` shared heads.
    Intra-chunk recurrence (reset every ``chunk`` tokens): ``v~_t = g_t * v~_{t-1} + (1 - g_t) * x_t`` and the same
    for ``k~_t`` (elementwise, one gate per channel). Inter-chunk attention: token ``t`` in chunk ``c`` attends with
    softmax to the final states ``(k~, v~)`` of chunks ``0..c-1`` and to its own ``(k~_t, v~_t)``;
    ``y = (z * o) W_o``. The recurrence runs on the shared scan (channels as heads, ``reset_every = chunk``); the two
    softmax parts are combined with the online-softmax ``merge``.
    """

    def __init__(self, dim: int, heads: int = 8, *, chunk: int = 16, ngroups: int | None = None,
                 head_dim: int | None = None) -> None:
        super().__init__()
        head_dim = _check_heads(dim, heads, head_dim)
        ngroups = ngroups or (2 if heads % 2 == 0 else 1)
        if heads % ngroups:
            raise shape_error("ngroups", f"a divisor of heads = {heads}", ngroups)
        if not (isinstance(chunk, int) and chunk >= 1):
            raise shape_error("chunk", "a positive integer", chunk)
        self.dim, self.heads, self.head_dim, self.chunk, self.ngroups = dim, heads, head_dim, chunk, ngroups
        inner = heads * head_dim
        self.zxg_proj = nn.Linear(dim, 3 * inner, bias=False)
        self.qk_proj = nn.Linear(dim, 2 * ngroups * head_dim, bias=False)
        # gate bias log(U(1, L - 1)) as in the official initialisation: g starts between 1/2 and 1 - 1/L
        self.gate_bias = nn.Parameter(torch.log(torch.empty(inner).uniform_(1, max(chunk - 1, 1) + 1e-3)))
        self.o_proj = nn.Linear(inner, dim, bias=False)

    def _intra(self, x, k, g, key_padding_mask, cache):
        """``(k~, v~, seen)`` of every token: the gated recurrence over channels, restarted at each chunk; ``seen``
        (B, N) says whether the chunk so far holds a kept token (a third value column of ones counts them)."""
        chan = lambda t: rearrange(t, "b n c -> b c n").unsqueeze(-1)  # noqa: E731  (B, C, N, 1): channels as heads
        vals = torch.cat([chan(x), chan(k), torch.ones_like(chan(x))], dim=-1)  # values and keys share the gate
        state = None if cache is None else cache.state.get("rat.intra")
        out = linear_attention(torch.ones_like(chan(g)), chan(1 - g), vals, causal=True,
                               key_padding_mask=key_padding_mask, log_gate=rearrange(torch.log(g), "b n c -> b c n"),
                               normalize=False, form="recurrent", reset_every=self.chunk,
                               offset=0 if cache is None else cache.seq_len, initial_state=state,
                               return_state=cache is not None)
        if cache is not None:
            out, cache.state["rat.intra"] = out
        back = lambda t: rearrange(t, "b c n -> b n c")  # noqa: E731
        return back(out[..., 1]), back(out[..., 0]), out[:, 0, :, 2] > 0

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        from ..ops import chunked_attention
        from ..ops.online import finalize, from_partial
        B, N, _ = x.shape
        z, xv, g = self.zxg_proj(x).chunk(3, dim=-1)
        z, g = torch.sigmoid(z), torch.sigmoid(g + self.gate_bias)
        q, k = self.qk_proj(x).chunk(2, dim=-1)
        reps = self.heads // self.ngroups
        k_t, v_t, seen = self._intra(xv, k.repeat(1, 1, reps), g, key_padding_mask, cache)  # groups tiled over heads
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads)  # noqa: E731
        qh, kh, vh = split(q.repeat(1, 1, reps)), split(k_t), split(v_t)
        start = 0 if cache is None else cache.seq_len
        pos = torch.arange(start, start + N, device=x.device)
        # chunks ending inside this call: their last token's states are the keys/values of inter-chunk attention
        ends = ((pos + 1) % self.chunk == 0).nonzero().squeeze(-1)
        k_end, v_end, valid = kh[:, :, ends], vh[:, :, ends], seen[:, ends]  # a chunk with no kept token: masked
        chunk_ids = torch.div(pos[ends], self.chunk, rounding_mode="floor")
        if cache is not None:  # the KV cache of RAT: one entry per chunk
            pk, pv, pm, pid = cache.state.get("rat.chunks", (k_end[:, :, :0], v_end[:, :, :0], valid[:, :0],
                                                              chunk_ids[:0]))
            k_end, v_end = torch.cat([pk, k_end], dim=2), torch.cat([pv, v_end], dim=2)
            valid, chunk_ids = torch.cat([pm, valid], dim=1), torch.cat([pid, chunk_ids])
            cache.state["rat.chunks"] = (k_end, v_end, valid, chunk_ids)
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        own_logit = (qh.to(cd) * kh.to(cd)).sum(-1) * self.head_dim ** -0.5
        own = SoftmaxState(own_logit, torch.ones_like(own_logit), vh.to(cd))  # the token's own running state
        if k_end.shape[2]:
            sees = chunk_ids.view(1, -1) < torch.div(pos, self.chunk, rounding_mode="floor").view(-1, 1)  # (N, n)
            o_c, lse = chunked_attention(qh, k_end, v_end, attn_mask=sees, key_padding_mask=valid, return_lse=True)
            state = merge(from_partial(o_c, lse), own)
        else:
            state = own
        o, _ = finalize(state)
        _advance(cache, N)
        return self.o_proj(z * rearrange(o.to(x.dtype), "b h n d -> b n (h d)"))


# ================================================================================================ ecoformer


class _SignSTE(torch.autograd.Function):
    """sign(x) forward; straight-through gradient inside [-1, 1] (EcoFormer's binary quantiser)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * (x.abs() < 1).to(grad.dtype)


@register(
    "ecoformer", family="linear", seed=True, catalog=56,
    paper="EcoFormer: Energy-Saving Attention with Linear Complexity", arxiv="2209.09004",
    complexity="O(N b d) time, b-bit codes; state O(b d)", caps=_CAUSAL_AND_BI,
    flops=kernel_flops(lambda d, bits=16, **kw: bits + 1),
    test_kwargs=dict(dim=32, heads=4, bits=6, anchors=5, chunk_size=4),
    conformance_skip={"gradcheck": "the hash is sign(); its derivative is 0 almost everywhere and the layer "
                                   "trains through a straight-through estimator by design, which finite differences "
                                   "cannot reproduce (all other checks run)"},
    summary="Kernelised hashing maps queries/keys to b-bit binary codes; attention is linear attention on the "
            "Hamming affinity (b - Hamming distance), replacing most multiply-accumulates by accumulations.",
)
class EcoFormer(KernelAttention):
    """EcoFormer (Liu et al., NeurIPS 2022), following the official code.

    ``x~ = normalize(x W_qk)`` (queries and keys share one projection, unit norm); kernelised hash
    ``h(x~) = sign(A (kappa(x~) - mu))`` with RBF features ``kappa_i = exp(-|x~ - a_i|^2 / (2 sigma))`` on ``m``
    anchors; attention is normalised linear attention with the kernel ``(b + h(q) . h(k)) / 2 = b - Hamming``.
    The hash functions ``A`` (b x m), anchors, ``mu`` and ``sigma`` are buffers: random at construction, learned by
    :meth:`fit_hash` from the module's own attention (the paper's self-supervised kernel-based supervised hashing),
    never by backpropagation. Gradients reach ``W_qk`` through a straight-through sign.
    """

    def __init__(self, dim: int, heads: int = 8, *, bits: int = 16, anchors: int = 20, **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        if bits < 1 or anchors < 1:
            raise shape_error("bits, anchors", "positive integers", (bits, anchors))
        self.bits, self.num_anchors = bits, anchors
        del self.k_proj  # queries and keys share the projection
        d = self.qk_dim
        self.register_buffer("hash_weight", torch.randn(heads, bits, anchors))
        self.register_buffer("anchors", F.normalize(torch.randn(heads, anchors, d), dim=-1))
        self.register_buffer("kernel_mean", torch.zeros(heads, anchors))
        self.register_buffer("sigma", torch.ones(heads))

    def project(self, x, *, hw=None, offset=0):
        qk = F.normalize(rearrange(self.q_proj(x), "b n (h d) -> b h n d", h=self.heads), dim=-1)
        return qk, qk, rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.heads)

    def kernel_features(self, x: Tensor) -> Tensor:
        """Centred RBF features on the anchors, ``(B, H, N, m)``."""
        d2 = (x.unsqueeze(-2) - self.anchors.to(x.dtype)[None, :, None]).square().sum(-1)
        kappa = torch.exp(-d2 / (2 * self.sigma.to(x.dtype).view(1, -1, 1, 1)))
        return kappa - self.kernel_mean.to(x.dtype)[None, :, None]

    def codes(self, x: Tensor) -> Tensor:
        """``b``-bit codes in {-1, +1}, ``(B, H, N, b)``."""
        y = torch.einsum("bhnm,hkm->bhnk", self.kernel_features(x), self.hash_weight.to(x.dtype))
        return _SignSTE.apply(y)

    def features(self, q, k):
        from ..ops.linear import binary_hash_features
        f = binary_hash_features(self.codes(q))
        return f, f

    @torch.no_grad()
    def fit_hash(self, x: Tensor, *, topk: int = 5, iterations: int = 100, lr: float = 5e-4,
                 generator: torch.Generator | None = None) -> None:
        """Learn the hash functions on ``x (B, N, C)`` as EcoFormer does (once, before training).

        Anchors are ``m`` random tokens, ``sigma`` the mean squared token-anchor distance, ``mu`` the mean kernel
        feature. The similarity target ``S`` marks each token's ``topk`` most similar tokens +1 and least similar
        -1 (in the module's own q.k); ``A`` minimises ``-sum_k y_k^T S y_k / (N b)`` over the relaxed codes
        ``y = 2 sigmoid(kappa A) - 1`` by Nesterov SGD, kept only if the binary codes' loss improves.
        """
        qk, _, _ = self.project(x)
        B, H, N, d = qk.shape
        idx = torch.randperm(N, generator=generator)[: self.num_anchors]
        self.anchors.copy_(qk[0][:, idx].to(self.anchors.dtype))
        self.sigma.copy_((qk.unsqueeze(-2) - self.anchors[None, :, None]).square().sum(-1).mean(dim=(0, 2, 3)))
        kappa = torch.exp(-(qk.unsqueeze(-2) - self.anchors[None, :, None]).square().sum(-1)
                          / (2 * self.sigma.view(1, -1, 1, 1)))
        self.kernel_mean.copy_(kappa.mean(dim=(0, 2)))
        feats = kappa - self.kernel_mean[None, :, None]
        sim = qk @ qk.transpose(-1, -2)
        target = torch.zeros_like(sim)
        kk = min(topk, N)
        target.scatter_(-1, sim.topk(kk, dim=-1).indices, 1.0)
        target.scatter_(-1, sim.topk(kk, dim=-1, largest=False).indices, -1.0)
        target = target * self.bits

        def loss(y):
            return -(torch.einsum("bhnk,bhnl->bhlk", y, target) * y).sum(dim=2).sum(-1).mean() / (N * self.bits)

        A = self.hash_weight.clone().requires_grad_()
        opt = torch.optim.SGD([A], lr=lr, momentum=0.9, nesterov=True)
        with torch.enable_grad():
            for _ in range(iterations):
                y = 2 * torch.sigmoid(torch.einsum("bhnm,hkm->bhnk", feats, A)) - 1
                opt.zero_grad()
                loss(y).backward()
                opt.step()
        binary = lambda W: torch.sign(torch.einsum("bhnm,hkm->bhnk", feats, W))  # noqa: E731
        if loss(binary(A.detach())) < loss(binary(self.hash_weight)):
            self.hash_weight.copy_(A.detach())


# ==================================================================================================== FAST


@register(
    "fast-factorizable", family="linear", seed=True, catalog=193,
    paper="FAST: Factorizable Attention for Speeding up Transformers", arxiv="2402.07901",
    complexity="O(N d^(p+1)) time (p = 1, 2); state O(d^p d)", caps=_CAUSAL_AND_BI,
    flops=kernel_flops(lambda d, p=2, **kw: taylor_feature_dim(d, p, symmetric=True)),
    test_kwargs=dict(dim=32, heads=4, chunk_size=4),
    summary="Fastmax: attention weights a0 + a1 s + a2 s^2 of normalised q . k (a truncated exp), factorised like "
            "a fast multipole expansion so all-to-all interactions cost O(N).",
)
class FastAttention(KernelAttention):
    """FAST / Fastmax (Gerami et al., 2024): ``w(q, k) = 1 + s + s^2 / 2`` (``p = 2``) or ``1 + s`` (``p = 1``),
    ``s = q^ . k^ / T``, normalised over the keys, and computed through its factorisation (the moments
    ``sum_j k_j^{(x)p} v_jᵀ``) instead of the N x N matrix.

    ``normalize="token"`` (default) scales every q and k to unit norm, so ``|s| <= 1 / T`` and ``1 + s >= 0``
    for ``T >= 1``; ``"sequence"`` divides by the largest norm in the sequence as the official code does
    (non-causal only: it reads every token); ``"none"`` uses ``s = q . k / sqrt(d)``.
    """

    _NORMS = ("token", "sequence", "none")

    def __init__(self, dim: int, heads: int = 8, *, p: int = 2, temperature: float = 1.0, normalize: str = "token",
                 **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        if p not in (1, 2):
            raise shape_error("p", "1 or 2", p)
        if normalize not in self._NORMS:
            raise shape_error("normalize", f"one of {self._NORMS}", repr(normalize))
        self.p, self.temperature, self.norm_mode = p, temperature, normalize

    def _unit(self, x: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        if self.norm_mode == "token":
            return F.normalize(x, dim=-1)
        if self.norm_mode == "sequence":
            norms = x.norm(dim=-1)
            if key_padding_mask is not None:
                norms = norms.masked_fill(~key_padding_mask[:, None, :], 0.0)
            return x / norms.amax(dim=-1, keepdim=True).clamp_min(1e-12).unsqueeze(-1)
        return x * self.qk_dim ** -0.25

    def features(self, q, k):
        scale = self.temperature ** -0.5
        return (taylor_features(q * scale, self.p, symmetric=True), taylor_features(k * scale, self.p, symmetric=True))

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        from ..errors import UnsupportedError
        if self.norm_mode == "sequence" and causal:
            raise UnsupportedError(self.spec.id, "causal=True with normalize='sequence'", "it reads every token")
        q, k, v = self.project(x)
        fq, fk = self.features(self._unit(q, key_padding_mask), self._unit(k, key_padding_mask))
        o = self.scan(fq, fk, v, causal=causal, key_padding_mask=key_padding_mask, cache=cache)
        _advance(cache, x.shape[1])
        return self.output(o)


# ==================================================================================================== InfSA


@register(
    "infsa", family="linear", seed=True, catalog=7,
    approximates_softmax=False,  # its own token mixer, not an estimate of softmax attention: no fidelity row
    paper="Self-Attention And Beyond the Infinite: Towards Linear Transformers with Infinite Self-Attention",
    arxiv="2603.00175",
    complexity="InfSA: O(N^2 d) (+ O(N^3) for the infinite series); Linear-InfSA: O(N d), O(d) state",
    caps=Caps(causal=False, bidirectional=True, dims=(1, 2), decode=False, padding=True),
    flops=lambda batch, n, heads, head_dim, causal=False, variant="neumann", hops=None, **kw: (
        4.0 * batch * heads * n * head_dim if variant == "linear"
        else 4.0 * batch * heads * n * n * head_dim + (2.0 * batch * heads * n ** 3 / 3 if hops is None
                                                       else 2.0 * (hops - 1) * batch * heads * n * n * head_dim)),
    test_kwargs=dict(dim=32, heads=4),
    summary="Attention as diffusion on a token graph: the discounted Neumann series sum_k (rho A)^k over a "
            "Frobenius-normalised ReLU affinity (Katz centrality), or its linear-time principal-eigenvector "
            "approximation with an O(d) state.",
)
class InfiniteSelfAttention(Mechanism):
    """InfSA and Linear-InfSA (Roffo et al., 2026), following the official code's score functions.

    ``A = ReLU(Q Kᵀ / d) / ||ReLU(Q Kᵀ / d)||_F`` (spectral radius <= 1), ``rho = sigmoid(rho_logit)``.

    * ``variant="neumann"``: ``O = sum_{k=1..hops} (rho A)^k V``; ``hops=None`` sums the infinite series exactly,
      ``(I - rho A)^{-1} rho A V`` (a linear solve); ``hops=1`` is the official code's single-hop layer.
    * ``variant="linear"``: Linear-InfSA. An energy-weighted query summary ``q_bar = sum_t ||q_t|| q_t / sum ||q||``
      stands in for the principal eigenvector; ``a = ReLU(q_bar Kᵀ / d)``, normalised to sum 1;
      ``o = rho sum_j a_j v_j`` for every token (O(N d), state ``O(d)``).
    """

    _VARIANTS = ("neumann", "linear")

    def __init__(self, dim: int, heads: int = 8, *, variant: str = "neumann", hops: int | None = None,
                 rho: float = 0.95, head_dim: int | None = None, bias: bool = False, eps: float = 1e-6) -> None:
        super().__init__()
        head_dim = _check_heads(dim, heads, head_dim)
        if variant not in self._VARIANTS:
            raise shape_error("variant", f"one of {self._VARIANTS}", repr(variant))
        if hops is not None and not (isinstance(hops, int) and hops >= 1):
            raise shape_error("hops", "a positive integer or None (the infinite series)", hops)
        if not 0 < rho < 1:
            raise shape_error("rho", "a number in (0, 1)", rho)
        self.dim, self.heads, self.head_dim = dim, heads, head_dim
        self.variant, self.hops, self.eps = variant, hops, eps
        inner = heads * head_dim
        self.q_proj = nn.Linear(dim, inner, bias=bias)
        self.k_proj = nn.Linear(dim, inner, bias=bias)
        self.v_proj = nn.Linear(dim, inner, bias=bias)
        self.o_proj = nn.Linear(inner, dim, bias=bias)
        self.rho_logit = nn.Parameter(torch.tensor(math.log(rho / (1 - rho))))

    def affinity(self, q: Tensor, k: Tensor, key_padding_mask: Tensor | None) -> Tensor:
        """``rho A``: the Frobenius-normalised ReLU affinity, padded rows and columns zero, ``(B, H, N, N)``."""
        A = torch.relu(q @ k.transpose(-1, -2) / self.head_dim)
        if key_padding_mask is not None:
            keep = key_padding_mask[:, None, :, None] & key_padding_mask[:, None, None, :]
            A = A.masked_fill(~keep, 0.0)
        frob = torch.sqrt(A.square().sum(dim=(-1, -2), keepdim=True) + self.eps ** 2)
        return torch.sigmoid(self.rho_logit).to(A.dtype) * A / frob

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        split = lambda t: rearrange(t, "b n (h d) -> b h n d", h=self.heads)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        cd = torch.float64 if x.dtype == torch.float64 else torch.float32
        q, k, v = q.to(cd), k.to(cd), v.to(cd)
        if self.variant == "linear":
            o = self._linear(q, k, v, key_padding_mask)
        else:
            rA = self.affinity(q, k, key_padding_mask)
            if self.hops is None:  # sum_{k>=1} (rho A)^k V = (I - rho A)^{-1} rho A V: converges since ||rho A|| < 1
                eye = torch.eye(rA.shape[-1], dtype=cd, device=x.device)
                o = torch.linalg.solve(eye - rA, rA @ v)
            else:
                term, o = v, torch.zeros_like(v)
                for _ in range(self.hops):
                    term = rA @ term
                    o = o + term
        return self.o_proj(rearrange(o.to(x.dtype), "b h n d -> b n (h d)"))

    def _linear(self, q, k, v, key_padding_mask):
        scale = self.head_dim ** -0.5
        q, k = q * scale, k * scale
        energy = q.norm(dim=-1)  # (B, H, N)
        if key_padding_mask is not None:
            keep = key_padding_mask[:, None, :]
            energy = energy.masked_fill(~keep, 0.0)
        q_bar = torch.einsum("bhn,bhnd->bhd", energy / (energy.sum(-1, keepdim=True) + self.eps), q)
        a = torch.relu(torch.einsum("bhd,bhnd->bhn", q_bar, k))
        if key_padding_mask is not None:
            a = a.masked_fill(~keep, 0.0)
        a = a / (a.sum(-1, keepdim=True) + self.eps)
        pooled = torch.sigmoid(self.rho_logit).to(a.dtype) * torch.einsum("bhn,bhnd->bhd", a, v)
        return pooled.unsqueeze(2).expand_as(v)


# ==================================================================================================== chela


def _chela_flops(batch, n, heads, head_dim, causal=False, short_kernel=3, long_kernel=256, **kw):
    # the scan (4 B H N d^2) plus the two depthwise convolutions over C = H d channels (direct count, 2 per tap)
    return 4.0 * batch * heads * n * head_dim * head_dim + 2.0 * batch * n * heads * head_dim * (
        short_kernel + min(long_kernel, n))


@register(
    "chela", family="linear", seed=True, catalog=195,
    paper="Short-Long Convolutions Help Hardware-Efficient Linear Attention to Focus on Long Sequences",
    arxiv="2406.08128",
    complexity="O(N d^2 + N C log N) time (chunked scan + FFT long convolution); decoding state O(d^2 + K_long C)",
    caps=Caps(causal=True, bidirectional=True, dims=(1,), decode=True, padding=True),
    flops=_chela_flops, approximates_softmax=False,
    test_kwargs=dict(dim=32, heads=4, short_kernel=3, long_kernel=8, long_branches=2, chunk_size=4),
    bench_kwargs=dict(long_kernel=256),
    summary="Short depthwise conv -> SiLU -> long (multi-branch, re-parameterised) depthwise conv gives the queries "
            "and keys of a tiled (chunked) linear attention; values from the input, sigmoid output gate.",
)
class Chela(KernelAttention):
    """CHELA (Liu et al., ICML 2024): short-long convolutions feeding hardware-efficient (chunked) linear attention.

    ``S = silu(ShortConv(x))``, ``Z = LongConv(S)`` (depthwise, causal or centred), ``q = phi(Z W_q)``,
    ``k = phi(Z W_k)``, ``v = x W_v`` with ``phi = elu + 1``; ``o = LinearAttention(q, k, v)`` on the chunked scan of
    :mod:`attnlab.ops.linear`; ``y = (o * sigmoid(x W_g)) W_o``. The long kernel is the sum of ``long_branches``
    kernels of lengths ``K, K/2, K/4, ...`` (each covering the most recent lags: structural re-parameterisation,
    merged into one kernel before every call). What was read and what was guessed: docs/mechanisms/chela.md.

    Args:
        short_kernel: taps of the short convolution (default 3).
        long_kernel: taps ``K`` of the long convolution (default 256; as long as the training sequences makes it
            global). Decoding keeps the last ``short_kernel - 1`` and ``K - 1`` convolution inputs: a bounded state.
        long_branches: re-parameterised branches of the long kernel (default 3).
        conv_method: ``"auto"`` (FFT for long kernels), ``"direct"`` (the reference) or ``"fft"``.
        form, chunk_size, eps, bias: as :class:`KernelAttention`.
    """

    state_key = "chela.linear"

    def __init__(self, dim: int, heads: int = 8, *, short_kernel: int = 3, long_kernel: int = 256,
                 long_branches: int = 3, conv_method: str = "auto", **kwargs) -> None:
        super().__init__(dim, heads, **kwargs)
        for name, val in (("short_kernel", short_kernel), ("long_kernel", long_kernel),
                          ("long_branches", long_branches)):
            if not (isinstance(val, int) and val >= 1):
                raise shape_error(name, "a positive integer", val)
        if conv_method not in ("auto", "direct", "fft"):
            raise shape_error("conv_method", "'auto', 'direct' or 'fft'", repr(conv_method))
        self.short_kernel, self.long_kernel, self.conv_method = short_kernel, long_kernel, conv_method
        sizes = sorted({max(1, long_kernel >> i) for i in range(long_branches)}, reverse=True)
        self.long_sizes = tuple(sizes)
        # depthwise taps, scaled like a fan-in initialisation; short kernel: identity-leaning (current token first)
        self.short_weight = nn.Parameter(torch.randn(dim, short_kernel) * short_kernel ** -0.5)
        self.short_bias = nn.Parameter(torch.zeros(dim))
        self.long_weights = nn.ParameterList(
            [nn.Parameter(torch.randn(dim, k) * (k * len(sizes)) ** -0.5) for k in sizes])
        self.gate_proj = nn.Linear(dim, heads * self.head_dim, bias=kwargs.get("bias", False))

    def long_weight(self) -> Tensor:
        """The merged long kernel ``(C, K)``: each branch zero-padded on the far-past side and summed."""
        return sum(F.pad(w, (0, self.long_kernel - w.shape[1])) for w in self.long_weights)

    def features(self, q, k):
        return elu_plus_one(q), elu_plus_one(k)

    def convolve(self, x: Tensor, *, causal: bool, key_padding_mask: Tensor | None,
                 cache: KVCache | None) -> Tensor:
        """``Z = LongConv(silu(ShortConv(x)))`` with padded tokens zeroed before each convolution (so they act as
        the zeros beyond the sequence's end); with a cache, each convolution continues from its kept inputs."""
        keep = None if key_padding_mask is None else key_padding_mask[..., None].to(x.dtype)
        if keep is not None:
            x = x * keep
        hist_s = hist_l = None
        if cache is not None:
            hist_s, hist_l = cache.state.get("chela.conv", (None, None))
        s = F.silu(depthwise_conv1d(x, self.short_weight, self.short_bias, causal=causal, history=hist_s,
                                    method=self.conv_method))
        if keep is not None:
            s = s * keep
        z = depthwise_conv1d(s, self.long_weight(), causal=causal, history=hist_l, method=self.conv_method)
        if cache is not None:
            def last(prev, new, m):  # the last m - 1 inputs: all a causal kernel of m taps still needs
                seq = new if prev is None else torch.cat([prev, new], dim=1)
                return seq[:, max(0, seq.shape[1] - (m - 1)):]
            cache.state["chela.conv"] = (last(hist_s, x, self.short_kernel), last(hist_l, s, self.long_kernel))
        return z

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        z = self.convolve(x, causal=causal, key_padding_mask=key_padding_mask, cache=cache)
        q = rearrange(self.q_proj(z), "b n (h d) -> b h n d", h=self.heads)
        k = rearrange(self.k_proj(z), "b n (h d) -> b h n d", h=self.heads)
        v = rearrange(self.v_proj(x), "b n (h d) -> b h n d", h=self.heads)
        fq, fk = self.features(q, k)
        o = self.scan(fq, fk, v, causal=causal, key_padding_mask=key_padding_mask, cache=cache)
        _advance(cache, x.shape[1])
        return self.o_proj(rearrange(o, "b h n d -> b n (h d)") * torch.sigmoid(self.gate_proj(x)))
