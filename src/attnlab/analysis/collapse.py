"""Token-uniformity collapse in real models.

- ``rank-collapse`` (seed ``rank-collapse`` #129, arXiv 2103.03404): the relative residual of each layer's token
  matrix from its best rank-1 "all tokens equal" approximation, for the full model and for the attention-only path
  (no skip connections, no MLPs).
- ``length-collapse`` (seed ``tempscale-length-collapse`` #100, arXiv 2410.24200): MiniLM sentence embeddings of
  longer texts are closer to each other (mean pairwise cosine grows with length); a softmax temperature ``tau``
  (logits / tau in every layer: TempScale) is swept, and a small synthetic retrieval check compares ``tau = 1``
  with the best ``tau``.
"""

from __future__ import annotations

import html
import random
import re
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..htmlkit import note, table
from ..models.loaders import LoadedModel
from .base import Inputs, Result, analysis, bidirectional_only, sentence_embedding
from .capture import Capture
from .figures import line_plot
from .sinks import block_modules
from .text import eval_text

__all__ = ["LengthCollapseResult", "RankCollapseResult", "attention_only_path", "mean_pairwise_cosine",
           "relative_residual", "retrieval_accuracy", "run_length_collapse", "run_rank_collapse", "sentences"]


# ------------------------------------------------------------------------------------------------ pure functions
def relative_residual(x: Tensor, mask: Tensor | None = None) -> Tensor:
    """``||X - 1 xbar^T||_F / ||X||_F`` over the tokens of ``x (..., N, D)`` -> ``(...)``; ``xbar`` is the token
    mean (the Frobenius-optimal rank-1 token-uniform approximation). 0 = all tokens equal. ``mask (..., N)`` of
    0/1 leaves padded tokens out."""
    x = x.float()
    m = torch.ones(x.shape[:-1], dtype=x.dtype) if mask is None else mask.to(x.dtype)
    if m.shape != x.shape[:-1]:
        raise ValueError(f"mask: expected shape {tuple(x.shape[:-1])}, received {tuple(m.shape)}")
    m = m[..., None]
    mean = (x * m).sum(-2, keepdim=True) / m.sum(-2, keepdim=True).clamp_min(1)
    num = ((x - mean) * m).flatten(-2).norm(dim=-1)
    den = (x * m).flatten(-2).norm(dim=-1)
    return num / den.clamp_min(1e-30)


def mean_pairwise_cosine(emb: Tensor) -> float:
    """Mean cosine over distinct pairs of the rows of ``emb (M, D)``, ``M >= 2``."""
    if emb.ndim != 2 or emb.shape[0] < 2:
        raise ValueError(f"emb: expected (M >= 2, D), received {tuple(emb.shape)}")
    e = torch.nn.functional.normalize(emb.float(), dim=-1)
    s = e @ e.T
    M = e.shape[0]
    return float((s.sum() - s.diagonal().sum()) / (M * (M - 1)))


def retrieval_accuracy(queries: Tensor, docs: Tensor) -> float:
    """Share of queries ``(M, D)`` whose most cosine-similar document ``(M, D)`` is their own (row ``i``)."""
    if queries.shape != docs.shape:
        raise ValueError(f"queries and docs: expected equal shapes, received {tuple(queries.shape)} and "
                         f"{tuple(docs.shape)}")
    q = torch.nn.functional.normalize(queries.float(), dim=-1)
    d = torch.nn.functional.normalize(docs.float(), dim=-1)
    return float(((q @ d.T).argmax(1) == torch.arange(q.shape[0])).float().mean())


def sentences(text: str, min_chars: int = 20) -> list[str]:
    """Split prose into sentences (at ``. ! ?`` followed by a space), dropping ones shorter than ``min_chars``."""
    parts = re.split(r"(?<=[.!?])\s+", " ".join(text.split()))
    return [p for p in parts if len(p) >= min_chars]


# ------------------------------------------------------------------------------------------- attention-only path
def _rotary(model: torch.nn.Module):
    for name, m in model.named_modules():
        if name.endswith("rotary_emb"):
            return m
    return None


def attention_only_path(lm: LoadedModel, inp: Inputs, *, norm: str = "keep") -> tuple[Tensor, Tensor]:
    """Token matrices of the full model and of the attention-only path, ``(L + 1, N, D)`` each (row 0 = the
    embedding output, shared). The attention-only path feeds ``X_0`` through each layer's attention sublayer only:
    ``X_{l+1} = Attn_l(X_l)``, no residual, no MLP.

    ``norm="keep"``: the layer's own normalisation on the attention path stays: pre-norm blocks (Llama) apply
    their input RMSNorm before attention; post-norm blocks (BERT) apply the post-attention LayerNorm to the
    attention output (without the residual it normally adds). ``norm="drop"``: no normalisation at all.
    Full-model rows are each block's output (before a final norm)."""
    if norm not in ("keep", "drop"):
        raise ValueError(f"norm: expected 'keep' or 'drop', received {norm!r}")
    blocks = block_modules(lm.model)
    outs: list[Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _a, o: outs.append((o[0] if isinstance(o, tuple) else o)[0]))
             for b in blocks]
    try:
        with torch.no_grad():
            hs = lm.model(**inp.model_kwargs(), output_hidden_states=True).hidden_states
    finally:
        for h in hooks:
            h.remove()
    x0 = hs[0]
    full = torch.stack([x0[0]] + outs).float()
    N = x0.shape[1]
    rot = _rotary(lm.model)
    pos = torch.arange(N)[None]
    x = x0
    path = [x0[0]]
    with torch.no_grad():
        for i, b in enumerate(blocks):
            if hasattr(b, "self_attn"):  # pre-norm decoder block (Llama-like)
                h = b.input_layernorm(x) if norm == "keep" and hasattr(b, "input_layernorm") else x
                kw = {"position_embeddings": rot(h, pos)} if rot is not None else {}
                x = b.self_attn(hidden_states=h, attention_mask=None, **kw)[0]
            elif hasattr(b, "attention") and hasattr(b.attention, "self"):  # post-norm encoder block (BERT)
                a = b.attention.self(x, attention_mask=None)[0]
                x = b.attention.output.dense(a)
                if norm == "keep":
                    x = b.attention.output.LayerNorm(x)
            else:
                raise ValueError(f"block {i}: expected a 'self_attn' (Llama-like) or 'attention.self' (BERT) "
                                 f"attention sublayer, received {type(b).__name__}")
            path.append(x[0])
    return full, torch.stack(path).float()


@dataclass
class RankCollapseResult(Result):
    norm: str = "keep"
    n_tokens: int = 0
    full: list[float] = field(default_factory=list)  # (L + 1,) relative residual per depth, full model
    attention_only: list[float] = field(default_factory=list)  # (L + 1,) attention-only path

    def _at(self) -> list[int]:
        L = len(self.full) - 1
        return sorted({1, max(1, L // 2), L})

    def findings(self) -> list[str]:
        at = self._at()
        f = ", ".join(f"layer {l}: {self.full[l]:.3f}" for l in at)
        a = ", ".join(f"layer {l}: {self.attention_only[l]:.3g}" for l in at)
        return [f"Full model relative residual ||X - 1 xbar^T|| / ||X|| (input {self.full[0]:.3f}): {f}.",
                f"Attention-only path (no skips, no MLPs, norms {self.norm}): {a}.",
                f"Attention-only path ends {self.attention_only[-1] / max(self.full[-1], 1e-30):.2g}x the full "
                f"model's residual at the last layer."]

    def sections(self) -> list[str]:
        L = len(self.full) - 1
        rows = [[l, f"{self.full[l]:.4f}", f"{self.attention_only[l]:.4g}"] for l in self._at()]
        return ["<h3>Rank collapse</h3>",
                line_plot(list(range(L + 1)), {"full model": self.full, "attention only": self.attention_only},
                          title="relative residual from rank 1 per layer", xlabel="layer", ylabel="residual",
                          logy=True),
                table(["layer", "full", "attention only"], rows)] + [note(html.escape(s)) for s in self.findings()]


@analysis("rank-collapse", seeds=("rank-collapse",),
          summary="relative residual from a token-uniform rank-1 matrix per layer: full model vs attention-only path")
def run_rank_collapse(lm: LoadedModel, inp: Inputs, *, norm: str = "keep") -> RankCollapseResult:
    """Rank collapse on ``inp``; ``norm`` as in :func:`attention_only_path`."""
    full, path = attention_only_path(lm, inp, norm=norm)
    mask = inp.attention_mask[0]
    return RankCollapseResult(model=lm.info.name, norm=norm, n_tokens=inp.n,
                              full=relative_residual(full, mask.expand(full.shape[:2])).tolist(),
                              attention_only=relative_residual(path, mask.expand(path.shape[:2])).tolist())


# ----------------------------------------------------------------------------------------------- length collapse
def _texts_of_length(lm: LoadedModel, sents: list[str], n_tokens: int, count: int, rng: random.Random) -> list[str]:
    """``count`` texts of consecutive sentences from random starts, each at least ``n_tokens`` tokens (the
    tokenizer truncates to exactly that)."""
    out = []
    for _ in range(count):
        i = rng.randrange(len(sents))
        parts: list[str] = []
        while len(lm.tokenizer(" ".join(parts), add_special_tokens=False)["input_ids"]) < n_tokens:
            parts.append(sents[i % len(sents)])
            i += 1
            if len(parts) > len(sents):
                break
        out.append(" ".join(parts))
    return out


def _embed(lm: LoadedModel, texts: list[str], n_tokens: int, tau: float) -> Tensor:
    enc = lm.encode(texts, max_tokens=n_tokens)
    with torch.no_grad():
        if tau == 1.0:
            return sentence_embedding(lm, enc["input_ids"], enc["attention_mask"])
        with Capture(lm.model, layers=[], logit_scale=1.0 / tau):
            return sentence_embedding(lm, enc["input_ids"], enc["attention_mask"])


@dataclass
class LengthCollapseResult(Result):
    lengths: list[int] = field(default_factory=list)
    taus: list[float] = field(default_factory=list)
    n_texts: int = 0
    cosine: list[list[float]] = field(default_factory=list)  # [tau][length] mean pairwise cosine
    best_tau: float = 1.0
    doc_tokens: int = 0
    retrieval_base: float = float("nan")  # accuracy at tau = 1
    retrieval_best: float = float("nan")  # accuracy at best_tau

    def findings(self) -> list[str]:
        base = self.cosine[self.taus.index(1.0)]
        best = self.cosine[self.taus.index(self.best_tau)]
        return [f"Mean pairwise cosine of {self.n_texts} embeddings grows from {base[0]:.3f} at {self.lengths[0]} "
                f"tokens to {base[-1]:.3f} at {self.lengths[-1]} tokens (tau = 1).",
                f"Temperature sweep {self.taus}: lowest cosine at {self.lengths[-1]} tokens with tau = "
                f"{self.best_tau:g} ({best[-1]:.3f} vs {base[-1]:.3f} at tau = 1).",
                f"Synthetic retrieval (query sentence vs {self.n_texts} documents of {self.doc_tokens} tokens holding "
                f"it): top-1 accuracy {100 * self.retrieval_base:.0f}% at tau = 1, {100 * self.retrieval_best:.0f}% "
                f"at tau = {self.best_tau:g}."]

    def sections(self) -> list[str]:
        series = {f"tau={t:g}": c for t, c in zip(self.taus, self.cosine)}
        rows = [[f"{t:g}"] + [f"{v:.3f}" for v in c] for t, c in zip(self.taus, self.cosine)]
        return ["<h3>Length collapse and TempScale</h3>",
                line_plot(self.lengths, series, title="mean pairwise embedding cosine vs text length",
                          xlabel="tokens", ylabel="mean cosine", logx=True),
                table(["tau"] + [str(n) for n in self.lengths], rows)] + [note(html.escape(s))
                                                                          for s in self.findings()]


@analysis("length-collapse", seeds=("tempscale-length-collapse",), applies=bidirectional_only,
          why_not="the embedding-collapse analysis is for bidirectional sentence encoders (mean-pooled embeddings)",
          summary="embedding cosine vs text length, softmax-temperature sweep, synthetic long-text retrieval")
def run_length_collapse(lm: LoadedModel, inp: Inputs, *, lengths: tuple[int, ...] = (16, 64, 256),
                        taus: tuple[float, ...] = (0.8, 0.9, 1.0, 1.1), n_texts: int = 8,
                        doc_tokens: int = 256, seed: int = 0) -> LengthCollapseResult:
    """Builds its own texts from the fixed evaluation text (``eval_text(seed)``; ``inp`` is not used): ``n_texts``
    texts of each length in ``lengths`` (tokens, special tokens included); the best ``tau`` minimises the mean
    pairwise cosine at the longest length; retrieval: ``n_texts`` query sentences, each placed in the middle of its
    own ``doc_tokens``-token document of other sentences."""
    if lm.info.causal:
        raise ValueError(f"length-collapse: expected a bidirectional encoder, received {lm.info.name} (causal)")
    if n_texts < 2:
        raise ValueError(f"n_texts: expected at least 2, received {n_texts}")
    lengths = tuple(sorted(int(n) for n in lengths))
    if not lengths or lengths[0] < 4 or lengths[-1] > lm.info.context:
        raise ValueError(f"lengths: expected token counts in [4, {lm.info.context}], received {lengths}")
    taus = tuple(sorted(set(float(t) for t in taus) | {1.0}))
    if min(taus) <= 0:
        raise ValueError(f"taus: expected positive temperatures, received {taus}")
    sents = sentences(eval_text(seed, chars=20000).text)
    rng = random.Random(seed)
    texts = {n: _texts_of_length(lm, sents, n, n_texts, rng) for n in lengths}
    cos = [[mean_pairwise_cosine(_embed(lm, texts[n], n, t)) for n in lengths] for t in taus]
    best = taus[min(range(len(taus)), key=lambda i: cos[i][-1])]
    # retrieval: distinct query sentences; each document = filler sentences with the query in the middle
    picks = rng.sample(range(len(sents)), n_texts)
    queries = [sents[i] for i in picks]
    pool = [s for i, s in enumerate(sents) if i not in set(picks)]
    docs = []
    for q in queries:
        filler = _texts_of_length(lm, pool, doc_tokens, 1, rng)[0]
        words = sentences(filler, 1)
        half = len(words) // 2
        docs.append(" ".join(words[:half] + [q] + words[half:]))
    # the filler is just over doc_tokens long and the query sits at its middle sentence, so truncating the
    # document to doc_tokens cuts filler from the end and keeps the query
    acc = {}
    for t in {1.0, best}:
        q = _embed(lm, queries, lm.info.context, t)
        d = _embed(lm, docs, doc_tokens, t)
        acc[t] = retrieval_accuracy(q, d)
    return LengthCollapseResult(model=lm.info.name, lengths=list(lengths), taus=list(taus), n_texts=n_texts,
                                cosine=cos, best_tau=best, doc_tokens=doc_tokens, retrieval_base=acc[1.0],
                                retrieval_best=acc[best])
