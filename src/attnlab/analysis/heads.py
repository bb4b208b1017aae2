"""Which heads matter: head importance and pruning (`sixteen-heads` #120), and heads with a recognisable pattern
(induction, previous-token and fixed-offset heads; `induction-head-abrupt` #251, `teaching-matters-vit` #116).

Analyses:

- ``head-importance``: (a) ablation importance, the metric damage when one head's output is gated to 0;
  (b) gate-gradient importance (Michel et al., 2019): ``|d loss / d gate|`` at gates of 1, normalised per layer;
  (c) the Spearman correlation of (a) and (b); (d) the greedy pruning curve, removing heads in order of increasing
  importance. Metric: SmolLM2 next-token loss / perplexity; MiniLM ``1 - cos`` between the sentence embedding with
  and without the heads.
- ``pattern-heads``: induction score on a random token sequence repeated twice, fixed-offset scores (previous token
  etc.) on the input, and (causal models) the loss on the repeated half with the top-k induction heads ablated vs
  k random heads.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..htmlkit import note, table
from ..models.loaders import LoadedModel
from . import figures
from .base import Inputs, Result, analysis, next_token_loss, sentence_embedding
from .capture import Capture, LayerRecord, head_gates
from .metrics import spearman, top_heads

__all__ = [
    "HeadImportanceResult", "PatternHeadsResult", "ablation_importance", "induction_scores", "normalize_per_layer",
    "offset_scores", "pruning_curve", "pruning_order", "random_repeat_ids", "run_head_importance",
    "run_pattern_heads",
]

Head = tuple[int, int]


# ------------------------------------------------------------------------------------------- pure functions
def normalize_per_layer(importance: Tensor) -> Tensor:
    """Michel et al.'s layer normalisation: each layer's scores divided by their l2 norm. ``(L, H) -> (L, H)``."""
    if importance.ndim != 2:
        raise ValueError(f"importance: expected (layers, heads), received shape {tuple(importance.shape)}")
    n = importance.nan_to_num(0).norm(dim=1, keepdim=True)
    return importance / n.clamp_min(1e-30)


def ablation_importance(damage: Callable[[Tensor], float], layers: int, heads: int,
                        which: Sequence[Head] | None = None) -> Tensor:
    """Metric damage of removing each head alone: ``damage(gates with head (l, h) = 0) - damage(all ones)``.

    ``damage(gates (L, H)) -> float`` is any score where larger means worse (a loss, ``1 - cos``). Heads not in
    ``which`` (default: all) are NaN. ``(L, H)``."""
    base = float(damage(head_gates(layers, heads)))
    out = torch.full((layers, heads), float("nan"))
    for l, h in (which if which is not None else [(l, h) for l in range(layers) for h in range(heads)]):
        out[l, h] = float(damage(head_gates(layers, heads, off=[(l, h)]))) - base
    return out


def pruning_order(importance: Tensor) -> list[Head]:
    """Heads sorted by increasing importance (the least important is pruned first); NaN heads last."""
    H = importance.shape[1]
    flat = importance.flatten().nan_to_num(float("inf"))
    return [(int(i) // H, int(i) % H) for i in flat.argsort(stable=True).tolist()]


def pruning_curve(metric: Callable[[Tensor], float], order: Sequence[Head], layers: int, heads: int,
                  fractions: Sequence[float]) -> list[float]:
    """``metric(gates)`` after gating the first ``round(f * L * H)`` heads of ``order`` to 0, for each fraction."""
    out = []
    for f in fractions:
        if not 0 <= f <= 1:
            raise ValueError(f"fractions: expected values in [0, 1], received {f}")
        out.append(float(metric(head_gates(layers, heads, off=order[: int(round(f * layers * heads))]))))
    return out


def random_repeat_ids(lm: LoadedModel, length: int, *, seed: int = 0) -> tuple[Tensor, int]:
    """A random sequence of ``length`` distinct ordinary tokens, repeated twice, with the tokenizer's special tokens
    around it (BERT: ``[CLS] ... [SEP]``; SmolLM2: none). Returns ``(ids (1, n), start)``: the first copy spans
    ``[start, start + length)``, the second ``[start + length, start + 2 * length)``."""
    if length < 2:
        raise ValueError(f"length: expected at least 2 tokens, received {length}")
    tok = lm.tokenizer
    special = set(tok.all_special_ids or [])
    vocab = len(tok)
    lo = min(1000, vocab // 4)  # skip the byte/merge-table head of the vocabulary
    pool = [i for i in range(lo, vocab) if i not in special]
    seq = random.Random(seed).sample(pool, length)
    # the special tokens the tokenizer puts around a text: those around the plain encoding of one word
    with_sp = list(tok("a", add_special_tokens=True)["input_ids"])
    plain = list(tok("a", add_special_tokens=False)["input_ids"])
    at = next(i for i in range(len(with_sp)) if with_sp[i: i + len(plain)] == plain)
    prefix, suffix = with_sp[:at], with_sp[at + len(plain):]
    full, start = prefix + seq + seq + suffix, len(prefix)
    if 2 * length + start > lm.info.context:
        raise ValueError(f"length: expected 2 * length + specials <= context {lm.info.context}, received {length}")
    return torch.tensor([full]), start


def induction_scores(probs: Tensor, start: int, period: int) -> Tensor:
    """Induction score (Olsson et al.; the induction head of #251): mean attention from each token of the second
    copy, position ``i`` in ``[start + period, start + 2 period)``, to the token after its previous occurrence,
    ``i - period + 1``. ``probs (B, H, N, N) -> (B, H)``."""
    if probs.ndim != 4 or start + 2 * period > probs.shape[-2]:
        raise ValueError(f"probs: expected (B, H, N, N) with N >= start + 2 * period = {start + 2 * period}, "
                         f"received {tuple(probs.shape)}")
    i = torch.arange(start + period, start + 2 * period)
    return probs[:, :, i, i - period + 1].float().mean(-1)


def offset_scores(probs: Tensor, offsets: Sequence[int], attention_mask: Tensor | None = None) -> Tensor:
    """Fixed-offset scores (`teaching-matters-vit` #116 offset heads): for each offset ``o``, the mean attention from
    query ``i`` to key ``i + o`` over real tokens with ``i + o`` real (``o = -1``: previous-token score).
    ``probs (B, H, N, N) -> (B, H, len(offsets))``."""
    if probs.ndim != 4 or probs.shape[-1] != probs.shape[-2]:
        raise ValueError(f"probs: expected (B, H, N, N), received {tuple(probs.shape)}")
    B, _, N, _ = probs.shape
    real = torch.ones(B, N, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    out = []
    for o in offsets:
        i = torch.arange(max(0, -o), min(N, N - o))
        if len(i) == 0:
            out.append(torch.full(probs.shape[:2], float("nan")))
            continue
        ok = (real[:, i] & real[:, i + o]).float()  # (B, n)
        v = probs[:, :, i, i + o].float()
        out.append((v * ok[:, None]).sum(-1) / ok.sum(-1).clamp_min(1)[:, None])
    return torch.stack(out, -1)


# ------------------------------------------------------------------------------------------- head importance
def _scorers(lm: LoadedModel, ids: Tensor, mask: Tensor, *, projections: int, seed: int):
    """(damage(gates), gradient importance () -> (L, H), curve metric(gates), names) for the model kind."""
    L, H = lm.info.layers, lm.info.heads
    if lm.info.causal:
        def damage(g):
            with torch.no_grad():
                return float(next_token_loss(lm, ids, mask, gates=g))

        def gradient():
            g = head_gates(L, H, requires_grad=True)
            next_token_loss(lm, ids, mask, gates=g).backward()
            return g.grad.abs()

        return damage, gradient, lambda g: math.exp(damage(g)), ("next-token loss (nats)", "perplexity")

    with torch.no_grad():
        e0 = sentence_embedding(lm, ids, mask)[0]

    def damage(g):
        with torch.no_grad():
            return 1.0 - float(sentence_embedding(lm, ids, mask, gates=g)[0] @ e0)

    def gradient():
        # d(1 - cos)/d gate is 0 at gates = 1 (cos is at its maximum), so use the next Taylor term:
        # 1 - cos(e, e + delta) ~ |delta|^2 / 2 with delta ~ -J_h, J = d embedding / d gates, |J_h|^2 estimated
        # with Gaussian projections v: E[(v . J_h)^2] = |J_h|^2 (one batched backward pass).
        g = head_gates(L, H, requires_grad=True)
        e = sentence_embedding(lm, ids, mask, gates=g)[0]
        v = torch.randn(projections, e.shape[-1], generator=torch.Generator().manual_seed(seed))
        (jv,) = torch.autograd.grad(e, g, grad_outputs=v, is_grads_batched=True)
        return 0.5 * (jv ** 2).mean(0)

    return damage, gradient, lambda g: 1.0 - damage(g), ("1 - cos(embedding)", "cosine to the unpruned embedding")


def _even_layers(L: int, n: int) -> list[int]:
    n = max(1, min(L, n))
    return sorted({round(i * (L - 1) / max(1, n - 1)) for i in range(n)}) if n > 1 else [L // 2]


@dataclass
class HeadImportanceResult(Result):
    """Head importance by ablation and by gate gradient, their rank agreement, and the pruning curve."""

    n_tokens: int = 0
    metric: str = ""
    curve_metric: str = ""
    base: float = 0.0  # damage metric of the intact model (loss; 0 for 1 - cos)
    ablation_layers: list[int] = field(default_factory=list)
    ablation: Tensor | None = None  # (L, H) damage when the head alone is removed; NaN = not evaluated
    gradient: Tensor | None = None  # (L, H) raw gate-gradient importance
    gradient_norm: Tensor | None = None  # (L, H) normalised per layer (Michel et al.)
    spearman: float = float("nan")  # ablation vs raw gradient importance, over the evaluated heads
    spearman_norm: float = float("nan")  # ablation vs layer-normalised gradient importance
    spearman_abs: float = float("nan")  # |ablation| vs raw gradient importance (removal can also lower the loss)
    fractions: list[float] = field(default_factory=list)
    curve: list[float] = field(default_factory=list)  # curve metric after pruning each fraction
    order_by: str = "gradient_norm"
    seconds: dict[str, float] = field(default_factory=dict)

    def _heads(self, t: Tensor, n: int, largest: bool = True) -> list[tuple[Head, float]]:
        flat = t.flatten().nan_to_num(float("-inf") if largest else float("inf"))
        idx = flat.argsort(descending=largest)[:n]
        H = t.shape[1]
        return [((int(i) // H, int(i) % H), float(t.flatten()[i])) for i in idx if math.isfinite(float(t.flatten()[i]))]

    def findings(self) -> list[str]:
        a = self.ablation[torch.isfinite(self.ablation)]
        top = self._heads(self.ablation, 3)
        small = 0.01 if self.metric.startswith("next") else 0.001
        out = [
            f"Removing one head at a time ({len(a)} heads in layers {self.ablation_layers}, {self.n_tokens} tokens): "
            f"{self.metric} changes by median {float(a.median()):+.4f}, {float((a.abs() < small).float().mean()) * 100:.0f}% "
            f"of heads by less than {small}; the most important are "
            + ", ".join(f"L{l}H{h} ({v:+.4f})" for (l, h), v in top) + f" (base {self.base:.4f}).",
            f"Ablation vs gate-gradient importance: Spearman {self.spearman:.2f} (raw), {self.spearman_norm:.2f} "
            f"(normalised per layer), {self.spearman_abs:.2f} (|ablation| vs raw gradient) over {len(a)} heads.",
        ]
        base = self.curve[0]
        rel = [(f, c) for f, c in zip(self.fractions, self.curve)]
        if self.curve_metric == "perplexity":
            ok = [f for f, c in rel if c <= 1.05 * base]
            desc = "perplexity " + ", ".join(f"{f * 100:.0f}%: {c:.1f}" for f, c in rel)
            tol = "within 5% of the unpruned perplexity"
        else:
            ok = [f for f, c in rel if c >= 0.99]
            desc = "cosine " + ", ".join(f"{f * 100:.0f}%: {c:.3f}" for f, c in rel)
            tol = "at cosine >= 0.99 to the unpruned embedding"
        out.append(f"Greedy pruning by {self.order_by} importance (least important first): {desc}; up to "
                   f"{max(ok) * 100 if ok else 0:.0f}% of heads can be removed {tol}.")
        return out

    def sections(self) -> list[str]:
        out = ["<h3>Head importance and pruning (Michel et al.)</h3>"]
        out += [note(f) for f in self.findings()]
        out.append(figures.heatmap(self.ablation.nan_to_num(0), title=f"ablation importance: change in {self.metric} "
                                   "(0 = not evaluated)", xlabel="head", ylabel="layer"))
        out.append(figures.heatmap(self.gradient_norm, title="gate-gradient importance, normalised per layer",
                                   xlabel="head", ylabel="layer"))
        rows = [[f"L{l}H{h}", f"{v:+.4f}", f"{float(self.gradient_norm[l, h]):.3f}"]
                for (l, h), v in self._heads(self.ablation, 10)]
        out.append(table(["head", f"ablation: change in {self.metric}", "gradient (normalised)"], rows))
        out.append(figures.line_plot([f * 100 for f in self.fractions], {self.curve_metric: self.curve},
                                     title="greedy pruning curve", xlabel="% heads pruned", ylabel=self.curve_metric,
                                     logy=self.curve_metric == "perplexity"))
        return out


@analysis("head-importance", seeds=("sixteen-heads", "vit-visual-analytics"),
          summary="Head importance by single-head ablation and by gate gradient (Michel et al.), their Spearman "
                  "agreement, and the greedy pruning curve")
def run_head_importance(lm: LoadedModel, inp: Inputs, *, max_tokens: int = 32, layers: Sequence[int] | None = None,
                        max_passes: int = 18, fractions: Sequence[float] = tuple(i / 10 for i in range(10)),
                        order_by: str = "gradient_norm", projections: int = 32, seed: int = 0
                        ) -> HeadImportanceResult:
    """Importance of every head on the first ``max_tokens`` tokens of ``inp``.

    Ablation costs one forward pass per head, so by default it covers evenly spaced layers with at most
    ``max_passes`` heads in total (``layers=range(L)`` for all). The gradient importance covers every head (one
    backward pass). The pruning order is by ``order_by`` ("gradient_norm", "gradient" or "ablation" -- the last
    only meaningful when every head was ablated).
    """
    import time

    if order_by not in ("gradient_norm", "gradient", "ablation"):
        raise ValueError(f"order_by: expected 'gradient_norm', 'gradient' or 'ablation', received {order_by!r}")
    L, H = lm.info.layers, lm.info.heads
    ids, mask = inp.input_ids[:, :max_tokens], inp.attention_mask[:, :max_tokens]
    if ids.shape[-1] < 3:
        raise ValueError(f"inp: expected at least 3 tokens, received {ids.shape[-1]}")
    chosen = _even_layers(L, max_passes // H) if layers is None else sorted({int(x) % L for x in layers})
    damage, gradient, curve_metric, (mname, cname) = _scorers(lm, ids, mask, projections=projections, seed=seed)
    secs = {}
    t = time.perf_counter()
    grad = gradient()
    secs["gradient"] = time.perf_counter() - t
    t = time.perf_counter()
    abl = ablation_importance(damage, L, H, [(l, h) for l in chosen for h in range(H)])
    secs["ablation"] = time.perf_counter() - t
    gnorm = normalize_per_layer(grad)
    imp = {"gradient_norm": gnorm, "gradient": grad, "ablation": abl}[order_by]
    t = time.perf_counter()
    curve = pruning_curve(curve_metric, pruning_order(imp), L, H, list(fractions))
    secs["curve"] = time.perf_counter() - t
    return HeadImportanceResult(
        model=lm.info.name, n_tokens=int(ids.shape[-1]), metric=mname, curve_metric=cname,
        base=float(damage(head_gates(L, H))), ablation_layers=chosen, ablation=abl, gradient=grad,
        gradient_norm=gnorm, spearman=spearman(abl, grad), spearman_norm=spearman(abl, gnorm), spearman_abs=spearman(abl.abs(), grad),
        fractions=[float(f) for f in fractions], curve=curve, order_by=order_by, seconds=secs)


# ------------------------------------------------------------------------------------------- pattern heads
@dataclass
class PatternHeadsResult(Result):
    """Induction, previous-token and fixed-offset scores per head; induction-head ablation (causal models)."""

    length: int = 0
    induction: Tensor | None = None  # (L, H)
    offsets: list[int] = field(default_factory=list)
    offset: Tensor | None = None  # (L, H, len(offsets)) on the input text
    threshold: float = 0.4
    k: int = 5
    top_induction: list[Head] = field(default_factory=list)
    loss_first_half: float | None = None  # mean loss on the first (unpredictable) copy
    loss_repeat: float | None = None  # mean loss on the repeated copy, intact model
    loss_repeat_top: float | None = None  # ... with the top-k induction heads ablated
    loss_repeat_random: list[float] = field(default_factory=list)  # ... with k random heads ablated (each draw)

    def _best(self, t: Tensor) -> tuple[Head, float]:
        i = int(t.nan_to_num(-1).argmax())
        return (i // t.shape[1], i % t.shape[1]), float(t.flatten()[i])

    def findings(self) -> list[str]:
        (l, h), v = self._best(self.induction)
        n_ind = int((self.induction > self.threshold).sum())
        out = [f"Strongest induction head L{l}H{h}: {v:.2f} of its attention from the repeated copy goes to the token "
               f"after the previous occurrence ({n_ind} heads above {self.threshold}; random tokens, 2 x {self.length}; "
               f"uniform attention would give ~{1 / (2 * self.length):.3f}-{1 / self.length:.3f})."]
        for j, o in enumerate(self.offsets):
            if o == 0:
                continue
            t = self.offset[..., j]
            (l, h), v = self._best(t)
            heads = [(i // t.shape[1], i % t.shape[1]) for i in (t.flatten() > self.threshold).nonzero().flatten().tolist()]
            name = "previous-token" if o == -1 else ("next-token" if o == 1 else f"offset {o:+d}")
            out.append(f"{name} heads (mean attention to i{o:+d} > {self.threshold} on the input text): {len(heads)}"
                       + (" (" + ", ".join(f"L{a}H{b}" for a, b in heads[:8]) + (", ..." if len(heads) > 8 else "") + ")"
                          if heads else "") + f"; strongest L{l}H{h} {v:.2f}.")
        if self.loss_repeat is not None:
            r = self.loss_repeat_random
            out.append(f"Loss on the repeated copy {self.loss_repeat:.2f} nats (first copy {self.loss_first_half:.2f}); "
                       f"ablating the top-{self.k} induction heads raises it to {self.loss_repeat_top:.2f}, ablating "
                       f"{self.k} random heads to {sum(r) / len(r):.2f} (mean of {len(r)} draws, range "
                       f"{min(r):.2f}-{max(r):.2f}).")
        return out

    def sections(self) -> list[str]:
        out = ["<h3>Pattern heads: induction, previous-token, fixed offsets</h3>"]
        out += [note(f) for f in self.findings()]
        out.append(figures.heatmap(self.induction, title="induction score (layer x head)", xlabel="head",
                                   ylabel="layer"))
        for j, o in enumerate(self.offsets):
            if o != 0:
                out.append(figures.heatmap(self.offset[..., j], title=f"offset {o:+d} score (layer x head)",
                                           xlabel="head", ylabel="layer"))
        rows = [[f"L{l}H{h}", f"{float(self.induction[l, h]):.3f}"]
                + [f"{float(self.offset[l, h, j]):.3f}" for j in range(len(self.offsets))] for l, h in self.top_induction]
        out.append(table(["head", "induction"] + [f"offset {o:+d}" for o in self.offsets], rows))
        return out


def _capture_scores(lm: LoadedModel, kwargs: dict, fn: Callable[[Tensor], Tensor]) -> Tensor:
    """``fn(probs (1, H, N, N)) -> (1, H, ...)`` on every layer, streamed; ``(L, H, ...)``."""
    per: dict[int, Tensor] = {}

    def on_layer(rec: LayerRecord) -> None:
        per[rec.layer] = fn(rec["probs"])[0]

    with torch.no_grad(), Capture(lm.model, what=("probs",), on_layer=on_layer, keep=False):
        lm.model(**kwargs)
    return torch.stack([per[l] for l in sorted(per)])


@analysis("pattern-heads", seeds=("induction-head-abrupt", "teaching-matters-vit"),
          summary="Induction heads on a repeated random sequence, previous-token and fixed-offset heads, and the "
                  "loss on the repeated half with the top induction heads ablated vs random heads")
def run_pattern_heads(lm: LoadedModel, inp: Inputs, *, length: int = 24, seed: int = 0, k: int = 5,
                      n_random: int = 3, threshold: float = 0.4, offsets: Sequence[int] | None = None
                      ) -> PatternHeadsResult:
    """Scores per head; the ablation part runs for causal models only (it needs the next-token loss)."""
    L, H = lm.info.layers, lm.info.heads
    if offsets is None:
        offsets = (-2, -1, 0) if lm.info.causal else (-2, -1, 0, 1, 2)
    if lm.info.causal and any(o > 0 for o in offsets):
        raise ValueError(f"offsets: expected offsets <= 0 for a causal model, received {list(offsets)}")
    if not 1 <= k <= L * H:
        raise ValueError(f"k: expected 1 <= k <= {L * H} heads, received {k}")
    ids, start = random_repeat_ids(lm, length, seed=seed)
    rep = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    ind = _capture_scores(lm, rep, lambda p: induction_scores(p, start, length))
    off = _capture_scores(lm, inp.model_kwargs(), lambda p: offset_scores(p, offsets, inp.attention_mask))
    top = top_heads(ind, k)
    res = PatternHeadsResult(model=lm.info.name, length=length, induction=ind, offsets=list(offsets), offset=off,
                             threshold=threshold, k=k, top_induction=top)
    if lm.info.causal:
        def repeat_loss(heads: Sequence[Head]) -> Tensor:
            with torch.no_grad():
                # index t predicts token t + 1
                return next_token_loss(lm, ids, gates=head_gates(L, H, off=heads), reduction="none")[0]

        second = slice(start + length, start + 2 * length - 1)  # predicts tokens start+length+1 ..
        first = slice(start, start + length - 1)
        base = repeat_loss([])
        res.loss_first_half = float(base[first].mean())
        res.loss_repeat = float(base[second].mean())
        res.loss_repeat_top = float(repeat_loss(top)[second].mean())
        rng = random.Random(seed)
        allh = [(l, h) for l in range(L) for h in range(H)]
        res.loss_repeat_random = [float(repeat_loss(rng.sample(allh, k))[second].mean()) for _ in range(n_random)]
    return res
