"""bench/harness.py and the ops bench: measurement primitives and result files."""

import json
import math

import pytest

from attnlab.bench import harness
from attnlab.bench.ops import ops_table_rows, run_ops_bench


def test_time_call_reports_median_min_max():
    calls = []
    t = harness.time_call(lambda: calls.append(1), warmup=2, repeats=5)
    assert len(calls) == 7 and t["repeats"] == 5
    assert t["min"] <= t["median"] <= t["max"]


def test_loglog_slope_recovers_exponent():
    xs = [256, 512, 1024, 2048]
    assert math.isclose(harness.loglog_slope(xs, [x**2 * 3.0 for x in xs]), 2.0)
    assert math.isclose(harness.loglog_slope(xs, [x * 0.5 for x in xs]), 1.0)
    assert harness.loglog_slope([1], [1]) is None


def test_write_json_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "r.json"
    harness.write_json(path, [harness.make_record("s", "m", {}, "x", 1.0)])
    before = path.read_text()

    def boom(*a, **k):
        raise KeyboardInterrupt  # interrupted mid-write

    monkeypatch.setattr(harness.os, "replace", boom)
    with pytest.raises(KeyboardInterrupt):
        harness.write_json(path, [harness.make_record("s", "m", {}, "x", 2.0)])
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary file left behind
    doc = json.loads(before)
    assert doc["schema"] == harness.SCHEMA_VERSION and "torch" in doc["machine"]
    assert "native_kernel" in doc["machine"]  # which path local attention took


def test_run_isolated_reports_errors():
    res = harness.run_isolated("attnlab.bench.ops:measure", dict(impl="no-such-op", n=8, causal=False,
                                                                 backward=False))
    assert "error" in res and "AttributeError" in res["error"]


def test_ops_bench_measures_in_subprocesses():
    recs = run_ops_bench((64,), causal_modes=(True,), passes=("fwd+bwd",), impls=("sdpa", "chunked_attention"),
                         repeats=1, heads=2, head_dim=8)
    metrics = {(r["mechanism"], r["metric"]) for r in recs}
    assert ("chunked_attention", "speed_vs_sdpa") in metrics and ("sdpa", "peak_rss_mib") in metrics
    err = next(r for r in recs if r["metric"] == "max_abs_err_vs_sdpa")
    assert err["value"] < 1e-5
    rows = ops_table_rows(recs)
    assert [r[0] for r in rows] == ["sdpa", "chunked_attention"]


def test_time_interleaved_times_every_function_in_rotating_rounds():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("a", "b", "c")}
    out = harness.time_interleaved(fns, warmup=1, repeats=3)
    assert calls[:3] == ["a", "b", "c"]  # warm-up
    assert calls[3:] == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]  # each round starts one later
    assert set(out) == {"a", "b", "c"} and all(v["repeats"] == 3 and v["min"] <= v["median"] <= v["max"]
                                                for v in out.values())
