"""The inspect report of both real models, every analysis, opened in headless Chromium (slow)."""

from __future__ import annotations

import json
import subprocess
import tempfile

import pytest

from attnlab.analysis.inspect import run_inspect, write_inspect

from ..bench.test_report_browser import CHROMIUM, FLAGS, _not_blank, open_in_chromium

pytestmark = pytest.mark.slow

EVIL = '<script>document.title="pwned"</script> Attention sinks & heads. '


def test_inspect_report_renders_offline_and_escapes_input(real_model, tmp_path):
    from attnlab.analysis.text import eval_text

    text = EVIL + eval_text(0, chars=800).text
    run = run_inspect(real_model.info.name, lm=real_model, text=text, max_tokens=96)
    assert not run.failed, run.failed
    _, page = write_inspect(run, tmp_path)
    image, requested = open_in_chromium(page, tmp_path)
    assert _not_blank(image)
    assert requested == []
    with tempfile.TemporaryDirectory() as profile:
        dom = subprocess.run([CHROMIUM, *FLAGS, f"--user-data-dir={profile}", "--dump-dom", page.resolve().as_uri()],
                             capture_output=True, text=True, timeout=120, check=True).stdout
    assert "pwned" not in dom.split("</title>")[0]  # the script in the input never ran
    assert "<script" not in dom.split("<body")[1]  # and no script element came from the input
    doc = json.loads((tmp_path / "inspect.json").read_text())
    assert set(doc["analyses"]) == set(run.results) and all(doc["findings"].values())
