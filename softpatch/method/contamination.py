"""How much of a training set looks defective, and which denoising settings are known to be weak there.

A QA engineer never knows how many defective images hide in the "good" folder. ``estimate_contamination``
guesses it from the training images' suspicion alone (``SoftPatch.suspicion_``): the share of images whose
suspicion stands out of the bulk by a robust margin. ``WEAK_SPOTS`` records, from the noise sweep
(benchmarks/noise_sweep.py, table in the README), the settings that lose pixel AUROC at some noise levels,
and ``advice`` turns an estimate and the current settings into one warning with the better settings.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from softpatch.method.discriminators import NEIGHBOUR_CACHE_K

# Suspicion above median + OUTLIER_CUT robust standard deviations (1.4826 MAD) counts as "stands out".
# Calibrated on the sweep's training sets (magnetic_tile, battery_weld, noise 0-0.3, see the README).
OUTLIER_CUT = 3.0
# Below this many images, the median and MAD say too little: no estimate.
MIN_IMAGES = 8
_MAD_TO_SIGMA = 1.4826
# The discriminator setting resolved per training set by ``choose_settings``.
AUTO = "auto"
# "auto" runs LOF with k raised to AUTO_K_FACTOR times the suspect images, so that a group of look-alike
# defects at a position is smaller than its own neighbourhoods, which then reach the good patches. The
# estimate is a lower bound (small defects do not stand out), so at least AUTO_MIN_SHARE of the images are
# assumed suspect. k is capped at the neighbour cache (a re-tune, no new neighbour search) and at half the
# images (LOF over nearly all images compares every patch with the same crowd and stops ranking).
AUTO_K_FACTOR = 1.5
AUTO_MIN_SHARE = 0.08


def estimate_contamination(suspicion: np.ndarray, *, cut: float = OUTLIER_CUT) -> float | None:
    """Estimated share of defective images: ``(N,)`` suspicion -> fraction in [0, 1], or None below ``MIN_IMAGES``.

    An image counts when its suspicion exceeds ``median + cut * 1.4826 * MAD``. Median and MAD ignore up to
    half of the images, so the bulk of good images sets the scale even at 30% contamination; the share
    counted is a lower bound (defects too small to lift an image's mean suspicion are not counted).
    """
    s = np.asarray(suspicion, dtype=np.float64).reshape(-1)
    s = s[np.isfinite(s)]
    if s.size < MIN_IMAGES:
        return None
    median = float(np.median(s))
    spread = _MAD_TO_SIGMA * float(np.median(np.abs(s - median)))
    if spread <= 0:  # half the images are identical in suspicion: only strict excess counts
        return float(np.mean(s > median))
    return float(np.mean(s > median + cut * spread))


def choose_settings(wide_suspicion: np.ndarray, lof_k: int, n_images: int) -> dict[str, object]:
    """What ``discriminator="auto"`` uses for a training set: concrete ``discriminator`` and ``lof_k`` settings.

    ``wide_suspicion`` ``(N,)`` is ``SoftPatch.wide_suspicion_``. LOF judges a patch against its k nearest
    look-alikes; once more than k similar defective images sit at a position they are dense to each other and
    LOF no longer sees them (the sweep: on magnetic_tile at noise 0.3, LOF k=6 lost 0.045 pixel AUROC against
    k=32, and fusion more). So LOF with k = ``AUTO_K_FACTOR`` x the suspect images (at least
    ``AUTO_MIN_SHARE`` of them), never below the user's k, capped at ``NEIGHBOUR_CACHE_K`` and half the
    images. Too few images to estimate: the user's k.
    """
    share = estimate_contamination(wide_suspicion)
    if share is None:
        return {"discriminator": "lof", "lof_k": lof_k}
    wanted = math.ceil(AUTO_K_FACTOR * max(share, AUTO_MIN_SHARE) * n_images)
    return {"discriminator": "lof", "lof_k": max(lof_k, min(wanted, NEIGHBOUR_CACHE_K, (n_images - 1) // 2))}


@dataclass(frozen=True)
class WeakSpot:
    """Settings measured to be weak from some contamination on (the sweep's noise levels)."""

    discriminator: str
    from_share: float  # weak from this estimated share of defective images on
    measured: str  # what the sweep measured, for the warning
    better: dict[str, object] = field(default_factory=dict)  # the settings to switch to
    button: str = ""  # the one-click fix, e.g. "Use auto"
    max_lof_k: int | None = None  # weak only up to this LOF-k (None: any k)
    min_images: int = 0  # weak only from this many training images on

    def applies(self, discriminator: str, lof_k: int, share: float, n_images: int) -> bool:
        """Whether this weak spot concerns a fit with these settings, suspected defect ``share`` and size."""
        small_k = self.max_lof_k is None or lof_k <= self.max_lof_k
        return (
            discriminator == self.discriminator and small_k and share >= self.from_share and n_images >= self.min_images
        )


# From the noise sweep (benchmarks/noise_sweep.py; the table is in the README, "Choosing the defaults"), seed 0,
# pixel AUROC under no-overlap unless said otherwise. Checked in order; the first that applies is shown.
# The estimate reads about 0.10 on the clean magnetic_tile set already (its seven capture sessions differ),
# so the levels are estimated shares, not noise levels.
WEAK_SPOTS: tuple[WeakSpot, ...] = (
    WeakSpot(
        "none",
        0.05,
        "plain PatchCore memorises the defects: in the noise sweep it lost 0.13 pixel AUROC at noise 0.1 and 0.36 "
        "at noise 0.3 on magnetic_tile, where auto lost at most 0.06.",
        {"discriminator": AUTO},
        "Use auto (the default)",
    ),
    WeakSpot(
        "nearest",
        0.0,
        "the nearest-neighbour discriminator is weak even on a clean set: in the noise sweep it lost 0.10 pixel "
        "AUROC on the clean magnetic_tile set, where auto gained 0.004.",
        {"discriminator": AUTO},
        "Use auto (the default)",
    ),
    WeakSpot(
        "fusion",
        0.10,
        "fusion lost to auto in the noise sweep on magnetic_tile: 0.01 pixel AUROC at noise 0.2 and 0.06 at noise 0.3.",
        {"discriminator": AUTO},
        "Use auto (the default)",
    ),
    WeakSpot(
        "lof",
        0.10,
        "LOF with a small k misses groups of look-alike defects: in the noise sweep on magnetic_tile (209+ images) "
        "LOF k=6 lost 0.045 pixel AUROC at noise 0.3 against k=32, the k that auto picks there.",
        {"discriminator": AUTO},
        "Use auto (LOF with k from the data)",
        max_lof_k=8,
        min_images=100,  # below, auto's k stays near 6 anyway
    ),
)

_NOTE = "Images whose suspicion over their 32 most similar images stands clearly out; small defects may not."


@dataclass(frozen=True)
class Advice:
    """What the Denoise page shows: the estimate, and when the settings are weak there, a warning and a fix."""

    share: float | None  # estimated share of defective images; None when too few images
    n_suspect: int  # images counted as suspect
    note: str  # how to read the estimate (and what "auto" chose)
    warning: str | None = None  # None: the current settings are not known to be weak at this level
    better: dict[str, object] = field(default_factory=dict)  # settings that fix it (empty without a warning)
    button: str = ""  # label of the one-click fix


def advice(wide_suspicion: np.ndarray, discriminator: str, lof_k: int, chosen: Mapping[str, object]) -> Advice:
    """The estimate from ``wide_suspicion`` ``(N,)`` (``SoftPatch.wide_suspicion_``) and, when the settings
    (``discriminator``, ``lof_k``) are known weak there, a warning with the better settings.

    ``chosen``: the settings in use (``resolved_config_``: what "auto" chose), named in the note.
    """
    n = int(np.asarray(wide_suspicion).size)
    share = estimate_contamination(wide_suspicion)
    note = _NOTE
    if discriminator == AUTO:
        note += f" Auto uses {chosen['discriminator']} with k={chosen['lof_k']} here."
    if share is None:
        return Advice(None, 0, "Too few images to estimate how many are defective.")
    n_suspect = round(share * n)
    for spot in WEAK_SPOTS:
        if spot.applies(discriminator, lof_k, share, n):
            warning = (
                f"About {share:.0%} of the training images look defective ({n_suspect} of {n}). At that level "
                f"{spot.measured}"
            )
            return Advice(share, n_suspect, note, warning, dict(spot.better), spot.button)
    return Advice(share, n_suspect, note)
