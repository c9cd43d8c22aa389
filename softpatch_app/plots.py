"""Plotly figures of the app and the HTML report. Drawing only: every number comes from the core."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import plotly.graph_objects as go

KEPT_COLOUR = "#7f8c8d"
REMOVED_COLOUR = "#e74c3c"
GOOD_COLOUR = "#2e86de"
BAD_COLOUR = "#e67e22"
SOFTPATCH_COLOUR = "#16a085"
PATCHCORE_COLOUR = "#8e44ad"


def _layout(fig: go.Figure, *, title: str | None = None, height: int = 340) -> go.Figure:
    fig.update_layout(
        title={"text": title, "y": 0.98, "yanchor": "top", "x": 0.01, "xanchor": "left"} if title else None,
        height=height + (30 if title else 0),
        margin={"l": 10, "r": 10, "t": 75 if title else 30, "b": 10},
        legend={"orientation": "h", "yanchor": "bottom", "y": 1.02, "xanchor": "left", "x": 0},
        template="plotly_white",
    )
    return fig


def outlier_histogram(scores: np.ndarray, removed: np.ndarray, *, tau: float, bins: int = 80) -> go.Figure:
    """Histogram of patch outlier scores, kept (grey) and removed (red) stacked, with the tau cut drawn.

    ``scores`` and ``removed`` are the core's outlier_scores_ and removed_mask_ (any shape, same shape).
    Pre-binned with numpy so that a million patches draw as fast as a thousand.
    """
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    r = np.asarray(removed, dtype=bool).reshape(-1)
    finite = np.isfinite(s)
    s, r = s[finite], r[finite]
    fig = go.Figure()
    if s.size == 0:
        return _layout(fig, title="No patch scores")
    lo, hi = float(s.min()), float(s.max())
    if hi <= lo:
        hi = lo + 1e-6
    edges = np.linspace(lo, hi, bins + 1)
    centres = (edges[:-1] + edges[1:]) / 2
    width = edges[1] - edges[0]
    kept_counts, _ = np.histogram(s[~r], bins=edges)
    removed_counts, _ = np.histogram(s[r], bins=edges)
    fig.add_bar(x=centres, y=kept_counts, width=width, name="kept patches", marker_color=KEPT_COLOUR)
    fig.add_bar(x=centres, y=removed_counts, width=width, name="removed as noise", marker_color=REMOVED_COLOUR)
    if r.any():
        cut = float(s[r].min())
        fig.add_vline(
            x=cut,
            line={"color": REMOVED_COLOUR, "width": 2, "dash": "dash"},
            annotation_text=f"tau cut ({tau:.0%} of patches)",
            annotation_position="top left",
        )
    fig.update_layout(barmode="stack", bargap=0)
    fig.update_xaxes(title="patch outlier score (higher = more likely noise)")
    fig.update_yaxes(title="patches", type="log")
    return _layout(fig)


def roc_figure(curves: dict[str, tuple[np.ndarray, np.ndarray, float]]) -> go.Figure:
    """ROC curves: name -> (fpr, tpr, auroc)."""
    fig = go.Figure()
    palette = [SOFTPATCH_COLOUR, PATCHCORE_COLOUR, BAD_COLOUR, GOOD_COLOUR]
    for i, (name, (fpr, tpr, auc)) in enumerate(curves.items()):
        fig.add_scatter(
            x=fpr, y=tpr, mode="lines", name=f"{name} (AUROC {auc:.3f})", line={"color": palette[i % 4], "width": 2}
        )
    fig.add_scatter(x=[0, 1], y=[0, 1], mode="lines", name="chance", line={"color": "#bbb", "dash": "dot"})
    fig.update_xaxes(title="false-positive rate (good images flagged)", range=[0, 1])
    fig.update_yaxes(title="true-positive rate (defects caught)", range=[0, 1.02])
    return _layout(fig, title="ROC curve (image level)")


def score_histogram(
    scores: np.ndarray, labels: np.ndarray, *, threshold: float | None = None, title: str = ""
) -> go.Figure:
    """Image scores per class (good vs defective), with the threshold drawn when given."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(labels).astype(bool)
    fig = go.Figure()
    lo, hi = float(s.min()), float(s.max())
    size = (hi - lo) / 30 if hi > lo else 1.0
    bins = {"start": lo, "end": hi + size, "size": size}
    fig.add_histogram(x=s[~y], name=f"good ({int((~y).sum())})", marker_color=GOOD_COLOUR, opacity=0.7, xbins=bins)
    fig.add_histogram(x=s[y], name=f"defective ({int(y.sum())})", marker_color=BAD_COLOUR, opacity=0.7, xbins=bins)
    if threshold is not None and np.isfinite(threshold):
        fig.add_vline(x=threshold, line={"color": "black", "width": 2, "dash": "dash"}, annotation_text="threshold")
    fig.update_layout(barmode="overlay")
    fig.update_xaxes(title="image anomaly score (higher = more anomalous)")
    fig.update_yaxes(title="images")
    return _layout(fig, title=title or None)


def confusion_figure(tp: int, fp: int, tn: int, fn: int) -> go.Figure:
    z = [[tn, fp], [fn, tp]]
    text = [
        [f"{tn}<br>good, passed", f"{fp}<br>good, flagged<br>(false alarm)"],
        [f"{fn}<br>defective, passed<br>(missed)", f"{tp}<br>defective, flagged"],
    ]
    fig = go.Figure(
        go.Heatmap(
            z=z,
            x=["predicted good", "predicted defective"],
            y=["actually good", "actually defective"],
            text=text,
            texttemplate="%{text}",
            colorscale=[[0, "#f4f6f7"], [1, "#5dade2"]],
            showscale=False,
        )
    )
    fig.update_yaxes(autorange="reversed")
    return _layout(fig, title="Confusion matrix", height=300)


def coreset_scatter(
    xy: np.ndarray,
    *,
    colour_by: str,
    removed: np.ndarray,
    weights: np.ndarray,
    sources: Sequence[str],
    rows: np.ndarray,
    cols: np.ndarray,
    in_bank: np.ndarray,
) -> go.Figure:
    """The 2-D embedding of memory-bank and removed patches (the paper's Figure 5).

    colour_by: "status" (kept in the memory bank / removed as noise), "weight" (soft weight) or "image".
    ``customdata`` of every point is its index into ``xy`` so selections map back to patches.
    """
    xy = np.asarray(xy)
    idx = np.arange(len(xy))
    removed = np.asarray(removed, dtype=bool)
    sources = np.asarray(sources, dtype=object)
    hover = (
        "<b>%{customdata[1]}</b><br>patch row %{customdata[2]}, col %{customdata[3]}<br>"
        "%{customdata[4]}<br>soft weight %{customdata[5]:.3f}<extra></extra>"
    )
    status = np.where(removed, "removed as noise", np.where(in_bank, "kept (memory bank)", "kept (not in coreset)"))

    def custom(mask: np.ndarray) -> np.ndarray:
        return np.stack(
            [idx[mask], sources[mask], rows[mask], cols[mask], status[mask], np.asarray(weights)[mask]], axis=1
        )

    fig = go.Figure()
    marker = {"size": 6, "opacity": 0.8, "line": {"width": 0}}
    everything = np.ones(len(xy), bool)

    def one_trace(**style) -> None:  # every point in one trace, coloured point by point
        fig.add_scattergl(
            x=xy[:, 0],
            y=xy[:, 1],
            mode="markers",
            name="patches",
            customdata=custom(everything),
            hovertemplate=hover,
            **style,
        )

    if colour_by == "weight":
        one_trace(
            marker=dict(
                marker,
                color=np.asarray(weights),
                colorscale="Viridis",
                showscale=True,
                colorbar={"title": "soft<br>weight"},
            )
        )
    elif colour_by == "image" and len(set(sources.tolist())) <= 24:
        for name in sorted(set(sources.tolist())):
            m = sources == name
            fig.add_scattergl(
                x=xy[m, 0],
                y=xy[m, 1],
                mode="markers",
                name=str(name),
                customdata=custom(m),
                hovertemplate=hover,
                marker=marker,
            )
    elif colour_by == "image":  # many images: one trace, one colour per image; the hover names the image
        codes = {n: i for i, n in enumerate(sorted(set(sources.tolist())))}
        one_trace(marker={**marker, "color": [codes[n] for n in sources], "colorscale": "Turbo"}, showlegend=False)
    else:
        for label, m, colour in (
            ("kept (memory bank)", ~removed, SOFTPATCH_COLOUR),
            ("removed as noise", removed, REMOVED_COLOUR),
        ):
            if m.any():
                fig.add_scattergl(
                    x=xy[m, 0],
                    y=xy[m, 1],
                    mode="markers",
                    name=f"{label} ({int(m.sum())})",
                    customdata=custom(m),
                    hovertemplate=hover,
                    marker=dict(marker, color=colour),
                )
    fig.update_xaxes(showticklabels=False, title=None)
    fig.update_yaxes(showticklabels=False, title=None)
    # A single click selects the point under it (plotly's default click only fires an event, which Streamlit
    # does not report as a selection); box and lasso still select many.
    fig.update_layout(dragmode="select", clickmode="event+select")
    return _layout(fig, height=560)


def selected_points(event: object, n_points: int) -> list[int]:
    """The map points a Streamlit plotly selection ``event`` picked (the ``customdata`` index of each point,
    in order, without repeats); anything malformed or out of range in the event (it comes from the browser)
    is left out."""
    chosen: list[int] = []
    try:
        points = event.selection.points if event is not None else []
        for p in points:
            custom = p.get("customdata") if hasattr(p, "get") else None
            if custom:
                k = int(custom[0])
                if 0 <= k < n_points:
                    chosen.append(k)
    except (AttributeError, TypeError, ValueError, KeyError, IndexError):
        return []
    return list(dict.fromkeys(chosen))
