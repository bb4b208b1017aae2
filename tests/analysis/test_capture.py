"""The capture core against eager attention on the real models: probabilities to 1e-5, outputs unchanged."""

from __future__ import annotations

import pytest
import torch

from attnlab.analysis.capture import CAPTURABLE, Capture, attention_modules, head_gates

from .conftest import inputs_for


def _eager(lm, kwargs):
    lm.model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            return lm.model(**kwargs, output_attentions=True, output_hidden_states=True)
    finally:
        lm.model.set_attn_implementation("sdpa")


def _final(out):
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


def test_probs_equal_eager_and_output_unchanged(real_model):
    lm = real_model
    # a batch of two with padding, so masks (causal + padding, or padding alone) are exercised
    enc = lm.encode(["The quick brown fox jumps over the lazy dog near the river bank.", "Hello there"])
    with torch.no_grad():
        base = lm.model(**enc)
        with Capture(lm.model, what=CAPTURABLE) as cap:
            captured = lm.model(**enc)
    ref = _eager(lm, enc)
    assert torch.equal(_final(captured), _final(base))  # uncaptured path = stock SDPA, captured = side computation
    assert sorted(cap.records) == list(range(lm.info.layers))
    for layer, rec in cap.records.items():
        torch.testing.assert_close(rec["probs"], ref.attentions[layer], atol=1e-5, rtol=0)
    B, N = enc["input_ids"].shape
    rec = cap.records[0]
    assert rec["probs"].shape == (B, lm.info.heads, N, N)
    assert rec["q"].shape == (B, lm.info.heads, N, lm.info.head_dim)
    assert rec["k"].shape == rec["v"].shape == (B, lm.info.heads, N, lm.info.head_dim)  # KV repeated per query head
    assert rec["out"].shape == (B, N, lm.info.heads, lm.info.head_dim)
    # the implementation is restored on exit
    assert lm.model.config._attn_implementation == "sdpa"


def test_selection_and_explicit_gradients(real_model, short_text):
    lm = real_model
    inp = inputs_for(lm, short_text, 24)
    ref = _eager(lm, inp.model_kwargs())
    with Capture(lm.model, layers=[1], heads=[0, 2], rows=[-1, 3], explicit=True) as cap:
        out = lm.model(**inp.model_kwargs())
    rec = cap[1]
    assert sorted(cap.records) == [1]
    expect = ref.attentions[1][:, [0, 2]][:, :, [-1, 3]]
    torch.testing.assert_close(rec["probs"].detach(), expect, atol=1e-5, rtol=0)
    # explicit: the output is computed from the probabilities, so they receive gradients
    _final(out).sum().backward()
    full = cap.records[1]
    assert full["probs"].requires_grad
    torch.testing.assert_close(_final(out).detach(), _final(ref), atol=1e-4, rtol=1e-4)


def test_gates_ablate_and_give_gradients(smollm2, short_text):
    lm = smollm2
    inp = inputs_for(lm, short_text, 24)
    L, H = lm.info.layers, lm.info.heads
    with torch.no_grad():
        base = lm.model(**inp.model_kwargs()).logits
        ones = head_gates(L, H)
        with Capture(lm.model, layers=[], gates=ones):
            same = lm.model(**inp.model_kwargs()).logits
        off = head_gates(L, H)
        off[3, 4] = 0
        with Capture(lm.model, layers=[3], gates=off, what=("out",)) as cap:
            ablated = lm.model(**inp.model_kwargs()).logits
    torch.testing.assert_close(same, base, atol=1e-5, rtol=0)
    assert (ablated - base).abs().max() > 1e-3  # removing a head changes the model
    assert torch.all(cap[3]["out"][:, :, 4] == 0)
    g = head_gates(L, H, requires_grad=True)
    with Capture(lm.model, layers=[], gates=g):
        lm.model(**inp.model_kwargs()).logits.logsumexp(-1).mean().backward()
    assert g.grad is not None and g.grad.shape == (L, H) and torch.isfinite(g.grad).all() and g.grad.abs().sum() > 0


def test_streaming_keeps_nothing(minilm, short_text):
    inp = inputs_for(minilm, short_text, 32)
    seen = []
    with torch.no_grad(), Capture(minilm.model, on_layer=lambda r: seen.append((r.layer, r["probs"].shape)),
                                  keep=False):
        minilm.model(**inp.model_kwargs())
    assert [layer for layer, _ in seen] == list(range(minilm.info.layers))
    assert all(shape[-1] == inp.n for _, shape in seen)


def test_bad_arguments(minilm):
    with pytest.raises(ValueError, match="what: expected names"):
        Capture(minilm.model, what=("attn",))
    with pytest.raises(ValueError, match=r"gates: expected shape \(6, 12\)"):
        Capture(minilm.model, gates=torch.ones(3, 12))
    with pytest.raises(ValueError, match="layers: expected indices"):
        Capture(minilm.model, layers=[99])
    with pytest.raises(ValueError, match="attention modules"):
        attention_modules(torch.nn.Linear(2, 2))
    with Capture(minilm.model, layers=[0]) as cap:
        pass
    with pytest.raises(KeyError, match="was not captured"):
        cap[0]


def test_model_info_read_from_config(smollm2, minilm):
    s, m = smollm2.info, minilm.info
    assert (s.layers, s.heads, s.kv_heads, s.head_dim, s.causal) == (
        smollm2.model.config.num_hidden_layers, smollm2.model.config.num_attention_heads,
        smollm2.model.config.num_key_value_heads, smollm2.model.config.head_dim, True)
    assert s.kv_heads < s.heads  # SmolLM2 uses grouped-query attention
    assert (m.causal, m.kv_heads == m.heads) == (False, True)
    assert len(attention_modules(smollm2.model)) == s.layers


def test_shared_scores(smollm2, minilm, short_text):
    from attnlab.analysis.base import next_token_loss, sentence_embedding

    inp = inputs_for(smollm2, short_text, 24)
    with torch.no_grad():
        loss = next_token_loss(smollm2, inp.input_ids)
        ref = smollm2.model(input_ids=inp.input_ids, labels=inp.input_ids).loss  # transformers' own LM loss
        per = next_token_loss(smollm2, inp.input_ids, reduction="none")
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert per.shape == (1, inp.n - 1)
    with pytest.raises(ValueError, match="expected a causal LM"):
        next_token_loss(minilm, inp.input_ids)
    enc = minilm.encode(["a cat sits on the mat", "a cat is sitting on a mat", "quarterly tax returns"])
    with torch.no_grad():
        e = sentence_embedding(minilm, enc["input_ids"], enc["attention_mask"])
    sims = e @ e.T
    assert torch.allclose(e.norm(dim=-1), torch.ones(3)) and sims[0, 1] > sims[0, 2] + 0.2


def test_head_gates_off():
    g = head_gates(3, 4, off=[(0, 1), (2, 3)])
    assert g.sum() == 10 and g[0, 1] == 0 and g[2, 3] == 0 and not g.requires_grad
    assert head_gates(2, 2, requires_grad=True).requires_grad
    with pytest.raises(ValueError, match=r"off: expected \(layer, head\) within \(3, 4\)"):
        head_gates(3, 4, off=[(3, 0)])
