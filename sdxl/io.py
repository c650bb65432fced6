"""Small I/O helpers every layer uses: atomic JSON writes and plain-text tables."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON so that readers see the old file or the new one, never a torn one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(data, handle, indent=2, sort_keys=False, default=str)
            handle.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    """A plain-text table with aligned columns, or (``markdown``) a GitHub pipe table."""
    if markdown:
        pipe = lambda cells: "| " + " | ".join(str(c).replace("|", "/") for c in cells) + " |"  # noqa: E731
        return "\n".join([pipe(header), pipe(["---"] * len(header))] + [pipe(r) for r in rows])
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    line = lambda cells: "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(r) for r in rows])
