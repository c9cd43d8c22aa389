"""2-D layouts of patch features for the Coreset page (t-SNE or UMAP), cached by content.

Visualisation only: the features, the memory bank and the removed patches come from the core.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

PROJECTIONS = ("t-SNE", "UMAP")  # the 2-D layouts the Coreset page offers
# How many patches a map may show (the Coreset page's choices); a t-SNE of more takes too long for a page.
POINT_CHOICES = (500, 1000, 2000, 3000)
MAX_POINTS = 2000
POINT_CAP = max(POINT_CHOICES)
MIN_POINTS = 10


def map_sample_size(requested: object) -> int:
    """How many patches a map samples: ``requested`` (from the browser: any value) kept within
    ``MIN_POINTS`` and ``POINT_CAP``; ``MAX_POINTS`` when it is no number."""
    try:
        number = float(requested) if not isinstance(requested, bool) else float("nan")
    except (TypeError, ValueError):
        number = float("nan")
    if not np.isfinite(number):
        return MAX_POINTS
    return int(min(max(MIN_POINTS, int(number)), POINT_CAP))


def subsample(
    n_bank: int, n_removed: int, *, max_points: int = MAX_POINTS, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Indices into the memory bank and into the removed patches, at most ``max_points`` together.

    Removed patches get up to a third of the budget (at least all of them when they are few), so the
    noise stays visible next to a large memory bank. Deterministic for a given seed.
    """
    rng = np.random.default_rng(seed)
    removed_budget = min(n_removed, max(max_points // 3, max_points - n_bank))
    bank_budget = min(n_bank, max_points - removed_budget)
    bank = np.sort(rng.choice(n_bank, size=bank_budget, replace=False)) if bank_budget < n_bank else np.arange(n_bank)
    removed = (
        np.sort(rng.choice(n_removed, size=removed_budget, replace=False))
        if removed_budget < n_removed
        else np.arange(n_removed)
    )
    return bank, removed


@st.cache_data(max_entries=8, show_spinner=False)
def layout_2d(features: np.ndarray, method: str, seed: int = 0) -> np.ndarray:
    """(n, 2) coordinates. Cached on the features' content and the method, so a refit is never served stale."""
    x = np.asarray(features, dtype=np.float32)
    n = len(x)
    if n < 3:
        return np.zeros((n, 2), dtype=np.float32)
    # A PCA to 50 dimensions first: the usual, much faster route to t-SNE/UMAP on 1000-d features.
    if x.shape[1] > 50 and n > 50:
        from sklearn.decomposition import PCA

        x = PCA(n_components=50, random_state=seed).fit_transform(x)
    if method == "UMAP":
        import umap

        reducer = umap.UMAP(n_components=2, n_neighbors=min(15, n - 1), min_dist=0.1, random_state=seed, n_jobs=1)
        return np.asarray(reducer.fit_transform(x), dtype=np.float32)
    from sklearn.manifold import TSNE

    perplexity = float(min(30.0, max(2.0, (n - 1) / 3)))
    tsne = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed, max_iter=500)
    return np.asarray(tsne.fit_transform(x), dtype=np.float32)
