"""Training patch features on disk, laid out by position: what a fit streams into and reads back by chunks.

A store is a directory holding ``header.json``, ``features.bin``, the raw ``(P, N, D)`` array (P patch
positions, N images, D feature dims) in float16 or float32, C order, and optionally ``offset.bin``, a
float32 ``(P, D)`` offset subtracted before storing and added back on reading: with the offset near the
features' common component (e.g. the first batch's mean), float16 rounds the small differences between
images rather than the large shared value, which keeps distances about 3x closer to float32's. The patches of all images at one
position are contiguous, so the per-position work (neighbours, discriminators) reads one block per chunk
of positions. Writers fill image ranges (``write_images``) with positional writes on their own file
descriptor, so several processes may fill disjoint ranges of one store at the same time. Readers copy into
fresh arrays (``os.preadv``) or map the file only for the duration of one call, so a read never leaves the
whole file resident in the process. Flat patch index = image * P + position (as in the memory bank).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from softpatch.errors import DataError

HEADER = "header.json"
DATA = "features.bin"
OFFSET = "offset.bin"
_FORMAT = "softpatch-feature-store"
_VERSION = 1
DTYPES: dict[str, np.dtype] = {"float16": np.dtype(np.float16), "float32": np.dtype(np.float32)}
# Bounds on a header's numbers (it is read from disk: hostile until checked).
_MAX_IMAGES = 10_000_000
_MAX_POSITIONS = 1_000_000
_MAX_DIM = 65_536
_MAX_BYTES = 1 << 44  # 16 TiB
_MAX_HEADER_BYTES = 64 * 1024
# Rows one mapped read (gather) of a DiskArray touches before the map is dropped, so residency stays bounded.
_GATHER_BLOCK = 1 << 16
# Float32 bytes of one block of a store's gather (its rows are 4 KB at 1,024 dims): the map, the float32 copy
# and the offsets of a block are what a gather holds beside its result.
_GATHER_BLOCK_BYTES = 16 * 1024**2
_ARRAY_NAME = re.compile(r"^[a-z0-9_]{1,64}$")


class FeatureStoreError(DataError):
    """A feature store directory is missing, damaged or inconsistent (the message says which)."""


def _check_int(header: dict, key: str, high: int, where: str) -> int:
    value = header.get(key)
    if type(value) is not int or not 1 <= value <= high:
        raise FeatureStoreError(f"the feature store at {where} is damaged: {key} must be an integer in 1..{high}")
    return value


@dataclass(frozen=True)
class StoreLayout:
    """What a header declares: the array's sizes and element type."""

    n_images: int
    n_positions: int
    dim: int
    dtype: str
    offset: bool = False  # whether offset.bin (float32 (P, D)) holds a per-position offset

    @property
    def nbytes(self) -> int:
        return self.n_images * self.n_positions * self.dim * DTYPES[self.dtype].itemsize


def store_bytes(n_images: int, n_positions: int, dim: int, dtype: str = "float16") -> int:
    """Disk bytes of a store of these sizes (known before any image is read)."""
    return StoreLayout(n_images, n_positions, dim, dtype).nbytes


class FeatureStore:
    """An on-disk ``(P, N, D)`` array of patch features; reads give float32 torch tensors.

    Create with ``FeatureStore.create`` (writes the header, sizes the file), open an existing one with
    ``FeatureStore.open`` (validates the header and the file size). Instances hold no open file and no
    data, so they pickle cheaply (e.g. to Ray workers) and may be shared between processes.
    """

    def __init__(self, directory: Path, layout: StoreLayout) -> None:
        self.directory = Path(directory)
        self.layout = layout
        self._dtype = DTYPES[layout.dtype]
        self._offset_values: np.ndarray | None = None  # read lazily, not pickled

    def __getstate__(self) -> dict:
        return {"directory": self.directory, "layout": self.layout}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["directory"], state["layout"])

    # ------------------------------------------------------------------ creation
    @classmethod
    def create(
        cls,
        directory: str | os.PathLike,
        n_images: int,
        n_positions: int,
        dim: int,
        *,
        dtype: str = "float16",
        offset: torch.Tensor | np.ndarray | None = None,
    ) -> FeatureStore:
        """A new, zero-filled store in ``directory`` (created with mode 0700 when missing; must hold no store).

        ``offset`` ``(P, D)``: subtracted before storing, added back on reading (see the module docstring).
        """
        if dtype not in DTYPES:
            raise FeatureStoreError(f"a feature store holds float16 or float32, not {dtype!r}")
        layout = StoreLayout(int(n_images), int(n_positions), int(dim), dtype, offset is not None)
        for key, value, high in (
            ("n_images", layout.n_images, _MAX_IMAGES),
            ("n_positions", layout.n_positions, _MAX_POSITIONS),
            ("dim", layout.dim, _MAX_DIM),
        ):
            if not 1 <= value <= high:
                raise FeatureStoreError(f"a feature store needs {key} in 1..{high}, got {value}")
        if layout.nbytes > _MAX_BYTES:
            raise FeatureStoreError(f"a feature store of {layout.nbytes} bytes is larger than the 16 TiB allowed")
        directory = Path(directory)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        if (directory / HEADER).exists():
            raise FeatureStoreError(f"{directory} already holds a feature store")
        if offset is not None:
            values = offset.detach().cpu().numpy() if isinstance(offset, torch.Tensor) else np.asarray(offset)
            if values.shape != (layout.n_positions, layout.dim):
                raise ValueError(f"an offset of shape {values.shape} does not fit {layout.n_positions} x {layout.dim}")
            np.ascontiguousarray(values, dtype=np.float32).tofile(directory / OFFSET)
        with open(directory / DATA, "wb") as fh:
            fh.truncate(layout.nbytes)  # sparse: disk is used as images are written
        header = {"format": _FORMAT, "version": _VERSION, **layout.__dict__}
        tmp = directory / (HEADER + ".tmp")
        tmp.write_text(json.dumps(header))
        os.replace(tmp, directory / HEADER)  # the header appears last: an opened store is complete
        return cls(directory, layout)

    @classmethod
    def open(cls, directory: str | os.PathLike) -> FeatureStore:
        """An existing store; ``FeatureStoreError`` (one sentence) when its header or file is not as declared."""
        directory = Path(directory)
        where = str(directory)
        try:
            with open(directory / HEADER, "rb") as fh:
                raw = fh.read(_MAX_HEADER_BYTES + 1)
        except OSError:
            raise FeatureStoreError(f"there is no feature store at {where}") from None
        if len(raw) > _MAX_HEADER_BYTES:
            raise FeatureStoreError(f"the feature store at {where} is damaged: its header is too large")
        try:
            header = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            raise FeatureStoreError(f"the feature store at {where} is damaged: its header is not JSON") from None
        if not isinstance(header, dict) or header.get("format") != _FORMAT:
            raise FeatureStoreError(f"{where} does not hold a SoftPatch feature store")
        if header.get("version") != _VERSION:
            raise FeatureStoreError(f"the feature store at {where} has an unknown format version")
        dtype = header.get("dtype")
        if not isinstance(dtype, str) or dtype not in DTYPES:
            raise FeatureStoreError(f"the feature store at {where} is damaged: dtype must be float16 or float32")
        has_offset = header.get("offset", False)
        if not isinstance(has_offset, bool):
            raise FeatureStoreError(f"the feature store at {where} is damaged: offset must be true or false")
        layout = StoreLayout(
            _check_int(header, "n_images", _MAX_IMAGES, where),
            _check_int(header, "n_positions", _MAX_POSITIONS, where),
            _check_int(header, "dim", _MAX_DIM, where),
            dtype,
            has_offset,
        )
        if layout.nbytes > _MAX_BYTES:
            raise FeatureStoreError(f"the feature store at {where} is damaged: it declares more than 16 TiB")
        data = directory / DATA
        try:
            size = data.stat().st_size
        except OSError:
            raise FeatureStoreError(f"the feature store at {where} has no data file") from None
        if size != layout.nbytes:
            raise FeatureStoreError(
                f"the feature store at {where} is damaged: its data file has {size} bytes, its header says "
                f"{layout.nbytes}"
            )
        if has_offset:
            try:
                offset_size = (directory / OFFSET).stat().st_size
            except OSError:
                raise FeatureStoreError(f"the feature store at {where} has no offset file") from None
            if offset_size != layout.n_positions * layout.dim * 4:
                raise FeatureStoreError(f"the feature store at {where} is damaged: its offset file has the wrong size")
        return cls(directory, layout)

    def _offsets(self) -> np.ndarray | None:
        """The ``(P, D)`` float32 offset, or None."""
        if not self.layout.offset:
            return None
        if self._offset_values is None:
            values = np.fromfile(self.directory / OFFSET, dtype=np.float32)
            self._offset_values = values.reshape(self.layout.n_positions, self.layout.dim)
        return self._offset_values

    # ------------------------------------------------------------------ sizes
    @property
    def shape(self) -> tuple[int, int, int]:
        """``(N, P, D)``: images, positions, dims (the logical shape; the disk layout is ``(P, N, D)``)."""
        return (self.layout.n_images, self.layout.n_positions, self.layout.dim)

    @property
    def dtype(self) -> str:
        return self.layout.dtype

    @property
    def nbytes(self) -> int:
        return self.layout.nbytes

    def __len__(self) -> int:
        return self.layout.n_images

    @property
    def path(self) -> Path:
        return self.directory / DATA

    def _offset(self, position: int, image: int) -> int:
        return ((position * self.layout.n_images) + image) * self.layout.dim * self._dtype.itemsize

    # ------------------------------------------------------------------ writing
    def write_images(self, start: int, features: torch.Tensor | np.ndarray) -> None:
        """Write ``features`` ``(b, P, D)`` as images ``start .. start + b`` at every position.

        Positional writes on a descriptor of this call only: concurrent writers of disjoint image
        ranges (threads or processes) do not interfere.
        """
        n, p, d = self.shape
        array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
        if array.ndim != 3 or array.shape[1:] != (p, d):
            raise ValueError(f"features of shape {array.shape} do not fit a store of {p} positions x {d} dims")
        b = array.shape[0]
        if not 0 <= start <= n - b:
            raise ValueError(f"images {start}..{start + b} are outside the store's {n} images")
        offset = self._offsets()
        if offset is not None:
            array = array.astype(np.float32, copy=False) - offset[None]
        # (P, b, D): one contiguous strip per position.
        strips = np.ascontiguousarray(array.transpose(1, 0, 2), dtype=self._dtype)
        fd = os.open(self.path, os.O_WRONLY)
        try:
            for position in range(p):
                view = memoryview(strips[position]).cast("B")
                offset = self._offset(position, start)
                while view:  # pwrite may write less than asked
                    written = os.pwrite(fd, view, offset)
                    view, offset = view[written:], offset + written
        finally:
            os.close(fd)

    # ------------------------------------------------------------------ reading
    def _read_into(self, fd: int, out: np.ndarray, offset: int) -> None:
        view = memoryview(out).cast("B")
        while view:
            got = os.preadv(fd, [view], offset)
            if got <= 0:
                raise FeatureStoreError(f"the feature store at {self.directory} is truncated")
            view, offset = view[got:], offset + got

    def read_positions_raw(self, start: int, stop: int) -> np.ndarray:
        """Positions ``start .. stop`` of all images as stored (offset not added): ``(stop - start, N, D)``."""
        n, p, d = self.shape
        if not 0 <= start <= stop <= p:
            raise ValueError(f"positions {start}..{stop} are outside the store's {p} positions")
        out = np.empty((stop - start, n, d), dtype=self._dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            self._read_into(fd, out, self._offset(start, 0))
        finally:
            os.close(fd)
        return out

    def read_positions(self, start: int, stop: int) -> torch.Tensor:
        """Positions ``start .. stop`` of all images: ``(stop - start, N, D)`` float32 (a fresh copy)."""
        block = self.read_positions_raw(start, stop).astype(np.float32, copy=False)
        offset = self._offsets()
        if offset is not None:
            block += offset[start:stop, None, :]
        return torch.from_numpy(block)

    def read_images(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start .. stop`` at every position: ``(stop - start, P, D)`` float32 (a fresh copy)."""
        n, p, d = self.shape
        if not 0 <= start <= stop <= n:
            raise ValueError(f"images {start}..{stop} are outside the store's {n} images")
        out = np.empty((p, stop - start, d), dtype=self._dtype)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            if stop > start:
                for position in range(p):
                    self._read_into(fd, out[position], self._offset(position, start))
        finally:
            os.close(fd)
        block = out.transpose(1, 0, 2).astype(np.float32)
        offset = self._offsets()
        if offset is not None:
            block += offset[None]
        return torch.from_numpy(block)

    def gather(self, flat_indices: np.ndarray | Sequence[int]) -> torch.Tensor:
        """Patches by flat index (image * P + position): ``(k, D)`` float32, in the order given."""
        n, p, d = self.shape
        flat = np.asarray(flat_indices, dtype=np.int64).reshape(-1)
        out = np.empty((flat.size, d), dtype=np.float32)
        if flat.size == 0:
            return torch.from_numpy(out)
        if flat.min() < 0 or flat.max() >= n * p:
            raise IndexError(f"flat patch indices must lie in 0..{n * p - 1}")
        rows = (flat % p) * n + flat // p  # row of the (P*N, D) disk array
        order = np.argsort(rows, kind="stable")  # ascending: each mapped block is touched once, in order
        offset = self._offsets()
        step = max(1, _GATHER_BLOCK_BYTES // (d * 4))
        for b in range(0, flat.size, step):
            chosen = order[b : b + step]
            # A map per block, dropped at once: its pages leave the process with it.
            mapped = np.memmap(self.path, dtype=self._dtype, mode="r", shape=(n * p, d))
            block = mapped[rows[chosen]].astype(np.float32)
            del mapped
            if offset is not None:  # per block: offset[flat % p] whole would be as large as the result
                block += offset[flat[chosen] % p]
            out[chosen] = block
        return torch.from_numpy(out)

    def __getitem__(self, images: int | slice | np.ndarray | Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Images as ``(k, P, D)`` float32 (an int gives ``(P, D)``), like indexing an ``(N, P, D)`` tensor."""
        n, p, _ = self.shape
        if isinstance(images, slice):
            start, stop, step = images.indices(n)
            if step == 1:
                return self.read_images(start, max(start, stop))
            images = np.arange(start, stop, step)
        if isinstance(images, (int, np.integer)):
            index = int(images) + (n if images < 0 else 0)
            return self.read_images(index, index + 1)[0]
        index = np.asarray(images.numpy() if isinstance(images, torch.Tensor) else images)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = index.astype(np.int64).reshape(-1)
        flat = (index[:, None] * p + np.arange(p)[None, :]).reshape(-1)
        return self.gather(flat).reshape(index.size, p, -1)

    def to_tensor(self) -> torch.Tensor:
        """All features as one ``(N, P, D)`` float32 tensor (for small stores: bundles, the app's views)."""
        return self.read_images(0, self.layout.n_images)

    # ------------------------------------------------------------------ side arrays
    def array_path(self, name: str) -> Path:
        """Where a named side array (projection, neighbour cache) of this store lives."""
        if not _ARRAY_NAME.match(name):
            raise ValueError(f"bad side array name {name!r}")
        return self.directory / f"{name}.bin"


class DiskArray:
    """A 2-D array in a raw file, read by slices or index arrays into fresh arrays (nothing stays mapped).

    The hand-over for arrays too big for memory (the coreset's projected patches ``(N*P, d)``, the
    neighbour cache): ``array[a:b]`` and ``array[index_array]`` return numpy arrays like a ndarray would.
    """

    def __init__(self, path: str | os.PathLike, shape: tuple[int, ...], dtype: np.dtype | str) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.dtype = np.dtype(dtype)
        self._row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    @classmethod
    def create(cls, path: str | os.PathLike, shape: tuple[int, ...], dtype: np.dtype | str) -> DiskArray:
        array = cls(path, shape, dtype)
        with open(array.path, "wb") as fh:
            fh.truncate(array.shape[0] * array._row)
        return array

    def __len__(self) -> int:
        return self.shape[0]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self._row

    def write(self, start: int, rows: np.ndarray) -> None:
        """Rows ``start .. start + len(rows)`` (positional write on a descriptor of this call)."""
        data = np.ascontiguousarray(rows, dtype=self.dtype)
        if data.shape[1:] != self.shape[1:] or not 0 <= start <= self.shape[0] - data.shape[0]:
            raise ValueError(f"rows of shape {data.shape} at {start} do not fit an array of shape {self.shape}")
        fd = os.open(self.path, os.O_WRONLY)
        try:
            view, offset = memoryview(data).cast("B"), start * self._row
            while view:
                written = os.pwrite(fd, view, offset)
                view, offset = view[written:], offset + written
        finally:
            os.close(fd)

    def _read(self, start: int, stop: int) -> np.ndarray:
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        if stop > start:
            fd = os.open(self.path, os.O_RDONLY)
            try:
                view, offset = memoryview(out).cast("B"), start * self._row
                while view:
                    got = os.preadv(fd, [view], offset)
                    if got <= 0:
                        raise FeatureStoreError(f"{self.path} is truncated")
                    view, offset = view[got:], offset + got
            finally:
                os.close(fd)
        return out

    def __getitem__(self, key: slice | np.ndarray | Sequence[int]) -> np.ndarray:
        if isinstance(key, slice):
            start, stop, step = key.indices(self.shape[0])
            block = self._read(start, max(start, stop))
            return block if step == 1 else block[::step]
        index = np.asarray(key)
        if index.dtype == bool:
            index = np.flatnonzero(index)
        index = index.astype(np.int64).reshape(-1)
        out = np.empty((index.size, *self.shape[1:]), dtype=self.dtype)
        if index.size == 0:
            return out
        if index.min() < 0 or index.max() >= self.shape[0]:
            raise IndexError(f"row indices must lie in 0..{self.shape[0] - 1}")
        order = np.argsort(index, kind="stable")
        for b in range(0, index.size, _GATHER_BLOCK):
            chosen = order[b : b + _GATHER_BLOCK]
            mapped = np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)
            out[chosen] = mapped[index[chosen]]
            del mapped
        return out

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        block = self._read(0, self.shape[0])
        return block if dtype is None else block.astype(dtype)
