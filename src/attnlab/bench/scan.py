"""`attnlab bench scan`: the linear-attention scan's targets (issue 5) measured in one run.

(a) The chunked causal forward of :func:`attnlab.ops.linear.linear_attention` with linear attention's feature map
    (``phi = elu + 1`` on q and k, timed together with the scan) at N = 1k .. 32k: time per call and the log-log
    slope of time against N (target <= 1.1: linear).
(b) Causal torch SDPA on the same inputs at the same N, in the same run, and the crossover: the first N from which
    the scan is faster at that N and at every larger N measured.
(c) Decoding: per-token time of ``linear-attention`` and ``lightning-attention`` (and of ``mha``, whose KV cache
    grows, for contrast) continuing a :class:`~attnlab.mechanisms.KVCache` prefilled with 1k and 16k tokens.
    A recurrent mechanism's state is O(1), so the target is a ratio 16k / 1k close to 1.

Inputs: B=1, 8 heads, head dim 64, fp32, no grad. Every (what, N) is timed in its own forked process
(:class:`~attnlab.bench.harness.ForkServer`: a fresh process per configuration, without paying the torch import
each time); medians over repeats after a warm-up call. Records: docs/bench.md, suite ``"scan"``.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from .harness import ForkServer, loglog_slope, make_record, time_call

SCAN = "linear_attention[chunked]"
SDPA = "sdpa[causal]"
DECODE_MECHANISMS = ("linear-attention", "lightning-attention", "mha")
FULL_NS = (1024, 2048, 4096, 8192, 16384, 32768)
QUICK_NS = (1024, 2048, 4096)
FULL_CONTEXTS = (1024, 16384)
QUICK_CONTEXTS = (1024, 4096)


def measure_forward(impl: str, n: int, heads: int = 8, head_dim: int = 64, chunk_size: int = 64, repeats: int = 5,
                    warmup: int = 1, threads: int | None = None) -> dict:
    """Child-process body: one causal forward of the scan (``impl == SCAN``) or of SDPA (``impl == SDPA``)."""
    from ..ops.linear import elu_plus_one, linear_attention

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, heads, n, head_dim) for _ in range(3))
    if impl == SCAN:
        def call():
            return linear_attention(elu_plus_one(q), elu_plus_one(k), v, causal=True, form="chunked",
                                    chunk_size=chunk_size)
    elif impl == SDPA:
        def call():
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    else:
        raise ValueError(f"measure_forward impl: expected {SCAN!r} or {SDPA!r}, received {impl!r}")
    with torch.no_grad():
        t = time_call(call, warmup=warmup, repeats=repeats)
    return {"time": t}


def measure_decode(mechanism: str, context: int, heads: int = 8, head_dim: int = 64, steps: int = 32,
                   warmup: int = 4, threads: int | None = None) -> dict:
    """Child-process body: prefill a :class:`KVCache` with ``context`` tokens (one chunked forward), then time
    ``warmup + steps`` single-token forwards; returns the median per-token time of the last ``steps``."""
    import attnlab
    from ..mechanisms import KVCache

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    dim = heads * head_dim
    m = attnlab.create(mechanism, dim=dim, heads=heads).eval()
    cache = KVCache()
    with torch.no_grad():
        m(torch.randn(1, context, dim), causal=True, cache=cache)
        tokens = torch.randn(warmup + steps, 1, 1, dim)
        it = iter(tokens)
        t = time_call(lambda: m(next(it), causal=True, cache=cache), warmup=warmup, repeats=steps)
    state_bytes = sum(x.numel() * x.element_size() for x in _tensors(cache))
    return {"time": t, "state_mib": state_bytes / 2**20, "context_after": int(cache.seq_len)}


def _tensors(cache) -> list[torch.Tensor]:
    """Every tensor a cache holds (keys/values and mechanism states), to report the decoding state's size."""
    out, todo = [], [cache.keys, cache.values] + list(cache.state.values())
    while todo:
        x = todo.pop()
        if isinstance(x, torch.Tensor):
            out.append(x)
        elif isinstance(x, (tuple, list)):
            todo.extend(x)
    return out


def crossover(ns: list[int], scan: list[float | None], sdpa: list[float | None]) -> int | None:
    """The first N from which the scan is faster than SDPA at that N and at every larger N measured (None if never)."""
    found = None
    for n, a, b in zip(ns, scan, sdpa):
        if a is None or b is None:
            continue
        if a < b:
            found = n if found is None else found
        else:
            found = None
    return found


def run_scan_bench(ns=FULL_NS, contexts=FULL_CONTEXTS, *, heads: int = 8, head_dim: int = 64, chunk_size: int = 64,
                   repeats: int = 5, decode_steps: int = 32, decode_mechanisms=DECODE_MECHANISMS,
                   threads: int | None = 1, progress: Callable[[str], None] | None = None) -> list[dict]:
    """Measure (a), (b) and (c); return the records (suite ``"scan"``).

    ``threads``: torch threads in every measurement (None: torch's default). The default is 1 because on a shared
    machine a multi-threaded op waits for its other OpenMP threads to be scheduled: under a load of ~5 on 2 cores
    every small op cost ~15 ms with 2 threads (a 256-token scan 0.24 s instead of 6 ms), which measures the
    neighbours, not the scan. Scan and SDPA always run with the same count.
    """
    records: list[dict] = []
    base = {"batch": 1, "heads": heads, "head_dim": head_dim, "dtype": "float32",
            "threads": threads or torch.get_num_threads()}
    times: dict[str, list[float | None]] = {SCAN: [], SDPA: []}
    with ForkServer() as server:
        for n in ns:
            for impl in (SCAN, SDPA):
                if progress:
                    progress(f"{impl} n={n}")
                cfg = {**base, "n": n, "causal": True, "pass": "fwd"}
                if impl == SCAN:
                    cfg.update(chunk_size=chunk_size, feature_map="elu+1")
                res = server.run("attnlab.bench.scan:measure_forward",
                                 dict(impl=impl, n=n, heads=heads, head_dim=head_dim, chunk_size=chunk_size,
                                      repeats=repeats, warmup=1, threads=threads))
                if "error" in res:
                    records.append(make_record("scan", impl, cfg, "error", None, note=res["error"]))
                    times[impl].append(None)
                    continue
                t = res["time"]
                times[impl].append(t["median"])
                records.append(make_record("scan", impl, cfg, "time_s", t["median"], "s", min=t["min"], max=t["max"],
                                           repeats=t["repeats"]))
            a, b = times[SCAN][-1], times[SDPA][-1]
            if a is not None and b is not None:
                records.append(make_record("scan", SCAN, {**base, "n": n, "causal": True, "pass": "fwd"},
                                           "speed_vs_sdpa", b / a, "x"))
        span = {"ns": list(ns), **base, "causal": True, "pass": "fwd"}
        for impl in (SCAN, SDPA):
            slope = loglog_slope(list(ns), times[impl])
            records.append(make_record("scan", impl, span, "loglog_slope", slope, "",
                                       note=f"least-squares slope of log time vs log N over N = {ns[0]}..{ns[-1]}"))
        cross = crossover(list(ns), times[SCAN], times[SDPA])
        records.append(make_record("scan", SCAN, span, "crossover_n", cross, "tokens",
                                   note="first N from which the scan is faster than causal SDPA (None: never in "
                                        "the measured range)"))
        for mech in decode_mechanisms:
            per_token: dict[int, float] = {}
            fastest: dict[int, float] = {}
            for ctx in contexts:
                if progress:
                    progress(f"decode {mech} context={ctx}")
                cfg = {**base, "context": ctx, "steps": decode_steps}
                res = server.run("attnlab.bench.scan:measure_decode",
                                 dict(mechanism=mech, context=ctx, heads=heads, head_dim=head_dim, steps=decode_steps,
                                      threads=threads))
                if "error" in res:
                    records.append(make_record("scan", mech, cfg, "error", None, note=res["error"]))
                    continue
                t = res["time"]
                per_token[ctx], fastest[ctx] = t["median"], t["min"]
                records += [
                    make_record("scan", mech, cfg, "decode_s_per_token", t["median"], "s", min=t["min"], max=t["max"],
                                repeats=t["repeats"]),
                    make_record("scan", mech, cfg, "decode_state_mib", res["state_mib"], "MiB"),
                ]
            if len(per_token) >= 2:
                lo, hi = min(per_token), max(per_token)
                # the ratio of minima too: under load, preemptions (~10 ms) land in single-token medians
                records.append(make_record("scan", mech, {**base, "contexts": [lo, hi]}, "decode_ratio",
                                           per_token[hi] / per_token[lo], "x", ratio_of_mins=fastest[hi] / fastest[lo],
                                           note=f"per-token decode time at {hi} / at {lo} tokens of context"))
    return records


def scan_tables(records: list[dict]) -> tuple[list[str], list[list[str]], list[str], list[list[str]], list[str]]:
    """Forward table (header, rows), decode table (header, rows) and summary lines for the terminal and the report."""
    fwd: dict[int, dict] = {}
    dec: dict[tuple[str, int], dict] = {}
    summary = []
    for r in records:
        c = r["config"]
        if r["metric"] in ("time_s", "speed_vs_sdpa") or (r["metric"] == "error" and "n" in c):
            fwd.setdefault(c["n"], {})[(r["mechanism"], r["metric"])] = r
        elif r["metric"] in ("decode_s_per_token", "decode_state_mib") or (r["metric"] == "error" and "context" in c):
            dec.setdefault((r["mechanism"], c["context"]), {})[r["metric"]] = r
        elif r["metric"] == "loglog_slope":
            v = r["value"]
            summary.append(f"{r['mechanism']}: log-log slope {'-' if v is None else f'{v:.3f}'} over N = "
                           f"{c['ns'][0]}..{c['ns'][-1]}")
        elif r["metric"] == "crossover_n":
            summary.append(f"crossover: the scan is faster than causal SDPA from N = {r['value']} on"
                           if r["value"] is not None else "crossover: the scan is not faster than SDPA in this range")
        elif r["metric"] == "decode_ratio":
            lo, hi = c["contexts"]
            mins = r.get("ratio_of_mins")
            summary.append(f"{r['mechanism']}: decode per token at {hi} / {lo} context = {r['value']:.2f}x (medians)"
                           + ("" if mins is None else f", {mins:.2f}x (minima)"))

    def ms(m, key):
        rec = m.get(key)
        return "-" if rec is None or rec["value"] is None else f"{rec['value'] * 1e3:.2f}"

    fwd_header = ["N", "scan ms", "SDPA ms", "scan speed vs SDPA"]
    fwd_rows = []
    for n in sorted(fwd):
        m = fwd[n]
        sp = m.get((SCAN, "speed_vs_sdpa"))
        fwd_rows.append([str(n), ms(m, (SCAN, "time_s")), ms(m, (SDPA, "time_s")),
                         "-" if sp is None else f"{sp['value']:.2f}x"])
    dec_header = ["mechanism", "context", "ms / token", "min ms", "state MiB"]
    dec_rows = []
    for (mech, ctx), m in sorted(dec.items(), key=lambda kv: (DECODE_MECHANISMS.index(kv[0][0])
                                                              if kv[0][0] in DECODE_MECHANISMS else 99, kv[0][1])):
        if "error" in m:
            dec_rows.append([mech, str(ctx), "error", "-", m["error"]["note"]])
            continue
        st, t = m.get("decode_state_mib"), m.get("decode_s_per_token")
        dec_rows.append([mech, str(ctx), ms(m, "decode_s_per_token"), "-" if t is None else f"{t['min'] * 1e3:.2f}",
                         "-" if st is None else f"{st['value']:.2f}"])
    return fwd_header, fwd_rows, dec_header, dec_rows, summary


def is_linear(slope: float | None, limit: float = 1.1) -> bool:
    """The issue's target on the slope (reported, never asserted in tests: timings are noisy)."""
    return slope is not None and math.isfinite(slope) and slope <= limit
