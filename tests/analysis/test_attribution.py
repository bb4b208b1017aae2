"""Attribution analyses: pure functions on hand-checked cases, then rollout/flow/relevance/saliency-share on the real
models (small inputs). The tests check the computation (invariants, known answers, a planted effect), never the
seed papers' effect sizes."""

from __future__ import annotations

import json

import math

import pytest
import torch

from attnlab.analysis import ANALYSES
from attnlab.analysis.attribution import (
    _forward_backward, _target, aopc, attention_flow, relevance_propagation, rollout, run_flow, run_relevance,
    run_rollout, run_saliency_share, saliency_share,
)
from attnlab.analysis.capture import Capture
from attnlab.analysis.metrics import spearman

from .conftest import inputs_for

# ------------------------------------------------------------------------------------------------ pure functions


def test_rollout_identity_and_product():
    eye = torch.eye(5).expand(4, 5, 5)
    torch.testing.assert_close(rollout(eye), torch.eye(5))
    a = torch.softmax(torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(0)), -1)
    r = rollout(a)
    torch.testing.assert_close(r.sum(-1), torch.ones(6))
    hat = 0.5 * a + 0.5 * torch.eye(6)
    torch.testing.assert_close(r, hat[2] @ hat[1] @ hat[0])
    torch.testing.assert_close(rollout(a, residual=0.0), a[2] @ a[1] @ a[0])


def test_flow_by_hand_and_bounds():
    # two layers, two tokens, no residual. From output 0: via node (1,0) min(0.9, 0.5) = 0.5 reaches input 1, via
    # (1,1) min(0.1, 1) = 0.1: flow 0.6, while rollout gives 0.9 * 0.5 + 0.1 * 1 = 0.55
    a1 = torch.tensor([[0.5, 0.5], [0.0, 1.0]])
    a2 = torch.tensor([[0.9, 0.1], [0.5, 0.5]])
    attn = torch.stack([a1, a2])
    f = attention_flow(attn, torch.tensor([1.0, 0.0]), residual=0.0)
    torch.testing.assert_close(f, torch.tensor([0.5, 0.6]), atol=1e-5, rtol=0)
    torch.testing.assert_close(rollout(attn, residual=0.0)[0], torch.tensor([0.45, 0.55]))
    # the proportional (rollout) routing is one feasible flow, so max-flow >= rollout; and <= the source's 1
    a = torch.softmax(torch.randn(4, 7, 7, generator=torch.Generator().manual_seed(1)), -1)
    src = torch.zeros(7)
    src[3] = 1
    f = attention_flow(a, src)
    assert torch.all(f >= rollout(a)[3] - 1e-4) and torch.all(f <= 1 + 1e-5)
    with pytest.raises(ValueError, match="expected at most 4 tokens"):
        attention_flow(a, src, limit=4)
    with pytest.raises(ValueError, match=r"expected a \(layers, N, N\)"):
        attention_flow(torch.ones(2, 3, 4), src)


def test_relevance_rule():
    a = torch.softmax(torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2)), -1)
    torch.testing.assert_close(relevance_propagation(a, torch.zeros_like(a)), torch.eye(4))  # no gradient: R = I
    g = torch.randn_like(a)
    m = (g * a).clamp_min(0).mean(1)
    expect = torch.eye(4) + m[0]
    expect = expect + m[1] @ expect
    torch.testing.assert_close(relevance_propagation(a, g), expect)
    with pytest.raises(ValueError, match="of one shape"):
        relevance_propagation(a, g[:, :2])


def test_share_spearman_aopc():
    s = torch.tensor([0.1, 0.2, 0.7])
    assert float(saliency_share(s * 5, s)) == pytest.approx(1.0)
    assert float(saliency_share(torch.tensor([1.0, 0, 0]), torch.tensor([0, 0.0, 1]))) == 0.0
    assert saliency_share(torch.ones(4, 3), s).shape == (4,)
    with pytest.raises(ValueError, match="non-negative"):
        saliency_share(-s, s)
    assert spearman([1, 2, 3, 4], [10, 20, 30, 50]) == pytest.approx(1.0)
    assert math.isnan(spearman([1, 1, 1], [1, 2, 3]))
    assert aopc([1.0, 0.5, 0.0]) == pytest.approx(0.5)
    assert aopc([0.0, 0.5, 1.0], insertion=True) == pytest.approx(0.5)


# ------------------------------------------------------------------------------------------------ real models


def test_explicit_capture_gives_probability_gradients(minilm, short_text):
    inp = inputs_for(minilm, short_text, 16)
    with Capture(minilm.model, explicit=True) as cap:
        out = minilm.model(**inp.model_kwargs())
    out.last_hidden_state.sum().backward()
    assert cap.records[0]["probs"].grad is not None  # the record is the tensor the output was computed from
    minilm.model.zero_grad(set_to_none=True)


def test_gradients_match_finite_difference(real_model, short_text):
    """Input x gradient from the pass is the first-order change of the target: check one embedding direction."""
    lm = real_model
    inp = inputs_for(lm, short_text, 12)
    p = _forward_backward(lm, inp.input_ids)
    assert p.attn.shape == p.relmaps.shape == (lm.info.layers, inp.n, inp.n)
    torch.testing.assert_close(p.attn.sum(-1), torch.ones(lm.info.layers, inp.n), atol=1e-4, rtol=0)
    assert p.layer_sal.shape == (lm.info.layers, inp.n) and torch.isfinite(p.ixg).all()
    if lm.info.causal:  # causal: tokens after the target row cannot matter; here the last row is the target
        assert p.score <= 0 and torch.allclose(p.relmaps.triu(1), torch.zeros(()))
    emb = lm.model.get_input_embeddings()
    from attnlab.analysis.attribution import _score

    tgt = _target(lm, inp.input_ids)
    eps = 1e-2
    handle = emb.register_forward_hook(lambda m, a, o: o * (1 + eps))  # scale every embedding by 1 + eps
    try:
        with torch.no_grad():
            up = _score(lm, inp.input_ids, tgt, grad=True)
    finally:
        handle.remove()
    with torch.no_grad():
        base = _score(lm, inp.input_ids, tgt, grad=True)
    # d f / d eps = sum over tokens of x . grad
    assert float((up - base)[0]) / eps == pytest.approx(float(p.ixg.sum()), rel=0.1, abs=1e-3)


def test_rollout_analysis(real_model, short_text):
    lm = real_model
    res = run_rollout(lm, inputs_for(lm, short_text, 48), tokens=12)
    n = len(res.tokens)
    assert n == 12 and set(res.scores) == {"raw", "rollout", "relevance"}
    for s in res.scores.values():
        assert len(s) == n and all(map(lambda x: x == x, s))
    assert sum(res.scores["rollout"]) == pytest.approx(1.0, abs=1e-4)  # a distribution over input tokens
    assert all(v["loo"] is None or -1 <= v["loo"] <= 1 for v in res.spearman.values())
    if not lm.info.causal:
        assert res.tokens[0] == "[CLS]" and res.tokens[-1] == "[SEP]" and 0 not in res.positions
    json.dumps(res.to_json())
    assert res.findings() and "<h3>" in res.sections()[0]


def test_flow_analysis(real_model, short_text):
    lm = real_model
    res = run_flow(lm, inputs_for(lm, short_text, 48), tokens=10)
    f, r = torch.tensor(res.scores["flow"]), torch.tensor(res.scores["rollout"])
    assert f.shape == (10,) and torch.all(f >= r - 1e-3) and torch.all(f <= 1 + 1e-4)
    with pytest.raises(ValueError, match="expected at most 8 tokens"):
        run_flow(lm, inputs_for(lm, short_text, 48), tokens=10, flow_limit=8)


def test_relevance_and_aopc(real_model, short_text):
    lm = real_model
    res = run_relevance(lm, inputs_for(lm, short_text, 48), tokens=12, steps=3, seeds=2)
    assert len(res.relevance) == 12 and set(res.aopc) == {"deletion", "insertion"}
    for mode, curves in res.curves.items():
        # deletion starts at the unperturbed score, insertion ends there: every method shares both end points
        ends = {round(c[0], 4) for c in curves.values()} | {round(c[-1], 4) for c in curves.values()}
        assert len({round(c[0], 4) for c in curves.values()}) == 1 and len(ends) == 2, mode
        assert all(len(c) == len(res.fractions) for c in curves.values())
    json.dumps(res.to_json())
    assert len(res.findings()) == 3


def test_planted_loo(minilm):
    """A planted effect: deleting the one content word of a near-empty sentence moves the embedding most."""
    from attnlab.analysis.attribution import _free_positions, leave_one_out
    from attnlab.analysis.base import make_inputs

    inp = make_inputs(minilm, "the the the volcano the the", max_tokens=16)
    tgt = _target(minilm, inp.input_ids)
    pos = _free_positions(minilm, inp.input_ids)
    imp = leave_one_out(minilm, inp.input_ids, tgt, pos)
    assert minilm.tokens(inp.input_ids)[int(pos[imp.argmax()])].strip() == "volcano"


def test_saliency_share(real_model, short_text):
    lm = real_model
    res = run_saliency_share(lm, inputs_for(lm, short_text, 24))
    L = lm.info.layers
    assert len(res.share_input) == len(res.share_layer) == len(res.spearman_input) == L
    assert all(0 <= x <= 1 + 1e-6 for x in res.share_input + res.share_layer)
    assert 0 < res.share_uniform <= 1
    json.dumps(res.to_json())
    assert len(res.findings()) == 2


def test_registered_and_bad_input(minilm, short_text):
    for name in ("rollout", "flow", "relevance", "saliency-share"):
        assert name in ANALYSES and ANALYSES[name].applies(minilm.info)
    with pytest.raises(ValueError, match="tokens: expected at least 3"):
        run_rollout(minilm, inputs_for(minilm, short_text, 16), tokens=2)
    with pytest.raises(ValueError, match="inp: expected attnlab.analysis.Inputs"):
        run_saliency_share(minilm, "text")
