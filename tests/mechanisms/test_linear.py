"""mechanisms/linear.py (and memory.py, conv.py) beyond the conformance suite: scan forms agree on whole modules,
decoding keeps a constant-size state, and each mechanism computes what its paper says."""

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms import KVCache
from attnlab.mechanisms.linear import alibi_slopes, prefix_softmax_scan, windowed
from attnlab.ops import reference_attention
from attnlab.ops.linear import taylor_kernel

f64 = torch.float64

# mechanisms whose scan form is a constructor option: (id, extra kwargs)
SCAN_MECHANISMS = [
    ("linear-attention", {}),
    ("performer", dict(nb_features=16)),
    ("lightning-attention", dict(layer_idx=3, num_layers=6)),
    ("lightning-attention-2", {}),
    ("lightning-attention-2", dict(decay=False, activation="elu+1")),
    ("based", dict(feature_dim=4, window=3)),
    ("symmetric-taylor-attn", dict(qk_dim=3, order=3)),
    ("linear-log-normal", dict(block=3)),
    ("liger", dict(kv_heads=2, window=3)),
    ("ecoformer", dict(bits=6, anchors=5)),
    ("fast-factorizable", dict(p=2)),
    ("fast-factorizable", dict(p=1, normalize="none")),
    ("chela", dict(short_kernel=3, long_kernel=8, long_branches=2)),
]


def _pair(id, forms, **kw):
    """Modules of one mechanism in several scan forms, with identical parameters, in float64."""
    torch.manual_seed(0)
    base = attnlab.create(id, dim=32, heads=4, form=forms[0], **kw).double()
    out = [base]
    for form in forms[1:]:
        m = attnlab.create(id, dim=32, heads=4, form=form, **kw).double()
        m.load_state_dict(base.state_dict())
        out.append(m)
    return out


def _loss_and_grads(m, x, **call):
    y = m(x, **call)
    loss = (y * torch.linspace(-1, 1, y.shape[-1], dtype=f64)).square().sum()
    return y, torch.autograd.grad(loss, [x, *[p for p in m.parameters() if p.requires_grad]])


@pytest.mark.parametrize("id,kw", SCAN_MECHANISMS, ids=lambda p: p if isinstance(p, str) else "")
def test_scan_forms_agree_on_outputs_and_gradients(id, kw):
    mods = _pair(id, ["recurrent", "parallel", "chunked"], chunk_size=4, **kw)
    x = torch.randn(2, 11, 32, dtype=f64, requires_grad=True)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, 8:] = False
    y_ref, g_ref = _loss_and_grads(mods[0], x, causal=True, key_padding_mask=mask)
    for m in mods[1:]:
        y, g = _loss_and_grads(m, x, causal=True, key_padding_mask=mask)
        torch.testing.assert_close(y, y_ref, msg=f"{id} {m.form}")
        for a, b in zip(g, g_ref):
            torch.testing.assert_close(a, b, msg=f"{id} {m.form} gradient")


def _assert_same(got, want):
    """``(output, gradients)`` pairs from :func:`_loss_and_grads` agree."""
    torch.testing.assert_close(got[0], want[0])
    for a, b in zip(got[1], want[1]):
        torch.testing.assert_close(a, b)


def _state_numel(cache: KVCache) -> int:
    total = 0
    for value in cache.state.values():
        for t in (value if isinstance(value, tuple) else (value,)):
            if isinstance(t, torch.Tensor):
                total += t.numel()
    return total


DECODERS = ["linear-attention", "performer", "lightning-attention", "lightning-attention-2", "based", "aaren",
            "symmetric-taylor-attn", "linear-log-normal", "liger", "ecoformer", "fast-factorizable", "titans", "chela"]


@pytest.mark.parametrize("id", DECODERS)
def test_decoding_state_does_not_grow(id):
    spec = attnlab.get_spec(id)
    torch.manual_seed(0)
    m = attnlab.create(id, **spec.test_kwargs).double()
    cache = KVCache()
    x = torch.randn(1, 40, m.dim, dtype=f64)
    sizes = []
    with torch.no_grad():
        m(x[:, :8], causal=True, cache=cache)
        for t in range(8, 40):
            m(x[:, t: t + 1], causal=True, cache=cache)
            sizes.append(_state_numel(cache))
    assert cache.keys is None, f"{id} should not grow a key/value cache"
    # constant, or bounded by a window/block (Based, LLN+Diag keep < w keys): the second half never exceeds the first
    assert sizes[0] > 0 and max(sizes[16:]) <= max(sizes[:16]), f"{id}: state grows while decoding: {sizes}"
    assert cache.seq_len == 40


# -------------------------------------------------------------------------------------- linear attention


def test_linear_attention_is_elu_kernel_attention():
    torch.manual_seed(0)
    m = attnlab.create("linear-attention", dim=16, heads=2).double()
    x = torch.randn(1, 6, 16, dtype=f64)
    q, k, v = m.project(x)
    fq, fk = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    w = (fq @ fk.transpose(-1, -2)).tril()
    want = m.output((w / w.sum(-1, keepdim=True)) @ v)
    torch.testing.assert_close(m(x, causal=True), want)


# ----------------------------------------------------------------------------------------------- performer


def test_performer_approaches_softmax_as_features_grow():
    torch.manual_seed(0)
    x = torch.randn(1, 24, 16, dtype=f64) * 0.5
    errs = []
    for m_feat in (8, 4096):
        torch.manual_seed(1)
        m = attnlab.create("performer", dim=16, heads=2, nb_features=m_feat).double()
        q, k, v = m.project(x)
        exact = m.output(reference_attention(q, k, v))
        errs.append(((m(x) - exact).norm() / exact.norm()).item())
    assert errs[1] < errs[0] / 3 and errs[1] < 0.1, errs


def test_performer_redraw_changes_the_projection():
    m = attnlab.create("performer", dim=16, heads=2, nb_features=8)
    before = m.projection.clone()
    m.redraw(torch.Generator().manual_seed(5))
    assert not torch.equal(before, m.projection)


# ----------------------------------------------------------------------------------------------- lightning


def test_alibi_slopes():
    torch.testing.assert_close(alibi_slopes(8), torch.tensor([2.0 ** -i for i in range(1, 9)]))
    assert alibi_slopes(6).shape == (6,) and (alibi_slopes(6) > 0).all()


def test_lightning2_is_decayed_masked_attention():
    # O = ((Q K^T) * M) V with M_ts = lambda^(t-s), then the head-wise SRMSNorm and the output projection
    torch.manual_seed(0)
    m = attnlab.create("lightning-attention-2", dim=16, heads=2, chunk_size=3).double()
    x = torch.randn(1, 8, 16, dtype=f64)
    q, k, v = m.project(x)
    fq, fk = m.features(q, k)
    lam = torch.exp(-alibi_slopes(2).double())
    t = torch.arange(8)
    decay = lam.view(2, 1, 1) ** (t[:, None] - t[None, :]).clamp_min(0) * (t[:, None] >= t[None, :])
    o = ((fq @ fk.transpose(-1, -2)) * decay) @ v
    o = o * torch.rsqrt(o.square().mean(-1, keepdim=True) + 1e-6)
    torch.testing.assert_close(m(x, causal=True), m.output(o))


def test_lightning_decay_weakens_with_depth():
    first = attnlab.create("lightning-attention", dim=16, heads=4, layer_idx=0, num_layers=4)
    last = attnlab.create("lightning-attention", dim=16, heads=4, layer_idx=3, num_layers=4)
    torch.testing.assert_close(first.slopes, alibi_slopes(4) * (1 + 1e-5))
    assert (last.slopes < 1e-4 * first.slopes).all()  # the top layer barely forgets


# --------------------------------------------------------------------------------------------------- based


def test_based_linear_part_is_taylor_attention():
    torch.manual_seed(0)
    m = attnlab.create("based", dim=16, heads=2, feature_dim=4, parts="linear", chunk_size=3).double()
    x = torch.randn(2, 9, 16, dtype=f64)
    from attnlab.mechanisms.linear import KernelAttention
    q, k, v = KernelAttention.project(m, x)
    w = taylor_kernel(q @ k.transpose(-1, -2) / 2.0, 2)  # 1 + s + s^2/2 with s = q.k / sqrt(4)
    for causal in (False, True):
        ww = w.tril() if causal else w
        want = m.o_proj(((ww / ww.sum(-1, keepdim=True)) @ v).transpose(1, 2).reshape(2, 9, -1))
        torch.testing.assert_close(m(x, causal=causal), want)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [1, 3, 4, 20])
def test_sliding_window_is_banded_softmax(causal, window):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 10, 4, generator=g, dtype=f64) for _ in range(3))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[0, 7:] = False
    mask[1, 2] = False
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    band = (j > i - window) & ((j <= i) if causal else (j < i + window))
    want, want_lse = reference_attention(q, k, v, attn_mask=band, key_padding_mask=mask, return_lse=True)
    kw = dict(causal=causal, key_padding_mask=mask, cache=None, key="w")
    torch.testing.assert_close(windowed(q, k, v, window, **kw), want)
    got, lse = windowed(q, k, v, window, return_lse=True, **kw)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(lse, want_lse)


@pytest.mark.parametrize("window", [1, 4, 6])
def test_windowed_decoding_keeps_window_minus_one_keys_and_matches_the_full_band(window):
    """The cache holds only the last window - 1 keys; continuing from it (bottom-right band) equals the full call."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 11, 4, generator=g, dtype=f64) for _ in range(3))
    mask = torch.ones(1, 11, dtype=torch.bool)
    mask[0, 3] = False
    want = windowed(q, k, v, window, causal=True, key_padding_mask=mask, cache=None, key="w")
    cache, outs = KVCache(), []
    for a, b in ((0, 5), (5, 6), (6, 7), (7, 11)):
        outs.append(windowed(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], window, causal=True,
                             key_padding_mask=mask[:, a:b], cache=cache, key="w"))
        pk, pv, pm = cache.state["w"]
        assert pk.shape[2] == min(window - 1, b) and pm.shape[1] == pk.shape[2]
    torch.testing.assert_close(torch.cat(outs, dim=2), want)


def test_based_window_part_alone_is_exact_when_the_window_covers_the_sequence():
    torch.manual_seed(0)
    m = attnlab.create("based", dim=16, heads=2, parts="window", window=12).double()
    x = torch.randn(2, 12, 16, dtype=f64)
    for causal in (False, True):
        torch.testing.assert_close(m(x, causal=causal), m.reference_forward(x, causal=causal))
    short = attnlab.create("based", dim=16, heads=2, parts="window", window=4).double()
    short.load_state_dict(m.state_dict())
    assert not torch.allclose(short(x, causal=True), m(x, causal=True))  # a real window differs


def test_based_is_the_sum_of_its_parts():
    torch.manual_seed(0)
    both = attnlab.create("based", dim=16, heads=2, feature_dim=4, window=3).double()
    lin = attnlab.create("based", dim=16, heads=2, feature_dim=4, window=3, parts="linear").double()
    win = attnlab.create("based", dim=16, heads=2, feature_dim=4, window=3, parts="window").double()
    lin.load_state_dict(both.state_dict())
    win.load_state_dict(both.state_dict())
    x = torch.randn(1, 10, 16, dtype=f64)
    torch.testing.assert_close(both(x, causal=True), lin(x, causal=True) + win(x, causal=True))


# --------------------------------------------------------------------------------------------------- aaren


def test_prefix_scan_equals_every_prefix_softmax():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 13, generator=g, dtype=f64) * 3
    s[0, 0, 4] = float("-inf")  # a masked key
    s[1, 2, :3] = float("-inf")  # a row whose first prefixes see nothing
    v = torch.randn(2, 3, 13, 5, generator=g, dtype=f64)
    m, l, acc = prefix_softmax_scan(s, v)
    out = acc / torch.where(l == 0, torch.ones_like(l), l).unsqueeze(-1)
    for t in range(13):
        w = torch.softmax(s[..., : t + 1], dim=-1).nan_to_num(0.0)
        torch.testing.assert_close(out[..., t, :], (w.unsqueeze(-1) * v[..., : t + 1, :]).sum(-2))
    assert torch.isfinite(out).all() and out[1, 2, :3].abs().max() == 0


def test_aaren_scan_equals_recurrent_and_reference_with_gradients():
    torch.manual_seed(0)
    scan = attnlab.create("aaren", dim=16, heads=2).double()
    rec = attnlab.create("aaren", dim=16, heads=2, form="recurrent").double()
    rec.load_state_dict(scan.state_dict())
    x = torch.randn(2, 9, 16, dtype=f64, requires_grad=True)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, 6:] = False
    ya, ga = _loss_and_grads(scan, x, causal=True, key_padding_mask=mask)
    yb, gb = _loss_and_grads(rec, x, causal=True, key_padding_mask=mask)
    _assert_same((ya, ga), (yb, gb))
    torch.testing.assert_close(ya, scan.reference_forward(x, causal=True, key_padding_mask=mask))


def test_aaren_query_is_learned_not_tied_to_the_token():
    # the query is a parameter per head, not a projection of the input token (the paper's many-to-many RNN)
    m = attnlab.create("aaren", dim=16, heads=2).double()
    assert m.query.shape == (2, 8) and m.query.requires_grad
    assert not hasattr(m, "q_proj")


# ----------------------------------------------------------------------------------- symmetric Taylor (SATA)


def test_symmetric_taylor_converges_to_softmax_with_the_order():
    torch.manual_seed(0)
    x = torch.randn(1, 12, 16, dtype=f64)
    errs = []
    for order in (1, 2, 4, 8):
        torch.manual_seed(1)
        m = attnlab.create("symmetric-taylor-attn", dim=16, heads=2, qk_dim=3, order=order).double()
        q, k, v = m.project(x)
        exact = m.output(reference_attention(q, k, v, causal=True))
        errs.append(((m(x, causal=True) - exact).norm() / exact.norm()).item())
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-6, errs


def test_symmetric_taylor_state_uses_the_minimal_basis():
    m = attnlab.create("symmetric-taylor-attn", dim=32, heads=4, qk_dim=4, order=3)
    cache = KVCache()
    m(torch.randn(1, 5, 32), causal=True, cache=cache)
    assert cache.state["linear"].kv.shape == (1, 4, math.comb(4 + 3, 3), 8)


# ----------------------------------------------------------------------------------------- linear log-normal


def test_lln_temperatures_follow_the_moment_matching_fit():
    m = attnlab.create("linear-log-normal", dim=16, heads=2).double()
    torch.manual_seed(0)
    x = torch.randn(2, 30, 16, dtype=f64) * 3
    m.calibrate(x)
    q, k, _ = m.project(x)
    sq, sk = q.std(), k.std()
    tilde = ((sq ** 2 * sk ** 2 + 0.35487039130661086) / (2 * 0.14855178144710912)).sqrt()
    alpha, beta = m.temperatures()
    torch.testing.assert_close(alpha, tilde / sq)
    torch.testing.assert_close(beta, tilde / sk)


def test_lln_is_exp_kernel_attention_averaged_with_block_diagonal_softmax():
    torch.manual_seed(0)
    m = attnlab.create("linear-log-normal", dim=16, heads=2, block=4).double()
    x = torch.randn(1, 10, 16, dtype=f64)
    q, k, v = m.project(x)
    alpha, beta = m.temperatures()
    w = (torch.exp(alpha * q) @ torch.exp(beta * k).transpose(-1, -2)).tril()
    lln = (w / w.sum(-1, keepdim=True)) @ v
    i, j = torch.arange(10)[:, None], torch.arange(10)[None, :]
    diag = reference_attention(q, k, v, attn_mask=(i // 4 == j // 4) & (j <= i))
    torch.testing.assert_close(m(x, causal=True), m.output(0.5 * (lln + diag)))


def test_lln_survives_huge_temperatures_in_bf16():
    m = attnlab.create("linear-log-normal", dim=16, heads=2)
    m.sigma_q.fill_(0.05)  # alpha = beta ~ 30: exp(30 q) overflows bf16/fp32 without the key log-scale
    m.sigma_k.fill_(0.05)
    y = m.to(torch.bfloat16)(torch.randn(1, 2048, 16).to(torch.bfloat16) * 4, causal=True)
    assert torch.isfinite(y).all()


# ---------------------------------------------------------------------------------------------------- liger


def test_liger_reuses_an_attention_layers_weights_without_new_parameters():
    torch.manual_seed(0)
    gqa = attnlab.create("gqa", dim=32, heads=4, kv_heads=2)
    liger = attnlab.get_spec("liger").cls.from_attention(gqa, window=4)
    assert sum(p.numel() for p in liger.parameters()) == sum(p.numel() for p in gqa.parameters())
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert torch.equal(getattr(liger, name).weight, getattr(gqa, name).weight)
    y = liger(torch.randn(2, 10, 32), causal=True)
    assert y.shape == (2, 10, 32) and torch.isfinite(y).all()


def test_liger_is_gated_linear_attention_averaged_with_sliding_window():
    torch.manual_seed(0)
    m = attnlab.create("liger", dim=16, heads=2, window=3, chunk_size=4).double()
    x = torch.randn(1, 9, 16, dtype=f64)
    q, k, v = m.project(x)
    fq, fk = torch.softmax(q, -1), torch.softmax(k, -1)
    gate = torch.sigmoid(k) ** (1 / 16)  # exp(logsigmoid(k) / 16)
    S = torch.zeros(1, 2, 8, 8, dtype=f64)
    gla = []
    for t in range(9):  # S_t = diag(g_t) S_{t-1} + k_t v_t^T, o_t = q_t S_t
        S = gate[:, :, t, :, None] * S + fk[:, :, t, :, None] * v[:, :, t, None, :]
        gla.append(torch.einsum("bhf,bhfe->bhe", fq[:, :, t], S))
    gla = torch.stack(gla, dim=2)
    from attnlab.ops.positions import apply_rope, rope_cos_sin
    cos, sin = rope_cos_sin(torch.arange(9), 8, dtype=f64)
    i, j = torch.arange(9)[:, None], torch.arange(9)[None, :]
    swa = reference_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, attn_mask=(j <= i) & (j > i - 3))
    torch.testing.assert_close(m(x, causal=True), m.output(0.5 * (gla + swa)))


# ------------------------------------------------------------------------------------------ agent attention


def test_agent_pooling_matches_adaptive_avg_pool_and_ignores_padding():
    from attnlab.mechanisms.linear import adaptive_pool_matrix
    x = torch.randn(2, 11, 3, dtype=f64)
    for bins in (1, 4, 11, 15):
        P = adaptive_pool_matrix(torch.ones(2, 11, dtype=torch.bool), bins).double()
        want = torch.nn.functional.adaptive_avg_pool1d(x.transpose(1, 2), bins).transpose(1, 2)
        torch.testing.assert_close(P @ x, want)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 7:] = False
    P = adaptive_pool_matrix(mask, 4).double()
    torch.testing.assert_close((P @ x)[0], (adaptive_pool_matrix(mask[:1, :7], 4).double() @ x[:1, :7])[0])
    assert adaptive_pool_matrix(torch.zeros(1, 5, dtype=torch.bool), 3).abs().sum() == 0


@pytest.mark.parametrize("hw", [None, (3, 4)])
def test_agent_attention_is_two_softmax_steps_plus_dwc(hw):
    torch.manual_seed(0)
    m = attnlab.create("agent-attention", dim=16, heads=2, agents=4).double()
    x = torch.randn(1, 12, 16, dtype=f64)
    q, k, v = m.q_proj(x), m.k_proj(x), m.v_proj(x)
    if hw is None:
        agents = torch.nn.functional.adaptive_avg_pool1d(q.transpose(1, 2), 4).transpose(1, 2)
        grid = v.transpose(1, 2).reshape(1, 16, 1, 12)
    else:
        agents = torch.nn.functional.adaptive_avg_pool2d(q.transpose(1, 2).reshape(1, 16, 3, 4), 2)
        agents = agents.flatten(2).transpose(1, 2)
        grid = v.transpose(1, 2).reshape(1, 16, 3, 4)
    heads = lambda t: t.view(1, -1, 2, 8).transpose(1, 2)
    qh, kh, vh, ah = heads(q), heads(k), heads(v), heads(agents)
    agent_v = torch.softmax(ah @ kh.transpose(-1, -2) / math.sqrt(8), -1) @ vh
    o = torch.softmax(qh @ ah.transpose(-1, -2) / math.sqrt(8), -1) @ agent_v
    local = m.dwc(grid).flatten(2).transpose(1, 2)
    want = m.o_proj(o.transpose(1, 2).reshape(1, 12, 16) + local)
    torch.testing.assert_close(m(x, hw=hw), want)


# ------------------------------------------------------------------------------------------------------ RAT


def _rat_naive(m, x):
    """RAT from its equations, one token at a time."""
    B, N, _ = x.shape
    z, xv, g = m.zxg_proj(x).chunk(3, dim=-1)
    z, g = torch.sigmoid(z), torch.sigmoid(g + m.gate_bias)
    q, k = m.qk_proj(x).chunk(2, dim=-1)
    reps = m.heads // m.ngroups
    q, k = q.repeat(1, 1, reps), k.repeat(1, 1, reps)
    kt, vt = torch.zeros_like(k), torch.zeros_like(xv)
    for t in range(N):
        prev_k = kt[:, t - 1] if t % m.chunk else torch.zeros_like(k[:, 0])
        prev_v = vt[:, t - 1] if t % m.chunk else torch.zeros_like(xv[:, 0])
        kt[:, t] = g[:, t] * prev_k + (1 - g[:, t]) * k[:, t]
        vt[:, t] = g[:, t] * prev_v + (1 - g[:, t]) * xv[:, t]
    heads = lambda t: t.view(B, N, m.heads, m.head_dim).transpose(1, 2)
    qh, kh, vh = heads(q), heads(kt), heads(vt)
    out = torch.zeros_like(qh)
    for t in range(N):
        idx = [c * m.chunk + m.chunk - 1 for c in range(t // m.chunk)] + [t]  # previous chunk ends, then itself
        w = torch.softmax((qh[:, :, t: t + 1] @ kh[:, :, idx].transpose(-1, -2)) / math.sqrt(m.head_dim), -1)
        out[:, :, t] = (w @ vh[:, :, idx])[:, :, 0]
    return m.o_proj(z * out.transpose(1, 2).reshape(B, N, -1))


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_rat_matches_its_equations(chunk):
    torch.manual_seed(0)
    m = attnlab.create("rat-recurrence-attn", dim=16, heads=2, chunk=chunk).double()
    x = torch.randn(2, 11, 16, dtype=f64)
    torch.testing.assert_close(m(x, causal=True), _rat_naive(m, x))


def test_rat_kv_cache_grows_once_per_chunk():
    torch.manual_seed(0)
    m = attnlab.create("rat-recurrence-attn", dim=16, heads=2, chunk=4).double()
    cache = KVCache()
    x = torch.randn(1, 20, 16, dtype=f64)
    with torch.no_grad():
        out = [m(x[:, :5], causal=True, cache=cache)]
        out += [m(x[:, t: t + 1], causal=True, cache=cache) for t in range(5, 20)]
    assert cache.state["rat.chunks"][0].shape[2] == 20 // 4  # N / L keys, not N
    torch.testing.assert_close(torch.cat(out, 1), m(x, causal=True))


# ------------------------------------------------------------------------------------------------ ecoformer


def test_ecoformer_attends_by_hamming_affinity_of_codes():
    torch.manual_seed(0)
    m = attnlab.create("ecoformer", dim=16, heads=2, bits=8, anchors=6).double()
    x = torch.randn(1, 9, 16, dtype=f64)
    qk, _, v = m.project(x)
    h = m.codes(qk)
    assert set(h.unique().tolist()) <= {-1.0, 1.0}
    agree = (h.unsqueeze(-2) == h.unsqueeze(-3)).sum(-1).double()  # b - Hamming distance
    w = agree.tril()
    torch.testing.assert_close(m(x, causal=True), m.output((w / w.sum(-1, keepdim=True)) @ v))


def test_ecoformer_fit_hash_sets_buffers_and_gradients_pass_the_sign():
    torch.manual_seed(0)
    m = attnlab.create("ecoformer", dim=16, heads=2, bits=8, anchors=6).double()
    x = torch.randn(2, 20, 16, dtype=f64)
    sigma = m.sigma.clone()
    m.fit_hash(x, topk=3, iterations=20, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(sigma, m.sigma) and (m.sigma > 0).all()
    qk, _, _ = m.project(x)
    torch.testing.assert_close(m.kernel_features(qk).mean(dim=(0, 2)), torch.zeros(2, 6, dtype=f64), atol=1e-12,
                               rtol=0)  # centred on the fitting data
    m(x, causal=True).sum().backward()
    assert m.q_proj.weight.grad.abs().sum() > 0  # through the straight-through sign


# ----------------------------------------------------------------------------------------------------- FAST


@pytest.mark.parametrize("p", [1, 2])
def test_fast_is_normalised_polynomial_attention(p):
    torch.manual_seed(0)
    m = attnlab.create("fast-factorizable", dim=16, heads=2, p=p).double()
    x = torch.randn(1, 8, 16, dtype=f64)
    q, k, v = m.project(x)
    s = torch.nn.functional.normalize(q, dim=-1) @ torch.nn.functional.normalize(k, dim=-1).transpose(-1, -2)
    w = 1 + s + (s * s / 2 if p == 2 else 0)
    assert (w >= 0).all()  # unit-norm q and k keep even the first-order weights non-negative
    for causal in (False, True):
        ww = w.tril() if causal else w
        torch.testing.assert_close(m(x, causal=causal), m.output((ww / ww.sum(-1, keepdim=True)) @ v))


def test_fast_sequence_normalisation_is_non_causal():
    m = attnlab.create("fast-factorizable", dim=16, heads=2, normalize="sequence")
    x = torch.randn(1, 8, 16)
    assert m(x).shape == x.shape
    with pytest.raises(attnlab.UnsupportedError):
        m(x, causal=True)


# ---------------------------------------------------------------------------------------------------- InfSA


def test_infsa_sums_the_neumann_series():
    torch.manual_seed(0)
    inf = attnlab.create("infsa", dim=16, heads=2, rho=0.9).double()
    x = torch.randn(2, 10, 16, dtype=f64)
    for hops, tol in ((1, None), (3, None), (300, 1e-9)):
        m = attnlab.create("infsa", dim=16, heads=2, rho=0.9, hops=hops).double()
        m.load_state_dict(inf.state_dict())
        q, k, v = (t.view(2, 10, 2, 8).transpose(1, 2) for t in (m.q_proj(x), m.k_proj(x), m.v_proj(x)))
        A = torch.relu(q @ k.transpose(-1, -2) / 8)
        rA = 0.9 * A / A.flatten(-2).norm(dim=-1)[..., None, None]
        series = sum(torch.linalg.matrix_power(rA, j) for j in range(1, hops + 1)) @ v
        torch.testing.assert_close(m(x), m.o_proj(series.transpose(1, 2).reshape(2, 10, 16)))
        if tol is not None:  # the infinite series (a linear solve) is the limit of the truncated ones
            torch.testing.assert_close(inf(x), m(x), atol=tol, rtol=0)


def test_linear_infsa_pools_one_vector_from_an_energy_weighted_query():
    torch.manual_seed(0)
    m = attnlab.create("infsa", dim=16, heads=2, variant="linear", rho=0.8).double()
    x = torch.randn(1, 7, 16, dtype=f64)
    q, k, v = (t.view(1, 7, 2, 8).transpose(1, 2) / (8 ** 0.5 if i < 2 else 1)
               for i, t in enumerate((m.q_proj(x), m.k_proj(x), m.v_proj(x))))
    e = q.norm(dim=-1)
    q_bar = ((e / (e.sum(-1, keepdim=True) + 1e-6)).unsqueeze(-1) * q).sum(-2)
    a = torch.relu((q_bar.unsqueeze(-2) * k).sum(-1))
    a = a / (a.sum(-1, keepdim=True) + 1e-6)
    pooled = 0.8 * (a.unsqueeze(-1) * v).sum(-2)  # (1, 2, 8): one vector per head
    want = m.o_proj(pooled.reshape(1, 1, 16).expand(1, 7, 16))
    torch.testing.assert_close(m(x), want)


# -------------------------------------------------------------------------------------------------- CAS-ViT


def test_cas_vit_is_the_additive_token_mixer():
    torch.manual_seed(0)
    m = attnlab.create("cas-vit", dim=8, heads=1).double()
    x = torch.randn(2, 12, 8, dtype=f64)
    g = x.transpose(1, 2).reshape(2, 8, 3, 4)
    F_ = torch.nn.functional
    q, k, v = F_.conv2d(g, m.qkv.weight).chunk(3, dim=1)

    def phi(t, op):
        s, c = op[0], op[1]
        dw = F_.conv2d(t, s.dw.weight, s.dw.bias, padding=1, groups=8)
        t = t * torch.sigmoid(F_.conv2d(torch.relu(dw * s.norm.weight.view(1, -1, 1, 1)
                                                   + s.norm.bias.view(1, -1, 1, 1)), s.to_map.weight))
        return t * torch.sigmoid(F_.conv2d(t.mean((-2, -1), keepdim=True), c.fc.weight))

    mix = F_.conv2d(phi(q, m.oper_q) + phi(k, m.oper_k), m.dwc.weight, m.dwc.bias, padding=1, groups=8)
    out = F_.conv2d(mix * v, m.proj.weight, m.proj.bias, padding=1, groups=8)
    torch.testing.assert_close(m(x, hw=(3, 4)), out.flatten(2).transpose(1, 2))
    with pytest.raises(attnlab.UnsupportedError):
        m(x)  # 2-D only


# --------------------------------------------------------------------------------------------------- titans


def _memory_inputs(seed=0, B=2, H=3, N=13, D=4):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, N, D, generator=g, dtype=f64) for _ in range(3))
    k = torch.nn.functional.normalize(k, dim=-1)
    theta = torch.rand(B, H, N, generator=g, dtype=f64) * 0.5
    log_eta = torch.nn.functional.logsigmoid(torch.randn(B, H, N, generator=g, dtype=f64))
    log_keep = torch.nn.functional.logsigmoid(torch.randn(B, H, N, generator=g, dtype=f64) + 2)
    return q, k, v, theta, log_eta, log_keep


@pytest.mark.parametrize("chunk,offset", [(1, 0), (3, 0), (4, 2), (20, 5)])
def test_neural_memory_closed_form_equals_recurrence_with_gradients(chunk, offset):
    from attnlab.mechanisms.memory import MemoryState, neural_memory
    ins = [t.requires_grad_() for t in _memory_inputs()]
    g = torch.Generator().manual_seed(1)
    state = MemoryState(*(torch.randn(2, 3, 4, 4, generator=g, dtype=f64).requires_grad_() for _ in range(3)))
    res = {}
    for form in ("recurrent", "chunked"):
        y, st = neural_memory(*ins, chunk=chunk, state=state, offset=offset, form=form, return_state=True)
        loss = y.square().sum() + st.W.sum() + st.S.square().sum()
        res[form] = (y, st, torch.autograd.grad(loss, ins + list(state), allow_unused=True))
    (ya, sa, ga), (yb, sb, gb) = res["recurrent"], res["chunked"]
    torch.testing.assert_close(yb, ya)
    for a, b in zip(sb, sa):
        torch.testing.assert_close(b, a)
    for a, b in zip(gb, ga):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b)


def test_neural_memory_with_unit_chunks_is_online_gradient_descent():
    from attnlab.mechanisms.memory import neural_memory
    q, k, v, theta, log_eta, log_keep = _memory_inputs(N=7)
    W = torch.zeros(2, 3, 4, 4, dtype=f64, requires_grad=True)
    S = torch.zeros(2, 3, 4, 4, dtype=f64)
    ys = []
    for t in range(7):  # the paper's rule, with autograd computing the gradient of the memory loss
        Wt = W.detach().requires_grad_()
        loss = ((Wt @ k[:, :, t, :, None]).squeeze(-1) - v[:, :, t]).square().sum()
        (grad,) = torch.autograd.grad(loss, Wt)
        S = log_eta[..., t, None, None].exp() * S - theta[..., t, None, None] * grad
        W = log_keep[..., t, None, None].exp() * W.detach() + S
        ys.append((W @ q[:, :, t, :, None]).squeeze(-1))
    torch.testing.assert_close(neural_memory(q, k, v, theta, log_eta, log_keep, chunk=1), torch.stack(ys, 2))


def test_neural_memory_memorises_at_test_time():
    from attnlab.mechanisms.memory import neural_memory
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(1, 1, 1, 8, generator=g, dtype=f64), dim=-1).expand(1, 1, 40, 8)
    v = torch.randn(1, 1, 1, 8, generator=g, dtype=f64).expand(1, 1, 40, 8)
    ones = torch.ones(1, 1, 40, dtype=f64)
    # no momentum, no forgetting; 4 gradient steps of 2 * 0.125 per chunk: one chunk fits the pair exactly
    y = neural_memory(k, k, v, 0.125 * ones, -50 * ones, 0 * ones, chunk=4)
    assert (y[0, 0, -1] - v[0, 0, 0]).abs().max() < 1e-9  # reading the key returns the value it was taught
    assert (y[0, 0, 0] - v[0, 0, 0]).abs().max() > 0.1


def test_titans_forms_agree_on_outputs_and_gradients():
    mods = _pair("titans", ["recurrent", "chunked"], window=3, chunk=3, persistent=2)
    x = torch.randn(2, 10, 32, dtype=f64, requires_grad=True)
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 7:] = False
    ya, ga = _loss_and_grads(mods[0], x, causal=True, key_padding_mask=mask)
    yb, gb = _loss_and_grads(mods[1], x, causal=True, key_padding_mask=mask)
    _assert_same((yb, gb), (ya, ga))


def test_titans_attention_sees_persistent_tokens_and_the_window():
    torch.manual_seed(0)
    m = attnlab.create("titans", dim=16, heads=2, window=2, persistent=3).double()
    x = torch.randn(1, 6, 16, dtype=f64)
    q, k, v = (t.view(1, 6, 2, 8).transpose(1, 2) for t in m.attn_qkv(x).chunk(3, -1))
    _, pk, pv = (t.view(1, 3, 2, 8).transpose(1, 2) for t in m.attn_qkv(m.persistent_tokens[None]).chunk(3, -1))
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    keep = torch.cat([torch.ones(6, 3, dtype=torch.bool), (j <= i) & (j > i - 2)], dim=1)
    want = reference_attention(q, torch.cat([pk, k], 2), torch.cat([pv, v], 2), attn_mask=keep)
    torch.testing.assert_close(m.attention(x, None, None), want)


# ================================================================================================== chela


def _naive_conv(x, w, causal):
    """``y_t = sum_j w[:, j] x_{t - j + c}`` written out (c = 0 causal, (K - 1) // 2 centred)."""
    K = w.shape[1]
    c = 0 if causal else (K - 1) // 2
    y = torch.zeros_like(x)
    for t in range(x.shape[1]):
        for j in range(K):
            if 0 <= t - j + c < x.shape[1]:
                y[:, t] += w[:, j] * x[:, t - j + c]
    return y


@pytest.mark.parametrize("causal", [False, True])
def test_chela_is_short_long_convolution_then_gated_linear_attention(causal):
    """The whole layer written out from its equations, materialising the attention matrix."""
    torch.manual_seed(0)
    m = attnlab.create("chela", dim=16, heads=2, short_kernel=3, long_kernel=6, long_branches=3).double()
    x = torch.randn(2, 9, 16, dtype=f64)
    s = torch.nn.functional.silu(_naive_conv(x, m.short_weight, causal) + m.short_bias)
    long_w = sum(torch.nn.functional.pad(w, (0, 6 - w.shape[1])) for w in m.long_weights)
    assert [w.shape[1] for w in m.long_weights] == [6, 3, 1]
    z = _naive_conv(s, long_w, causal)
    heads = lambda t: t.view(2, 9, 2, 8).transpose(1, 2)  # noqa: E731
    fq = torch.nn.functional.elu(heads(m.q_proj(z))) + 1
    fk = torch.nn.functional.elu(heads(m.k_proj(z))) + 1
    w = fq @ fk.transpose(-1, -2)
    w = w.tril() if causal else w
    o = ((w / w.sum(-1, keepdim=True)) @ heads(m.v_proj(x))).transpose(1, 2).reshape(2, 9, 16)
    want = m.o_proj(o * torch.sigmoid(m.gate_proj(x)))
    torch.testing.assert_close(m(x, causal=causal), want)


@pytest.mark.parametrize("causal", [False, True])
def test_chela_fft_and_direct_convolutions_agree_on_outputs_and_gradients(causal):
    mods = []
    for method in ("direct", "fft"):
        torch.manual_seed(0)
        mods.append(attnlab.create("chela", dim=16, heads=2, long_kernel=12, conv_method=method).double())
    x = torch.randn(2, 17, 16, dtype=f64, requires_grad=True)
    (y0, g0), (y1, g1) = (_loss_and_grads(m, x, causal=causal) for m in mods)
    _assert_same((y1, g1), (y0, g0))


def test_chela_decoding_state_is_bounded_by_the_kernels():
    """Decoding keeps K_short - 1 and K_long - 1 convolution inputs plus the scan state, whatever the context."""
    torch.manual_seed(0)
    m = attnlab.create("chela", dim=16, heads=2, short_kernel=3, long_kernel=5).double()
    x = torch.randn(1, 30, 16, dtype=f64)
    cache = KVCache()
    with torch.no_grad():
        full = m(x, causal=True)
        parts = [m(x[:, :2], causal=True, cache=cache)]  # shorter than the kernels: partial history
        parts += [m(x[:, t: t + 1], causal=True, cache=cache) for t in range(2, 30)]
    hs, hl = cache.state["chela.conv"]
    assert hs.shape[1] == 2 and hl.shape[1] == 4
    torch.testing.assert_close(torch.cat(parts, dim=1), full)


def test_chela_long_kernel_reaches_back_k_minus_one_tokens():
    """Causal: token t's q/k see inputs t - (K_short - 1) - (K_long - 1) .. t through the two convolutions."""
    torch.manual_seed(0)
    m = attnlab.create("chela", dim=16, heads=2, short_kernel=2, long_kernel=4).double()
    x = torch.randn(1, 12, 16, dtype=f64)
    z = m.convolve(x, causal=True, key_padding_mask=None, cache=None)
    x2 = x.clone()
    x2[:, 3] += 1.0
    z2 = m.convolve(x2, causal=True, key_padding_mask=None, cache=None)
    changed = (z2 - z).abs().amax(dim=-1)[0] > 0
    assert changed.nonzero().flatten().tolist() == [3, 4, 5, 6, 7]  # reach 1 + 3 = 4 tokens after position 3
