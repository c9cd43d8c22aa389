"""The ``softpatch`` command: fit, score, export, vet and bench. Errors are one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from softpatch.config import SEARCH_METHODS, ConfigError, SoftPatchConfig
from softpatch.errors import SoftPatchError


def _layers(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--layers takes comma-separated stage numbers like 2,3, not {text!r}"
        ) from None


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"--backbone-kwargs is not valid JSON: {exc.msg}") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("--backbone-kwargs must be a JSON object, e.g. '{\"bn_eps\": 0.001}'")
    return value


def _add_backbone_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("backbone")
    group.add_argument("--backbone", default="wide_resnet50_2", help="timm model name (default: wide_resnet50_2)")
    group.add_argument("--layers", type=_layers, default=(2, 3), help="feature stages, e.g. 2,3 (default)")
    group.add_argument("--backbone-kwargs", type=_json_object, default={}, help="extra timm kwargs as JSON")
    group.add_argument("--weights", default=None, help="local weights file (safetensors or torch state dict)")
    group.add_argument("--no-pretrained", action="store_true", help="random weights (only to try the workflow)")
    group.add_argument("--resize", type=int, default=256, help="resize side before cropping (default 256)")
    group.add_argument("--crop", type=int, default=224, help="centre crop side (default 224)")
    group.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="backbone precision")
    group.add_argument(
        "--batch-size", type=int, default=None, help="images per backbone pass (default: 8 on a CPU, 32 on a GPU)"
    )
    group.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto", help="auto = CUDA if present")


def _add_denoise_options(parser: argparse.ArgumentParser, *, with_discriminator: bool = True) -> None:
    group = parser.add_argument_group("denoising")
    if with_discriminator:
        from softpatch.discriminators import DISCRIMINATORS

        group.add_argument("--discriminator", choices=sorted(DISCRIMINATORS), default="lof", help="noise discriminator")
    group.add_argument("--tau", type=float, default=0.15, help="share of patches removed as noise (default 0.15)")
    group.add_argument("--tau-scope", choices=["global", "position"], default="global", help="one cut or per position")
    group.add_argument("--lof-k", type=int, default=6, help="LOF neighbours (default 6)")
    group.add_argument("--coreset-ratio", type=float, default=0.1, help="memory bank share of kept patches")
    group.add_argument("--no-soft-weight", action="store_true", help="plain distances at test time")
    group.add_argument(
        "--search",
        choices=SEARCH_METHODS,
        default="bounded",
        help="nearest-neighbour search on CPU; both are exact, 'exhaustive' is the slower baseline",
    )
    group.add_argument("--seed", type=int, default=0, help="seed of the coreset (a fit is reproducible)")


def _config(args: argparse.Namespace) -> SoftPatchConfig:
    return SoftPatchConfig(
        backbone=args.backbone,
        layers=args.layers,
        backbone_kwargs=args.backbone_kwargs,
        weights=args.weights,
        pretrained=not args.no_pretrained,
        resize=args.resize,
        crop=args.crop,
        precision=args.precision,
        batch_size=args.batch_size,
        device=args.device,
        discriminator=getattr(args, "discriminator", "lof"),
        tau=args.tau,
        tau_scope=args.tau_scope,
        lof_k=args.lof_k,
        coreset_ratio=args.coreset_ratio,
        soft_weight=not args.no_soft_weight,
        search=args.search,
        seed=args.seed,
    )


def _progress(quiet: bool):
    if quiet or not sys.stderr.isatty():
        return None
    last = {"stage": None}

    def show(fraction: float, message: str) -> None:
        stage = message.split(":", 1)[0]
        end = "\n" if fraction >= 1.0 else ""
        if stage != last["stage"] and last["stage"] is not None:
            sys.stderr.write("\n")
        last["stage"] = stage
        sys.stderr.write(f"\r{message[:100]:<100} {fraction * 100:5.1f}%{end}")
        sys.stderr.flush()

    return show


def _training_images(path: str) -> list:
    from softpatch.data import scan_images

    folder = scan_images(path)
    for skipped in folder.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    return folder.records


def _cmd_fit(args: argparse.Namespace) -> int:
    from softpatch.bundle import save_bundle
    from softpatch.model import SoftPatch

    records = _training_images(args.train_dir)
    model = SoftPatch(_config(args)).fit(records, progress=_progress(args.quiet))
    out = save_bundle(model, args.output)
    removed = model.removed_fraction_
    print(
        f"fitted on {len(records)} images; removed {removed.mean() * 100:.1f}% of patches; "
        f"memory bank {len(model.memory_bank_)} patches; saved {out}"
    )
    return 0


def _score_inputs(paths: Sequence[str]) -> list:
    records = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            records.extend(_training_images(raw))
        elif path.is_file():
            records.append(path)
        else:
            raise SoftPatchError(f"no such file or folder: {raw}")
    if not records:
        raise SoftPatchError("no readable images to score")
    return records


def _cmd_score(args: argparse.Namespace) -> int:
    from softpatch.bundle import load_bundle
    from softpatch.images import load_image

    model = load_bundle(args.bundle, device=args.device)
    inputs = _score_inputs(args.paths)
    usable, failed = [], []
    for item in inputs:
        try:
            load_image(getattr(item, "path", item))
            usable.append(item)
        except SoftPatchError as exc:
            failed.append((str(getattr(item, "path", item)), str(exc)))
    for path, reason in failed:
        print(f"skipped {path}: {reason}", file=sys.stderr)
    if not usable:
        raise SoftPatchError("none of the given images can be read")
    result = model.score(usable, with_maps=args.heatmaps is not None, progress=_progress(args.quiet))
    threshold = model.threshold_
    if args.heatmaps:
        from softpatch.heatmaps import save_heatmaps

        save_heatmaps(result, model.transform_, usable, Path(args.heatmaps))
    rows = [
        {
            "path": name,
            "score": float(score),
            **({"anomalous": bool(score >= threshold)} if threshold is not None else {}),
        }
        for name, score in zip(result.names, result.image_scores, strict=False)
    ]
    if args.json:
        print(
            json.dumps(
                {"threshold": threshold, "results": rows, "skipped": [dict(path=p, reason=r) for p, r in failed]}
            )
        )
    else:
        for row in rows:
            verdict = "" if threshold is None else ("  ANOMALOUS" if row["anomalous"] else "  ok")
            print(f"{row['score']:10.4f}  {row['path']}{verdict}")
    return 0


def _cmd_vet(args: argparse.Namespace) -> int:
    from softpatch.model import SoftPatch

    records = _training_images(args.train_dir)
    # Vetting needs only features and noise scores; the memory bank is never built.
    model = SoftPatch(_config(args))
    model.fit_embeddings(model.embed(records, progress=_progress(args.quiet)), build_memory_bank=False)
    rows = model.vetting_report().rows()
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["rank", "path", "suspicion", "removed_fraction"])
            writer.writeheader()
            writer.writerows(rows)
    for row in rows:
        print(f"{row['rank']:4d}  {row['suspicion']:8.3f}  {row['removed_fraction'] * 100:5.1f}%  {row['path']}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from softpatch.benchmark import METHODS, run_benchmark

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(METHODS)
    report = run_benchmark(
        args.data_dir,
        noise=args.noise,
        overlap=args.overlap,
        seed=args.seed,
        methods=methods,
        config=_config(args),
        progress=_progress(args.quiet),
    )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        cfg = report.config
        print(
            f"{cfg['data_dir']}: noise {cfg['noise']} ({'overlap' if cfg['overlap'] else 'no overlap'}), "
            f"{cfg['n_train']} train ({cfg['n_injected']} injected), {cfg['n_test']} test, "
            f"{cfg['backbone']} ({cfg['weights']}), {cfg['device']}"
        )
        print(report.table())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from softpatch.export import export_model

    report = export_model(args.bundle, args.output, format=args.format, threshold=args.threshold)
    print(report.summary())
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="softpatch",
        description="Anomaly detection that stays robust when 'good' training images are not all good.",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    commands = parser.add_subparsers(dest="command", required=True)

    fit = commands.add_parser("fit", help="fit a model on a folder of (mostly) good images and save a bundle")
    fit.add_argument("train_dir")
    fit.add_argument("-o", "--output", required=True, help="bundle file to write (e.g. model.softpatch)")
    _add_backbone_options(fit)
    _add_denoise_options(fit)
    fit.set_defaults(run=_cmd_fit)

    score = commands.add_parser("score", help="score images with a saved bundle")
    score.add_argument("bundle")
    score.add_argument("paths", nargs="+", help="image files or folders")
    score.add_argument("--json", action="store_true", help="print one JSON document")
    score.add_argument("--heatmaps", default=None, help="folder to write heatmap overlays into")
    score.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    score.set_defaults(run=_cmd_score)

    export = commands.add_parser(
        "export", help="export a bundle with its threshold to ONNX or OpenVINO (run it with deploy/softpatch_infer.py)"
    )
    export.add_argument("bundle")
    export.add_argument("--format", choices=["onnx", "openvino"], default="onnx", help="model format (default onnx)")
    export.add_argument("-o", "--output", required=True, help="model file to write (.onnx, or .xml plus .bin)")
    export.add_argument("--threshold", type=float, default=None, help="image threshold (default: the bundle's)")
    export.set_defaults(run=_cmd_export)

    vet = commands.add_parser("vet", help="rank training images by how likely they are defective")
    vet.add_argument("train_dir")
    vet.add_argument("--csv", default=None, help="write rank,path,suspicion,removed_fraction to this file")
    _add_backbone_options(vet)
    _add_denoise_options(vet)
    vet.set_defaults(run=_cmd_vet)

    bench = commands.add_parser("bench", help="the paper's noisy benchmark on an MVTec-layout dataset")
    bench.add_argument("data_dir")
    bench.add_argument("--noise", type=float, default=0.1, help="share of injected anomalies (default 0.1)")
    bench.add_argument("--overlap", action="store_true", help="injected images stay in the test set too")
    bench.add_argument("--methods", default=None, help="comma-separated, default all")
    bench.add_argument("--json", action="store_true", help="print one JSON document")
    _add_backbone_options(bench)
    _add_denoise_options(bench, with_discriminator=False)
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # timm reports harmless unexpected classifier keys through logging; keep the output clean.
    logging.getLogger("timm").setLevel(logging.ERROR)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"
    try:
        return int(args.run(args) or 0)
    except (SoftPatchError, ConfigError) as exc:
        print(f"softpatch: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("softpatch: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("softpatch: error: out of memory; use fewer images or a smaller --crop", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"softpatch: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
