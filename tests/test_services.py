"""softpatch_app's page logic without a Streamlit runtime, on a small fitted model (random resnet18, 8x8 grid).

Each test builds one session the way the app does (a workspace, settings matching the model, the training
split the model was fitted on) and checks what the pages would draw against the core's own outputs.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from softpatch.errors import DataError, SoftPatchError
from softpatch.io.datasets import ImageFolder, ImageRecord, SkippedFile, scan_images
from softpatch_app import data_sources, deploy, review, services
from softpatch_app.denoise_form import widget_defaults
from softpatch_app.embedding import MAX_POINTS, POINT_CAP, map_sample_size
from softpatch_app.keys import DENOISE_SETTING_KEYS
from softpatch_app.loading import LoadedSplit
from softpatch_app.plots import selected_points
from softpatch_app.server_paths import server_path_policy
from softpatch_app.settings import AppSettings, read_environment, settings_from_widgets
from softpatch_app.state import SessionData
from softpatch_app.workspace import Workspace


def _settings_of(config) -> AppSettings:
    """The app settings that describe ``config`` (random weights)."""
    return AppSettings(
        backbone=config.backbone,
        weights_mode="random",
        device=config.device,
        resize=config.resize,
        crop=config.crop,
        discriminator=config.discriminator,
        tau=config.tau,
        lof_k=config.lof_k,
        coreset_ratio=config.coreset_ratio,
        soft_weight=config.soft_weight,
    )


@pytest.fixture
def session(tmp_path: Path, fitted, synthetic_set) -> SessionData:
    """A session holding the fitted model and the training split it was fitted on (same order)."""
    folder = scan_images(synthetic_set.train_dir)
    assert [r.path for r in folder.records] == list(synthetic_set.train)
    settings = _settings_of(fitted.config)
    data = SessionData(workspace=Workspace.create(tmp_path / "ws"), settings=settings)
    data.train = LoadedSplit(folder, "server folder", "synthetic")
    data.model = fitted
    data.model_records = list(folder.records)
    data.model_data_version = data.data_version
    data.model_feature_key = settings.feature_key()
    return data


def _test_records(synthetic_set, tmp_path: Path) -> list[ImageRecord]:
    masks = []
    for i, mask in enumerate(synthetic_set.test_masks):
        path = tmp_path / f"mask{i}.png"
        Image.fromarray(mask.astype(np.uint8) * 255).save(path)
        masks.append(path)
    good = [ImageRecord(Path(p), relpath=f"good/{Path(p).name}") for p in synthetic_set.test_good]
    bad = [
        ImageRecord(Path(p), label=1, defect="blob", mask_path=m, relpath=f"blob/{Path(p).name}")
        for p, m in zip(synthetic_set.test_bad, masks, strict=True)
    ]
    return good + bad


# ----------------------------------------------------------------------------------------------- vetting
def test_vetting_follows_the_models_report(session: SessionData) -> None:
    model = session.model
    vet = services.vetting(session)
    report = model.vetting_report()
    assert list(vet.ranking) == list(report.ranking)
    assert vet.names == [r.name for r in session.model_records]
    per_image = model.removed_mask_.reshape(len(vet.names), -1).any(axis=1)
    assert vet.n_affected == int(per_image.sum())
    for place, i in enumerate(vet.ranking[:5], start=1):
        assert vet.rank_of(int(i)) == place
    labels = {vet.names[int(vet.ranking[0])]: "defective"}
    rows = vet.rows(labels)
    assert [r["rank"] for r in rows] == list(range(1, len(vet.names) + 1))
    assert [r["image"] for r in rows] == [vet.names[int(i)] for i in vet.ranking]
    assert rows[0]["label"] == "defective" and all(r["label"] == "" for r in rows[1:])
    assert rows[0]["suspicion"] >= rows[-1]["suspicion"]


def test_demo_check_counts_the_planted_images_in_the_top(session: SessionData) -> None:
    vet = services.vetting(session)
    top3 = {vet.names[int(i)].rsplit("/", 1)[-1] for i in vet.ranking[:3]}
    assert services.demo_check(vet, SimpleNamespace(contaminant_names=top3)) == (3, 3)
    bottom = {vet.names[int(i)].rsplit("/", 1)[-1] for i in vet.ranking[-2:]}
    assert services.demo_check(vet, SimpleNamespace(contaminant_names=bottom)) == (0, 2)


# ----------------------------------------------------------------------------------------------- re-tune
def test_tau_is_retuned_and_a_backbone_change_needs_a_fit(session: SessionData) -> None:
    model = session.model
    settings = session.settings
    assert services.pending_changes(model, settings) == {}
    assert not services.needs_refit(session, settings)
    lower = settings.with_changes(tau=0.02)
    assert services.pending_changes(model, lower) == {"tau": 0.02}
    before = int(model.removed_mask_.sum())
    assert services.retune(session, lower) == {"tau": 0.02}
    assert session.model is model and model.config.tau == pytest.approx(0.02)
    assert int(model.removed_mask_.sum()) < before
    assert services.needs_refit(session, settings.with_changes(backbone="resnet50"))
    assert services.needs_refit(session, settings.with_changes(crop=56))
    assert not services.needs_refit(session, lower.with_changes(lof_k=4))


def test_retunable_settings_are_the_configs_own() -> None:
    from softpatch.config import RETUNE_FIELDS

    assert set(services.RETUNABLE) <= RETUNE_FIELDS
    assert "tau" in services.RETUNABLE and "backbone" not in services.RETUNABLE


# ----------------------------------------------------------------------------------------------- coreset map
def test_patch_positions_find_the_bank_rows_in_the_training_features(session: SessionData) -> None:
    model = session.model
    bank = model.build_memory_bank()
    image, position = services.patch_positions(np.asarray(bank.provenance), model.grid_shape_)
    np.testing.assert_array_equal(model.train_features_.numpy()[image, position], bank.features.numpy())


def test_the_map_sample_is_capped_and_its_size_reported(session: SessionData) -> None:
    model = session.model
    n_bank = len(model.build_memory_bank())
    n_removed = int(model.removed_mask_.sum())
    view = services.coreset_view(session, 40)
    assert view.sample_size == len(view.points) == len(view.provenance) == len(view.is_removed) == 40
    assert (view.bank_size, view.removed_count, view.population) == (n_bank, n_removed, n_bank + n_removed)
    assert view.population > 40
    # Every point is what it says: removed points are removed patches with their own features.
    for k in range(view.sample_size):
        image, row, col = view.patch(k)
        assert bool(model.removed_mask_[image, row, col]) == bool(view.is_removed[k])
    removed = np.flatnonzero(view.is_removed)
    image, position = services.patch_positions(view.provenance[removed], model.grid_shape_)
    np.testing.assert_array_equal(view.points[removed], model.train_features_.numpy()[image, position])
    assert 0 < len(removed) < view.sample_size


def test_the_map_and_the_duplicates_never_read_all_training_features(
    session: SessionData, small_config, extractor, synthetic_set, monkeypatch: pytest.MonkeyPatch
) -> None:
    """At 10,000 images all features are 30 GB in float32: the pages read the store's rows they need, never all."""
    from softpatch.evaluation.duplicates import descriptors
    from softpatch.method.model import SoftPatch

    model = SoftPatch(small_config, extractor=extractor).fit(list(synthetic_set.train))
    store = model.feature_store_
    assert store is not None
    everything = model.train_features_.numpy()  # read here, before reading it all is forbidden
    session.model = model

    def forbidden(self):
        raise AssertionError("the page read every training feature")

    monkeypatch.setattr(SoftPatch, "train_features_", property(forbidden))
    view = services.coreset_view(session, 40)
    removed = np.flatnonzero(view.is_removed)
    assert len(removed) > 0
    image, position = services.patch_positions(view.provenance[removed], model.grid_shape_)
    np.testing.assert_array_equal(view.points[removed], everything[image, position])
    found = services.duplicates(session)
    assert found is not None and found.checked_features
    assert services.duplicates(session) is found, "the same store on a rerun: the memo holds"
    import torch

    torch.testing.assert_close(
        descriptors(store, model.grid_shape_), descriptors(torch.from_numpy(everything), model.grid_shape_)
    )


def test_the_coreset_view_says_how_the_bank_was_chosen_and_when_the_budget_cut_it(session: SessionData) -> None:
    view = services.coreset_view(session, 40)
    kept = int((~session.model.removed_mask_).sum())
    assert view.bank_note.startswith(f"{view.bank_size:,} of {kept:,} kept patches")
    assert "exact greedy" in view.bank_note and view.capped_note is None
    session.model = session.model.variant(coreset_exact_rows=1, coreset_block_rows=256)
    view = services.coreset_view(session, 40)
    assert f"kept patches chosen by the greedy k-centre coreset on {-(-kept // 256):,} random blocks" in view.bank_note
    assert view.capped_note is None


def test_a_bank_cut_by_the_memory_budget_says_both_sizes() -> None:
    from softpatch.method.coreset import plan_coreset

    plan = plan_coreset(
        1_000_000,
        method="greedy",
        ratio=0.1,
        row_bytes=4096,
        budget_bytes=256 * 1024**2,
        exact_rows=10,
        block_rows=10**4,
    )
    bank = SimpleNamespace(coreset_plan=plan, features=np.zeros((plan.rows, 1024), np.float32))
    notes = services.bank_notes(bank, SimpleNamespace(bank_budget_mb=256, coreset_ratio=0.1))
    assert plan.rows == 65_536 and plan.capped
    assert "capped at 65,536 patches (256 MB" in notes["capped_note"]
    assert "asks for 100,000 (391 MB)" in notes["capped_note"]
    assert notes["bank_note"].startswith("65,536 of 1,000,000 kept patches")
    assert services.bank_notes(SimpleNamespace(coreset_plan=None), None) == {"bank_note": "", "capped_note": None}


def test_the_search_note_is_empty_when_exact_and_gives_the_measured_recall_otherwise() -> None:
    def detection(recall):
        score = SimpleNamespace(search_recall=recall, image_scores=np.zeros(1))
        return services.Detection(["a"], ["a"], None, [None], score, None)

    assert detection(None).search_note == ""
    assert "93.8%" in detection(0.9375).search_note


@pytest.mark.parametrize(
    ("requested", "size"),
    [(10**9, POINT_CAP), (-5, 10), ("700", 700), ("lots", MAX_POINTS), (float("nan"), MAX_POINTS)],
)
def test_map_sample_size_from_the_browser_is_bounded(requested: object, size: int) -> None:
    assert map_sample_size(requested) == size


def test_a_huge_request_samples_at_most_the_cap(session: SessionData) -> None:
    view = services.coreset_view(session, 10**9)
    assert view.sample_size == min(POINT_CAP, view.population)


def test_selected_points_drop_what_the_browser_made_up() -> None:
    def event(points):
        return SimpleNamespace(selection=SimpleNamespace(points=points))

    good = [{"customdata": [3, "a"]}, {"customdata": [1]}, {"customdata": [3]}]
    assert selected_points(event(good), 10) == [3, 1]
    assert selected_points(event([{"customdata": [99]}, {"customdata": [-1]}, {"customdata": [2]}]), 10) == [2]
    assert selected_points(event([{"customdata": ["x"]}]), 10) == []
    assert selected_points(event(["junk", {"other": 1}]), 10) == []
    assert selected_points(None, 10) == [] and selected_points(SimpleNamespace(), 10) == []


# ----------------------------------------------------------------------------------------------- detect
def test_scoring_is_memoised_and_a_retune_is_a_new_result(session: SessionData, synthetic_set, tmp_path) -> None:
    records = _test_records(synthetic_set, tmp_path)
    assert services.cached_detection(session, records, True) is None
    detection = services.score_test(session, records, labelled=True)
    assert services.cached_detection(session, records, True) is detection
    assert services.scored_test_set(session) is None  # no test set loaded: the Deploy page scores nothing
    scores = np.asarray(detection.softpatch.image_scores)
    assert list(detection.order) == sorted(range(len(records)), key=lambda i: (-scores[i], i))
    assert detection.describe(0).endswith(" · good") and detection.describe(len(records) - 1).endswith(" · defective")
    lo, hi = detection.map_range()
    both = np.concatenate([detection.softpatch.anomaly_maps.ravel(), detection.patchcore.anomaly_maps.ravel()])
    assert both.min() <= lo < hi <= both.max()
    assert detection.has_both_classes
    services.retune(session, session.settings.with_changes(tau=0.2))
    assert services.cached_detection(session, records, True) is None


def test_metrics_and_curves_agree(session: SessionData, synthetic_set, tmp_path) -> None:
    from softpatch.evaluation import metrics

    records = _test_records(synthetic_set, tmp_path)
    detection = services.score_test(session, records, labelled=True)
    table = services.evaluate(detection, session.model.transform_)
    expected = metrics.image_auroc(detection.labels, detection.softpatch.image_scores)
    assert table["SoftPatch"]["image AUROC"] == pytest.approx(expected)
    assert isinstance(table["SoftPatch"]["pixel AUROC"], float)  # the masks were read at crop size
    curves = services.roc_curves(detection, table)
    assert set(curves) == {"SoftPatch", "PatchCore"}
    fpr, tpr, auc = curves["SoftPatch"]
    assert auc == table["SoftPatch"]["image AUROC"]
    assert np.trapezoid(tpr, fpr) == pytest.approx(auc)
    keep = np.ones(len(records), dtype=bool)
    keep[-1] = False
    fewer = services.roc_curves(detection, table, keep)
    assert len(fewer["SoftPatch"][0]) <= len(fpr)
    assert services.format_metric(0.12345) == "0.123"
    assert services.format_metric("one class only") == "n/a (one class only)"


# ----------------------------------------------------------------------------------------------- thresholds
def test_deploy_rules_follow_the_evidence(session: SessionData) -> None:
    scores, both, good_only = np.array([1.0, 2.0]), np.array([0, 1]), np.array([0, 0])
    assert deploy.available_rules(scores, both) == ["good", "f1", "percentile", "manual"]
    assert deploy.available_rules(scores, good_only) == ["good", "percentile", "manual"]
    assert deploy.available_rules(None, None) == ["good", "manual"]
    assert deploy.remembered_rule(session) is None
    chosen = deploy.apply_rule(session, services.ThresholdRule(kind="manual", value=3.5))
    assert chosen.threshold == session.threshold == 3.5 and session.threshold_mode == "manual"
    assert deploy.remembered_rule(session).kind == "manual"
    # After a refresh only the mode, the percentile and the value come back from the project file.
    session.threshold_rule = None
    restored = deploy.remembered_rule(session)
    assert (restored.kind, restored.value) == ("manual", 3.5)
    session.bundle_file = None
    session.dataset_name = "line 3"
    assert deploy.bundle_file_name(session) == "line_3.softpatch"


# ----------------------------------------------------------------------------------------------- review
def test_review_queue_count_and_moves(session: SessionData) -> None:
    vet = services.vetting(session)
    n = len(vet.names)
    tau = session.model.config.tau
    default = review.review_count(vet, tau, None)
    assert default == min(n, max(10, int((vet.removed_fraction > tau).sum())))
    for hostile, expected in ((10**9, n), (-3, 1), ("5", 5), ("abc", default), (True, default), (2.7, 2)):
        assert review.review_count(vet, tau, hostile) == expected
    queue = review.review_queue(vet, 5, {}, only_open=False)
    assert queue == [int(i) for i in vet.ranking[:5]]
    first = vet.names[queue[0]]
    review.mark(session, first, "defective", len(queue))
    assert session.labels == {first: "defective"} and session.review_pos == 1
    assert review.review_queue(vet, 5, session.labels, only_open=True) == queue[1:]
    review.step(session, len(queue), 100)
    assert session.review_pos == len(queue) - 1
    review.step(session, len(queue), -100)
    assert session.review_pos == 0
    with pytest.raises(ValueError, match="label must be one of"):
        review.mark(session, first, "<script>", len(queue))
    assert review.label_counts(session.labels) == {"defective": 1, "good": 0, "unsure": 0}
    assert review.defective_names(session.labels) == {first}


# ----------------------------------------------------------------------------------------------- data
def test_a_load_request_names_a_known_set_and_way() -> None:
    with pytest.raises(DataError, match="unknown way to load"):
        data_sources.LoadRequest(kind="train", method="ftp")
    with pytest.raises(DataError, match="unknown set"):
        data_sources.LoadRequest(kind="../etc", method="demo")
    assert not data_sources.LoadRequest(kind="train", method="server folder", server_path="  ").ready
    assert data_sources.LoadRequest(kind="test", method="demo").ready


def test_a_server_folder_loads_and_replaces_the_training_set(session: SessionData, synthetic_set, tmp_path) -> None:
    env = replace(read_environment({}), workdir=tmp_path / "work")
    paths = server_path_policy((synthetic_set.train_dir.parent,), env.workdir, "localhost")
    request = data_sources.LoadRequest(kind="train", method="server folder", server_path=str(synthetic_set.train_dir))
    heard: list[tuple[float, str]] = []
    loaded, upload_dir = data_sources.read_request(session, env, paths, request, progress=lambda *a: heard.append(a))
    assert upload_dir is None and len(loaded.train) == len(synthetic_set.train)
    n_files = len(synthetic_set.train)
    assert heard[-1] == (1.0, f"loading: {n_files} of {n_files} files checked"), "the page's bar hears the scan"
    message = data_sources.apply_load(session, "train", loaded, upload_dir)
    assert message == f"Loaded {len(synthetic_set.train)} training images."
    assert session.model is None, "new training data drops the model"
    outside = data_sources.LoadRequest(kind="train", method="server folder", server_path="/etc")
    with pytest.raises(SoftPatchError, match="outside the folders this server allows"):
        data_sources.read_request(session, env, paths, outside)


def test_extra_images_list_each_bad_line_and_keep_the_test_set(session: SessionData, synthetic_set, tmp_path) -> None:
    env = replace(read_environment({}), workdir=tmp_path / "work")
    paths = server_path_policy((synthetic_set.train_dir.parent,), env.workdir, "localhost")
    good = synthetic_set.test_bad[0]
    text = f"{good}\n\n/etc/passwd\n{synthetic_set.train_dir.parent / 'missing.png'}\n"
    extra = data_sources.read_extra_images(session, env, paths, (), text)
    assert [r.path.name for r in extra.records] == [Path(good).name]
    heard: list[tuple[float, str]] = []
    folder_line = f"{synthetic_set.train_dir}\n"
    added = data_sources.read_extra_images(session, env, paths, (), folder_line, progress=lambda *a: heard.append(a))
    assert len(added.records) == len(synthetic_set.train) and heard[-1][0] == 1.0
    assert [s.path for s in extra.skipped] == ["/etc/passwd", str(synthetic_set.train_dir.parent / "missing.png")]
    test = LoadedSplit(ImageFolder(Path("."), [ImageRecord(Path(good))], []), "server folder", "t")
    session.test = test
    n = len(session.train)
    assert data_sources.add_to_training(session, extra) == f"Added 1 images to the training set ({n + 1} in all)."
    assert session.test is test and len(session.train) == n + 1
    with pytest.raises(DataError, match="none of the given files is a readable image"):
        data_sources.add_to_training(session, ImageFolder(Path("."), [], [SkippedFile("x.txt", "not an image")]))


# ----------------------------------------------------------------------------------------------- denoise form
def test_the_denoise_widgets_show_the_settings_they_came_from(session: SessionData) -> None:
    settings = session.settings.with_changes(tau=0.07, lof_k=9, backbone_kwargs={"bn_eps": 0.001})
    by_key = widget_defaults(settings)
    assert set(by_key) == set(DENOISE_SETTING_KEYS.values())
    raw = {name: by_key[key] for name, key in DENOISE_SETTING_KEYS.items()}
    again, problems = settings_from_widgets(AppSettings(), raw, server_file=None)
    assert problems == [] and again == settings


def test_packing_the_cleaned_folder_reports_progress(session: SessionData) -> None:
    calls: list[tuple[float, str]] = []
    first = session.train.records[0].name
    session.labels[first] = "defective"
    path, count = review.prepare_cleaned_zip(session, progress=lambda f, m: calls.append((f, m)))
    n = len(session.train) - 1
    assert count == n and session.cleaned_zip == (str(path), n)
    assert len(calls) == n and calls[-1] == (1.0, f"export: {n}/{n} images")
    assert [f for f, _ in calls] == sorted(f for f, _ in calls)
    assert review.kept_count(session) == n
