"""A fit past one machine, on an existing Ray cluster: features sharded by images, neighbours by positions.

``SoftPatch(config).fit(images, cluster=RayCluster(address, store_dir=...))`` runs the same fit as the local
path with its two heavy stages spread over the cluster by Ray's own scheduler (``ray.remote`` tasks,
``ray.wait`` for progress):

* features: image ranges, aligned to the backbone batch, go to tasks; each task builds the backbone from
  the config and the driver's weights (passed through Ray's object store, never as a file path) and writes
  its rows into a ``FeatureStore`` in ``store_dir``, a folder every node sees;
* neighbours: position ranges go to tasks; each reads its positions from the store and computes the
  ``(Pc, N, K)`` distances and image indices of every patch's nearest other-image patches (among the
  reference sample above ``neighbour_reference`` images), written into the cache files beside the store;
* the rest (discriminator scores, coreset, memory bank) runs on the driver exactly as in the local path.

Equality with the local fit: bit for bit on CPUs. Each task embeds the same batches (ranges are whole
batches at the local batch size), the store holds the same rows in either dtype, and every position's neighbour
search is computed independently of how positions are grouped (``compute_neighbours``), so the features,
the neighbour cache and everything derived from them are the local fit's. ``tests/test_ray.py`` checks it.

Ray is imported here only, and only when a cluster is used: the library runs without it.
"""

from __future__ import annotations

import ipaddress
import math
import re
import tempfile
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from softpatch.errors import SoftPatchError
from softpatch.runtime.progress import ProgressCallback, report
from softpatch.runtime.threads import limit_threads

if TYPE_CHECKING:
    from softpatch.io.feature_store import DiskArray, FeatureStore
    from softpatch.method.discriminators import CandidatePlan, NeighbourCache
    from softpatch.method.model import SoftPatch

RAY_MISSING = "Ray is not installed: pip install 'softpatch[ray]'"
# Addresses accepted, nothing else reaches ray.init: "local" (a Ray instance of this process on this
# machine), "auto" (the cluster started on this machine with ray start), a head's host:port, or a Ray
# Client ray://host:port.
_HOST_LABEL = re.compile(r"^(?!-)[A-Za-z0-9-]{1,63}(?<!-)$")
_MAX_HOST = 253
_LOOPBACK_NAMES = frozenset({"localhost", "127.0.0.1", "::1"})
# Tasks per CPU of the cluster: a few more tasks than CPUs balances uneven nodes, each task rebuilds
# the backbone once.
_TASKS_PER_CPU = 2


class ClusterError(SoftPatchError):
    """A cluster address is malformed, Ray is missing, or the cluster cannot be reached or used."""


def _check_host(host: str, given: str) -> str:
    if host.startswith("[") and host.endswith("]"):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError:
            raise ClusterError(f"{given[:80]!r} is not a cluster address: the IPv6 address is malformed") from None
    try:
        return str(ipaddress.IPv4Address(host))
    except ValueError:
        pass
    labels = host.split(".")
    if not host or len(host) > _MAX_HOST or not all(_HOST_LABEL.match(label) for label in labels):
        raise ClusterError(
            f"{given[:80]!r} is not a cluster address: use auto, local, HOST:PORT or ray://HOST:PORT with a plain "
            "host name or IP address"
        )
    return host.lower()


def check_address(address: object) -> str:
    """``address`` checked and normalised: ``"local"``, ``"auto"``, ``"host:port"`` or ``"ray://host:port"``.

    ``ClusterError`` (one sentence) for anything else, before Ray is imported: the address is hostile input.
    """
    if not isinstance(address, str):
        raise ClusterError(f"a cluster address must be text, got {type(address).__name__}")
    text = address.strip()
    if text in ("local", "auto"):
        return text
    scheme, rest = ("ray://", text[6:]) if text.startswith("ray://") else ("", text)
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit() or not port.isascii() or not 1 <= int(port) <= 65535 or len(port) > 5:
        raise ClusterError(
            f"{text[:80]!r} is not a cluster address: use auto, local, HOST:PORT or ray://HOST:PORT with a port "
            "from 1 to 65535"
        )
    return f"{scheme}{_check_host(host, text)}:{int(port)}"


def _is_this_machine(address: str) -> bool:
    if address in ("local", "auto"):
        return True
    host = address.removeprefix("ray://").rpartition(":")[0].strip("[]")
    return host in _LOOPBACK_NAMES or host.startswith("127.")


def _connected_address(ray) -> str | None:
    try:
        return ray.get_runtime_context().gcs_address
    except Exception:  # noqa: BLE001 - a client connection has none; nothing to compare then
        return None


def _same_endpoint(current: str, wanted: str) -> bool:
    """Whether the connected GCS address ``current`` is the ``host:port`` asked for (loopback names alike)."""
    host, _, port = current.rpartition(":")
    wanted_host, _, wanted_port = wanted.rpartition(":")
    loop = {h for h in (host, wanted_host) if h in _LOOPBACK_NAMES or h.startswith("127.")}
    return port == wanted_port and (host == wanted_host or len(loop) == 2)


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ClusterError(RAY_MISSING) from None
    return ray


def _ranges(total: int, parts: int, align: int = 1) -> list[tuple[int, int]]:
    """``[0, total)`` in at most ``parts`` consecutive ranges whose sizes are multiples of ``align``."""
    size = max(1, math.ceil(total / max(1, parts)))
    size = math.ceil(size / align) * align
    return [(start, min(total, start + size)) for start in range(0, total, size)]


def _assigned_cpus() -> int:
    """CPUs Ray assigned to the running task (its threads are bounded to them)."""
    import ray

    cpus = ray.get_runtime_context().get_assigned_resources().get("CPU", 1)
    return max(1, int(cpus))


# ---------------------------------------------------------------------------------------------- tasks
def embed_shard(
    config_data: dict[str, Any], backbone_state: dict[str, torch.Tensor], images: Sequence, start: int, store_dir: str
) -> list[tuple[int, int]]:
    """A Ray task: features of ``images`` written as rows ``start ..`` of the fit's store; returns their sizes.

    The backbone is built from the config (random init, no download) and given the driver's weights; the
    rows go through ``SoftPatch.embed_into``, so they are stored exactly as a local fit stores them.
    """
    from softpatch.config import SoftPatchConfig
    from softpatch.io.feature_store import FeatureStore
    from softpatch.method.features import FeatureExtractor, create_backbone
    from softpatch.method.model import SoftPatch

    config = SoftPatchConfig.from_dict(config_data)
    with limit_threads(_assigned_cpus()):
        backbone = create_backbone(config.replace(pretrained=False, weights=None))
        backbone.load_state_dict(backbone_state)
        extractor = FeatureExtractor(backbone, config).to(memory_format=torch.channels_last)
        _, sizes = SoftPatch(config, extractor=extractor).embed_into(FeatureStore.open(store_dir), images, start=start)
    return sizes


def neighbour_shard(
    store_dir: str,
    start: int,
    stop: int,
    k: int,
    reference: np.ndarray | None,
    plan: CandidatePlan | None,
    budget_bytes: int,
    outputs: tuple[DiskArray, DiskArray] | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """A Ray task: ``(Pc, N, K)`` distances and image indices of the nearest other-image patches at
    positions ``start .. stop`` of the store (``compute_neighbours`` on those positions).

    With ``outputs`` (the cache's two ``DiskArray`` files in the shared store folder) it writes its rows
    there and returns None; without, it returns them through Ray's object store.
    """
    from softpatch.io.feature_store import FeatureStore
    from softpatch.method.discriminators import compute_neighbours

    with limit_threads(_assigned_cpus()):
        block = FeatureStore.open(store_dir).read_positions(start, stop)  # (Pc, N, D)
        cache = compute_neighbours(
            block.transpose(0, 1),
            k,
            device=torch.device("cpu"),
            budget_bytes=budget_bytes,
            reference=reference,
            plan=plan,
        )
    dist, index = np.asarray(cache.dist), np.asarray(cache.index)
    if outputs is None:
        return torch.as_tensor(dist), torch.as_tensor(index)
    outputs[0].write(start, dist)
    outputs[1].write(start, index)
    return None


# ---------------------------------------------------------------------------------------------- driver
@dataclass(frozen=True)
class RayCluster:
    """An existing Ray cluster to fit on (``SoftPatch.fit(images, cluster=...)``).

    ``address``: ``"auto"`` (the cluster started on this machine with ``ray start``), ``"local"`` (a Ray
    instance of this process only), ``"host:port"`` of the head node, or ``"ray://host:port"`` (Ray Client).
    ``store_dir``: a folder every node sees at the same path (a shared file system), where each fit keeps
    its feature store while it runs; ``None`` uses a temporary folder, only for a cluster on this machine.
    ``num_cpus``: CPUs of a ``"local"`` instance (default: all).
    """

    address: str
    store_dir: str | None = None
    num_cpus: int | None = None
    _started: list = field(default_factory=list, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "address", check_address(self.address))
        if self.store_dir is not None:
            text = str(self.store_dir)
            if "\x00" in text or not text.strip() or len(text) > 4096:
                raise ClusterError("the store directory must be a folder path")
            object.__setattr__(self, "store_dir", text)
        elif not _is_this_machine(self.address):
            raise ClusterError(
                f"a cluster at {self.address} may run on several machines: give a store directory that every "
                "node sees at the same path"
            )
        if self.num_cpus is not None and (not isinstance(self.num_cpus, int) or self.num_cpus < 1):
            raise ClusterError(f"num_cpus must be a whole number of at least 1, got {self.num_cpus!r}")

    # ------------------------------------------------------------------ connection
    def connect(self):
        """Ray, connected to this cluster (reusing a connection this process already has). Returns the module."""
        ray = _import_ray()
        if ray.is_initialized():
            current = _connected_address(ray)
            if current is not None and ":" in self.address and not self.address.startswith("ray://"):
                if not _same_endpoint(current, self.address):
                    raise ClusterError(
                        f"this process is already connected to the Ray cluster at {current}, not {self.address}"
                    )
            return ray
        import softpatch

        # Ray ships this process's softpatch to the workers: the same code on every node, whatever a node
        # has installed (a connection the caller made must arrange that itself). Its dependencies (torch,
        # timm, faiss) must be installed on the nodes.
        kwargs: dict[str, Any] = {
            "include_dashboard": False,
            "logging_level": "WARNING",
            "log_to_driver": False,
            "runtime_env": {"py_modules": [str(Path(softpatch.__file__).parent)]},
        }
        if self.address == "local":
            kwargs["num_cpus"] = self.num_cpus
        else:
            kwargs["address"] = self.address
        try:
            ray.init(**kwargs)
        except (ConnectionError, RuntimeError, ValueError, TimeoutError) as exc:
            first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
            raise ClusterError(f"cannot reach a Ray cluster at {self.address}: {first}") from None
        self._started.append(True)
        return ray

    def close(self) -> None:
        """Disconnect, if ``connect`` made the connection (a connection made by the caller is left open)."""
        if self._started:
            import ray

            ray.shutdown()
            self._started.clear()

    def remote(self, function: Callable):
        """``function`` as a Ray task of one CPU."""
        return self.connect().remote(num_cpus=1)(function)

    def cpus(self) -> int:
        """CPUs the cluster offers now."""
        ray = self.connect()
        return max(1, int(ray.cluster_resources().get("CPU", 1)))

    # ------------------------------------------------------------------ stages
    def new_store_dir(self) -> Path:
        """A new, empty folder (mode 0700) for one fit's feature store, under ``store_dir`` (every node sees it)."""
        if self.store_dir is None:
            return Path(tempfile.mkdtemp(prefix="softpatch-ray-"))
        root = Path(self.store_dir)
        directory = root / f"softpatch-fit-{uuid.uuid4().hex}"
        try:
            directory.mkdir(mode=0o700, parents=True)
        except OSError as exc:
            raise ClusterError(f"cannot use the store directory {root}: {exc.strerror or exc}") from None
        return directory

    def extract_into(
        self,
        model: SoftPatch,
        store: FeatureStore,
        images: Sequence,
        *,
        start: int,
        batch_size: int,
        progress: ProgressCallback | None = None,
    ) -> list[tuple[int, int]]:
        """Write the features of ``images[start:]`` into ``store`` (a folder every node sees) on the cluster.

        ``batch_size``: the backbone batch of the local path; each task's range starts on a batch boundary of
        it, so every task runs the local path's batches. Returns the original sizes of ``images[start:]``.
        """
        ray = self.connect()
        config = model.config.replace(batch_size=batch_size)
        n = len(images)
        task = self.remote(embed_shard)
        state_ref = ray.put({k: v.detach().cpu() for k, v in model.extractor_.backbone.state_dict().items()})
        config_data = config.to_dict()
        pending = {
            task.remote(config_data, state_ref, list(images[start + a : start + b]), start + a, str(store.directory)): (
                a,
                b,
            )
            for a, b in _ranges(n - start, self.cpus() * _TASKS_PER_CPU, align=batch_size)
        }
        sizes: list[tuple[int, int] | None] = [None] * (n - start)
        done = start
        report(progress, done / n, f"features: {done}/{n} images on the cluster")
        for shard_sizes, (a, b) in _wait_all(ray, pending):
            sizes[a:b] = [tuple(s) for s in shard_sizes]
            done += b - a
            report(progress, done / n, f"features: {done}/{n} images on the cluster")
        return sizes

    def neighbour_search(self, store: FeatureStore) -> NeighbourSearchOnCluster:
        """``compute_neighbours`` for ``store``'s features with the positions spread over this cluster."""
        return NeighbourSearchOnCluster(self, store)


def _wait_all(ray, pending: dict):
    """Results of ``pending`` (object ref -> label) as they complete, with their labels (``ray.wait``)."""
    refs = list(pending)
    while refs:
        ready, refs = ray.wait(refs, num_returns=1)
        for ref in ready:
            try:
                value = ray.get(ref)
            except Exception as exc:  # noqa: BLE001 - a task's error arrives wrapped; one sentence for the user
                # Ray wraps a task's exception with the remote traceback in its text; the cause is the
                # task's own error (an unreadable image: the same sentence as in the local path).
                cause = getattr(exc, "cause", None) or exc
                if isinstance(cause, SoftPatchError) and not isinstance(cause, ray.exceptions.RayError):
                    raise type(cause)(str(cause)) from None
                lines = str(cause).strip().splitlines() or [type(cause).__name__]
                raise ClusterError(f"a task on the cluster failed: {lines[-1][:200]}") from None
            yield value, pending[ref]


@dataclass(frozen=True)
class NeighbourSearchOnCluster:
    """``compute_neighbours`` with the positions spread over the cluster (same signature, same result)."""

    cluster: RayCluster
    store: FeatureStore  # the fit's store, in a folder every node sees

    def __call__(
        self,
        features: torch.Tensor | FeatureStore,
        k: int,
        *,
        device: torch.device,
        budget_bytes: int,
        progress: ProgressCallback | None = None,
        reference: np.ndarray | None = None,
        directory: str | None = None,
        plan: CandidatePlan | None = None,
        seed: int = 0,
    ) -> NeighbourCache:
        from softpatch.method.discriminators import (
            NeighbourCache,
            candidate_plan,
            clamp_lof_k,
            compute_neighbours,
            image_descriptors,
            neighbour_cache_arrays,
        )

        if features is not self.store:
            # Not the features this cluster extracted (nothing on the cluster holds them): the local path.
            return compute_neighbours(
                features,
                k,
                device=device,
                budget_bytes=budget_bytes,
                progress=progress,
                reference=reference,
                directory=directory,
                plan=plan,
                seed=seed,
            )
        ray = self.cluster.connect()
        n, p, _ = self.store.shape
        if reference is not None and plan is None:  # once, here: every shard compares with the same images
            report(progress, 0.0, f"discriminator: grouping images by look, 0/{p} positions read")
            plan = candidate_plan(image_descriptors(self.store, seed, budget_bytes, progress), len(reference), seed)
        k = clamp_lof_k(k, n if plan is None else len(plan.candidates[0]))
        # On disk beside the store when the fit asks for it (every node sees that folder), as the local path does.
        dist, index = neighbour_cache_arrays(p, n, k, plan, directory)
        outputs = None if isinstance(dist, torch.Tensor) else (dist, index)
        task = self.cluster.remote(neighbour_shard)
        pending = {
            task.remote(str(self.store.directory), a, b, k, reference, plan, budget_bytes, outputs): (a, b)
            for a, b in _ranges(p, self.cluster.cpus() * _TASKS_PER_CPU)
        }
        done = 0
        for shard, (a, b) in _wait_all(ray, pending):
            if outputs is None:
                dist[a:b], index[a:b] = shard
            done += b - a
            report(progress, done / p, f"discriminator: neighbours at {done}/{p} positions on the cluster")
        return NeighbourCache(dist, index, None if reference is None else np.asarray(reference, dtype=np.int64), plan)
