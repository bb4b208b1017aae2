"""Token attribution from attention: rollout, flow, gradient-weighted relevance, and attention vs saliency.

Seeds (catalog ids):

- ``attention-rollout-flow`` (#110, Abnar & Zuidema, arXiv 2005.00928): attention rollout and attention flow,
  compared with raw attention by their Spearman correlation with leave-one-token-out (LOO) importance and with
  input x gradient.
- ``generic-attn-explainability`` (#166, Chefer et al., arXiv 2103.15679): relevance propagated through the
  self-attention layers with gradient-weighted attention maps, ``R <- R + mean_h(relu(grad * A)) R``.
- ``xattn-half-explanation`` (#180, arXiv 2509.18010 as given in the brief; the seed file holds the abstract
  only): how much of the input saliency mass aggregated attention covers, per layer.

Every analysis scores one *target* on the model:

- causal LM (SmolLM2): ``log p(t* | x)``, the log-probability of the model's own top next token ``t*`` at the last
  position (through the shared :func:`~attnlab.analysis.base.next_token_loss`, with ``t*`` appended as label);
  the attention row of the target is the last position.
- encoder (MiniLM): the sentence embedding (:func:`~attnlab.analysis.base.sentence_embedding`, mean pooling).
  Ablation scores (LOO, deletion/insertion curves) use the cosine to the unperturbed embedding ``e0``; gradients
  use the projection of the *unnormalised* pooled embedding on ``e0`` (the cosine has zero gradient at ``e0``,
  its maximum). The attention "row" of a mean-pooled target is the mean over all rows.

The pure functions (:func:`rollout`, :func:`attention_flow`, :func:`relevance_propagation`,
:func:`saliency_share`, :func:`aopc`) take plain tensors and can be used on their own.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..htmlkit import note, table
from ..models.loaders import LoadedModel
from .base import Inputs, Result, analysis, next_token_loss, sentence_embedding
from .capture import Capture, attention_modules
from .metrics import spearman
from .figures import line_plot, token_colors

__all__ = [
    "AttributionResult", "RelevanceResult", "SaliencyShareResult", "aopc", "attention_flow", "leave_one_out",
    "perturbation_curves",
    "relevance_propagation", "rollout", "run_flow", "run_relevance", "run_rollout", "run_saliency_share",
    "saliency_share",
]

FLOW_LIMIT = 32  # default maximum number of tokens for attention flow (one max-flow per input token)


# ------------------------------------------------------------------------------------------------ pure functions


def _check_attn(attn: Tensor, name: str = "attn") -> tuple[int, int]:
    if not isinstance(attn, Tensor) or attn.ndim != 3 or attn.shape[1] != attn.shape[2]:
        shape = tuple(attn.shape) if isinstance(attn, Tensor) else type(attn).__name__
        raise ValueError(f"{name}: expected a (layers, N, N) tensor of head-averaged attention, received {shape}")
    return int(attn.shape[0]), int(attn.shape[1])


def residual_attention(attn: Tensor, residual: float = 0.5) -> Tensor:
    """``(1 - residual) * A + residual * I``, rows renormalised to sum 1. ``attn (L, N, N) -> (L, N, N)``.

    The residual connection modelled as in the rollout paper (``residual = 0.5``)."""
    _, n = _check_attn(attn)
    if not 0.0 <= residual <= 1.0:
        raise ValueError(f"residual: expected a weight in [0, 1], received {residual}")
    a = (1.0 - residual) * attn.float() + residual * torch.eye(n, dtype=torch.float32, device=attn.device)
    return a / a.sum(-1, keepdim=True).clamp_min(1e-12)


def rollout(attn: Tensor, *, residual: float = 0.5) -> Tensor:
    """Attention rollout: ``R = Â_L Â_{L-1} ... Â_1`` with ``Â_l = norm(0.5 A_l + 0.5 I)``.

    ``attn``: ``(L, N, N)`` head-averaged attention (layer 0 first, rows = queries). Returns ``(N, N)``: row ``i``
    is how much output position ``i`` (after the last layer) draws on each input token; rows sum to 1."""
    a = residual_attention(attn, residual)
    r = a[0]
    for layer in range(1, a.shape[0]):
        r = a[layer] @ r
    return r


def attention_flow(attn: Tensor, source: Tensor, *, residual: float = 0.5, limit: int = FLOW_LIMIT,
                   scale: float = 1e6) -> Tensor:
    """Attention flow: the max-flow from the output node(s) to each input token in the layered attention graph.

    Nodes are (layer, position) for layers ``0..L`` (0 = input tokens); the edge from ``(l, i)`` down to
    ``(l-1, j)`` has capacity ``Â_l[i, j]`` (residual-augmented, row-normalised attention, as in rollout). A
    super-source feeds the top-layer nodes with capacities ``source`` (one-hot = one output position; uniform =
    a mean-pooled output). Returns ``(N,)``: the max-flow value into each input token.

    Solved with ``scipy.sparse.csgraph.maximum_flow`` (Dinic) on integer capacities ``round(scale * c)``, so
    values are exact to about ``L * N / scale``. One max-flow per input token: only for short inputs -- more than
    ``limit`` tokens raises ValueError.
    """
    import numpy as np
    from scipy.sparse import csr_matrix
    from scipy.sparse.csgraph import maximum_flow

    L, n = _check_attn(attn)
    if n > limit:
        raise ValueError(f"attention_flow: expected at most {limit} tokens (one max-flow per input token over "
                         f"{L} layers; raise limit= to force), received {n}")
    source = torch.as_tensor(source, dtype=torch.float32).reshape(-1)
    if source.numel() != n or bool((source < 0).any()):
        raise ValueError(f"source: expected {n} non-negative capacities (one per top-layer position), "
                         f"received {source.numel()} values")
    a = residual_attention(attn, residual).cpu().numpy()
    rows, cols, caps = [], [], []
    for layer in range(1, L + 1):  # edge (layer, i) -> (layer - 1, j) with capacity Â_layer[i, j]
        i, j = np.nonzero(a[layer - 1] > 0)
        rows.append(layer * n + i)
        cols.append((layer - 1) * n + j)
        caps.append(a[layer - 1][i, j])
    s = (L + 1) * n  # super-source
    top = np.nonzero(source.numpy() > 0)[0]
    rows.append(np.full(len(top), s))
    cols.append(L * n + top)
    caps.append(source.numpy()[top])
    cap = np.rint(np.concatenate(caps) * scale).astype(np.int32)
    keep = cap > 0
    graph = csr_matrix((cap[keep], (np.concatenate(rows)[keep], np.concatenate(cols)[keep])), shape=(s + 1, s + 1))
    out = [maximum_flow(graph, s, j, method="dinic").flow_value / scale for j in range(n)]
    return torch.tensor(out, dtype=torch.float32)


def relevance_propagation(attn: Tensor, grad: Tensor) -> Tensor:
    """Gradient-weighted relevance for self-attention (Chefer et al. 2021, rule (i)).

    ``attn``, ``grad``: ``(L, H, N, N)`` attention probabilities of every layer and head and the gradient of the
    target with respect to them. ``R`` starts as the identity and for each layer ``R <- R + Ā R`` with
    ``Ā = mean_h(relu(grad * attn))``. Returns ``R (N, N)``; row ``i`` = relevance of each input token for
    output position ``i``."""
    if attn.ndim != 4 or attn.shape != grad.shape or attn.shape[-1] != attn.shape[-2]:
        raise ValueError(f"attn, grad: expected two (layers, heads, N, N) tensors of one shape, received "
                         f"{tuple(attn.shape)} and {tuple(grad.shape)}")
    return _propagate((grad.float() * attn.float()).clamp_min(0).mean(1))


def _propagate(maps: Tensor) -> Tensor:
    """``R = I; R <- R + M_l R`` over layers; ``maps (L, N, N)``."""
    n = maps.shape[-1]
    r = torch.eye(n, dtype=torch.float32, device=maps.device)
    for m in maps:
        r = r + m @ r
    return r


def saliency_share(attention: Tensor, saliency: Tensor) -> Tensor:
    """The share of saliency mass that an attention distribution covers: ``sum_j min(a_j, s_j)`` after
    normalising both non-negative vectors to sum 1 (histogram intersection; 1 = same distribution, 0 = disjoint).

    ``attention``: ``(..., N)``; ``saliency``: ``(N,)`` or broadcastable. Returns ``(...)``."""
    if bool((attention < 0).any()) or bool((saliency < 0).any()):
        raise ValueError("saliency_share: expected non-negative attention and saliency (take |saliency| first)")
    a = attention.float() / attention.float().sum(-1, keepdim=True).clamp_min(1e-12)
    s = saliency.float() / saliency.float().sum(-1, keepdim=True).clamp_min(1e-12)
    return torch.minimum(a, s).sum(-1)


def _rho(a, b) -> float | None:
    """Spearman (:func:`attnlab.analysis.metrics.spearman`), None where it is undefined (e.g. a constant vector)."""
    r = spearman(a, b)
    return None if math.isnan(r) else r


def aopc(curve, *, insertion: bool = False) -> float:
    """Area over the perturbation curve. ``curve[k]`` = target score after ``k`` steps (``curve[0]`` = unperturbed
    for deletion, fully masked for insertion). Deletion: ``mean_k (curve[0] - curve[k])`` (Samek et al.'s AOPC;
    higher = the ranking finds the important tokens first). Insertion: ``mean_k (curve[k] - curve[0])``."""
    c = torch.as_tensor(curve, dtype=torch.float64).reshape(-1)
    if c.numel() < 2:
        raise ValueError(f"aopc: expected a curve of at least 2 points, received {c.numel()}")
    d = (c - c[0]) if insertion else (c[0] - c)
    return float(d.mean())


# --------------------------------------------------------------------------------------------- model plumbing


@dataclass
class _Target:
    """What is scored: ``t*`` (causal) or ``e0`` (encoder), and the target's attention row weights ``(N,)``."""

    causal: bool
    ref: Tensor  # () token id, or (hidden,) unit embedding
    rows: Tensor  # (N,) weights over output positions, sum 1
    describe: str


def _short_ids(lm: LoadedModel, inp: Inputs, tokens: int | None) -> Tensor:
    if not isinstance(inp, Inputs):
        raise ValueError(f"inp: expected attnlab.analysis.Inputs (make_inputs), received {type(inp).__name__}")
    if tokens is not None and tokens < 3:
        raise ValueError(f"tokens: expected at least 3 (or None for the whole input), received {tokens}")
    if inp.attention_mask[:1].min() < 1:
        raise ValueError("inp: expected an unpadded input (attention_mask all ones)")
    ids = inp.input_ids[:1]
    if tokens is None or tokens >= ids.shape[1]:
        return ids
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    if int(ids[0, -1]) in special:  # keep a closing special token ([SEP]) when cutting
        return torch.cat([ids[:, : tokens - 1], ids[:, -1:]], dim=1)
    return ids[:, :tokens]


def _score(lm: LoadedModel, ids: Tensor, target: _Target, *, grad: bool = False, batch: int = 8) -> Tensor:
    """Target score per sequence of ``ids (B, n)``: ``log p(t*|x)`` (causal) or the cosine to ``e0`` (encoder;
    with ``grad=True`` the projection of the unnormalised embedding on ``e0``)."""
    outs = []
    for chunk in ids.split(batch):
        mask = torch.ones_like(chunk)
        if target.causal:
            full = torch.cat([chunk, target.ref.reshape(1, 1).expand(len(chunk), 1)], dim=1)
            outs.append(-next_token_loss(lm, full, torch.ones_like(full), reduction="none")[:, -1])
        else:
            e = sentence_embedding(lm, chunk, mask, normalize=not grad)
            outs.append(e @ target.ref)
    return torch.cat(outs)


def _target(lm: LoadedModel, ids: Tensor) -> _Target:
    n = ids.shape[1]
    with torch.no_grad():
        if lm.info.causal:
            t = lm.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, -1].argmax()
            rows = torch.zeros(n)
            rows[-1] = 1.0
            word = lm.tokenizer.decode([int(t)])
            return _Target(True, t, rows, f"log p({word!r} | text), the model's top next token at the last position")
        e0 = sentence_embedding(lm, ids, torch.ones_like(ids))[0]
        return _Target(False, e0, torch.full((n,), 1.0 / n), "sentence embedding (mean pooling) vs the unperturbed one")


def _baseline_id(lm: LoadedModel) -> int:
    tok = lm.tokenizer
    for name in ("mask_token_id", "unk_token_id", "pad_token_id", "eos_token_id"):
        i = getattr(tok, name, None)
        if i is not None:
            return int(i)
    raise ValueError(f"tokenizer: expected a mask, unk, pad or eos token to replace deleted tokens, "
                     f"{type(tok).__name__} has none")


def _free_positions(lm: LoadedModel, ids: Tensor) -> Tensor:
    """Positions that may be perturbed: every token but the tokenizer's special tokens ([CLS], [SEP])."""
    special = set(getattr(lm.tokenizer, "all_special_ids", []) or [])
    return torch.tensor([i for i, t in enumerate(ids[0].tolist()) if t not in special], dtype=torch.long)


@dataclass
class _Pass:
    ids: Tensor  # (1, N)
    target: _Target
    score: float
    attn: Tensor  # (L, N, N) head-mean attention
    relmaps: Tensor  # (L, N, N) mean_h relu(grad * A)
    ixg: Tensor  # (N,) input x gradient at the token embeddings (signed)
    layer_sal: Tensor  # (L, N) |input x gradient| at each attention layer's input


def _forward_backward(lm: LoadedModel, ids: Tensor) -> _Pass:
    """One forward pass with every layer's attention materialised (``Capture(explicit=True)``) and one gradient
    of the target w.r.t. the token embeddings, the attention probabilities and each attention layer's input."""
    target = _target(lm, ids)
    n = ids.shape[1]
    emb: dict[str, Tensor] = {}
    layer_in: dict[int, Tensor] = {}

    def on_emb(_mod, _args, out):
        out = out.detach().requires_grad_(True)  # gradients stop here: no parameter gradients are computed
        emb["x"] = out
        return out

    def pre(layer):
        def hook(_mod, args, kwargs):
            h = kwargs.get("hidden_states", args[0] if args else None)
            if isinstance(h, Tensor):
                layer_in[layer] = h
        return hook

    mods = attention_modules(lm.model)
    handles = [lm.model.get_input_embeddings().register_forward_hook(on_emb)]
    handles += [m.register_forward_pre_hook(pre(i), with_kwargs=True) for i, m in mods.items()]
    try:
        with torch.enable_grad(), Capture(lm.model, explicit=True, what=("probs",)) as cap:
            score = _score(lm, ids, target, grad=True)
        layers = sorted(cap.records)
        probs = [cap.records[i]["probs"] for i in layers]
        hs = [layer_in[i] for i in layers]
        grads = torch.autograd.grad(score.sum(), [emb["x"], *probs, *hs], allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    g_emb, g_probs, g_hs = grads[0], grads[1: 1 + len(probs)], grads[1 + len(probs):]
    zero = torch.zeros_like
    attn = torch.stack([p.detach()[0, :, :n, :n].float().mean(0) for p in probs])
    relmaps = torch.stack([((zero(p) if g is None else g) * p).detach()[0, :, :n, :n].float().clamp_min(0).mean(0)
                           for p, g in zip(probs, g_probs)])
    ixg = (emb["x"].detach() * g_emb)[0, :n].sum(-1).float()
    layer_sal = torch.stack([(h.detach() * (zero(h) if g is None else g))[0, :n].sum(-1).abs().float()
                             for h, g in zip(hs, g_hs)])
    if not target.causal:  # the reported score is the cosine (1 here), the gradient target its projection
        with torch.no_grad():
            score = _score(lm, ids, target)
    return _Pass(ids, target, float(score.detach()[0]), attn, relmaps, ixg, layer_sal)


def _perturbed(ids: Tensor, positions_list: list[Tensor], baseline: int, *, remove: bool = False) -> Tensor:
    """One sequence per entry of ``positions_list``: those positions replaced by ``baseline`` (or removed; then
    every entry must remove the same number of tokens)."""
    out = []
    for pos in positions_list:
        x = ids[0].clone()
        if remove:
            keep = torch.ones(len(x), dtype=torch.bool)
            keep[pos] = False
            x = x[keep]
        else:
            x[pos] = baseline
        out.append(x)
    return torch.stack(out)


def leave_one_out(lm: LoadedModel, ids: Tensor, target: _Target, positions: Tensor, *, mode: str = "replace",
                  batch: int = 8) -> Tensor:
    """Leave-one-token-out importance ``f(x) - f(x without token i)`` for each of ``positions``; ``(len(positions),)``.

    ``mode="replace"``: the token becomes the tokenizer's mask/unk/pad token; ``"remove"``: it is deleted."""
    if mode not in ("replace", "remove"):
        raise ValueError(f"mode: expected 'replace' or 'remove', received {mode!r}")
    with torch.no_grad():
        f0 = _score(lm, ids, target, batch=batch)[0]
        xs = _perturbed(ids, [p.reshape(1) for p in positions], _baseline_id(lm), remove=mode == "remove")
        return (f0 - _score(lm, xs, target, batch=batch)).float()


def perturbation_curves(lm: LoadedModel, ids: Tensor, target: _Target, orders: dict[str, Tensor], ks: list[int], *,
                        insertion: bool = False, batch: int = 8) -> dict[str, Tensor]:
    """Target score after deleting (replacing by the baseline token) the first ``k`` positions of each order, for
    each ``k`` in ``ks``; with ``insertion=True`` all of the order starts deleted and the first ``k`` come back.
    Returns ``{name: (len(ks),)}``. Identical perturbed inputs (e.g. nothing or everything deleted) run once."""
    base = _baseline_id(lm)
    sets: list[Tensor] = []
    where: dict[tuple[int, ...], int] = {}
    index: dict[str, list[int]] = {}
    for name, order in orders.items():
        index[name] = []
        for k in ks:
            s = order[k:] if insertion else order[:k]
            key = tuple(sorted(s.tolist()))
            if key not in where:
                where[key] = len(sets)
                sets.append(s)
            index[name].append(where[key])
    with torch.no_grad():
        scores = _score(lm, _perturbed(ids, sets, base), target, batch=batch).float()
    return {name: scores[idx] for name, idx in index.items()}


# ------------------------------------------------------------------------------------------ rollout and flow


@dataclass
class AttributionResult(Result):
    """Attributions of one target to the input tokens, and their Spearman correlation with LOO and input x grad."""

    kind: str = "rollout"  # "rollout" or "flow"
    target: str = ""
    tokens: list[str] = field(default_factory=list)
    positions: list[int] = field(default_factory=list)  # compared positions (special tokens excluded)
    scores: dict[str, list[float]] = field(default_factory=dict)  # method -> (N,) attribution
    loo: list[float] = field(default_factory=list)  # (N,) LOO importance (0 at excluded positions)
    input_x_grad: list[float] = field(default_factory=list)  # (N,) signed
    spearman: dict[str, dict[str, float | None]] = field(default_factory=dict)  # method -> {"loo", "input_x_grad"}
    loo_mode: str = "replace"
    baseline_token: str = ""

    def findings(self) -> list[str]:
        out = []
        rho = self.spearman
        methods = [m for m in rho if m != "input_x_grad"]
        parts = ", ".join(f"{m} {_fmt(rho[m]['loo'])}" for m in methods)
        how = "removed" if self.loo_mode == "remove" else f"replaced by {self.baseline_token!r}"
        out.append(f"Spearman with leave-one-token-out importance (token {how}, "
                   f"{len(self.positions)} tokens): {parts}; input x gradient {_fmt(rho['input_x_grad']['loo'])}.")
        parts = ", ".join(f"{m} {_fmt(rho[m]['input_x_grad'])}" for m in methods)
        out.append(f"Spearman with |input x gradient|: {parts}.")
        raw = rho.get("raw", {}).get("loo")
        verdicts = []
        for m in methods:
            if m == "raw" or raw is None or rho[m]["loo"] is None:
                continue
            verdicts.append(f"{m} {'beats' if rho[m]['loo'] > raw else 'does not beat'} it "
                            f"({_fmt(rho[m]['loo'])} vs {_fmt(raw)})")
        out.append(f"The paper's claim, rollout/flow correlate with LOO better than raw attention: on {self.model}, "
                   f"{'; '.join(verdicts) or 'undefined (a constant vector)'}.")
        return out

    def sections(self) -> list[str]:
        head = f"<h3>Attention {html.escape(self.kind)} vs leave-one-out and input x gradient ({html.escape(self.model)})</h3>"
        rows = [[m, _fmt(v["loo"]), _fmt(v["input_x_grad"])] for m, v in self.spearman.items()]
        how = "removed" if self.loo_mode == "remove" else f"replaced by {self.baseline_token!r}"
        out = [head, note(f"Target: {self.target}. {len(self.positions)} tokens compared; LOO: token {how}."),
               table(["attribution", "Spearman vs LOO", "Spearman vs |input x grad|"], rows)]
        for m in ("rollout", "flow", "relevance"):
            if m in self.scores:
                out.append(token_colors(self.tokens, self.scores[m], title=f"{m} attribution"))
        out.append(token_colors(self.tokens, self.loo, title="leave-one-out importance"))
        return out


def _fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def _compare(lm: LoadedModel, inp: Inputs, *, kind: str, tokens: int | None, residual: float, loo: str,
             flow_limit: int = FLOW_LIMIT) -> AttributionResult:
    ids = _short_ids(lm, inp, tokens)
    if kind == "flow" and ids.shape[1] > flow_limit:
        raise ValueError(f"flow: expected at most {flow_limit} tokens (tokens=, flow_limit=), received {ids.shape[1]}")
    p = _forward_backward(lm, ids)
    w = p.target.rows
    scores = {"raw": w @ p.attn[-1], "rollout": w @ rollout(p.attn, residual=residual)}
    if kind == "flow":
        scores["flow"] = attention_flow(p.attn, w, residual=residual, limit=flow_limit)
    else:
        scores["relevance"] = w @ _propagate(p.relmaps)
    pos = _free_positions(lm, ids)
    imp = leave_one_out(lm, ids, p.target, pos, mode=loo)
    loo_full = torch.zeros(ids.shape[1])
    loo_full[pos] = imp
    ixg = p.ixg.abs()[pos]
    rho = {m: {"loo": _rho(s[pos], imp), "input_x_grad": _rho(s[pos], ixg)} for m, s in scores.items()}
    rho["input_x_grad"] = {"loo": _rho(ixg, imp), "input_x_grad": 1.0}
    return AttributionResult(
        model=lm.info.name, kind=kind, target=p.target.describe, tokens=lm.tokens(ids), positions=pos.tolist(),
        scores={m: s.tolist() for m, s in scores.items()}, loo=loo_full.tolist(), input_x_grad=p.ixg.tolist(),
        spearman=rho, loo_mode=loo, baseline_token=lm.tokenizer.decode([_baseline_id(lm)]))


@analysis("rollout", seeds=("attention-rollout-flow", "generic-attn-explainability"),
          summary="Raw last-layer attention, attention rollout and gradient-weighted relevance vs leave-one-token-out "
                  "importance and input x gradient (Spearman)")
def run_rollout(lm: LoadedModel, inp: Inputs, *, tokens: int | None = 32, residual: float = 0.5,
                loo: str = "replace") -> AttributionResult:
    """Token attributions of the target from raw last-layer attention, rollout and relevance, on the first
    ``tokens`` tokens of ``inp`` (LOO costs one forward pass per token), each compared with LOO importance
    (``loo="replace"`` by the mask/unk token, or ``"remove"``) and |input x gradient| by Spearman correlation."""
    return _compare(lm, inp, kind="rollout", tokens=tokens, residual=residual, loo=loo)


@analysis("flow", seeds=("attention-rollout-flow",),
          summary="Attention flow (max-flow through the layered attention graph) vs raw attention and rollout, "
                  "against leave-one-token-out importance (short inputs only)")
def run_flow(lm: LoadedModel, inp: Inputs, *, tokens: int = 24, residual: float = 0.5, loo: str = "replace",
             flow_limit: int = FLOW_LIMIT) -> AttributionResult:
    """Attention flow on the first ``tokens`` tokens of ``inp`` (at most ``flow_limit``, default 32: one max-flow
    per input token on an (L+1) x N node graph), with raw attention and rollout on the same tokens for comparison."""
    return _compare(lm, inp, kind="flow", tokens=tokens, residual=residual, loo=loo, flow_limit=flow_limit)


# -------------------------------------------------------------------------------- relevance and AOPC curves


@dataclass
class RelevanceResult(Result):
    """Gradient-weighted relevance of the target, and deletion/insertion curves for relevance, rollout, random."""

    target: str = ""
    tokens: list[str] = field(default_factory=list)
    relevance: list[float] = field(default_factory=list)  # (N,)
    rollout: list[float] = field(default_factory=list)  # (N,)
    fractions: list[float] = field(default_factory=list)  # share of perturbable tokens deleted/inserted
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # mode -> method -> scores
    aopc: dict[str, dict[str, float]] = field(default_factory=dict)  # mode -> method -> AOPC
    random_std: dict[str, float] = field(default_factory=dict)  # mode -> std of random AOPC over seeds
    seeds: int = 0
    score_name: str = ""
    baseline_token: str = ""

    def findings(self) -> list[str]:
        out = []
        for mode in self.aopc:
            a = self.aopc[mode]
            verdict = "above" if a["relevance"] > a["random"] else "not above"
            out.append(f"{mode.capitalize()} AOPC of {self.score_name} ({len(self.fractions) - 1} steps, tokens "
                       f"replaced by {self.baseline_token!r}): relevance {a['relevance']:.3f}, rollout "
                       f"{a['rollout']:.3f}, random {a['random']:.3f} ± {self.random_std[mode]:.3f} over "
                       f"{self.seeds} seeds (relevance {verdict} random).")
        if self.relevance:
            r = torch.tensor(self.relevance)
            top = [self.tokens[i] for i in r.argsort(descending=True)[:3].tolist()]
            out.append(f"Most relevant tokens for the target: {', '.join(repr(t) for t in top)}.")
        return out

    def sections(self) -> list[str]:
        out = [f"<h3>Gradient-weighted relevance and deletion/insertion curves ({html.escape(self.model)})</h3>",
               note(f"Target: {self.target}."),
               token_colors(self.tokens, self.relevance, title="relevance (Chefer et al.)"),
               token_colors(self.tokens, self.rollout, title="attention rollout")]
        rows = [[mode, *(f"{self.aopc[mode][m]:.3f}" for m in ("relevance", "rollout", "random")),
                 f"{self.random_std[mode]:.3f}"] for mode in self.aopc]
        out.append(table(["curve", "relevance", "rollout", "random (mean)", "random (std)"], rows))
        for mode, series in self.curves.items():
            out.append(line_plot(self.fractions, series, title=f"{mode} curve ({self.model})",
                                 xlabel=f"fraction of tokens {'inserted' if mode == 'insertion' else 'deleted'}",
                                 ylabel=self.score_name))
        return out


@analysis("relevance", seeds=("generic-attn-explainability",),
          summary="Gradient-weighted attention relevance propagation (self-attention rule) with deletion/insertion "
                  "AOPC for relevance vs rollout vs random")
def run_relevance(lm: LoadedModel, inp: Inputs, *, tokens: int | None = 32, steps: int = 5, seeds: int = 3,
                  insertion: bool = True, residual: float = 0.5) -> RelevanceResult:
    """Relevance ``R`` (``R <- R + mean_h relu(grad * A) R``) of the target on the first ``tokens`` tokens, and
    AOPC curves: tokens deleted most-relevant-first (replaced by the mask/unk token) in ``steps`` steps, for
    relevance, rollout and random orders (averaged over ``seeds``); with ``insertion`` also the insertion curve."""
    if steps < 1 or seeds < 1:
        raise ValueError(f"steps, seeds: expected positive integers, received {steps}, {seeds}")
    ids = _short_ids(lm, inp, tokens)
    p = _forward_backward(lm, ids)
    w = p.target.rows
    rel = w @ _propagate(p.relmaps)
    roll = w @ rollout(p.attn, residual=residual)
    pos = _free_positions(lm, ids)
    k_max = len(pos)
    ks = sorted({round(i * k_max / steps) for i in range(steps + 1)})
    orders = {"relevance": pos[rel[pos].argsort(descending=True)], "rollout": pos[roll[pos].argsort(descending=True)]}
    gen = torch.Generator().manual_seed(0)
    randoms = [pos[torch.randperm(k_max, generator=gen)] for _ in range(seeds)]
    curves: dict[str, dict[str, list[float]]] = {}
    scores: dict[str, dict[str, float]] = {}
    spread: dict[str, float] = {}
    orders |= {f"random{i}": o for i, o in enumerate(randoms)}
    for mode in ("deletion", "insertion") if insertion else ("deletion",):
        ins = mode == "insertion"
        got = perturbation_curves(lm, ids, p.target, orders, ks, insertion=ins)
        rnd = torch.stack([got.pop(f"random{i}") for i in range(seeds)])
        rnd_aopc = torch.tensor([aopc(c, insertion=ins) for c in rnd])
        curves[mode] = {m: c.tolist() for m, c in got.items()} | {"random": rnd.mean(0).tolist()}
        scores[mode] = {m: aopc(c, insertion=ins) for m, c in got.items()} | {"random": float(rnd_aopc.mean())}
        spread[mode] = float(rnd_aopc.std()) if seeds > 1 else 0.0
    name = "log p(t*)" if p.target.causal else "cosine to e0"
    return RelevanceResult(
        model=lm.info.name, target=p.target.describe, tokens=lm.tokens(ids), relevance=rel.tolist(),
        rollout=roll.tolist(), fractions=[k / max(k_max, 1) for k in ks], curves=curves, aopc=scores,
        random_std=spread, seeds=seeds, score_name=name, baseline_token=lm.tokenizer.decode([_baseline_id(lm)]))


# --------------------------------------------------------------------------------------------- saliency share


@dataclass
class SaliencyShareResult(Result):
    """Per layer: how much of the saliency mass the layer's head-averaged attention (target row) covers."""

    target: str = ""
    n_tokens: int = 0
    share_input: list[float] = field(default_factory=list)  # (L,) vs input saliency |x . grad| at the embeddings
    share_layer: list[float] = field(default_factory=list)  # (L,) vs saliency at that attention layer's input
    spearman_input: list[float | None] = field(default_factory=list)  # (L,) attention row vs input saliency
    share_mean_attention: float = 0.0  # attention averaged over heads and layers vs input saliency
    share_rollout: float = 0.0
    share_uniform: float = 0.0  # a uniform distribution vs input saliency: the no-information reference

    def findings(self) -> list[str]:
        si = torch.tensor(self.share_input)
        sl = torch.tensor(self.share_layer)
        return [
            f"Aggregated attention (mean over heads and layers) covers {100 * self.share_mean_attention:.0f}% of the "
            f"input-saliency mass (rollout {100 * self.share_rollout:.0f}%, a uniform distribution "
            f"{100 * self.share_uniform:.0f}%); the seed reports about 50% for cross-attention in speech-to-text.",
            f"Per layer, attention covers {100 * float(si.min()):.0f}-{100 * float(si.max()):.0f}% of the input "
            f"saliency (best layer {int(si.argmax())}, mean {100 * float(si.mean()):.0f}%) and "
            f"{100 * float(sl.min()):.0f}-{100 * float(sl.max()):.0f}% of the saliency of its own input "
            f"representations (mean {100 * float(sl.mean()):.0f}%; the seed: 52-75%).",
        ]

    def sections(self) -> list[str]:
        xs = list(range(len(self.share_input)))
        rows = [[i, f"{a:.3f}", f"{b:.3f}", _fmt(c)] for i, a, b, c in
                zip(xs, self.share_input, self.share_layer, self.spearman_input)]
        return [f"<h3>Attention vs saliency ({html.escape(self.model)})</h3>",
                note(f"Target: {self.target}; {self.n_tokens} tokens. Share = sum_j min(attention_j, saliency_j), "
                     f"both normalised to sum 1. Aggregated attention: {self.share_mean_attention:.3f}; rollout: "
                     f"{self.share_rollout:.3f}; uniform reference: {self.share_uniform:.3f}."),
                line_plot(xs, {"vs input saliency": self.share_input, "vs the layer's input saliency":
                               self.share_layer, "uniform reference": [self.share_uniform] * len(xs)},
                          title=f"share of saliency mass covered by attention ({self.model})", xlabel="layer",
                          ylabel="share"),
                table(["layer", "share (input)", "share (layer input)", "Spearman (input)"], rows)]


@analysis("saliency-share", seeds=("xattn-half-explanation",),
          summary="Share of the gradient-based saliency mass covered by head-averaged attention, per layer")
def run_saliency_share(lm: LoadedModel, inp: Inputs, *, tokens: int | None = None,
                       residual: float = 0.5) -> SaliencyShareResult:
    """Saliency = |input x gradient| of the target, at the token embeddings (input saliency) and at each attention
    layer's input (representation saliency); attention = the target's row of the head-averaged attention of each
    layer. One forward and one backward pass on the first ``tokens`` tokens (None = all of ``inp``)."""
    ids = _short_ids(lm, inp, tokens)
    p = _forward_backward(lm, ids)
    w = p.target.rows
    rows = torch.einsum("n,lnm->lm", w, p.attn)  # (L, N) target row per layer
    sal = p.ixg.abs()
    n = ids.shape[1]
    return SaliencyShareResult(
        model=lm.info.name, target=p.target.describe, n_tokens=n,
        share_input=saliency_share(rows, sal).tolist(),
        share_layer=[float(saliency_share(rows[i], p.layer_sal[i])) for i in range(rows.shape[0])],
        spearman_input=[_rho(r, sal) for r in rows],
        share_mean_attention=float(saliency_share(rows.mean(0), sal)),
        share_rollout=float(saliency_share(w @ rollout(p.attn, residual=residual), sal)),
        share_uniform=float(saliency_share(torch.ones(n), sal)))
