"""CUDA paths agree with the CPU: features, discriminators, the torch bank search, scoring and bundles."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from softpatch.config import SoftPatchConfig
from softpatch.deployment.bundle import load_bundle, save_bundle
from softpatch.method.memory_bank import MemoryBank
from softpatch.method.model import SoftPatch
from softpatch.runtime.device import resolve_device
from tests.conftest import SyntheticSet

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"), pytest.mark.gpu]

CUDA = torch.device("cuda")
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _no_tf32(monkeypatch: pytest.MonkeyPatch) -> None:
    # TF32 convolutions round to ~1e-3; compare the algorithms, not the tensor-core precision.
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)


@pytest.fixture(scope="module")
def weights_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Fixed resnet18 weights, so that the CPU and the GPU models are the same network."""
    with torch.random.fork_rng():
        torch.manual_seed(5)
        state = timm.create_model("resnet18", pretrained=False).state_dict()
    path = tmp_path_factory.mktemp("gpu") / "resnet18.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def _config(small_config: SoftPatchConfig, weights_file: Path, device: str, **changes: object) -> SoftPatchConfig:
    return small_config.replace(weights=str(weights_file), device=device, **changes)


def test_auto_picks_the_gpu() -> None:
    assert resolve_device("auto").type == "cuda"


def test_embeddings_agree(small_config, weights_file: Path, synthetic_set: SyntheticSet) -> None:
    on_gpu = SoftPatch(_config(small_config, weights_file, "cuda")).embed(synthetic_set.train)
    on_cpu = SoftPatch(_config(small_config, weights_file, "cpu")).embed(synthetic_set.train)
    assert on_gpu.features.device == CPU, "embeddings come back to the host"
    torch.testing.assert_close(on_gpu.features, on_cpu.features, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("discriminator", ["nearest", "gaussian", "lof", "fusion"])
def test_discriminators_agree_on_the_same_features(
    small_config, weights_file: Path, synthetic_set: SyntheticSet, discriminator: str
) -> None:
    cpu_model = SoftPatch(_config(small_config, weights_file, "cpu", discriminator=discriminator))
    embeddings = cpu_model.embed(synthetic_set.train)
    cpu_model.fit_embeddings(embeddings)
    gpu_model = SoftPatch(_config(small_config, weights_file, "cuda", discriminator=discriminator))
    gpu_model.fit_embeddings(embeddings)
    assert gpu_model.device_.type == "cuda"
    np.testing.assert_allclose(gpu_model.outlier_scores_, cpu_model.outlier_scores_, rtol=1e-3, atol=1e-5)
    agreement = (gpu_model.removed_mask_ == cpu_model.removed_mask_).mean()
    assert agreement > 0.99


def test_fit_and_score_on_cuda_agree_with_cpu(small_config, weights_file: Path, synthetic_set: SyntheticSet) -> None:
    results = {}
    for device in ("cpu", "cuda"):
        model = SoftPatch(_config(small_config, weights_file, device, discriminator="nearest")).fit(synthetic_set.train)
        assert model.device_.type == device
        results[device] = model.score(synthetic_set.test)
    np.testing.assert_allclose(results["cuda"].image_scores, results["cpu"].image_scores, rtol=1e-3)
    assert results["cuda"].anomaly_maps.shape == results["cpu"].anomaly_maps.shape
    n_good = len(synthetic_set.test_good)
    assert results["cuda"].image_scores[n_good:].min() > results["cuda"].image_scores[:n_good].max()


def test_torch_bank_search_on_cuda_equals_faiss() -> None:
    rng = np.random.default_rng(0)
    features = torch.from_numpy(rng.normal(size=(3000, 64)).astype(np.float32))
    bank = MemoryBank(features, torch.ones(3000), np.zeros((3000, 3), dtype=np.int64))
    queries = torch.from_numpy(rng.normal(size=(20000, 64)).astype(np.float32))  # > one query chunk
    on_gpu = bank.search(queries, CUDA, method="bounded")  # CUDA always searches exhaustively in torch
    on_cpu = bank.search(queries, CPU, method="exhaustive")
    assert on_gpu.distance.device == CPU and on_gpu.index.device == CPU
    assert (on_gpu.index == on_cpu.index).float().mean() > 0.999
    torch.testing.assert_close(on_gpu.distance, on_cpu.distance, rtol=1e-4, atol=1e-4)
    exact = bank.search(features[:5], CUDA, method="exhaustive")
    assert exact.index.tolist() == [0, 1, 2, 3, 4] and exact.distance.abs().max() < 1e-5


def test_bundle_loads_on_cuda_and_scores_like_cpu(
    tmp_path: Path, small_config, weights_file: Path, synthetic_set: SyntheticSet
) -> None:
    model = SoftPatch(_config(small_config, weights_file, "cpu", discriminator="nearest")).fit(synthetic_set.train)
    path = save_bundle(model, tmp_path / "m.softpatch")
    on_gpu = load_bundle(path, device="cuda")
    assert on_gpu.device_.type == "cuda"
    assert next(on_gpu._extractor.parameters()).device.type == "cuda"
    on_cpu = load_bundle(path, device="cpu")
    np.testing.assert_allclose(
        on_gpu.score(synthetic_set.test).image_scores, on_cpu.score(synthetic_set.test).image_scores, rtol=1e-3
    )
