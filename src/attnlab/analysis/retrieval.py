"""Retrieval heads (Wu et al., 2024, arXiv 2404.15574) and AttentionInfluence (Hua et al., 2025, arXiv 2505.07293)
on a causal LM.

**Retrieval heads.** A needle sentence ("The secret code of Ada is 73918264.") is inserted at a chosen depth into
filler text (the fixed evaluation text), a question follows, and the model answers greedily. During generation, a
head *copies* a needle token when the generated token ``w`` is a needle token and the key position the head
attends to most (its argmax) lies in the needle and holds ``w``. A head's retrieval score is the number of needle
tokens it copied divided by the needle length (the paper's ``|g_h ∩ k| / |k|``), averaged over haystacks. Masking
the top-k heads by score is compared with masking k random heads (outside the top k).

How generation is run here (documented choice). ``decode="teacher"`` (default) runs ONE forward pass over
``prompt + answer`` and reads the rows that predict the answer tokens: greedy decoding produces the answer exactly
when the argmax at each of these rows equals the answer token given the true prefix, and up to the first wrong
token the rows are the very rows greedy decoding computes. Copy events are counted up to and including the first
wrong prediction (what free generation would do afterwards is not followed). ``decode="greedy"`` runs real greedy
decoding with a KV cache, capturing the last query row (``Capture(rows=[-1])``) at each step.

**AttentionInfluence.** With the top retrieval heads masked (head output gated to 0), each document's mean
next-token loss rises; the score is the relative increase ``(L_masked - L) / L``. Documents: pydoc topics (prose),
standard-library source (code) and generated worked arithmetic (math). The paper found reasoning-heavy (code, math)
documents score higher.
"""

from __future__ import annotations

import inspect
import math
import random
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..htmlkit import note, table
from ..models.loaders import LoadedModel
from .base import Inputs, Result, analysis, causal_only, next_token_loss
from .capture import Capture, head_gates
from .metrics import spearman, top_heads
from .figures import heatmap
from .text import eval_text, topic_names

__all__ = ["AttentionInfluenceResult", "Haystack", "RetrievalHeadsResult", "build_haystack", "influence_corpus",
           "mask_accuracy", "relative_influence", "retrieval_score", "run_attention_influence",
           "run_retrieval_heads", "score_haystack"]

_NAMES = ("Ada", "Boris", "Chloe", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Liam",
          "Mona", "Nils", "Olga", "Pavel")


# ------------------------------------------------------------------------------------------------ pure functions


def retrieval_score(probs: Tensor, generated: Tensor, context_ids: Tensor, needle: tuple[int, int],
                    steps: Tensor | None = None) -> Tensor:
    """The retrieval score of every head on one generation (Wu et al., 2024).

    Args:
        probs: ``(L, H, T, Nk)`` attention of each head at each of ``T`` generation steps over ``Nk`` key
            positions (rows of different lengths zero-padded on the right).
        generated: ``(T,)`` the token generated at each step.
        context_ids: ``(Nk,)`` the token id at each key position.
        needle: ``(start, stop)`` half-open key positions of the needle (the tokens to be copied).
        steps: optional ``(T,)`` bool, the steps that count (default all).

    Returns ``(L, H)``: the number of distinct needle positions ``j`` such that at some counted step ``t`` the
    head's argmax key is ``j`` and ``context_ids[j] == generated[t]`` (a copy event), divided by the needle length.
    """
    if probs.ndim != 4:
        raise ValueError(f"probs: expected (layers, heads, steps, keys), received shape {tuple(probs.shape)}")
    L, H, T, Nk = probs.shape
    if tuple(generated.shape) != (T,):
        raise ValueError(f"generated: expected shape ({T},), received {tuple(generated.shape)}")
    if tuple(context_ids.shape) != (Nk,):
        raise ValueError(f"context_ids: expected shape ({Nk},), received {tuple(context_ids.shape)}")
    start, stop = int(needle[0]), int(needle[1])
    if not 0 <= start < stop <= Nk:
        raise ValueError(f"needle: expected 0 <= start < stop <= {Nk}, received {needle}")
    arg = probs.argmax(dim=-1)  # (L, H, T)
    copied = (arg >= start) & (arg < stop) & (context_ids[arg] == generated.view(1, 1, T))
    if steps is not None:
        copied &= steps.view(1, 1, T).bool()
    rel = (arg - start).clamp(0, stop - start - 1)  # needle offset (meaningful where copied)
    hit = torch.zeros(L, H, stop - start).scatter_reduce(-1, rel, copied.float(), reduce="amax")
    return hit.sum(-1) / (stop - start)  # distinct needle positions copied / needle length


def relative_influence(masked: Tensor, base: Tensor) -> Tensor:
    """AttentionInfluence score ``(L_masked - L_base) / L_base`` per document (any matching shapes)."""
    if masked.shape != base.shape:
        raise ValueError(f"masked/base: expected equal shapes, received {tuple(masked.shape)} and {tuple(base.shape)}")
    return (masked - base) / base.clamp_min(1e-8)


# ------------------------------------------------------------------------------------------------ haystacks


@dataclass
class Haystack:
    """One needle-in-a-haystack prompt, as token ids. ``needle`` = positions of the value to be copied."""

    prompt: Tensor  # (N,)
    answer: Tensor  # (A,) the value's tokens, as they appear in the needle
    needle: tuple[int, int]  # positions of the value inside the prompt
    depth: float
    name: str
    value: str


def build_haystack(lm: LoadedModel, length: int, depth: float, *, seed: int = 0, value_kind: str = "digits",
                   value_len: int = 8) -> Haystack:
    """A prompt of about ``length`` tokens: filler text with the needle sentence at relative ``depth``, then the
    question. The needle goes in at the sentence end nearest to the requested depth."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: expected a fraction in [0, 1], received {depth}")
    if value_kind not in ("digits", "words"):
        raise ValueError(f"value_kind: expected 'digits' or 'words', received {value_kind!r}")
    rng = random.Random(f"{seed}-{length}-{depth}")
    name = rng.choice(_NAMES)
    if value_kind == "digits":
        value = "".join(rng.choice("0123456789") for _ in range(value_len))
    else:
        words = ("apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "forest", "candle", "rocket",
                 "silver", "garden")
        value = "-".join(rng.sample(words, value_len))
    tok = lm.tokenizer

    def ids(s: str) -> list[int]:
        return tok(s, add_special_tokens=False)["input_ids"]

    pre = ids(f" The secret code of {name} is")
    val = ids(f" {value}")
    needle_ids = pre + val + ids(".")
    question = ids(f"\n\nQuestion: What is the secret code of {name}?\nAnswer: The secret code of {name} is")
    n_fill = length - len(needle_ids) - len(question)
    if n_fill < 8:
        raise ValueError(f"length: expected at least {len(needle_ids) + len(question) + 8} tokens for this needle "
                         f"and question, received {length}")
    filler = ids(eval_text(seed, chars=8 * n_fill + 400).text)[:n_fill]
    if len(filler) < n_fill:
        raise ValueError(f"length: the evaluation text gave only {len(filler)} filler tokens, {n_fill} needed")
    target = round(depth * n_fill)
    ends = [i + 1 for i in range(n_fill) if tok.decode([filler[i]]).rstrip().endswith(".")] or [target]
    at = min(ends, key=lambda i: (abs(i - target), i))
    prompt = filler[:at] + needle_ids + filler[at:] + question
    start = at + len(pre)
    return Haystack(prompt=torch.tensor(prompt), answer=torch.tensor(val), needle=(start, start + len(val)),
                    depth=depth, name=name, value=value)


def _answer_rows(lm: LoadedModel, hs: Haystack, gates: Tensor | None, capture: bool):
    """One forward over prompt + answer: greedy predictions at the answer rows (and their attention rows)."""
    seq = torch.cat([hs.prompt, hs.answer])[None]
    n, a = len(hs.prompt), len(hs.answer)
    rows = list(range(n - 1, n + a - 1))
    with torch.inference_mode(), Capture(lm.model, layers=None if capture else [], rows=rows, what=("probs",),
                                         gates=gates) as cap:
        logits = lm.model(input_ids=seq, use_cache=False).logits[0, rows]
    probs = torch.stack([cap.records[i]["probs"][0] for i in sorted(cap.records)]) if capture else None  # (L,H,A,Nk)
    return logits.float(), probs, seq[0]


def _greedy(lm: LoadedModel, hs: Haystack, max_new_tokens: int):
    """Real greedy decoding with a KV cache, capturing each step's last query row for all heads."""
    L = lm.info.layers
    ids = hs.prompt[None]
    gen: list[int] = []
    rows: list[Tensor] = []
    past = None
    with torch.inference_mode():
        for _ in range(max_new_tokens):
            with Capture(lm.model, rows=[-1], what=("probs",)) as cap:
                out = lm.model(input_ids=ids, past_key_values=past, use_cache=True)
            past = out.past_key_values
            rows.append(torch.stack([cap.records[i]["probs"][0, :, 0] for i in range(L)]))  # (L, H, Nk_t)
            nxt = int(out.logits[0, -1].argmax())
            gen.append(nxt)
            ids = torch.tensor([[nxt]])
    nk = len(hs.prompt) + len(gen) - 1
    probs = torch.zeros(L, rows[0].shape[1], len(gen), nk)
    for t, r in enumerate(rows):
        probs[:, :, t, : r.shape[-1]] = r
    context = torch.cat([hs.prompt, torch.tensor(gen[:-1], dtype=hs.prompt.dtype)])
    return torch.tensor(gen), probs, context


def _answer_nll(logits: Tensor, answer: Tensor) -> float:
    """Mean negative log-likelihood of the answer tokens from the logits of the rows that predict them."""
    return float(-torch.log_softmax(logits.float(), -1).gather(-1, answer[:, None]).mean())


def score_haystack(lm: LoadedModel, hs: Haystack, *, decode: str = "teacher", max_new_tokens: int | None = None
                   ) -> dict:
    """Retrieval scores on one haystack: ``{"scores": (L, H), "correct": greedy decoding reproduced the value,
    "tokens": what the model produced (teacher: its argmax at each answer row; greedy: the generated tokens),
    "answer_nll": mean NLL of the value tokens (teacher only, else None)}``."""
    a = len(hs.answer)
    if decode == "teacher":
        logits, probs, seq = _answer_rows(lm, hs, None, capture=True)
        pred = logits.argmax(-1)
        wrong = (pred != hs.answer).nonzero()
        first = int(wrong[0]) if len(wrong) else a
        steps = torch.arange(a) <= first  # rows up to the first wrong token are the rows greedy decoding runs
        return {"scores": retrieval_score(probs, pred, seq, hs.needle, steps), "correct": first == a,
                "tokens": pred.tolist(), "answer_nll": _answer_nll(logits, hs.answer)}
    if decode == "greedy":
        gen, probs, context = _greedy(lm, hs, max_new_tokens or a + 2)
        ok = len(gen) >= a and bool((gen[:a] == hs.answer).all())
        return {"scores": retrieval_score(probs, gen, context, hs.needle), "correct": ok, "tokens": gen.tolist(),
                "answer_nll": None}
    raise ValueError(f"decode: expected 'teacher' or 'greedy', received {decode!r}")


def mask_accuracy(lm: LoadedModel, haystacks: list[Haystack], heads: list[tuple[int, int]]) -> tuple[float, float]:
    """With ``heads`` masked: the fraction of haystacks whose value greedy decoding reproduces exactly, and the
    mean negative log-likelihood per answer token."""
    gates = head_gates(lm.info.layers, lm.info.heads, off=heads) if heads else None
    ok, nll = [], []
    for hs in haystacks:
        logits, _, _ = _answer_rows(lm, hs, gates, capture=False)
        ok.append(bool((logits.argmax(-1) == hs.answer).all()))
        nll.append(_answer_nll(logits, hs.answer))
    return sum(ok) / len(ok), sum(nll) / len(nll)


# ------------------------------------------------------------------------------------------------ retrieval heads


@dataclass
class RetrievalHeadsResult(Result):
    """Retrieval scores and the masking ablation. ``conditions``: name -> {k, accuracy, answer_nll} (random
    conditions averaged over draws, with ``accuracy_draws``)."""

    scores: Tensor = None  # (L, H) mean retrieval score over haystacks
    haystacks: list[dict] = field(default_factory=list)  # length, depth, value, generated text, correct
    threshold: float = 0.1
    fraction_above: float = 0.0
    top: list[dict] = field(default_factory=list)  # rank, layer, head, score
    conditions: list[dict] = field(default_factory=list)
    decode: str = "teacher"
    seconds: float = 0.0

    def findings(self) -> list[str]:
        L, H = self.scores.shape
        n_ok = sum(h["correct"] for h in self.haystacks)
        out = [f"{100 * self.fraction_above:.1f}% of the {L * H} heads have a retrieval score above "
               f"{self.threshold:g} (the paper: retrieval heads are sparse, under 5%), over {len(self.haystacks)} "
               f"haystacks of {sorted({h['length'] for h in self.haystacks})} tokens; unmasked, the model "
               f"reproduced the needle on {n_ok}/{len(self.haystacks)}."]
        if self.top:
            out.append("Top retrieval heads (layer.head: score): " + ", ".join(
                f"{t['layer']}.{t['head']}: {t['score']:.2f}" for t in self.top[:5]) + ".")
        by_k: dict[int, dict[str, dict]] = {}
        for c in self.conditions:
            by_k.setdefault(c["k"], {})[c["kind"]] = c
        for k, d in sorted(by_k.items()):
            if k == 0 or "top" not in d or "random" not in d:
                continue
            out.append(f"Masking the top {k} retrieval heads: accuracy {d['top']['accuracy']:.2f} (answer NLL "
                       f"{d['top']['answer_nll']:.2f}) vs {k} random heads {d['random']['accuracy']:.2f} "
                       f"(NLL {d['random']['answer_nll']:.2f}); unmasked {by_k[0]['none']['accuracy']:.2f} "
                       f"(NLL {by_k[0]['none']['answer_nll']:.2f}) -- the paper: masking retrieval heads breaks "
                       f"retrieval, masking random heads does not.")
        return out

    def sections(self) -> list[str]:
        parts = ["<h3>Retrieval heads (needle in a haystack)</h3>",
                 note(f"Retrieval score = needle tokens a head copied (argmax attention on the needle token being "
                      f"generated) / needle length, mean over haystacks; decoding: {self.decode}; "
                      f"{self.seconds:.1f} s."),
                 heatmap(self.scores, title="retrieval score per head", xlabel="head", ylabel="layer",
                         cmap="magma")]
        parts.append(table(["rank", "layer", "head", "score"],
                           [[t["rank"], t["layer"], t["head"], f"{t['score']:.3f}"] for t in self.top[:10]]))
        parts.append(table(["masked", "k", "accuracy", "answer NLL"],
                           [[c["kind"], c["k"], f"{c['accuracy']:.2f}", f"{c['answer_nll']:.3f}"]
                            for c in self.conditions]))
        parts.append(table(["length", "depth", "value", "model's answer", "correct"],
                           [[h["length"], h["depth"], h["value"], h["answer"], h["correct"]] for h in self.haystacks]))
        return parts


# model -> {settings: retrieval scoring}, so that attention-influence reuses what retrieval-heads computed in the
# same process; weak keys: the cache never keeps a model alive
_SCORED: "weakref.WeakKeyDictionary[torch.nn.Module, dict[tuple, tuple]]" = weakref.WeakKeyDictionary()


def _retrieval(lm: LoadedModel, lengths, depths, *, seed: int, value_kind: str, decode: str):
    key = (tuple(lengths), tuple(depths), seed, value_kind, decode)
    per_model = _SCORED.setdefault(lm.model, {})
    if key not in per_model:
        per_model.clear()  # one entry per model is enough
        per_model[key] = _score_all(lm, lengths, depths, seed=seed, value_kind=value_kind, decode=decode)
    return per_model[key]


def _score_all(lm: LoadedModel, lengths, depths, *, seed: int, value_kind: str, decode: str):
    hays = [build_haystack(lm, n, d, seed=seed + i, value_kind=value_kind)
            for i, (n, d) in enumerate((n, d) for n in lengths for d in depths)]
    total = torch.zeros(lm.info.layers, lm.info.heads)
    rows = []
    for hs in hays:
        r = score_haystack(lm, hs, decode=decode)
        total += r["scores"]
        rows.append({"length": len(hs.prompt), "depth": hs.depth, "value": hs.value,
                     "answer": lm.tokenizer.decode(r["tokens"]), "correct": r["correct"],
                     "answer_nll": r["answer_nll"]})
    return total / len(hays), hays, rows


@analysis("retrieval-heads", seeds=("retrieval-heads",), applies=causal_only,
          why_not="needle-in-a-haystack retrieval needs a generating (causal) model; MiniLM is a bidirectional encoder",
          summary="Needle-in-a-haystack retrieval score per head (argmax attention on the needle token being copied), "
                  "and answer accuracy with the top-k retrieval heads vs k random heads masked")
def run_retrieval_heads(lm: LoadedModel, inp: Inputs | None = None, *, lengths: tuple[int, ...] = (96, 160),
                        depths: tuple[float, ...] = (0.25, 0.75), ks: tuple[int, ...] = (5, 20),
                        random_draws: int = 2, threshold: float = 0.1, value_kind: str = "digits",
                        decode: str = "teacher", seed: int = 0) -> RetrievalHeadsResult:
    """Retrieval heads on haystacks built here (``inp`` is not used: the needle task needs its own prompts).

    ``lengths`` x ``depths`` haystacks (tokens; fraction of the filler before the needle); ``ks``: numbers of heads
    masked; ``random_draws``: random head sets per k (drawn from heads outside the top k)."""
    import time

    if not lm.info.causal:
        raise ValueError(f"retrieval-heads: expected a causal LM, received {lm.info.name} (bidirectional)")
    L, H = lm.info.layers, lm.info.heads
    bad = [k for k in ks if not 0 < k < L * H]
    if bad or random_draws < 1:
        raise ValueError(f"ks: expected head counts in 1..{L * H - 1} and random_draws >= 1, received ks={ks}, "
                         f"random_draws={random_draws}")
    t0 = time.perf_counter()
    scores, hays, rows = _retrieval(lm, lengths, depths, seed=seed, value_kind=value_kind, decode=decode)
    if decode == "teacher":  # the scoring pass already is the unmasked teacher-forced pass
        acc0 = sum(r["correct"] for r in rows) / len(rows)
        nll0 = sum(r["answer_nll"] for r in rows) / len(rows)
    else:
        acc0, nll0 = mask_accuracy(lm, hays, [])
    conditions = [{"kind": "none", "k": 0, "accuracy": acc0, "answer_nll": nll0}]
    rng = random.Random(seed)
    for k in ks:
        top = top_heads(scores, k)
        acc, nll = mask_accuracy(lm, hays, top)
        conditions.append({"kind": "top", "k": k, "accuracy": acc, "answer_nll": nll})
        rest = [(i, j) for i in range(L) for j in range(H) if (i, j) not in set(top)]
        draws = [mask_accuracy(lm, hays, rng.sample(rest, k)) for _ in range(random_draws)]
        conditions.append({"kind": "random", "k": k, "accuracy": sum(a for a, _ in draws) / len(draws),
                           "answer_nll": sum(n for _, n in draws) / len(draws),
                           "accuracy_draws": [a for a, _ in draws]})
    ranked = top_heads(scores, min(20, L * H))
    return RetrievalHeadsResult(
        model=lm.info.name, scores=scores, haystacks=rows, threshold=threshold,
        fraction_above=float((scores > threshold).float().mean()),
        top=[{"rank": r + 1, "layer": i, "head": j, "score": float(scores[i, j])} for r, (i, j) in enumerate(ranked)],
        conditions=conditions, decode=decode, seconds=time.perf_counter() - t0)


# ------------------------------------------------------------------------------------------------ AttentionInfluence

_CODE_MODULES = ("textwrap", "heapq", "bisect", "fractions", "statistics", "colorsys", "shlex", "difflib",
                 "json.decoder", "string", "calendar", "glob", "fnmatch", "base64", "random", "tokenize")


def _math_doc(rng: random.Random, chars: int) -> str:
    parts: list[str] = []
    while sum(len(p) for p in parts) < chars:
        kind = rng.randrange(4)
        a, b, c = rng.randint(12, 99), rng.randint(3, 29), rng.randint(2, 9)
        if kind == 0:
            parts.append(f"Compute {a} * {b}. First {a} * {b // 10 * 10} = {a * (b // 10 * 10)}, then {a} * "
                         f"{b % 10} = {a * (b % 10)}, so {a} * {b} = {a * b}.")
        elif kind == 1:
            x = rng.randint(2, 30)
            parts.append(f"Solve {c}x + {b} = {c * x + b}. Subtract {b} from both sides: {c}x = {c * x}. Divide "
                         f"by {c}: x = {x}.")
        elif kind == 2:
            parts.append(f"The sum of the integers from 1 to {a} is {a} * {a + 1} / 2 = {a * (a + 1) // 2}, "
                         f"because pairing k with {a + 1} - k gives {a} pairs of {a + 1}, counted twice.")
        else:
            g = math.gcd(a, b * c)
            parts.append(f"Simplify {a}/{b * c}. The greatest common divisor of {a} and {b * c} is {g}, so "
                         f"{a}/{b * c} = {a // g}/{b * c // g}.")
    return " ".join(parts)


def influence_corpus(n_prose: int = 8, n_code: int = 6, n_math: int = 4, *, seed: int = 0,
                     chars: int = 1500) -> list[dict]:
    """Local documents ``{"name", "category", "text"}``: pydoc topics (prose, chosen by ``seed``), the source of
    fixed standard-library modules (code, from the first ``def``/``class`` on), generated worked arithmetic (math)."""
    if n_code > len(_CODE_MODULES):
        raise ValueError(f"n_code: expected at most {len(_CODE_MODULES)}, received {n_code}")
    import importlib

    docs: list[dict] = []
    names = topic_names()
    random.Random(seed).shuffle(names)
    for name in names:
        if len([d for d in docs if d["category"] == "prose"]) >= n_prose:
            break
        text = eval_text(seed, chars=chars, topics=[name]).text
        if len(text) >= chars * 0.8:
            docs.append({"name": f"pydoc:{name}", "category": "prose", "text": text})
    for mod in _CODE_MODULES[:n_code]:
        src = inspect.getsource(importlib.import_module(mod))
        cut = min(i for i in (src.find("\ndef "), src.find("\nclass "), 0 if src.startswith("def") else -1) if i >= 0)
        docs.append({"name": f"source:{mod}", "category": "code", "text": src[cut:].lstrip()[:chars]})
    rng = random.Random(f"math-{seed}")
    docs += [{"name": f"math:{i}", "category": "math", "text": _math_doc(rng, chars)} for i in range(n_math)]
    return docs


@dataclass
class AttentionInfluenceResult(Result):
    """Per-document AttentionInfluence with the top retrieval heads masked, and its stability."""

    heads: list[list[int]] = field(default_factory=list)  # masked (layer, head)
    docs: list[dict] = field(default_factory=list)  # name, category, base_loss, masked_loss, influence, rank
    category_mean: dict[str, float] = field(default_factory=dict)
    reasoning_over_prose: float = 0.0  # P(influence(code or math doc) > influence(prose doc))
    stability: dict[str, float] = field(default_factory=dict)
    vs_base_loss: float = 0.0  # Spearman(influence, unmasked loss): how much the ranking just follows the loss
    doc_tokens: int = 0
    seconds: float = 0.0

    def findings(self) -> list[str]:
        cm = ", ".join(f"{k} {100 * v:+.1f}%" for k, v in self.category_mean.items())
        s = self.stability
        return [f"Masking {len(self.heads)} retrieval heads raises the loss of {len(self.docs)} documents "
                f"({self.doc_tokens} tokens each) by, on average per category: {cm}; a code/math document "
                f"outranks a prose one in {100 * self.reasoning_over_prose:.0f}% of pairs (the paper: "
                f"reasoning-intensive data scores higher).",
                f"Stability (Spearman of the document ranking): two halves of the masked heads "
                f"{s.get('head_halves', float('nan')):.2f}; token subsets "
                f"{s.get('token_halves', float('nan')):.2f} (even vs odd token positions); retrieval heads vs as "
                f"many random heads {s.get('vs_random_heads', float('nan')):.2f} (low = specific to the heads); "
                f"influence vs the unmasked loss {self.vs_base_loss:.2f}."]

    def sections(self) -> list[str]:
        rows = [[d["rank"], d["name"], d["category"], f"{d['base_loss']:.3f}", f"{d['masked_loss']:.3f}",
                 f"{100 * d['influence']:+.2f}%"] for d in sorted(self.docs, key=lambda d: d["rank"])]
        heads = ", ".join(f"{i}.{j}" for i, j in self.heads)
        return ["<h3>AttentionInfluence (retrieval heads masked)</h3>",
                note(f"Influence = (loss with heads {heads} masked - loss) / loss, per document of "
                     f"{self.doc_tokens} tokens; {self.seconds:.1f} s."),
                table(["category", "mean influence"], [[k, f"{100 * v:+.2f}%"] for k, v in self.category_mean.items()]),
                table(["Spearman of the ranking", "value"],
                      [[k, f"{v:.3f}"] for k, v in {**self.stability, "vs_base_loss": self.vs_base_loss}.items()]),
                table(["rank", "document", "category", "loss", "masked loss", "influence"], rows)]


def _doc_losses(lm: LoadedModel, ids: Tensor, heads: list[tuple[int, int]] | None) -> Tensor:
    gates = head_gates(lm.info.layers, lm.info.heads, off=heads) if heads else None
    with torch.inference_mode():
        return next_token_loss(lm, ids, gates=gates, reduction="none")  # (D, n-1)


@analysis("attention-influence", seeds=("attention-influence",), applies=causal_only,
          why_not="the score is a next-token loss difference; MiniLM is a bidirectional encoder without an LM loss",
          summary="Relative loss increase per document with the top retrieval heads masked (code / math / prose "
                  "ranking) and its stability")
def run_attention_influence(lm: LoadedModel, inp: Inputs | None = None, *, n_heads: int | None = None,
                            heads: list[tuple[int, int]] | None = None, doc_tokens: int = 48, n_prose: int = 4,
                            n_code: int = 4, n_math: int = 4, lengths: tuple[int, ...] = (96, 160),
                            depths: tuple[float, ...] = (0.25, 0.75), random_control: bool = True,
                            seed: int = 0) -> AttentionInfluenceResult:
    """AttentionInfluence over :func:`influence_corpus` (``inp`` is not used).

    ``heads``: the heads to mask; by default the top ``n_heads`` (default 5% of all heads, at least 2) by the
    retrieval score on ``lengths`` x ``depths`` haystacks (the retrieval-heads defaults, so a scoring already done
    by ``retrieval-heads`` in the same process is reused). Stability (Spearman between two document rankings):
    ``head_halves`` -- masking the odd-ranked vs the even-ranked half of the heads; ``token_halves`` -- the
    influence from the even vs the odd token positions of each document (same passes); ``vs_random_heads``
    (with ``random_control``) -- the retrieval heads vs as many random other heads (low = the ranking is specific
    to the retrieval heads). Cost: 4 batched passes over ``documents x doc_tokens`` tokens (3 without control)."""
    import time

    if not lm.info.causal:
        raise ValueError(f"attention-influence: expected a causal LM, received {lm.info.name} (bidirectional)")
    if doc_tokens < 8:
        raise ValueError(f"doc_tokens: expected at least 8, received {doc_tokens}")
    t0 = time.perf_counter()
    L, H = lm.info.layers, lm.info.heads
    if heads is None:
        n = n_heads or max(2, round(0.05 * L * H))
        scores, _, _ = _retrieval(lm, lengths, depths, seed=seed, value_kind="digits", decode="teacher")
        heads = top_heads(scores, n)
    heads = [(int(i), int(j)) for i, j in heads]
    if len(heads) < 2:
        raise ValueError(f"heads: expected at least 2 heads to mask, received {heads}")
    docs = influence_corpus(n_prose, n_code, n_math, seed=seed, chars=12 * doc_tokens)
    enc = [lm.tokenizer(d["text"], add_special_tokens=False)["input_ids"] for d in docs]
    keep = [i for i, e in enumerate(enc) if len(e) >= doc_tokens]
    docs = [docs[i] for i in keep]
    ids = torch.tensor([enc[i][:doc_tokens] for i in keep])
    base = _doc_losses(lm, ids, None)  # (D, doc_tokens - 1)
    masked = _doc_losses(lm, ids, heads)
    infl = relative_influence(masked.mean(1), base.mean(1))
    ia = relative_influence(_doc_losses(lm, ids, heads[0::2]).mean(1), base.mean(1))
    ib = relative_influence(_doc_losses(lm, ids, heads[1::2]).mean(1), base.mean(1))
    stability = {"head_halves": spearman(ia, ib),
                 "token_halves": spearman(relative_influence(masked[:, 0::2].mean(1), base[:, 0::2].mean(1)),
                                          relative_influence(masked[:, 1::2].mean(1), base[:, 1::2].mean(1)))}
    if random_control:
        rest = [(i, j) for i in range(L) for j in range(H) if (i, j) not in set(heads)]
        rnd = _doc_losses(lm, ids, random.Random(seed).sample(rest, len(heads))).mean(1)
        stability["vs_random_heads"] = spearman(infl, relative_influence(rnd, base.mean(1)))
    order = sorted(range(len(docs)), key=lambda i: -float(infl[i]))
    rank = {i: r + 1 for r, i in enumerate(order)}
    rows = [{"name": d["name"], "category": d["category"], "base_loss": float(base[i].mean()),
             "masked_loss": float(masked[i].mean()), "influence": float(infl[i]), "rank": rank[i]}
            for i, d in enumerate(docs)]
    cats = sorted({d["category"] for d in docs})
    cat_mean = {c: sum(r["influence"] for r in rows if r["category"] == c) /
                len([r for r in rows if r["category"] == c]) for c in cats}
    reason = [r["influence"] for r in rows if r["category"] != "prose"]
    prose = [r["influence"] for r in rows if r["category"] == "prose"]
    pairs = [(a > b) + 0.5 * (a == b) for a in reason for b in prose]
    return AttentionInfluenceResult(
        model=lm.info.name, heads=[list(h) for h in heads], docs=rows, category_mean=cat_mean,
        reasoning_over_prose=sum(pairs) / len(pairs) if pairs else float("nan"), stability=stability,
        vs_base_loss=spearman(infl, base.mean(1)),
        doc_tokens=doc_tokens, seconds=time.perf_counter() - t0)
