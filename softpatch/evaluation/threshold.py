"""A deployment threshold from good images alone: k-fold out-of-sample scores of the training images.

Scoring a training image with the model fitted on it is leakage: its own patches sit in the memory bank
(or their neighbours do), so in-sample scores are lower than those of new good images and a threshold
set on them raises more false alarms than it promises. Here every training image is scored by a model
fitted on the *other* folds, with the main model's settings (same features, discriminator, tau, coreset),
reusing the cached training features (no image is read again).

The threshold for a target false-alarm rate is an order statistic of those out-of-sample scores of the
images taken as good, and its uncertainty is exact and distribution-free: when ``k`` of ``n`` exchangeable
good scores lie at or above the threshold, the false-alarm rate on new good images is at most
``Beta.ppf(confidence, k + 1, n - k)`` with the stated confidence (the Clopper-Pearson upper bound, which
equals the order-statistic bound). The fold models see (K-1)/K of the images, so their scores lean
slightly high: the bound is, if anything, conservative for the model fitted on all of them.
"""

from __future__ import annotations

import warnings
from collections.abc import Collection
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from softpatch.errors import ThresholdError
from softpatch.runtime.progress import ProgressCallback, report

if TYPE_CHECKING:
    from softpatch.method.model import SoftPatch

__all__ = [
    "DEFAULT_CONFIDENCE",
    "DEFAULT_FOLDS",
    "DEFAULT_TARGET_FPR",
    "GoodImageThreshold",
    "fpr_upper_bound",
    "out_of_sample_scores",
    "threshold_for_fpr",
    "threshold_from_good_images",
]

DEFAULT_FOLDS = 5
DEFAULT_TARGET_FPR = 0.01  # share of good images a threshold may flag, unless told otherwise
DEFAULT_CONFIDENCE = 0.95


@dataclass(frozen=True)
class GoodImageThreshold:
    """A threshold (``score >= threshold`` = defective) set on out-of-sample scores of good images."""

    threshold: float
    target_fpr: float  # the false-alarm rate asked for
    n_images: int  # good images the threshold rests on
    n_flagged: int  # of those, how many score at or above the threshold
    fpr_upper_bound: float  # the false-alarm rate on new good images is at most this, with ``confidence``
    confidence: float
    scores: np.ndarray  # (n_images,) out-of-sample scores of the good images used
    names: list[str]  # (n_images,) their names, in the same order
    excluded: list[str]  # training images left out of the calibration (marked defective, most suspicious)
    folds: int

    @property
    def fpr_estimate(self) -> float:
        """Share of the good images flagged at the threshold (the point estimate of the false-alarm rate)."""
        return self.n_flagged / self.n_images

    def summary(self) -> str:
        """One sentence for users: the threshold, what it rests on and how sure the false-alarm figure is."""
        return (
            f"threshold {self.threshold:.4f} for a {self.target_fpr:.1%} false-alarm target: "
            f"{self.n_flagged} of {self.n_images} good images flagged out of sample ({self.fpr_estimate:.1%}); "
            f"false-alarm rate at most {self.fpr_upper_bound:.1%} with {self.confidence:.0%} confidence "
            f"({self.folds}-fold, {len(self.excluded)} images excluded)"
        )

    def to_dict(self) -> dict[str, object]:
        """Plain JSON values, for a bundle's or a report's record of how the threshold was set."""
        return {
            "threshold": self.threshold,
            "target_fpr": self.target_fpr,
            "n_images": self.n_images,
            "n_flagged": self.n_flagged,
            "fpr_estimate": self.fpr_estimate,
            "fpr_upper_bound": self.fpr_upper_bound,
            "confidence": self.confidence,
            "folds": self.folds,
            "excluded": list(self.excluded),
        }


def fpr_upper_bound(n_flagged: int, n_images: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """Exact one-sided upper confidence bound on a false-alarm rate from ``n_flagged`` of ``n_images`` good images.

    Clopper-Pearson: the largest rate p with P(Binomial(n, p) <= n_flagged) >= 1 - confidence, i.e.
    ``Beta.ppf(confidence, n_flagged + 1, n_images - n_flagged)``; 1.0 when every image is flagged.
    """
    if n_images < 1:
        raise ThresholdError("a false-alarm bound needs at least one good image")
    if not 0 <= n_flagged <= n_images:
        raise ThresholdError(f"flagged images must be between 0 and {n_images}, got {n_flagged}")
    if not 0.0 < confidence < 1.0:
        raise ThresholdError(f"confidence must be between 0 and 1, got {confidence}")
    from softpatch.evaluation.metrics import rate_interval  # scipy and scikit-learn: only when needed

    return rate_interval(n_flagged, n_images, confidence, upper_only=True)[1]


def threshold_for_fpr(good_scores: np.ndarray, target_fpr: float) -> tuple[float, int]:
    """The threshold flagging at most ``floor(target_fpr * n)`` of the good scores, and how many it flags.

    good_scores: (n,) higher = more anomalous. With k allowed false alarms the threshold lies halfway between
    the (k+1)-th and the k-th highest score (just above the highest when k = 0), so small score changes do not
    flip the images next to it. Returns (threshold, number of good scores >= threshold).
    """
    s = np.sort(np.asarray(good_scores, dtype=np.float64).reshape(-1))[::-1]  # highest first
    if s.size == 0:
        raise ThresholdError("a threshold needs at least one good image")
    if not np.isfinite(s).all():
        raise ThresholdError("the good images' scores contain NaN or infinite values")
    if not 0.0 <= target_fpr < 1.0:
        raise ThresholdError(f"the false-alarm target must be at least 0 and below 1, got {target_fpr}")
    k = int(np.floor(target_fpr * s.size + 1e-9))  # rounding must not allow an extra false alarm
    k = min(k, s.size - 1)
    top = s[k]  # the highest score that must pass
    if k == 0:
        threshold = float(np.nextafter(top, np.inf))
    else:
        threshold = float((top + s[k - 1]) / 2) if s[k - 1] > top else float(np.nextafter(top, np.inf))
    return threshold, int((s >= threshold).sum())


def _fold_of(n: int, folds: int, seed: int) -> np.ndarray:
    """(n,) fold index per image: a seeded shuffle dealt round-robin, so folds differ in size by at most one."""
    order = np.random.default_rng(seed).permutation(n)
    fold = np.empty(n, dtype=np.int64)
    fold[order] = np.arange(n) % folds
    return fold


def out_of_sample_scores(
    model: SoftPatch,
    *,
    folds: int = DEFAULT_FOLDS,
    only: np.ndarray | None = None,
    progress: ProgressCallback | None = None,
) -> np.ndarray:
    """(N,) image score of every training image under a model fitted on the other folds (NaN where not scored).

    ``model`` is a fitted ``SoftPatch`` with its training features (not one loaded from a bundle). Each fold
    model uses ``model.config`` unchanged, so it denoises like the main model. ``only`` (N,) bool restricts
    which images are scored (all images still take part in fitting the fold models, as in the main model).
    """
    from softpatch.method.model import Embeddings, SoftPatch

    features = model.train_features_  # SoftPatchError for a bundle without training features
    names, sizes = model.train_names_, model.train_sizes_
    n = len(names)
    if folds < 2:
        raise ThresholdError(f"out-of-sample scores need at least 2 folds, got {folds}")
    if n < 3:
        raise ThresholdError("out-of-sample scores need at least 3 training images (2 to fit on, 1 to score)")
    folds = min(folds, n)
    only = np.ones(n, dtype=bool) if only is None else np.asarray(only, dtype=bool)
    fold = _fold_of(n, folds, model.config.seed)
    key = model.config.feature_key()
    out = np.full(n, np.nan, dtype=np.float64)
    for f in range(folds):
        held = np.flatnonzero((fold == f) & only)
        if held.size == 0:
            continue
        train = np.flatnonzero(fold != f)
        report(progress, f / folds, f"threshold: fitting fold {f + 1}/{folds} on {train.size} images")
        sub = SoftPatch(model.config, extractor=model.extractor_)
        with warnings.catch_warnings():  # a clamped LOF-k was already reported by the main fit
            warnings.simplefilter("ignore")
            sub.fit_embeddings(Embeddings(features[train], [names[i] for i in train], [sizes[i] for i in train], key))
        report(progress, (f + 0.5) / folds, f"threshold: scoring {held.size} held-out images of fold {f + 1}/{folds}")
        held_emb = Embeddings(features[held], [names[i] for i in held], [sizes[i] for i in held], key)
        out[held] = sub.score(held_emb, with_maps=False).image_scores
    report(progress, 1.0, f"threshold: {int(only.sum())} images scored out of sample in {folds} folds")
    return out


def threshold_from_good_images(
    model: SoftPatch,
    *,
    target_fpr: float = DEFAULT_TARGET_FPR,
    folds: int = DEFAULT_FOLDS,
    exclude: Collection[str] = (),
    exclude_most_suspicious: int = 0,
    confidence: float = DEFAULT_CONFIDENCE,
    progress: ProgressCallback | None = None,
) -> GoodImageThreshold:
    """The threshold for ``target_fpr`` from out-of-sample scores of the training images taken as good.

    ``exclude``: training image names (as in ``model.train_names_``) known to be defective, e.g. marked so
    on review; ``exclude_most_suspicious``: also leave out this many of the most suspicious remaining images
    (``model.vetting_report()``). Neither is scored, but both stay in the fold models' training data, like in
    the main model's. Does not change ``model``; store the result with ``model.threshold_ = result.threshold``.
    """
    if not 0.0 <= target_fpr < 1.0:
        raise ThresholdError(f"the false-alarm target must be at least 0 and below 1, got {target_fpr}")
    if not 0.0 < confidence < 1.0:
        raise ThresholdError(f"confidence must be between 0 and 1, got {confidence}")
    if exclude_most_suspicious < 0:
        raise ThresholdError("the number of suspicious images to leave out cannot be negative")
    names = list(model.train_names_)
    excluded = set(exclude) & set(names)
    ranked = [names[i] for i in model.vetting_report().ranking.tolist() if names[i] not in excluded]
    excluded.update(ranked[:exclude_most_suspicious])
    use = np.asarray([name not in excluded for name in names])
    if use.sum() < 2:
        raise ThresholdError(
            f"only {int(use.sum())} training images are left as good after the exclusions: a threshold needs at least 2"
        )
    scores = out_of_sample_scores(model, folds=folds, only=use, progress=progress)[use]
    threshold, flagged = threshold_for_fpr(scores, target_fpr)
    return GoodImageThreshold(
        threshold=threshold,
        target_fpr=float(target_fpr),
        n_images=int(scores.size),
        n_flagged=flagged,
        fpr_upper_bound=fpr_upper_bound(flagged, int(scores.size), confidence),
        confidence=float(confidence),
        scores=scores,
        names=[n for n, u in zip(names, use, strict=True) if u],
        excluded=[n for n in names if n in excluded],
        folds=min(folds, len(names)),
    )
