"""Attention statistics: known answers on synthetic maps, then head-stats on the real models (invariants)."""

from __future__ import annotations

import math

import pytest
import torch

from attnlab.analysis import metrics as M
from attnlab.analysis.capture import Capture

from .conftest import inputs_for


def _shift(n: int, o: int) -> torch.Tensor:
    """(1, 1, n, n): every row attends to i + o (clamped into range)."""
    p = torch.zeros(1, 1, n, n)
    for i in range(n):
        p[0, 0, i, min(max(i + o, 0), n - 1)] = 1
    return p


def _causal_uniform(n: int) -> torch.Tensor:
    p = torch.ones(n, n).tril()
    return (p / p.sum(-1, keepdim=True))[None, None]


def test_entropy_and_normalised_entropy():
    p = _causal_uniform(6)
    torch.testing.assert_close(M.entropy(p)[0, 0], torch.log(torch.arange(1, 7).float()))
    ne = M.normalized_entropy(p, causal=True)[0, 0]
    assert math.isnan(ne[0]) and torch.allclose(ne[1:], torch.ones(5))
    assert torch.allclose(M.normalized_entropy(_shift(6, 0), causal=True)[0, 0, 1:], torch.zeros(5))
    # padding: the last two keys/queries are not real
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]])
    q = torch.zeros(1, 1, 6, 6)
    q[..., :4] = 0.25
    ne = M.normalized_entropy(q, mask, causal=False)[0, 0]
    assert torch.allclose(ne[:4], torch.ones(4)) and ne[4:].isnan().all()
    assert M.row_mean(ne[None, None], mask)[0, 0] == pytest.approx(1.0)


def test_effective_rank_known_answers():
    assert float(M.effective_rank(torch.eye(5))) == pytest.approx(5.0, abs=1e-5)
    assert float(M.effective_rank(torch.ones(4, 4) / 4)) == pytest.approx(1.0, abs=1e-5)
    d = torch.diag(torch.tensor([3.0, 1.0]))  # q = (3/4, 1/4)
    assert float(M.effective_rank(d)) == pytest.approx(math.exp(-(0.75 * math.log(0.75) + 0.25 * math.log(0.25))), rel=1e-5)
    mask = torch.tensor([[1, 1, 1, 0]])
    assert float(M.attention_effective_rank(_shift(4, 0), mask)[0, 0]) == pytest.approx(3.0, abs=1e-5)


def test_distance_waad_fai_profile_topk():
    n = 30
    prev = _shift(n, -1)
    d = M.attention_distance(prev)[0, 0]
    assert d[0] == 0 and torch.all(d[1:] == 1)
    far = torch.zeros(1, 1, n, n)
    far[0, 0, :, 0] = 1  # everyone attends to the first token
    assert torch.equal(M.waad(far, 10)[0, 0], torch.arange(n).clamp_max(10).float())
    assert torch.equal(M.attention_distance(far)[0, 0], torch.arange(n).float())
    f = M.fai(far)[0, 0]
    assert f[0] == 1 and torch.all(f[1:-1] == 0) and f[-1].isnan()  # only token 0 receives; the last has no future
    f = M.fai(_causal_uniform(4))[0, 0]  # FAI_s = mean_{t>s} 1/(t+1)
    torch.testing.assert_close(f[:3], torch.tensor([(1 / 2 + 1 / 3 + 1 / 4) / 3, (1 / 3 + 1 / 4) / 2, 1 / 4]))
    assert M.fai(_causal_uniform(6), hi=1)[0, 0, 2] == pytest.approx(1 / 4)  # only t = s + 1
    prof = M.distance_profile(prev, causal=True, max_distance=3)[0, 0]
    # distance 0: row 0 attends to itself (clamped), other rows not: 1/n; distance 1: every pair; 2, 3: none
    torch.testing.assert_close(prof, torch.tensor([1 / n, 1.0, 0.0, 0.0]))
    torch.testing.assert_close(M.top_k_mass(_causal_uniform(4), 2)[0, 0], torch.tensor([1, 1, 2 / 3, 1 / 2]))
    local, glob = M.head_groups(torch.tensor([[1.0, 5.0], [3.0, float("nan")]]), q=0.34)
    assert local == [(0, 0)] and glob == [(0, 1)]


def test_bad_input():
    with pytest.raises(ValueError, match="expected a tensor"):
        M.entropy(torch.ones(3, 3))
    with pytest.raises(ValueError, match="Nq == Nk"):
        M.waad(torch.ones(1, 1, 2, 3))
    with pytest.raises(ValueError, match="attention_mask"):
        M.fai(torch.ones(1, 1, 3, 3), torch.ones(1, 4))
    with pytest.raises(ValueError, match="window"):
        M.waad(torch.ones(1, 1, 3, 3), 0)


def test_head_stats_on_real_model(real_model, short_text):
    lm = real_model
    inp = inputs_for(lm, short_text, 24)
    r = M.run_head_stats(lm, inp, max_distance=8)
    L, H, N = lm.info.layers, lm.info.heads, inp.n
    for t in (r.entropy, r.norm_entropy, r.effective_rank, r.distance, r.waad, r.top_k):
        assert t.shape == (L, H) and torch.isfinite(t).all()
    assert r.profile.shape == (L, H, 9)
    assert ((r.norm_entropy >= -1e-6) & (r.norm_entropy <= 1 + 1e-6)).all()
    assert (r.waad <= r.window + 1e-5).all() and (r.waad <= r.distance + 1e-5).all()
    assert ((r.effective_rank >= 1 - 1e-4) & (r.effective_rank <= N + 1e-3)).all()
    assert ((r.top_k > 0) & (r.top_k <= 1 + 1e-6)).all()
    assert len(r.local_heads) == len(r.global_heads) == round(0.3 * L * H)
    assert r.token_fai.shape == r.token_waad.shape == (N,)
    # the streamed statistics equal those of the probabilities captured in one go (layer 1)
    with torch.no_grad(), Capture(lm.model, layers=[1]) as cap:
        lm.model(**inp.model_kwargs())
    p = cap[1]["probs"]
    torch.testing.assert_close(r.distance[1], M.row_mean(M.attention_distance(p))[0])
    assert r.findings() and all(isinstance(s, str) for s in r.sections())
    assert r.to_json()["findings"]
