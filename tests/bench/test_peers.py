"""The peers suite: other libraries beside attnlab on the same inputs (skipped with one line when absent)."""

import importlib.util
import os

import pytest

from attnlab.bench import peers

BIFORMER_SRC = os.environ.get(peers.BIFORMER_ENV)


@pytest.mark.skipif(importlib.util.find_spec("natten") is None, reason="NATTEN not installed (make installs it)")
def test_natten_peer_agrees_with_neighborhood_attention():
    recs = {r["metric"]: r for r in peers.natten_neighborhood(side=12, kernel=5, heads=2, head_dim=8, repeats=1)}
    assert recs["max_abs_diff"]["value"] < 1e-5
    assert recs["speed_vs_peer"]["value"] > 0


@pytest.mark.skipif(importlib.util.find_spec("local_attention") is None, reason="local-attention not installed")
def test_lucidrains_local_attention_equals_the_causal_band():
    recs = {r["metric"]: r for r in peers.lucidrains_local(n=64, window=16, heads=2, head_dim=8, repeats=1)}
    assert recs["max_abs_diff"]["value"] < 1e-5


@pytest.mark.skipif(peers._fla_naive("based") is None, reason="fla-core not installed (make installs it)")
def test_fla_peers_agree_with_the_linear_scan():
    recs = peers.fla_linear(n=96, heads=2, head_dim=16, repeats=1)
    diffs = {r["mechanism"]: r["value"] for r in recs if r["metric"] == "max_abs_diff"}
    assert set(diffs) == {"linear-attention", "based"}
    assert all(d < 1e-4 for d in diffs.values()), diffs


def test_missing_peer_is_one_skipped_record(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name in ("natten", "fla", "local_attention") else real(name, *a))
    monkeypatch.delenv(peers.BIFORMER_ENV, raising=False)
    recs = peers.run_peers(quick=True)
    skipped = [r for r in recs if r["metric"] == "skipped"]
    assert len(skipped) == 5
    assert all("install" in r["note"] for r in skipped if r["mechanism"] != "biformer")
    (bif,) = [r for r in skipped if r["mechanism"] == "biformer"]
    assert "git clone https://github.com/rayleizhu/BiFormer" in bif["note"] and peers.BIFORMER_ENV in bif["note"]


# ---- official BiFormer: loaded from a checkout the user names; never vendored, never mocked


def test_biformer_loader_says_what_is_missing(tmp_path, monkeypatch):
    monkeypatch.delenv(peers.BIFORMER_ENV, raising=False)
    with pytest.raises(peers.PeerUnavailable, match="not given.*--biformer-src"):
        peers.load_biformer(None)
    with pytest.raises(peers.PeerUnavailable, match="is not a directory"):
        peers.load_biformer(tmp_path / "nowhere")
    monkeypatch.setenv(peers.BIFORMER_ENV, str(tmp_path / "from-env"))  # the variable is used when no DIR is given
    with pytest.raises(peers.PeerUnavailable, match="from-env' is not a directory"):
        peers.load_biformer()
    with pytest.raises(peers.PeerUnavailable, match="has no ops/bra_legacy.py"):
        peers.load_biformer(tmp_path)


def test_biformer_loader_reports_a_failing_import(tmp_path):
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "bra_legacy.py").write_text("import a_module_that_does_not_exist\n")
    with pytest.raises(peers.PeerUnavailable, match="bra_legacy.py failed: ModuleNotFoundError"):
        peers.load_biformer(tmp_path)


def test_biformer_skip_is_one_record_with_the_reason(tmp_path):
    recs = peers.biformer_official(tmp_path / "nowhere")
    assert [r["metric"] for r in recs] == ["skipped"]
    assert recs[0]["mechanism"] == "biformer" and "is not a directory" in recs[0]["note"]


@pytest.mark.skipif(not BIFORMER_SRC, reason=f"set {peers.BIFORMER_ENV} to a checkout of rayleizhu/BiFormer")
def test_official_biformer_agrees_with_attnlab():
    import torch

    before = torch.get_num_threads()
    recs = peers.biformer_official(side=16, n_win=4, topk=2, dim=16, heads=2, side_dwconv=3, repeats=1)
    assert torch.get_num_threads() == before  # the single-thread timing run restores the setting
    assert {r["config"]["threads"] for r in recs} == {before, 1}
    diffs = {r["config"]["peer"]: r["value"] for r in recs if r["metric"] == "max_abs_diff"}
    assert "biformer-official" in diffs and all(d < 1e-5 for d in diffs.values()), diffs
    speeds = {(r["config"]["level"], r["config"]["peer"]) for r in recs if r["metric"] == "speed_vs_peer"}
    assert {("module", "biformer-official"), ("module", "sdpa"), ("core", "sdpa")} <= speeds
    # the loader restores sys.modules: the official nchw file's top-level "ops" package does not leak
    import sys
    assert "ops" not in sys.modules and "ops.torch.rrsda" not in sys.modules
