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
from softpatch.config import RETUNE_FIELDS
from softpatch.errors import DataError
from softpatch.evaluation.benchmark import BENCHMARK_METHODS
from softpatch.evaluation.threshold import DEFAULT_TARGET_FPR
from softpatch.method.contamination import Advice, advice
from softpatch.runtime.progress import report as report_progress
from softpatch.runtime.threads import job_slot
from softpatch_app.cache import feature_token, file_token, get_extractor
from softpatch_app.loading import LoadedSplit
from softpatch_app.settings import APP_CONFIG_SETTINGS, AppSettings
from softpatch_app.state import SessionData

# The app's settings a fitted model can change without reading the images again (SoftPatch.retune); the
# device is left out: the app's extractor is shared between sessions, so a new device means a new fit.
RETUNABLE = tuple(name for name in APP_CONFIG_SETTINGS if name in RETUNE_FIELDS and name != "device")
# Of those, the ones that need the discriminator to run again (the rest is instant or lazy).
RESCORING = ("discriminator", "lof_k")
PATCHCORE = BENCHMARK_METHODS["patchcore"]  # the baseline the Detect page compares with


def has_both_classes(labels: np.ndarray | None) -> bool:
    """Whether ``labels`` (n,) 0/1 hold good and defective images both (what AUROC, F1 and confusion need)."""
    return labels is not None and 0 < int(np.sum(labels)) < len(labels)


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
    # Sessions fit at once in this one process: each fit keeps to its share of the cores (threads.job_slot).
    with job_slot():
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
        with job_slot():
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

    @property
    def n_affected(self) -> int:
        """How many images lost at least one patch."""
        return int(self.removed_mask.reshape(len(self.names), -1).any(axis=1).sum())

    def rank_of(self, i: int) -> int:
        """Image ``i``'s place in the ranking, 1 = most suspicious."""
        return int(np.flatnonzero(self.ranking == i)[0]) + 1

    def rows(self, labels: dict[str, str] | None = None) -> list[dict[str, object]]:
        """One row per training image, most suspicious first: rank, name, path, scores and the review label."""
        labels = labels or {}
        return [
            {
                "rank": r + 1,
                "image": self.names[j],
                "path": self.paths[j],
                "suspicion": round(float(self.suspicion[j]), 4),
                "removed_share": round(float(self.removed_fraction[j]), 4),
                "label": labels.get(self.names[j], ""),
            }
            for r, j in enumerate(int(x) for x in self.ranking)
        ]


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


def demo_check(vet: Vetting, demo) -> tuple[int, int]:
    """(how many of the demo's planted defective images the ranking puts in its top k, k = how many were planted)."""
    planted = demo.contaminant_names
    k = len(planted)
    top = {vet.names[i].rsplit("/", 1)[-1] for i in vet.ranking[:k]}
    return len(planted & top), k


def removed_explanation(vet: Vetting, i: int, tau: float, tau_scope: str) -> str:
    """Plain words on image ``i``'s removed patches: its share against the typical image's, and why nearly
    every image loses some under a global tau."""
    share = float(vet.removed_fraction[i])
    typical = float(np.median(vet.removed_fraction))
    ratio = share / typical if typical > 0 else float("inf") if share > 0 else 1.0
    compare = (
        "about as many as a typical image"
        if 0.67 <= ratio <= 1.5
        else f"{ratio:.1f}x the typical image's share"
        if ratio > 1.5
        else "fewer than a typical image"
    )
    if tau_scope == "global":
        why = (
            f"Tau cuts the {tau:.0%} most outlying patches of all images together, so nearly every image loses a few "
            "(edges, reflections, texture that happens to be rare); what points to a defect is an image losing far "
            "more than the typical one, in one place. The per-position cut removes the top tau at every position "
            "instead, so each region keeps the same share and a defect stands out only against its own position."
        )
    else:
        why = (
            f"Tau removes the {tau:.0%} most outlying patches at every position, so every position loses the same share "
            "across the images; an image losing far more than the typical one is unusual in many places. The global "
            "cut would take the top tau of all patches together instead."
        )
    return (
        f"{share:.1%} of this image's patches were removed, {compare} (median {typical:.1%}). {why} The heatmap shows "
        "each patch's outlier score; the outlined squares are the removed ones."
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
    # excluded image indices -> model name -> {metric: value or message}, filled lazily
    metrics: dict = field(default_factory=dict)

    @property
    def search_note(self) -> str:
        """What the user must know of the nearest-neighbour search: "" when exact, else its measured recall."""
        recall = self.softpatch.search_recall
        if recall is None:
            return ""
        return (
            f"The memory bank is searched approximately (IVF): it finds the exact nearest patch "
            f"{recall:.1%} of the time, measured on training patches left out of the bank."
        )

    @property
    def order(self) -> np.ndarray:
        """(n,) image indices by SoftPatch score, most anomalous first (ties in input order)."""
        return np.argsort(-np.asarray(self.softpatch.image_scores), kind="stable")

    def describe(self, i: int) -> str:
        """'name — score 1.23 · defective' for image ``i`` (the label only when known)."""
        label = ""
        if self.labels is not None:
            label = " · defective" if self.labels[i] else " · good"
        return f"{self.names[i]} — score {self.softpatch.image_scores[i]:.2f}{label}"

    def map_range(self) -> tuple[float, float]:
        """One colour scale for every anomaly map of both models (``softpatch_app.views.score_range``)."""
        from softpatch_app.views import score_range

        maps = [r.anomaly_maps for r in (self.softpatch, self.patchcore) if r is not None]
        return score_range(np.concatenate([m.reshape(-1) for m in maps]))

    @property
    def has_both_classes(self) -> bool:
        return has_both_classes(self.labels)


def detection_key(session: SessionData, records, compare: bool) -> tuple:
    return (model_token(session), tuple(file_token(r.path) for r in records), compare)


def cached_detection(session: SessionData, records, compare: bool = True) -> Detection | None:
    """The scores of ``records`` under the model's *current* settings, if already computed."""
    return session.results.get(detection_key(session, records, compare))


def read_detect_upload(session: SessionData, env, files) -> LoadedSplit:
    """Uploaded images to score on the Detect page, saved in the session's workspace; the same files (by
    upload id, name and size) are read once."""
    from softpatch.io.datasets import scan_images
    from softpatch.io.paths import ReadScope
    from softpatch_app import loading

    token = tuple((f.file_id, f.name, f.size) for f in files)
    cached = session.detect_upload
    if cached and cached[0] == token:
        return cached[1]
    root, skipped = loading.save_browser_files(list(files), session.workspace, session.slot("detect"), env.limits)
    folder = scan_images(root, limits=env.limits, scope=ReadScope.of([session.workspace.path]))
    split = loading.with_upload_skips(LoadedSplit(folder, "upload", "uploaded images"), skipped)
    session.detect_upload = (token, split)
    return split


def scored_test_set(session: SessionData) -> Detection | None:
    """The test set's scores under the current model, with or without the PatchCore comparison, if computed."""
    if session.test is None:
        return None
    records = list(session.test.records)
    return cached_detection(session, records, True) or cached_detection(session, records, False)


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
    from softpatch.io.images import load_mask_for_crop

    if detection.labels is None or not any(detection.mask_paths):
        return None
    return np.stack([load_mask_for_crop(path or None, transform) for path in detection.mask_paths])


def pixel_subset(detection: Detection) -> np.ndarray:
    """Images usable for pixel metrics: good ones, and defective ones that have a mask."""
    if detection.labels is None:
        return np.zeros(len(detection.names), dtype=bool)
    has_mask = np.asarray([m is not None for m in detection.mask_paths])
    return (detection.labels == 0) | has_mask


def duplicates(session: SessionData, progress=None):
    """Exact and near duplicates within the training set and between it and the test set
    (``softpatch.evaluation.duplicates.find_duplicates``), memoised per files, model and test features.

    Near copies need features: the fitted model's training features, and the test features once the test
    set has been scored (Detect); until then only identical pixels are compared.
    """
    from softpatch.evaluation.duplicates import find_duplicates

    if session.train is None:
        return None
    train = [str(r.path) for r in session.train.records]
    test = [str(r.path) for r in session.test.records] if session.test is not None else []
    model = session.model if session.model_is_current else None
    train_features = test_features = grid = None
    features = _training_features(model) if model is not None else None
    if features is not None and [str(r.path) for r in session.model_records] == train:
        train_features, grid = features, model.grid_shape_
        if test:
            key = (feature_token(model.config), tuple(file_token(p) for p in test))
            emb = session.embed_memo.get(key)
            test_features = emb.features if emb is not None else None
    key = (
        tuple(file_token(p) for p in train),
        tuple(file_token(p) for p in test),
        id(train_features),
        id(test_features),
    )
    memo = session.duplicates_memo
    if key not in memo:
        memo.clear()  # one report per session: the newest data
        memo[key] = find_duplicates(
            train,
            test,
            train_features=train_features,
            test_features=test_features,
            grid=grid,
            progress=progress,
        )
    return memo[key]


def _training_features(model: SoftPatch):
    """The fitted model's training features (N, P, D): its feature store (read by chunks, and the same object on
    every rerun, so the memo holds), the tensor of an in-memory fit, or None when it has none (a bundle)."""
    from softpatch.errors import SoftPatchError

    if model.feature_store_ is not None:
        return model.feature_store_
    try:
        return model.train_features_
    except SoftPatchError:
        return None


def leaked_mask(session: SessionData, detection: Detection, progress=None) -> np.ndarray:
    """(n,) True for the scored images that are (near) copies of a training image (leakage)."""
    found = duplicates(session, progress)
    leaked = set(found.leaked_test) if found is not None else set()
    return np.asarray([p in leaked for p in detection.paths], dtype=bool)


def evaluate(
    detection: Detection, transform, exclude: np.ndarray | None = None, progress=None
) -> dict[str, dict[str, object]]:
    """Image AUROC, pixel AUROC and AUPRO (``softpatch.evaluation.metrics``) per model, without the images where
    ``exclude`` (n,) is True (e.g. leaked test images); a metric that is undefined for this test set is given
    as a short reason instead of a number."""
    from softpatch.evaluation import metrics

    keep = np.ones(len(detection.names), dtype=bool) if exclude is None else ~np.asarray(exclude, dtype=bool)
    memo_key = tuple(np.flatnonzero(~keep).tolist())
    if memo_key in detection.metrics:
        return detection.metrics[memo_key]
    out: dict[str, dict[str, object]] = {}
    report_progress(progress, 0.0, "metrics: reading the masks")
    gt = ground_truth(detection, transform)
    subset = pixel_subset(detection) & keep
    labels = detection.labels[keep] if detection.labels is not None else None
    models = [
        (n, r) for n, r in (("SoftPatch", detection.softpatch), ("PatchCore", detection.patchcore)) if r is not None
    ]
    for done, (name, result) in enumerate(models):
        report_progress(progress, done / len(models), f"metrics: {name} image AUROC, pixel AUROC, AUPRO")
        row: dict[str, object] = {}
        try:
            row["image AUROC"] = metrics.image_auroc(labels, result.image_scores[keep])
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
    report_progress(progress, 1.0, "metrics: done")
    detection.metrics[memo_key] = out
    return out


def format_metric(value: object) -> str:
    """A metric for a table: 3 decimals, or 'n/a (why)' when it is undefined for this test set."""
    return f"{value:.3f}" if isinstance(value, float) else f"n/a ({value})"


def roc_curves(
    detection: Detection, table: dict[str, dict[str, object]], keep: np.ndarray | None = None
) -> dict[str, tuple[np.ndarray, np.ndarray, float]]:
    """model name -> (fpr, tpr, image AUROC) over the images where ``keep`` (n,) is True, for the models whose
    AUROC (``evaluate``'s ``table``) is defined."""
    keep = np.ones(len(detection.names), dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    return {
        name: (*roc_points(detection.labels[keep], result.image_scores[keep]), table[name]["image AUROC"])
        for name, result in (("SoftPatch", detection.softpatch), ("PatchCore", detection.patchcore))
        if result is not None and isinstance(table.get(name, {}).get("image AUROC"), float)
    }


def roc_points(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the image-level ROC curve, for drawing (the AUROC itself comes from softpatch.evaluation.metrics)."""
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(np.asarray(labels).astype(int), np.asarray(scores, dtype=np.float64))
    return fpr, tpr


# How the threshold is chosen; the sentence is what the pages, the bundle's caption and the report show.
THRESHOLD_RULES = {
    "good": "From good training images alone (out-of-sample, false-alarm target)",
    "f1": "Best F1 on the labelled test images",
    "percentile": "A percentile of known-good test scores",
    "manual": "By hand",
}


@dataclass(frozen=True)
class ThresholdRule:
    """How the threshold is chosen; applied alike to SoftPatch and to the PatchCore comparison."""

    kind: str = "good"  # a key of THRESHOLD_RULES
    target_fpr: float = DEFAULT_TARGET_FPR  # "good": share of good images allowed to be flagged
    exclude_top: int = 0  # "good": also leave out this many of the most suspicious training images
    percentile: float = 99.0  # "percentile"
    value: float | None = None  # "manual"


@dataclass(frozen=True)
class ChosenThreshold:
    """A threshold, the sentence saying how it was chosen, and what it rests on."""

    threshold: float
    method: str
    chosen_on_test: bool  # the labelled test images chose it: figures on them are in-sample
    good: object | None = None  # softpatch.evaluation.threshold.GoodImageThreshold for the "good" rule
    f1: object | None = None  # softpatch.evaluation.metrics.ThresholdChoice for the "f1" rule


def marked_defective(session: SessionData) -> list[str]:
    """Training images (names as the model knows them) known to be defective: marked so on the Review page,
    or copies of a test image labelled defective (found by ``duplicates``)."""
    marked = {str(r.path) for r in session.model_records if session.labels.get(r.name) == "defective"}
    if session.test is not None and session.test.labelled:
        defective_test = {str(r.path) for r in session.test.records if r.label == 1}
        found = duplicates(session)
        for group in found.leaking if found is not None else []:
            if defective_test.intersection(group.test):
                marked.update(group.train)
    return [str(r.path) for r in session.model_records if str(r.path) in marked]


def good_image_threshold(session: SessionData, model: SoftPatch, rule: ThresholdRule, progress=None):
    """``softpatch.evaluation.threshold.threshold_from_good_images`` for ``model`` (SoftPatch or its PatchCore variant),
    leaving out the images marked defective; memoised per model settings, exclusions and target."""
    from softpatch.evaluation.threshold import threshold_from_good_images

    exclude = tuple(marked_defective(session))
    key = (
        id(model),
        session.model_data_version,
        repr(sorted(model.config.to_dict().items())),
        exclude,
        rule.target_fpr,
        rule.exclude_top,
    )
    memo = session.threshold_memo
    if key not in memo:
        while len(memo) >= 4:
            memo.pop(next(iter(memo)))
        memo[key] = threshold_from_good_images(
            model,
            target_fpr=rule.target_fpr,
            exclude=exclude,
            exclude_most_suspicious=rule.exclude_top,
            progress=progress,
        )
    return memo[key]


def threshold_by_rule(
    session: SessionData,
    model: SoftPatch,
    rule: ThresholdRule,
    scores: np.ndarray | None,
    labels: np.ndarray | None,
    progress=None,
) -> ChosenThreshold:
    """Apply ``rule`` to ``model`` with its own test ``scores`` (n,) and ``labels`` (n,) where the rule needs them."""
    from softpatch.evaluation import metrics

    has_both = has_both_classes(labels)
    if rule.kind == "f1" and has_both:
        choice = metrics.f1_threshold(labels, scores)
        return ChosenThreshold(
            choice.threshold,
            f"{THRESHOLD_RULES['f1']} (middle of the widest best-F1 range, margin {choice.margin:.3f})",
            True,
            f1=choice,
        )
    if rule.kind == "percentile" and scores is not None:
        good = scores[labels == 0] if labels is not None and (labels == 0).any() else scores
        value = metrics.percentile_threshold(good, rule.percentile)
        return ChosenThreshold(
            value, f"{rule.percentile:g}th percentile of {len(good)} test scores taken as good", True
        )
    if rule.kind == "manual" and rule.value is not None:
        return ChosenThreshold(float(rule.value), THRESHOLD_RULES["manual"], False)
    good = good_image_threshold(session, model, rule, progress)
    return ChosenThreshold(
        good.threshold,
        f"{THRESHOLD_RULES['good']}: {good.target_fpr:.1%} target, {good.n_images} good images, "
        f"false-alarm rate at most {good.fpr_upper_bound:.1%} ({good.confidence:.0%} confidence)",
        False,
        good=good,
    )


def choose_threshold(session: SessionData, rule: ThresholdRule, detection=None, progress=None) -> ChosenThreshold:
    """Apply ``rule`` to the session's model and make it *the* threshold (``session.threshold``), which Detect,
    Deploy, the bundle and the report all use."""
    scores, labels = evidence_on_test(session, detection, "softpatch")
    chosen = threshold_by_rule(session, session.model, rule, scores, labels, progress)
    session.threshold = float(chosen.threshold)
    session.threshold_method = chosen.method
    session.threshold_rule = rule
    return chosen


def current_threshold(session: SessionData, progress=None) -> tuple[float, str]:
    """The session's one threshold and how it was chosen; the first time, the default rule (from good
    training images alone, 1% false alarms), which needs no labelled defect and leaks no test image."""
    rule = session.threshold_rule
    if session.threshold is None or (isinstance(rule, ThresholdRule) and rule.kind == "good"):
        # "good" follows the Review page's marks (memoised: instant while they are unchanged).
        choose_threshold(session, rule if isinstance(rule, ThresholdRule) else ThresholdRule(), None, progress)
    return float(session.threshold), session.threshold_method


def threshold_chosen_on_test(session: SessionData) -> bool:
    """Whether the session's threshold was fitted on the test images (best F1, test percentile): figures on
    those images are then in-sample."""
    rule = session.threshold_rule
    return isinstance(rule, ThresholdRule) and rule.kind in ("f1", "percentile")


def cli_score_command(bundle_name: str, images: str = "IMAGES_OR_FOLDER") -> list[str]:
    """The ``softpatch score`` command line for a downloaded bundle, checked against the real CLI parser
    (``softpatch.cli.build_parser``), so the page never shows a command that fails to parse."""
    from softpatch.cli import build_parser

    argv = ["score", bundle_name, images, "--json"]
    build_parser().parse_args(argv)  # exits with a usage error if the CLI changed under us
    return ["softpatch", *argv]


def baseline_threshold(session: SessionData, detection, progress=None) -> ChosenThreshold:
    """The PatchCore comparison's own threshold by the rule that chose SoftPatch's (a hand-set value does not
    carry over between models: PatchCore then gets the default rule, and the method says so)."""
    rule = session.threshold_rule if isinstance(session.threshold_rule, ThresholdRule) else ThresholdRule()
    if rule.kind == "manual":
        rule = ThresholdRule(target_fpr=rule.target_fpr, exclude_top=rule.exclude_top)
    scores, labels = evidence_on_test(session, detection, "patchcore")
    return threshold_by_rule(session, baseline(session), rule, scores, labels, progress)


def evidence_on_test(
    session: SessionData, detection, model: str, progress=None
) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(scores, labels) of one model on the scored test images, leaked copies of training images left out."""
    result = getattr(detection, model, None) if detection is not None else None
    if result is None:
        return None, None
    keep = ~leaked_mask(session, detection, progress)
    labels = detection.labels[keep] if detection.labels is not None else None
    return result.image_scores[keep], labels


def patch_positions(provenance: np.ndarray, grid_shape: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(image, position) indices into a per-patch array of shape (N, P, ...) (P = H*W, row-major, the core's
    layout) for the patches ``provenance`` (n, 3) [image, row, col] names (the memory bank's provenance,
    ``np.argwhere(removed_mask_)``).

    The one place the app goes from a patch's grid place to its row in such an array (the inverse of
    the core's provenance).
    """
    prov = np.asarray(provenance, dtype=np.int64).reshape(-1, 3)
    return prov[:, 0], np.ravel_multi_index((prov[:, 1], prov[:, 2]), tuple(int(g) for g in grid_shape))


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
    bank_note: str = ""  # how the bank rows were chosen ("" when not known, e.g. a bank from a bundle)
    capped_note: str | None = None  # set when the memory budget cut the bank below the coreset ratio

    @property
    def sample_size(self) -> int:
        """How many patches the map shows."""
        return len(self.points)

    @property
    def population(self) -> int:
        """How many patches the map samples from: the memory bank and the removed patches."""
        return self.bank_size + self.removed_count

    def patch(self, k: int) -> tuple[int, int, int]:
        """(training image, row, col) of the map's point ``k``."""
        image, row, col = (int(v) for v in self.provenance[int(k)])
        return image, row, col


def coreset_view(session: SessionData, max_points: object, progress=None) -> CoresetView:
    """A sample of at most ``map_sample_size(max_points)`` patches of the memory bank and the removed ones."""
    from softpatch.method.denoise import soft_weights
    from softpatch_app.embedding import map_sample_size, subsample

    model = session.model
    bank = model.build_memory_bank(progress)
    removed_prov = np.argwhere(model.removed_mask_)  # (R, 3): image, row, col
    grid = tuple(model.grid_shape_)
    sel_bank, sel_removed = subsample(len(bank), len(removed_prov), max_points=map_sample_size(max_points))
    removed_prov = removed_prov[sel_removed]
    image, position = patch_positions(removed_prov, grid)
    p = grid[0] * grid[1]
    removed_points = model.training_patches(image * p + position).numpy()  # the sample only, never all features
    points = np.concatenate([bank.features[sel_bank].numpy(), removed_points], axis=0)
    prov = np.concatenate([np.asarray(bank.provenance)[sel_bank], removed_prov], axis=0)
    is_removed = np.concatenate([np.zeros(len(sel_bank), bool), np.ones(len(sel_removed), bool)])
    # Removed patches are not in the bank; their weight is what eq. 8 would have given them.
    all_weights = soft_weights(model.outlier_scores_.reshape(len(model.train_names_), -1))
    weights = np.concatenate([bank.weights[sel_bank].numpy(), all_weights[image, position]])
    names = [r.name for r in session.model_records]
    return CoresetView(
        points=points.astype(np.float32),
        provenance=prov,
        is_removed=is_removed,
        weights=weights.astype(np.float32),
        sources=[names[int(k)] for k in prov[:, 0]],
        bank_size=len(bank),
        removed_count=int(model.removed_mask_.sum()),
        **bank_notes(bank, model.config),
    )


def bank_notes(bank, config) -> dict[str, str | None]:
    """``bank_note`` (how the rows were chosen) and ``capped_note`` (the memory budget's cut, or None)."""
    plan = bank.coreset_plan
    if plan is None:
        return {"bank_note": "", "capped_note": None}
    capped = (
        plan.capped_message(bank.features.shape[-1], config.bank_budget_mb, config.coreset_ratio)
        if plan.capped
        else None
    )
    return {"bank_note": plan.describe(), "capped_note": capped}


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
