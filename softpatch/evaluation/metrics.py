"""Evaluation metrics: image AUROC, pixel AUROC, AUPRO, thresholds and confusion counts.

Direction everywhere: a higher score means more anomalous, and ``score >= threshold`` is predicted
anomalous. Labels are 0 (good) / 1 (anomalous); masks are bool, True on defect pixels.
Functions raise ``MetricError`` (a ``SoftPatchError`` and a ``ValueError``) with a clear message when a metric is undefined for the input
(for example only one class present), never return NaN silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
from scipy import ndimage
from sklearn.metrics import roc_auc_score

from softpatch.errors import MetricError

__all__ = [
    "Confusion",
    "OperatingPoint",
    "ThresholdChoice",
    "aupro",
    "confusion_at",
    "f1_threshold",
    "image_auroc",
    "operating_point",
    "percentile_threshold",
    "pixel_auroc",
    "pro_curve",
    "rate_interval",
]

# 8-connectivity, as in the MVTec AD evaluation code.
_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)


def _labels_scores(labels: npt.ArrayLike, scores: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert image-level labels (n,) in {0, 1} and scores (n,) finite floats."""
    y = np.asarray(labels).reshape(-1)
    s = np.asarray(scores, dtype=np.float64).reshape(-1)
    if y.shape != s.shape:
        raise MetricError(f"labels and scores must have the same length, got {y.size} and {s.size}")
    if y.size == 0:
        raise MetricError("labels and scores are empty")
    if y.dtype != bool and not np.isin(y, (0, 1)).all():
        raise MetricError("labels must be 0 (good) or 1 (anomalous)")
    if not np.isfinite(s).all():
        raise MetricError("scores contain NaN or infinite values")
    return y.astype(bool), s


def _masks_maps(masks: npt.ArrayLike, maps: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Check and convert masks (n, h, w) bool and maps (n, h, w) float; a single (h, w) pair is allowed."""
    m = np.asarray(masks)
    a = np.asarray(maps)
    if m.ndim == 2:
        m = m[None]
    if a.ndim == 2:
        a = a[None]
    if m.ndim != 3 or a.ndim != 3:
        raise MetricError(f"masks and maps must be (n, h, w) arrays, got shapes {m.shape} and {a.shape}")
    if m.shape != a.shape:
        raise MetricError(f"masks and maps must have the same shape, got {m.shape} and {a.shape}")
    if m.size == 0:
        raise MetricError("masks and maps are empty")
    if m.dtype != bool:
        if not np.isin(m, (0, 1)).all():
            raise MetricError("masks must be bool (or 0/1); threshold soft masks before calling")
        m = m.astype(bool)
    if not np.issubdtype(a.dtype, np.floating):
        a = a.astype(np.float64)
    if not np.isfinite(a).all():
        raise MetricError("anomaly maps contain NaN or infinite values")
    return m, a


def _both_classes(y: np.ndarray, what: str) -> None:
    positives = int(y.sum())
    if positives == 0 or positives == y.size:
        only = "anomalous" if positives else "good"
        raise MetricError(f"{what} is undefined when only one class is present (all {y.size} are {only})")


def image_auroc(labels: npt.ArrayLike, scores: npt.ArrayLike) -> float:
    """Area under the ROC curve of image scores.

    labels: (n,) 0 good / 1 anomalous. scores: (n,), higher = more anomalous.
    1.0 = every anomalous image scores above every good one, 0.5 = chance, 0.0 = inverted.
    Raises MetricError when only one class is present.
    """
    y, s = _labels_scores(labels, scores)
    _both_classes(y, "image AUROC")
    return float(roc_auc_score(y, s))


def pixel_auroc(masks: npt.ArrayLike, maps: npt.ArrayLike) -> float:
    """Area under the ROC curve over all pixels of all images.

    masks: (n, h, w) bool, True on defect pixels. maps: (n, h, w) float anomaly maps, higher = more anomalous.
    Raises MetricError when the masks are all False or all True.
    """
    m, a = _masks_maps(masks, maps)
    y = m.reshape(-1)
    _both_classes(y, "pixel AUROC")
    return float(roc_auc_score(y, a.reshape(-1)))


def pro_curve(masks: npt.ArrayLike, maps: npt.ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """The per-region-overlap curve of MVTec AD: (fprs, pros), both increasing, from (0, 0) to (1, 1).

    Each point is one distinct threshold t (pixels with ``map >= t`` are predicted defective), swept from
    the highest score down. FPR is over all defect-free pixels of all images; PRO is the mean, over every
    connected component (8-connectivity) of every ground-truth mask, of the fraction of the component's
    pixels predicted defective. Exact: one sort of all pixel scores, no threshold binning.
    """
    m, a = _masks_maps(masks, maps)
    regions = np.zeros(m.shape, dtype=np.int64)
    n_regions = 0
    for i in range(m.shape[0]):
        lab, count = ndimage.label(m[i], structure=_EIGHT_CONNECTED)
        if count:
            regions[i] = np.where(lab > 0, lab + n_regions, 0)
            n_regions += count
    n_ok = int((~m).sum())
    if n_regions == 0:
        raise MetricError("AUPRO is undefined without defect pixels (every mask is empty)")
    if n_ok == 0:
        raise MetricError("AUPRO is undefined without defect-free pixels (every mask is full)")

    region_size = np.bincount(regions.reshape(-1), minlength=n_regions + 1).astype(np.float64)
    # When a pixel of region r becomes "predicted defective", PRO rises by 1 / (n_regions * |r|).
    pro_weight = 1.0 / (n_regions * np.maximum(region_size, 1.0))
    pro_weight[0] = 0.0

    scores = a.reshape(-1)
    order = np.argsort(scores)[::-1]  # ties are merged below, so their order does not matter
    scores_sorted = scores[order]
    region_sorted = regions.reshape(-1)[order]
    # Pixels with equal scores cross the threshold together: keep the last of each run of equal values.
    keep = np.flatnonzero(np.append(scores_sorted[1:] != scores_sorted[:-1], True))
    fprs = np.cumsum(region_sorted == 0)[keep] / n_ok  # exact integer counts, then one division
    pros = np.clip(np.cumsum(pro_weight[region_sorted])[keep], 0.0, 1.0)
    zero, one = np.zeros(1), np.ones(1)
    return np.concatenate([zero, fprs, one]), np.concatenate([zero, pros, one])


def _area_up_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under y(x) for x in [0, x_max]; x non-decreasing; y interpolated exactly at x_max."""
    inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    area = float(np.trapezoid(y[:inside], x[:inside])) if inside >= 2 else 0.0
    if inside < x.size and x[inside - 1] < x_max:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def aupro(masks: npt.ArrayLike, maps: npt.ArrayLike, *, fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to ``fpr_limit`` (MVTec AD's AUPRO, default limit 0.3).

    masks: (n, h, w) bool ground truth, True on defect pixels. maps: (n, h, w) float, higher = more anomalous.
    The trapezoid area over FPR in [0, fpr_limit] (PRO interpolated at exactly ``fpr_limit``) is divided by
    ``fpr_limit``, so a perfect detector scores 1.0 and one that never overlaps a defect before the limit 0.0.
    Raises MetricError when no mask has a defect or no pixel is defect-free.
    """
    if not 0.0 < fpr_limit <= 1.0:
        raise MetricError(f"fpr_limit must be in (0, 1], got {fpr_limit}")
    fprs, pros = pro_curve(masks, maps)
    return _area_up_to(fprs, pros, fpr_limit) / fpr_limit


@dataclass(frozen=True)
class ThresholdChoice:
    """A threshold (``score >= threshold`` = anomalous) and the F1 / precision / recall it gives.

    ``low``/``high``: every threshold in ``(low, high]`` gives the same decisions, hence the same F1; the
    threshold sits in the middle, so ``margin`` is how far the scores may move before one decision flips.
    """

    threshold: float
    f1: float
    precision: float
    recall: float
    low: float = float("nan")
    high: float = float("nan")

    @property
    def margin(self) -> float:
        """Distance from the threshold to the nearest score that would change a decision (0 when unbounded)."""
        if not (np.isfinite(self.low) and np.isfinite(self.high)):
            return 0.0
        return (self.high - self.low) / 2


def f1_threshold(labels: npt.ArrayLike, scores: npt.ArrayLike) -> ThresholdChoice:
    """The threshold on image scores that maximises F1 (anomalous = positive class).

    labels: (n,) 0 good / 1 anomalous. scores: (n,), higher = more anomalous. ``score >= threshold`` is
    predicted anomalous. Of all thresholds reaching the best F1, the widest range of them (between two
    neighbouring scores) is taken and the threshold put in its middle, not on the weakest defect's score:
    new images scoring a little differently then keep their decisions. Among equally wide ranges the
    highest is taken (fewest false alarms). When the best F1 needs every image flagged, the threshold is
    the lowest score. Raises MetricError when there is no anomalous label.
    """
    y, s = _labels_scores(labels, scores)
    n_pos = int(y.sum())
    if n_pos == 0:
        raise MetricError("F1 is undefined without anomalous labels")
    order = np.argsort(s)[::-1]
    s_sorted = s[order]
    tp = np.cumsum(y[order])
    fp = np.cumsum(~y[order])
    last = np.append(s_sorted[1:] != s_sorted[:-1], True)  # cut after each run of equal scores
    tp, fp, cuts = tp[last].astype(np.float64), fp[last].astype(np.float64), s_sorted[last]
    f1 = 2 * tp / (tp + fp + n_pos)
    # Cut j flags the scores >= cuts[j]; any threshold in (cuts[j + 1], cuts[j]] flags the same images.
    below = np.append(cuts[1:], -np.inf)
    best = np.flatnonzero(f1 >= f1.max() - 1e-12)
    # Consecutive best cuts form one range (cuts[last + 1], cuts[first]].
    runs = np.split(best, np.flatnonzero(np.diff(best) > 1) + 1)
    widths = [cuts[run[0]] - below[run[-1]] for run in runs]  # inf for the run that flags everything
    finite = [i for i, w in enumerate(widths) if np.isfinite(w)]
    if finite:
        pick = runs[max(finite, key=lambda i: (widths[i], -i))]  # widest; the highest among equals
        high, low = float(cuts[pick[0]]), float(below[pick[-1]])
        threshold = (high + low) / 2
        j = int(np.flatnonzero(cuts >= threshold)[-1])  # the cut whose decisions the midpoint gives
    else:
        j = int(best[-1])
        high, low = float(cuts[j]), float("-inf")
        threshold = high
    return ThresholdChoice(
        threshold=float(threshold),
        f1=float(f1[j]),
        precision=float(tp[j] / (tp[j] + fp[j])),
        recall=float(tp[j] / n_pos),
        low=low,
        high=high,
    )


def rate_interval(count: int, total: int, confidence: float = 0.95, *, upper_only: bool = False) -> tuple[float, float]:
    """Exact (Clopper-Pearson) confidence interval of a rate observed as ``count`` of ``total``.

    Two-sided by default; ``upper_only`` gives the one-sided bound (0, upper]. ``(0.0, 1.0)`` when
    ``total`` is 0 (nothing was observed). Conservative: covers the true rate at least ``confidence`` of the time.
    """
    from scipy.stats import beta

    if not 0.0 < confidence < 1.0:
        raise MetricError(f"confidence must be between 0 and 1, got {confidence}")
    if not 0 <= count <= total:
        raise MetricError(f"count must be between 0 and total ({total}), got {count}")
    if total == 0:
        return 0.0, 1.0
    alpha = 1.0 - confidence if upper_only else (1.0 - confidence) / 2
    low = 0.0 if upper_only or count == 0 else float(beta.ppf(alpha, count, total - count + 1))
    high = 1.0 if count == total else float(beta.ppf(1.0 - alpha, count + 1, total - count))
    return low, high


def _ratio(num: int, den: int) -> float:
    return num / den if den else 0.0


@dataclass(frozen=True)
class Confusion:
    """Counts at one threshold (anomalous = positive). Ratios are 0.0 when their denominator is 0."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def fpr(self) -> float:
        """Good images flagged anomalous, as a fraction of good images."""
        return _ratio(self.fp, self.fp + self.tn)

    @property
    def fnr(self) -> float:
        """Anomalous images missed, as a fraction of anomalous images."""
        return _ratio(self.fn, self.fn + self.tp)

    @property
    def precision(self) -> float:
        """Flagged images that are anomalous, as a fraction of flagged images."""
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float:
        """Anomalous images flagged, as a fraction of anomalous images (1 - fnr)."""
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def f1(self) -> float:
        """Harmonic mean of precision and recall."""
        return _ratio(2 * self.tp, 2 * self.tp + self.fp + self.fn)

    def fpr_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Exact confidence interval of the false-alarm rate, from the good images counted here."""
        return rate_interval(self.fp, self.fp + self.tn, confidence)

    def fnr_interval(self, confidence: float = 0.95) -> tuple[float, float]:
        """Exact confidence interval of the miss rate, from the anomalous images counted here."""
        return rate_interval(self.fn, self.fn + self.tp, confidence)


@dataclass(frozen=True)
class OperatingPoint:
    """What a threshold does on a labelled set, with exact intervals, and whether that set chose it.

    ``chosen_here``: the threshold was fitted on these very images (e.g. best F1 on the test set), so the
    rates are optimistic, in-sample figures; new images will do worse.
    """

    threshold: float
    confusion: Confusion
    confidence: float
    chosen_here: bool

    def rows(self) -> dict[str, str]:
        """Display rows: rate with its interval, and the caveat when the figures are in-sample."""
        c, q = self.confusion, self.confidence
        fpr_lo, fpr_hi = c.fpr_interval(q)
        fnr_lo, fnr_hi = c.fnr_interval(q)
        caveat = " (in-sample: these images chose the threshold)" if self.chosen_here else ""
        return {
            "Threshold": f"{self.threshold:.4f}",
            "False alarms": f"{c.fp} of {c.fp + c.tn} good images = {c.fpr:.1%} "
            f"[{q:.0%} interval {fpr_lo:.1%} to {fpr_hi:.1%}]{caveat}",
            "Misses": f"{c.fn} of {c.fn + c.tp} defective images = {c.fnr:.1%} "
            f"[{q:.0%} interval {fnr_lo:.1%} to {fnr_hi:.1%}]{caveat}",
            "Precision / recall / F1": f"{c.precision:.3f} / {c.recall:.3f} / {c.f1:.3f}{caveat}",
        }


def operating_point(
    labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float, *, chosen_here: bool, confidence: float = 0.95
) -> OperatingPoint:
    """Confusion at ``threshold`` with exact intervals; ``chosen_here`` marks the figures in-sample."""
    return OperatingPoint(float(threshold), confusion_at(labels, scores, threshold), float(confidence), chosen_here)


def confusion_at(labels: npt.ArrayLike, scores: npt.ArrayLike, threshold: float) -> Confusion:
    """Confusion counts when ``score >= threshold`` is predicted anomalous.

    labels: (n,) 0 good / 1 anomalous. scores: (n,), higher = more anomalous.
    """
    y, s = _labels_scores(labels, scores)
    if not np.isfinite(threshold):
        raise MetricError(f"threshold must be a finite number, got {threshold}")
    pred = s >= threshold
    return Confusion(
        tp=int((pred & y).sum()),
        fp=int((pred & ~y).sum()),
        tn=int((~pred & ~y).sum()),
        fn=int((~pred & y).sum()),
    )


def percentile_threshold(good_scores: npt.ArrayLike, percentile: float) -> float:
    """The ``percentile`` (0-100) of scores of good images: e.g. 99 flags about 1% of good images.

    good_scores: (n,) scores of defect-free images, higher = more anomalous. Linear interpolation.
    """
    s = np.asarray(good_scores, dtype=np.float64).reshape(-1)
    if s.size == 0:
        raise MetricError("percentile_threshold needs at least one good score")
    if not np.isfinite(s).all():
        raise MetricError("good scores contain NaN or infinite values")
    if not 0.0 <= percentile <= 100.0:
        raise MetricError(f"percentile must be in [0, 100], got {percentile}")
    return float(np.percentile(s, percentile))
