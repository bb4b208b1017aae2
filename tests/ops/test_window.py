"""ops/window.py: tile plans against their dense definitions, tiled attention against reference attention (outputs
and gradients), neighborhood borders, Swin's roll-and-mask equivalence, window partition/padding tools."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from attnlab.ops import reference_attention
from attnlab.ops import window as W

F64 = dict(atol=1e-10, rtol=1e-8)


def dense_from_plan(plan: W.TilePlan) -> torch.Tensor:
    """Scatter a plan back to a dense (q_len, k_len) mask, using only its real query slots."""
    m = torch.zeros(plan.q_len, plan.k_len, dtype=torch.bool)
    keep = plan.keep if plan.keep is not None else torch.ones(plan.tiles, plan.tq, plan.tk, dtype=torch.bool)
    for t in range(plan.tiles):
        for i in range(plan.tq):
            if plan.q_valid[t, i]:
                m[plan.q_index[t, i], plan.k_index[t][keep[t, i]]] = True
    return m


def check_plan_structure(plan: W.TilePlan) -> None:
    slots = plan.inverse
    t, i = slots // plan.tq, slots % plan.tq
    assert torch.equal(plan.q_index[t, i], torch.arange(plan.q_len)), "inverse does not find every query's slot"
    assert bool(plan.q_valid[t, i].all()), "a real query sits in a padding slot"
    assert int(plan.q_valid.sum()) == plan.q_len, "a query appears in two slots"
    assert int(plan.k_index.min()) >= 0 and int(plan.k_index.max()) < plan.k_len


BAND_CASES = [(13, 13, 3, 3, 4), (13, 13, 3, 0, 4), (9, 9, 0, 0, 2), (10, 10, 20, 20, None), (1, 1, 5, 0, None),
              (4, 11, 3, 0, 2), (3, 17, 5, 0, 8), (17, 17, 2, 5, 3), (16, 16, 4, 4, 16)]


@pytest.mark.parametrize("q_len,k_len,left,right,tile", BAND_CASES)
def test_band_plan_equals_band_mask(q_len, k_len, left, right, tile):
    plan = W.band_plan(q_len, k_len, left, right, tile)
    check_plan_structure(plan)
    assert torch.equal(dense_from_plan(plan), W.band_mask(q_len, k_len, left, right))
    assert plan.tk <= min(k_len, plan.tq + left + right), "key region larger than tile + window"


def test_band_mask_definition():
    m = W.band_mask(5, 5, 1, 0)  # causal window of 2
    assert m.tolist() == [[j in (i - 1, i) for j in range(5)] for i in range(5)]
    m = W.band_mask(2, 6, 2, 0)  # decoding: the 2 queries are the last 2 positions (4, 5)
    assert m.tolist() == [[False, False, True, True, True, False], [False, False, False, True, True, True]]


NA_CASES = [(L, k, d, c, t) for L, k, d, c, t in itertools.product((1, 5, 7, 10, 13), (1, 3, 5), (1, 2, 3),
                                                                    (False, True), (None, 2, 3))]


@pytest.mark.parametrize("length,kernel,dilation,causal,tile", NA_CASES)
def test_neighborhood_plan_equals_neighborhood_mask(length, kernel, dilation, causal, tile):
    plan = W.neighborhood_plan(length, kernel, dilation, causal, tile)
    check_plan_structure(plan)
    assert torch.equal(dense_from_plan(plan), W.neighborhood_mask(length, kernel, dilation, causal))


def test_neighborhood_window_shifts_inward_at_borders():
    # NAT: every query sees exactly `kernel` keys; at the borders the window slides inward instead of being cut.
    m = W.neighborhood_mask(7, 3)
    rows = [torch.nonzero(r).flatten().tolist() for r in m]
    assert rows == [[0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [4, 5, 6]]
    assert m.sum(1).tolist() == [3] * 7
    m = W.neighborhood_mask(8, 5)
    assert torch.nonzero(m[0]).flatten().tolist() == [0, 1, 2, 3, 4]
    assert torch.nonzero(m[1]).flatten().tolist() == [0, 1, 2, 3, 4]
    assert torch.nonzero(m[7]).flatten().tolist() == [3, 4, 5, 6, 7]


def test_neighborhood_dilation_groups_and_borders():
    # dilation 2 on 9 positions: groups {0,2,4,6,8} and {1,3,5,7}, each a neighborhood of its own.
    m = W.neighborhood_mask(9, 3, dilation=2)
    rows = {i: torch.nonzero(m[i]).flatten().tolist() for i in range(9)}
    assert rows[0] == [0, 2, 4] and rows[2] == [0, 2, 4] and rows[4] == [2, 4, 6] and rows[8] == [4, 6, 8]
    assert rows[1] == [1, 3, 5] and rows[5] == [3, 5, 7] and rows[7] == [3, 5, 7]


def test_neighborhood_causal_and_clamped_kernel():
    m = W.neighborhood_mask(6, 3, causal=True)
    assert [torch.nonzero(r).flatten().tolist() for r in m] == [[0], [0, 1], [0, 1, 2], [1, 2, 3], [2, 3, 4],
                                                                [3, 4, 5]]
    assert bool(W.neighborhood_mask(4, 9).all()), "a kernel larger than the axis is the whole axis"
    with pytest.raises(ValueError, match="odd"):
        W.neighborhood_plan(8, 4)


BLOCK_CASES = [(L, b, s, h) for L, b, s, h in itertools.product((1, 5, 7, 8, 11), (1, 2, 3, 4, 8), (0, 1, 2),
                                                                (0, 1, 2))]


@pytest.mark.parametrize("length,block,shift,halo", BLOCK_CASES)
def test_block_plan_equals_block_mask(length, block, shift, halo):
    plan = W.block_plan(length, block, shift, halo)
    check_plan_structure(plan)
    assert torch.equal(dense_from_plan(plan), W.block_mask(length, block, shift, halo))


def test_block_mask_definition():
    assert W.block_mask(5, 2).int().tolist() == [[1, 1, 0, 0, 0], [1, 1, 0, 0, 0], [0, 0, 1, 1, 0],
                                                 [0, 0, 1, 1, 0], [0, 0, 0, 0, 1]]
    # halo 1 around blocks of 2: block {2,3} sees 1..4
    assert torch.nonzero(W.block_mask(6, 2, halo=1)[2]).flatten().tolist() == [1, 2, 3, 4]
    # shift 1: boundaries at 1, 3, 5: blocks {0}, {1,2}, {3,4}, {5}
    m = W.block_mask(6, 2, shift=1)
    assert [torch.nonzero(r).flatten().tolist() for r in m] == [[0], [1, 2], [1, 2], [3, 4], [3, 4], [5]]


def swin_official_mask(H, Wd, M, s):
    """Swin's own construction: pad to multiples of M, roll by -s, label the regions, same-label pairs in a window.

    Returns the (H*W, H*W) mask over the real pixels in raster order (padded pixels dropped)."""
    Hp, Wp = -(-H // M) * M, -(-Wd // M) * M
    label = torch.zeros(Hp, Wp, dtype=torch.long)
    cnt = 0
    if s > 0:
        for hs in (slice(0, -M), slice(-M, -s), slice(-s, None)):
            for ws in (slice(0, -M), slice(-M, -s), slice(-s, None)):
                label[hs, ws] = cnt
                cnt += 1
    # window id of every rolled position
    ry, rx = torch.meshgrid(torch.arange(Hp), torch.arange(Wp), indexing="ij")
    win = (ry // M) * (Wp // M) + rx // M
    # rolled position r holds original position (r + s) mod padded size
    oy, ox = (ry + s) % Hp, (rx + s) % Wp
    same = (win.reshape(-1, 1) == win.reshape(1, -1)) & (label.reshape(-1, 1) == label.reshape(1, -1))
    orig = (oy * Wp + ox).reshape(-1)
    dense = torch.zeros(Hp * Wp, Hp * Wp, dtype=torch.bool)
    dense[orig[:, None], orig[None, :]] = same
    real = (torch.arange(Hp)[:, None] < H) & (torch.arange(Wp)[None, :] < Wd)
    idx = torch.nonzero(real.reshape(-1)).flatten()
    return dense[idx][:, idx]


@pytest.mark.parametrize("H,Wd,M", [(8, 8, 4), (6, 9, 3), (7, 5, 4), (10, 7, 4)])
def test_shifted_blocks_equal_swin_roll_and_mask(H, Wd, M):
    s = M // 2
    ours = W.combine_masks([W.block_mask(H, M, s), W.block_mask(Wd, M, s)])
    assert torch.equal(ours, swin_official_mask(H, Wd, M, s))
    assert torch.equal(W.combine_masks([W.block_mask(H, M), W.block_mask(Wd, M)]), swin_official_mask(H, Wd, M, 0))


@pytest.mark.parametrize("hw,plans", [
    ((5, 7), lambda H, Wd: [W.neighborhood_plan(H, 3, 1, False, 2), W.neighborhood_plan(Wd, 5, 2, False, 3)]),
    ((6, 4), lambda H, Wd: [W.block_plan(H, 4, 2, 1), W.block_plan(Wd, 3, 1, 0)]),
    ((3, 8), lambda H, Wd: [W.block_plan(H, H), W.block_plan(Wd, 3)]),
])
def test_combined_plan_equals_outer_product_of_masks(hw, plans):
    ps = plans(*hw)
    plan = W.combine_plans(ps)
    check_plan_structure(plan)
    masks = [dense_from_plan(p) for p in ps]
    assert torch.equal(dense_from_plan(plan), W.combine_masks(masks))


def test_raster_causal_plan():
    base = W.combine_plans([W.neighborhood_plan(5, 3, 1, True, 2), W.neighborhood_plan(6, 3, 1, False, 2)])
    plan = W.raster_causal(base)
    check_plan_structure(plan)
    want = W.combine_masks([W.neighborhood_mask(5, 3, 1, True), W.neighborhood_mask(6, 3)]).tril()
    assert torch.equal(dense_from_plan(plan), want)
    assert bool(want.diagonal().all())


# ---------------------------------------------------------------------------------------- attention


def qkv(B=2, Hq=4, Hkv=2, Nq=13, Nk=13, D=8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()  # noqa: E731
    return mk(B, Hq, Nq, D), mk(B, Hkv, Nk, D), mk(B, Hkv, Nk, D)


def assert_same(fast_fn, ref_fn, tensors):
    out_f = fast_fn()
    out_r = ref_fn()
    torch.testing.assert_close(out_f, out_r, **F64)
    w = torch.randn_like(out_f)
    gf = torch.autograd.grad((out_f * w).sum(), tensors, allow_unused=True)
    gr = torch.autograd.grad((out_r * w).sum(), tensors, allow_unused=True)
    for a, b in zip(gf, gr):
        torch.testing.assert_close(a, b, **F64)


@pytest.mark.parametrize("left,right,tile", [(3, 3, 4), (2, 0, 3), (0, 0, 5), (40, 40, None), (5, 1, 2)])
def test_tiled_band_attention_matches_reference(left, right, tile):
    q, k, v = qkv()
    plan = W.band_plan(13, 13, left, right, tile)
    mask = W.band_mask(13, 13, left, right)
    assert_same(lambda: W.tiled_attention(q, k, v, plan), lambda: reference_attention(q, k, v, attn_mask=mask),
                (q, k, v))


def test_tiled_attention_with_padding_and_decode_alignment():
    q, k, v = qkv(Nq=3, Nk=11)
    kpm = torch.ones(2, 11, dtype=torch.bool)
    kpm[0, 9] = False
    kpm[1, :] = False  # a batch element that sees nothing returns zeros
    plan, mask = W.band_plan(3, 11, 4, 0, 2), W.band_mask(3, 11, 4, 0)
    out = W.tiled_attention(q, k, v, plan, key_padding_mask=kpm)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert_same(lambda: W.tiled_attention(q, k, v, plan, key_padding_mask=kpm),
                lambda: reference_attention(q, k, v, attn_mask=mask, key_padding_mask=kpm), (q, k, v))


def test_tiled_2d_neighborhood_with_bias_matches_reference():
    H, Wd = 5, 6
    q, k, v = qkv(Nq=H * Wd, Nk=H * Wd, Hkv=4)
    plan = W.combine_plans([W.neighborhood_plan(H, 3, 1, False, 2), W.neighborhood_plan(Wd, 3, 2, False, 2)])
    mask = W.combine_masks([W.neighborhood_mask(H, 3), W.neighborhood_mask(Wd, 3, 2)])
    # a per-(query, key) bias given as a function of positions: the same on both paths
    table = torch.randn(H * Wd, H * Wd, dtype=torch.float64, requires_grad=True)
    idx_q, idx_k = plan.q_index, plan.k_index

    def tile_bias(qt):
        return table[idx_q[:, :, None], idx_k[:, None, :]].repeat(2, 1, 1).unsqueeze(1)

    assert_same(lambda: W.tiled_attention(q, k, v, plan, bias=tile_bias),
                lambda: reference_attention(q, k, v, attn_mask=table.masked_fill(~mask, float("-inf"))),
                (q, k, v, table))


def test_tiled_attention_rejects_wrong_plan():
    q, k, v = qkv()
    with pytest.raises(ValueError, match="q_len"):
        W.tiled_attention(q, k, v, W.band_plan(12, 12, 1, 1))


def test_tiled_attention_never_forms_the_full_matrix(monkeypatch):
    seen = []
    real = W.attention_tiles  # every tile call, fused kernel or SDPA

    def spy(q, k, v, *args):
        seen.append((q.shape[-2], k.shape[-2]))
        return real(q, k, v, *args)

    monkeypatch.setattr(W, "attention_tiles", spy)
    real_native = W.native.indexed_attention  # the fused kernel reading tiles in place

    def spy_native(q, k, v, q_index, k_index, *args):
        seen.append((q_index.shape[1], k_index.shape[1]))
        return real_native(q, k, v, q_index, k_index, *args)

    monkeypatch.setattr(W.native, "indexed_attention", spy_native)
    q, k, v = qkv(B=1, Nq=4096, Nk=4096, D=4, dtype=torch.float32)
    W.tiled_attention(q, k, v, W.band_plan(4096, 4096, 16, 16))
    na = W.neighborhood_plan(64, 7, tile=8)
    W.tiled_attention(q, k, v, W.combine_plans([na, na]))
    assert len(seen) >= 2
    for rows, cols in seen:  # each tile's key region is a small fraction of the sequence
        assert rows <= 256 and cols <= 512, f"a tile of {rows} x {cols} logits for 4096 tokens"


@pytest.mark.parametrize("case", ["band", "band-causal-kpm", "decode", "na-2d-bias-fn", "na-2d-bias-tiles",
                                  "blocks-bias-5d", "blocks-bias-per-tile"])
def test_tiled_attention_in_groups_of_tiles_matches_reference(monkeypatch, case):
    """A byte budget of 1 makes tiled_attention attend one tile per SDPA call: every slicing path (in-order and
    gathered queries, strided and gathered keys, masks, padding masks, 4-D / 5-D / callable biases, GQA, B > 1)
    must still give the reference's outputs and gradients."""
    monkeypatch.setattr(W, "_CHUNK_BYTES", 1)
    kpm = bias = None
    if case.startswith("band"):
        q, k, v = qkv(Nq=28, Nk=28, Hkv=2)
        causal = case == "band-causal-kpm"
        plan, mask = W.band_plan(28, 28, 3, 0 if causal else 3, 4), W.band_mask(28, 28, 3, 0 if causal else 3)
        assert plan.k_window is not None and W._in_order(plan) and plan.tiles > 1  # the view paths
        if causal:
            kpm = torch.rand(2, 28, generator=torch.Generator().manual_seed(1)) > 0.3
    elif case == "decode":
        q, k, v = qkv(Nq=5, Nk=11)
        plan, mask = W.band_plan(5, 11, 6, 0, 2), W.band_mask(5, 11, 6, 0)
    else:
        H, Wd = 5, 6
        q, k, v = qkv(Nq=H * Wd, Nk=H * Wd, Hkv=2)
        if case.startswith("na-2d"):
            plan = W.combine_plans([W.neighborhood_plan(H, 3, 1, False, 2), W.neighborhood_plan(Wd, 3, 1, False, 2)])
            mask = W.combine_masks([W.neighborhood_mask(H, 3), W.neighborhood_mask(Wd, 3)])
        else:
            plan = W.combine_plans([W.block_plan(H, 2, 1, 1), W.block_plan(Wd, 4, 0, 1)])
            mask = W.combine_masks([W.block_mask(H, 2, 1, 1), W.block_mask(Wd, 4, 0, 1)])
        table = torch.randn(2, 4, H * Wd, H * Wd, dtype=torch.float64, requires_grad=True)
        tiles = table[:, :, plan.q_index[:, :, None], plan.k_index[:, None, :]].transpose(1, 2)  # (B, T, H, tq, tk)
        if case == "na-2d-bias-fn":
            # a content bias: a function of the query tiles it is given (any group of them)
            w = torch.randn(q.shape[-1], plan.tk, dtype=torch.float64, requires_grad=True)
            bias = lambda qt, tiles: qt @ w  # noqa: E731
            qr = (q @ w)  # (B, H, N, tk): query i's bias for key slot j of its tile
            dense = torch.full((2, 4, H * Wd, H * Wd), float("-inf"), dtype=torch.float64)
            slot = plan.inverse // plan.tq
            dense = dense.scatter(-1, plan.k_index[slot].expand(2, 4, -1, -1), qr)
            table = w
        elif case == "na-2d-bias-tiles":  # a bias that depends on which tiles it is asked for
            tiles_of = lambda t: table[:, :, plan.q_index[t][:, :, None], plan.k_index[t][:, None, :]]  # noqa: E731
            bias = lambda qt, t: tiles_of(t).transpose(1, 2).flatten(0, 1)  # noqa: E731
            dense = table
        elif case == "blocks-bias-5d":
            bias = tiles
            dense = table
        else:
            bias = tiles.flatten(0, 1)
            dense = table
    ref_mask = mask if bias is None else dense.masked_fill(~mask, float("-inf"))
    tensors = (q, k, v) if bias is None else (q, k, v, table)
    assert_same(lambda: W.tiled_attention(q, k, v, plan, key_padding_mask=kpm, bias=bias),
                lambda: reference_attention(q, k, v, attn_mask=ref_mask, key_padding_mask=kpm), tensors)


# ------------------------------------------------------------------------------------- window tools


@pytest.mark.parametrize("H,Wd,win", [(5, 7, (2, 3)), (4, 4, 2), (1, 3, (4, 4)), (6, 5, (6, 1))])
def test_window_partition_reverse_roundtrip_with_padding(H, Wd, win):
    x = torch.randn(2, H, Wd, 3)
    w = W.window_partition(x, win)
    wh, ww = (win, win) if isinstance(win, int) else win
    assert w.shape == (2, -(-H // wh), -(-Wd // ww), wh * ww, 3)
    assert torch.equal(W.window_reverse(w, win, (H, Wd)), x)
    valid = W.window_valid((H, Wd), win)
    assert int(valid.sum()) == H * Wd
    assert torch.equal(w[:, ~valid], torch.zeros_like(w[:, ~valid])), "padding slots must be zeros"


def test_window_mean_and_expand_at_borders():
    x = torch.arange(15.0).view(1, 3, 5, 1)
    m = W.window_mean(x, 2)  # cells: rows {0,1},{2}; cols {0,1},{2,3},{4}
    want = torch.tensor([[(0 + 1 + 5 + 6) / 4, (2 + 3 + 7 + 8) / 4, (4 + 9) / 2],
                         [(10 + 11) / 2, (12 + 13) / 2, 14.0]])
    torch.testing.assert_close(m[0, ..., 0], want)
    e = W.window_expand(m, 2, (3, 5))
    assert e.shape == x.shape
    assert e[0, 2, 4, 0] == 14.0 and e[0, 1, 1, 0] == want[0, 0]


def test_windowed_conv_sees_zeros_across_window_borders():
    x = torch.randn(1, 5, 6, 2)
    weight = torch.randn(2, 1, 3, 3)
    conv = lambda img: F.conv2d(img, weight, padding=1, groups=2)  # noqa: E731
    out = W.windowed(conv, x, (5, 4))  # stripes: full height, 4 columns (the last one 2 wide)
    img = x.permute(0, 3, 1, 2)
    left = conv(img[..., :4]).permute(0, 2, 3, 1)
    right = conv(img[..., 4:]).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, torch.cat([left, right], dim=2))


def test_pairs_counts_visible_pairs():
    assert W.band_plan(10, 10, 2, 2, 3).pairs() == int(W.band_mask(10, 10, 2, 2).sum())
    p = W.combine_plans([W.neighborhood_plan(9, 3), W.neighborhood_plan(7, 5)])
    assert p.pairs() == 9 * 7 * 3 * 5


def test_tiled_attention_groups_and_reused_buffers_keep_results_apart(monkeypatch):
    """Halo blocks: interior tiles (no mask) and border tiles (masked) are attended as two groups; without autograd
    the gathers go to per-thread buffers reused by the next call, which must not change earlier results."""
    monkeypatch.setattr(W, "_CHUNK_BYTES", 3000)  # several chunks per group, all through the same buffers
    plan = W.combine_plans([W.block_plan(12, 3, 0, 1)] * 2)
    mask = W.combine_masks([W.block_mask(12, 3, 0, 1)] * 2)
    groups, _ = W._schedule(plan, False)
    assert [g.mask for g in groups] == ["none", "own"] and groups[0].size == 4
    with torch.no_grad():
        first = [qkv(Nq=144, Nk=144, seed=s) for s in (1, 2)]
        outs = [W.tiled_attention(q, k, v, plan) for q, k, v in first]
        for (q, k, v), out in zip(first, outs):
            torch.testing.assert_close(out, reference_attention(q, k, v, attn_mask=mask), **F64)
    q, k, v = qkv(Nq=144, Nk=144)
    assert_same(lambda: W.tiled_attention(q, k, v, plan), lambda: reference_attention(q, k, v, attn_mask=mask),
                (q, k, v))
    # 1-D halo blocks: queries in order, yet the two groups are not contiguous ranges
    plan, mask = W.block_plan(24, 4, 0, 1), W.block_mask(24, 4, 0, 1)
    assert W._in_order(plan) and not isinstance(W._schedule(plan, False)[0][0].tiles, slice)
    q, k, v = qkv(Nq=24, Nk=24)
    assert_same(lambda: W.tiled_attention(q, k, v, plan), lambda: reference_attention(q, k, v, attn_mask=mask),
                (q, k, v))
    W.release_workspace()


@pytest.mark.parametrize("q_len,k_len,tile", [(13, 7, 4), (8, 8, 8), (5, 11, 16)])
def test_dense_plan_is_full_attention(q_len, k_len, tile):
    plan = W.dense_plan(q_len, k_len, tile)
    check_plan_structure(plan)
    assert torch.equal(dense_from_plan(plan), torch.ones(q_len, k_len, dtype=torch.bool))
    q, k, v = qkv(Nq=q_len, Nk=k_len)
    assert_same(lambda: W.tiled_attention(q, k, v, plan), lambda: reference_attention(q, k, v), (q, k, v))


@pytest.mark.parametrize("length,block,shift", [(8, 4, 2), (12, 4, 1), (12, 4, 3), (16, 8, 4), (6, 3, 1)])
def test_rolled_block_plan_sees_what_shifted_blocks_see(length, block, shift):
    """Swin's cyclic roll + mask, as a plan: the same visibility as blocks moved by the shift, in fewer tiles."""
    plan = W.rolled_block_plan(length, block, shift)
    check_plan_structure(plan)
    assert torch.equal(dense_from_plan(plan), W.block_mask(length, block, shift))
    assert plan.tiles == length // block < W.block_plan(length, block, shift).tiles
    q, k, v = qkv(Nq=length, Nk=length)
    assert_same(lambda: W.tiled_attention(q, k, v, plan),
                lambda: reference_attention(q, k, v, attn_mask=W.block_mask(length, block, shift)), (q, k, v))


def test_rolled_block_plan_rejects_what_it_cannot_roll():
    with pytest.raises(ValueError, match="divisible"):
        W.rolled_block_plan(10, 4, 2)
    with pytest.raises(ValueError, match="shift"):
        W.rolled_block_plan(8, 4, 4)
