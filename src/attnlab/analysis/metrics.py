"""Per-head statistics of attention probabilities, and the ``head-stats`` analysis.

Every function takes attention probabilities ``probs (B, H, Nq, Nk)`` (rows sum to 1 over the visible keys) and is
causal- and padding-aware: ``attention_mask (B, Nk)`` marks real tokens (1) and padding (0); ``causal`` says
whether a query may only see keys at or before its own position. Position-dependent statistics (distances, WAAD,
FAI, offsets) need self-attention over one sequence, ``Nq == Nk``, with query ``i`` at position ``i``.

Statistics (each documented at its function):

- entropy of each attention row (nats) and the same divided by ``log(number of visible keys)``;
- effective rank of the attention matrix (Roy & Vetterli: ``exp`` of the entropy of the normalised singular
  values), the "attention erank" of AgilePruner (#19) and of the self-reference matrix study (#30);
- mean attention distance ``sum_j p_ij |i - j|`` and the attention strength vs distance profile
  (`vit-visual-analytics` #23);
- WAAD and FAI of `preplan-anchor` (#21, arXiv 2510.13554);
- concentration: the probability mass of the ``k`` largest entries of a row.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..htmlkit import note, table
from ..models.loaders import LoadedModel
from . import figures
from .base import Inputs, Result, analysis
from .capture import Capture, LayerRecord

__all__ = [
    "HeadStatsResult", "attention_distance", "attention_effective_rank", "distance_profile", "effective_rank",
    "entropy", "fai", "head_groups", "normalized_entropy", "row_mean", "run_head_stats", "spearman", "top_heads",
    "top_k_mass", "visible_keys", "waad",
]


# ------------------------------------------------------------------------------------------------- masks
def spearman(a: Tensor | Sequence[float], b: Tensor | Sequence[float]) -> float:
    """Spearman rank correlation of two equally shaped tensors over the entries finite in both (ties get their
    average rank). NaN with fewer than 3 such entries or a constant input."""
    a, b = torch.as_tensor(a), torch.as_tensor(b)
    if a.shape != b.shape:
        raise ValueError(f"spearman: expected equal shapes, received {tuple(a.shape)} and {tuple(b.shape)}")
    a, b = a.flatten().double(), b.flatten().double()
    ok = torch.isfinite(a) & torch.isfinite(b)
    a, b = a[ok], b[ok]
    if len(a) < 3:
        return float("nan")

    def rank(x: Tensor) -> Tensor:
        r = torch.empty_like(x)
        r[x.argsort()] = torch.arange(len(x), dtype=x.dtype)
        for v in x.unique():  # average rank of ties
            m = x == v
            if m.sum() > 1:
                r[m] = r[m].mean()
        return r

    ra, rb = rank(a), rank(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den > 0 else float("nan")


def top_heads(scores: Tensor, k: int) -> list[tuple[int, int]]:
    """The ``k`` highest-scoring ``(layer, head)`` pairs of a ``(L, H)`` score tensor (ties: lower index first)."""
    L, H = scores.shape
    if not 0 <= k <= L * H:
        raise ValueError(f"k: expected 0..{L * H}, received {k}")
    flat = scores.flatten()
    order = sorted(range(L * H), key=lambda i: (-float(flat[i]), i))[:k]
    return [(i // H, i % H) for i in order]


def _check(probs: Tensor, *, square: bool = False) -> None:
    if not isinstance(probs, Tensor) or probs.ndim != 4:
        shape = tuple(probs.shape) if isinstance(probs, Tensor) else type(probs).__name__
        raise ValueError(f"probs: expected a tensor (B, H, Nq, Nk), received {shape}")
    if square and probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"probs: expected self-attention over one sequence (Nq == Nk), received "
                         f"Nq={probs.shape[-2]}, Nk={probs.shape[-1]}")


def _real(attention_mask: Tensor | None, b: int, n: int, device) -> Tensor:
    """``(B, N)`` bool: real tokens."""
    if attention_mask is None:
        return torch.ones(b, n, dtype=torch.bool, device=device)
    if attention_mask.shape != (b, n):
        raise ValueError(f"attention_mask: expected shape ({b}, {n}) = (B, Nk), received {tuple(attention_mask.shape)}")
    return attention_mask.to(device).bool()


def visible_keys(attention_mask: Tensor | None, b: int, n: int, *, causal: bool, device=None) -> Tensor:
    """``(B, 1, N, N)`` bool: query ``i`` (a real token) may attend to key ``j`` (a real token, ``j <= i`` if causal)."""
    real = _real(attention_mask, b, n, device)
    vis = real[:, None, :, None] & real[:, None, None, :]
    if causal:
        vis = vis & torch.ones(n, n, dtype=torch.bool, device=real.device).tril()
    return vis


def _offsets(n: int, device) -> Tensor:
    """``(N, N)`` key minus query position, ``j - i``."""
    i = torch.arange(n, device=device)
    return i[None, :] - i[:, None]


def row_mean(x: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Mean of per-row values ``x (B, H, Nq)`` over real, finite query rows -> ``(B, H)`` (NaN if none)."""
    real = _real(attention_mask, x.shape[0], x.shape[-1], x.device)[:, None, :] & torch.isfinite(x)
    s = torch.where(real, x, torch.zeros_like(x)).sum(-1)
    c = real.sum(-1)
    return torch.where(c > 0, s / c.clamp_min(1), torch.full_like(s, float("nan")))


# ------------------------------------------------------------------------------------------- row statistics
def entropy(probs: Tensor) -> Tensor:
    """Entropy of each attention row, in nats: ``-sum_j p_ij log p_ij`` (``0 log 0 = 0``). ``(B, H, Nq)``."""
    _check(probs)
    p = probs.float()
    return -torch.special.xlogy(p, p).sum(-1)


def normalized_entropy(probs: Tensor, attention_mask: Tensor | None = None, *, causal: bool) -> Tensor:
    """Row entropy divided by ``log(n_visible)``, the entropy of uniform attention over the keys the row can see:
    0 = all mass on one key, 1 = uniform. Rows with fewer than two visible keys, and padding rows, are NaN.
    ``(B, H, Nq)``."""
    _check(probs, square=True)
    B, _, N, _ = probs.shape
    nvis = visible_keys(attention_mask, B, N, causal=causal, device=probs.device).sum(-1).float()  # (B, 1, N)
    h = entropy(probs)
    return torch.where(nvis >= 2, h / torch.log(nvis.clamp_min(2)), torch.full_like(h, float("nan")))


def top_k_mass(probs: Tensor, k: int) -> Tensor:
    """Concentration: probability mass of the ``k`` largest keys of each row. ``(B, H, Nq)``."""
    _check(probs)
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k: expected a positive integer, received {k!r}")
    return probs.float().topk(min(k, probs.shape[-1]), dim=-1).values.sum(-1)


def attention_distance(probs: Tensor) -> Tensor:
    """Mean attention distance of each row, ``sum_j p_ij |i - j|`` (for a causal model the mean backward distance
    of preplan-anchor's Eq. 7 before averaging over rows). ``(B, H, Nq)``."""
    _check(probs, square=True)
    d = _offsets(probs.shape[-1], probs.device).abs().float()
    return (probs.float() * d).sum(-1)


def waad(probs: Tensor, window: int = 10) -> Tensor:
    """Windowed Average Attention Distance (preplan-anchor #21, Def. 4.1): ``WAAD_i = sum_j p_ij min(|i - j|, W)``,
    the attention distance with distances clipped at the window ``W`` (the paper: ``W = 10``, causal, so
    ``|i - j| = i - j``). Small = the row stays near the diagonal. The paper applies it to the mean map of the
    local heads; WAAD is linear in ``p``, so that equals the mean of the heads' WAAD. ``(B, H, Nq)``."""
    _check(probs, square=True)
    if not isinstance(window, int) or window < 1:
        raise ValueError(f"window: expected a positive integer, received {window!r}")
    d = _offsets(probs.shape[-1], probs.device).abs().clamp_max(window).float()
    return (probs.float() * d).sum(-1)


def fai(probs: Tensor, attention_mask: Tensor | None = None, *, lo: int = 1, hi: int | None = None) -> Tensor:
    """Future Attention Influence (preplan-anchor #21, Def. 4.1) of each key position ``s``: the mean attention it
    receives from the later query rows ``t`` with ``s + lo <= t <= s + hi`` (real tokens only):
    ``FAI_s = mean_t p_ts``. The paper's analysis takes the scope to the end of the sequence (``lo = 1``,
    ``hi = None``). Positions with no such row are NaN. ``(B, H, Nk)``."""
    _check(probs, square=True)
    if lo < 1 or (hi is not None and hi < lo):
        raise ValueError(f"lo, hi: expected 1 <= lo <= hi, received lo={lo}, hi={hi}")
    B, _, N, _ = probs.shape
    real = _real(attention_mask, B, N, probs.device)
    off = -_offsets(N, probs.device)  # t - s for row t, column s
    scope = off >= lo
    if hi is not None:
        scope = scope & (off <= hi)
    rows = scope[None] & real[:, :, None] & real[:, None, :]  # (B, t, s)
    count = rows.sum(1).float()  # (B, s)
    s = (probs.float() * rows[:, None]).sum(-2)  # (B, H, s)
    c = count[:, None]
    return torch.where(c > 0, s / c.clamp_min(1), torch.full_like(s, float("nan")))


def distance_profile(probs: Tensor, attention_mask: Tensor | None = None, *, causal: bool,
                     max_distance: int | None = None) -> Tensor:
    """Attention strength vs distance (the per-head profile of `vit-visual-analytics` #23, with token distance in
    place of patch distance): the mean of ``p_ij`` over the visible (query, key) pairs with ``|i - j| = d``, for
    ``d = 0 .. max_distance``. A distance no pair reaches is NaN. ``(B, H, max_distance + 1)``."""
    _check(probs, square=True)
    B, _, N, _ = probs.shape
    D = N - 1 if max_distance is None else min(int(max_distance), N - 1)
    vis = visible_keys(attention_mask, B, N, causal=causal, device=probs.device)[:, 0]  # (B, N, N)
    dist = _offsets(N, probs.device).abs()
    onehot = torch.nn.functional.one_hot(dist.clamp_max(D + 1), D + 2)[..., : D + 1].float()  # (N, N, D+1)
    w = vis.float()[..., None] * onehot  # (B, N, N, D+1)
    s = torch.einsum("bhij,bijd->bhd", probs.float(), w)
    c = w.sum((1, 2))[:, None]  # (B, 1, D+1)
    return torch.where(c > 0, s / c.clamp_min(1), torch.full_like(s, float("nan")))


# ------------------------------------------------------------------------------------------- matrix statistics
def effective_rank(m: Tensor) -> Tensor:
    """Effective rank (Roy & Vetterli 2007) of matrices ``(..., N, M)``: ``exp(-sum_k q_k log q_k)`` with
    ``q_k = sigma_k / sum sigma``, the singular values normalised to a distribution. 1 for a rank-one matrix,
    ``min(N, M)`` for a matrix with equal singular values (e.g. the identity). ``(...)``."""
    if not isinstance(m, Tensor) or m.ndim < 2:
        raise ValueError(f"m: expected a tensor (..., N, M), received {getattr(m, 'shape', type(m).__name__)}")
    s = torch.linalg.svdvals(m.double())
    q = s / s.sum(-1, keepdim=True).clamp_min(1e-300)
    return torch.exp(-torch.special.xlogy(q, q).sum(-1)).float()


def attention_effective_rank(probs: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """Effective rank of each head's attention matrix restricted to the real tokens (rows and columns). ``(B, H)``."""
    _check(probs, square=True)
    B, H, N, _ = probs.shape
    real = _real(attention_mask, B, N, probs.device)
    out = torch.empty(B, H)
    for b in range(B):
        idx = real[b].nonzero().flatten()
        out[b] = effective_rank(probs[b][:, idx][:, :, idx]) if len(idx) else float("nan")
    return out


def head_groups(distance: Tensor, q: float = 0.3) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """Local and global heads (preplan-anchor #21, Sec. 4.1): heads sorted by mean backward distance ``(L, H)``;
    the lowest ``q`` fraction is local-focused, the highest ``q`` fraction global-focused (the paper: 30%).
    NaN heads are skipped. Returns ``(local, global)`` lists of ``(layer, head)``."""
    if distance.ndim != 2:
        raise ValueError(f"distance: expected (layers, heads), received shape {tuple(distance.shape)}")
    if not 0 < q <= 0.5:
        raise ValueError(f"q: expected a fraction in (0, 0.5], received {q}")
    flat = distance.flatten()
    ok = torch.isfinite(flat).nonzero().flatten()
    order = ok[flat[ok].argsort()]
    n = max(1, int(round(q * len(order))))
    H = distance.shape[1]
    pairs = [(int(i) // H, int(i) % H) for i in order.tolist()]
    return pairs[:n], pairs[-n:][::-1]


# ------------------------------------------------------------------------------------------------ the analysis
@dataclass
class HeadStatsResult(Result):
    """Per-head statistics ``(layers, heads)`` and token-level WAAD/FAI of one input."""

    tokens: list[str] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)
    causal: bool = True
    window: int = 10
    k: int = 4
    entropy: Tensor | None = None  # (L, H) mean row entropy, nats
    norm_entropy: Tensor | None = None  # (L, H) mean row entropy / log(visible keys)
    effective_rank: Tensor | None = None  # (L, H)
    distance: Tensor | None = None  # (L, H) mean attention distance (tokens)
    waad: Tensor | None = None  # (L, H) mean WAAD
    top_k: Tensor | None = None  # (L, H) mean top-k mass
    profile: Tensor | None = None  # (L, H, D+1) attention strength vs distance
    local_heads: list[tuple[int, int]] = field(default_factory=list)
    global_heads: list[tuple[int, int]] = field(default_factory=list)
    token_waad: Tensor | None = None  # (N,) WAAD of the local heads' mean map
    token_fai: Tensor | None = None  # (N,) FAI of the global heads' mean map
    fai_min_rows: int = 8

    def _stat(self, heads, t: Tensor) -> float:
        return float(torch.stack([t[self.layers.index(l), h] for l, h in heads]).nanmean())

    def top_fai(self, n: int = 5) -> list[tuple[int, str, float]]:
        """The ``n`` positions with the highest FAI among those with at least ``fai_min_rows`` later tokens."""
        N = len(self.tokens)
        f = self.token_fai.clone()
        f[max(0, N - self.fai_min_rows):] = float("nan")
        f = torch.nan_to_num(f, nan=-1.0)
        idx = f.argsort(descending=True)[:n].tolist()
        return [(i, self.tokens[i], float(self.token_fai[i])) for i in idx if f[i] >= 0]

    def findings(self) -> list[str]:
        out: list[str] = []
        L = lambda heads: sorted({l for l, _ in heads})  # noqa: E731
        out.append(
            f"Local vs global heads (lowest/highest 30% of {self.distance.numel()} heads by mean attention distance, "
            f"preplan-anchor Eq. 7): local heads look {self._stat(self.local_heads, self.distance):.2f} tokens away "
            f"on average (WAAD_{self.window} {self._stat(self.local_heads, self.waad):.2f}), global heads "
            f"{self._stat(self.global_heads, self.distance):.2f} tokens (WAAD {self._stat(self.global_heads, self.waad):.2f}); "
            f"local heads sit in layers {L(self.local_heads)}, global heads in layers {L(self.global_heads)}.")
        w = self.waad.flatten()
        w = w[torch.isfinite(w)].sort().values
        gaps = w[1:] - w[:-1]
        g = int(gaps.argmax()) if len(gaps) else 0
        out.append(
            f"Head WAAD_{self.window} ranges {float(w[0]):.2f}-{float(w[-1]):.2f} (median {float(w.median()):.2f}); "
            f"the largest gap in the sorted values ({float(gaps[g]) if len(gaps) else 0:.2f}, between "
            f"{float(w[g]):.2f} and {float(w[min(g + 1, len(w) - 1)]):.2f}) splits {g + 1} heads from {len(w) - g - 1}.")
        top = self.top_fai(5)
        if top:
            first_rank = int((self.token_fai > self.token_fai[0]).sum()) + 1 if torch.isfinite(self.token_fai[0]) else None
            out.append("Highest FAI (global heads' mean map, from all later tokens): "
                       + ", ".join(f"{t!r}@{i} {v:.3f}" for i, t, v in top)
                       + f"; mean FAI {float(self.token_fai.nanmean()):.3f}; the first token {self.tokens[0]!r} ranks "
                       f"#{first_rank} of {len(self.tokens)} (FAI {float(self.token_fai[0]):.3f}).")
        ne = self.norm_entropy.flatten()
        ne = ne[torch.isfinite(ne)]
        lo, hi = self.norm_entropy.nan_to_num(2).argmin(), self.norm_entropy.nan_to_num(-1).argmax()
        H = self.norm_entropy.shape[1]
        out.append(
            f"Normalised attention entropy per head: median {float(ne.median()):.2f} (quartiles "
            f"{float(ne.quantile(0.25)):.2f}-{float(ne.quantile(0.75)):.2f}); most concentrated head "
            f"L{self.layers[int(lo) // H]}H{int(lo) % H} ({float(ne.min()):.2f}), most diffuse "
            f"L{self.layers[int(hi) // H]}H{int(hi) % H} ({float(ne.max()):.2f}); mean entropy "
            f"{float(self.entropy.nanmean()):.2f} nats.")
        er = self.effective_rank
        out.append(
            f"Attention effective rank (of {len(self.tokens)} tokens): mean {float(er.nanmean()):.1f}, range "
            f"{float(er.min()):.1f}-{float(er.max()):.1f}; by layer first {float(er[0].mean()):.1f}, last "
            f"{float(er[-1].mean()):.1f}. Top-{self.k} keys hold {float(self.top_k.nanmean()) * 100:.0f}% of each "
            f"row's mass on average.")
        return out

    def sections(self) -> list[str]:
        out = ["<h3>Head statistics (entropy, effective rank, distance, WAAD, FAI)</h3>"]
        out += [note(f) for f in self.findings()]
        ylabels = [str(l) for l in self.layers]
        for name, t, title in [
            ("norm_entropy", self.norm_entropy, "normalised entropy (0 = one key, 1 = uniform)"),
            ("effective_rank", self.effective_rank, "effective rank of the attention matrix"),
            ("distance", self.distance, "mean attention distance (tokens)"),
            ("waad", self.waad, f"WAAD (window {self.window})"),
            ("top_k", self.top_k, f"top-{self.k} mass"),
        ]:
            out.append(figures.heatmap(t, title=f"{title}, layer x head", xlabel="head", ylabel="layer",
                                       ylabels=ylabels))
        prof = self.profile
        idx = lambda hs: [self.layers.index(l) * prof.shape[1] + h for l, h in hs]  # noqa: E731
        flat = prof.reshape(-1, prof.shape[-1])
        series = {"all heads": flat.nanmean(0).tolist(),
                  "local heads": flat[idx(self.local_heads)].nanmean(0).tolist(),
                  "global heads": flat[idx(self.global_heads)].nanmean(0).tolist()}
        out.append(figures.line_plot(list(range(prof.shape[-1])), series, title="attention strength vs distance",
                                     xlabel="|i - j| (tokens)", ylabel="mean attention p_ij", logy=True))
        out.append(figures.token_colors(self.tokens, self.token_waad.nan_to_num(0),
                                        title=f"WAAD per token (local heads, window {self.window})"))
        out.append(figures.token_colors(self.tokens, self.token_fai.nan_to_num(0),
                                        title="FAI per token (global heads)"))
        out.append(table(["position", "token", "FAI"], [[i, t, f"{v:.4f}"] for i, t, v in self.top_fai(10)]))
        return out


@analysis("head-stats", seeds=("preplan-anchor", "agilepruner", "self-reference-matrix", "vit-visual-analytics"),
          summary="Per-head entropy, effective rank, attention distance and its profile, WAAD/FAI (local vs global "
                  "heads, anchor tokens), top-k concentration")
def run_head_stats(lm: LoadedModel, inp: Inputs, *, layers: list[int] | None = None, window: int = 10,
                   k: int = 4, group_q: float = 0.3, max_distance: int = 32, fai_min_rows: int = 8
                   ) -> HeadStatsResult:
    """All statistics per layer and head in one streaming pass (one layer's probabilities in memory at a time)."""
    L = lm.info.layers
    layers = list(range(L)) if layers is None else sorted({int(x) % L for x in layers})
    causal = lm.info.causal
    mask = inp.attention_mask
    stats: dict[str, dict[int, Tensor]] = {n: {} for n in ("ent", "nent", "erank", "dist", "waad", "topk", "prof",
                                                           "twaad", "tfai")}

    def on_layer(rec: LayerRecord) -> None:
        p = rec["probs"]  # (1, H, N, N)
        stats["ent"][rec.layer] = row_mean(entropy(p), mask)[0]
        stats["nent"][rec.layer] = row_mean(normalized_entropy(p, mask, causal=causal), mask)[0]
        stats["erank"][rec.layer] = attention_effective_rank(p, mask)[0]
        stats["dist"][rec.layer] = row_mean(attention_distance(p), mask)[0]
        w = waad(p, window)
        stats["waad"][rec.layer] = row_mean(w, mask)[0]
        stats["twaad"][rec.layer] = w[0]
        stats["topk"][rec.layer] = row_mean(top_k_mass(p, k), mask)[0]
        stats["prof"][rec.layer] = distance_profile(p, mask, causal=causal, max_distance=max_distance)[0]
        stats["tfai"][rec.layer] = fai(p, mask)[0]

    with torch.no_grad(), Capture(lm.model, layers=layers, what=("probs",), on_layer=on_layer, keep=False):
        lm.model(**inp.model_kwargs())
    st = {n: torch.stack([d[l] for l in layers]) for n, d in stats.items()}
    local, glob = head_groups(st["dist"], group_q)
    local = [(layers[i], h) for i, h in local]
    glob = [(layers[i], h) for i, h in glob]
    pick = lambda t, hs: torch.stack([t[layers.index(l), h] for l, h in hs]).mean(0)  # noqa: E731
    return HeadStatsResult(
        model=lm.info.name, tokens=inp.tokens, layers=layers, causal=causal, window=window, k=k,
        entropy=st["ent"], norm_entropy=st["nent"], effective_rank=st["erank"], distance=st["dist"],
        waad=st["waad"], top_k=st["topk"], profile=st["prof"], local_heads=local, global_heads=glob,
        token_waad=pick(st["twaad"], local), token_fai=pick(st["tfai"], glob), fai_min_rows=fai_min_rows)

