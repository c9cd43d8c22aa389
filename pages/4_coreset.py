"""Coreset: the memory bank and the removed patches on a 2-D map (t-SNE or UMAP) — the paper's Figure 5, live."""

from __future__ import annotations

import streamlit as st

from softpatch_app import services
from softpatch_app.embedding import MAX_POINTS, POINT_CHOICES, PROJECTIONS, layout_2d
from softpatch_app.guard import user_errors
from softpatch_app.keys import CORESET
from softpatch_app.plots import selected_points
from softpatch_app.progress import StageProgress
from softpatch_app.state import SessionData, get_session
from softpatch_app.ui import need_model, page_header
from softpatch_app.views import geometry, patch_pictures

COLOUR_CHOICES = {"status": "kept / removed", "weight": "soft weight", "image": "source image"}
SELECTION_LIMIT = 48
PATCHES_PER_ROW = 8
INTRO = (
    "Every dot is one image **patch**, placed so that patches that look alike lie close together. "
    "Green dots are the patches SoftPatch keeps in its **memory bank** (what 'good' looks like); red dots are "
    "the patches it **removed as noise**. Defects usually form small islands away from the big clusters."
)


def _controls_section() -> tuple[str, str, int]:
    c1, c2, c3 = st.columns(3)
    method = c1.radio(
        "Map method",
        PROJECTIONS,
        horizontal=True,
        key=CORESET.method,
        help="t-SNE keeps close neighbours together; UMAP also keeps more of the global layout. Both are computed "
        "once per model and setting and then cached (the first UMAP of a server run takes ~20 s longer).",
    )
    colour_by = c2.radio(
        "Colour by",
        list(COLOUR_CHOICES),
        format_func=COLOUR_CHOICES.get,
        horizontal=True,
        key=CORESET.colour,
        help="Kept/removed: memory bank vs noise. Soft weight: how much a patch's distance counts at detection "
        "(>1 = unusual, counts more). Source image: which training image the patch comes from.",
    )
    max_points = c3.select_slider(
        "Points on the map",
        options=list(POINT_CHOICES),
        value=MAX_POINTS,
        key=CORESET.points,
        help="A random sample of memory-bank and removed patches; more points take longer to lay out.",
    )
    return method, colour_by, max_points


def _map_section(session: SessionData, method: str, colour_by: str, max_points: int) -> services.CoresetView | None:
    """The counts and the map; returns the view (None when it could not be built)."""
    model = session.model
    view = None
    with user_errors("build the memory bank"):
        bars = StageProgress(st.container())
        view = services.coreset_view(session, max_points, progress=bars)
        bars.finish()
    if view is None:
        return None
    m1, m2, m3 = st.columns(3)
    m1.metric("Patches in the memory bank", f"{view.bank_size:,}", help=f"coreset ratio {model.config.coreset_ratio:g}")
    m2.metric("Patches removed as noise", f"{view.removed_count:,}", help=f"tau {model.config.tau:.2f}")
    m3.metric("Training patches in all", f"{model.removed_mask_.size:,}")
    if view.bank_note:
        st.caption(view.bank_note)
    if view.capped_note:
        st.warning(view.capped_note[0].upper() + view.capped_note[1:] + ".", icon=":material/memory:")
    xy = None
    with (
        user_errors(f"compute the {method} map"),
        st.spinner(f"Laying out {view.sample_size:,} patches with {method}…"),
    ):
        xy = layout_2d(view.points, method)
    if xy is None:
        return None
    st.caption(
        f"The map shows a random sample of **{view.sample_size:,} of the {view.population:,} patches** of the "
        "memory bank and the removed ones (removed patches get up to a third of the points). Hover a dot for its "
        "image and position. **Click** a dot, or drag a **box / lasso** (toolbar, top right), to see the selected "
        "patches cut from their images below."
    )
    event = st.plotly_chart(
        services.coreset_figure(view, xy, colour_by),
        key=CORESET.plot,
        on_select="rerun",
        selection_mode=("points", "box", "lasso"),
    )
    _selection_section(session, view, selected_points(event, view.sample_size))
    return view


def _selection_section(session: SessionData, view: services.CoresetView, selected: list[int]) -> None:
    st.subheader(f"Selected patches ({len(selected)})")
    if not selected:
        st.caption("Nothing selected yet.")
        return
    geom = geometry(session.model)
    names = [r.name for r in session.model_records]
    paths = [r.path for r in session.model_records]
    if len(selected) > SELECTION_LIMIT:
        st.caption(f"Showing the first {SELECTION_LIMIT} of {len(selected)}.")
    shown = selected[:SELECTION_LIMIT]
    with user_errors("cut the selected patches"):
        if len(shown) == 1:
            image, row, col = view.patch(shown[0])
            crop, boxed = patch_pictures(paths[image], geom, row, col, out=256)
            a, b = st.columns([1, 2])
            a.image(crop, caption=f"{names[image]} · row {row}, col {col}", width="stretch")
            b.image(boxed, caption="Where it is in the image", width="stretch")
            return
        for start in range(0, len(shown), PATCHES_PER_ROW):
            cols = st.columns(PATCHES_PER_ROW)
            for c, k in zip(cols, shown[start : start + PATCHES_PER_ROW], strict=False):
                image, row, col = view.patch(k)
                crop, _ = patch_pictures(paths[image], geom, row, col)
                status = "removed" if view.is_removed[k] else "kept"
                short = names[image].rsplit("/", 1)[-1]
                c.image(crop, caption=f"{short} ({row},{col}) {status}", width="stretch")


def main() -> None:
    session = get_session()
    page_header(session, "Coreset", INTRO)
    if not need_model(session):
        return
    method, colour_by, max_points = _controls_section()
    _map_section(session, method, colour_by, max_points)


main()
