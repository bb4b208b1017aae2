"""``attnlab inspect``: run the registered analyses on one real model and one text; write JSON and an HTML report.

The report is one self-contained HTML file (plots embedded, no network): the model's attention geometry, the
input (escaped), an overview of attention maps per layer and head, every analysis's findings first and then its
own section (tables, heatmaps, token colouring, plots). ``inspect.json`` holds the same results as data. Both are
written atomically (a temporary file, then a rename), after every analysis has run.
"""

from __future__ import annotations

import argparse
import html
import json
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..files import write_atomic
from ..htmlkit import note, page, table
from .base import ANALYSES, Inputs, jsonable, make_inputs
from .capture import Capture
from .figures import head_grid
from .text import eval_text

__all__ = ["InspectRun", "add_inspect_arguments", "render_inspect_html", "run_inspect", "select_analyses"]


@dataclass
class InspectRun:
    """Everything one inspect run produced (what the JSON and the HTML are made from)."""

    model: dict[str, Any]
    inputs: dict[str, Any]
    tokens: list[str]
    text: str
    results: dict[str, Any] = field(default_factory=dict)  # name -> Result
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why
    failed: dict[str, str] = field(default_factory=dict)  # name -> error
    seconds: dict[str, float] = field(default_factory=dict)
    overview: str = ""  # HTML of the attention-map overview

    def to_json(self) -> dict[str, Any]:
        from ..bench.harness import machine_info

        return {"schema": 1, "machine": machine_info(), "model": self.model, "inputs": self.inputs,
                "tokens": self.tokens, "text": self.text,
                "analyses": {k: v.to_json() for k, v in self.results.items()},
                "findings": {k: v.findings() for k, v in self.results.items()},
                "skipped": self.skipped, "failed": self.failed, "seconds": self.seconds}


def select_analyses(names: str | list[str] | None) -> list[str]:
    """``None``/``"all"`` = every registered analysis; otherwise the comma-separated names, checked."""
    import attnlab.analysis  # noqa: F401  (registers every analysis module)

    if names is None or names == "all" or names == ["all"]:
        return list(ANALYSES)
    wanted = [n.strip() for n in (names.split(",") if isinstance(names, str) else names) if n.strip()]
    unknown = [n for n in wanted if n not in ANALYSES]
    if unknown:
        raise ValueError(f"--analyses: expected names from {sorted(ANALYSES)}, received {unknown}")
    return wanted


def _overview(lm, inp: Inputs, max_layers: int = 6) -> str:
    """Per-layer x head attention maps for up to ``max_layers`` evenly spaced layers (probs captured for those
    layers only)."""
    L = lm.info.layers
    layers = sorted({round(i * (L - 1) / max(1, max_layers - 1)) for i in range(min(L, max_layers))})
    with torch.no_grad(), Capture(lm.model, layers=layers) as cap:
        lm.model(**inp.model_kwargs())
    maps = torch.stack([cap[i]["probs"][0] for i in layers])  # (layers, H, N, N)
    grid = head_grid(maps, title=f"attention probabilities, layers {layers} (rows) x heads (columns); "
                                 "query = row, key = column; square-root colour scale", row_names=layers)
    return "<h2 id=overview>Attention maps</h2>" + grid


def run_inspect(model: str, *, text: str | None = None, seed: int = 0, max_tokens: int = 128,
                analyses: str | list[str] | None = None, progress=None, lm=None) -> InspectRun:
    """Load ``model`` (unless ``lm`` is given), tokenise the text (default: the fixed evaluation text for
    ``seed``), run the selected analyses that apply to the model, and collect their results."""
    from ..models.loaders import load_model

    names = select_analyses(analyses)
    lm = lm if lm is not None else load_model(model)
    if text is None:
        et = eval_text(seed, chars=max_tokens * 8)
        inp = make_inputs(lm, et.text, max_tokens=max_tokens, source={"kind": "eval_text", **et.to_json()})
    else:
        inp = make_inputs(lm, text, max_tokens=max_tokens, source={"kind": "user", "chars": len(text)})
    run = InspectRun(model=lm.info.to_json(), inputs={**inp.source, "tokens": inp.n, "max_tokens": max_tokens},
                     tokens=inp.tokens, text=lm.tokenizer.decode(inp.input_ids[0]))
    step = progress or (lambda msg: None)
    step("overview")
    run.overview = _overview(lm, inp)
    for name in names:
        spec = ANALYSES[name]
        if not spec.applies(lm.info):
            run.skipped[name] = spec.why_not or f"does not apply to {lm.info.name}"
            step(f"{name} (skipped)")
            continue
        step(name)
        t0 = time.perf_counter()
        try:
            run.results[name] = spec.run(lm, inp)
        except Exception as e:  # one failing analysis must not lose the others; it is reported and fails the command
            run.failed[name] = f"{type(e).__name__}: {e}\n" + traceback.format_exc(limit=3)
        run.seconds[name] = round(time.perf_counter() - t0, 2)
    return run


def render_inspect_html(run: InspectRun) -> str:
    info = run.model
    parts = [f"<h1>attnlab inspect: {html.escape(str(info['name']))}</h1>",
             table(["model", "architecture", "layers", "heads", "KV heads", "head dim", "hidden", "context",
                    "causal", "parameters"],
                   [[info["name"], info["architecture"], info["layers"], info["heads"], info["kv_heads"],
                     info["head_dim"], info["hidden"], info["context"], info["causal"], f"{info['parameters']:,}"]]),
             note("Input: " + ", ".join(f"{k}: {v}" for k, v in run.inputs.items() if k != "topics")
                  + (f"; topics: {', '.join(run.inputs['topics'])}" if run.inputs.get("topics") else "")),
             f"<details><summary>Input text ({len(run.tokens)} tokens)</summary><pre class=input>"
             f"{html.escape(run.text)}</pre></details>"]
    nav = " · ".join(f'<a href="#{html.escape(n)}">{html.escape(n)}</a>' for n in run.results)
    parts += [f"<p>{nav}</p>", "<h2 id=findings>Findings</h2>"]
    for name, res in run.results.items():
        lines = res.findings()
        parts.append(f"<h3>{html.escape(name)} <span class=note>({run.seconds.get(name, 0):.1f} s)</span></h3>"
                     + ("<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in lines) + "</ul>" if lines
                        else note("no findings reported")))
    if run.skipped:
        parts += ["<h3>Not applicable</h3>", table(["analysis", "why"], [[k, v] for k, v in run.skipped.items()])]
    if run.failed:
        parts += ["<h3>Failed</h3>", table(["analysis", "error"], [[k, v] for k, v in run.failed.items()])]
    parts.append(run.overview)
    for name, res in run.results.items():
        parts.append(f"<h2 id={html.escape(name)}>{html.escape(name)}</h2>")
        parts.extend(res.sections())
    return page(f"attnlab inspect {info['name']}", parts,
                extra_style="pre.input{white-space:pre-wrap;font-size:12px;background:#f8f8f8;padding:8px}"
                            ".tokens span{padding:0 1px;border-radius:2px}")


def write_inspect(run: InspectRun, out_dir: str | Path) -> tuple[Path, Path]:
    """Write ``inspect.json`` and ``index.html`` in ``out_dir``, each atomically."""
    out = Path(out_dir)
    doc = json.dumps(jsonable(run.to_json()), indent=1, allow_nan=False, default=str)
    page_html = render_inspect_html(run)
    write_atomic(out / "inspect.json", doc)
    write_atomic(out / "index.html", page_html)
    return out / "inspect.json", out / "index.html"


def add_inspect_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="smollm2, minilm, or a local Hugging Face model directory")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--text", help="the text to analyse (default: the fixed evaluation text, see --seed)")
    src.add_argument("--text-file", help="read the text from this file")
    p.add_argument("--seed", type=int, default=0, help="which passages of the evaluation text (default 0)")
    p.add_argument("--max-tokens", type=int, default=128, help="cut the input to this many tokens (default 128)")
    p.add_argument("--analyses", default="all", help="comma-separated analysis names, or 'all' (see --list)")
    p.add_argument("--list", action="store_true", help="list the analyses and exit")
    p.add_argument("--out", help="output directory (default reports/inspect-<model>)")


def cmd_inspect(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from ..cli import make_console

    console = make_console()
    if args.list:
        names = select_analyses("all")
        for n in names:
            s = ANALYSES[n]
            console.print(f"[bold]{n}[/bold]  ({', '.join(s.seeds)})  {s.summary}")
        return 0
    if not args.model:
        console.print("[red]--model: expected smollm2, minilm or a model directory, received nothing[/red]")
        return 2
    try:
        names = select_analyses(args.analyses)
    except ValueError as e:
        console.print(f"[red]{e}[/red]")
        return 2
    text = args.text
    if args.text_file:
        try:
            text = Path(args.text_file).read_text()
        except OSError as e:
            console.print(f"[red]--text-file: expected a readable file, received {args.text_file!r} ({e})[/red]")
            return 2
    out = Path(args.out or f"reports/inspect-{Path(str(args.model)).name}")
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console) as bar:
        task = bar.add_task(f"loading {args.model}", total=len(names) + 1)

        def step(msg: str) -> None:
            bar.update(task, advance=0 if msg == "overview" else 1, description=msg)

        try:
            run = run_inspect(args.model, text=text, seed=args.seed, max_tokens=args.max_tokens, analyses=names,
                              progress=step)
        except (ValueError, ImportError, FileNotFoundError) as e:
            console.print(f"[red]{e}[/red]")
            return 2
        bar.update(task, completed=len(names) + 1, description="done")
    js, page_path = write_inspect(run, out)
    for name, res in run.results.items():
        console.print(f"[bold]{name}[/bold]")
        for line in res.findings():
            console.print(f"  {line}", highlight=False)
    for name, why in run.skipped.items():
        console.print(f"[dim]{name}: skipped ({why})[/dim]")
    for name, err in run.failed.items():
        console.print(f"[red]{name} failed: {err.splitlines()[0]}[/red]")
    console.print(f"report: {page_path.resolve()}\njson: {js.resolve()}")
    return 1 if run.failed else 0
