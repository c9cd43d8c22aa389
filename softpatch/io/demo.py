"""The built-in demo dataset: synthetic machined discs, generated deterministically from code.

Nothing is downloaded and no third-party image is shipped: every pixel is computed here with
numpy and Pillow from a seed, so the demo data may be redistributed with the code.

Layout (MVTec AD, so :func:`softpatch.io.datasets.load_mvtec` reads it)::

    <root>/train/good/000.png ... 033.png    30 good parts + 4 planted defective ones ("contaminants")
    <root>/test/good/*.png                   defect-free test parts
    <root>/test/<defect>/*.png               scratch, spot, crack
    <root>/ground_truth/<defect>/<stem>_mask.png
    <root>/demo_manifest.json                which training files are the planted contaminants

The parts are turned metal discs (lathe marks, a machined groove, a centre bore) on a brushed
plate, with small shifts of position, lighting and brightness from image to image. Defects are
bright scratches, dark spots (dents/stains) and thin dark cracks, each with a pixel mask.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from softpatch.io.paths import is_within

DEMO_VERSION = 1
MANIFEST_NAME = "demo_manifest.json"
DEFECT_TYPES = ("scratch", "spot", "crack")
SIZE = 256
N_TRAIN_GOOD = 30
# The planted contaminants of the training folder: one of each defect type plus one more scratch.
TRAIN_CONTAMINANTS = ("scratch", "spot", "crack", "scratch")
N_TEST_GOOD = 8
N_TEST_PER_DEFECT = 4


@dataclass(frozen=True)
class Contaminant:
    """A planted defective image in the demo's training folder."""

    file: str  # path relative to the dataset root, e.g. "train/good/007.png"
    defect: str  # one of DEFECT_TYPES


@dataclass(frozen=True)
class DemoManifest:
    """What a generated demo folder holds: where, from which seed and generator version, and which
    training images are the planted contaminants."""

    root: Path
    seed: int
    version: int
    contaminants: tuple[Contaminant, ...]

    @property
    def contaminant_names(self) -> set[str]:
        """File names (without folder) of the planted contaminants."""
        return {Path(c.file).name for c in self.contaminants}


# ----------------------------------------------------------------------------------------------- rendering


def _smooth_noise_1d(rng: np.random.Generator, n: int, width: int) -> np.ndarray:
    """1-D noise smoothed by a box of ``width`` samples, unit-ish amplitude."""
    raw = rng.normal(size=n + width)
    kernel = np.ones(width) / width
    out = np.convolve(raw, kernel, mode="valid")[:n]
    return out / (out.std() + 1e-8)


def _brushed(rng: np.random.Generator, size: int, angle: float) -> np.ndarray:
    """Linear brushed-metal texture (long streaks along ``angle`` degrees), zero mean, unit std."""
    big = int(size * 1.5)
    length = 48
    noise = rng.normal(size=(big, big + length)).astype(np.float32)
    csum = np.cumsum(noise, axis=1)
    streaks = (csum[:, length:] - csum[:, :-length]) / length  # (big, big): every column a full window
    streaks = (streaks - streaks.mean()) / (streaks.std() + 1e-8)
    img = Image.fromarray(streaks.astype(np.float32)).rotate(angle, resample=Image.BILINEAR)
    off = (big - size) // 2
    return np.asarray(img, dtype=np.float32)[off : off + size, off : off + size]


def _smoothstep(edge0: float, edge1: float, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - edge0) / (edge1 - edge0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@dataclass
class _Part:
    image: np.ndarray  # (S, S) float32, 0..1
    cx: float
    cy: float
    radius: float


def _render_part(rng: np.random.Generator) -> _Part:
    s = SIZE
    cx = s / 2 + rng.uniform(-4, 4)
    cy = s / 2 + rng.uniform(-4, 4)
    radius = 100 + rng.uniform(-2, 2)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    dx, dy = xx - cx, yy - cy
    r = np.sqrt(dx * dx + dy * dy)

    # Brushed plate in the background.
    plate = 0.34 + 0.035 * _brushed(rng, s, 35 + rng.uniform(-6, 6))  # one brushing direction, small play

    # Turned disc: concentric lathe marks (noise over the radius), a soft lighting gradient.
    marks = _smooth_noise_1d(rng, 4 * s, 3)
    lathe = np.interp(r * 4, np.arange(marks.size), marks).astype(np.float32)
    light_angle = rng.uniform(0, 2 * np.pi)
    light = (dx * np.cos(light_angle) + dy * np.sin(light_angle)) / radius
    disc = 0.62 + 0.025 * lathe + 0.05 * light + 0.012 * rng.normal(size=(s, s)).astype(np.float32)

    # Machined groove (dark, with a bright inner edge), bevelled outer edge, dark centre bore.
    groove = _smoothstep(60.0, 62.0, r) * (1 - _smoothstep(69.0, 71.0, r))
    disc = disc * (1 - groove) + (0.40 + 0.02 * lathe) * groove
    disc += 0.22 * np.exp(-(((r - 61.0) / 1.2) ** 2))
    disc += 0.15 * np.exp(-(((r - (radius - 3)) / 1.5) ** 2))
    bore = 1 - _smoothstep(21.0, 23.0, r)
    disc = disc * (1 - bore) + 0.12 * bore

    inside = 1 - _smoothstep(radius - 1, radius + 1, r)
    image = plate * (1 - inside) + disc * inside
    image *= 1 + rng.uniform(-0.05, 0.05)
    image += 0.008 * rng.normal(size=(s, s)).astype(np.float32)
    return _Part(np.clip(image, 0, 1).astype(np.float32), cx, cy, radius)


def _segment_distance(xx: np.ndarray, yy: np.ndarray, p0: np.ndarray, p1: np.ndarray) -> np.ndarray:
    d = p1 - p0
    t = ((xx - p0[0]) * d[0] + (yy - p0[1]) * d[1]) / max(float(d @ d), 1e-6)
    t = np.clip(t, 0, 1)
    px, py = p0[0] + t * d[0], p0[1] + t * d[1]
    return np.sqrt((xx - px) ** 2 + (yy - py) ** 2)


def _face_point(rng: np.random.Generator, part: _Part) -> np.ndarray:
    """A random point on the disc face, away from the bore and the outer edge."""
    rad = rng.uniform(30, part.radius - 22)
    ang = rng.uniform(0, 2 * np.pi)
    return np.array([part.cx + rad * np.cos(ang), part.cy + rad * np.sin(ang)], dtype=np.float32)


def _add_defect(rng: np.random.Generator, part: _Part, defect: str) -> np.ndarray:
    """Draw ``defect`` onto ``part.image`` in place; return its bool mask."""
    s = SIZE
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32)
    img = part.image
    if defect == "scratch":
        p0 = _face_point(rng, part)
        for _ in range(20):  # keep the whole scratch on the disc face
            ang = rng.uniform(0, 2 * np.pi)
            length = rng.uniform(40, 65)
            p1 = p0 + length * np.array([np.cos(ang), np.sin(ang)], dtype=np.float32)
            if np.hypot(p1[0] - part.cx, p1[1] - part.cy) < part.radius - 8:
                break
        dist = _segment_distance(xx, yy, p0, p1)
        core = 1 - _smoothstep(1.2, 2.4, dist)
        halo = (1 - _smoothstep(2.4, 4.5, dist)) - core
        img[:] = img * (1 - core) + 0.95 * core
        img[:] = img * (1 - 0.35 * halo)
        mask = dist <= 4.0
    elif defect == "spot":
        c = _face_point(rng, part)
        ra, rb = rng.uniform(8, 12), rng.uniform(6, 10)
        theta = rng.uniform(0, np.pi)
        u = (xx - c[0]) * np.cos(theta) + (yy - c[1]) * np.sin(theta)
        v = -(xx - c[0]) * np.sin(theta) + (yy - c[1]) * np.cos(theta)
        e = np.sqrt((u / ra) ** 2 + (v / rb) ** 2)
        a = 1 - _smoothstep(0.7, 1.05, e)
        rim = np.exp(-(((e - 1.05) / 0.12) ** 2))
        img[:] = img * (1 - a) + 0.22 * a + 0.12 * rim
        mask = e <= 1.1
    elif defect == "crack":
        p = _face_point(rng, part)
        ang = rng.uniform(0, 2 * np.pi)
        dist = np.full((s, s), np.inf, dtype=np.float32)
        for _ in range(10):
            ang += rng.uniform(-0.6, 0.6)
            q = p + rng.uniform(5, 7) * np.array([np.cos(ang), np.sin(ang)], dtype=np.float32)
            dist = np.minimum(dist, _segment_distance(xx, yy, p, q))
            p = q
        a = 1 - _smoothstep(0.9, 2.0, dist)
        img[:] = img * (1 - 0.85 * a)
        mask = dist <= 3.0
    else:  # pragma: no cover - guarded by callers
        raise ValueError(f"unknown defect {defect!r}")
    np.clip(img, 0, 1, out=img)
    return mask


def _to_rgb(gray: np.ndarray) -> Image.Image:
    tint = np.array([1.0, 0.98, 0.94], dtype=np.float32)
    rgb = np.clip(gray[..., None] * tint * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return Image.fromarray(rgb)


def _save_png(image: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", optimize=False, compress_level=1)


# ----------------------------------------------------------------------------------------------- public API


def _write_dataset(root: Path, seed: int) -> None:
    master = np.random.default_rng([DEMO_VERSION, seed])
    # Which training slots hold the contaminants: fixed by the seed, spread over the folder.
    n_train = N_TRAIN_GOOD + len(TRAIN_CONTAMINANTS)
    slots = sorted(master.choice(np.arange(2, n_train), size=len(TRAIN_CONTAMINANTS), replace=False).tolist())
    planted = dict(zip(slots, TRAIN_CONTAMINANTS, strict=True))
    contaminants = []
    for i in range(n_train):
        rng = np.random.default_rng([DEMO_VERSION, seed, 1, i])
        part = _render_part(rng)
        rel = f"train/good/{i:03d}.png"
        if i in planted:
            _add_defect(rng, part, planted[i])
            contaminants.append({"file": rel, "defect": planted[i]})
        _save_png(_to_rgb(part.image), root / rel)

    for i in range(N_TEST_GOOD):
        rng = np.random.default_rng([DEMO_VERSION, seed, 2, i])
        _save_png(_to_rgb(_render_part(rng).image), root / f"test/good/{i:03d}.png")
    for d, defect in enumerate(DEFECT_TYPES):
        for i in range(N_TEST_PER_DEFECT):
            rng = np.random.default_rng([DEMO_VERSION, seed, 3 + d, i])
            part = _render_part(rng)
            mask = _add_defect(rng, part, defect)
            _save_png(_to_rgb(part.image), root / f"test/{defect}/{i:03d}.png")
            _save_png(
                Image.fromarray((mask * 255).astype(np.uint8)),
                root / f"ground_truth/{defect}/{i:03d}_mask.png",
            )

    manifest = {
        "name": "softpatch-demo",
        "version": DEMO_VERSION,
        "seed": seed,
        "generated_by": "softpatch.io.demo.generate_demo_dataset (synthetic, no third-party content)",
        "contaminants": contaminants,
    }
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def _is_complete(root: Path, seed: int) -> bool:
    manifest = load_demo_manifest(root)
    if manifest is None or manifest.seed != seed or manifest.version != DEMO_VERSION:
        return False
    n_train = len(list((root / "train" / "good").glob("*.png")))
    n_test = sum(len(list(p.glob("*.png"))) for p in (root / "test").iterdir() if p.is_dir())
    expected_test = N_TEST_GOOD + N_TEST_PER_DEFECT * len(DEFECT_TYPES)
    return n_train == N_TRAIN_GOOD + len(TRAIN_CONTAMINANTS) and n_test == expected_test


def generate_demo_dataset(dest: Path, *, seed: int = 0) -> Path:
    """Write the demo dataset to ``dest`` (MVTec layout) and return ``dest``.

    Deterministic: the same seed gives byte-identical files. If ``dest`` already holds a
    complete demo set of this version and seed it is reused as is (generation takes ~1 s).
    The folder is written next to ``dest`` first and moved into place, so a half-written
    set is never seen.
    """
    dest = Path(dest)
    if dest.is_dir() and _is_complete(dest, seed):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        _write_dataset(tmp, seed)
        if dest.exists():
            shutil.rmtree(dest)
        os.replace(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def load_demo_manifest(root: Path) -> DemoManifest | None:
    """The manifest of a demo dataset at ``root``, or None if ``root`` is not one (or its manifest is a
    symlink out of ``root``: it could point at another session's files)."""
    path = Path(root) / MANIFEST_NAME
    if not is_within(path, root):
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        contaminants = tuple(Contaminant(str(c["file"]), str(c["defect"])) for c in data["contaminants"])
        return DemoManifest(Path(root), int(data["seed"]), int(data["version"]), contaminants)
    except (OSError, ValueError, KeyError, TypeError):
        return None
