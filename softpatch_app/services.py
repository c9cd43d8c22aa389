"""Calling the core for the pages: fit, re-tune, score, and the small per-session memos around them.

Orchestration only (which core call, with which progress bar, cached where): every computation is
the core's (``softpatch.SoftPatch``).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from softpatch import SoftPatch
from softpatch.contamination import Advice, advice
from softpatch.errors import DataError
from softpatch_app.cache import feature_token, file_token, get_extractor
from softpatch_app.loading import LoadedSplit
from softpatch_app.settings import AppSettings
from softpatch_app.state import SessionData

# Settings a fitted model can change without reading the images again (see SoftPatch.retune).
RETUNABLE = ("discriminator", "tau", "lof_k", "coreset_ratio", "soft_weight")
# Of those, the ones that need the discriminator to run again (the rest is instant or lazy).
RESCORING = ("discriminator", "lof_k")
PATCHCORE = {"discriminator": "none", "soft_weight": False}


def fit(session: SessionData, settings: AppSettings, progress=None, *, split: LoadedSplit | None = None) -> SoftPatch:
    """Fit SoftPatch on the session's training set (or on ``split``, which then becomes the training set).

    Only a successful fit replaces anything: after a failure the previous data and model are untouched.
    """
    train = split if split is not None else session.train
    if train is None or not len(train):
        raise DataError("load a training folder first (Data page)" if split is None else "no training images left")
    if len(train) < 2:
        raise DataError("SoftPatch needs at least 2 training images to compare patches between images")
    config = settings.fit_config()
    extractor = get_extractor(config)  # cached per backbone; WeightsError when weights cannot be had
    records = list(train.records)
    start = time.perf_counter()
    model = SoftPatch(config, extractor=extractor).fit(records, progress=progress)
    if split is not None:
        session.train = split
        session.data_version += 1
    session.forget_model()  # only now: a failed fit keeps the previous model
    session.model = model
    session.model_records = records
    session.model_data_version = session.data_version
    session.model_feature_key = settings.feature_key()
    session.fit_seconds = time.perf_counter() - start
    session.settings = settings
    return model


def pending_changes(model: SoftPatch, settings: AppSettings) -> dict:
    """Denoising settings that differ between the fitted model and the widgets."""
    return {k: getattr(settings, k) for k in RETUNABLE if getattr(model.config, k) != getattr(settings, k)}


def retune(session: SessionData, settings: AppSettings, progress=None) -> dict:
    """Apply changed denoising settings to the fitted model (tau: instant; k/discriminator: rescoring only)."""
    model = session.model
    changes = pending_changes(model, settings)
    if changes:
        model.retune(progress=progress, **changes)
    session.settings = settings
    return changes


def needs_refit(session: SessionData, settings: AppSettings) -> bool:
    """Whether the feature settings (backbone, weights, image size, device) changed since the fit."""
    return session.model is None or session.model_feature_key != settings.feature_key()


@dataclass
class Vetting:
    """What the Denoise and Review pages show, in the model's training order."""

    names: list[str]  # display names (relative paths)
    paths: list[str]
    suspicion: np.ndarray  # (N,)
    removed_fraction: np.ndarray  # (N,)
    ranking: np.ndarray  # (N,) most suspicious first
    outlier_scores: np.ndarray  # (N, H, W)
    removed_mask: np.ndarray  # (N, H, W)


def vetting(session: SessionData) -> Vetting:
    model = session.model
    report = model.vetting_report()
    records = session.model_records
    return Vetting(
        names=[r.name for r in records],
        paths=[str(r.path) for r in records],
        suspicion=np.asarray(report.suspicion),
        removed_fraction=np.asarray(report.removed_fraction),
        ranking=np.asarray(report.ranking),
        outlier_scores=model.outlier_scores_,
        removed_mask=model.removed_mask_,
    )


def noise_advice(session: SessionData) -> Advice:
    """The estimated share of defective training images, and a warning when the current settings are weak there."""
    model = session.model
    chosen = model.resolved_config_
    settings = {"discriminator": chosen.discriminator, "lof_k": chosen.lof_k}
    return advice(model.wide_suspicion_, model.config.discriminator, model.config.lof_k, settings)


def embeddings(session: SessionData, model: SoftPatch, paths: Sequence[str], progress=None):
    """Test features via ``model.embed``, memoised per session by feature settings and file content.

    SoftPatch, its PatchCore variant and every re-tune share one extraction. (Kept per session rather than
    in ``st.cache_data``: the progress bars drawn during extraction would be replayed on every cache hit.)
    """
    key = (feature_token(model.config), tuple(file_token(p) for p in paths))
    memo = session.embed_memo
    if key in memo:
        return memo[key]
    result = model.embed(list(paths), progress=progress)
    while len(memo) >= 2:
        memo.pop(next(iter(memo)))
    memo[key] = result
    return result


def baseline(session: SessionData) -> SoftPatch:
    """Plain PatchCore on the same features (no denoising, no soft weights), via ``model.variant``."""
    model = session.model
    c = model.config
    token = (id(model), session.model_data_version, c.coreset, c.coreset_ratio, c.projection_dim, c.seed)
    if session.baseline is None or session.baseline_token != token:
        session.baseline = model.variant(**PATCHCORE)
        session.baseline_token = token
    return session.baseline


def model_token(session: SessionData) -> tuple:
    """Identifies the fitted model *and* its current settings (a re-tune gives a new token)."""
    model = session.model
    if model is None:
        return ()
    return (id(model), session.model_data_version, repr(sorted(model.config.to_dict().items())))


@dataclass
class Detection:
    names: list[str]
    paths: list[str]
    labels: np.ndarray | None  # (n,) 0/1 when known
    mask_paths: list[str | None]
    softpatch: object  # ScoreResult
    patchcore: object | None  # ScoreResult
    metrics: dict = field(default_factory=dict)  # model name -> {metric: value or message}, filled lazily


def detection_key(session: SessionData, records, compare: bool) -> tuple:
    return (model_token(session), tuple(file_token(r.path) for r in records), compare)


def cached_detection(session: SessionData, records, compare: bool = True) -> Detection | None:
    """The scores of ``records`` under the model's *current* settings, if already computed."""
    return session.results.get(detection_key(session, records, compare))


def score_test(session: SessionData, records, *, labelled: bool, progress=None, compare: bool = True) -> Detection:
    """Score test records with SoftPatch (and the PatchCore baseline), memoised per model settings + files."""
    model = session.model
    paths = [str(r.path) for r in records]
    key = detection_key(session, records, compare)
    hit = session.results.get(key)
    if hit is not None:
        return hit
    emb = embeddings(session, model, paths, progress)
    model.build_memory_bank(progress)
    soft = model.score(emb, progress=progress)
    base = None
    if compare:
        patchcore = baseline(session)
        patchcore.build_memory_bank(progress)
        base = patchcore.score(emb, progress=progress)
    detection = Detection(
        names=[r.name for r in records],
        paths=paths,
        labels=np.asarray([r.label for r in records]) if labelled else None,
        mask_paths=[str(r.mask_path) if r.mask_path else None for r in records],
        softpatch=soft,
        patchcore=base,
    )
    while len(session.results) >= 4:
        session.results.pop(next(iter(session.results)))
    session.results[key] = detection
    return detection


def ground_truth(detection: Detection, transform) -> np.ndarray | None:
    """Masks of the scored images at crop size (n, crop, crop), or None when no defective image has a mask.

    Good images are all False; defective images without a mask are left out of pixel metrics (``pixel_subset``).
    """
    from softpatch.images import load_mask

    if detection.labels is None or not any(detection.mask_paths):
        return None
    masks = []
    for _label, mask_path in zip(detection.labels, detection.mask_paths, strict=False):
        if mask_path:
            masks.append(transform.mask(load_mask(mask_path)))
        else:
            masks.append(np.zeros((transform.crop, transform.crop), dtype=bool))
    return np.stack(masks)


def pixel_subset(detection: Detection) -> np.ndarray:
    """Images usable for pixel metrics: good ones, and defective ones that have a mask."""
    if detection.labels is None:
        return np.zeros(len(detection.names), dtype=bool)
    has_mask = np.asarray([m is not None for m in detection.mask_paths])
    return (detection.labels == 0) | has_mask


def evaluate(detection: Detection, transform) -> dict[str, dict[str, object]]:
    """Image AUROC, pixel AUROC and AUPRO (``softpatch.metrics``) per model; a metric that is undefined for
    this test set is given as a short reason instead of a number."""
    from softpatch import metrics

    if detection.metrics:
        return detection.metrics
    out: dict[str, dict[str, object]] = {}
    gt = ground_truth(detection, transform)
    subset = pixel_subset(detection)
    for name, result in (("SoftPatch", detection.softpatch), ("PatchCore", detection.patchcore)):
        if result is None:
            continue
        row: dict[str, object] = {}
        try:
            row["image AUROC"] = metrics.image_auroc(detection.labels, result.image_scores)
        except ValueError as exc:
            row["image AUROC"] = str(exc)
        if gt is not None and result.anomaly_maps is not None and subset.any():
            for metric, fn in (("pixel AUROC", metrics.pixel_auroc), ("AUPRO", metrics.aupro)):
                try:
                    row[metric] = fn(gt[subset], result.anomaly_maps[subset])
                except ValueError as exc:
                    row[metric] = str(exc)
        else:
            row["pixel AUROC"] = row["AUPRO"] = "no masks"
        out[name] = row
    detection.metrics = out
    return out


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the image-level ROC curve, for drawing (the AUROC itself comes from softpatch.metrics)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64))
    return fpr, tpr


def default_threshold(labels, scores) -> tuple[float, str]:
    """A starting threshold: best F1 when labels of both classes are known, else the 95th percentile."""
    from softpatch import metrics

    scores = np.asarray(scores, dtype=np.float64)
    if labels is not None and 0 < int(np.sum(labels)) < len(labels):
        return metrics.f1_threshold(labels, scores).threshold, "best F1 on the labelled test images"
    return float(np.percentile(scores, 95)), "95th percentile of the scores (no labels)"


@dataclass
class CoresetView:
    """The patches drawn on the Coreset map: a sample of the memory bank plus a sample of the removed ones."""

    points: np.ndarray  # (n, D) features
    provenance: np.ndarray  # (n, 3) training image, row, col
    is_removed: np.ndarray  # (n,) bool
    weights: np.ndarray  # (n,) soft weight of each patch
    sources: list[str]  # (n,) training image names
    bank_size: int
    removed_count: int


def coreset_view(session: SessionData, max_points: int, progress=None) -> CoresetView:
    from softpatch.denoise import soft_weights
    from softpatch_app.embedding import subsample

    model = session.model
    bank = model.build_memory_bank(progress)
    removed_idx = np.argwhere(model.removed_mask_)  # (R, 3): image, row, col
    h, w = model.grid_shape_
    sel_bank, sel_removed = subsample(len(bank), len(removed_idx), max_points=int(max_points))
    features = model.train_features_
    flat = features.reshape(-1, features.shape[-1])
    removed_flat = removed_idx[:, 0] * (h * w) + removed_idx[:, 1] * w + removed_idx[:, 2]
    points = np.concatenate([bank.features[sel_bank].numpy(), flat[removed_flat[sel_removed]].numpy()], axis=0)
    prov = np.concatenate([np.asarray(bank.provenance)[sel_bank], removed_idx[sel_removed]], axis=0)
    is_removed = np.concatenate([np.zeros(len(sel_bank), bool), np.ones(len(sel_removed), bool)])
    # Removed patches are not in the bank; their weight is what eq. 8 would have given them.
    all_weights = soft_weights(model.outlier_scores_.reshape(len(model.train_names_), -1)).reshape(-1)
    weights = np.concatenate([bank.weights[sel_bank].numpy(), all_weights[removed_flat[sel_removed]]])
    names = [r.name for r in session.model_records]
    return CoresetView(
        points=points.astype(np.float32),
        provenance=prov,
        is_removed=is_removed,
        weights=weights.astype(np.float32),
        sources=[names[int(k)] for k in prov[:, 0]],
        bank_size=len(bank),
        removed_count=len(removed_idx),
    )


def coreset_figure(view: CoresetView, xy: np.ndarray, colour_by: str):
    from softpatch_app import plots

    return plots.coreset_scatter(
        xy,
        colour_by=colour_by,
        removed=view.is_removed,
        weights=view.weights,
        sources=view.sources,
        rows=view.provenance[:, 1],
        cols=view.provenance[:, 2],
        in_bank=~view.is_removed,
    )
