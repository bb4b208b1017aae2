"""Head importance and pattern heads: planted answers for the pure functions, then both analyses on the real models."""

from __future__ import annotations

import pytest
import torch

from attnlab.analysis import heads as Hd
from attnlab.analysis.metrics import spearman
from attnlab.analysis.base import next_token_loss
from attnlab.analysis.capture import head_gates

from .conftest import inputs_for


def test_spearman_and_normalisation():
    a = torch.tensor([1.0, 2.0, 3.0, 4.0, float("nan")])
    assert spearman(a, a * 10) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    assert spearman(torch.tensor([1.0, 2, 3, 4]), torch.tensor([1.0, 3, 2, 4])) == pytest.approx(0.8)
    assert spearman(torch.tensor([1.0, 1, 2, 3]), torch.tensor([1.0, 2, 3, 4])) == pytest.approx(0.9486833, abs=1e-6)
    n = Hd.normalize_per_layer(torch.tensor([[3.0, 4.0], [0.0, 2.0]]))
    torch.testing.assert_close(n, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    with pytest.raises(ValueError, match="equal shapes"):
        spearman(torch.ones(2), torch.ones(3))


def test_ablation_order_and_curve_recover_a_planted_importance():
    w = torch.tensor([[0.5, 0.1, 0.0], [2.0, 0.3, 1.0]])

    def damage(g):  # planted: removing head (l, h) costs w[l, h]
        return float(((1 - g) * w).sum())

    imp = Hd.ablation_importance(damage, 2, 3)
    torch.testing.assert_close(imp, w)
    part = Hd.ablation_importance(damage, 2, 3, [(1, 0)])
    assert part[1, 0] == 2.0 and part.isnan().sum() == 5
    order = Hd.pruning_order(imp)
    assert order[0] == (0, 2) and order[-1] == (1, 0)
    curve = Hd.pruning_curve(damage, order, 2, 3, [0, 0.5, 1])
    assert curve == pytest.approx([0.0, 0.4, 3.9])


def test_induction_and_offset_scores_planted():
    T, s = 5, 1
    n = s + 2 * T
    p = torch.zeros(1, 2, n, n)
    for i in range(n):
        p[0, 0, i, max(i - 1, 0)] = 1  # head 0: previous token
        p[0, 1, i, i - T + 1 if i >= s + T else i] = 1  # head 1: induction in the second copy
    ind = Hd.induction_scores(p, s, T)[0]
    assert ind[1] == 1 and ind[0] == 0
    off = Hd.offset_scores(p, [-1, 0, 1])[0]
    assert off[0, 0] == 1 and off[0, 2] == 0
    masked = Hd.offset_scores(p, [-1], torch.tensor([[1] * (n - 2) + [0, 0]]))[0]
    assert masked[0, 0] == 1
    with pytest.raises(ValueError, match="start"):
        Hd.induction_scores(p, 3, T)


def test_random_repeat_ids(real_model):
    ids, start = Hd.random_repeat_ids(real_model, 6, seed=1)
    seq = ids[0, start:start + 6]
    assert torch.equal(seq, ids[0, start + 6:start + 12]) and len(set(seq.tolist())) == 6
    assert ids.shape[-1] == 12 + (2 if not real_model.info.causal else 0)
    with pytest.raises(ValueError, match="length"):
        Hd.random_repeat_ids(real_model, 1)


def test_gate_gradient_equals_finite_difference(smollm2, short_text):
    lm = smollm2
    inp = inputs_for(lm, short_text, 10)
    L, H = lm.info.layers, lm.info.heads
    g = head_gates(L, H, requires_grad=True)
    next_token_loss(lm, inp.input_ids, gates=g).backward()
    eps = 1e-2
    with torch.no_grad():
        up, down = head_gates(L, H), head_gates(L, H)
        up[L - 1, 1] += eps
        down[L - 1, 1] -= eps
        fd = (next_token_loss(lm, inp.input_ids, gates=up) - next_token_loss(lm, inp.input_ids, gates=down)) / (2 * eps)
    assert float(g.grad[L - 1, 1]) == pytest.approx(float(fd), rel=0.05, abs=1e-4)


def test_head_importance_on_real_model(real_model, short_text):
    lm = real_model
    L, H = lm.info.layers, lm.info.heads
    r = Hd.run_head_importance(lm, inputs_for(lm, short_text, 16), max_tokens=8, layers=[L - 1],
                               fractions=(0.0, 0.5), projections=8)
    assert r.ablation.shape == r.gradient.shape == (L, H)
    assert torch.isfinite(r.ablation[L - 1]).all() and r.ablation[:L - 1].isnan().all()
    assert torch.isfinite(r.gradient).all() and (r.gradient >= 0).all()
    assert -1 <= r.spearman <= 1
    if lm.info.causal:
        assert r.curve[0] == pytest.approx(torch.tensor(r.base).exp().item(), rel=1e-4)
    else:
        assert r.curve[0] == pytest.approx(1.0, abs=1e-5) and r.base == pytest.approx(0.0, abs=1e-5)
    assert len(r.curve) == 2 and r.findings() and r.sections()


def test_pattern_heads_on_real_model(real_model, short_text):
    lm = real_model
    r = Hd.run_pattern_heads(lm, inputs_for(lm, short_text, 24), length=8, k=2, n_random=1)
    L, H = lm.info.layers, lm.info.heads
    assert r.induction.shape == (L, H) and r.offset.shape == (L, H, len(r.offsets))
    assert ((r.induction >= 0) & (r.induction <= 1)).all()
    assert len(r.top_induction) == 2
    if lm.info.causal:
        assert r.offsets == [-2, -1, 0]
        assert all(x is not None for x in (r.loss_repeat, r.loss_repeat_top, r.loss_first_half))
        assert len(r.loss_repeat_random) == 1
    else:
        assert r.offsets == [-2, -1, 0, 1, 2] and r.loss_repeat is None
    assert r.findings() and r.sections() and r.to_json()["findings"]
    with pytest.raises(ValueError, match="k"):
        Hd.run_pattern_heads(lm, inputs_for(lm, short_text, 8), k=0)


@pytest.mark.slow
def test_head_importance_default_options(smollm2, short_text):
    r = Hd.run_head_importance(smollm2, inputs_for(smollm2, short_text, 48))
    assert torch.isfinite(torch.tensor(r.curve)).all() and len(r.curve) == 10
