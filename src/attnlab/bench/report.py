"""The bench report: one self-contained HTML page (plots embedded as PNG data, no network) and a headline table.

Reads every ``<suite>.json`` in the results directory, so a report always shows the latest run of each suite.
All text that comes from results (ids, notes, errors) is HTML-escaped.
"""

from __future__ import annotations

import html
import json
import math
from collections import defaultdict
from pathlib import Path

from ..htmlkit import fig_to_data_uri as _fig_to_data_uri, img as _img, page, plt as _plt, table as _table
from ..registry import get_spec
from .common import BASELINE
from .harness import write_atomic

SUITES = ("ops", "speed", "memory", "fidelity", "recall", "peers", "parallel", "scan")


def load_results(out_dir: str | Path) -> dict[str, dict]:
    results = {}
    for suite in SUITES:
        p = Path(out_dir) / f"{suite}.json"
        if p.is_file():
            results[suite] = json.loads(p.read_text())
    return results


def _family(mech: str) -> str:
    try:
        return get_spec(mech).family
    except KeyError:
        return "other"


# ------------------------------------------------------------------------------------------- summaries


def headline(results: dict[str, dict]) -> list[dict]:
    """One row per mechanism: speed vs SDPA (1-D fwd at the largest common N, else 2-D), slopes, fidelity, recall."""
    rows: dict[str, dict] = defaultdict(dict)
    speed = results.get("speed", {}).get("records", [])
    best_n: dict[tuple, int] = {}
    for r in speed:
        c = r["config"]
        if r["metric"] == "speed_vs_sdpa" and c["pass"] == "fwd":
            key = (r["mechanism"], c["track"])
            if c["n"] >= best_n.get(key, 0):
                best_n[key] = c["n"]
                rows[r["mechanism"]][f"speed_{c['track']}"] = (r["value"], c["n"])
        if r["metric"] == "time_slope":
            rows[r["mechanism"]][f"slope_{c['track']}"] = r["value"]
    for r in speed:  # GFLOP/s on useful FLOPs vs the dense layer's, at the same (largest) N as the speed column
        c = r["config"]
        if r["metric"] != "gflops_vs_sdpa" or c["pass"] != "fwd":
            continue
        if c["n"] == best_n.get((r["mechanism"], c["track"])):
            rows[r["mechanism"]][f"gflops_{c['track']}"] = r["value"]
    for r in results.get("memory", {}).get("records", []):
        if r["metric"] == "memory_exponent":
            rows[r["mechanism"]][f"mem_exp_{r['config']['track']}"] = r["value"]
    for r in results.get("fidelity", {}).get("records", []):
        if r["metric"] == "rel_fro_error":
            rows[r["mechanism"]].setdefault("fidelity", {})[r["config"]["input"]] = r["value"]
    for r in results.get("recall", {}).get("records", []):
        if r["metric"] == "accuracy":
            c = r["config"]
            rows[r["mechanism"]].setdefault("recall", {})[c.get("task", "?")] = max(
                r["value"], rows[r["mechanism"]].get("recall", {}).get(c.get("task", "?"), 0.0))
    out = []
    for mech in sorted(rows, key=lambda m: (_family(m), m)):
        out.append({"mechanism": mech, "family": _family(mech), **rows[mech]})
    return out


def headline_table_rows(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    def fmt(v, spec=".2f"):
        return "-" if v is None else format(v, spec)

    header = ["mechanism", "family", "speed vs SDPA (fwd, largest N)", "GFLOP/s vs SDPA (useful FLOPs)",
              "time slope", "memory exp.",
              "fidelity err (gauss / ar1 / real q,k,v)", "recall acc (mqar / sel. copy)"]
    body = []
    for r in rows:
        sp = r.get("speed_1d") or r.get("speed_2d")
        track = "1d" if "speed_1d" in r else "2d"
        fid = r.get("fidelity", {})
        rec = r.get("recall", {})
        body.append([
            r["mechanism"], r["family"],
            f"{sp[0]:.2f}x @ N={sp[1]}" if sp else "-",
            fmt(r.get(f"gflops_{track}")),
            fmt(r.get(f"slope_{track}")), fmt(r.get(f"mem_exp_{track}")),
            f"{fmt(fid.get('gaussian'), '.3f')} / {fmt(fid.get('ar1'), '.3f')} / "
            f"{fmt(fid.get('smollm2', fid.get('minilm')), '.3f')}" if fid else "-",
            f"{fmt(rec.get('mqar'))} / {fmt(rec.get('selective_copy'))}" if rec else "-",
        ])
    return header, body


# ------------------------------------------------------------------------------------------------ plots


def _loglog_by_family(records, metric: str, ylabel: str, title: str, pass_: str | None = "fwd"):
    plt = _plt()
    series: dict[tuple[str, str], dict[str, list]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        c = r["config"]
        if r["metric"] != metric or r["value"] is None or (pass_ and c.get("pass") != pass_):
            continue
        series[(c["track"], _family(r["mechanism"]))][r["mechanism"]].append((c["n"], r["value"]))
    if not series:
        return None
    panels = sorted(series)
    cols = min(3, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.8 * rows), squeeze=False)
    for ax, (track, fam) in zip(axes.flat, panels):
        base = series.get((track, "dense"), {}).get(BASELINE)
        if base and fam != "dense":
            xs, ys = zip(*sorted(base))
            ax.plot(xs, ys, "k--", lw=1.5, label=f"{BASELINE} (SDPA)")
        for mech, pts in sorted(series[(track, fam)].items()):
            xs, ys = zip(*sorted(pts))
            ax.plot(xs, ys, "o-", ms=3, label=mech)
        ax.set_xscale("log")
        ax.set_yscale("log")
        _plain_log_ticks(ax)
        ax.set_title(f"{fam} ({track})", fontsize=10)
        ax.set_xlabel("tokens N")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout(rect=(0, 0, 1, 0.97))  # keep panel titles clear of the axis labels above them
    return _fig_to_data_uri(fig)


def _plain_log_ticks(ax) -> None:
    # Label only the decades' major ticks on the x axis (minor labels overlap at these sizes).
    from matplotlib.ticker import NullFormatter

    ax.xaxis.set_minor_formatter(NullFormatter())


def _ratio_bars(records):
    plt = _plt()
    best: dict[tuple, tuple] = {}
    for r in records:
        c = r["config"]
        if r["metric"] == "speed_vs_sdpa" and c["pass"] == "fwd" and r["mechanism"] != BASELINE:
            key = (r["mechanism"], c["track"])
            if c["n"] >= best.get(key, (0,))[0]:
                best[key] = (c["n"], r["value"])
    if not best:
        return None
    items = sorted(best.items(), key=lambda kv: kv[1][1])
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(items) + 1.2))
    labels = [f"{m} ({t}, N={v[0]})" for (m, t), v in items]
    vals = [v[1] for _, v in items]
    ax.barh(labels, vals, color=["#2a7" if v >= 1 else "#c54" for v in vals])
    ax.axvline(1.0, color="k", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("speed vs dense SDPA layer (>1 = faster), forward, largest N measured")
    ax.tick_params(axis="y", labelsize=7)
    return _fig_to_data_uri(fig)


def _recall_heatmap(records):
    plt = _plt()
    acc = [r for r in records if r["metric"] == "accuracy" and r["value"] is not None]
    if not acc:
        return None
    cols = sorted({(r["config"].get("task"), r["config"].get("seq_len"), r["config"].get("d_model"),
                    r["config"].get("kv_pairs")) for r in acc}, key=str)
    mechs = sorted({r["mechanism"] for r in acc}, key=lambda m: (_family(m), m))
    grid = [[float("nan")] * len(cols) for _ in mechs]
    for r in acc:
        c = r["config"]
        i = mechs.index(r["mechanism"])
        j = cols.index((c.get("task"), c.get("seq_len"), c.get("d_model"), c.get("kv_pairs")))
        grid[i][j] = max(r["value"], 0 if math.isnan(grid[i][j]) else grid[i][j])
    fig, ax = plt.subplots(figsize=(1.3 * len(cols) + 3, 0.4 * len(mechs) + 1.5))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([f"{t}\nT={s} d={d}" + (f"\nK={k}" if k else "") for t, s, d, k in cols], fontsize=7)
    ax.set_yticks(range(len(mechs)))
    ax.set_yticklabels(mechs, fontsize=8)
    for i in range(len(mechs)):
        for j in range(len(cols)):
            if not math.isnan(grid[i][j]):
                ax.text(j, i, f"{grid[i][j]:.2f}", ha="center", va="center", fontsize=7,
                        color="w" if grid[i][j] < 0.6 else "k")
    fig.colorbar(im, ax=ax, label="held-out accuracy")
    return _fig_to_data_uri(fig)


def _pareto(rows: list[dict]):
    plt = _plt()
    pts = []
    for r in rows:
        sp = r.get("speed_1d") or r.get("speed_2d")
        if not sp:
            continue
        if r.get("recall", {}).get("mqar") is not None:
            q, what = r["recall"]["mqar"], "MQAR accuracy"
        elif r.get("fidelity"):
            q, what = 1 - min(1.0, max(r["fidelity"].values())), "1 - fidelity error"
        elif r["mechanism"] == BASELINE or (r["mechanism"] in _exact_ids()):
            q, what = 1.0, "exact"
        else:
            continue
        pts.append((sp[0], q, r["mechanism"], what))
    if len(pts) < 2:
        return None
    fig, ax = plt.subplots(figsize=(7, 5))
    front = [p for p in pts if not any(o[0] >= p[0] and o[1] >= p[1] and (o[0], o[1]) != (p[0], p[1]) for o in pts)]
    for x, y, m, what in pts:
        on = any(f[2] == m for f in front)
        ax.scatter(x, y, s=40 if on else 18, c="#c33" if on else "#579", zorder=3)
        ax.annotate(m, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    fx = sorted(front)
    ax.plot([p[0] for p in fx], [p[1] for p in fx], "r-", lw=1, alpha=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("speed vs dense SDPA layer (forward, largest N)")
    ax.set_ylabel("quality: MQAR accuracy, else 1 - fidelity error (exact = 1)")
    ax.grid(True, alpha=0.3)
    ax.set_title("speed / quality (red: Pareto front)")
    return _fig_to_data_uri(fig)


def _exact_ids() -> set[str]:
    from ..registry import list_mechanisms

    return {s.id for s in list_mechanisms() if s.exact_when == {}}


# ------------------------------------------------------------------------------------------------- html


def _notes(records: list[dict]) -> list[list[str]]:
    return [[r["mechanism"], r["metric"], json.dumps(r["config"], default=str)[:160], r.get("note", "")]
            for r in records if r["metric"] in ("error", "skipped")]


def render_html(results: dict[str, dict]) -> str:
    rows = headline(results)
    header, body = headline_table_rows(rows)
    any_doc = next(iter(results.values()), {})
    machine = any_doc.get("machine", {})
    parts = [
        "<h1>attnlab bench</h1>",
        "<p class=note>" + html.escape(", ".join(f"{k}: {v}" for k, v in machine.items())) + "</p>",
        "<p class=note>Suites in this report: " + html.escape(", ".join(
            f"{s} ({d.get('meta', {}).get('mode', '')} {d.get('records', [{}])[0].get('timestamp', '') if d.get('records') else ''})"
            for s, d in results.items())) + "</p>",
        "<h2>Headline</h2>", _table(header, body, "headline"),
        "<p class=note>Speed: time of the dense <code>mha</code> layer (torch SDPA core, same width, heads and "
        "projections, same causal flag, same run) divided by the mechanism's time. GFLOP/s vs SDPA: the "
        "mechanism's GFLOP/s on its useful FLOPs (its registry formula plus projections) divided by the dense "
        "layer's, same N and run: how well it uses the machine for the work it must do. Slopes: log-log fits of "
        "time and peak memory vs N. Fidelity: relative Frobenius error against exact softmax attention on the same "
        "module's q/k/v (real q,k,v: a SmolLM2 layer for causal mechanisms, a MiniLM layer otherwise). "
        "Recall: held-out accuracy of a 2-layer model trained with the mechanism as the mixer.</p>",
    ]
    speed = results.get("speed", {}).get("records", [])
    if speed:
        roof = next((r["value"] for r in speed if r["metric"] == "roofline_gflops"), None)
        parts += ["<h2>Speed</h2>",
                  f"<p class=note>fp32 GEMM roofline measured in this run: {roof:.0f} GFLOP/s.</p>" if roof else "",
                  _img(_loglog_by_family(speed, "time_s", "forward time (s)", "forward time vs N"), "time vs N"),
                  _img(_ratio_bars(speed), "speed vs SDPA")]
    memory = results.get("memory", {}).get("records", [])
    if memory:
        parts += ["<h2>Memory</h2><p class=note>Peak RSS over the process's start, forward+backward, one fresh "
                  "process per configuration.</p>",
                  _img(_loglog_by_family(memory, "peak_mib", "peak MiB", "peak memory vs N", pass_=None),
                       "memory vs N")]
    fidelity = results.get("fidelity", {}).get("records", [])
    if fidelity:
        fid_rows: dict[tuple, dict] = defaultdict(dict)
        for r in fidelity:
            if r["value"] is not None:
                c = r["config"]
                fid_rows[(r["mechanism"], c.get("track"), c.get("n"), c.get("input"))][r["metric"]] = r["value"]
        cols = ["rel_fro_error", "kl", "mass_covered", "topk_recall", "row_entropy"]
        table = [[m, t, n, i] + [("-" if v.get(c) is None else f"{v[c]:.4g}") for c in cols]
                 for (m, t, n, i), v in sorted(fid_rows.items(), key=str)]
        parts += ["<h2>Fidelity to exact attention</h2>",
                  f"<p class=note>{html.escape(fidelity[0].get('note', ''))}</p>",
                  _table(["mechanism", "track", "N", "input"] + cols, table)]
    recall = results.get("recall", {}).get("records", [])
    if recall:
        parts += ["<h2>Recall</h2>", _img(_recall_heatmap(recall), "recall heatmap")]
    pareto = _pareto(rows)
    if pareto:
        parts += ["<h2>Speed / quality</h2>", _img(pareto, "Pareto plot")]
    peers = [r for r in results.get("peers", {}).get("records", []) if r["value"] is not None]
    if peers:
        rows_p: dict[tuple, dict] = defaultdict(dict)
        for r in peers:
            c = dict(r["config"])
            side = c.pop("side", None)
            peer = c.pop("peer", None) or side
            key = (r["mechanism"], peer, json.dumps({k: v for k, v in c.items()}, default=str))
            name = r["metric"] if side is None else ("attnlab_s" if side == "attnlab" else "peer_s")
            rows_p[key][name] = r["value"]
        table = [[m, p, cfg, *(f"{v[c]:.4g}" if c in v else "-"
                               for c in ("attnlab_s", "peer_s", "speed_vs_peer", "max_abs_diff"))]
                 for (m, p, cfg), v in sorted(rows_p.items())]
        parts += ["<h2>Peers side by side</h2><p class=note>The same inputs through another library's "
                  "implementation of the same mechanism; speed_vs_peer = peer time / attnlab time.</p>",
                  _table(["mechanism", "peer", "config", "attnlab s", "peer s", "speed vs peer", "max |diff|"],
                         table)]
    ops = results.get("ops", {}).get("records", [])
    if ops:
        from .ops import OPS_HEADER, ops_table_rows

        parts += ["<h2>Exact ops vs torch SDPA</h2>", _table(OPS_HEADER, ops_table_rows(ops))]
    scan = results.get("scan", {}).get("records", [])
    if scan:
        from .scan import scan_tables

        fh, fr, dh, dr, summary = scan_tables(scan)
        parts += ["<h2>Linear-attention scan vs causal SDPA</h2><p class=note>Chunked causal linear attention "
                  "(elu+1 features, ops/linear.py) against torch SDPA on the same inputs; decode = per-token time "
                  "continuing a KVCache.</p>", _table(fh, fr), _table(dh, dr),
                  "<ul>" + "".join(f"<li>{html.escape(s)}</li>" for s in summary) + "</ul>"]
    par = results.get("parallel", {}).get("records", [])
    if par:
        parts += ["<h2>Parallel</h2>", _table(["mechanism", "config", "metric", "value", "unit"],
                                              [[r["mechanism"], json.dumps(r["config"], default=str), r["metric"],
                                                f"{r['value']:.4g}" if isinstance(r["value"], float) else r["value"],
                                                r.get("unit", "")] for r in par])]
    notes = sum((_notes(d.get("records", [])) for d in results.values()), [])
    if notes:
        parts += ["<h2>Skipped and failed measurements</h2>", _table(["mechanism", "what", "config", "note"], notes)]
    return page("attnlab bench", parts)


def write_report(out_dir: str | Path) -> Path:
    """Render ``index.html`` from the suite results in ``out_dir`` (atomically)."""
    path = Path(out_dir) / "index.html"
    write_atomic(path, render_html(load_results(out_dir)))
    return path
