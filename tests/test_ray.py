"""A fit on a Ray cluster equals the local fit; cluster addresses are hostile input; no Ray without a cluster.

The cluster tests start a local Ray instance with two worker CPUs in this process (``RayCluster("local",
num_cpus=2)``) and always shut it down; they are skipped when Ray is not installed.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from softpatch.cli import main
from softpatch.config import SoftPatchConfig
from softpatch.errors import ImageLoadError
from softpatch.io.feature_store import FeatureStore
from softpatch.method.model import SoftPatch
from softpatch.runtime.distributed import RAY_MISSING, ClusterError, RayCluster, check_address

HAS_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(not HAS_RAY, reason="Ray is not installed: pip install 'softpatch[ray]'")
ROOT = Path(__file__).resolve().parents[1]

GOOD_ADDRESSES = {
    "auto": "auto",
    "local": "local",
    " 10.0.0.7:6379 ": "10.0.0.7:6379",
    "Head.Cluster.internal:6379": "head.cluster.internal:6379",
    "ray://head-node:10001": "ray://head-node:10001",
    "[::1]:6379": "::1:6379",
}
HOSTILE_ADDRESSES = [
    "",
    "AUTO",
    "head",  # no port
    "head:0",
    "head:65536",
    "head:06379x",
    "head:١٢٣",  # non-ASCII digits
    "http://head:6379",
    "ray://",
    "file:///etc/passwd:1",
    "../head:6379",
    "head/x:6379",
    "-head:6379",
    "he ad:6379",
    "head\x00:6379",
    "héad:6379",
    "auto --address=evil:1",
    "[::1:6379",
    "[not-v6]:6379",
    "a" * 300 + ":6379",
    "user@head:6379",
]


@pytest.fixture
def config(small_config: SoftPatchConfig) -> SoftPatchConfig:
    # fusion runs every member (nearest, gaussian from the features, LOF); batches of 4 give several tasks.
    return small_config.replace(discriminator="fusion", batch_size=4)


# ---------------------------------------------------------------------------------------------- addresses
@pytest.mark.parametrize("given, normalised", GOOD_ADDRESSES.items())
def test_cluster_addresses_of_the_four_forms_are_accepted(given: str, normalised: str) -> None:
    assert check_address(given) == normalised


@pytest.mark.parametrize("address", [*HOSTILE_ADDRESSES, 6379, None, b"auto:1"])
def test_a_hostile_address_is_refused_in_one_sentence_before_ray_is_called(
    address, monkeypatch: pytest.MonkeyPatch
) -> None:
    if HAS_RAY:
        import ray

        monkeypatch.setattr(ray, "init", lambda *a, **k: pytest.fail("ray.init was called"))
    with pytest.raises(ClusterError) as refused:
        RayCluster(address, store_dir="/shared/store")
    message = str(refused.value)
    assert message and "\n" not in message and "Traceback" not in message


def test_a_cluster_of_other_machines_needs_a_shared_store_directory() -> None:
    with pytest.raises(ClusterError, match="store directory"):
        RayCluster("10.0.0.7:6379")
    assert RayCluster("10.0.0.7:6379", store_dir="/shared/store").store_dir == "/shared/store"
    assert RayCluster("127.0.0.1:6379").store_dir is None, "this machine: a temporary folder will do"


def test_without_ray_installed_a_cluster_fit_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray -> ImportError
    with pytest.raises(ClusterError) as refused:
        RayCluster("auto").connect()
    assert str(refused.value) == RAY_MISSING


def test_the_cli_refuses_a_hostile_address_before_reading_any_image(
    synthetic_set, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    import softpatch.method.model as model_module

    loaded: list = []
    monkeypatch.setattr(model_module, "_load_one", lambda image: loaded.append(image))
    out = tmp_path / "m.softpatch"
    code = main(["--quiet", "fit", str(synthetic_set.train_dir), "-o", str(out), "--ray", "http://evil:80/x"])
    err = capsys.readouterr().err
    assert code == 2 and "not a cluster address" in err and len(err.strip().splitlines()) == 1
    assert loaded == [] and not out.exists()
    code = main(["--quiet", "vet", str(synthetic_set.train_dir), "--store-dir", str(tmp_path)])
    assert code == 2 and "--ray" in capsys.readouterr().err


def test_a_local_fit_never_imports_ray(tmp_path: Path) -> None:
    """In a fresh interpreter: fit and score without a cluster leave ``ray`` out of ``sys.modules``."""
    script = f"""
import sys
sys.path.insert(0, {str(ROOT / "tests")!r})
from conftest import make_synthetic_set
from softpatch.config import SoftPatchConfig
from softpatch.method.model import SoftPatch
from softpatch.cli import main
data = make_synthetic_set(__import__("pathlib").Path({str(tmp_path)!r}), n_train=4)
config = SoftPatchConfig(backbone="resnet18", pretrained=False, resize=72, crop=64, layers=(2, 3), feature_dim=32,
                         device="cpu", discriminator="lof")
SoftPatch(config).fit(data.train).score(data.test)
assert main(["--quiet", "vet", str(data.train_dir), "--backbone", "resnet18", "--no-pretrained", "--crop", "64",
             "--resize", "72", "--feature-dim", "32", "--device", "cpu"]) == 0
print("ray imported:", "ray" in sys.modules)
"""
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "ray imported: False"


# ---------------------------------------------------------------------------------------------- the cluster
@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    """A Ray instance of this process with two worker CPUs (two tasks at a time), shut down after the module."""
    if not HAS_RAY:
        pytest.skip("Ray is not installed: pip install 'softpatch[ray]'")
    import ray

    if ray.is_initialized():
        pytest.skip("this process is already connected to a Ray cluster")
    store = tmp_path_factory.mktemp("ray-store")
    cluster = RayCluster("local", num_cpus=2, store_dir=str(store))
    try:
        cluster.connect()
        assert ray.cluster_resources().get("CPU") == 2
        yield cluster
    finally:
        cluster.close()
        assert not ray.is_initialized()


@pytest.fixture(scope="module")
def local_and_distributed(cluster: RayCluster, small_config: SoftPatchConfig, synthetic_set):
    config = small_config.replace(discriminator="fusion", batch_size=4)
    local = SoftPatch(config).fit(synthetic_set.train)
    messages: list[tuple[float, str]] = []
    distributed = SoftPatch(config).fit(
        synthetic_set.train, cluster=cluster, progress=lambda f, m: messages.append((f, m))
    )
    return local, distributed, messages


@needs_ray
def test_the_distributed_fit_equals_the_local_fit_bit_for_bit(local_and_distributed, synthetic_set) -> None:
    local, distributed, _ = local_and_distributed
    assert torch.equal(local.train_features_, distributed.train_features_)
    assert local.train_names_ == distributed.train_names_
    assert local.train_sizes_ == distributed.train_sizes_
    np.testing.assert_array_equal(local.outlier_scores_, distributed.outlier_scores_)
    np.testing.assert_array_equal(local.removed_mask_, distributed.removed_mask_)
    assert local.removed_mask_.any(), "denoising removed something: the comparison is not vacuous"
    local_vet, distributed_vet = local.vetting_report(), distributed.vetting_report()
    np.testing.assert_array_equal(local_vet.ranking, distributed_vet.ranking)
    np.testing.assert_array_equal(local_vet.suspicion, distributed_vet.suspicion)
    assert torch.equal(local.memory_bank_.features, distributed.memory_bank_.features)
    local_scores, distributed_scores = local.score(synthetic_set.test), distributed.score(synthetic_set.test)
    np.testing.assert_array_equal(local_scores.image_scores, distributed_scores.image_scores)
    np.testing.assert_array_equal(local_scores.patch_scores, distributed_scores.patch_scores)


@needs_ray
def test_the_distributed_fit_reports_progress_and_leaves_no_store_behind(local_and_distributed, cluster) -> None:
    _, distributed, messages = local_and_distributed
    n = len(distributed.train_names_)
    on_cluster = [m for _, m in messages if "on the cluster" in m]
    assert f"features: {n}/{n} images on the cluster" in on_cluster
    assert any(m.startswith("discriminator: neighbours at") for m in on_cluster)
    fractions = [f for f, m in messages if m.startswith("features:")]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


@needs_ray
def test_the_fit_keeps_one_store_in_the_cluster_folder_until_it_is_closed(
    cluster: RayCluster, config: SoftPatchConfig, synthetic_set
) -> None:
    before = set(Path(cluster.store_dir).iterdir())
    model = SoftPatch(config).fit(synthetic_set.train[:8], cluster=cluster)
    added = set(Path(cluster.store_dir).iterdir()) - before
    assert len(added) == 1, "the cluster wrote into the fit's own store: one store, not a copy"
    store = added.pop()
    assert FeatureStore.open(store).shape[0] == 8
    # The workers wrote the neighbour cache beside the features, as the local fit does: not in the driver's RAM.
    cache_files = sorted(p.name for p in store.iterdir() if p.name.startswith("neighbours_"))
    assert len(cache_files) == 2 and cache_files[0].endswith("_dist.bin"), cache_files
    local = SoftPatch(config).fit(synthetic_set.train[:8])
    np.testing.assert_array_equal(local.outlier_scores_, model.outlier_scores_)
    model.close()
    assert set(Path(cluster.store_dir).iterdir()) == before


@needs_ray
def test_a_failing_task_is_one_sentence_and_removes_its_store(
    cluster: RayCluster, config: SoftPatchConfig, synthetic_set, tmp_path: Path
) -> None:
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    images = [*synthetic_set.train[:5], broken]
    before = set(Path(cluster.store_dir).iterdir())
    with pytest.raises(ImageLoadError) as failed:
        SoftPatch(config).fit(images, cluster=cluster)
    assert "broken.png" in str(failed.value) and "\n" not in str(failed.value)
    assert set(Path(cluster.store_dir).iterdir()) == before


@needs_ray
def test_the_cli_fits_on_the_cluster_and_its_bundle_scores_as_the_local_fit(
    cluster: RayCluster, local_and_distributed, synthetic_set, tmp_path: Path, capsys
) -> None:
    import ray

    from softpatch.deployment.bundle import load_bundle

    local, _, _ = local_and_distributed
    address = ray.get_runtime_context().gcs_address  # "127.0.0.1:PORT": the form a user gives
    out = tmp_path / "ray.softpatch"
    c = local.config
    argv = ["--quiet", "fit", str(synthetic_set.train_dir), "-o", str(out), "--ray", address]
    argv += ["--store-dir", str(tmp_path / "store"), "--backbone", c.backbone, "--no-pretrained"]
    argv += ["--resize", str(c.resize), "--crop", str(c.crop), "--layers", "2,3", "--feature-dim", str(c.feature_dim)]
    argv += ["--batch-size", "4", "--device", "cpu", "--discriminator", "fusion"]
    code = main(argv)
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert ray.is_initialized(), "the CLI left the caller's connection open"
    bundle = load_bundle(out, device="cpu")
    test_images = synthetic_set.test
    np.testing.assert_array_equal(bundle.score(test_images).image_scores, local.score(test_images).image_scores)
    np.testing.assert_array_equal(bundle.outlier_scores_, local.outlier_scores_)
    assert list((tmp_path / "store").iterdir()) == []
    shutil.rmtree(tmp_path / "store")
