"""Hostile model bundles: every attack is performed and refused with one clear ``BundleError``, before
anything large is allocated, and ``softpatch score`` reports it as one line on stderr with exit code 2.

All attacks start from one real bundle of a cheap fit (random-init resnet18 at crop 64, features shared
with the other core tests) and change one thing, either through safetensors (a well-formed file with a
hostile value) or by writing the header bytes directly (a malformed file).
"""

from __future__ import annotations

import builtins
import io
import json
import math
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from softpatch.config import ConfigError, SoftPatchConfig
from softpatch.deployment.bundle import load_bundle, save_bundle
from softpatch.errors import BundleError
from softpatch.io.fileformats import NotSafetensorsError, loads_json, read_safetensors_header
from softpatch.method.model import SoftPatch
from tests.conftest import SyntheticSet
from tests.test_cli import run

DEEP = 100_000  # nesting depth far past Python's recursion limit


@pytest.fixture(scope="module")
def model(small_config: SoftPatchConfig, extractor, train_embeddings) -> SoftPatch:
    return SoftPatch(small_config.replace(discriminator="nearest"), extractor=extractor).fit_embeddings(
        train_embeddings
    )


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory, model: SoftPatch) -> Path:
    return save_bundle(model, tmp_path_factory.mktemp("secure") / "model.softpatch", threshold=0.5)


# ---------------------------------------------------------------- crafting


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safe_open(str(path), framework="pt") as fh:
        return dict(fh.metadata()), {k: fh.get_tensor(k) for k in fh.keys()}


def _config_change(**changes: object) -> Callable[[dict[str, str]], dict[str, str]]:
    def change(metadata: dict[str, str]) -> dict[str, str]:
        config = json.loads(metadata["config"])
        config.update(changes)
        return {"config": json.dumps(config)}

    return change


def _with(
    metadata: dict[str, str] | Callable[[dict[str, str]], dict[str, str]] | None = None,
    tensors: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
) -> Callable[[Path, Path], Path]:
    """A well-formed safetensors file: the bundle with some metadata fields and tensors replaced."""

    def build(source: Path, out: Path) -> Path:
        meta, ts = _read(source)
        meta.update(metadata(meta) if callable(metadata) else metadata or {})
        ts.update(tensors(ts) if tensors else {})
        save_file({k: v.contiguous() for k, v in ts.items()}, str(out), metadata=meta)
        return out

    return build


def _raw_parts(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    length = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + length]), data[8 + length :]


def _write_raw(out: Path, header: dict | str, body: bytes, *, length: int | None = None) -> Path:
    raw = (header if isinstance(header, str) else json.dumps(header)).encode()
    raw += b" " * (-len(raw) % 8)
    out.write_bytes((len(raw) if length is None else length).to_bytes(8, "little") + raw + body)
    return out


def _raw(change: Callable[[dict, bytes, Path], tuple[dict | str, bytes, int | None]]) -> Callable[[Path, Path], Path]:
    """A file written byte by byte: ``change(header, body, source)`` returns the new header, body and length."""

    def build(source: Path, out: Path) -> Path:
        header, body = _raw_parts(source)
        new_header, new_body, length = change(header, body, source)
        return _write_raw(out, new_header, new_body, length=length)

    return build


def _huge_shape_little_data(header: dict, body: bytes, source: Path) -> tuple[dict, bytes, None]:
    header["bank.features"]["shape"] = [10**6, 10**6]  # 4 TB of float32 claimed, the real few KB present
    return header, body, None


def _huge_shape_matching_offsets(header: dict, body: bytes, source: Path) -> tuple[dict, bytes, None]:
    entry = header["bank.features"]
    entry["shape"] = [10**6, 10**6]
    entry["data_offsets"] = [entry["data_offsets"][0], entry["data_offsets"][0] + 4 * 10**12]
    return header, body, None


def _overlapping(header: dict, body: bytes, source: Path) -> tuple[dict, bytes, None]:
    header["bank.weights"]["data_offsets"] = list(header["train.suspicion"]["data_offsets"])
    header["bank.weights"]["shape"] = list(header["train.suspicion"]["shape"])
    return header, body, None


def _duplicate_key(header: dict, body: bytes, source: Path) -> tuple[str, bytes, None]:
    text = json.dumps(header)
    # A second "__metadata__" at the end: parsers disagree on which one wins, so neither may.
    return text[:-1] + ', "__metadata__": {"format": "softpatch-bundle"}}', body, None


def _nested_header(header: dict, body: bytes, source: Path) -> tuple[str, bytes, None]:
    return '{"x": ' + "[" * DEEP + "]" * DEEP + "}", b"", None


def _length_claim(claim: Callable[[int], int]) -> Callable[[Path, Path], Path]:
    """The bundle's own bytes with the header length replaced by ``claim(file size)``."""

    def build(source: Path, out: Path) -> Path:
        data = source.read_bytes()
        out.write_bytes(claim(len(data)).to_bytes(8, "little") + data[8:])
        return out

    return build


def _bank(m: int, d: int) -> dict[str, torch.Tensor]:
    return {
        "bank.features": torch.zeros(m, d),
        "bank.weights": torch.ones(m),
        "bank.provenance": torch.zeros(m, 3, dtype=torch.int64),
    }


def _fill(key: str, value: float) -> Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]:
    return lambda ts: {key: torch.full_like(ts[key], value)}


# name -> (how to build the attack from the real bundle, what the refusal must say)
ATTACKS: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    # settings that would make scoring allocate without bound, next to the small real tensors
    "huge_feature_dim": (_with(_config_change(feature_dim=10**7)), r"refuses|bank\.features"),
    "huge_crop": (_with(_config_change(resize=100_000, crop=100_000)), r"refuses|patch grid"),
    "huge_crop_and_grid": (
        _with(lambda m: {**_config_change(resize=100_000, crop=100_000)(m), "grid": "[12500, 12500]"}),
        r"refuses|train\.outlier_scores",
    ),
    "large_crop_grid_kept": (_with(_config_change(resize=1000, crop=1000)), r"patch grid"),
    "feature_dim_disagrees": (_with(_config_change(feature_dim=512)), r"bank\.features"),
    "features_shape_disagrees": (_with(tensors=lambda ts: _bank(ts["bank.weights"].shape[0], 95)), r"bank\.features"),
    "scores_shape_disagrees": (_with(tensors=lambda ts: {"train.suspicion": torch.zeros(3)}), r"train\.suspicion"),
    "grid_disagrees": (_with({"grid": "[7, 9]"}), r"train\.outlier_scores"),
    "empty_bank": (_with(tensors=lambda ts: _bank(0, ts["bank.features"].shape[1])), r"empty memory bank"),
    "unexpected_tensor": (_with(tensors=lambda ts: {"extra": torch.zeros(4)}), r"unexpected tensor"),
    # header bytes
    "header_longer_than_file": (_length_claim(lambda size: size - 7), r"more than the"),
    "header_length_2_63": (_length_claim(lambda size: 2**63), r"more than the"),
    "header_length_zero": (_length_claim(lambda size: 0), r"too short"),
    "huge_shape_little_data": (_raw(_huge_shape_little_data), r"declares shape"),
    "huge_shape_matching_offsets": (_raw(_huge_shape_matching_offsets), r"does not start|bytes of data"),
    "overlapping_tensors": (_raw(_overlapping), r"does not start"),
    "duplicate_header_key": (_raw(_duplicate_key), r"duplicate key"),
    "nested_header": (_raw(_nested_header), r"nested too deeply"),
    # metadata
    "nested_config": (_with({"config": "[" * DEEP + "]" * DEEP}), r"nested too deeply"),
    "nested_names": (_with({"train_names": "[" * DEEP + "]" * DEEP}), r"nested too deeply"),
    "config_not_an_object": (_with({"config": "[1, 2]"}), r"not a JSON object"),
    "names_not_text": (_with({"train_names": json.dumps([1] * 16)}), r"names"),
    "sizes_negative": (_with({"train_sizes": json.dumps([[-5, 80]] * 16)}), r"width, height"),
    "threshold_nan": (_with({"threshold": "NaN"}), r"threshold"),
    "threshold_inf": (_with({"threshold": "Infinity"}), r"threshold"),
    "threshold_overflow": (_with({"threshold": "1e999"}), r"threshold"),  # json reads this as float inf
    "threshold_negative": (_with({"threshold": "-1.0"}), r"threshold"),
    "threshold_bool": (_with({"threshold": "true"}), r"threshold"),
    # values
    "soft_weights_nan": (_with(tensors=_fill("bank.weights", math.nan)), r"soft weights"),
    "soft_weights_inf": (_with(tensors=_fill("bank.weights", math.inf)), r"soft weights"),
    "soft_weights_negative": (_with(tensors=_fill("bank.weights", -1e30)), r"soft weights"),
    "outlier_scores_nan": (_with(tensors=_fill("train.outlier_scores", math.nan)), r"outlier scores"),
    "suspicion_negative": (_with(tensors=_fill("train.suspicion", -1.0)), r"suspicions"),
    "removed_not_a_mask": (_with(tensors=_fill("train.removed", 7)), r"removed-patch mask"),
    "provenance_row_off_grid": (
        _with(
            tensors=lambda ts: {"bank.provenance": ts["bank.provenance"].clone().index_fill_(1, torch.tensor([1]), 8)}
        ),
        r"outside the training set",
    ),
    "backbone_weights_nan": (_with(tensors=_fill("backbone.conv1.weight", math.nan)), r"backbone weights"),
}


@pytest.fixture
def attack(request: pytest.FixtureRequest, tmp_path: Path, bundle: Path) -> tuple[Path, str]:
    build, expected = ATTACKS[request.param]
    return build(bundle, tmp_path / f"{request.param}.softpatch"), expected


# ---------------------------------------------------------------- every attack refused


@pytest.mark.parametrize("attack", sorted(ATTACKS), indirect=True)
def test_attack_is_refused_with_one_clear_sentence(attack: tuple[Path, str]) -> None:
    path, expected = attack
    with pytest.raises(BundleError, match=expected) as refused:
        load_bundle(path, device="cpu")
    message = str(refused.value)
    assert "\n" not in message and len(message) < 600, message
    assert path.name in message, "the message names the file"


@pytest.mark.parametrize("attack", sorted(ATTACKS), indirect=True)
def test_attack_is_one_line_from_softpatch_score(attack: tuple[Path, str], synthetic_set: SyntheticSet) -> None:
    path, _ = attack
    code, stdout, stderr = run(["score", str(path), str(synthetic_set.test_good[0]), "--device", "cpu", "--json"])
    assert code == 2
    assert stdout == ""
    assert len(stderr.splitlines()) == 1 and stderr.startswith("softpatch: error: "), stderr
    assert "Traceback" not in stderr


def test_oversized_settings_are_refused_before_the_backbone_is_built(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import softpatch.method.features

    built: list[str] = []
    real = softpatch.method.features.create_backbone
    monkeypatch.setattr(
        softpatch.method.features, "create_backbone", lambda config: built.append(config.backbone) or real(config)
    )
    for name in ("huge_feature_dim", "huge_crop_and_grid", "huge_shape_little_data", "empty_bank"):
        build, _ = ATTACKS[name]
        with pytest.raises(BundleError):
            load_bundle(build(bundle, tmp_path / f"{name}.softpatch"), device="cpu")
    assert built == [], "the refusal comes from the header and metadata alone"
    load_bundle(bundle, device="cpu")
    assert built == ["resnet18"], "the probe sees a real load"


@pytest.mark.parametrize(
    "changes",
    [
        {"backbone": "hf-hub:timm/resnet18.a1_in1k"},
        {"backbone": "local-dir:/etc"},
        {"backbone_kwargs": {"pretrained_cfg_overlay": {"file": "/etc/passwd"}}},
        {"backbone_kwargs": {"checkpoint_path": "/etc/passwd"}},
    ],
    ids=["hf-hub", "local-dir", "pretrained_cfg_overlay", "checkpoint_path"],
)
def test_backbones_that_reach_outside_are_refused_without_a_socket(
    tmp_path: Path, bundle: Path, monkeypatch: pytest.MonkeyPatch, changes: dict
) -> None:
    try:
        SoftPatchConfig(**changes)
    except ConfigError:
        pass
    else:  # the allow-list lives in SoftPatchConfig; without it timm would try the network for minutes
        pytest.skip("SoftPatchConfig does not refuse this backbone setting yet")
    connects = _record_connects(monkeypatch)
    path = _with(_config_change(**changes))(bundle, tmp_path / "outside.softpatch")
    with pytest.raises(BundleError, match="refuses"):
        load_bundle(path, device="cpu")
    assert connects == []


# ---------------------------------------------------------------- loading reads the bundle and nothing else


def _record_connects(monkeypatch: pytest.MonkeyPatch) -> list[object]:
    connects: list[object] = []

    def refuse(self: socket.socket, address: object, *args: object) -> None:
        connects.append(address)
        raise OSError("network disabled by the test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return connects


@pytest.mark.parametrize("asks_for_weights", [False, True], ids=["plain", "config-names-pretrained-and-a-file"])
def test_loading_reads_only_the_bundle_and_opens_no_socket(
    tmp_path: Path,
    bundle: Path,
    synthetic_set: SyntheticSet,
    monkeypatch: pytest.MonkeyPatch,
    asks_for_weights: bool,
) -> None:
    if asks_for_weights:  # the stored config of a fit on pretrained or file weights: neither may be fetched
        secret = tmp_path / "server-secret.safetensors"
        save_file({"conv1.weight": torch.zeros(1)}, str(secret))
        bundle = _with(_config_change(pretrained=True, weights=str(secret)))(bundle, tmp_path / "asks.softpatch")
    load_bundle(bundle, device="cpu")  # first load imports what loading needs: module files are not the point
    opened: list[Path] = []

    def recording(real: Callable) -> Callable:
        def wrapper(file: object, *args: object, **kwargs: object) -> object:
            if isinstance(file, (str, bytes, os.PathLike)):
                opened.append(Path(os.fsdecode(file)).resolve())
            return real(file, *args, **kwargs)

        return wrapper

    monkeypatch.setattr(builtins, "open", recording(builtins.open))
    monkeypatch.setattr(io, "open", recording(io.open))
    monkeypatch.setattr(os, "open", recording(os.open))
    connects = _record_connects(monkeypatch)
    loaded = load_bundle(bundle, device="cpu")
    monkeypatch.undo()
    assert connects == []
    assert opened, "the recorder sees the bundle being opened"
    # The kernel's memory counters (/proc, /sys) are read to size the backbone check; no other file is.
    files = {p for p in opened if p.parts[1:2] not in (("proc",), ("sys",))}
    assert files == {bundle.resolve()}, f"files other than the bundle were opened: {files}"
    assert loaded.score(synthetic_set.test_good[:1], with_maps=False).image_scores.shape == (1,)


# ---------------------------------------------------------------- scores and JSON output


def test_backbone_that_overflows_gives_one_line_not_nan_json(
    tmp_path: Path, bundle: Path, synthetic_set: SyntheticSet
) -> None:
    # Finite but enormous weights pass every load check and still make the features overflow to inf/NaN.
    path = _with(tensors=lambda ts: {"backbone.conv1.weight": ts["backbone.conv1.weight"] * 1e38})(
        bundle, tmp_path / "overflow.softpatch"
    )
    loaded = load_bundle(path, device="cpu")
    assert not math.isfinite(float(loaded.score(synthetic_set.test_good[:1], with_maps=False).image_scores[0]))
    for extra in ([], ["--json"]):
        code, stdout, stderr = run(["score", str(path), str(synthetic_set.test_good[0]), "--device", "cpu", *extra])
        assert code == 2 and stdout == ""
        assert len(stderr.splitlines()) == 1 and "no finite score" in stderr


def test_score_json_is_strict_json(bundle: Path, synthetic_set: SyntheticSet) -> None:
    code, stdout, _ = run(["score", str(bundle), *map(str, synthetic_set.test), "--device", "cpu", "--json"])
    assert code == 0

    def refuse(name: str) -> None:
        raise AssertionError(f"{name} is not JSON")

    document = json.loads(stdout, parse_constant=refuse)
    assert document["threshold"] == 0.5
    assert len(document["results"]) == len(synthetic_set.test)
    assert all(math.isfinite(r["score"]) and r["score"] >= 0 for r in document["results"])


@pytest.mark.parametrize("threshold", [math.nan, math.inf, -1.0])
def test_save_refuses_a_threshold_that_load_would_refuse(tmp_path: Path, model: SoftPatch, threshold: float) -> None:
    with pytest.raises(BundleError, match="threshold"):
        save_bundle(model, tmp_path / "t.softpatch", threshold=threshold)
    assert list(tmp_path.iterdir()) == []


def test_a_parser_recursion_anywhere_is_one_line_from_the_cli(
    bundle: Path, synthetic_set: SyntheticSet, monkeypatch: pytest.MonkeyPatch
) -> None:
    import softpatch.deployment.bundle

    def nested(*args: object, **kwargs: object) -> None:
        raise RecursionError("maximum recursion depth exceeded")

    monkeypatch.setattr(softpatch.deployment.bundle, "load_bundle", nested)
    code, stdout, stderr = run(["score", str(bundle), str(synthetic_set.test_good[0])])
    assert code == 2 and stdout == ""
    assert stderr.splitlines() == ["softpatch: error: the input is nested too deeply to be read"]


# ---------------------------------------------------------------- the header parser itself


def test_header_over_the_accepted_size_is_refused_before_it_is_read(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    save_file({"x": torch.zeros(4)}, str(path), metadata={"note": "y" * 200})
    assert read_safetensors_header(path).tensors["x"].shape == (4,)
    with pytest.raises(NotSafetensorsError, match="over the 64 accepted"):
        read_safetensors_header(path, max_header_bytes=64)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("[NaN]", "not a JSON value"),
        ('{"a": Infinity}', "not a JSON value"),
        ('{"a": 1, "a": 2}', "duplicate key"),
        ("[" * DEEP + "]" * DEEP, "nested too deeply"),
        (b"\xff\xfe{", "invalid JSON"),
    ],
    ids=["nan", "infinity", "duplicate", "deep", "not-utf8"],
)
def test_untrusted_json_is_refused_with_a_reason(text: str | bytes, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        loads_json(text)
