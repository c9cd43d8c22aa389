"""Gathering a session's results into the stakeholder report's content (``html_report.ReportContent``) and
writing it out; drawing only, every number is the core's."""

from __future__ import annotations

import numpy as np

from softpatch_app import plots, services
from softpatch_app.embedding import layout_2d
from softpatch_app.html_report import ReportContent, ReportImage, build_report
from softpatch_app.state import SessionData
from softpatch_app.views import geometry, outlier_heatmap, removed_overlay, score_range, scored_overlay


def build_session_report(session: SessionData, detection, *, device: str, progress=None) -> str:
    model = session.model
    c = model.config
    vet = services.vetting(session)
    removed = vet.removed_mask
    settings = {
        "Dataset": session.dataset_name,
        "Training images": len(vet.names),
        "Device": device,
        "Backbone": f"{c.backbone} (stages {list(c.layers)}), weights: {c.weights_source}",
        "Image size": f"resize {c.resize}, centre crop {c.crop}",
        # "auto" is reported with what it chose for this training set.
        "Noise discriminator": c.discriminator
        if c.discriminator != "auto"
        else f"auto (chose {model.resolved_config_.discriminator}, k={model.resolved_config_.lof_k})",
        "tau (share of patches removed)": f"{c.tau:.2f}",
        "LOF neighbours k": model.resolved_config_.lof_k,
        "Coreset": f"{c.coreset}, ratio {c.coreset_ratio:g}",
        "Soft weights": "on" if c.soft_weight else "off",
    }
    content = ReportContent(dataset=session.dataset_name, settings=settings)
    content.summary = {
        "training images": str(len(vet.names)),
        "patches removed as noise": f"{int(removed.sum()):,}",
        "images marked defective in review": str(sum(v == "defective" for v in session.labels.values())),
    }
    if session.demo is not None:
        found_planted, k = services.demo_check(vet, session.demo)
        content.notes.append(
            f"Demo data: SoftPatch ranked {found_planted} of the {k} planted defective training images in its top {k}."
        )
    found = services.duplicates(session, progress)
    if found is not None:
        content.duplicates_summary = found.summary()
        content.duplicates = found.rows()
    geom = geometry(model)
    vrange = score_range(vet.outlier_scores)
    for rank, i in enumerate(vet.ranking[:6], start=1):
        i = int(i)
        label = session.labels.get(vet.names[i])
        content.removed_examples.append(
            ReportImage(
                f"#{rank} {vet.names[i]} · suspicion {vet.suspicion[i]:.2f} · {vet.removed_fraction[i]:.0%} removed"
                + (f" · reviewed: {label}" if label else ""),
                [
                    removed_overlay(vet.paths[i], removed[i], geom, px=320),
                    outlier_heatmap(vet.paths[i], vet.outlier_scores[i], geom, vrange, px=320),
                ],
            )
        )
    view = services.coreset_view(session, 1500, progress=progress)
    xy = layout_2d(view.points, "t-SNE")
    content.coreset_figure = services.coreset_figure(view, xy, "status")

    if detection is not None:
        soft, base = detection.softpatch, detection.patchcore
        threshold, method = services.current_threshold(session, progress)
        base_threshold = services.baseline_threshold(session, detection, progress) if base is not None else None
        hrange = detection.map_range()
        for k in [int(j) for j in detection.order[:6]]:
            images = [
                scored_overlay(
                    detection, soft, k, model.transform_, alpha=0.5, vrange=hrange, threshold=threshold, px=320
                )
            ]
            caption = f"{detection.names[k]} · SoftPatch {soft.image_scores[k]:.2f}"
            if base is not None:
                images.append(
                    scored_overlay(
                        detection,
                        base,
                        k,
                        model.transform_,
                        alpha=0.5,
                        vrange=hrange,
                        threshold=base_threshold.threshold,
                        px=320,
                    )
                )
                caption += f" · PatchCore {base.image_scores[k]:.2f} (right)"
            content.heatmaps.append(ReportImage(caption, images))
        labels = detection.labels
        if services.has_both_classes(labels):
            leaked = services.leaked_mask(session, detection)
            table = services.evaluate(detection, model.transform_, exclude=leaked)
            if leaked.any():
                content.notes.append(
                    f"Detection quality leaves out the {int(leaked.sum())} test images that are also in the training "
                    "folder (leakage): " + ", ".join(detection.names[i] for i in np.flatnonzero(leaked)) + "."
                )
            content.metrics = {
                name: {k: services.format_metric(v) for k, v in row.items()} for name, row in table.items()
            }
            content.figures.append(("ROC curve", plots.roc_figure(services.roc_curves(detection, table, ~leaked))))
            content.figures.append(
                ("Scores per class", plots.score_histogram(soft.image_scores, labels, threshold=threshold))
            )
            from softpatch.evaluation import metrics

            point = metrics.operating_point(
                labels[~leaked],
                soft.image_scores[~leaked],
                threshold,
                chosen_here=services.threshold_chosen_on_test(session),
            )
            conf = point.confusion
            content.figures.append(("Confusion matrix", plots.confusion_figure(conf.tp, conf.fp, conf.tn, conf.fn)))
            content.threshold = {"Chosen by": method, **point.rows()}
            content.summary["test image AUROC (SoftPatch)"] = services.format_metric(table["SoftPatch"]["image AUROC"])
        else:
            content.threshold = {"Threshold": f"{threshold:.4f}", "Chosen by": method}
        if base_threshold is not None:
            content.threshold["PatchCore's own threshold (same rule)"] = (
                f"{base_threshold.threshold:.4f} ({base_threshold.method})"
            )
    return build_report(content)
