"""Telling files apart by what they are: a safetensors header that parses, a zip archive, a pickle.

A safetensors file starts with its header length as a little-endian 64-bit integer, so its first bytes
can be anything, ``0x80`` (a pickle's first byte) or ``PK`` (a zip's) included. Formats are therefore
recognised by parsing, safetensors first: a file whose header parses and whose tensors fill the file
exactly is safetensors, whatever its first byte; only a file that is not is compared with the zip and
pickle signatures. Nothing here unpickles, decompresses or allocates more than the header.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Longest header accepted, the same limit the safetensors library applies: a bundle's header (tensor
# names, config, training file names) is well under this even for tens of thousands of training images.
MAX_HEADER_BYTES = 100_000_000
# Bytes per element of every dtype the safetensors format defines.
DTYPE_SIZES = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E5M2": 1,
    "F8_E4M3": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06", b"PK\x07\x08")  # local file header, empty archive, spanned
_PICKLE_PROTOCOLS = range(2, 6)  # protocol 2+ pickles (torch.save's legacy format) start 0x80, protocol


class NotSafetensorsError(ValueError):
    """The file is not a well-formed safetensors file; ``str()`` says what is wrong, for the caller's message."""


@dataclass(frozen=True)
class TensorEntry:
    """One tensor as the header declares it; ``start``/``end`` are byte offsets into the data section."""

    dtype: str  # a key of DTYPE_SIZES
    shape: tuple[int, ...]
    start: int
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked safetensors header: entries are well-formed, tile the data section exactly and fill the file."""

    metadata: dict[str, str]  # the free-form "__metadata__" (str -> str)
    tensors: dict[str, TensorEntry]
    data_start: int  # file offset of the data section: 8 + header length
    file_size: int


def loads_json(text: str | bytes) -> Any:
    """``json.loads`` for untrusted text: any failure is a ``ValueError`` with a short reason.

    Refuses what Python's parser would otherwise accept or crash on: NaN and Infinity literals (not JSON),
    duplicate keys (two parsers could read different values) and nesting deep enough to exhaust the stack
    (``RecursionError``).
    """

    def no_constants(name: str) -> None:
        raise ValueError(f"{name} is not a JSON value")

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        result = dict(pairs)
        if len(result) != len(pairs):
            raise ValueError("duplicate key in a JSON object")
        return result

    try:
        return json.loads(text, parse_constant=no_constants, object_pairs_hook=no_duplicates)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except (ValueError, TypeError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise ValueError(f"invalid JSON ({str(exc)[:120]})") from None


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _entry(name: str, raw: object) -> TensorEntry:
    if not isinstance(raw, dict) or set(raw) != {"dtype", "shape", "data_offsets"}:
        raise NotSafetensorsError(f"tensor {name[:80]!r} has a malformed header entry")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype not in DTYPE_SIZES:
        raise NotSafetensorsError(f"tensor {name[:80]!r} has an unknown dtype {str(dtype)[:20]!r}")
    if not isinstance(shape, list) or not all(_is_count(s) for s in shape):
        raise NotSafetensorsError(f"tensor {name[:80]!r} has a malformed shape")
    if not isinstance(offsets, list) or len(offsets) != 2 or not all(_is_count(o) for o in offsets):
        raise NotSafetensorsError(f"tensor {name[:80]!r} has malformed data offsets")
    numel = 1
    for s in shape:
        numel *= s  # Python integers: a crafted shape cannot overflow into a small size
    start, end = offsets
    if end - start != numel * DTYPE_SIZES[dtype]:
        raise NotSafetensorsError(
            f"tensor {name[:80]!r} declares shape {shape} of {dtype} but {end - start} bytes of data"
        )
    return TensorEntry(dtype, tuple(shape), start, end)


def read_safetensors_header(
    path: str | os.PathLike[str], *, max_header_bytes: int = MAX_HEADER_BYTES
) -> SafetensorsHeader:
    """Parse and check a safetensors file's header, reading nothing but the header itself.

    Checks the header length against ``max_header_bytes`` and the file size before reading it, then that
    the JSON header is an object of well-formed entries whose byte ranges tile the data section without
    gaps or overlaps and end exactly at the end of the file. Raises ``NotSafetensorsError`` otherwise.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise NotSafetensorsError(f"the file has {size} bytes, too short for a safetensors header")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise NotSafetensorsError(f"its first 8 bytes claim a {length}-byte header, more than the {size}-byte file")
        if length > max_header_bytes:
            raise NotSafetensorsError(
                f"its first 8 bytes claim a {length}-byte header, over the {max_header_bytes} accepted"
            )
        if length < 2:
            raise NotSafetensorsError(f"its first 8 bytes claim a {length}-byte header, too short for a JSON object")
        text = fh.read(length)
    if text[:1] != b"{":
        raise NotSafetensorsError("its header is not a JSON object")
    try:
        raw = loads_json(text.decode("utf-8"))  # the format says UTF-8; json.loads(bytes) would guess UTF-16 too
    except ValueError as exc:  # UnicodeDecodeError included
        raise NotSafetensorsError(f"its header is not valid: {exc}") from None
    if not isinstance(raw, dict):
        raise NotSafetensorsError("its header is not a JSON object")
    metadata = raw.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise NotSafetensorsError("its metadata is not a mapping of strings to strings")
    tensors = {name: _entry(name, entry) for name, entry in raw.items()}
    position = 0
    for name, entry in sorted(tensors.items(), key=lambda item: (item[1].start, item[1].end)):
        if entry.start != position:
            raise NotSafetensorsError(f"tensor {name[:80]!r} does not start where the previous one ends")
        position = entry.end
    data_start = 8 + length
    if data_start + position != size:
        raise NotSafetensorsError(
            f"its tensors declare {position} bytes of data but the file holds {size - data_start} (truncated or padded)"
        )
    return SafetensorsHeader(metadata, tensors, data_start, size)


def container_kind(path: str | os.PathLike[str]) -> str | None:
    """``"zip"`` or ``"pickle"`` when the file starts with that format's signature, else None.

    Only meaningful for a file that ``read_safetensors_header`` refused: a safetensors file's first
    bytes are its header length and may collide with these signatures.
    """
    with open(path, "rb") as fh:
        head = fh.read(4)
    if head in _ZIP_SIGNATURES:
        return "zip"
    if len(head) >= 2 and head[0] == 0x80 and head[1] in _PICKLE_PROTOCOLS:
        return "pickle"
    return None
