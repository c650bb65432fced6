"""Streaming reader of LoadGen's ``mlperf_log_accuracy.json``.

The file is a JSON array of ``{"seq_id", "qsl_idx", "data"}`` where ``data`` is the uppercase hex of
the SUT's raw response bytes (for SDXL: H*W*3 uint8 RGB, row-major). A full SDXL log is ~31 GB, so it
is parsed entry by entry with ijson and never held whole; only one decoded image lives at a time.
As MLPerf's ``accuracy_coco.py`` does, the first entry per ``qsl_idx`` counts and later duplicates
(LoadGen logs repeats, e.g. TEST01) are skipped.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import ijson
import numpy as np

from sdxl.errors import UserError

_READ_CHUNK = 1 << 20
#: ijson's read size: its default (64 KB) rebuilds a 6 MB hex string from ~100 pieces (bench/accuracy.py, one 1024²
#: entry: 91 ms, against 2.8 ms with 8 MB reads and 4.3 ms for json.loads); one such buffer is all it holds
_PARSE_BUFFER = 8 << 20


class AccuracyLogError(UserError, ValueError):
    """The log cannot be read as SDXL images; the message names the file and the entry."""


@dataclass
class LogStats:
    """Counters filled in while :func:`iter_accuracy_log` runs (pass one in to get them)."""

    entries: int = 0          # entries parsed, duplicates included
    images: int = 0           # distinct qsl_idx yielded
    duplicates: int = 0       # entries skipped because their qsl_idx came earlier
    sha256: str | None = None  # of the whole file, set once the file has been read to its end
    bytes: int = 0


class _HashingReader:
    """A read-only file wrapper that hashes what ijson reads, so the log is read once, not twice."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle
        self.digest = hashlib.sha256()
        self.bytes = 0

    def read(self, size: int = -1) -> bytes:
        block = self._handle.read(size)
        self.digest.update(block)
        self.bytes += len(block)
        return block

    def drain(self) -> None:
        while self.read(_READ_CHUNK):
            pass


def _describe(position: int, qsl_idx: object = None) -> str:
    where = f"entry #{position}"
    return where + (f" (qsl_idx {qsl_idx})" if qsl_idx is not None else "")


def _size_hint(nbytes: int) -> str:
    side = int(round((nbytes / 3) ** 0.5))
    if side * side * 3 == nbytes:
        return f" ({side}x{side}x3, i.e. {side}x{side} images)"
    return ""


def decode_entry(entry: object, image_size: int, position: int, path: Path) -> tuple[int, np.ndarray]:
    """One log entry -> ``(qsl_idx, HxWx3 uint8)``; :class:`AccuracyLogError` naming the entry otherwise."""
    if not isinstance(entry, dict) or "qsl_idx" not in entry or "data" not in entry:
        raise AccuracyLogError(f"{path}: {_describe(position)} is not a LoadGen accuracy entry "
                               "(expected an object with qsl_idx and data)")
    qsl_idx = entry["qsl_idx"]
    if isinstance(qsl_idx, bool) or not isinstance(qsl_idx, int) or qsl_idx < 0:
        raise AccuracyLogError(f"{path}: {_describe(position)} has an invalid qsl_idx {qsl_idx!r}")
    data = entry["data"]
    expected = image_size * image_size * 3
    if not isinstance(data, str) or len(data) != 2 * expected:
        got = len(data) // 2 if isinstance(data, str) else None
        raise AccuracyLogError(
            f"{path}: {_describe(position, qsl_idx)} holds {got} bytes{_size_hint(got or 0)}, expected {expected} "
            f"({image_size}x{image_size}x3 uint8); wrong image size (--image-size N for a log away from its "
            "run.json), or not an SDXL log")
    try:
        raw = bytes.fromhex(data)
    except ValueError:
        raise AccuracyLogError(f"{path}: {_describe(position, qsl_idx)} has a corrupt data field (not hex)") from None
    return qsl_idx, np.frombuffer(raw, dtype=np.uint8).reshape(image_size, image_size, 3)


def iter_accuracy_log(path: str | Path, image_size: int, stats: LogStats | None = None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(qsl_idx, image)`` for each distinct ``qsl_idx`` of a LoadGen accuracy log, in file order.

    ``image`` is a read-only ``(image_size, image_size, 3)`` uint8 RGB array. The first entry per
    ``qsl_idx`` counts; later duplicates are skipped (and counted in ``stats``). Unknown keys (e.g.
    LoadGen's ``token_count``) are ignored. A truncated or corrupt file, or an entry whose size is not
    ``image_size``² × 3, raises :class:`AccuracyLogError` naming the entry. Memory stays at one image.
    ``stats.sha256`` is set when the file has been read to its end (after the last yield).
    """
    path = Path(path)
    stats = stats if stats is not None else LogStats()
    seen: set[int] = set()
    position = -1
    try:
        handle = open(path, "rb")
    except OSError as exc:
        raise AccuracyLogError(f"cannot open accuracy log {path}: {exc.strerror}") from None
    with handle:
        reader = _HashingReader(handle)
        try:
            for position, entry in enumerate(ijson.items(reader, "item", use_float=True, buf_size=_PARSE_BUFFER)):
                stats.entries += 1
                qsl_idx, image = decode_entry(entry, image_size, position, path)
                if qsl_idx in seen:
                    stats.duplicates += 1
                    continue
                seen.add(qsl_idx)
                stats.images += 1
                yield qsl_idx, image
        except ijson.JSONError as exc:
            after = f"after entry #{position}" if position >= 0 else "before the first entry"
            raise AccuracyLogError(f"{path}: truncated or corrupt JSON {after} (entry #{position + 1} unreadable: "
                                   f"{str(exc).strip().splitlines()[0][:120]})") from None
        reader.drain()
        stats.sha256 = reader.digest.hexdigest()
        stats.bytes = reader.bytes
