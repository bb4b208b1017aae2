"""`attnlab bench scan` at tiny sizes: every record it promises is there, the derived numbers follow from the
timings, and the report and the CLI show them. No timing assertions (the machine is shared)."""

import json
import sys

import pytest

from attnlab.bench import report, scan
from attnlab.bench.harness import loglog_slope, write_json


@pytest.fixture(scope="module")
def records():
    return scan.run_scan_bench(ns=(64, 128, 256), contexts=(16, 48), repeats=1, decode_steps=2,
                               decode_mechanisms=("linear-attention", "mha"))


def _by(records, metric):
    return [r for r in records if r["metric"] == metric]


def test_every_measurement_is_recorded(records):
    assert not _by(records, "error"), _by(records, "error")
    times = _by(records, "time_s")
    assert {(r["mechanism"], r["config"]["n"]) for r in times} == {
        (impl, n) for impl in (scan.SCAN, scan.SDPA) for n in (64, 128, 256)}
    assert all(r["config"]["threads"] == 1 and r["config"]["causal"] for r in times)
    decode = _by(records, "decode_s_per_token")
    assert {(r["mechanism"], r["config"]["context"]) for r in decode} == {
        (m, c) for m in ("linear-attention", "mha") for c in (16, 48)}
    assert {r["mechanism"] for r in _by(records, "decode_ratio")} == {"linear-attention", "mha"}
    assert {r["mechanism"] for r in _by(records, "loglog_slope")} == {scan.SCAN, scan.SDPA}
    assert len(_by(records, "crossover_n")) == 1


def test_derived_numbers_follow_from_the_timings(records):
    t = {(r["mechanism"], r["config"]["n"]): r["value"] for r in _by(records, "time_s")}
    for r in _by(records, "speed_vs_sdpa"):
        n = r["config"]["n"]
        assert r["value"] == pytest.approx(t[(scan.SDPA, n)] / t[(scan.SCAN, n)])
    for r in _by(records, "loglog_slope"):
        assert r["value"] == pytest.approx(loglog_slope([64, 128, 256], [t[(r["mechanism"], n)]
                                                                          for n in (64, 128, 256)]))
    cross = _by(records, "crossover_n")[0]["value"]
    assert cross == scan.crossover([64, 128, 256], [t[(scan.SCAN, n)] for n in (64, 128, 256)],
                                   [t[(scan.SDPA, n)] for n in (64, 128, 256)])
    # the recurrent state does not grow with the context; mha's KV cache does
    state = {(r["mechanism"], r["config"]["context"]): r["value"] for r in _by(records, "decode_state_mib")}
    assert state[("linear-attention", 16)] == state[("linear-attention", 48)]
    assert state[("mha", 48)] > state[("mha", 16)]


def test_crossover_is_the_start_of_the_final_faster_run():
    ns = [1, 2, 3, 4, 5]
    assert scan.crossover(ns, [5, 1, 5, 1, 1], [3, 3, 3, 3, 3]) == 4  # faster at 2, slower at 3: not from 2
    assert scan.crossover(ns, [5, 5, 5, 5, 5], [1, 1, 1, 1, 1]) is None
    assert scan.crossover(ns, [1, 1, 1, 1, 1], [2, 2, 2, 2, 2]) == 1
    assert scan.crossover(ns, [1, None, 1, 1, 1], [2, 2, 2, 2, 2]) == 1  # a missing point is skipped


def test_tables_and_report_show_the_suite(tmp_path, records):
    fh, fr, dh, dr, summary = scan.scan_tables(records)
    assert [row[0] for row in fr] == ["64", "128", "256"] and len(dr) == 4
    assert any("crossover" in s for s in summary) and any("log-log slope" in s for s in summary)
    write_json(tmp_path / "scan.json", records, meta={"suite": "scan"})
    html = report.render_html(report.load_results(tmp_path))
    assert "Linear-attention scan vs causal SDPA" in html and "linear_attention[chunked]" in html


def test_cli_runs_the_scan_suite(tmp_path, monkeypatch):
    from attnlab.cli import main

    monkeypatch.setattr(sys, "argv", ["attnlab", "bench", "scan", "--quick", "--n", "64,128", "--contexts", "8,16",
                                      "--repeats", "1", "--out", str(tmp_path)])
    assert main() == 0
    doc = json.loads((tmp_path / "scan.json").read_text())
    assert doc["meta"]["suite"] == "scan" and doc["meta"]["ns"] == [64, 128]
    assert (tmp_path / "index.html").is_file()
