"""What every analysis shares: the input it runs on, its result type, and the registry ``attnlab inspect`` reads.

An analysis is a function ``run(lm, inp, **options) -> Result`` registered with :func:`analysis`. Its result is
a dataclass deriving from :class:`Result`: plain fields (numbers, lists, small tensors) that serialise to JSON,
``findings()`` -- one sentence per claim the seed paper makes, with the number measured on this model ("reported,
not assumed") -- and ``sections()`` -- HTML fragments for the inspect report, built with ``attnlab.htmlkit`` and
``attnlab.analysis.figures``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..models.loaders import LoadedModel, ModelInfo

__all__ = ["ANALYSES", "AnalysisSpec", "Inputs", "Result", "analysis", "jsonable", "make_inputs"]


@dataclass
class Inputs:
    """One tokenised text an analysis runs on (batch of one)."""

    text: str
    input_ids: torch.Tensor  # (1, N)
    attention_mask: torch.Tensor  # (1, N)
    tokens: list[str]
    source: dict[str, Any] = field(default_factory=dict)  # e.g. EvalText.to_json() or {"kind": "user"}

    @property
    def n(self) -> int:
        return int(self.input_ids.shape[-1])

    def model_kwargs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids, "attention_mask": self.attention_mask}


def make_inputs(lm: LoadedModel, text: str, *, max_tokens: int = 128, source: dict | None = None) -> Inputs:
    """Tokenise ``text`` (special tokens included) and cut it to ``max_tokens``."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"text: expected a non-empty string, received {text!r}")
    if max_tokens < 2:
        raise ValueError(f"max_tokens: expected at least 2, received {max_tokens}")
    enc = lm.encode(text, max_tokens=max_tokens)
    ids = enc["input_ids"]
    return Inputs(text=text, input_ids=ids, attention_mask=enc.get("attention_mask", torch.ones_like(ids)),
                  tokens=lm.tokens(ids), source=source or {"kind": "user"})


def jsonable(x: Any) -> Any:
    """Tensors, numpy arrays, dataclasses, tuples and non-finite floats made JSON-safe (NaN/inf become None)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu()
        return jsonable(x.item() if x.ndim == 0 else x.tolist())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if hasattr(x, "tolist") and hasattr(x, "dtype"):  # numpy
        return jsonable(x.tolist())
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


@dataclass
class Result:
    """Base of every analysis result. Subclasses add fields and override ``findings`` and ``sections``."""

    model: str

    def findings(self) -> list[str]:
        return []

    def sections(self) -> list[str]:
        return []

    def to_json(self) -> dict[str, Any]:
        d = jsonable(self)
        d["findings"] = self.findings()
        return d


@dataclass(frozen=True)
class AnalysisSpec:
    name: str
    run: Callable[..., Result]
    seeds: tuple[str, ...]  # catalog ids of the papers it reproduces
    summary: str
    applies: Callable[[ModelInfo], bool]
    why_not: str  # said when it does not apply


ANALYSES: dict[str, AnalysisSpec] = {}


def analysis(name: str, *, seeds: tuple[str, ...], summary: str,
             applies: Callable[[ModelInfo], bool] = lambda info: True, why_not: str = ""):
    """Register ``run(lm, inp, **options) -> Result`` under ``name`` for ``attnlab inspect --analyses``."""

    def deco(fn):
        if name in ANALYSES:
            raise ValueError(f"analysis {name!r} is registered twice")
        ANALYSES[name] = AnalysisSpec(name=name, run=fn, seeds=tuple(seeds), summary=summary, applies=applies,
                                      why_not=why_not)
        return fn

    return deco


def causal_only(info: ModelInfo) -> bool:
    return info.causal


def bidirectional_only(info: ModelInfo) -> bool:
    return not info.causal


# --------------------------------------------------------------------------------- model outputs under gates
# Shared by every analysis that scores a model with some heads ablated (head importance, retrieval heads,
# AttentionInfluence, pruning curves): written once here.


def gated(model: torch.nn.Module, gates: torch.Tensor | None):
    """A context in which ``model`` runs with its heads scaled by ``gates (layers, heads)`` (nothing when None)."""
    from .capture import Capture

    return contextlib.nullcontext() if gates is None else Capture(model, layers=[], gates=gates)


def next_token_loss(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                    gates: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of each next token for a causal LM, optionally with head gates ``(layers, heads)``.

    ``reduction="none"`` gives ``(B, N-1)`` per-position losses (padding positions are 0); ``"mean"`` averages
    over real tokens. Gradients flow to ``gates`` when it requires grad.
    """
    if not lm.info.causal:
        raise ValueError(f"next_token_loss: expected a causal LM, received {lm.info.name} (bidirectional)")
    if reduction not in ("mean", "none"):
        raise ValueError(f"reduction: expected 'mean' or 'none', received {reduction!r}")
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    kwargs = {"input_ids": input_ids, "attention_mask": mask}
    with gated(lm.model, gates):
        logits = lm.model(**kwargs).logits
    lp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    nll = -lp.gather(-1, input_ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]
    if reduction == "none":
        return nll
    return nll.sum() / mask[:, 1:].sum().clamp_min(1)


def sentence_embedding(lm: LoadedModel, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                       gates: torch.Tensor | None = None, normalize: bool = True) -> torch.Tensor:
    """Mean-pooled last hidden state over real tokens, L2-normalised -- all-MiniLM-L6-v2's sentence embedding
    (its sentence-transformers config: mean pooling, then normalisation). ``(B, hidden)``."""
    mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    kwargs = {"input_ids": input_ids, "attention_mask": mask}
    with gated(lm.model, gates):
        out = lm.model(**kwargs, output_hidden_states=True)
    h = out.hidden_states[-1]
    m = mask[..., None].to(h.dtype)
    e = (h * m).sum(1) / m.sum(1).clamp_min(1)
    return torch.nn.functional.normalize(e, dim=-1) if normalize else e
