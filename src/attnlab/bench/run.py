"""`attnlab bench`: argument parsing, suite dispatch, progress, terminal tables, result files and the report.

    attnlab bench [all|speed|memory|fidelity|recall|peers|ops|parallel|scan] [--quick | --full] [--only ID,...]
                  [--family F]

Each suite writes ``<out>/<suite>.json`` (schema: docs/bench.md) atomically; the HTML report
``<out>/index.html`` is then rebuilt from every suite file present.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from ..cli import make_console
from . import common
from .harness import write_json

console = make_console()
SUITE_CHOICES = ("all", "speed", "memory", "fidelity", "recall", "peers", "ops", "parallel", "scan")
ALL_SUITES = ("speed", "memory", "fidelity", "recall", "peers")


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, received '{text}'") from None


def add_bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("suite", nargs="?", default="all", choices=SUITE_CHOICES,
                   help="what to measure (all = speed, memory, fidelity, recall, peers; ops = the exact ops vs SDPA; "
                        "parallel = ring/tree attention on 1, 2, 4 local gloo processes; scan = the linear-attention "
                        "scan vs causal SDPA over N, its slope and crossover, and decode time vs context)")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="small sizes, about 5 minutes in all (the default)")
    size.add_argument("--full", action="store_true", help="large sizes, LR sweep and seeds; long, run by hand")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], help="mechanism ids, comma-separated")
    p.add_argument("--family", help="only mechanisms of this family")
    p.add_argument("--n", type=_ints, help="ops / scan suites: sequence lengths, e.g. 1024,4096")
    p.add_argument("--contexts", type=_ints, help="scan suite: decode context lengths (default 1024,16384; quick "
                   "1024,4096)")
    p.add_argument("--threads", type=int, default=1, help="scan suite: torch threads per measurement (default 1: "
                   "on a shared machine multi-threaded small ops mostly wait for their neighbours; 0 = torch's "
                   "default)")
    p.add_argument("--impls", type=lambda s: tuple(x for x in s.split(",") if x),
                   help="ops suite: which of sdpa,attention,chunked_attention,reference_attention")
    p.add_argument("--passes", type=lambda s: tuple(x for x in s.split(",") if x), default=("fwd", "fwd+bwd"),
                   help="ops suite: fwd and/or fwd+bwd")
    p.add_argument("--causal", choices=("yes", "no", "both"), default="both", help="ops suite: causal modes")
    p.add_argument("--biformer-src", metavar="DIR",
                   help="peers suite: root of a checkout of github.com/rayleizhu/BiFormer, whose bi-level routing "
                        "attention runs beside attnlab's biformer (default: $ATTNLAB_BIFORMER_SRC; skipped if unset)")
    p.add_argument("--repeats", type=int, help="timed repeats after warm-up (median reported)")
    p.add_argument("--out", default="reports/bench", help="directory for JSON results and the HTML report")


class _Steps:
    """A progress bar whose steps are the suites' progress messages."""

    def __init__(self, progress: Progress, label: str, total: int | None) -> None:
        self.progress, self.label = progress, label
        self.task = progress.add_task(label, total=total)

    def __call__(self, message: str) -> None:
        self.progress.update(self.task, advance=1, description=f"{self.label}: {message}")

    def done(self) -> None:
        t = self.progress.tasks[self.task]
        self.progress.update(self.task, total=t.completed, description=self.label)


def _progress() -> Progress:
    return Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TimeElapsedColumn(), console=console, transient=False)


def run_bench(args: argparse.Namespace) -> int:
    out_dir = Path(args.out)
    budget = common.FULL if args.full else common.QUICK
    if args.repeats:
        budget = common.Budget(**{**budget.__dict__, "repeats": args.repeats})
    try:
        specs = common.select(args.only, args.family)
    except KeyError as e:
        console.print(f"[red]{e.args[0]}[/red]")
        return 2
    if not specs:
        console.print("[red]no mechanism matches --only/--family[/red]")
        return 2
    t0 = time.perf_counter()
    if args.suite == "ops":
        _run_ops(args, out_dir, budget)
    elif args.suite == "parallel":
        _run_parallel(args, out_dir, budget)
    elif args.suite == "scan":
        _run_scan(args, out_dir, budget)
    else:
        suites = ALL_SUITES if args.suite == "all" else (args.suite,)
        for suite in suites:
            _run_suite(suite, specs, budget, out_dir, biformer_src=getattr(args, "biformer_src", None))
    from .report import headline, headline_table_rows, load_results, write_report

    report = write_report(out_dir)
    header, rows = headline_table_rows(headline(load_results(out_dir)))
    table = Table(title=f"attnlab bench ({budget.name}) headline")
    for col in header:
        table.add_column(col)
    for row in rows:
        table.add_row(*row)
    console.print(table)
    console.print(f"report: {report.resolve()}  ({time.perf_counter() - t0:.0f} s)")
    return 0


def _run_suite(suite: str, specs, budget: common.Budget, out_dir: Path, biformer_src: str | None = None) -> None:
    from .fidelity import applies, run_fidelity
    from .memory import run_memory
    from .speed import run_speed

    t0 = time.perf_counter()
    with _progress() as progress:
        if suite == "speed":
            total = sum(len(budget.sizes_1d if t == "1d" else budget.sides_2d)
                        + len(budget.backward_1d if t == "1d" else budget.backward_2d)
                        for s in specs for t in common.tracks(s)) + 6
            steps = _Steps(progress, "speed", total)
            records = run_speed(specs, budget, steps)
        elif suite == "memory":
            total = sum(len(budget.memory_1d if t == "1d" else budget.memory_2d) for s in specs
                        for t in common.tracks(s)) + 4
            steps = _Steps(progress, "memory", total)
            records = run_memory(specs, budget, steps, backward=budget.memory_backward)
        elif suite == "fidelity":
            total = sum(2 * len(budget.seeds) * len(common.tracks(s)) for s in specs if applies(s))
            steps = _Steps(progress, "fidelity", total)
            records = run_fidelity(specs, budget, steps)
            if not records:
                console.print("fidelity: no selected mechanism approximates softmax attention; nothing to measure")
        elif suite == "recall":
            steps = _Steps(progress, "recall", None)
            records = _run_recall(specs, budget, steps)
        elif suite == "peers":
            from .peers import run_peers

            steps = _Steps(progress, "peers", 4)
            records = run_peers(quick=budget.name != "full", progress=steps, biformer_src=biformer_src)
            for r in records:
                if r["metric"] == "skipped":
                    console.print(f"peers: {r['note']}")
        else:
            raise AssertionError(suite)
        steps.done()
    write_json(out_dir / f"{suite}.json", records, meta={"suite": suite, "mode": budget.name,
                                                         "seconds": round(time.perf_counter() - t0, 1),
                                                         "mechanisms": [s.id for s in specs]})


# The quick recall run trains softmax plus one causal mechanism per family, on MQAR with 8 pairs only (the full
# run trains every causal mechanism on every task). The linear family is represented by elu+1 linear attention,
# the canonical case MQAR was designed to expose; Based (about 10x slower per step on CPU) runs in --full.
# Other families take their first seed mechanism.
RECALL_REPRESENTATIVES = {"grouped": "gqa", "linear": "linear-attention", "local": "sliding-window",
                          "sparse": "landmark-attention", "memory": "titans", "parallel": "ring-self-attention"}


def recall_candidates(specs, budget: common.Budget) -> list:
    """Quick: softmax (``mha``) plus one causal representative per other family; full: every causal mechanism."""
    causal = [s for s in specs if s.caps.causal and 1 in s.caps.dims]
    if budget.name == "full":
        return causal
    by_family: dict[str, list] = {}
    for s in sorted(causal, key=lambda s: (not s.seed, s.id)):
        by_family.setdefault(s.family, []).append(s)
    picked = [s for s in causal if s.id == common.BASELINE]
    for family, members in sorted(by_family.items()):
        if family == "dense":
            continue
        wanted = RECALL_REPRESENTATIVES.get(family)
        picked.append(next((s for s in members if s.id == wanted), members[0]))
    return picked


def _run_recall(specs, budget: common.Budget, progress) -> list[dict]:
    from .tasks import run_recall

    def report(event: dict) -> None:
        acc = event.get("val_accuracy")
        progress(f"{event['mechanism']} {event['task']} step {event['step']}/{event['steps']}"
                 + (f" val {acc:.3f}" if acc is not None else ""))

    chosen = [s.id for s in recall_candidates(specs, budget)]
    quick = budget.name == "quick"
    # One torch thread: these are many small steps, which thread hand-offs only slow down (measured 9-25x on a
    # shared 2-core machine).
    if not quick:
        return run_recall(chosen, quick=False, threads=1, progress=report)
    records = []
    if common.BASELINE in chosen:  # the harness validation: softmax must reach >= 99% on MQAR
        records += run_recall([common.BASELINE], quick=True, threads=1, progress=report)
    others = [i for i in chosen if i != common.BASELINE]
    if others:
        records += run_recall(others, quick=True, kv_pairs=(8,), tasks=("mqar",), threads=1, progress=report)
    return records


def _run_ops(args, out_dir: Path, budget: common.Budget) -> None:
    from .ops import OPS_HEADER, ops_table_rows, run_ops_bench

    if args.n:
        ns = args.n
    elif args.full:
        ns = (1024, 2048, 4096, 8192, 16384, 32768, 65536)
    else:
        ns = (256, 1024, 2048)
    from .ops import IMPLS

    impls = args.impls or IMPLS
    bad = [i for i in impls if i not in IMPLS] + [p for p in args.passes if p not in ("fwd", "fwd+bwd")]
    if bad:
        raise SystemExit(f"attnlab bench ops: expected impls from {IMPLS} and passes fwd/fwd+bwd, received {bad}")
    causal_modes = {"yes": (True,), "no": (False,), "both": (False, True)}[args.causal]
    t0 = time.perf_counter()
    with _progress() as progress:
        steps = _Steps(progress, "ops", len(ns) * len(causal_modes) * len(args.passes) * len(impls))
        records = run_ops_bench(ns, repeats=budget.repeats if args.repeats is None else args.repeats,
                                progress=steps, impls=impls, passes=args.passes, causal_modes=causal_modes)
        steps.done()
    table = Table(title="attnlab bench ops: exact attention vs torch SDPA (B=1, 8 heads, d=64, fp32)")
    for col in OPS_HEADER:
        table.add_column(col, justify="right" if col not in ("op", "pass") else "left")
    for row in ops_table_rows(records):
        table.add_row(*row)
    console.print(table)
    write_json(out_dir / "ops.json", records, meta={"suite": "ops", "mode": budget.name, "ns": list(ns),
                                                   "seconds": round(time.perf_counter() - t0, 1)})


def _run_parallel(args, out_dir: Path, budget: common.Budget) -> None:
    from .parallel import format_table, run_parallel_bench

    total = (args.n or ((16384,) if args.full else (4096,)))[0]
    t0 = time.perf_counter()
    with _progress() as progress:
        steps = _Steps(progress, "parallel", None)
        records = run_parallel_bench(total, (1, 2, 4), repeats=budget.repeats, backward=True, progress=steps)
        steps.done()
    console.print(format_table(records))
    write_json(out_dir / "parallel.json", records, meta={"suite": "parallel", "mode": budget.name,
                                                        "total_len": total,
                                                        "seconds": round(time.perf_counter() - t0, 1)})


def _run_scan(args, out_dir: Path, budget: common.Budget) -> None:
    from . import scan

    full = budget.name == "full"
    ns = args.n or (scan.FULL_NS if full else scan.QUICK_NS)
    contexts = args.contexts or (scan.FULL_CONTEXTS if full else scan.QUICK_CONTEXTS)
    repeats = args.repeats or (5 if full else 3)
    t0 = time.perf_counter()
    with _progress() as progress:
        steps = _Steps(progress, "scan", 2 * len(ns) + len(scan.DECODE_MECHANISMS) * len(contexts))
        records = scan.run_scan_bench(ns, contexts, repeats=repeats, decode_steps=32 if full else 16,
                                      threads=args.threads or None, progress=steps)
        steps.done()
    fh, fr, dh, dr, summary = scan.scan_tables(records)
    threads = records[0]["config"]["threads"] if records else args.threads
    for title, header, rows in (
            (f"attnlab bench scan: chunked causal linear attention (elu+1) vs causal SDPA (B=1, 8 heads, d=64, fp32, "
             f"{threads} thread(s))", fh, fr),
            ("decode with a KVCache: per-token time vs context", dh, dr)):
        table = Table(title=title)
        for col in header:
            table.add_column(col, justify="left" if col == "mechanism" else "right")
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for line in summary:
        console.print(line, markup=False)
    write_json(out_dir / "scan.json", records, meta={"suite": "scan", "mode": budget.name, "ns": list(ns),
                                                     "contexts": list(contexts), "threads": threads,
                                                     "seconds": round(time.perf_counter() - t0, 1)})
