"""local.py: the 13 local / window mechanisms beyond the conformance suite.

Fast path vs reference path (dense masks, dense pooling matrices, the papers' equations) on outputs and gradients
in float64; neighborhood borders; Swin against its roll-and-mask algorithm; decoding; no N x N in fast paths;
padding and cropping of sizes that do not divide; FLOP formulas.
"""

import math

import pytest
import torch

import attnlab
from attnlab.mechanisms import KVCache
from attnlab.ops import window as W

F64 = dict(atol=1e-10, rtol=1e-8)

LOCAL_IDS = ["sliding-window", "swin", "neighborhood-attention-fast", "halonet", "cswin", "cat-rwin", "s2aformer",
             "hilo", "davit", "l2vit", "duoformer", "medusa", "chada-vit"]


def build(id, backend="fast", seed=0, **overrides):
    spec = attnlab.get_spec(id)
    kwargs = {**spec.test_kwargs, **overrides}
    if id == "chada-vit":  # a MultiHeadAttention subclass: its exact backends are "auto" (SDPA) and "reference"
        backend = "auto" if backend == "fast" else "reference"
    torch.manual_seed(seed)
    return attnlab.create(id, backend=backend, **kwargs).double()


def x_of(n, dim=32, batch=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, n, dim, generator=g, dtype=torch.float64)


def test_all_thirteen_are_registered():
    specs = {s.id: s for s in attnlab.list_mechanisms()}
    for id in LOCAL_IDS:
        assert id in specs, id
        assert specs[id].bench_kwargs, f"{id} has no bench configuration"
    assert {specs[i].catalog for i in LOCAL_IDS if specs[i].seed} == {5, 26, 36, 37, 38, 57, 79, 186, 201, 206, 236}


# (id, constructor overrides, hw or None for 1-D with n tokens, n, causal, padded)
CASES = [
    ("sliding-window", dict(window=3, tile=4), None, 23, False, False),
    ("sliding-window", dict(window=3, tile=4), None, 23, True, True),
    ("sliding-window", dict(window=0), None, 9, False, False),
    ("sliding-window", dict(window=40, tile=8), None, 23, False, True),
    ("neighborhood-attention-fast", dict(kernel_size=5, dilation=2, tile=3), None, 19, False, False),
    ("neighborhood-attention-fast", dict(kernel_size=5, dilation=2, tile=3), None, 19, True, False),
    ("neighborhood-attention-fast", dict(kernel_size=(3, 5), dilation=(2, 1), tile=None), (7, 9), 63, False, False),
    ("neighborhood-attention-fast", dict(kernel_size=3, dilation=1, tile=2), (5, 6), 30, True, False),
    ("swin", dict(window_size=4, shift=True), (7, 9), 63, False, False),
    ("swin", dict(window_size=(3, 5), shift=False), (7, 9), 63, False, False),
    ("halonet", dict(block_size=3, halo_size=1), (7, 9), 63, False, False),
    ("halonet", dict(block_size=(2, 4), halo_size=(1, 2)), (5, 9), 45, False, False),
    ("cswin", dict(split_size=2), (5, 7), 35, False, False),
    ("cswin", dict(split_size=4, heads=3), (3, 6), 18, False, False),
    ("cat-rwin", dict(split_size=(2, 3), shift=True), (5, 7), 35, False, False),
    ("cat-rwin", dict(split_size=(100, 2), shift=True), (3, 5), 15, False, False),  # axial rectangles
    ("s2aformer", dict(sr_ratio=2), (5, 7), 35, False, False),
    ("s2aformer", dict(sr_ratio=3, qk_ratio=0.25), (4, 5), 20, False, False),
    ("hilo", dict(window_size=2, alpha=0.5), (7, 9), 63, False, False),
    ("hilo", dict(window_size=3, alpha=0.25), (5, 7), 35, False, False),
    ("hilo", dict(window_size=3, alpha=1.0), (5, 7), 35, False, False),
    ("davit", dict(window_size=3, mode="dual"), (7, 9), 63, False, False),
    ("davit", dict(window_size=4, mode="channel"), (5, 7), 35, False, False),
    ("l2vit", dict(window_size=3, branch="local"), (7, 9), 63, False, False),
    ("l2vit", dict(branch="global", lcm_kernel=3), (7, 9), 63, False, False),
    ("duoformer", dict(scales=2, region=2, mode="both"), (7, 9), 63, False, False),
    ("duoformer", dict(scales=3, region=4, mode="both"), (7, 9), 63, False, False),
    ("duoformer", dict(scales=1, region=3, mode="scale"), (5, 7), 35, False, False),
    ("medusa", dict(scales=2), (7, 9), 63, False, False),
    ("medusa", dict(scales=3, heads=4), (5, 7), 35, False, False),
    ("chada-vit", dict(), None, 14, False, True),
]


@pytest.mark.parametrize("id,overrides,hw,n,causal,padded", CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
def test_fast_path_equals_reference_on_outputs_and_gradients(id, overrides, hw, n, causal, padded):
    fast, ref = build(id, "fast", **overrides), build(id, "reference", **overrides)
    ref.load_state_dict(fast.state_dict())
    x = x_of(n, fast.dim).requires_grad_()
    mask = None
    if padded:
        mask = torch.ones(2, n, dtype=torch.bool)
        mask[0, n - 5:] = False
    kw = dict(causal=causal, hw=hw, key_padding_mask=mask)
    y_f, y_r = fast(x, **kw), ref(x, **kw)
    assert y_f.shape == x.shape and torch.isfinite(y_f).all()
    torch.testing.assert_close(y_f, y_r, **F64)
    w = torch.randn_like(y_f)
    g_f = torch.autograd.grad((y_f * w).sum(), [x, *fast.parameters()])
    g_r = torch.autograd.grad((y_r * w).sum(), [x, *ref.parameters()])
    for (name, _), a, b in zip([("x", None), *fast.named_parameters()], g_f, g_r):
        torch.testing.assert_close(a, b, **F64, msg=lambda m: f"{id}: gradient of {name}: {m}")


# ------------------------------------------------------------------------------------ no N x N


GLOBAL_BY_DESIGN = {"chada-vit"}  # exact attention over all channel x patch tokens is the mechanism


@pytest.mark.parametrize("id", [i for i in LOCAL_IDS if i not in GLOBAL_BY_DESIGN])
def test_fast_paths_never_form_the_full_attention_matrix(id, monkeypatch):
    from attnlab.mechanisms import local
    from attnlab.ops import window as ops_window

    calls = []

    def spy(real):
        def f(q, k, v, **kw):
            calls.append((q.shape[-2], k.shape[-2]))
            return real(q, k, v, **kw)
        return f

    def forbidden(*a, **k):
        raise AssertionError(f"{id}: the fast path called reference_attention")

    monkeypatch.setattr(ops_window, "attention", spy(ops_window.attention))
    monkeypatch.setattr(local, "attention", spy(local.attention))
    monkeypatch.setattr(local, "reference_attention", forbidden)
    spec = attnlab.get_spec(id)
    small = {"sliding-window": dict(window=8), "swin": dict(window_size=4), "halonet": dict(block_size=4),
             "neighborhood-attention-fast": dict(kernel_size=5), "cswin": dict(split_size=2),
             "cat-rwin": dict(split_size=(2, 4)), "s2aformer": dict(sr_ratio=4), "hilo": dict(window_size=4),
             "davit": dict(window_size=4), "l2vit": dict(window_size=4), "duoformer": dict(scales=2, region=4),
             "medusa": dict(scales=3)}[id]
    m = build(id, **small).float()
    n, hw = (256, None) if 1 in spec.caps.dims and 2 not in spec.caps.dims else (256, (16, 16))
    with torch.no_grad():
        m(x_of(n, m.dim).float(), hw=hw)
    for rows, cols in calls:
        assert rows * cols <= n * n // 4, f"{id}: an attention call of {rows} x {cols} logits for {n} tokens"


# ----------------------------------------------------------------------------------- sliding window


def test_sliding_window_decode_equals_full_forward_beyond_the_window():
    m = build("sliding-window", window=3, tile=2, rope=True)
    x = x_of(17, m.dim)
    with torch.no_grad():
        full = m(x, causal=True)
        cache = KVCache()
        parts = [m(x[:, :9], causal=True, cache=cache)]
        for t in range(9, 15):
            parts.append(m(x[:, t: t + 1], causal=True, cache=cache))
        parts.append(m(x[:, 15:], causal=True, cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, **F64)


def test_causal_sliding_window_equals_causal_neighborhood_attention():
    # NATTEN's 1-D causal neighborhood of k keys is the causal sliding window of k - 1 earlier keys.
    sw = build("sliding-window", window=4, tile=3, kv_heads=None, rope=False)
    na = build("neighborhood-attention-fast", kernel_size=5, tile=4)
    with torch.no_grad():
        na.qkv.weight.copy_(torch.cat([sw.q_proj.weight, sw.k_proj.weight, sw.v_proj.weight]))
        na.qkv.bias.zero_()
        na.proj.weight.copy_(sw.o_proj.weight)
        na.proj.bias.zero_()
    x = x_of(21, sw.dim)
    torch.testing.assert_close(na(x, causal=True), sw(x, causal=True), **F64)


# ------------------------------------------------------------------------------------ neighborhood


def uniform_attention(m):
    """Zero the query/key projections: attention becomes the plain mean of the visible values."""
    with torch.no_grad():
        qk = 2 * m.heads * m.head_dim
        m.qkv.weight[:qk] = 0
        m.qkv.bias[:qk] = 0
    return m


def test_neighborhood_window_shifts_inward_not_zero_padded():
    m = uniform_attention(build("neighborhood-attention-fast", kernel_size=3, tile=2))
    x = x_of(7, m.dim, batch=1)
    _, _, v = m.project(x)
    out = torch.linalg.lstsq(m.proj.weight, (m(x) - m.proj.bias).squeeze(0).T).solution.T  # undo the projection
    v = v.squeeze(0).transpose(0, 1).reshape(7, -1)
    windows = [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [4, 5, 6]]
    want = torch.stack([v[w].mean(0) for w in windows])
    torch.testing.assert_close(out, want, atol=1e-8, rtol=1e-6)


def test_neighborhood_2d_borders_on_a_map():
    m = uniform_attention(build("neighborhood-attention-fast", kernel_size=3))
    H, Wd = 4, 5
    x = x_of(H * Wd, m.dim, batch=1)
    _, _, v = m.project(x)
    out = torch.linalg.lstsq(m.proj.weight, (m(x, hw=(H, Wd)) - m.proj.bias).squeeze(0).T).solution.T
    vmap = v.squeeze(0).transpose(0, 1).reshape(H, Wd, -1)
    # corner (0, 0) sees rows 0-2, cols 0-2; pixel (3, 4) sees rows 1-3, cols 2-4
    torch.testing.assert_close(out[0], vmap[0:3, 0:3].mean((0, 1)), atol=1e-8, rtol=1e-6)
    torch.testing.assert_close(out[-1], vmap[1:4, 2:5].mean((0, 1)), atol=1e-8, rtol=1e-6)


@pytest.mark.parametrize("grid,kernel,dilation,causal", [
    ((17,), (5,), (1,), False), ((17,), (5,), (3,), True), ((20,), (7,), (2,), False),
    ((9, 11), (3, 5), (2, 1), False), ((10, 7), (5, 3), (2, 2), False), ((8, 8), (7, 7), (1, 1), False)])
def test_neighborhood_core_matches_natten(grid, kernel, dilation, causal):
    """The peer implementation, when installed (NATTEN's CPU path; not a dependency): same outputs."""
    natten = pytest.importorskip("natten")
    from attnlab.mechanisms.local import _na_plan
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, *grid, 2, 8, generator=g) for _ in range(3))
    fn = natten.na1d if len(grid) == 1 else natten.na2d
    want = fn(q, k, v, kernel_size=kernel, dilation=dilation, is_causal=causal)
    flat = [t.reshape(1, -1, 2, 8).transpose(1, 2) for t in (q, k, v)]
    got = W.tiled_attention(*flat, _na_plan(grid, kernel, dilation, causal, (3,) * len(grid)))
    torch.testing.assert_close(got.transpose(1, 2).reshape(want.shape), want, atol=2e-6, rtol=1e-5)


def test_neighborhood_rejects_even_kernels():
    with pytest.raises(ValueError, match="odd"):
        attnlab.create("neighborhood-attention-fast", dim=32, heads=4, kernel_size=4)


# -------------------------------------------------------------------------------------------- Swin


def swin_by_roll(m, x, hw):
    """Swin's own algorithm (cyclic roll, window partition, relative bias, region mask, roll back) -- maps whose
    sides divide the window."""
    B, N, C = x.shape
    H, Wd = hw
    M = m.window_size[0]
    s = M // 2
    q, k, v = m.project(x)
    img = torch.stack([q, k, v]).transpose(2, 3).reshape(3, B, H, Wd, -1)
    img = torch.roll(img, shifts=(-s, -s), dims=(2, 3))
    win = img.view(3, B, H // M, M, Wd // M, M, m.heads, m.head_dim).permute(0, 1, 2, 4, 6, 3, 5, 7)
    win = win.reshape(3, B * (H // M) * (Wd // M), m.heads, M * M, m.head_dim)
    label = torch.zeros(H, Wd)
    cnt = 0
    for hs in (slice(0, -M), slice(-M, -s), slice(-s, None)):
        for ws in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            label[hs, ws] = cnt
            cnt += 1
    lw = label.view(H // M, M, Wd // M, M).permute(0, 2, 1, 3).reshape(-1, M * M)
    region = (lw[:, :, None] != lw[:, None, :]).to(x.dtype) * -1e9
    coords = torch.stack(torch.meshgrid(torch.arange(M), torch.arange(M), indexing="ij")).flatten(1)
    rel = (coords[:, None, :] - coords[:, :, None]).permute(1, 2, 0) + M - 1  # key - query
    bias = m.rel_table[rel[..., 0] * (2 * M - 1) + rel[..., 1]].permute(2, 0, 1)
    logits = win[0] @ win[1].transpose(-1, -2) * m.head_dim ** -0.5 + bias + region.repeat(B, 1, 1)[:, None]
    o = torch.softmax(logits, -1) @ win[2]
    o = o.view(B, H // M, Wd // M, m.heads, M, M, m.head_dim).permute(0, 1, 4, 2, 5, 3, 6).reshape(B, H, Wd, -1)
    o = torch.roll(o, shifts=(s, s), dims=(1, 2))
    return m.proj(o.reshape(B, N, -1))


@pytest.mark.parametrize("hw", [(8, 8), (8, 12)])
def test_swin_equals_roll_and_mask_algorithm(hw):
    m = build("swin", window_size=4, shift=True)
    x = x_of(hw[0] * hw[1], m.dim)
    torch.testing.assert_close(m(x, hw=hw), swin_by_roll(m, x, hw), atol=1e-9, rtol=1e-7)


def test_swin_pads_and_crops_non_dividing_maps():
    # A 6 x 7 map with 4 x 4 windows: the result must equal running on the top-left 6 x 7 of a larger map whose
    # extra pixels are never attended -- checked by comparing with the dense-mask reference and by locality.
    m = build("swin", window_size=4, shift=False)
    x = x_of(42, m.dim, batch=1)
    y = m(x, hw=(6, 7))
    x2 = x.clone().view(1, 6, 7, -1)
    x2[:, 4:, 4:] += 1.0  # change only the bottom-right window
    y2 = m(x2.view(1, 42, -1), hw=(6, 7)).view(1, 6, 7, -1)
    y = y.view(1, 6, 7, -1)
    torch.testing.assert_close(y2[:, :4], y[:, :4], **F64)
    torch.testing.assert_close(y2[:, :, :4], y[:, :, :4], **F64)
    assert not torch.allclose(y2[:, 4:, 4:], y[:, 4:, 4:])


# ----------------------------------------------------------------------------------- other seeds


def test_hilo_head_split_and_output_width():
    m = attnlab.create("hilo", dim=64, heads=8, window_size=2, alpha=0.25)
    assert (m.h_heads, m.l_heads) == (6, 2)
    assert attnlab.create("hilo", dim=64, heads=8, window_size=1).h_heads == 0
    with pytest.raises(ValueError, match="multiple"):
        attnlab.create("hilo", dim=30, heads=4)


def test_davit_channel_attention_is_the_papers_equation():
    from attnlab.mechanisms.local import channel_group_attention
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 50, 4, generator=g, dtype=torch.float64) for _ in range(3))
    out = channel_group_attention(q, k, v)
    # channel i of group h: softmax over channels j of (sum_n q[n, i] k[n, j]) / sqrt(d), weights on v[:, j]
    logits = torch.einsum("bhni,bhnj->bhij", q, k) / 2.0
    want = torch.einsum("bhij,bhnj->bhni", torch.softmax(logits, -1), v)
    torch.testing.assert_close(out, want, **F64)


def test_davit_module_takes_the_native_channel_products_in_float32(monkeypatch):
    from attnlab.ops import native
    if not native.available():
        pytest.skip(f"native kernel: {native.status()}")
    calls = []
    real = native.channel_attention
    monkeypatch.setattr(native, "channel_attention", lambda *a: calls.append(1) or real(*a))
    torch.manual_seed(0)
    m = attnlab.create("davit", dim=64, heads=4, window_size=4, mode="dual")  # channel groups of 16
    x = torch.randn(2, 48, 64, requires_grad=True)
    y = m(x, hw=(6, 8))
    assert calls == [1]
    with native.disabled():  # PyTorch's matmuls
        ref = m(x, hw=(6, 8))
    assert calls == [1]
    torch.testing.assert_close(y, ref, atol=1e-5, rtol=1e-5)
    w = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad((y * w).sum(), [x, *m.parameters()]),
                    torch.autograd.grad((ref * w).sum(), [x, *m.parameters()])):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_duoformer_region_must_divide_by_coarsest_scale():
    with pytest.raises(ValueError, match="multiple"):
        attnlab.create("duoformer", dim=32, heads=4, scales=3, region=6)


def test_medusa_maps_are_sigmoid_gates_at_each_scale():
    m = build("medusa", scales=3, heads=4)
    maps = m.attention_maps(x_of(35, m.dim), (5, 7))
    assert [t.shape[1:3] for t in maps] == [(5, 7), (3, 4), (2, 2)]
    assert all(((t > 0) & (t < 1)).all() for t in maps)
    assert m.scale_of == [0, 0, 1, 2]


def test_chada_padded_channels_change_nothing():
    m = build("chada-vit", tokens_per_channel=4, max_channels=4)
    x = x_of(12, m.dim, batch=1)  # 3 channels x 4 patches
    mask = torch.ones(1, 12, dtype=torch.bool)
    mask[:, 8:] = False  # the third channel is padding
    torch.testing.assert_close(m(x, key_padding_mask=mask)[:, :8], m(x[:, :8]), **F64)
    with pytest.raises(ValueError, match="max_channels"):
        m(x_of(17, m.dim))


def test_unknown_backend_is_refused():
    with pytest.raises(ValueError, match="backend"):
        attnlab.create("swin", dim=32, heads=4, backend="turbo")


# ------------------------------------------------------------------------------------------ FLOPs


def test_flops_count_the_visible_pairs():
    spec = attnlab.get_spec("sliding-window")
    for n, w, causal in ((100, 7, False), (100, 7, True), (10, 50, False)):
        pairs = int(W.band_mask(n, n, w, 0 if causal else w).sum())
        assert spec.flops(1, n, 2, 8, causal, window=w) == 4 * 2 * 8 * pairs
    na = attnlab.get_spec("neighborhood-attention-fast")
    assert na.flops(1, 64, 4, 16, False, kernel_size=15, hw=(8, 8)) == attnlab.registry.dense_flops(1, 64, 4, 16)
    assert na.flops(1, 81, 1, 1, False, kernel_size=3, hw=(9, 9)) == 4 * 81 * 9
    swin = attnlab.get_spec("swin")
    assert swin.flops(1, 64, 1, 1, False, window_size=4, shift=False, hw=(8, 8)) == 4 * 64 * 16
    for spec in attnlab.list_mechanisms():
        if spec.id in LOCAL_IDS:
            n, hw = (4096, None) if 2 not in spec.caps.dims else (4096, (64, 64))
            f = spec.flops(1, n, 8, 32, False, hw=hw, **spec.bench_kwargs)
            assert math.isfinite(f) and f > 0, spec.id


def test_medusa_flops_are_its_convolutions_plus_the_gating():
    m = build("medusa", scales=3, heads=4)
    convs = []

    def count(conv, inputs, out):  # multiply-adds of a convolution: output elements x its receptive field
        convs.append(2.0 * out.numel() * conv.in_channels // conv.groups * conv.kernel_size[0] * conv.kernel_size[1])

    for layer in m.modules():
        if isinstance(layer, torch.nn.Conv2d):
            layer.register_forward_hook(count)
    hw = (7, 9)
    m.attention_maps(x_of(63, m.dim, batch=1), hw)
    gating = 3.0 * 63 * m.heads * m.head_dim
    spec = attnlab.get_spec("medusa")
    assert spec.flops(1, 63, m.heads, m.head_dim, hw=hw, dim=m.dim, scales=3) == sum(convs) + gating


# ------------------------------------------------------------------------------------------- docs


@pytest.mark.parametrize("id", LOCAL_IDS)
def test_doc_page_example_runs(id):
    from pathlib import Path
    page = Path(__file__).resolve().parents[2] / attnlab.get_spec(id).doc_path
    text = page.read_text()
    assert text.startswith(f"# {id}:"), f"{page} does not start with its id"
    for heading in ("## What it computes", "## Complexity", "## Masks and causal semantics", "## Example",
                    "## Left out"):
        assert heading in text, f"{page} has no '{heading}' section"
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    torch.manual_seed(0)
    exec(compile(code, str(page), "exec"), {})
