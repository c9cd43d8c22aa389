"""Every widget key of the app, declared once.

Streamlit keeps a widget's value under its key; the pages name widgets through these declarations and read
or write their values only through ``softpatch_app.state`` (``widget_value``, ``set_widget_value``,
``restore_widget_value``), so a page never touches ``st.session_state`` itself.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LoaderKeys:
    """The Data page's loader of one set and that set's thumbnails (``of("train")`` or ``of("test")``)."""

    method: str
    browser_files: str
    zip_file: str
    server_path: str
    go: str
    thumbnails_per_page: str
    thumbnails_page: str

    @classmethod
    def of(cls, kind: str) -> LoaderKeys:
        p = f"load_{kind}"
        return cls(
            f"{p}_method", f"{p}_dir", f"{p}_zip", f"{p}_path", f"{p}_go", f"{kind}_thumbs", f"{kind}_thumbs_page"
        )


@dataclass(frozen=True)
class DataKeys:
    add_files: str = "add_files"
    add_paths: str = "add_paths"
    tabs: str = "data_tabs"
    duplicates_table: str = "data_duplicates"


@dataclass(frozen=True)
class DenoiseKeys:
    backbone: str = "dn_backbone"
    weights_mode: str = "dn_weights_mode"
    weights_path: str = "dn_weights_path"
    backbone_kwargs: str = "dn_kwargs"
    size: str = "dn_size"
    device: str = "dn_device"
    discriminator: str = "dn_disc"
    tau: str = "dn_tau"
    lof_k: str = "dn_k"
    coreset_ratio: str = "dn_ratio"
    soft_weight: str = "dn_soft"
    histogram: str = "dn_hist"
    per_page: str = "dn_n_show"
    page: str = "dn_page"
    table_page: str = "dn_table_page"

    def open_button(self, image: int) -> str:
        return f"dn_open_{image}"


@dataclass(frozen=True)
class ReviewKeys:
    count: str = "rv_n"
    only_open: str = "rv_only_open"
    table_page: str = "rv_table_page"


@dataclass(frozen=True)
class CoresetKeys:
    method: str = "cs_method"
    colour: str = "cs_colour"
    points: str = "cs_points"
    plot: str = "cs_plot"


@dataclass(frozen=True)
class DetectKeys:
    source: str = "dt_source"
    compare: str = "dt_compare"
    files: str = "dt_files"
    pick: str = "dt_pick"
    alpha: str = "dt_alpha"
    leak: str = "dt_leak"
    histogram_softpatch: str = "dt_hist_soft"
    histogram_patchcore: str = "dt_hist_base"
    roc: str = "dt_roc"
    gallery_page: str = "dt_gallery_page"


@dataclass(frozen=True)
class DeployKeys:
    method: str = "dp_method"
    target: str = "dp_target"
    exclude_top: str = "dp_exclude_top"
    percentile: str = "dp_pct"
    manual: str = "dp_manual"
    confusion: str = "dp_conf"
    histogram: str = "dp_hist"
    bundle: str = "dp_bundle"
    bundle_download: str = "dp_bundle_dl"
    onnx: str = "dp_onnx"
    onnx_download: str = "dp_onnx_dl"
    script_download: str = "dp_script_dl"
    report: str = "dp_report"
    report_download: str = "dp_report_dl"


LOADERS = {kind: LoaderKeys.of(kind) for kind in ("train", "test")}
DATA = DataKeys()
DENOISE = DenoiseKeys()
REVIEW = ReviewKeys()
CORESET = CoresetKeys()
DETECT = DetectKeys()
DEPLOY = DeployKeys()

# The Denoise page's widget for each setting it edits (``softpatch_app.settings.settings_from_widgets`` names).
DENOISE_SETTING_KEYS = {
    "backbone": DENOISE.backbone,
    "weights_mode": DENOISE.weights_mode,
    "weights_path": DENOISE.weights_path,
    "backbone_kwargs": DENOISE.backbone_kwargs,
    "size": DENOISE.size,
    "device": DENOISE.device,
    "discriminator": DENOISE.discriminator,
    "tau": DENOISE.tau,
    "lof_k": DENOISE.lof_k,
    "coreset_ratio": DENOISE.coreset_ratio,
    "soft_weight": DENOISE.soft_weight,
}
