"""Measurement primitives shared by every bench suite (method: BENCHMARKS.md).

- :func:`time_call`: warm-up, then the median (and min/max) of repeats.
- :func:`run_isolated`: run one configuration in a fresh Python process and read its RSS high-water mark
  (``resource.getrusage``), because tracemalloc does not see torch's allocator and a process's peak never
  goes down.
- :func:`matmul_roofline`: fp32 GEMM GFLOP/s at 2048^2, measured in the same run, to quote fractions of it.
- :func:`make_record` / :func:`write_json`: the result schema (docs/bench.md) and an atomic writer, so an
  interrupted run never leaves a half-written file.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..files import write_atomic  # noqa: F401  (re-exported: the suites write through it)

SCHEMA_VERSION = 1


def time_call(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5, min_time: float = 0.0) -> dict:
    """Seconds per call of ``fn``: ``{"median", "min", "max", "repeats"}`` after ``warmup`` calls.

    With ``min_time``, fast calls are repeated until the repeats together take at least that long.
    """
    for _ in range(warmup):
        fn()
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_time and len(times) < 1000):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {"median": statistics.median(times), "min": min(times), "max": max(times), "repeats": len(times)}


def time_interleaved(fns: dict[str, Callable[[], Any]], *, warmup: int = 1, repeats: int = 5) -> dict[str, dict]:
    """Median/min/max seconds per call of each function, timed in rounds (each round calls every function once,
    the order rotating), so that load changes on a shared machine hit all sides alike."""
    names = list(fns)
    for _ in range(warmup):
        for f in fns.values():
            f()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t0)
    return {n: {"median": statistics.median(t), "min": min(t), "max": max(t), "repeats": len(t)}
            for n, t in times.items()}


def peak_rss_mib() -> float:
    """This process's RSS high-water mark in MiB (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def current_rss_mib() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:  # not Linux: fall back to the high-water mark
        return peak_rss_mib()


def matmul_roofline(n: int = 2048, repeats: int = 5) -> float:
    """fp32 GEMM GFLOP/s at n x n, median of repeats."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    t = time_call(lambda: a @ b, warmup=2, repeats=repeats)["median"]
    return 2 * n**3 / t / 1e9


def bench_env() -> dict[str, str]:
    """Environment for measurement subprocesses: transparent huge pages on for torch's CPU allocator, so that
    naive baselines are not limited by page faults on fresh large tensors (BENCHMARKS.md)."""
    env = dict(os.environ)
    env.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    return env


def run_isolated(target: str, kwargs: dict, *, timeout: float = 1800.0) -> dict:
    """Run ``target`` ("package.module:function") with ``kwargs`` in a fresh interpreter.

    The function returns a JSON-able dict; this adds ``peak_rss_mib`` (the child's high-water mark) and
    ``base_rss_mib`` (its RSS just before the call, after imports), or returns ``{"error": ...}``.
    """
    payload = json.dumps({"target": target, "kwargs": kwargs})
    try:
        proc = subprocess.run([sys.executable, "-m", "attnlab.bench.harness"], input=payload, capture_output=True,
                              text=True, timeout=timeout, env=bench_env())
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if not lines:
        return {"error": "no result printed"}
    return json.loads(lines[-1])


def _call(req: dict) -> dict:
    module, func = req["target"].split(":")
    fn = getattr(importlib.import_module(module), func)
    base = current_rss_mib()
    result = fn(**req["kwargs"])
    result.setdefault("peak_rss_mib", peak_rss_mib())  # a target may read it itself before extra checks
    result["base_rss_mib"] = base
    return result


def _child_main() -> None:
    print(json.dumps(_call(json.loads(sys.stdin.read()))))


class ForkServer:
    """Fresh processes for memory measurements without paying the interpreter and torch start-up each time.

    A server process imports torch and attnlab, runs nothing, and forks one child per request; each child
    starts from the server's small footprint, so its RSS high-water mark is that configuration's own peak
    (``base_rss_mib`` is the child's RSS before the call). The server never runs torch ops itself, so its
    children start with no OpenMP thread pool to inherit.
    """

    def __init__(self, timeout: float = 1800.0) -> None:
        self.timeout = timeout
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> "ForkServer":
        self.proc = subprocess.Popen([sys.executable, "-m", "attnlab.bench.harness", "--serve"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=bench_env(), bufsize=1)
        return self

    def run(self, target: str, kwargs: dict) -> dict:
        assert self.proc is not None and self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(json.dumps({"target": target, "kwargs": kwargs, "timeout": self.timeout}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            return {"error": "the measurement server exited"}
        return json.loads(line)

    def __exit__(self, *exc) -> None:
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def _serve() -> None:
    import signal

    import attnlab.mechanisms  # noqa: F401  (import everything once, before forking)

    for line in sys.stdin:
        req = json.loads(line)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # child: one measurement, then exit without running the server's cleanup
            os.close(r)
            signal.alarm(int(req.get("timeout", 1800)))
            try:
                out = _call(req)
            except BaseException as e:  # noqa: BLE001 - reported to the caller
                out = {"error": f"{type(e).__name__}: {e}"}
            os.write(w, (json.dumps(out) + "\n").encode())
            os._exit(0)
        os.close(w)
        with os.fdopen(r) as f:
            data = f.read().strip()
        _, status = os.waitpid(pid, 0)
        if not data:
            sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
            why = "timed out" if sig == signal.SIGALRM else f"died (signal {sig}, status {status})"
            data = json.dumps({"error": f"measurement process {why}; out of memory?" if sig == 9 else
                               f"measurement process {why}"})
        print(data, flush=True)


def machine_info() -> dict:
    """What the numbers were measured on."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    from .. import __version__
    from ..ops import native

    return {
        "cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(), "torch": torch.__version__, "attnlab": __version__,
        "platform": platform.platform(),
        "native_kernel": native.status(),  # tile / window attention: fused CPU kernel ("ok") or SDPA (why not)
    }


def make_record(suite: str, mechanism: str, config: dict, metric: str, value: float | None, unit: str = "",
                **extra: Any) -> dict:
    """One measurement (schema in docs/bench.md). Machine and versions are stored once per results file."""
    rec = {"suite": suite, "mechanism": mechanism, "config": config, "metric": metric, "value": value,
           "unit": unit, "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
    rec.update(extra)
    return rec


def write_json(path: str | Path, records: list[dict], meta: dict | None = None) -> Path:
    """Write ``{"schema", "machine", "meta", "records"}`` atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"schema": SCHEMA_VERSION, "machine": machine_info(), "meta": meta or {}, "records": records}
    write_atomic(path, json.dumps(doc, indent=1, default=str))
    return path


def loglog_slope(xs: list[float], ys: list[float]) -> float | None:
    """Least-squares slope of log(y) against log(x): the growth exponent (None with fewer than 2 points)."""
    import math

    pts = [(math.log(x), math.log(y)) for x, y in zip(xs, ys) if x > 0 and y is not None and y > 0]
    if len(pts) < 2:
        return None
    mx = sum(p[0] for p in pts) / len(pts)
    my = sum(p[1] for p in pts) / len(pts)
    den = sum((p[0] - mx) ** 2 for p in pts)
    return sum((p[0] - mx) * (p[1] - my) for p in pts) / den if den else None


if __name__ == "__main__":
    _serve() if "--serve" in sys.argv else _child_main()
