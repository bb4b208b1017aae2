"""Memory suite: peak memory of forward+backward per (mechanism, length), each in a fresh process.

Each configuration runs in its own process forked from a measurement server (harness.ForkServer), so its RSS
high-water mark is its own; the record keeps the peak over the process's starting RSS. The growth exponent is
the log-log slope of that increment vs N over all sizes measured; the record also carries the slope without the
smallest size (``tail_exponent``, at least 3 sizes: in full mode 2k..16k, where fixed costs weigh least) and the
slope between each pair of consecutive sizes (``local_exponents``), which shows whether growth steepens with N.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..registry import MechanismSpec, get_spec
from .common import BASELINE, Budget, build, make_input, mode, shape_for, tracks
from .harness import ForkServer, loglog_slope, make_record, peak_rss_mib


def measure(mechanism: str, track: str, size: int, causal: bool, dim: int, heads: int, backward: bool = True) -> dict:
    """Child body: one forward(+backward) of one mechanism at one size."""
    torch.set_grad_enabled(backward)
    spec = get_spec(mechanism)
    n, hw = shape_for(track, size)
    module = build(spec, dim, heads)
    x = make_input(n, dim).requires_grad_(backward)
    y = module(x, causal=causal, hw=hw)
    if backward:
        y.backward(torch.ones_like(y))
    return {"peak_rss_mib": peak_rss_mib()}


def growth_details(pts: list[tuple[int, float]]) -> dict:
    """``tail_exponent`` (log-log slope without the smallest size, when 3 or more remain) with its ``tail_n_range``,
    and ``local_exponents``: the slope between each pair of consecutive sizes (None where an increment is 0)."""
    out: dict = {"local_exponents": [loglog_slope([a[0], b[0]], [a[1], b[1]]) for a, b in zip(pts, pts[1:])]}
    if len(pts) >= 4:
        out["tail_exponent"] = loglog_slope([p[0] for p in pts[1:]], [p[1] for p in pts[1:]])
        out["tail_n_range"] = [pts[1][0], pts[-1][0]]
    return out


def run_memory(specs: list[MechanismSpec], budget: Budget, progress: Callable[[str], None] | None = None,
               backward: bool = True) -> list[dict]:
    jobs = [(s, t, mode(s, t)) for s in specs for t in tracks(s)]
    base = get_spec(BASELINE)
    jobs = [(base, t, c) for t, c in sorted({(t, c) for _, t, c in jobs}) if (base, t, c) not in jobs] + jobs
    records: list[dict] = []
    with ForkServer(timeout=600) as server:
        for spec, track, causal in jobs:
            pts = []
            for size in (budget.memory_1d if track == "1d" else budget.memory_2d):
                n, hw = shape_for(track, size)
                cfg = {"track": track, "n": n, "hw": list(hw) if hw else None, "causal": causal,
                       "pass": "fwd+bwd" if backward else "fwd", "dim": budget.dim, "heads": budget.heads,
                       "kwargs": spec.bench_kwargs}
                if progress:
                    progress(f"memory {spec.id} {track} n={n}")
                res = server.run("attnlab.bench.memory:measure", dict(mechanism=spec.id, track=track, size=size,
                                 causal=causal, dim=budget.dim, heads=budget.heads, backward=backward))
                if "error" in res:
                    records.append(make_record("memory", spec.id, cfg, "error", None, note=res["error"]))
                    break  # larger sizes would fail the same way
                inc = max(res["peak_rss_mib"] - res["base_rss_mib"], 0.0)
                records.append(make_record("memory", spec.id, cfg, "peak_mib", inc, "MiB",
                                           peak_rss_mib=res["peak_rss_mib"], base_rss_mib=res["base_rss_mib"]))
                pts.append((n, inc))
            slope = loglog_slope([p[0] for p in pts], [p[1] for p in pts])
            if slope is not None:
                records.append(make_record("memory", spec.id, {"track": track, "causal": causal,
                                                               "n_range": [pts[0][0], pts[-1][0]]},
                                           "memory_exponent", slope, "", **growth_details(pts)))
    return records
