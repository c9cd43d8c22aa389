"""The ``softpatch`` command: fit, score, export, vet and bench. Errors are one line on stderr, never a traceback."""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import NoReturn

from softpatch.config import DEFAULTS, DEVICES, SETTINGS, ConfigError, SoftPatchConfig, parse_setting
from softpatch.deployment.formats import DEFAULT_EXPORT_FORMAT, EXPORT_FORMATS
from softpatch.errors import SoftPatchError
from softpatch.evaluation.duplicates import DEFAULT_NEAR_RATIO
from softpatch.evaluation.protocols import PROTOCOL_CHOICES
from softpatch.runtime.progress import ProgressCallback

# Which settings each command offers, by group; every option is derived from the settings' declaration.
_BACKBONE_GROUP = (
    "backbone",
    "layers",
    "backbone_kwargs",
    "weights",
    "pretrained",
    "resize",
    "crop",
    "feature_dim",
    "patch_size",
    "precision",
    "batch_size",
    "device",
    "threads",
)
_DENOISE_GROUP = (
    "discriminator",
    "lof_k",
    "gaussian_reg",
    "fusion",
    "neighbour_reference",
    "tau",
    "tau_scope",
    "soft_weight",
    "coreset",
    "coreset_ratio",
    "projection_dim",
    "coreset_exact_rows",
    "coreset_block_rows",
    "bank_budget_mb",
    "blur_sigma",
    "search",
    "seed",
)


def _option_type(name: str):
    def parse(text: str) -> object:
        try:
            return parse_setting(name, text)
        except ConfigError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    parse.__name__ = SETTINGS[name].kind  # argparse names the type in its messages
    return parse


def _flag(name: str) -> str:
    """The option that sets ``name``: ``--weights``; ``--no-pretrained`` for a boolean (they default to on)."""
    flag = name.replace("_", "-")
    return f"--no-{flag}" if name in SETTINGS and SETTINGS[name].kind == "bool" else f"--{flag}"


def _error_line(exc: SoftPatchError) -> str:
    """The one line a core error becomes, with the options that fix it (the core names settings only)."""
    options = f" (options: {', '.join(map(_flag, exc.settings))})" if exc.settings else ""
    return f"softpatch: error: {exc}{options}"


def _add_setting_options(parser: argparse.ArgumentParser, title: str, names: Sequence[str]) -> None:
    """One option per setting, with the declaration's help, default and check (``softpatch.config.SETTINGS``)."""
    group = parser.add_argument_group(title)
    for name in names:
        setting, default = SETTINGS[name], DEFAULTS[name]
        if setting.kind == "bool":
            # Every boolean defaults to on; the option turns it off.
            group.add_argument(
                _flag(name), dest=name, action="store_false", default=default, help=f"turn off: {setting.help}"
            )
            continue
        shown = (
            ",".join(map(str, default))
            if isinstance(default, tuple)
            else json.dumps(default)
            if isinstance(default, dict)
            else default
        )
        choices = setting.allowed() if setting.kind == "choice" else None
        group.add_argument(
            _flag(name),
            dest=name,
            type=_option_type(name),
            default=default,
            choices=choices,
            metavar="{" + ",".join(choices) + "}" if choices else name.upper(),
            help=setting.help if "default" in setting.help else f"{setting.help} (default: {shown})",
        )


def _add_backbone_options(parser: argparse.ArgumentParser) -> None:
    _add_setting_options(parser, "backbone", _BACKBONE_GROUP)


def _add_denoise_options(parser: argparse.ArgumentParser, *, with_discriminator: bool = True) -> None:
    names = _DENOISE_GROUP if with_discriminator else tuple(n for n in _DENOISE_GROUP if n != "discriminator")
    _add_setting_options(parser, "denoising", names)


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


def _nonnegative(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {text}")
    return value


def _count(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {text}")
        return value

    parse.__name__ = "int"
    return parse


def _add_threshold_options(parser: argparse.ArgumentParser) -> None:
    from softpatch.evaluation.threshold import DEFAULT_FOLDS

    group = parser.add_argument_group("threshold from good images alone (softpatch.evaluation.threshold)")
    group.add_argument(
        "--threshold-fpr",
        type=_fraction,
        default=None,
        metavar="RATE",
        help="store the threshold for this false-alarm rate (e.g. 0.01), set on out-of-sample scores of the "
        "training images; its exact confidence bound is printed (default: no threshold)",
    )
    group.add_argument(
        "--threshold-folds",
        type=_count(2),
        default=DEFAULT_FOLDS,
        metavar="K",
        help=f"folds of the out-of-sample scoring (default: {DEFAULT_FOLDS})",
    )
    group.add_argument(
        "--threshold-exclude",
        action="append",
        metavar="IMAGE",
        help="a training image known to be defective (path or file name), left out of the threshold; repeatable",
    )
    group.add_argument(
        "--threshold-exclude-top",
        type=_count(0),
        default=0,
        metavar="N",
        help="leave the N most suspicious training images out of the threshold (default: 0)",
    )


def _config(args: argparse.Namespace) -> SoftPatchConfig:
    return SoftPatchConfig(**{name: getattr(args, name) for name in SETTINGS if hasattr(args, name)})


def _progress(quiet: bool) -> ProgressCallback | None:
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


def _training_images(path: str, progress: ProgressCallback | None = None) -> list:
    from softpatch.io.datasets import scan_images

    folder = scan_images(path, progress=progress)
    for skipped in folder.skipped:
        print(f"skipped {skipped.path}: {skipped.reason}", file=sys.stderr)
    return folder.records


def _add_cluster_options(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("past one machine (Ray; pip install 'softpatch[ray]')")
    group.add_argument(
        "--ray",
        default=None,
        metavar="ADDRESS",
        help="fit on a running Ray cluster: auto (the one started on this machine), HOST:PORT of its head, or "
        "ray://HOST:PORT; features and neighbours are computed on its workers, the result equals a local fit's "
        "(default: this machine only, without Ray)",
    )
    group.add_argument(
        "--store-dir",
        default=None,
        metavar="DIR",
        help="with --ray: a folder every node sees at the same path (shared file system), where the fit keeps "
        "its features while it runs (default: a temporary folder, for a cluster on this machine only)",
    )


def _cluster(args: argparse.Namespace):
    """The cluster ``--ray`` names (its address checked before anything else runs), or None."""
    if args.ray is None:
        if args.store_dir is not None:
            raise SoftPatchError("--store-dir is where a --ray fit keeps its features: give --ray too")
        return None
    from softpatch.runtime.distributed import RayCluster

    return RayCluster(args.ray, store_dir=args.store_dir)


def _fit_model(args: argparse.Namespace, records: list, *, build_memory_bank: bool = True):
    from softpatch.method.model import SoftPatch

    cluster = _cluster(args)
    model = SoftPatch(_config(args))
    try:
        return model.fit(records, build_memory_bank=build_memory_bank, progress=_progress(args.quiet), cluster=cluster)
    finally:
        if cluster is not None:
            cluster.close()


def _cmd_fit(args: argparse.Namespace) -> int:
    from softpatch.deployment.bundle import save_bundle

    records = _training_images(args.train_dir, _progress(args.quiet))
    model = _fit_model(args, records)
    chosen = None
    if args.threshold_fpr is not None:
        from softpatch.evaluation.threshold import threshold_from_good_images

        chosen = threshold_from_good_images(
            model,
            target_fpr=args.threshold_fpr,
            folds=args.threshold_folds,
            exclude=_known_defective(records, args.threshold_exclude or []),
            exclude_most_suspicious=args.threshold_exclude_top,
            progress=_progress(args.quiet),
        )
        model.threshold_ = chosen.threshold
    out = save_bundle(model, args.output)
    removed = model.removed_fraction_
    print(
        f"fitted on {len(records)} images; removed {removed.mean() * 100:.1f}% of patches; "
        f"memory bank {len(model.memory_bank_)} patches; saved {out}"
    )
    if chosen is not None:
        print(chosen.summary())
    model.close()  # the training features are in the bundle's bank now: free their disk (a shared folder with --ray)
    return 0


def _known_defective(records: list, given: Sequence[str]) -> list[str]:
    """Training image names (``str(path)``) matching the given paths or file names; one error for any unknown."""
    by_name: dict[str, list[str]] = {}
    for r in records:
        for key in (str(r.path), Path(r.path).name, str(Path(r.path).resolve())):
            by_name.setdefault(key, []).append(str(r.path))
    out: list[str] = []
    for item in given:
        found = by_name.get(item) or by_name.get(str(Path(item).resolve()))
        if not found:
            raise SoftPatchError(f"--threshold-exclude {item}: no such image in the training folder")
        out.extend(found)
    return out


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
    from softpatch.deployment.bundle import load_bundle
    from softpatch.io.images import load_image

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
    threshold = model.threshold_  # finite or None: load_bundle refuses anything else
    broken = [name for name, score in zip(result.names, result.image_scores, strict=True) if not math.isfinite(score)]
    if broken:
        # NaN compares false with any threshold, so it would be reported "ok": refuse instead.
        raise SoftPatchError(
            f"the model gives no finite score for {len(broken)} image(s) (first: {broken[0]}): the bundle's "
            "weights overflow on them; refit, or check where the bundle came from"
        )
    if args.heatmaps:
        from softpatch.io.heatmaps import save_heatmaps

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
                {"threshold": threshold, "results": rows, "skipped": [dict(path=p, reason=r) for p, r in failed]},
                allow_nan=False,  # strict JSON: every value above is finite
            )
        )
    else:
        for row in rows:
            verdict = "" if threshold is None else ("  ANOMALOUS" if row["anomalous"] else "  ok")
            print(f"{row['score']:10.4f}  {row['path']}{verdict}")
    return 0


def _cmd_vet(args: argparse.Namespace) -> int:
    from softpatch.io.csvsafe import write_csv

    records = _training_images(args.train_dir, _progress(args.quiet))
    # Vetting needs only features and noise scores; the memory bank is never built.
    model = _fit_model(args, records, build_memory_bank=False)
    rows = model.vetting_report().rows()
    if args.csv:
        with open(args.csv, "w", newline="", encoding="utf-8") as fh:
            write_csv(fh, rows, ["rank", "path", "suspicion", "removed_fraction"])
    for row in rows:
        print(f"{row['rank']:4d}  {row['suspicion']:8.3f}  {row['removed_fraction'] * 100:5.1f}%  {row['path']}")
    _print_duplicates(model, records, args)
    return 0


def _test_images(path: str) -> list:
    """A test folder's images: its test split when it is in MVTec AD layout, else every image under it."""
    from softpatch.errors import DataError
    from softpatch.io.datasets import load_mvtec

    try:
        dataset = load_mvtec(path)
    except DataError:
        return _training_images(path)
    return dataset.test.records


def _print_duplicates(model, records: list, args: argparse.Namespace) -> None:
    """Exact and near duplicates within the training folder and, with --test-dir, leaks into the test set."""
    from softpatch.evaluation.duplicates import find_duplicates

    test = _test_images(args.test_dir) if args.test_dir else []
    test_features = model.embed(test, progress=_progress(args.quiet)).features if test else None
    found = find_duplicates(
        [r.path for r in records],
        [r.path for r in test],
        train_features=model.train_features_,
        test_features=test_features,
        grid=model.grid_shape_,
        near_ratio=args.near_ratio,
        progress=_progress(args.quiet),
    )
    print(f"duplicates: {found.summary()}")
    for group in found.groups:
        where = "leak " if group.leaks else "train"
        others = f"  =  test: {', '.join(group.test)}" if group.test else ""
        print(f"  {group.kind:5s}  {where}  {', '.join(group.train)}{others}")
    for name in found.unreadable:
        print(f"skipped {name}: cannot be decoded for the duplicate check", file=sys.stderr)


def _cmd_bench(args: argparse.Namespace) -> int:
    from softpatch.evaluation.benchmark import BENCHMARK_METHODS, run_benchmark

    methods = [m.strip() for m in args.methods.split(",") if m.strip()] if args.methods else list(BENCHMARK_METHODS)
    report = run_benchmark(
        args.data_dir,
        noise=args.noise,
        protocol=args.protocol,
        seed=args.seed,
        methods=methods,
        config=_config(args),
        progress=_progress(args.quiet),
    )
    if args.json:
        print(json.dumps(report.to_dict()))
    else:
        cfg = report.config
        tests = ", ".join(f"{n} test {p}" for p, n in cfg["n_test"].items())
        print(
            f"{cfg['data_dir']}: noise {cfg['noise']}, {cfg['n_train']} train ({cfg['n_injected']} injected), {tests}, "
            f"{cfg['backbone']} ({cfg['weights']}), {cfg['device']}"
        )
        print(report.table())
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from softpatch.deployment.export import export_model

    report = export_model(args.bundle, args.output, format=args.format, threshold=args.threshold)
    print(report.summary())
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line, like every other error of the command."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"softpatch: error: {message} (see '{self.prog} --help')\n")


def build_parser() -> argparse.ArgumentParser:
    """The command's parser; every setting option is derived from ``softpatch.config.SETTINGS``."""
    parser = _Parser(
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
    _add_threshold_options(fit)
    _add_cluster_options(fit)
    fit.set_defaults(run=_cmd_fit)

    score = commands.add_parser("score", help="score images with a saved bundle")
    score.add_argument("bundle")
    score.add_argument("paths", nargs="+", help="image files or folders")
    score.add_argument("--json", action="store_true", help="print one JSON document")
    score.add_argument("--heatmaps", default=None, help="folder to write heatmap overlays into")
    score.add_argument("--device", choices=DEVICES, default=DEFAULTS["device"], help=SETTINGS["device"].help)
    score.set_defaults(run=_cmd_score)

    export = commands.add_parser(
        "export", help="export a bundle with its threshold to ONNX or OpenVINO (run it with deploy/softpatch_infer.py)"
    )
    export.add_argument("bundle")
    export.add_argument(
        "--format",
        choices=EXPORT_FORMATS,
        default=DEFAULT_EXPORT_FORMAT,
        help=f"model format (default {DEFAULT_EXPORT_FORMAT})",
    )
    export.add_argument("-o", "--output", required=True, help="model file to write (.onnx, or .xml plus .bin)")
    export.add_argument("--threshold", type=float, default=None, help="image threshold (default: the bundle's)")
    export.set_defaults(run=_cmd_export)

    vet = commands.add_parser("vet", help="rank training images by how likely they are defective")
    vet.add_argument("train_dir")
    vet.add_argument("--csv", default=None, help="write rank,path,suspicion,removed_fraction to this file")
    vet.add_argument(
        "--test-dir",
        default=None,
        help="also report test images that are (near) copies of training images: leakage (an MVTec AD folder "
        "contributes its test split)",
    )
    vet.add_argument(
        "--near-ratio",
        type=_nonnegative,
        default=DEFAULT_NEAR_RATIO,
        metavar="R",
        help="near duplicates: closer than R times the typical distance between neighbouring training images "
        f"(default: {DEFAULT_NEAR_RATIO}; 0 = identical pixels only)",
    )
    _add_backbone_options(vet)
    _add_denoise_options(vet)
    _add_cluster_options(vet)
    vet.set_defaults(run=_cmd_vet)

    bench = commands.add_parser("bench", help="the paper's noisy benchmark on an MVTec-layout dataset")
    bench.add_argument("data_dir")
    bench.add_argument("--noise", type=float, default=0.1, help="share of injected anomalies (default 0.1)")
    bench.add_argument(
        "--protocol",
        choices=list(PROTOCOL_CHOICES),
        default="both",
        help="overlap: the injected images stay in the test set (the paper's); no-overlap: they leave it; "
        "both (default): each method is scored once and reported under both",
    )
    bench.add_argument(
        "--overlap", dest="protocol", action="store_const", const="overlap", help="the same as --protocol overlap"
    )
    bench.add_argument("--methods", default=None, help="comma-separated, default all")
    bench.add_argument("--json", action="store_true", help="print one JSON document")
    _add_backbone_options(bench)
    _add_denoise_options(bench, with_discriminator=False)
    bench.set_defaults(run=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command; every failure is one line on stderr and a non-zero exit, never a traceback."""
    try:
        return _run(argv)
    except KeyboardInterrupt:  # also during the heavy imports at start-up
        print("softpatch: interrupted", file=sys.stderr)
        return 130


def _run(argv: Sequence[str] | None) -> int:
    from softpatch.runtime.threads import prefer_passive_waiting

    prefer_passive_waiting()  # before torch loads: see softpatch.runtime.threads
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # timm reports harmless unexpected classifier keys through logging; keep the output clean.
    logging.getLogger("timm").setLevel(logging.ERROR)
    warnings.simplefilter("default")
    warnings.formatwarning = lambda message, *a, **k: f"warning: {message}\n"
    try:
        from softpatch.runtime.threads import job_threads, limit_threads  # imports torch

        # One job: torch, faiss and image decoding together use the threads asked for (default: the cores
        # this process may use), never one pool of threads per library per core (softpatch.runtime.threads).
        with limit_threads(job_threads(getattr(args, "threads", None))):
            return int(args.run(args) or 0)
    except SoftPatchError as exc:
        print(_error_line(exc), file=sys.stderr)
        return 2
    except MemoryError:
        print("softpatch: error: out of memory; use fewer images or a smaller --crop", file=sys.stderr)
        return 2
    except RecursionError:
        print("softpatch: error: the input is nested too deeply to be read", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"softpatch: error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
