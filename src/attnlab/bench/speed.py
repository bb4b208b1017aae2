"""Speed suite: forward and forward+backward time vs length for every registered mechanism.

Per mechanism and track: warm-up, then the median of repeats; GFLOP/s on useful FLOPs (the spec's core
formula plus the projections); ``speed_vs_sdpa`` = time of the dense ``mha`` layer (torch SDPA core, same
width, heads and projections, same causal flag, same run) / this mechanism's time; ``gflops_vs_sdpa`` = this
mechanism's GFLOP/s on useful FLOPs / the dense layer's (same config, same run); the fitted log-log slope
of forward time vs N. The fp32 GEMM roofline is measured at the start of the run.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..registry import MechanismSpec, get_spec
from .common import BASELINE, Budget, build, make_input, mode, shape_for, tracks, useful_flops
from .harness import loglog_slope, make_record, matmul_roofline, time_call

Progress = Callable[[str], None]


def _time_module(module, x, causal: bool, hw, backward: bool, repeats: int) -> dict:
    if backward:
        x = x.clone().requires_grad_()
        w = torch.randn_like(x)

        def call():
            y = module(x, causal=causal, hw=hw)
            torch.autograd.grad((y * w).sum(), [x, *[p for p in module.parameters() if p.requires_grad]])

        return time_call(call, warmup=1, repeats=repeats)
    with torch.no_grad():
        return time_call(lambda: module(x, causal=causal, hw=hw), warmup=1, repeats=repeats)


def measure_spec(spec: MechanismSpec, budget: Budget, track: str, causal: bool,
                 progress: Progress | None = None) -> list[dict]:
    """Time one mechanism over the track's sizes; returns records with raw seconds (ratios added later)."""
    sizes = budget.sizes_1d if track == "1d" else budget.sides_2d
    bwd_sizes = budget.backward_1d if track == "1d" else budget.backward_2d
    module = build(spec, budget)
    records: list[dict] = []
    capped = {"fwd": False, "fwd+bwd": False}
    for size in sizes:
        n, hw = shape_for(track, size)
        x = make_input(n, budget.dim)
        for p in ("fwd", "fwd+bwd"):
            if p == "fwd+bwd" and size not in bwd_sizes:
                continue
            cfg = {"track": track, "n": n, "hw": list(hw) if hw else None, "causal": causal, "pass": p,
                   "dim": budget.dim, "heads": budget.heads, "head_dim": budget.head_dim, "batch": 1,
                   "kwargs": spec.bench_kwargs}
            if capped[p]:
                records.append(make_record("speed", spec.id, cfg, "skipped", None,
                                           note=f"a smaller size took over {budget.time_cap_s:g} s"))
                continue
            if progress:
                progress(f"speed {spec.id} {track} n={n} {p}")
            try:
                t = _time_module(module, x, causal, hw, p == "fwd+bwd", budget.repeats)
            except Exception as e:  # noqa: BLE001 - one mechanism's failure must not end the run
                records.append(make_record("speed", spec.id, cfg, "error", None, note=f"{type(e).__name__}: {e}"))
                capped[p] = True
                continue
            flops = useful_flops(spec, module, n, budget.heads, budget.head_dim, causal, p == "fwd+bwd")
            records.append(make_record("speed", spec.id, cfg, "time_s", t["median"], "s", min=t["min"],
                                       max=t["max"], repeats=t["repeats"]))
            records.append(make_record("speed", spec.id, cfg, "gflops", flops / t["median"] / 1e9, "GFLOP/s",
                                       useful_flops=flops))
            capped[p] = t["median"] > budget.time_cap_s
    return records


def run_speed(specs: list[MechanismSpec], budget: Budget, progress: Progress | None = None) -> list[dict]:
    """Every mechanism in every track it supports, plus the dense SDPA baseline in each track and causal mode."""
    roof = matmul_roofline()
    records = [make_record("speed", "gemm", {"n": 2048, "dtype": "float32"}, "roofline_gflops", roof, "GFLOP/s")]
    jobs: list[tuple[MechanismSpec, str, bool]] = []
    for spec in specs:
        for track in tracks(spec):
            jobs.append((spec, track, mode(spec, track)))
    base = get_spec(BASELINE)
    needed = {(track, causal) for _, track, causal in jobs}
    jobs = [(base, t, c) for t, c in sorted(needed) if (base, t, c) not in jobs] + jobs
    for spec, track, causal in jobs:
        records += measure_spec(spec, budget, track, causal, progress)
    return add_derived(records, roof)


def add_derived(records: list[dict], roofline: float) -> list[dict]:
    """Ratios to the SDPA baseline of the same (track, n, causal, pass), fractions of the roofline, slopes."""
    times, rates = {}, {}
    for r in records:
        if r["metric"] in ("time_s", "gflops"):
            c = r["config"]
            key = (r["mechanism"], c["track"], c["n"], c["causal"], c["pass"])
            (times if r["metric"] == "time_s" else rates)[key] = r["value"]
    out = list(records)
    for r in records:
        c = r.get("config", {})
        if r["metric"] == "time_s":
            base = times.get((BASELINE, c["track"], c["n"], c["causal"], c["pass"]))
            if base is not None:
                out.append(make_record("speed", r["mechanism"], c, "speed_vs_sdpa", base / r["value"], "x"))
        elif r["metric"] == "gflops":
            out.append(make_record("speed", r["mechanism"], c, "roofline_fraction", r["value"] / roofline, ""))
            base = rates.get((BASELINE, c["track"], c["n"], c["causal"], c["pass"]))
            if base:  # the issue targets' unit: GFLOP/s on useful FLOPs as a fraction of the dense layer's
                out.append(make_record("speed", r["mechanism"], c, "gflops_vs_sdpa", r["value"] / base, ""))
    series: dict[tuple, list[tuple[int, float]]] = {}
    for (mech, track, n, causal, p), t in times.items():
        if p == "fwd":
            series.setdefault((mech, track, causal), []).append((n, t))
    for (mech, track, causal), pts in series.items():
        pts.sort()
        slope = loglog_slope([p[0] for p in pts], [p[1] for p in pts])
        if slope is not None:
            out.append(make_record("speed", mech, {"track": track, "causal": causal, "pass": "fwd",
                                                   "n_range": [pts[0][0], pts[-1][0]]}, "time_slope", slope, ""))
    return out
