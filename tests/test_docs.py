"""The README and the doc pages: code blocks run as written, the mechanism table is current, every
registered mechanism has a page."""

import re
import runpy
import sys
from pathlib import Path

import pytest

import attnlab

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import update_readme  # noqa: E402


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), flags=re.S)


def run_block(code: str, where: str, tmp_path: Path) -> None:
    script = tmp_path / "block.py"
    script.write_text(code)
    try:
        runpy.run_path(str(script), run_name="__main__")
    except Exception as e:  # noqa: BLE001 - report which block failed
        raise AssertionError(f"code block in {where} failed: {type(e).__name__}: {e}\n---\n{code}") from e


def test_readme_code_blocks_run(tmp_path):
    blocks = python_blocks(ROOT / "README.md")
    assert blocks, "README.md has no python code block"
    for code in blocks:
        run_block(code, "README.md", tmp_path)


def test_readme_mechanism_table_is_current():
    text = (ROOT / "README.md").read_text()
    assert update_readme.START in text and update_readme.END in text
    assert update_readme.render(text) == text, "README mechanism table is stale: run `make readme`"


SPECS = attnlab.list_mechanisms()


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.id)
def test_every_mechanism_has_a_doc_page_with_a_running_example(spec, tmp_path):
    page = ROOT / spec.doc_path
    assert page.is_file(), f"{spec.id} is registered without {spec.doc_path}"
    text = page.read_text()
    assert text.startswith(f"# {spec.id}"), f"{spec.doc_path} should open with '# {spec.id}'"
    if spec.arxiv:
        assert spec.arxiv in text, f"{spec.doc_path} does not cite arXiv {spec.arxiv}"
    blocks = python_blocks(page)
    assert blocks, f"{spec.doc_path} has no python example"
    for code in blocks:
        run_block(code, spec.doc_path, tmp_path)


def test_no_orphan_doc_pages():
    ids = {s.id for s in SPECS}
    orphans = [p.name for p in (ROOT / "docs" / "mechanisms").glob("*.md") if p.stem not in ids]
    assert not orphans, f"doc pages without a registered mechanism: {orphans}"


ANALYSIS_PAGES = sorted((ROOT / "docs" / "analysis").glob("*.md"))


@pytest.mark.parametrize("page", ANALYSIS_PAGES, ids=lambda p: p.name)
def test_analysis_pages_run(page, tmp_path):
    pytest.importorskip("transformers")
    for code in python_blocks(page):
        run_block(code, str(page.relative_to(ROOT)), tmp_path)


def test_every_analysis_is_documented():
    from attnlab.analysis import ANALYSES

    text = "\n".join(p.read_text() for p in ANALYSIS_PAGES)
    missing = [name for name in ANALYSES if f"`{name}`" not in text]
    assert not missing, f"analyses without a doc section in docs/analysis/: {missing}"
    links = re.findall(r"\]\(([\w-]+\.md)\)", (ROOT / "docs" / "analysis" / "index.md").read_text())
    assert all((ROOT / "docs" / "analysis" / link).is_file() for link in links), links
