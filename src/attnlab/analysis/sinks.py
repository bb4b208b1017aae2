"""Attention sinks in real models, and a training-free calibration of them.

- ``sinks`` (seeds ``secondary-sinks`` #24, and the text analogue of ``visual-attention-sink`` #45): how much
  attention each token receives per layer, the primary sink (position 0), secondary sinks (non-initial tokens
  receiving far more than a uniform share, in middle layers), their lifetime, their hidden state's cosine to the
  first token's, the norm of the MLP outputs that write them, and massive-activation hidden dimensions.
- ``act-calibration`` (seed ``act-calibration`` #75, arXiv 2406.15765): in every head where a non-initial token
  takes more than a threshold of the attention, scale the attention to it down by ``beta`` and renormalise the
  rows, at inference; perplexity and a small local cloze set before / after.

Definitions (used by the pure functions below; shapes documented on each):

- *received mass* of key ``j`` in one layer: ``s_j = mean_{h, i: i sees j} p[h, i, j]`` -- the mean over heads and
  over the query rows that can attend to ``j`` (causal: ``i >= j``; bidirectional: all real rows).
- *uniform baseline* ``u_j``: the same mean for uniform attention (each row spreads its mass evenly over the keys
  it sees): ``mean_{i sees j} 1 / |keys seen by i|``. The *sink ratio* is ``s_j / u_j``.
- a token is a *sink* in a layer when its ratio exceeds ``k`` (default 5) and at least ``min_rows`` query rows see
  it (default ``max(8, N // 4)``: the last tokens of a causal input are seen by few rows, and local heads alone
  push their ratio over ``k``, so they are not called sinks).
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..htmlkit import note, table
from ..models.loaders import LoadedModel
from .base import Inputs, Result, analysis, causal_only, next_token_loss
from .capture import Capture
from .metrics import spearman, visible_keys
from .figures import heatmap, line_plot, token_colors

__all__ = [
    "ActCalibrationResult", "CLOZE_ITEMS", "SinksResult", "act_edit", "block_modules", "cloze_accuracy",
    "longest_run", "massive_activations", "mlp_modules", "received_mass", "run_act_calibration", "run_sinks",
    "sink_ratio", "uniform_mass",
]


# ------------------------------------------------------------------------------------------------ pure functions
def received_mass(probs: Tensor, vis: Tensor) -> Tensor:
    """Attention mass each key receives: ``probs (H, N, N)`` (or ``(N, N)``) and ``vis (N, N)`` -> ``(N,)``, the
    mean over heads and over the rows that see each key (0 for a key no row sees)."""
    if probs.ndim == 2:
        probs = probs[None]
    if probs.ndim != 3 or probs.shape[-2:] != vis.shape:
        raise ValueError(f"probs: expected (H, N, N) with N = {vis.shape[0]}, received {tuple(probs.shape)}")
    w = vis.to(probs.dtype)
    rows = w.sum(0)
    return (probs * w).sum(1).mean(0) / rows.clamp_min(1)


def uniform_mass(vis: Tensor) -> Tensor:
    """``received_mass`` of uniform attention over the visible keys: ``(N, N)`` bool -> ``(N,)``."""
    w = vis.float()
    uni = w / w.sum(1, keepdim=True).clamp_min(1)
    return received_mass(uni, vis)


def sink_ratio(probs: Tensor, vis: Tensor) -> Tensor:
    """Received mass over its uniform baseline, ``(H, N, N)``/``(N, N)`` -> ``(N,)`` (1 = no preference)."""
    return received_mass(probs, vis) / uniform_mass(vis).clamp_min(1e-12)


def longest_run(flags: Tensor) -> Tensor:
    """Longest run of consecutive True values along dim 0: ``(L, N)`` bool -> ``(N,)`` int (a sink's lifetime)."""
    if flags.ndim == 1:
        flags = flags[:, None]
    run = torch.zeros(flags.shape[1:], dtype=torch.long)
    best = torch.zeros_like(run)
    for row in flags:
        run = torch.where(row, run + 1, torch.zeros_like(run))
        best = torch.maximum(best, run)
    return best


def massive_activations(hidden: Tensor, factor: float = 100.0) -> Tensor:
    """Entries whose magnitude exceeds ``factor`` x the median magnitude of their layer: ``hidden (L, N, D)`` ->
    bool ``(L, N, D)``."""
    if hidden.ndim != 3:
        raise ValueError(f"hidden: expected (layers, tokens, dims), received {tuple(hidden.shape)}")
    if factor <= 0:
        raise ValueError(f"factor: expected a positive number, received {factor}")
    a = hidden.abs().float()
    med = a.flatten(1).median(dim=1).values
    return a > factor * med[:, None, None]


def act_edit(probs: Tensor, vis: Tensor, *, threshold: float = 0.2, beta: float = 0.4, skip_first: int = 1,
             min_rows: int = 8) -> tuple[Tensor, Tensor]:
    """Attention calibration on one layer: ``probs (B, H, N, N)``, ``vis (N, N)``.

    In each head, a key ``j >= skip_first`` whose received mass (mean over the rows that see it) exceeds
    ``threshold`` and that at least ``min_rows`` rows see is a non-initial sink; every row's attention to it is
    multiplied by ``beta`` and the row is renormalised (the removed mass goes to the other keys in proportion).
    Returns ``(edited probs, sinks (B, H, N) bool)``.
    """
    if probs.ndim != 4 or probs.shape[-2:] != vis.shape:
        raise ValueError(f"probs: expected (B, H, N, N) with N = {vis.shape[0]}, received {tuple(probs.shape)}")
    if not 0 <= beta <= 1:
        raise ValueError(f"beta: expected a factor in [0, 1], received {beta}")
    w = vis.to(probs.dtype)
    mass = (probs * w).sum(-2) / w.sum(0).clamp_min(1)  # (B, H, N)
    sinks = (mass > threshold) & (w.sum(0) >= min_rows)
    sinks[..., :skip_first] = False
    scale = torch.where(sinks, torch.full_like(mass, beta), torch.ones_like(mass))
    edited = probs * scale[:, :, None, :]
    total = edited.sum(-1, keepdim=True)
    edited = edited / torch.where(total > 0, total, torch.ones_like(total))
    return edited, sinks


# --------------------------------------------------------------------------------------------- model structure
def block_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks in order: the longest ``ModuleList`` whose items contain an attention module."""
    best: list[torch.nn.Module] = []
    for m in model.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) > len(best):
            if all(any(hasattr(c, "layer_idx") for c in item.modules()) for item in m):
                best = list(m)
    if not best:
        raise ValueError(f"model: expected a transformer with a list of blocks, received {type(model).__name__}")
    return best


def mlp_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The module whose output is each block's MLP output (before the residual add): ``block.mlp`` (Llama-like)
    or ``block.output.dense`` (BERT)."""
    out = []
    for i, b in enumerate(block_modules(model)):
        for path in ("mlp", "feed_forward", "ffn", "output.dense"):
            m = b
            for part in path.split("."):
                m = getattr(m, part, None)
            if isinstance(m, torch.nn.Module):
                out.append(m)
                break
        else:
            raise ValueError(f"block {i}: expected an 'mlp' or 'output.dense' submodule, found none")
    return out


def _forward_with_internals(lm: LoadedModel, inp: Inputs, what=("probs",)):
    """One forward pass: per-layer probs (L, H, N, N) (batch row 0), hidden states entering each layer
    (L, N, D), and MLP output norms (L, N)."""
    mlps = mlp_modules(lm.model)
    norms: list[Tensor] = [None] * len(mlps)  # type: ignore[list-item]
    hooks = []
    for i, m in enumerate(mlps):
        def hook(_m, _a, out, i=i):
            o = out[0] if isinstance(out, tuple) else out
            norms[i] = o[0].detach().float().norm(dim=-1)
        hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad(), Capture(lm.model, what=what) as cap:
            out = lm.model(**inp.model_kwargs(), output_hidden_states=True)
    finally:
        for h in hooks:
            h.remove()
    L = lm.info.layers
    probs = torch.stack([cap.records[l]["probs"][0] for l in range(L)])
    hidden = torch.stack([h[0] for h in out.hidden_states[:L]]).float()
    return probs, hidden, torch.stack(norms), out


# --------------------------------------------------------------------------------------------------- sinks
@dataclass
class SinksResult(Result):
    tokens: list[str] = field(default_factory=list)
    k: float = 5.0
    min_rows: int = 8
    mlp_norm_median: float = float("nan")  # median MLP-output norm over candidate tokens and layers 0..L-2
    middle: tuple[int, int] = (0, 0)  # middle layers [a, b)
    first_share: list[float] = field(default_factory=list)  # (L,) received mass of position 0
    last_share: list[float] = field(default_factory=list)  # (L,) received mass of the last token ([SEP])
    ratio: Tensor | None = None  # (L, N) sink ratio per layer and token
    secondary: list[dict] = field(default_factory=list)  # one per secondary sink
    cos_to_first_sinks: float = float("nan")  # mean cosine (hidden state entering the first sink layer) to pos 0
    cos_to_first_others: float = float("nan")  # same for non-sink tokens at the middle layer
    corr_norm_score: float = float("nan")  # Spearman over non-initial tokens: peak MLP norm vs peak sink ratio
    corr_norm_lifetime: float = float("nan")
    massive: list[dict] = field(default_factory=list)  # one per massive dimension
    massive_factor: float = 100.0
    causal_model: bool = True

    def findings(self) -> list[str]:
        a, b = self.middle
        L = len(self.first_share)
        later = self.first_share[min(2, L - 1):]
        f = [f"First token receives {100 * _mean(self.first_share[a:b]):.1f}% of the attention mass (mean over heads "
             f"and the rows that see it) averaged over middle layers {a}-{b - 1}, "
             f"{100 * _mean(later):.1f}% over layers {min(2, L - 1)}-{L - 1}, {100 * self.first_share[0]:.1f}% "
             f"in layer 0."]
        if not self.causal_model:
            f.append(f"Last token ([SEP]) receives {100 * _mean(self.last_share):.1f}% averaged over all layers.")
        if self.secondary:
            tops = sorted(self.secondary, key=lambda s: -s["peak_ratio"])[:3]
            desc = "; ".join(f"{s['token']!r}@{s['position']} from layer {s['first_layer']}, lifetime "
                             f"{s['lifetime']}, peak {s['peak_ratio']:.1f}x uniform" for s in tops)
            f.append(f"{len(self.secondary)} secondary sink(s) (non-initial, > {self.k:g}x uniform in a middle "
                     f"layer): {desc}.")
            f.append(f"Cosine of a secondary sink's hidden state (entering its first sink layer) to the first "
                     f"token's: mean {self.cos_to_first_sinks:.2f} (other tokens at the middle layer: "
                     f"{self.cos_to_first_others:.2f}); the MLP output just before it has norm "
                     f"{_mean(s['producing_mlp_norm'] for s in self.secondary):.0f} on average (median over all "
                     f"tokens and layers: {self.mlp_norm_median:.0f}).")
        else:
            f.append(f"No secondary sinks: no non-initial token exceeds {self.k:g}x its uniform share in middle "
                     f"layers {a}-{b - 1}.")
        f.append(f"Peak MLP-output norm vs peak sink ratio over non-initial tokens: Spearman "
                 f"{self.corr_norm_score:.2f}; vs sink lifetime {self.corr_norm_lifetime:.2f}.")
        if self.massive:
            dims = ", ".join(f"dim {m['dim']} (max |h| {m['max_abs']:.0f}, on {', '.join(map(repr, m['tokens'][:3]))})"
                             for m in self.massive[:4])
            f.append(f"{len(self.massive)} massive-activation dim(s) (|h| > {self.massive_factor:g}x layer median): "
                     f"{dims}.")
        else:
            f.append(f"No massive-activation dims (|h| > {self.massive_factor:g}x layer median).")
        return f

    def sections(self) -> list[str]:
        L = len(self.first_share)
        out = ["<h3>Attention sinks</h3>",
               line_plot(list(range(L)), {"first token": self.first_share, "last token": self.last_share},
                         title="attention mass received per layer", xlabel="layer", ylabel="mass")]
        if self.ratio is not None:
            out.append(heatmap(self.ratio.clamp_max(50), title="sink ratio (received / uniform), capped at 50",
                               xlabels=self.tokens, xlabel="token", ylabel="layer", size=4.5))
            a, b = self.middle
            out.append(token_colors(self.tokens, self.ratio[a:b].amax(0), title="peak sink ratio in middle layers"))
        rows = [[s["position"], html.escape(s["token"]), s["first_layer"], s["lifetime"], f"{s['peak_ratio']:.1f}",
                 f"{s['cos_to_first']:.2f}", f"{s['producing_mlp_norm']:.1f}"] for s in self.secondary]
        out.append(table(["pos", "token", "first layer", "lifetime", "peak ratio", "cos to first", "MLP norm"], rows)
                   if rows else note("No secondary sinks found."))
        mrows = [[m["dim"], f"{m['max_abs']:.1f}", ", ".join(html.escape(t) for t in m["tokens"][:6]),
                  f"{m['layers'][0]}-{m['layers'][-1]}"] for m in self.massive]
        out.append(table(["dim", "max |h|", "tokens", "layers"], mrows) if mrows else note("No massive activations."))
        out.extend(note(html.escape(s)) for s in self.findings())
        return out


def _mean(xs) -> float:
    xs = [float(x) for x in xs]
    return sum(xs) / len(xs) if xs else float("nan")


def middle_layers(num_layers: int) -> tuple[int, int]:
    """The middle layers ``[L/4, 3L/4)`` (at least one layer)."""
    a = num_layers // 4
    return a, max(a + 1, (3 * num_layers) // 4)


@analysis("sinks", seeds=("secondary-sinks", "visual-attention-sink"),
          summary="attention mass per token and layer: primary and secondary sinks, lifetime, MLP norms, massive dims")
def run_sinks(lm: LoadedModel, inp: Inputs, *, k: float = 5.0, min_rows: int | None = None,
              massive_factor: float = 100.0) -> SinksResult:
    """Sinks on one input. ``k``: sink threshold in multiples of the uniform share; ``min_rows``: a token must be
    seen by at least this many query rows to count (default ``max(8, N // 4)``); ``massive_factor``: massive
    activation threshold in multiples of the layer's median magnitude."""
    if k <= 1:
        raise ValueError(f"k: expected a threshold above 1 (multiples of the uniform share), received {k}")
    probs, hidden, mlp_norm, _ = _forward_with_internals(lm, inp)
    L, N = probs.shape[0], probs.shape[-1]
    min_rows = max(8, N // 4) if min_rows is None else int(min_rows)
    vis = visible_keys(inp.attention_mask, 1, N, causal=lm.info.causal)[0, 0]
    uni = uniform_mass(vis)
    mass = torch.stack([received_mass(probs[l], vis) for l in range(L)])  # (L, N)
    ratio = mass / uni.clamp_min(1e-12)
    seen = vis.sum(0) >= min_rows
    cand = seen.clone()
    cand[0] = False
    if not lm.info.causal:
        cand[N - 1] = False  # [SEP]: a special token, reported as last_share
    flags = (ratio > k) & cand[None, :]
    a, b = middle_layers(L)
    life = longest_run(flags)
    cos = torch.nn.functional.cosine_similarity(hidden, hidden[:, :1], dim=-1)  # (L, N)
    secondary = []
    for j in torch.nonzero(flags[a:b].any(0)).flatten().tolist():
        first = int(torch.nonzero(flags[:, j]).flatten()[0])
        secondary.append({
            "position": j, "token": inp.tokens[j], "first_layer": first, "lifetime": int(life[j]),
            "layers": torch.nonzero(flags[:, j]).flatten().tolist(), "peak_ratio": float(ratio[a:b, j].max()),
            "cos_to_first": float(cos[first, j]),
            "producing_mlp_norm": float(mlp_norm[first - 1, j]) if first > 0 else float("nan")})
    sink_pos = [s["position"] for s in secondary]
    others = cand.clone()
    others[sink_pos] = False
    mid = (a + b) // 2
    idx = torch.nonzero(cand).flatten()
    corr_s = corr_l = med = float("nan")
    if idx.numel():
        med = float(mlp_norm[: L - 1, idx].median())
    if idx.numel() >= 3:
        peak_norm = mlp_norm[: L - 1, idx].amax(0)  # the last MLP writes after every attention layer
        corr_s = spearman(peak_norm, ratio[1:, idx].amax(0))
        corr_l = spearman(peak_norm, life[idx].float())
    big = massive_activations(hidden, massive_factor)
    massive = []
    for d in torch.nonzero(big.any(0).any(0)).flatten().tolist():
        toks = torch.nonzero(big[:, :, d].any(0)).flatten().tolist()
        massive.append({"dim": d, "max_abs": float(hidden[:, :, d].abs().max()), "positions": toks,
                        "tokens": [inp.tokens[t] for t in toks],
                        "layers": torch.nonzero(big[:, :, d].any(1)).flatten().tolist()})
    massive.sort(key=lambda m: -m["max_abs"])
    return SinksResult(
        model=lm.info.name, tokens=inp.tokens, k=k, min_rows=min_rows, middle=(a, b),
        first_share=mass[:, 0].tolist(), last_share=mass[:, -1].tolist(), ratio=ratio,
        secondary=secondary,
        cos_to_first_sinks=_mean(s["cos_to_first"] for s in secondary) if secondary else float("nan"),
        cos_to_first_others=float(cos[mid, others].mean()) if others.any() else float("nan"),
        corr_norm_score=corr_s, corr_norm_lifetime=corr_l, mlp_norm_median=med, massive=massive,
        massive_factor=massive_factor, causal_model=lm.info.causal)


# ------------------------------------------------------------------------------------------ act-calibration
# A small local cloze set: (prompt, [options], index of the right option). Facts from Python's documentation and
# general knowledge; the model picks the option with the lowest total next-token loss given the prompt.
CLOZE_ITEMS: list[tuple[str, list[str], int]] = [
    ("The built-in function len() returns the", [" length of an object", " type of an object", " memory address"], 0),
    ("In Python, a list is created with square", [" brackets", " roots", " meters"], 0),
    ("The keyword used to define a function in Python is", [" def", " func", " lambda x"], 0),
    ("A dictionary maps keys to", [" values", " files", " threads"], 0),
    ("The exception raised when dividing by zero is called", [" ZeroDivisionError", " KeyError", " ImportError"], 0),
    ("To read a file in Python you first call the built-in function", [" open()", " print()", " sorted()"], 0),
    ("A tuple is like a list, but it is", [" immutable", " faster than light", " a function"], 0),
    ("The statement that leaves a loop early is", [" break", " import", " class"], 0),
    ("The capital of France is", [" Paris", " Berlin", " Madrid"], 0),
    ("Water freezes at zero degrees", [" Celsius", " Kelvin", " north"], 0),
    ("The sun rises in the", [" east", " west", " basement"], 0),
    ("One, two, three, four,", [" five", " nine", " twelve"], 0),
    ("Monday, Tuesday, Wednesday,", [" Thursday", " Sunday", " January"], 0),
    ("The opposite of hot is", [" cold", " tall", " loud"], 0),
    ("The string method that converts it to upper case is", [" upper()", " strip()", " split()"], 0),
    ("The for statement iterates over the items of any", [" sequence", " exception", " integer literal"], 0),
    ("Comments in Python start with the hash character", [" #", " %", " @"], 0),
    ("The value None is frequently used to represent the absence of a", [" value", " keyboard", " river"], 0),
    ("Cats and dogs are popular", [" pets", " planets", " vegetables"], 0),
    ("The import statement is used to load a", [" module", " sandwich", " comment"], 0),
]


def cloze_accuracy(lm: LoadedModel, items=None) -> tuple[float, list[int]]:
    """Accuracy on ``items`` (default :data:`CLOZE_ITEMS`) by lowest total loss of the option tokens given the
    prompt, under whatever :class:`Capture` context is active (one right-padded batch holding every option).
    Returns ``(accuracy, chosen option per item)``."""
    items = CLOZE_ITEMS if items is None else items
    if not items:
        raise ValueError("items: expected at least one (prompt, options, answer) item, received none")
    tok = lm.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else 0
    seqs, starts, owner = [], [], []
    for k, (prompt, options, answer) in enumerate(items):
        if not 0 <= answer < len(options):
            raise ValueError(f"item {prompt!r}: expected answer index in [0, {len(options)}), received {answer}")
        p = tok(prompt, add_special_tokens=False)["input_ids"]
        for o in options:
            seqs.append(p + tok(o, add_special_tokens=False)["input_ids"])
            starts.append(len(p))
            owner.append(k)
    n = max(map(len, seqs))
    ids = torch.tensor([s + [pad] * (n - len(s)) for s in seqs])
    mask = torch.tensor([[1] * len(s) + [0] * (n - len(s)) for s in seqs])
    with torch.no_grad():
        nll = next_token_loss(lm, ids, mask, reduction="none")  # (B, n-1): [t] = loss of token t+1
    opt = (torch.arange(n)[None, :] >= torch.tensor(starts)[:, None]).long() * mask
    scores = (nll * opt[:, 1:]).sum(1)
    owner_t = torch.tensor(owner)
    chosen = [int(scores[owner_t == k].argmin()) for k in range(len(items))]
    acc = sum(c == it[2] for c, it in zip(chosen, items)) / len(items)
    return acc, chosen


@dataclass
class ActCalibrationResult(Result):
    threshold: float = 0.2
    beta: float = 0.4
    layers: list[int] = field(default_factory=list)
    ppl_before: float = float("nan")
    ppl_after: float = float("nan")
    acc_before: float = float("nan")
    acc_after: float = float("nan")
    n_items: int = 0
    edited_heads: list[int] = field(default_factory=list)  # per layer: heads with at least one calibrated sink
    n_tokens: int = 0

    def findings(self) -> list[str]:
        L = len(self.edited_heads)
        return [
            f"Calibration (non-initial token with mean received mass > {self.threshold:g} in a head, scaled by "
            f"beta={self.beta:g}, rows renormalised) touched {sum(self.edited_heads)} head-layer pairs in "
            f"{sum(1 for h in self.edited_heads if h)}/{L} layers on the {self.n_tokens}-token input.",
            f"Perplexity {self.ppl_before:.2f} -> {self.ppl_after:.2f} "
            f"({100 * (self.ppl_after / self.ppl_before - 1):+.1f}%).",
            f"Cloze accuracy ({self.n_items} local items) {100 * self.acc_before:.0f}% -> {100 * self.acc_after:.0f}% "
            f"({100 * (self.acc_after - self.acc_before):+.0f} points)."]

    def sections(self) -> list[str]:
        out = ["<h3>Attention calibration (ACT)</h3>",
               table(["", "before", "after"],
                     [["perplexity", f"{self.ppl_before:.3f}", f"{self.ppl_after:.3f}"],
                      ["cloze accuracy", f"{self.acc_before:.3f}", f"{self.acc_after:.3f}"]])]
        if self.edited_heads:
            out.append(line_plot(list(range(len(self.edited_heads))), {"heads calibrated": self.edited_heads},
                                 title="heads with a calibrated sink, per layer", xlabel="layer", ylabel="heads"))
        out.extend(note(html.escape(s)) for s in self.findings())
        return out


@analysis("act-calibration", seeds=("act-calibration",), applies=causal_only,
          why_not="needs a causal LM (perplexity and cloze scoring by next-token loss)",
          summary="training-free attention calibration of non-initial sinks: perplexity and cloze accuracy change")
def run_act_calibration(lm: LoadedModel, inp: Inputs, *, threshold: float = 0.2, beta: float = 0.4,
                        min_rows: int = 8, layers: list[int] | None = None,
                        cloze: bool = True) -> ActCalibrationResult:
    """Calibrate non-initial sinks in ``layers`` (default all) and measure perplexity on ``inp`` and accuracy on
    :data:`CLOZE_ITEMS` before and after. ``threshold``: received-mass threshold of a sink in one head;
    ``beta``: factor on the attention to it; ``min_rows``: a sink must be seen by at least this many rows (the
    last tokens of a causal input, seen by a few rows only, are left alone)."""
    if not lm.info.causal:
        raise ValueError(f"act-calibration: expected a causal LM, received {lm.info.name} (bidirectional)")
    if not 0 < threshold < 1:
        raise ValueError(f"threshold: expected a mass in (0, 1), received {threshold}")
    L = lm.info.layers
    chosen = set(range(L)) if layers is None else {int(l) % L for l in layers}
    edited = [0] * L
    counting = {"on": False}

    def edit(layer: int, probs: Tensor) -> Tensor:
        if layer not in chosen:
            return probs
        N = probs.shape[-1]
        vis = visible_keys(None, 1, N, causal=True, device=probs.device)[0, 0]
        new, sinks = act_edit(probs, vis, threshold=threshold, beta=beta, min_rows=min_rows)
        if counting["on"]:
            edited[layer] = int(sinks[0].any(-1).sum())
        return new

    ids, mask = inp.input_ids, inp.attention_mask
    with torch.no_grad():
        ppl_before = math.exp(float(next_token_loss(lm, ids, mask)))
        counting["on"] = True
        with Capture(lm.model, layers=[], edit_probs=edit):
            ppl_after = math.exp(float(next_token_loss(lm, ids, mask)))
        counting["on"] = False
    acc_b = acc_a = float("nan")
    if cloze:
        acc_b, _ = cloze_accuracy(lm)
        with Capture(lm.model, layers=[], edit_probs=edit):
            acc_a, _ = cloze_accuracy(lm)
    return ActCalibrationResult(model=lm.info.name, threshold=threshold, beta=beta, layers=sorted(chosen),
                                ppl_before=ppl_before, ppl_after=ppl_after, acc_before=acc_b, acc_after=acc_a,
                                n_items=len(CLOZE_ITEMS) if cloze else 0, edited_heads=edited, n_tokens=inp.n)
