"""ops/linear.py: the three scan forms agree (outputs and gradients) and match the definition; feature maps
compute the kernels they claim; padding, decoding state and numerics are safe."""

import importlib.util
import math
import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from attnlab.ops.linear import (
    FORMS, LinearState, binary_hash_features, elu_plus_one, exp_features, linear_attention, orthogonal_gaussian,
    positive_random_features, relu_features, taylor_feature_dim, taylor_features, taylor_kernel,
)

f64 = torch.float64


def _inputs(B=2, Hq=4, Hkv=2, N=11, Fd=5, E=3, gate=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.rand(B, Hq, N, Fd, generator=g, dtype=f64)
    k = torch.rand(B, Hkv, N, Fd, generator=g, dtype=f64)
    v = torch.randn(B, Hkv, N, E, generator=g, dtype=f64)
    lg = None
    if gate == "scalar":
        lg = F.logsigmoid(torch.randn(B, Hkv, N, generator=g, dtype=f64) + 1)
    elif gate == "feature":
        lg = F.logsigmoid(torch.randn(B, Hkv, N, Fd, generator=g, dtype=f64) + 1)
    elif gate == "constant":
        lg = -torch.linspace(0.05, 0.7, Hkv, dtype=f64).view(1, Hkv, 1)
    state = LinearState(torch.rand(B, Hkv, Fd, E, generator=g, dtype=f64), torch.rand(B, Hkv, Fd, generator=g, dtype=f64))
    return q, k, v, lg, state


def naive(q, k, v, *, causal, log_gate=None, normalize=True, mask=None, eps=1e-6):
    """The definition, one (i, j) pair at a time: o_i = sum_j w_ij (q_i . k_j) v_j / sum_j w_ij (q_i . k_j)."""
    B, Hq, N, Fd = q.shape
    Hkv = k.shape[1]
    G = Hq // Hkv
    out = torch.zeros(B, Hq, N, v.shape[-1], dtype=f64)
    for b in range(B):
        for h in range(Hq):
            hk = h // G
            for i in range(N):
                num, den = 0, 0
                for j in range(k.shape[2]):
                    if (causal and j > i) or (mask is not None and not mask[b, j]):
                        continue
                    w = torch.ones(Fd, dtype=f64)
                    if log_gate is not None:
                        for t in range(j + 1, i + 1):
                            if mask is None or mask[b, t]:
                                lg = log_gate.expand(B, Hkv, N, Fd) if log_gate.dim() == 4 else \
                                    log_gate.expand(B, Hkv, N)[..., None].expand(B, Hkv, N, Fd)
                                w = w * lg[b, hk, t].exp()
                    kern = (q[b, h, i] * k[b, hk, j] * w).sum()
                    num = num + kern * v[b, hk, j]
                    den = den + kern
                out[b, h, i] = num / max(den, eps) if normalize else num
    return out


@pytest.mark.parametrize("gate", [None, "constant", "scalar", "feature"])
@pytest.mark.parametrize("normalize", [True, False])
def test_forms_match_the_definition(gate, normalize):
    q, k, v, lg, _ = _inputs(N=7, gate=gate)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[0, 2] = False  # a hole: the padded token is skipped, its gate included
    mask[1, 5:] = False
    want = naive(q, k, v, causal=True, log_gate=lg, normalize=normalize, mask=mask)
    for form in FORMS:
        got = linear_attention(q, k, v, causal=True, log_gate=lg, normalize=normalize, key_padding_mask=mask,
                               form=form, chunk_size=3)
        torch.testing.assert_close(got, want, msg=f"{form}")
    got = linear_attention(q, k, v, causal=False, normalize=normalize, key_padding_mask=mask)
    torch.testing.assert_close(got, naive(q, k, v, causal=False, normalize=normalize, mask=mask))


@pytest.mark.parametrize("gate", [None, "constant", "scalar", "feature"])
@pytest.mark.parametrize("reset_every,offset", [(None, 0), (4, 0), (4, 3), (5, 10)])
def test_forms_agree_on_outputs_states_and_gradients(gate, reset_every, offset):
    q, k, v, lg, s0 = _inputs(gate=gate)
    leaves = [t.requires_grad_() for t in (q, k, v, s0.kv, s0.z) + ((lg,) if lg is not None else ())]
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 4] = False
    mask[1, 8:] = False
    results = {}
    for form, chunk in [("recurrent", 1), ("parallel", 1), ("chunked", 3), ("chunked", 4), ("chunked", 64)]:
        o, st = linear_attention(q, k, v, causal=True, log_gate=lg, key_padding_mask=mask, initial_state=s0,
                                 return_state=True, form=form, chunk_size=chunk, reset_every=reset_every, offset=offset)
        loss = (o * torch.linspace(-1, 1, o.shape[-1], dtype=f64)).square().sum() + st.kv.sum() + st.z.square().sum()
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)  # a reset at the first token drops the state
        results[(form, chunk)] = (o, st, [torch.zeros_like(t) if gr is None else gr for t, gr in zip(leaves, grads)])
    o_ref, st_ref, g_ref = results[("recurrent", 1)]
    for key, (o, st, grads) in results.items():
        torch.testing.assert_close(o, o_ref, msg=f"{key} output")
        torch.testing.assert_close(st.kv, st_ref.kv, msg=f"{key} state")
        torch.testing.assert_close(st.z, st_ref.z, msg=f"{key} normaliser")
        for a, b in zip(grads, g_ref):
            torch.testing.assert_close(a, b, msg=f"{key} gradient")


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("gate", [None, "scalar", "feature"])
def test_state_carries_a_sequence_across_calls(form, gate):
    q, k, v, lg, _ = _inputs(N=12, gate=gate)
    kw = dict(causal=True, form=form, chunk_size=4)
    full = linear_attention(q, k, v, log_gate=lg, **kw)
    state, parts = None, []
    for s, e in [(0, 5), (5, 6), (6, 12)]:
        sl = (lambda t: None if t is None else t[:, :, s:e])
        o, state = linear_attention(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], log_gate=sl(lg), initial_state=state,
                                    return_state=True, **kw)
        parts.append(o)
    torch.testing.assert_close(torch.cat(parts, dim=2), full)


@pytest.mark.parametrize("scale", [1.0, 300.0])
def test_key_log_weights_agree_across_forms_and_equal_explicit_weights(scale):
    q, k, v, _, s0 = _inputs(N=11)
    g = torch.Generator().manual_seed(3)
    a = (torch.randn(2, 2, 11, generator=g, dtype=f64) * scale).requires_grad_()
    s0 = LinearState(s0.kv, s0.z, torch.tensor([[0.5, -1.0], [2.0, 0.0]], dtype=f64) * scale)
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[0, 3] = False
    mask[1, 7:] = False
    leaves = [q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), a]
    res = {}
    for form, chunk in [("recurrent", 1), ("parallel", 1), ("chunked", 3), ("chunked", 64)]:
        o, st = linear_attention(q, k, v, causal=True, key_log_weight=a, key_padding_mask=mask, initial_state=s0,
                                 return_state=True, form=form, chunk_size=chunk)
        assert torch.isfinite(o).all()
        loss = (o * torch.linspace(-1, 1, 3, dtype=f64)).square().sum()
        res[form, chunk] = (o, st, torch.autograd.grad(loss, leaves))
    o_ref, st_ref, g_ref = res["recurrent", 1]
    for key, (o, st, grads) in res.items():
        torch.testing.assert_close(o, o_ref, msg=str(key))
        torch.testing.assert_close(st.m, st_ref.m, msg=str(key))
        torch.testing.assert_close(st.kv, st_ref.kv, msg=str(key))
        for x, y in zip(grads, g_ref):
            torch.testing.assert_close(x, y, msg=f"{key} gradient")
    if scale == 1.0:  # small scale: the same as multiplying exp(a) into the features
        kw = k * a.exp().unsqueeze(-1)
        init = LinearState(s0.kv * s0.m.exp()[..., None, None], s0.z * s0.m.exp()[..., None])
        want = linear_attention(q, kw, v, causal=True, key_padding_mask=mask, initial_state=init)
        torch.testing.assert_close(o_ref, want)
    # continuing from the returned state equals one call
    o1, st1 = linear_attention(q[:, :, :6], k[:, :, :6], v[:, :, :6], causal=True, key_log_weight=a[..., :6],
                               return_state=True)
    o2 = linear_attention(q[:, :, 6:], k[:, :, 6:], v[:, :, 6:], causal=True, key_log_weight=a[..., 6:],
                          initial_state=st1)
    torch.testing.assert_close(torch.cat([o1, o2], 2), linear_attention(q, k, v, causal=True, key_log_weight=a))


def test_key_log_weights_non_causal_match_softmax_weighting():
    q, k, v, _, _ = _inputs(N=9)
    a = torch.randn(2, 2, 9, dtype=f64) * 200
    ones = torch.ones_like(q[..., :1]), torch.ones_like(k[..., :1])
    got = linear_attention(*ones, v, causal=False, key_log_weight=a)
    want = torch.softmax(a, dim=-1).repeat_interleave(2, 1).unsqueeze(-2) @ v.repeat_interleave(2, 1)
    torch.testing.assert_close(got, want.expand_as(got))


def test_resets_make_independent_segments():
    q, k, v, lg, _ = _inputs(N=12, gate="scalar")
    out = linear_attention(q, k, v, causal=True, log_gate=lg, reset_every=4)
    for s in range(0, 12, 4):
        alone = linear_attention(q[:, :, s:s + 4], k[:, :, s:s + 4], v[:, :, s:s + 4], causal=True,
                                 log_gate=lg[:, :, s:s + 4])
        torch.testing.assert_close(out[:, :, s:s + 4], alone)


def test_padded_keys_are_skipped_as_if_removed():
    q, k, v, lg, _ = _inputs(N=9, gate="scalar")
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[:, 3] = False
    out = linear_attention(q, k, v, causal=True, log_gate=lg, key_padding_mask=mask)
    keep = mask[0]
    alone = linear_attention(q[:, :, keep], k[:, :, keep], v[:, :, keep], causal=True, log_gate=lg[:, :, keep])
    torch.testing.assert_close(out[:, :, keep], alone)


def test_empty_rows_return_zero_not_nan():
    q, k, v, _, _ = _inputs(N=6)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    for causal in (False, True):
        out = linear_attention(q, k, v, causal=causal, key_padding_mask=mask)
        assert torch.equal(out, torch.zeros_like(out))
    # relu features that are all zero: the kernel vanishes, the output is 0
    zero = relu_features(-q)
    out = linear_attention(zero, k, v, causal=True)
    assert torch.isfinite(out).all() and out.abs().max() == 0


def test_strong_per_feature_gates_do_not_overflow():
    # exp(-b_j) factorisations overflow when the gates sum below -88 in a chunk; the scan must not
    q, k, v, _, _ = _inputs(B=1, Hq=1, Hkv=1, N=64, Fd=4, E=2)
    lg = torch.full((1, 1, 64, 4), -30.0, dtype=torch.float32)
    lg[..., 0] = -0.01
    a = linear_attention(q.float(), k.float(), v.float(), causal=True, log_gate=lg, form="chunked", chunk_size=32)
    b = linear_attention(q, k, v, causal=True, log_gate=lg.double(), form="recurrent")
    assert torch.isfinite(a).all()
    torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=1e-4)


def test_bf16_long_sequence_is_finite():
    g = torch.Generator().manual_seed(0)
    n = 16384
    q = torch.randn(1, 2, n, 8, generator=g).to(torch.bfloat16) * 3
    k = torch.randn(1, 2, n, 8, generator=g).to(torch.bfloat16) * 3
    v = torch.randn(1, 2, n, 8, generator=g).to(torch.bfloat16)
    fk, a = exp_features(k, 8.0, return_log_scale=True)  # exp(+-100): far outside bfloat16 without the log-scale
    for fq, fk, a in [(elu_plus_one(q), elu_plus_one(k), None), (exp_features(q, 8.0, row_shift=True), fk, a)]:
        o = linear_attention(fq, fk, v, causal=True, chunk_size=256, key_log_weight=a)
        assert o.dtype == torch.bfloat16 and torch.isfinite(o).all()
    o = linear_attention(q, k, v, causal=True, normalize=False, log_gate=torch.tensor([-0.01, -1e-6]).view(1, 2, 1))
    assert torch.isfinite(o).all()


def test_grouped_query_heads_share_their_kv_state():
    q, k, v, _, _ = _inputs(Hq=4, Hkv=2)
    out = linear_attention(q, k, v, causal=True)
    rep = linear_attention(q, k.repeat_interleave(2, dim=1), v.repeat_interleave(2, dim=1), causal=True)
    torch.testing.assert_close(out, rep)


def test_errors_name_expected_and_received():
    q, k, v, _, _ = _inputs()
    with pytest.raises(ValueError, match="expected"):
        linear_attention(q, k[..., :2], v)
    with pytest.raises(ValueError, match="expected"):
        linear_attention(q, k, v, form="fast")
    with pytest.raises(ValueError, match="expected"):
        linear_attention(q, k, v, causal=False, log_gate=torch.zeros(1, 2, 1))
    with pytest.raises(ValueError, match="expected"):
        linear_attention(q, k, v, causal=True, log_gate=torch.zeros(3, 2, 11))
    with pytest.raises(ValueError, match="expected"):
        linear_attention(q, k, v, key_padding_mask=torch.ones(2, 5, dtype=torch.bool))


# ------------------------------------------------------------------------------------------- feature maps


@pytest.mark.parametrize("order", [0, 1, 2, 3])
@pytest.mark.parametrize("symmetric", [False, True])
def test_taylor_features_compute_the_taylor_kernel(order, symmetric):
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(6, 4, generator=g, dtype=f64), torch.randn(6, 4, generator=g, dtype=f64)
    fx, fy = taylor_features(x, order, symmetric=symmetric), taylor_features(y, order, symmetric=symmetric)
    assert fx.shape[-1] == taylor_feature_dim(4, order, symmetric=symmetric)
    torch.testing.assert_close(fx @ fy.T, taylor_kernel(x @ y.T, order))


def test_symmetric_taylor_basis_is_minimal():
    # one feature per monomial: C(d + P, P) instead of sum_p d^p
    assert taylor_feature_dim(8, 3, symmetric=True) == math.comb(11, 3) == 165
    assert taylor_feature_dim(8, 3) == 1 + 8 + 64 + 512
    # and the high-order Taylor kernel approaches exp on small logits
    s = torch.linspace(-1, 1, 9, dtype=f64)
    assert (taylor_kernel(s, 8) - s.exp()).abs().max() < 1e-5


def test_positive_random_features_estimate_the_softmax_kernel():
    g = torch.Generator().manual_seed(0)
    d, m = 4, 8192
    x, y = torch.randn(5, d, generator=g, dtype=f64) * 0.4, torch.randn(7, d, generator=g, dtype=f64) * 0.4
    proj = orthogonal_gaussian(m, d, generator=g, dtype=f64)
    fx, (fy, a) = (positive_random_features(x, proj, is_query=True),
                   positive_random_features(y, proj, is_query=False, return_log_scale=True))
    assert (fy > 0).all() and (fy.amax(-1) == 1).all()  # key features carry their scale in a
    torch.testing.assert_close(fy * a.exp().unsqueeze(-1), positive_random_features(y, proj, is_query=False))
    fy = fy * a.exp().unsqueeze(-1)
    # the stabilisers are a per-query and a global constant: they cancel in each normalised row, which estimates
    # the softmax (the estimator's variance grows like exp(|x + y|^2), hence the small inputs)
    est = fx @ fy.T
    est = est / est.sum(-1, keepdim=True)
    torch.testing.assert_close(est, torch.softmax(x @ y.T, dim=-1), atol=0.01, rtol=0.03)
    # without the stabilisers the features estimate exp(x . y) itself
    raw = lambda t: torch.exp(t @ proj.T - t.square().sum(-1, keepdim=True) / 2) / math.sqrt(m)
    torch.testing.assert_close(raw(x) @ raw(y).T, (x @ y.T).exp(), atol=0, rtol=0.05)


def test_orthogonal_gaussian_rows_are_orthogonal_within_blocks():
    w = orthogonal_gaussian(12, 6, generator=torch.Generator().manual_seed(1), dtype=f64)
    gram = w[:6] @ w[:6].T
    torch.testing.assert_close(gram - torch.diag(torch.diag(gram)), torch.zeros(6, 6, dtype=f64), atol=1e-10, rtol=0)


def test_binary_hash_kernel_counts_agreeing_bits():
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 2, (5, 16), generator=g).double() * 2 - 1
    b = torch.randint(0, 2, (3, 16), generator=g).double() * 2 - 1
    agree = (a[:, None, :] == b[None, :, :]).sum(-1).double()
    torch.testing.assert_close(binary_hash_features(a) @ binary_hash_features(b).T, agree)


def test_exp_feature_row_shift_cancels_in_normalised_attention():
    q, k, v, _, _ = _inputs()
    a = linear_attention(exp_features(q, 2.0), exp_features(k, 2.0), v, causal=True)
    b = linear_attention(exp_features(q, 2.0, row_shift=True), exp_features(k, 2.0), v, causal=True)
    torch.testing.assert_close(a, b)


def test_elu_plus_one_is_non_negative():
    x = torch.linspace(-50, 50, 101, dtype=f64)
    assert (elu_plus_one(x) >= 0).all() and (elu_plus_one(x[x > -30]) > 0).all()


# ----------------------------------------------------------------------------- fla's naive references (optional)


def _fla_naive(name: str):
    """Load fla's pure-PyTorch naive.py by path (fla.ops needs triton; its naive files need only torch/einops).

    Looks in ATTNLAB_FLA_DIR (a checkout of flash-linear-attention) or an installed ``fla`` package; skips the
    test when neither exists.
    """
    root = os.environ.get("ATTNLAB_FLA_DIR")
    if root:
        path = Path(root) / "fla" / "ops" / name / "naive.py"
    else:
        spec = importlib.util.find_spec("fla")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("flash-linear-attention (fla) is not installed; set ATTNLAB_FLA_DIR to a checkout")
        path = Path(list(spec.submodule_search_locations)[0]) / "ops" / name / "naive.py"
    if not path.exists():
        pytest.skip(f"{path} not found")
    mod_spec = importlib.util.spec_from_file_location(f"fla_naive_{name}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    return mod


def test_matches_fla_naive_linear_attention():
    fla = _fla_naive("linear_attn")
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 2, 128, 2, 16
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    fq, fk = elu_plus_one(q), elu_plus_one(k)
    want, _ = fla.naive_recurrent_linear_attn(fq, fk, v, scale=1.0, normalize=True)
    ours = linear_attention(*(t.transpose(1, 2) for t in (fq, fk, v)), causal=True, eps=1e-10).transpose(1, 2)
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-4)
    want = fla.naive_chunk_linear_attn(q, k, v, scale=1.0, normalize=False)
    ours = linear_attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, normalize=False).transpose(1, 2)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


def test_matches_fla_naive_decay_attention_as_in_lightning():
    fla = _fla_naive("simple_gla")
    g = torch.Generator().manual_seed(0)
    B, T, H, D = 1, 100, 4, 8
    q, k, v = (torch.randn(B, T, H, D, generator=g) for _ in range(3))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    gate = (-slopes).view(1, 1, H).expand(B, T, H)
    want, _ = fla.naive_recurrent_simple_gla(q, k, v, gate, scale=1.0)
    ours = linear_attention(*(t.transpose(1, 2) for t in (q, k, v)), causal=True, normalize=False,
                            log_gate=-slopes.view(1, H, 1)).transpose(1, 2)
    torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-4)


def test_matches_fla_naive_based():
    fla = _fla_naive("based")
    g = torch.Generator().manual_seed(0)
    B, H, T, D = 2, 2, 64, 16
    q, k, v = (torch.randn(B, H, T, D, generator=g) for _ in range(3))
    want = fla.naive_parallel_based(q, k, v, use_norm=True)
    s = D ** -0.25
    ours = linear_attention(taylor_features(q * s, 2), taylor_features(k * s, 2), v, causal=True, eps=1e-6)
    torch.testing.assert_close(ours, want.to(ours.dtype), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------- depthwise convolution


@pytest.mark.parametrize("taps", [6, 7])
@pytest.mark.parametrize("method", ["direct", "fft"])
@pytest.mark.parametrize("causal", [False, True])
def test_depthwise_conv1d_matches_its_definition(method, causal, taps):
    from attnlab.ops.linear import depthwise_conv1d

    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 13, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, taps, generator=g, dtype=torch.float64)
    b = torch.randn(5, generator=g, dtype=torch.float64)
    c = 0 if causal else (taps - 1) // 2
    want = torch.stack([sum(w[:, j] * x[:, t - j + c] for j in range(taps) if 0 <= t - j + c < 13) + b
                        for t in range(13)], dim=1)
    torch.testing.assert_close(depthwise_conv1d(x, w, b, causal=causal, method=method), want)


@pytest.mark.parametrize("method", ["direct", "fft"])
@pytest.mark.parametrize("split", [2, 6, 9])
def test_depthwise_conv1d_history_continues_the_sequence(method, split):
    from attnlab.ops.linear import depthwise_conv1d

    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 13, 5, generator=g, dtype=torch.float64)
    w = torch.randn(5, 7, generator=g, dtype=torch.float64)
    full = depthwise_conv1d(x, w, causal=True, method=method)
    hist = x[:, max(0, split - 6): split]  # at most K - 1 earlier inputs are needed
    torch.testing.assert_close(depthwise_conv1d(x[:, split:], w, causal=True, history=hist, method=method),
                               full[:, split:])


def test_depthwise_conv1d_bf16_runs_in_float32():
    from attnlab.ops.linear import depthwise_conv1d

    x = torch.randn(1, 4096, 8).bfloat16()
    y = depthwise_conv1d(x, torch.randn(8, 512) / 30, method="fft")
    assert y.dtype == torch.bfloat16 and torch.isfinite(y).all()
