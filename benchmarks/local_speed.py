"""Speed of the local / window attention fast paths vs dense SDPA, in one run (issue 4's closing numbers).

For every mechanism of ``attnlab/mechanisms/local.py`` this times its attention *core* -- the fast path from projected
``q, k, v`` to the attention output, with the same ``ops/window.py`` calls the module makes (window mechanisms project
the input inside the windows, so their core starts from window-ordered q, k, v and is ``tile_attention``; banded,
neighborhood and halo cores read their tiles from raster-ordered q, k, v, as the modules do) -- and the whole
module forward, and reports GFLOP/s on the spec's useful FLOPs against dense
``torch.nn.functional.scaled_dot_product_attention`` at N = 8192, re-timed in every round: N = 8192 (1-D) and
128 x 128 (2-D), fp32, batch 1, 8 heads of 64. It also times 2-D neighborhood attention forward and forward+backward
at 64 x 64, kernel 7, 4 heads of 32. Warm-up, then the median of ``--repeats`` calls per round.

    PYTHONPATH=src python benchmarks/local_speed.py [--repeats 5] [--rounds 3] [--threads 2] [--quick]
    ATTNLAB_NATIVE=0 PYTHONPATH=src python benchmarks/local_speed.py   # the SDPA tile path, for comparison

Not part of the test suite (no timing assertions anywhere); `attnlab bench` is the maintained harness.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

import attnlab
from attnlab.mechanisms import local as L
from attnlab.ops import attention, native
from attnlab.ops import window as W


CPU: list[float] = []  # CPU seconds (all threads) of the last timed() call, per run


def timed(fn, repeats: int) -> tuple[float, float, float]:
    """Median, min and max wall seconds of ``repeats`` runs after one warm-up (plans and masks get cached).

    The CPU seconds of each run go to ``CPU``: on a shared machine the wall clock also counts the time other
    processes hold the cores, CPU time mostly does not, so ratios are reported on both."""
    fn()
    ts = []
    CPU.clear()
    for _ in range(repeats):
        t, c = time.perf_counter(), time.process_time()
        fn()
        ts.append(time.perf_counter() - t)
        CPU.append(time.process_time() - c)
    return statistics.median(ts), min(ts), max(ts)


def pct(x: float) -> str:
    """x as a percentage, or '-' where it does not apply (NaN: a core without SDPA tiles has no tiling ceiling)."""
    return "-" if x != x else f"{x:.0%}"


def cpu() -> float:
    return statistics.median(CPU)


def qkv(n: int, heads: int, d: int, grad: bool = False, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    # (B, H, N, D) views of token-major projections, as the modules produce them
    out = [torch.randn(1, n, heads, d, generator=g).transpose(1, 2) for _ in range(3)]
    if grad:
        out = [t.detach().requires_grad_() for t in out]
    return out


_TILES: dict = {}  # window-ordered q, k, v per (input, plan): prepared once, outside the timed calls


def cores(n1: int, hw: tuple[int, int], heads: int, d: int):
    """(id, bench kwargs, layout, causal, core function, pieces) for every mechanism; cores take projected q, k, v.

    ``pieces``: the SDPA problems the core runs, as ``(tiles, heads, tq, tk, d_computed)`` -- what
    :func:`ceiling` times without masks, gathers or scatters."""
    H, Wd = hw
    n2 = H * Wd
    h1 = heads // 2

    def windows(q, k, v, win, shift=(0, 0), halo=(0, 0), bias=None):
        plan = L._windows_plan(hw, win, shift, halo)
        if halo != (0, 0):  # halo regions are gathered from raster order (HaloNet's module does the same)
            return W.tiled_attention(q, k, v, plan, bias=bias)
        # window mechanisms project inside the windows: the core is the attention on window-ordered q, k, v
        key = (q.data_ptr(), tuple(q.shape), tuple(q.stride()), plan)  # head slices are new views on every call
        tiles = _TILES.get(key)
        if tiles is None:
            tiles = _TILES[key] = tuple(W.gather_tiles(t, plan.q_index) for t in (q, k, v))
        return W.tile_attention(*tiles, plan, 1, bias=bias)

    def spec_kw(id):
        return attnlab.get_spec(id).bench_kwargs

    def tiles(plan, h=heads):
        return [(plan.tiles, h, plan.tq, plan.tk, d)]

    out = []
    kw = spec_kw("sliding-window")
    w = kw["window"]
    bands = W.band_plan(n1, n1, w, w), W.band_plan(n1, n1, w, 0)
    out.append(("sliding-window", kw, (n1, None), False,
                lambda q, k, v, p=bands[0]: W.tiled_attention(q, k, v, p), tiles(bands[0])))
    out.append(("sliding-window", kw, (n1, None), True,
                lambda q, k, v, p=bands[1]: W.tiled_attention(q, k, v, p), tiles(bands[1])))

    for kernel in (7, 13, 31):
        kwn = dict(kernel_size=kernel)
        tile = (L._na_tile_2d(kernel),) * 2
        plan = L._na_plan(hw, (kernel,) * 2, (1, 1), False, tile)
        out.append(("neighborhood-attention-fast", kwn, (n2, hw), False, na_core(hw, kernel, plan, heads, d)[0],
                    tiles(plan)))

    kw = spec_kw("swin")
    win = (kw["window_size"],) * 2
    out.append(("swin", kw, (n2, hw), False,
                lambda q, k, v, win=win: windows(q, k, v, win, L._shifts(hw, win, True)),
                tiles(L._windows_plan(hw, win, L._shifts(hw, win, True)))))

    kw = spec_kw("halonet")
    block, halo = (kw["block_size"],) * 2, (kw["halo_size"],) * 2
    out.append(("halonet", kw, (n2, hw), False, lambda q, k, v: windows(q, k, v, block, halo=halo),
                tiles(L._windows_plan(hw, block, halo=halo))))

    kw = spec_kw("cswin")
    v_win, h_win = L._stripes(hw, kw["split_size"])
    out.append(("cswin", kw, (n2, hw), False, lambda q, k, v: (
        windows(q[:, :h1], k[:, :h1], v[:, :h1], v_win), windows(q[:, h1:], k[:, h1:], v[:, h1:], h_win)),
        tiles(L._windows_plan(hw, v_win), h1) + tiles(L._windows_plan(hw, h_win), heads - h1)))

    kw = spec_kw("cat-rwin")
    w0, w1 = L._rwin_windows(hw, kw["split_size"])
    out.append(("cat-rwin", kw, (n2, hw), False, lambda q, k, v: (
        windows(q[:, :h1], k[:, :h1], v[:, :h1], w0, L._shifts(hw, w0, True)),
        windows(q[:, h1:], k[:, h1:], v[:, h1:], w1, L._shifts(hw, w1, True))),
        tiles(L._windows_plan(hw, w0, L._shifts(hw, w0, True)), h1)
        + tiles(L._windows_plan(hw, w1, L._shifts(hw, w1, True)), heads - h1)))

    kw = spec_kw("s2aformer")
    r, dqk = kw["sr_ratio"], max(1, round(d * kw["qk_ratio"]))
    nr = -(-H // r) * -(-Wd // r)
    out.append(("s2aformer", kw, (n2, hw), False,
                lambda q, k, v: L.narrow_qk_attention(q[..., :dqk], k[:, :, :nr, :dqk], v[:, :, :nr]),
                [(1, heads, n2, nr, d)]))  # q and k padded to the value width (one fused kernel)

    kw = spec_kw("hilo")
    s = kw["window_size"]
    cells = -(-H // s) * -(-Wd // s)
    hi, lo = L._hilo_split(heads, s, kw["alpha"])
    out.append(("hilo", kw, (n2, hw), False, lambda q, k, v: (
        windows(q[:, :hi], k[:, :hi], v[:, :hi], (s, s)), attention(q[:, hi:], k[:, hi:, :cells], v[:, hi:, :cells])),
        tiles(L._windows_plan(hw, (s, s)), hi) + [(1, lo, n2, cells, d)]))

    kw = spec_kw("davit")
    dwin = (kw["window_size"],) * 2
    out.append(("davit", kw, (n2, hw), False,
                lambda q, k, v: (windows(q, k, v, dwin), L.channel_group_attention(q, k, v)),
                tiles(L._windows_plan(hw, dwin))))  # + channel attention (d x d logits per head group): not tiled

    kw = spec_kw("l2vit")
    lwin = (kw["window_size"],) * 2
    out.append(("l2vit", kw, (n2, hw), False, lambda q, k, v: windows(q, k, v, lwin), tiles(L._windows_plan(hw, lwin))))

    kw = spec_kw("duoformer")  # core: scale-wise attention in every region (all scales' tokens) + patch-wise
    R = L._duo_region(hw, kw["region"], kw["scales"])
    n_reg, t_reg = -(-H // R) * -(-Wd // R), sum((R // 2 ** s) ** 2 for s in range(kw["scales"]))
    duo = [t.transpose(1, 2).reshape(n_reg, t_reg, heads, d).transpose(1, 2) for t in qkv(n_reg * t_reg, heads, d)]
    reg = qkv(n_reg, heads, d, seed=1)
    out.append(("duoformer", kw, (n2, hw), False, lambda q, k, v: (W.attention_tiles(*duo), attention(*reg)),
                [(n_reg, heads, t_reg, t_reg, d), (1, heads, n_reg, n_reg, d)]))
    kw = spec_kw("medusa")  # core: the body's maps gating the projected values (no q, k; convolutions)
    torch.manual_seed(0)
    med, xm = attnlab.create("medusa", dim=heads * d, heads=heads, **kw), torch.randn(1, n2, heads * d)
    out.append(("medusa", kw, (n2, hw), False,
                lambda q, k, v: med.gate(xm, v.transpose(1, 2).reshape(1, n2, heads * d), hw), None))
    kw = spec_kw("chada-vit")
    out.append(("chada-vit", kw, (n1, None), False, lambda q, k, v: attention(q, k, v), [(1, heads, n1, n1, d)]))
    return out


def na_core(hw: tuple[int, int], kernel: int, plan, heads: int, d: int, grad: bool = False):
    """Neighborhood attention's core as the module runs it: the per-query kernel on channel-first q, k, v laid out
    as the module projects them (one image row's channels together), where it applies; else the tiles on
    token-major q, k, v. Returns ``(core taking (q, k, v) and ignoring them for the first, own operands)``."""
    rs, cs = (W.neighborhood_starts(n, kernel) for n in hw)
    if native.neighborhood_supports(torch.empty(0), hw, cs, (kernel, kernel), (1, 1)):
        base = torch.randn(1, hw[0], 3, heads, d, hw[1])
        ops = [base[:, :, i].permute(0, 2, 3, 1, 4) for i in range(3)]
        if grad:
            ops = [t.detach().requires_grad_() for t in ops]
        return (lambda q, k, v: native.neighborhood_attention(*ops, rs, cs, (kernel, kernel))), ops
    return (lambda q, k, v: W.tiled_attention(q, k, v, plan)), None


def ceiling(pieces, repeats: int) -> tuple[float, float, float]:
    """Wall seconds, CPU seconds and computed FLOPs of unmasked SDPA on random tensors of the core's tile shapes, tiles folded into the
    batch (token-major, as the core lays them out): the core's time if masks, gathers and scatters were free.
    Useful FLOPs / this time, as a fraction of dense SDPA's GFLOP/s, is the ceiling of the tiled method."""
    calls, flops = [], 0.0
    for T, h, tq, tk, dc in pieces:
        q = torch.randn(T, tq, h, dc).transpose(1, 2)
        k = torch.randn(T, tk, h, dc).transpose(1, 2)
        v = torch.randn(T, tk, h, dc).transpose(1, 2)
        calls.append(lambda q=q, k=k, v=v: F.scaled_dot_product_attention(q, k, v))
        flops += 4.0 * T * h * tq * tk * dc
    med, _, _ = timed(lambda: [c() for c in calls], repeats)
    return med, cpu(), flops


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed calls per round (median)")
    ap.add_argument("--rounds", type=int, default=5, help="rounds, each with the dense reference re-timed")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="N = 4096 and 64 x 64 instead of 8192 and 128 x 128")
    ap.add_argument("--only", nargs="*", default=None, help="mechanism ids to run (default: all)")
    ap.add_argument("--no-na-side", action="store_true", help="skip the 64 x 64 neighborhood / NATTEN section")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    heads, d = 8, 64
    n1, hw = (4096, (64, 64)) if args.quick else (8192, (128, 128))
    n2 = hw[0] * hw[1]
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, B=1, {heads} heads x {d}; "
          f"median of {args.repeats} calls per round; fused tile kernel: {native.status()}")

    # Dense SDPA at N = 8192 is the reference rate (its GF/s is the same at 16384 within 2%, at a quarter of the
    # time). This machine's speed drifts by 10-20% over minutes (a shared host), so each mechanism is timed in rounds
    # interleaved with the reference (timed right before and right after the row's calls), and the ratio is the
    # median of the per-round ratios.
    qd, kd, vd = qkv(n1, heads, d)
    dense_flops = 4.0 * heads * n1 * n1 * d

    def dense_round() -> tuple[float, float]:
        t, c = time.perf_counter(), time.process_time()
        F.scaled_dot_product_attention(qd, kd, vd)
        return dense_flops / (time.perf_counter() - t) / 1e9, dense_flops / (time.process_time() - c) / 1e9

    with torch.no_grad():
        dense_round()
        ref = [dense_round() for _ in range(3)]
    print(f"dense SDPA N={n1}: {statistics.median(r[0] for r in ref):.1f} GFLOP/s "
          f"({statistics.median(r[1] for r in ref):.1f} per CPU-second); the reference of every row, re-timed in "
          f"each of {args.rounds} rounds")

    print("\nGF/s on the spec's useful FLOPs; 'vs SDPA' = median over rounds of GF/s / dense SDPA's GF/s timed in the "
          "same round (wall clock), 'cpu' = the same in CPU seconds")
    print("'useful' = useful / computed FLOPs of the tiles; 'tiles' = unmasked SDPA on the same tile shapes (random "
          "data, no gathers), GF/s on computed FLOPs vs dense, in CPU seconds; 'ceiling' = useful x tiles: the best "
          "an SDPA tiling can reach (compare with 'cpu')")
    print(f"{'mechanism':28s} {'config':36s} {'core ms':>8s} {'GF/s':>5s} {'vs SDPA':>7s} {'cpu':>5s} "
          f"{'useful':>6s} {'tiles':>5s} {'ceiling':>7s} {'module ms':>9s}")
    with torch.no_grad():
        for id, kw, (n, grid), causal, core, pieces in cores(n1, hw, heads, d):
            if args.only and id not in args.only:
                continue
            spec = attnlab.get_spec(id)
            flops = spec.flops(1, n, heads, d, causal, hw=grid, dim=heads * d, **kw)
            cfg = ",".join(f"{a}={b}" for a, b in kw.items()) + (",causal" if causal else "")
            torch.manual_seed(0)
            m = attnlab.create(id, dim=heads * d, heads=heads, **kw)
            x = torch.randn(1, n, heads * d)
            if core is not None:
                q, k, v = qkv(n, heads, d)
                run = lambda: core(q, k, v)  # noqa: E731
            else:  # report the module: its FLOPs are the spec's, its time includes projections
                run = lambda: m(x, causal=causal, hw=grid)  # noqa: E731
            run()
            walls, ratios, ratios_cpu = [], [], []
            for _ in range(args.rounds):  # dense SDPA timed right before and right after: the mean of the two
                before = dense_round()
                med, _, _ = timed(run, args.repeats)
                after = dense_round()
                dw, dc = (before[0] + after[0]) / 2, (before[1] + after[1]) / 2
                walls.append(med)
                ratios.append(flops / med / 1e9 / dw)
                ratios_cpu.append(flops / cpu() / 1e9 / dc)
            core_ms = statistics.median(walls) * 1e3 if core is not None else float("nan")
            rate = flops / statistics.median(walls) / 1e9
            ratio, ratio_cpu = statistics.median(ratios), statistics.median(ratios_cpu)
            useful = tile_rate = float("nan")
            if pieces:  # in CPU seconds: under load the wall clock of short calls mostly measures waiting
                _, c_tiles, computed = ceiling(pieces, args.repeats)
                useful, tile_rate = flops / computed, computed / c_tiles / 1e9 / statistics.median(r[1] for r in ref)
            med_m, _, _ = timed(lambda: m(x, causal=causal, hw=grid), max(1, args.repeats // 2))
            print(f"{id:28s} {cfg:36s} {core_ms:8.1f} {rate:5.1f} {ratio:7.0%} {ratio_cpu:5.0%} {pct(useful):>6s} "
                  f"{pct(tile_rate):>5s} {pct(useful * tile_rate):>7s} {med_m * 1e3:9.1f}")

    if args.no_na_side:
        return
    # 2-D neighborhood attention, 64 x 64, kernel 7, 4 heads of 32: forward and forward + backward
    print("\nneighborhood attention 2-D 64x64, kernel 7, 4 heads x 32:")
    nh, dh, side = 4, 32, 64
    plan = L._na_plan((side, side), (7, 7), (1, 1), False, (L._na_tile_2d(7),) * 2)
    q, k, v = qkv(side * side, nh, dh, grad=True)
    core, own = na_core((side, side), 7, plan, nh, dh, grad=True)
    operands = own or [q, k, v]
    print(f"  core: {'the per-query kernel' if own else 'the tile path'}")
    with torch.no_grad():
        fwd, lo, hi = timed(lambda: core(q, k, v), args.repeats)
    print(f"  core forward          {fwd * 1e3:7.1f} ms ({lo * 1e3:.1f}..{hi * 1e3:.1f})")

    def fwd_bwd():
        for t in operands:
            t.grad = None
        core(q, k, v).sum().backward()

    fb, lo, hi = timed(fwd_bwd, args.repeats)
    print(f"  core forward+backward {fb * 1e3:7.1f} ms ({lo * 1e3:.1f}..{hi * 1e3:.1f})")
    m = attnlab.create("neighborhood-attention-fast", dim=nh * dh, heads=nh, kernel_size=7)
    x = torch.randn(1, side * side, nh * dh, requires_grad=True)
    with torch.no_grad():
        mf, _, _ = timed(lambda: m(x, hw=(side, side)), args.repeats)
    mfb, _, _ = timed(lambda: m(x, hw=(side, side)).sum().backward(), args.repeats)
    print(f"  module forward        {mf * 1e3:7.1f} ms;  module forward+backward {mfb * 1e3:.1f} ms")
    try:  # the peer, when installed (not a dependency of attnlab)
        import warnings

        import natten
    except ImportError:
        print("  NATTEN not installed: no side-by-side")
        return
    warnings.filterwarnings("ignore")
    if own:  # (1, heads, d, H, W) -> NATTEN's (1, H, W, heads, d)
        q5, k5, v5 = (t.detach().permute(0, 3, 4, 1, 2).contiguous() for t in own)
    else:
        q5, k5, v5 = (t.detach().transpose(1, 2).reshape(1, side, side, nh, dh) for t in (q, k, v))
    with torch.no_grad():
        ref = natten.na2d(q5, k5, v5, kernel_size=7)
        o = core(q, k, v)
        ours = o.permute(0, 3, 4, 1, 2) if own else o.transpose(1, 2).reshape(ref.shape)
        nf, lo, hi = timed(lambda: natten.na2d(q5, k5, v5, kernel_size=7), max(1, args.repeats // 2))
    print(f"  NATTEN {natten.__version__} na2d forward {nf * 1e3:7.1f} ms ({lo * 1e3:.1f}..{hi * 1e3:.1f}); "
          f"max |difference| {float((ref - ours).abs().max()):.1e}; ours is {nf / fwd:.0f}x faster")
    try:
        natten.na2d(q5.clone().requires_grad_(), k5, v5, kernel_size=7).sum().backward()
        print("  NATTEN backward: ran")
    except Exception as e:  # noqa: BLE001 - report whatever the peer raises
        print(f"  NATTEN backward: {type(e).__name__}: {str(e).splitlines()[0][:100]}")


if __name__ == "__main__":
    main()
