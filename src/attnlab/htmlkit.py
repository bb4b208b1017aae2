"""Small pieces for attnlab's self-contained HTML pages (the bench report and the inspect report).

Every string that comes from data (ids, notes, token text) is HTML-escaped here; figures are embedded as PNG
data URIs, so a page needs no network and no companion files.
"""

from __future__ import annotations

import base64
import html
import io

STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em auto;max-width:1200px;color:#222}"
    "table{border-collapse:collapse;margin:1em 0;font-size:13px}td,th{border:1px solid #ccc;padding:3px 7px;"
    "text-align:right}td:first-child,th:first-child{text-align:left}th{background:#f3f3f3}img{max-width:100%}"
    ".note{color:#666;font-size:13px}h2{border-bottom:1px solid #ddd;padding-bottom:4px}"
)


def plt():
    """matplotlib.pyplot on the non-interactive Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    return pyplot


def fig_to_data_uri(fig) -> str:
    """Render a matplotlib figure to a PNG data URI and close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt().close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def table(header: list[str], rows: list[list], cls: str = "") -> str:
    h = "".join(f"<th>{html.escape(str(c))}</th>" for c in header)
    b = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{h}</tr></thead><tbody>{b}</tbody></table>'


def img(uri: str | None, alt: str) -> str:
    return f'<img src="{uri}" alt="{html.escape(alt)}">' if uri else f"<p class=note>No data for {html.escape(alt)}.</p>"


def note(text: str) -> str:
    return f"<p class=note>{html.escape(text)}</p>"


def page(title: str, body: list[str], extra_style: str = "") -> str:
    """A whole HTML document around ``body`` (already-escaped HTML fragments)."""
    return "\n".join([f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
                      f"<style>{STYLE}{extra_style}</style></head><body>", *body, "</body></html>"])
