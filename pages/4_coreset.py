"""Coreset: the memory bank and the removed patches on a 2-D map (t-SNE or UMAP) — the paper's Figure 5, live."""

from __future__ import annotations

import streamlit as st

from softpatch_app import services
from softpatch_app.cache import load_rgb
from softpatch_app.embedding import METHODS, layout_2d
from softpatch_app.guard import user_errors
from softpatch_app.imaging import patch_crop, with_box
from softpatch_app.progress import StageProgress
from softpatch_app.state import SessionData, get_session
from softpatch_app.ui import need_model, show_notices
from softpatch_app.views import geometry

session: SessionData = get_session()

st.title("Coreset")
show_notices(session)
st.markdown(
    "Every dot is one image **patch**, placed so that patches that look alike lie close together. "
    "Green dots are the patches SoftPatch keeps in its **memory bank** (what 'good' looks like); red dots are the "
    "patches it **removed as noise**. Defects usually form small islands away from the big clusters."
)
if not need_model(session):
    st.stop()

model = session.model
c1, c2, c3 = st.columns(3)
method = c1.radio(
    "Map method",
    METHODS,
    horizontal=True,
    key="cs_method",
    help="t-SNE keeps close neighbours together; UMAP also keeps more of the global layout. Both are computed "
    "once per model and setting and then cached (the first UMAP of a server run takes ~20 s longer).",
)
colour_by = c2.radio(
    "Colour by",
    ["status", "weight", "image"],
    format_func={"status": "kept / removed", "weight": "soft weight", "image": "source image"}.get,
    horizontal=True,
    key="cs_colour",
    help="Kept/removed: memory bank vs noise. Soft weight: how much a patch's distance counts at detection "
    "(>1 = unusual, counts more). Source image: which training image the patch comes from.",
)
max_points = c3.select_slider(
    "Points on the map",
    options=[500, 1000, 2000, 3000],
    value=2000,
    key="cs_points",
    help="A random sample of memory-bank and removed patches; more points take longer to lay out.",
)

bars = StageProgress(st.container())
view = None
with user_errors("build the memory bank"):
    view = services.coreset_view(session, int(max_points), progress=bars)
    bars.finish()
if view is None:
    st.stop()
m1, m2, m3 = st.columns(3)
m1.metric("Patches in the memory bank", f"{view.bank_size:,}", help=f"coreset ratio {model.config.coreset_ratio:g}")
m2.metric("Patches removed as noise", f"{view.removed_count:,}", help=f"tau {model.config.tau:.2f}")
m3.metric("Training patches in all", f"{model.removed_mask_.size:,}")

xy = None
with user_errors(f"compute the {method} map"), st.spinner(f"Laying out {len(view.points):,} patches with {method}…"):
    xy = layout_2d(view.points, method)
if xy is None:
    st.stop()
fig = services.coreset_figure(view, xy, colour_by)
prov, is_removed = view.provenance, view.is_removed
names = [r.name for r in session.model_records]
st.caption(
    "Hover a dot for its image and position. **Click** a dot, or drag a **box / lasso** (toolbar, top right), "
    "to see the selected patches cut from their images below."
)
event = st.plotly_chart(fig, key="cs_plot", on_select="rerun", selection_mode=("points", "box", "lasso"))

selected: list[int] = []
try:
    for p in event.selection.points if event is not None else []:
        custom = p.get("customdata")
        if custom:
            selected.append(int(custom[0]))
except (AttributeError, TypeError, ValueError):
    selected = []
selected = list(dict.fromkeys(selected))

st.subheader(f"Selected patches ({len(selected)})")
if not selected:
    st.caption("Nothing selected yet.")
else:
    geom = geometry(model)
    limit = 48
    if len(selected) > limit:
        st.caption(f"Showing the first {limit} of {len(selected)}.")
    shown = selected[:limit]
    per_row = 8
    with user_errors("cut the selected patches"):
        if len(shown) == 1:
            k = shown[0]
            img_i, row, col = (int(v) for v in prov[k])
            image = load_rgb(session.model_records[img_i].path)
            box = geom.cell_box(row, col, image.size, pad=1)
            a, b = st.columns([1, 2])
            a.image(patch_crop(image, box, out=256), caption=f"{names[img_i]} · row {row}, col {col}", width="stretch")
            b.image(with_box(image, box), caption="Where it is in the image", width="stretch")
        else:
            for start in range(0, len(shown), per_row):
                cols = st.columns(per_row)
                for c, k in zip(cols, shown[start : start + per_row], strict=False):
                    img_i, row, col = (int(v) for v in prov[k])
                    image = load_rgb(session.model_records[img_i].path)
                    box = geom.cell_box(row, col, image.size, pad=1)
                    status = "removed" if is_removed[k] else "kept"
                    short = names[img_i].rsplit("/", 1)[-1]
                    c.image(patch_crop(image, box), caption=f"{short} ({row},{col}) {status}", width="stretch")
