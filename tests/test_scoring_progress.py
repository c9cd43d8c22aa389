"""Scoring never goes silent: the search, the maps and the app's metrics report through the progress callback."""

from __future__ import annotations

import math

import numpy as np
import pytest

import softpatch.method.model as model_module


def _recorder():
    messages: list[tuple[float, str]] = []
    return messages, lambda fraction, message: messages.append((fraction, message))


def test_every_search_step_and_every_map_block_reports(
    fitted, eval_embeddings, monkeypatch: pytest.MonkeyPatch
) -> None:
    n, p, _ = eval_embeddings.features.shape
    monkeypatch.setattr(model_module, "_SCORING_PATCHES_PER_STEP", 2 * p)  # two images per search call
    monkeypatch.setattr(model_module, "_MAP_PIXELS_PER_STEP", 3 * fitted.config.crop**2)  # three maps per block
    fitted.build_memory_bank()
    messages, progress = _recorder()
    result = fitted.score(eval_embeddings, progress=progress)
    search = [m for f, m in messages if m.startswith("scoring: ")]
    maps = [m for f, m in messages if m.startswith("maps: ")]
    assert search[0] == f"scoring: nearest-neighbour search, 0/{n} images"  # before the first search call
    assert len(search) == 1 + math.ceil(n / 2)
    assert maps == [f"maps: {min(k, n)}/{n} anomaly maps" for k in range(3, n + 3, 3)]
    assert [f for f, m in messages][-1] == 1.0
    # The chunked maps are the maps of the whole set.
    whole = fitted.score(eval_embeddings).anomaly_maps
    np.testing.assert_allclose(result.anomaly_maps, whole, rtol=1e-6, atol=1e-6)


def test_the_neighbour_search_of_auto_reports_before_the_discriminator(
    small_config, extractor, train_embeddings
) -> None:
    from softpatch.method.model import SoftPatch

    messages, progress = _recorder()
    model = SoftPatch(small_config.replace(discriminator="auto"), extractor=extractor)
    model.fit_embeddings(train_embeddings, build_memory_bank=False, progress=progress)
    texts = [m for _, m in messages]
    p = train_embeddings.features.shape[1]
    assert texts[0] == f"discriminator: neighbours at 0/{p} positions", "the bar shows before the search runs"
    last_search = max(i for i, m in enumerate(texts) if m.startswith("discriminator: neighbours"))
    assert texts[last_search] == f"discriminator: neighbours at {p}/{p} positions"
    scoring = [i for i, m in enumerate(texts) if m.startswith("discriminator: lof at")]
    assert scoring and min(scoring) > last_search
    assert sum(m == f"discriminator: neighbours at 0/{p} positions" for m in texts) == 1, "searched once"


def test_without_maps_there_is_no_map_stage(fitted, eval_embeddings) -> None:
    messages, progress = _recorder()
    fitted.score(eval_embeddings, with_maps=False, progress=progress)
    assert not any(m.startswith("maps: ") for _, m in messages)
    assert messages[-1] == (
        1.0,
        f"scoring: nearest-neighbour search, {len(eval_embeddings)}/{len(eval_embeddings)} images",
    )


def test_app_metrics_report_progress(fitted, eval_embeddings, synthetic_set) -> None:
    from softpatch_app import services

    result = fitted.score(eval_embeddings)
    labels = np.array([0] * len(synthetic_set.test_good) + [1] * len(synthetic_set.test_bad))
    detection = services.Detection(
        names=[p.name for p in synthetic_set.test],
        paths=[str(p) for p in synthetic_set.test],
        labels=labels,
        mask_paths=[None] * len(labels),
        softpatch=result,
        patchcore=result,
    )
    messages, progress = _recorder()
    table = services.evaluate(detection, fitted.transform_, progress=progress)
    assert [m for _, m in messages] == [
        "metrics: reading the masks",
        "metrics: SoftPatch image AUROC, pixel AUROC, AUPRO",
        "metrics: PatchCore image AUROC, pixel AUROC, AUPRO",
        "metrics: done",
    ]
    assert table["SoftPatch"]["image AUROC"] == 1.0
    # Leaving images out gives its own figures, memoised apart.
    fewer = services.evaluate(detection, fitted.transform_, exclude=np.arange(len(labels)) == 0)
    assert fewer is not table and detection.metrics.keys() == {(), (0,)}
