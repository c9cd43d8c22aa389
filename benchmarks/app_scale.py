"""The app at 10,000 images (a script, not a test): how long each page takes to draw, and how much it draws.

Drives the real app (``app.py``, Streamlit's AppTest: the same scripts a browser session runs, without the
browser) on a folder of ``--images`` augmented magnetic_tile images (``benchmarks/scale.py`` builds them):
load it as a server folder, fit, move tau, and open every page. Printed per step: the wall time of the
script run (what a user waits for after a click) and what the page drew (image elements, table rows), so
that a list that stops paging shows up as thousands of elements. The model is the real MobileNet v1 from
``../shared/weights`` at 128/112 on the CPU, so that the fit takes minutes; the pages' cost does not depend
on the backbone.

    .venv/bin/python benchmarks/app_scale.py                      # 10,000 images
    .venv/bin/python benchmarks/app_scale.py --images 500         # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run as a plain script from a checkout: import this softpatch
sys.path.insert(0, str(ROOT / "benchmarks"))

import scale  # noqa: E402 - the augmented magnetic_tile folders

WEIGHTS = Path(scale.REAL_CONFIG["weights"])  # the shared ImageNet MobileNet v1, as scale.py --real-weights
APP = str(ROOT / "app.py")


def _drawn(at) -> str:
    frames = at.get("arrow_data_frame") + at.get("dataframe")
    rows = sum(len(f.value) for f in frames if hasattr(f, "value") and f.value is not None)
    return f"{len(at.get('image'))} images, {len(at.get('plotly_chart'))} charts, {rows} table rows"


def _clean(at, step: str) -> None:
    problems = [e.value for e in at.exception] + [e.value for e in at.error]
    if problems:
        sys.exit(f"{step}: the page failed: {problems}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=10_000, help="training images (default 10,000)")
    parser.add_argument("--work", default=None, help="folder for the images and the app's work folder")
    parser.add_argument("--skip-deploy", action="store_true", help="do not open Deploy (5 refits for its threshold)")
    args = parser.parse_args(argv)
    if not WEIGHTS.is_file():
        sys.exit(f"needs the shared MobileNet weights at {WEIGHTS}")
    work = Path(args.work or tempfile.mkdtemp(prefix="softpatch-app-scale-"))
    started = time.perf_counter()
    paths, _ = scale.build_folder(work / "images", args.images)
    folder = work / f"train_{args.images}"
    if not folder.exists():  # exactly --images files: a link per image into the shared folder of copies
        folder.mkdir(parents=True)
        for p in paths:
            os.link(p, folder / Path(p).name)
    print(f"{args.images} images ready in {time.perf_counter() - started:.0f} s", flush=True)
    os.environ.update(
        SOFTPATCH_BACKBONE=scale.REAL_CONFIG["backbone"],
        SOFTPATCH_WEIGHTS=str(WEIGHTS),
        SOFTPATCH_BACKBONE_KWARGS=json.dumps(scale.REAL_CONFIG["backbone_kwargs"]),
        SOFTPATCH_RESIZE="128",
        SOFTPATCH_CROP="112",
        SOFTPATCH_DEVICE="cpu",
        SOFTPATCH_WORK_DIR=str(work / "app_work"),
        SOFTPATCH_SERVER_ROOTS=str(work),
    )
    from streamlit.testing.v1 import AppTest

    from softpatch_app.keys import DENOISE, LOADERS

    rows: list[tuple[str, float, str]] = []

    def step(name: str, action) -> object:
        t0 = time.perf_counter()
        at_ = action()
        seconds = time.perf_counter() - t0
        _clean(at_, name)
        rows.append((name, seconds, _drawn(at_)))
        print(f"{name}: {seconds:.1f} s ({rows[-1][2]})", flush=True)
        return at_

    def button(at_, label: str):
        for b in at_.button:
            if b.label.startswith(label):
                return b
        sys.exit(f"no button {label!r} on the page: {[b.label for b in at_.button]}")

    at = AppTest.from_file(APP, default_timeout=7200)
    step("first launch (demo data)", at.run)
    loader = LOADERS["train"]
    at.radio(key=loader.method).set_value("server folder").run()
    at.text_input(key=loader.server_path).set_value(str(folder)).run()
    step("Data: load the folder (every image decoded once)", lambda: button(at, "Load this").click().run())
    step("Data: page drawn again", at.run)
    step("Denoise: open", lambda: at.switch_page("pages/2_denoise.py").run())
    step("Denoise: fit", lambda: button(at, "Fit SoftPatch").click().run())
    step("Denoise: page drawn again", at.run)
    step("Denoise: move tau", lambda: at.slider(key=DENOISE.tau).set_value(0.2).run())
    step("Review: open", lambda: at.switch_page("pages/3_review.py").run())
    step("Review: page drawn again", at.run)
    step("Coreset: open (map on a sample)", lambda: at.switch_page("pages/4_coreset.py").run())
    step("Coreset: page drawn again (cached map)", at.run)
    if not args.skip_deploy:
        step("Deploy: open (threshold from good images, 5 folds)", lambda: at.switch_page("pages/6_deploy.py").run())
        step("Deploy: page drawn again", at.run)
    step("Data: open", lambda: at.switch_page("pages/1_data.py").run())

    print(f"\n## The app at {args.images:,} images (MobileNet v1 at 128/112, CPU)\n")
    print("| step | seconds | drawn |")
    print("|---|---:|---|")
    for name, seconds, drawn in rows:
        print(f"| {name} | {seconds:.1f} | {drawn} |")
    print(json.dumps({"images": args.images, "steps": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
