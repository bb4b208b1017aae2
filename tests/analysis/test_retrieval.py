"""Retrieval heads and AttentionInfluence: the scoring rules on synthetic tensors with known answers, then the
analyses on SmolLM2 with the smallest settings (MiniLM: they do not apply)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnlab.analysis.base import ANALYSES
from attnlab.analysis.retrieval import (build_haystack, influence_corpus, relative_influence, retrieval_score,
                                        run_attention_influence, run_retrieval_heads, score_haystack)
from attnlab.analysis.metrics import spearman, top_heads


def _one_hot_rows(L, H, T, Nk, argmax):
    """probs (L, H, T, Nk) whose argmax at [l, h, t] is argmax[l][h][t]."""
    p = torch.full((L, H, T, Nk), 0.1 / Nk)
    for l in range(L):
        for h in range(H):
            for t in range(T):
                p[l, h, t, argmax[l][h][t]] += 0.9
    return p


def test_retrieval_score_known_answer():
    # context: 0 1 2 [7 8 9] 3 ; needle = positions 3..5 holding tokens 7 8 9; the model generates 7 8 9
    ctx = torch.tensor([0, 1, 2, 7, 8, 9, 3])
    gen = torch.tensor([7, 8, 9])
    arg = [[[3, 4, 5],  # head (0,0): copies every needle token -> 1
            [3, 3, 3],  # head (0,1): attends to needle pos 3 each step; only step 0 is a copy -> 1/3
            [0, 1, 2]],  # head (0,2): never on the needle -> 0
           [[4, 5, 6],  # head (1,0): on the needle but on the wrong token (8 while generating 7, ...) -> 0
            [3, 4, 4],  # head (1,1): copies 7 and 8; step 2 attends 8 while 9 is generated -> 2/3
            [5, 4, 3]]]  # head (1,2): copies 8 at step 1 only -> 1/3
    s = retrieval_score(_one_hot_rows(2, 3, 3, 7, arg), gen, ctx, (3, 6))
    torch.testing.assert_close(s, torch.tensor([[1.0, 1 / 3, 0.0], [0.0, 2 / 3, 1 / 3]]))
    # counted steps: only step 0 -> head (0,0) and (0,1) and (1,1) get 1/3
    s0 = retrieval_score(_one_hot_rows(2, 3, 3, 7, arg), gen, ctx, (3, 6), steps=torch.tensor([True, False, False]))
    torch.testing.assert_close(s0, torch.tensor([[1 / 3, 1 / 3, 0.0], [0.0, 1 / 3, 0.0]]))


def test_retrieval_score_counts_distinct_positions_and_checks_shapes():
    # a repeated digit copied twice from the same position counts once; the other occurrence still counts
    ctx = torch.tensor([5, 4, 4, 1])
    gen = torch.tensor([4, 4])
    s = retrieval_score(_one_hot_rows(1, 2, 2, 4, [[[1, 1], [1, 2]]]), gen, ctx, (1, 3))
    torch.testing.assert_close(s, torch.tensor([[0.5, 1.0]]))
    with pytest.raises(ValueError, match="needle"):
        retrieval_score(torch.rand(1, 1, 2, 4), gen, ctx, (3, 9))
    with pytest.raises(ValueError, match="generated"):
        retrieval_score(torch.rand(1, 1, 2, 4), torch.tensor([1]), ctx, (1, 3))


def test_spearman_top_heads_relative_influence():
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([10.0, 20, 30, 40])) == pytest.approx(1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([4.0, 3, 2, 1])) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2, 2, 3]), torch.tensor([1.0, 2, 2, 3])) == pytest.approx(1.0)
    assert math.isnan(spearman(torch.tensor([1.0, 1, 1]), torch.tensor([1.0, 2, 3])))
    sc = torch.tensor([[0.1, 0.9, 0.0], [0.5, 0.9, 0.2]])
    assert top_heads(sc, 3) == [(0, 1), (1, 1), (1, 0)]
    torch.testing.assert_close(relative_influence(torch.tensor([3.0, 2.0]), torch.tensor([2.0, 2.0])),
                               torch.tensor([0.5, 0.0]))
    with pytest.raises(ValueError, match="k"):
        top_heads(sc, 7)


def test_influence_corpus_categories():
    docs = influence_corpus(3, 2, 2, chars=400)
    assert [d["category"] for d in docs] == ["prose"] * 3 + ["code"] * 2 + ["math"] * 2
    assert all(len(d["text"]) >= 300 for d in docs)
    assert "def " in docs[3]["text"] or "class " in docs[3]["text"]
    assert docs == influence_corpus(3, 2, 2, chars=400)  # deterministic


def test_haystack_layout(smollm2):
    hs = build_haystack(smollm2, 96, 0.5, seed=3)
    assert len(hs.prompt) == 96
    a, b = hs.needle
    assert torch.equal(hs.prompt[a:b], hs.answer)  # the value's tokens sit at the needle positions
    assert hs.value in smollm2.tokenizer.decode(hs.prompt[a:b])
    with pytest.raises(ValueError, match="depth"):
        build_haystack(smollm2, 96, 1.5)
    with pytest.raises(ValueError, match="length"):
        build_haystack(smollm2, 20, 0.5)


def test_retrieval_heads_smollm2_smallest(smollm2):
    r = run_retrieval_heads(smollm2, None, lengths=(80,), depths=(0.5,), ks=(5,), random_draws=1)
    L, H = smollm2.info.layers, smollm2.info.heads
    assert r.scores.shape == (L, H)
    assert bool(((r.scores >= 0) & (r.scores <= 1)).all())
    assert 0.0 <= r.fraction_above <= 1.0
    assert [c["kind"] for c in r.conditions] == ["none", "top", "random"]
    assert all(0.0 <= c["accuracy"] <= 1.0 and math.isfinite(c["answer_nll"]) for c in r.conditions)
    top = r.top[0]
    assert r.scores[top["layer"], top["head"]] == r.scores.max()
    json.dumps(r.to_json())
    assert len(r.findings()) >= 2 and all(isinstance(f, str) for f in r.findings())
    assert r.sections()[0].startswith("<h3>")


def test_attention_influence_smollm2_smallest(smollm2):
    heads = [(5, 1), (10, 2), (15, 3), (20, 4)]
    r = run_attention_influence(smollm2, None, heads=heads, doc_tokens=20, n_prose=2, n_code=2, n_math=1)
    assert len(r.docs) == 5 and sorted(d["rank"] for d in r.docs) == [1, 2, 3, 4, 5]
    for d in r.docs:
        assert d["influence"] == pytest.approx((d["masked_loss"] - d["base_loss"]) / d["base_loss"], rel=1e-4)
    assert set(r.category_mean) == {"code", "math", "prose"}
    assert set(r.stability) == {"head_halves", "token_halves", "vs_random_heads"}
    r2 = run_attention_influence(smollm2, None, heads=heads, doc_tokens=12, n_prose=2, n_code=1, n_math=1,
                                 random_control=False)
    assert set(r2.stability) == {"head_halves", "token_halves"} and len(r2.findings()) == 2
    assert all(-1 <= v <= 1 for v in r.stability.values() if not math.isnan(v))
    json.dumps(r.to_json())
    assert len(r.findings()) == 2 and r.sections()[0].startswith("<h3>")


def test_masking_nothing_changes_nothing(smollm2):
    # an empty mask set is the unmasked model: influence 0 for every document is the fixed point of the formula
    from attnlab.analysis.retrieval import _doc_losses

    ids = torch.tensor([smollm2.tokenizer("The cat sat on the mat because it was warm.")["input_ids"]])
    torch.testing.assert_close(_doc_losses(smollm2, ids, []), _doc_losses(smollm2, ids, None))


def test_registered_causal_only(minilm, smollm2):
    for name in ("retrieval-heads", "attention-influence"):
        spec = ANALYSES[name]
        assert spec.applies(smollm2.info) and not spec.applies(minilm.info) and spec.why_not
    with pytest.raises(ValueError, match="causal"):
        run_retrieval_heads(minilm, None)
    with pytest.raises(ValueError, match="causal"):
        run_attention_influence(minilm, None, heads=[(0, 0), (1, 1)])


@pytest.mark.slow
def test_teacher_scores_equal_greedy_when_correct(smollm2):
    # where greedy decoding reproduces the value, the teacher-forced rows are the generation's rows
    hs = build_haystack(smollm2, 128, 0.25, seed=0)
    t = score_haystack(smollm2, hs, decode="teacher")
    g = score_haystack(smollm2, hs, decode="greedy", max_new_tokens=len(hs.answer))
    if not (t["correct"] and g["correct"]):
        pytest.skip("the model did not reproduce this needle")
    torch.testing.assert_close(t["scores"], g["scores"])


@pytest.mark.slow
def test_retrieval_heads_default_size(smollm2):
    r = run_retrieval_heads(smollm2, None)
    assert r.scores.shape == (smollm2.info.layers, smollm2.info.heads)
    assert len(r.conditions) == 1 + 2 * 2
