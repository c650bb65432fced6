"""Small I/O helpers every layer uses: atomic JSON writes and plain-text tables."""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator


@contextlib.contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """A temporary path beside ``path`` to write; renamed onto ``path`` only when the block succeeds.

    Readers see the old file or the whole new one, never a torn one, and a crash or a signal leaves
    no partial output under the real name. The file gets the umask's mode, as ``open`` would give it
    (``mkstemp``'s 0600 would hide results from the rest of a team).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the block: one process at a time.

    For caches several processes fill at once (Ray actors on one node building the same export): the
    first builds, the others wait and then find the finished entry. The kernel drops the lock when its
    holder dies, so a killed builder never leaves the cache locked.
    """
    import fcntl

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
    with atomic_path(path) as tmp, open(tmp, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=False, default=str)
        handle.write("\n")


def write_text_atomic(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def check_writable_dir(path: Path, flag: str) -> None:
    """Create ``path`` and write a probe file in it: an unwritable output fails now, in one line, not after the work."""
    from .errors import UserError

    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file, not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        raise UserError(f"{flag} {path}: cannot write there ({exc.strerror or exc})") from None


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """A plain-text table with aligned columns, or (``markdown``) a GitHub pipe table."""
    if markdown:
        pipe = lambda cells: "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"  # noqa: E731
        return "\n".join([pipe(header), pipe(["---"] * len(header))] + [pipe(r) for r in rows])
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
