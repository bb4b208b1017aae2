"""Sinks and attention calibration: pure functions on planted cases, the capture extensions (edit_probs,
logit_scale) against known answers, and the analyses on the real models (small inputs)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from attnlab.analysis.base import ANALYSES, next_token_loss
from attnlab.analysis.capture import Capture
from attnlab.analysis.sinks import (act_edit, cloze_accuracy, longest_run, massive_activations, mlp_modules,
                                    received_mass, run_act_calibration, run_sinks, sink_ratio,
                                    uniform_mass)
from attnlab.analysis.metrics import spearman, visible_keys

from .conftest import inputs_for


# ------------------------------------------------------------------------------------------------ pure functions
def visibility(n: int, causal: bool, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``(N, N)`` visibility of one sequence (the shared ``metrics.visible_keys``)."""
    return visible_keys(None if mask is None else mask[None], 1, n, causal=causal)[0, 0]


def _uniform_causal(n: int) -> torch.Tensor:
    vis = visibility(n, True).float()
    return vis / vis.sum(1, keepdim=True)


def test_visibility_and_uniform_baseline():
    vis = visibility(4, True)
    assert vis.sum().item() == 10 and vis[0, 1].item() is False and vis[3, 0].item() is True
    pad = visibility(3, False, torch.tensor([1, 1, 0]))
    assert pad[:, 2].sum() == 0 and pad[2].sum() == 0
    # uniform attention has sink ratio exactly 1 for every key
    p = _uniform_causal(6)
    torch.testing.assert_close(sink_ratio(p, visibility(6, True)), torch.ones(6))
    # key 0 in a causal input: mean over rows i of 1/(i+1)
    assert math.isclose(float(uniform_mass(visibility(4, True))[0]), (1 + 1 / 2 + 1 / 3 + 1 / 4) / 4, rel_tol=1e-6)


def test_received_mass_planted_sink():
    row = torch.tensor([0.1, 0.1, 0.7, 0.1])
    probs = row.expand(2, 4, 4)  # two heads, bidirectional, every row the same
    vis = visibility(4, False)
    torch.testing.assert_close(received_mass(probs, vis), row)
    torch.testing.assert_close(sink_ratio(probs, vis), row * 4)
    with pytest.raises(ValueError, match="expected \\(H, N, N\\)"):
        received_mass(torch.ones(2, 3, 3), vis)


def test_longest_run_massive_spearman():
    flags = torch.tensor([[1, 0], [1, 1], [0, 1], [1, 1], [0, 1]], dtype=torch.bool)
    assert longest_run(flags).tolist() == [2, 4]
    h = torch.ones(2, 5, 8)
    h[1, 3, 6] = -1000.0
    big = massive_activations(h, 100)
    assert big.sum() == 1 and big[1, 3, 6]
    x = torch.arange(10.0)
    assert spearman(x, x ** 3) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert math.isnan(spearman(x, torch.ones(10)))


def test_act_edit_scales_sink_and_renormalises():
    N = 12
    p = _uniform_causal(N).clone()[None, None].repeat(1, 2, 1, 1)  # (1, 2, N, N)
    p[0, 0, 3:, 3] += 1.0  # head 0: key 3 is a sink for every row that sees it
    p = p / p.sum(-1, keepdim=True)
    vis = visibility(N, True)
    new, sinks = act_edit(p, vis, threshold=0.3, beta=0.5, min_rows=4)
    assert sinks[0, 0].nonzero().flatten().tolist() == [3] and not sinks[0, 1].any()
    torch.testing.assert_close(new.sum(-1), torch.ones(1, 2, N))
    torch.testing.assert_close(new[0, 1], p[0, 1])  # the head without a sink is untouched
    i = 7  # attention to the sink relative to another key halves
    assert float(new[0, 0, i, 3] / new[0, 0, i, 5]) == pytest.approx(0.5 * float(p[0, 0, i, 3] / p[0, 0, i, 5]))
    # the first token is never calibrated; beta = 1 is the identity
    p2 = p.clone()
    p2[0, 0, :, 0] += 5
    p2 = p2 / p2.sum(-1, keepdim=True)
    assert not act_edit(p2, vis, threshold=0.3)[1][..., 0].any()
    torch.testing.assert_close(act_edit(p, vis, threshold=0.3, beta=1.0)[0], p)
    with pytest.raises(ValueError, match="beta"):
        act_edit(p, vis, beta=1.5)


# -------------------------------------------------------------------------------------- capture extensions
def test_capture_logit_scale_and_edit_probs(minilm, short_text):
    lm = minilm
    inp = inputs_for(lm, short_text, 24)
    kw = inp.model_kwargs()
    with torch.no_grad():
        base = lm.model(**kw).last_hidden_state
        with Capture(lm.model, layers=[0], what=("logits", "probs")) as c0:
            lm.model(**kw)
        with Capture(lm.model, layers=[0], logit_scale=0.5) as c1:
            scaled = lm.model(**kw).last_hidden_state
        with Capture(lm.model, layers=[], logit_scale=1.0):
            same = lm.model(**kw).last_hidden_state
        with Capture(lm.model, layers=[], edit_probs=lambda layer, p: p):
            ident = lm.model(**kw).last_hidden_state
        with Capture(lm.model, layers=[0], edit_probs=lambda layer, p: torch.full_like(p, 1 / p.shape[-1])) as c2:
            uni = lm.model(**kw).last_hidden_state
    torch.testing.assert_close(same, base, atol=1e-5, rtol=0)
    torch.testing.assert_close(ident, base, atol=1e-4, rtol=1e-4)
    # layer 0 sees the same input, so its probabilities are softmax(0.5 * logits)
    torch.testing.assert_close(c1[0]["probs"], torch.softmax(0.5 * c0[0]["logits"], -1), atol=1e-5, rtol=0)
    assert (scaled - base).abs().max() > 1e-3 and (uni - base).abs().max() > 1e-3
    torch.testing.assert_close(c2[0]["probs"], torch.full_like(c2[0]["probs"], 1 / inp.n))  # recorded = edited
    with pytest.raises(ValueError, match="logit_scale"):
        Capture(lm.model, logit_scale=-1.0)
    with pytest.raises(ValueError, match="edit_probs: expected a tensor of shape"):
        with torch.no_grad(), Capture(lm.model, layers=[], edit_probs=lambda layer, p: p[..., :1]):
            lm.model(**kw)


# ------------------------------------------------------------------------------------------- real models
def test_sinks_on_real_models(real_model, short_text):
    lm = real_model
    inp = inputs_for(lm, short_text, 40)
    r = run_sinks(lm, inp, min_rows=4)
    L, N = lm.info.layers, inp.n
    assert len(mlp_modules(lm.model)) == L
    assert r.ratio.shape == (L, N) and torch.isfinite(r.ratio).all()
    assert all(0 <= x <= 1 for x in r.first_share + r.last_share)
    for s in r.secondary:
        assert s["position"] > 0 and 1 <= s["lifetime"] <= L and s["peak_ratio"] > r.k
    for m in r.massive:
        assert 0 <= m["dim"] < lm.info.hidden and m["positions"]
    assert r.findings() and all(isinstance(f, str) for f in r.findings())
    assert any("<h3>" in s for s in r.sections())
    json.dumps(r.to_json())
    assert ANALYSES["sinks"].applies(lm.info)


def test_act_calibration_smollm2(smollm2, short_text):
    lm = smollm2
    inp = inputs_for(lm, short_text, 32)
    ident = run_act_calibration(lm, inp, beta=1.0, cloze=False)  # beta = 1 changes nothing
    assert ident.ppl_after == pytest.approx(ident.ppl_before, rel=1e-4)
    r = run_act_calibration(lm, inp, threshold=0.05, beta=0.0, min_rows=4, cloze=False)
    assert sum(r.edited_heads) > 0 and math.isfinite(r.ppl_after) and r.ppl_after != pytest.approx(r.ppl_before)
    assert len(r.findings()) == 3
    json.dumps(r.to_json())
    # perplexity matches the shared scorer
    with torch.no_grad():
        loss = float(next_token_loss(lm, inp.input_ids, inp.attention_mask))
    assert r.ppl_before == pytest.approx(math.exp(loss))


def test_cloze_scoring_small(smollm2):
    items = [("The capital of France is", [" Paris", " Berlin"], 0), ("One, two, three,", [" banana", " four"], 1)]
    acc, chosen = cloze_accuracy(smollm2, items)
    assert len(chosen) == 2 and all(c in (0, 1) for c in chosen) and acc == sum(
        c == it[2] for c, it in zip(chosen, items)) / 2
    with pytest.raises(ValueError, match="answer index"):
        cloze_accuracy(smollm2, [("x", [" a"], 3)])


def test_act_calibration_does_not_apply_to_minilm(minilm, short_text):
    assert not ANALYSES["act-calibration"].applies(minilm.info)
    with pytest.raises(ValueError, match="causal"):
        run_act_calibration(minilm, inputs_for(minilm, short_text, 16))


@pytest.mark.slow
def test_act_calibration_full_default(smollm2):
    from attnlab.analysis.base import make_inputs
    from attnlab.analysis.text import eval_text

    inp = make_inputs(smollm2, eval_text(0, chars=1200).text, max_tokens=128)
    r = run_act_calibration(smollm2, inp)
    assert 0 <= r.acc_before <= 1 and 0 <= r.acc_after <= 1 and r.n_items >= 20
