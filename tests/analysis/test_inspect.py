"""The inspect runner and command: results, skips and failures reach the JSON and the page; input text is escaped."""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
from html import escape

from attnlab.analysis import base
from attnlab.analysis.inspect import render_inspect_html, run_inspect, select_analyses, write_inspect
from attnlab.cli import main

EVIL = '<script>document.title="pwned"</script> & <b>bold</b>'


@dataclass
class _Echo(base.Result):
    n: int = 0
    first: str = ""

    def findings(self):
        return [f"saw {self.n} tokens; first is {self.first}"]

    def sections(self):
        from attnlab.htmlkit import table

        return [table(["token"], [[self.first]])]


@pytest.fixture
def test_analyses(monkeypatch):
    """Three analyses registered for the duration of a test: one that works, one that fails, one that never
    applies (the runner's three paths)."""
    monkeypatch.setattr(base, "ANALYSES", dict(base.ANALYSES))
    import attnlab.analysis.inspect as insp

    monkeypatch.setattr(insp, "ANALYSES", base.ANALYSES)
    base.analysis("t-echo", seeds=("x",), summary="echo")(lambda lm, inp: _Echo(model=lm.info.name, n=inp.n,
                                                                                 first=inp.tokens[1]))
    base.analysis("t-fail", seeds=("x",), summary="fails")(lambda lm, inp: 1 / 0)
    base.analysis("t-never", seeds=("x",), summary="never", applies=lambda info: False,
                  why_not="needs something this model lacks")(lambda lm, inp: None)


def test_runner_records_results_skips_and_failures(minilm, tmp_path, test_analyses):
    run = run_inspect("minilm", lm=minilm, text=EVIL + " the end", analyses="t-echo,t-fail,t-never", max_tokens=32)
    assert list(run.results) == ["t-echo"] and run.results["t-echo"].n == len(run.tokens)
    assert run.skipped == {"t-never": "needs something this model lacks"}
    assert run.failed["t-fail"].startswith("ZeroDivisionError")
    js, page = write_inspect(run, tmp_path)
    doc = json.loads(js.read_text())
    assert doc["model"]["layers"] == minilm.info.layers and doc["findings"]["t-echo"][0].startswith("saw")
    assert doc["failed"].keys() == {"t-fail"} and doc["inputs"]["kind"] == "user"
    html = page.read_text()
    # the input text (as the tokenizer gives it back) and the tokens are escaped
    assert "<script" not in html and "<b>" not in html and escape(run.text) in html and "&lt;" in html
    assert "attention maps" in html.lower() and "data:image/png;base64," in html
    assert not list(tmp_path.glob(".*.tmp"))


def test_default_text_is_the_fixed_evaluation_text(minilm, test_analyses):
    a = run_inspect("minilm", lm=minilm, analyses="t-echo", max_tokens=24, seed=1)
    b = run_inspect("minilm", lm=minilm, analyses="t-echo", max_tokens=24, seed=1)
    assert a.tokens == b.tokens and len(a.tokens) == 24 and a.inputs["kind"] == "eval_text"
    assert a.inputs["sha256"] and a.inputs["python"]
    assert "Findings" in render_inspect_html(a)


def test_select_analyses_checks_names():
    assert select_analyses("all") == list(base.ANALYSES)
    with pytest.raises(ValueError, match="--analyses: expected names from"):
        select_analyses("no-such-analysis")


def test_command_errors_are_clear(capsys, tmp_path):
    assert main(["inspect", "--model", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]) == 2
    assert "local Hugging Face model directory" in capsys.readouterr().out
    assert main(["inspect", "--model", "minilm", "--analyses", "nope"]) == 2
    assert "expected names from" in capsys.readouterr().out
    assert main(["inspect"]) == 2
    assert main(["inspect", "--model", "minilm", "--text-file", str(tmp_path / "none.txt")]) == 2
    assert "--text-file: expected a readable file" in capsys.readouterr().out
    assert not (tmp_path / "o").exists()  # nothing written on a failed start


def test_command_lists_analyses(capsys):
    assert main(["inspect", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in base.ANALYSES)
