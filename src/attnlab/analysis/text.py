"""Evaluation text that exists on every machine: the English documentation topics shipped with CPython
(``pydoc_data.topics``, the text behind ``help('assert')`` etc.).

The passages are chosen by a seed, so a run is reproducible on one Python version. The text differs between
CPython versions (the docs change), so :class:`EvalText` carries the Python version and a SHA-256 of the text:
compare results across machines only when those match.
"""

from __future__ import annotations

import hashlib
import random
import re
import sys
from dataclasses import asdict, dataclass

__all__ = ["EvalText", "eval_text", "topic_names"]


@dataclass(frozen=True)
class EvalText:
    text: str
    topics: tuple[str, ...]
    seed: int
    python: str
    sha256: str

    def to_json(self) -> dict:
        d = asdict(self)
        d["chars"] = len(self.text)
        del d["text"]
        return d


def _topics() -> dict[str, str]:
    from pydoc_data.topics import topics

    return topics


def topic_names() -> list[str]:
    """The available topic names, sorted."""
    return sorted(_topics())


def _clean(s: str) -> str:
    s = re.sub(r"\*{2,}|`+", "", s)  # reST markup
    s = re.sub(r"[ \t]+", " ", s)
    s = re.sub(r"\n{3,}", "\n\n", s)
    return s.strip()


def eval_text(seed: int = 0, *, chars: int = 2000, topics: list[str] | None = None) -> EvalText:
    """About ``chars`` characters of English prose from CPython's documentation topics.

    Topics are shuffled with ``seed`` (or taken as given) and concatenated, paragraph by paragraph, keeping
    prose paragraphs (at least 60% letters and spaces, so code listings and grammar rules are skipped) until
    ``chars`` is reached.
    """
    if chars < 1:
        raise ValueError(f"chars: expected a positive number of characters, received {chars}")
    table = _topics()
    if topics is not None:
        missing = [t for t in topics if t not in table]
        if missing:
            raise ValueError(f"topics: expected names from pydoc_data.topics (see topic_names()), received {missing}")
        order = list(topics)
    else:
        order = sorted(table)
        random.Random(seed).shuffle(order)
    parts: list[str] = []
    used: list[str] = []
    total = 0
    for name in order:
        took = False
        for para in table[name].split("\n\n"):
            para = _clean(para)
            if len(para) < 80 or sum(c.isalpha() or c == " " for c in para) < 0.6 * len(para):
                continue
            parts.append(" ".join(para.split()))
            total += len(parts[-1]) + 2
            took = True
            if total >= chars:
                break
        if took:
            used.append(name)
        if total >= chars:
            break
    text = "\n\n".join(parts)[:chars]
    return EvalText(text=text, topics=tuple(used), seed=seed, python=sys.version.split()[0],
                    sha256=hashlib.sha256(text.encode()).hexdigest())
