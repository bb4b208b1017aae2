"""`attnlab`: list and show mechanisms, run the bench.

    attnlab list [PATTERN] [--family F] [--causal] [--decode] [--dims 1|2] [--json | --markdown]
    attnlab show ID
    attnlab bench [SUITE] [--quick | --full] [--only ID,...] [--family F] [--out DIR]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import registry


def make_console() -> Console:
    """A console that keeps tables readable when the output is a pipe or a CI log (rich assumes 80 columns)."""
    return Console() if sys.stdout.isatty() else Console(width=200)


def _yn(b: bool) -> str:
    return "yes" if b else "no"


def _exact(spec) -> str:
    if spec.exact_when is None:
        return "approximate" if spec.approximates_softmax else "not softmax"
    if not spec.exact_when:
        return "always"
    return ", ".join(f"{k}={v}" for k, v in spec.exact_when.items())


def markdown_table(specs) -> str:
    """The README's mechanism table (kept current by tests/test_docs.py)."""
    lines = ["| id | family | kind | paper | complexity | causal | dims | decode | exact when |",
             "|---|---|---|---|---|---|---|---|---|"]
    for s in specs:
        paper = f"[{s.paper}](https://arxiv.org/abs/{s.arxiv})" if s.arxiv else s.paper
        kind = f"seed #{s.catalog}" if s.seed and s.catalog else s.kind
        lines.append(f"| [`{s.id}`](docs/mechanisms/{s.id}.md) | {s.family} | {kind} | {paper} | {s.complexity} | "
                     f"{_yn(s.caps.causal)} | {'/'.join(f'{d}-D' for d in s.caps.dims)} | {_yn(s.caps.decode)} | "
                     f"{_exact(s)} |")
    return "\n".join(lines) + "\n"


def cmd_list(args: argparse.Namespace) -> int:
    specs = registry.list_mechanisms(args.pattern, family=args.family, causal=args.causal, decode=args.decode,
                                     dims=args.dims, seed=args.seed)
    if args.json:
        print(json.dumps([s.as_dict() for s in specs], indent=1))
        return 0
    if args.markdown:
        sys.stdout.write(markdown_table(specs))
        return 0
    table = Table(title=f"attnlab mechanisms ({len(specs)})")
    for col in ("id", "family", "kind", "complexity", "causal", "dims", "decode", "exact when"):
        table.add_column(col)
    for s in specs:
        table.add_row(s.id, s.family, f"seed #{s.catalog}" if s.seed and s.catalog else s.kind, s.complexity,
                      _yn(s.caps.causal), "/".join(f"{d}-D" for d in s.caps.dims), _yn(s.caps.decode), _exact(s))
    make_console().print(table)
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    try:
        spec = registry.get_spec(args.id)
    except KeyError as e:
        print(e.args[0], file=sys.stderr)
        return 2
    d = spec.as_dict()
    print(f"{spec.id}  ({spec.kind}, family {spec.family})")
    print(f"  paper:      {spec.paper}" + (f"  arXiv:{spec.arxiv}" if spec.arxiv else ""))
    if spec.catalog:
        print(f"  catalog:    #{spec.catalog}")
    print(f"  complexity: {spec.complexity}")
    print(f"  caps:       {d['caps']}")
    print(f"  exact when: {_exact(spec)}")
    print(f"  class:      {d['class']}")
    if spec.summary:
        print(f"  summary:    {spec.summary}")
    doc = _doc_path(spec)
    if doc is not None:
        print(f"\n{doc.read_text()}")
    else:
        print(f"  doc page:   {spec.doc_path} (not found next to this installation)")
    return 0


def _doc_path(spec) -> Path | None:
    for root in (Path.cwd(), Path(__file__).resolve().parents[2]):
        p = root / spec.doc_path
        if p.is_file():
            return p
    return None


def cmd_bench(args: argparse.Namespace) -> int:
    from .bench.run import run_bench

    return run_bench(args)


def cmd_inspect(args: argparse.Namespace) -> int:
    from .analysis.inspect import cmd_inspect as run

    return run(args)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnlab", description="Attention mechanisms behind one API, measured.")
    sub = p.add_subparsers(dest="command", required=True)

    ls = sub.add_parser("list", help="list registered mechanisms")
    ls.add_argument("pattern", nargs="?", help="wildcard on the id, e.g. 'lightning*'")
    ls.add_argument("--family")
    ls.add_argument("--causal", action="store_true", default=None, help="only mechanisms with a causal mode")
    ls.add_argument("--decode", action="store_true", default=None, help="only mechanisms that decode with a cache")
    ls.add_argument("--dims", type=int, choices=(1, 2))
    kind = ls.add_mutually_exclusive_group()
    kind.add_argument("--seed", dest="seed", action="store_true", default=None, help="only seed mechanisms")
    kind.add_argument("--baseline", dest="seed", action="store_false", help="only baselines")
    fmt = ls.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--markdown", action="store_true")
    ls.set_defaults(func=cmd_list)

    sh = sub.add_parser("show", help="spec, paper and doc page of one mechanism")
    sh.add_argument("id")
    sh.set_defaults(func=cmd_show)

    from .bench.run import add_bench_arguments

    b = sub.add_parser("bench", help="measure speed, memory, fidelity and recall side by side")
    add_bench_arguments(b)
    b.set_defaults(func=cmd_bench)

    from .analysis.inspect import add_inspect_arguments

    i = sub.add_parser("inspect", help="look inside a real model: attention maps, sinks, heads, attributions (HTML)")
    add_inspect_arguments(i)
    i.set_defaults(func=cmd_inspect)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # e.g. `attnlab show ID | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
