"""Rank collapse and length collapse: pure functions with known answers, the attention-only path against the
model's own hidden states and a planted uniform-attention case, and both analyses on the real models."""

from __future__ import annotations

import json

import pytest
import torch

from attnlab.analysis.base import ANALYSES
from attnlab.analysis.capture import Capture
from attnlab.analysis.collapse import (attention_only_path, mean_pairwise_cosine, relative_residual,
                                       retrieval_accuracy, run_length_collapse, run_rank_collapse, sentences)

from .conftest import inputs_for


def test_relative_residual_known_answers():
    x = torch.randn(7)
    assert float(relative_residual(x.expand(5, 7))) == pytest.approx(0.0, abs=1e-6)  # all tokens equal
    y = torch.randn(6, 4)
    y = y - y.mean(0)  # token mean zero: the residual is the whole matrix
    assert float(relative_residual(y)) == pytest.approx(1.0)
    # a padded token is left out
    z = torch.cat([x.expand(3, 7), 100 * torch.randn(1, 7)])
    assert float(relative_residual(z, torch.tensor([1, 1, 1, 0]))) == pytest.approx(0.0, abs=1e-6)
    assert relative_residual(torch.randn(3, 5, 4)).shape == (3,)
    with pytest.raises(ValueError, match="mask"):
        relative_residual(y, torch.ones(5))


def test_cosine_retrieval_sentences():
    assert mean_pairwise_cosine(torch.ones(4, 3)) == pytest.approx(1.0)
    assert mean_pairwise_cosine(torch.eye(3)) == pytest.approx(0.0)
    assert retrieval_accuracy(torch.eye(4), torch.eye(4)) == 1.0
    assert retrieval_accuracy(torch.eye(2), torch.eye(2).flip(0)) == 0.0
    assert sentences("First sentence is here. Second one is here too! Tiny.", 5) == [
        "First sentence is here.", "Second one is here too!", "Tiny."]
    with pytest.raises(ValueError):
        mean_pairwise_cosine(torch.ones(1, 3))


def test_attention_only_path_matches_model_and_uniform_attention_collapses(real_model, short_text):
    lm = real_model
    inp = inputs_for(lm, short_text, 24)
    L = lm.info.layers
    full, path = attention_only_path(lm, inp)
    assert full.shape == path.shape == (L + 1, inp.n, lm.info.hidden)
    torch.testing.assert_close(full[0], path[0])
    with torch.no_grad():
        hs = lm.model(**inp.model_kwargs(), output_hidden_states=True).hidden_states
    # block outputs are the model's hidden states (a causal LM's last one is after its final norm)
    upto = L if lm.info.causal else L + 1
    torch.testing.assert_close(full[:upto], torch.stack(hs[:upto])[:, 0].float(), atol=1e-4, rtol=1e-4)
    if not lm.info.causal:
        # planted: uniform attention makes every token the mean of the values -> rank 1 after one layer
        with Capture(lm.model, layers=[], edit_probs=lambda layer, p: torch.full_like(p, 1 / p.shape[-1])):
            _, upath = attention_only_path(lm, inp)
        assert float(relative_residual(upath[1])) < 1e-4


def test_rank_collapse_on_real_models(real_model, short_text):
    lm = real_model
    r = run_rank_collapse(lm, inputs_for(lm, short_text, 24))
    assert len(r.full) == len(r.attention_only) == lm.info.layers + 1
    assert all(0 <= v <= 1 + 1e-5 for v in r.full + r.attention_only)
    assert len(r.findings()) == 3 and any("<h3>" in s for s in r.sections())
    json.dumps(r.to_json())
    with pytest.raises(ValueError, match="norm"):
        run_rank_collapse(lm, inputs_for(lm, short_text, 8), norm="sometimes")


def test_length_collapse_minilm_small(minilm, short_text):
    lm = minilm
    r = run_length_collapse(lm, inputs_for(lm, short_text, 8), lengths=(8, 32), taus=(0.9,), n_texts=3,
                            doc_tokens=48)
    assert r.taus == [0.9, 1.0] and r.best_tau in r.taus
    assert len(r.cosine) == 2 and all(len(c) == 2 and all(-1 <= v <= 1 for v in c) for c in r.cosine)
    assert 0 <= r.retrieval_base <= 1 and 0 <= r.retrieval_best <= 1
    assert len(r.findings()) == 3 and r.sections()
    json.dumps(r.to_json())
    with pytest.raises(ValueError, match="lengths"):
        run_length_collapse(lm, inputs_for(lm, short_text, 8), lengths=(8, 100000))


def test_length_collapse_applies_to_encoders_only(smollm2, short_text):
    assert not ANALYSES["length-collapse"].applies(smollm2.info)
    assert ANALYSES["rank-collapse"].applies(smollm2.info)
    with pytest.raises(ValueError, match="bidirectional"):
        run_length_collapse(smollm2, inputs_for(smollm2, short_text, 8))


@pytest.mark.slow
def test_length_collapse_default(minilm, short_text):
    r = run_length_collapse(minilm, inputs_for(minilm, short_text, 8))
    assert r.lengths == [16, 64, 256] and len(r.cosine) == len(r.taus)
