"""A self-contained HTML report for stakeholders: works offline, every image and plot inline."""

from __future__ import annotations

import datetime as _dt
import html
from collections.abc import Sequence
from dataclasses import dataclass, field

import plotly.graph_objects as go
from PIL import Image

from softpatch_app.imaging import data_uri

_CSS = """
body{font-family:-apple-system,Segoe UI,Roboto,Helvetica,Arial,sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1100px;margin:0 auto;padding:24px 32px 64px;background:#fff}
h1{color:#16a085;margin-bottom:0}h2{border-bottom:2px solid #16a085;padding-bottom:4px;margin-top:36px}
.sub{color:#666;margin-top:4px}
table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ddd;padding:4px 10px;text-align:left;font-size:14px}
th{background:#f0f3f4}
.grid{display:flex;flex-wrap:wrap;gap:12px}.card{width:250px;font-size:13px}
.card img{width:100%;border:1px solid #ccc;border-radius:4px}
.pair img{width:49%}.pair{width:520px}
.kpi{display:inline-block;margin:6px 18px 6px 0;padding:10px 16px;background:#eef8f6;border-radius:6px}
.kpi b{display:block;font-size:22px;color:#117864}
.note{color:#555;font-size:14px}
"""


@dataclass
class ReportImage:
    caption: str
    images: Sequence[Image.Image]  # one image, or a pair shown side by side


@dataclass
class ReportContent:
    dataset: str
    settings: dict
    summary: dict[str, str] = field(default_factory=dict)  # headline numbers
    removed_examples: list[ReportImage] = field(default_factory=list)
    coreset_figure: go.Figure | None = None
    heatmaps: list[ReportImage] = field(default_factory=list)
    metrics: dict[str, dict[str, str]] = field(default_factory=dict)  # model -> metric -> value
    threshold: dict[str, str] = field(default_factory=dict)
    duplicates: list[dict[str, object]] = field(default_factory=list)  # softpatch.evaluation.duplicates rows
    duplicates_summary: str = ""
    figures: list[tuple[str, go.Figure]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def _esc(value) -> str:
    return html.escape(str(value))


def _table(rows: dict[str, str]) -> str:
    body = "".join(f"<tr><th>{_esc(k)}</th><td>{_esc(v)}</td></tr>" for k, v in rows.items())
    return f"<table>{body}</table>"


def _cards(items: Sequence[ReportImage]) -> str:
    out = []
    for item in items:
        cls = "card pair" if len(item.images) > 1 else "card"
        imgs = "".join(f'<img src="{data_uri(im, "JPEG")}" alt="">' for im in item.images)
        out.append(f'<div class="{cls}">{imgs}<div>{_esc(item.caption)}</div></div>')
    return f'<div class="grid">{"".join(out)}</div>'


def build_report(content: ReportContent) -> str:
    """The report as one HTML string (plotly.js embedded once, images as base64: no network needed)."""
    parts: list[str] = []
    plotly_embedded = False

    def figure(fig: go.Figure) -> str:
        nonlocal plotly_embedded
        out = fig.to_html(full_html=False, include_plotlyjs=not plotly_embedded, config={"displaylogo": False})
        plotly_embedded = True
        return out

    now = _dt.datetime.now().strftime("%Y-%m-%d %H:%M")
    parts.append(f"<h1>SoftPatch vetting report</h1><p class='sub'>Dataset <b>{_esc(content.dataset)}</b> · {now}</p>")
    if content.summary:
        kpis = "".join(f"<div class='kpi'><b>{_esc(v)}</b>{_esc(k)}</div>" for k, v in content.summary.items())
        parts.append(f"<div>{kpis}</div>")
    for note in content.notes:
        parts.append(f"<p class='note'>{_esc(note)}</p>")
    parts.append("<h2>Settings</h2>" + _table({k: str(v) for k, v in content.settings.items()}))
    if content.duplicates_summary:
        rows = "".join(
            "<tr>" + "".join(f"<td>{_esc(v)}</td>" for v in row.values()) + "</tr>" for row in content.duplicates
        )
        head = "".join(f"<th>{_esc(k)}</th>" for k in (content.duplicates[0] if content.duplicates else {}))
        parts.append(
            f"<h2>Duplicates and leakage</h2><p class='note'>{_esc(content.duplicates_summary)}.</p>"
            + (f"<table><tr>{head}</tr>{rows}</table>" if rows else "")
        )
    if content.removed_examples:
        parts.append(
            "<h2>Most suspicious training images</h2><p class='note'>Red patches were removed from the memory "
            "bank as likely defects (training-set noise).</p>" + _cards(content.removed_examples)
        )
    if content.coreset_figure is not None:
        parts.append(
            "<h2>Memory bank and removed patches</h2><p class='note'>Each point is one image patch, placed so that "
            "similar patches lie close together. Removed patches (noise) sit apart from the kept ones.</p>"
            + figure(content.coreset_figure)
        )
    if content.metrics:
        models = list(content.metrics)
        names = sorted({m for v in content.metrics.values() for m in v})
        head = "".join(f"<th>{_esc(m)}</th>" for m in models)
        rows = "".join(
            f"<tr><th>{_esc(n)}</th>"
            + "".join(f"<td>{_esc(content.metrics[m].get(n, '–'))}</td>" for m in models)
            + "</tr>"
            for n in names
        )
        parts.append(f"<h2>Detection quality</h2><table><tr><th></th>{head}</tr>{rows}</table>")
    if content.threshold:
        parts.append("<h2>Decision threshold</h2>" + _table(content.threshold))
    for title, fig in content.figures:
        parts.append(f"<h3>{_esc(title)}</h3>" + figure(fig))
    if content.heatmaps:
        parts.append(
            "<h2>Example heatmaps</h2><p class='note'>Warm colours mark where the image differs from the good "
            "training patches; the outline marks the region over the threshold.</p>" + _cards(content.heatmaps)
        )
    body = "\n".join(parts)
    return (
        "<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>SoftPatch report – {_esc(content.dataset)}</title><style>{_CSS}</style></head>"
        f"<body><main>{body}</main></body></html>"
    )
