"""The submission's sample images: ``<idx>.png`` for the round's ids and ``captions.txt``, as MLPerf writes them.

MLPerf's ``accuracy_coco.py --compliance-images-path DIR --ids-path FILE`` saves the first image of
each listed ``qsl_idx`` as PNG and writes ``captions.txt`` with one ``"{idx}  {caption}"`` line (two
spaces) per id, in the ids file's order. The checker requires them for each round's ids
(``tools/sample_ids.txt``, re-rolled every round).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def read_ids(path: str | Path) -> list[int]:
    """The qsl indices of an ids file (one integer per line, blank lines ignored)."""
    path = Path(path)
    try:
        lines = path.read_text().split()
    except OSError as exc:
        raise FileNotFoundError(f"ids file {path}: {exc.strerror}") from None
    try:
        return [int(token) for token in lines]
    except ValueError:
        raise ValueError(f"{path} must hold one integer qsl_idx per line") from None


class ComplianceImageWriter:
    """An image sink (see :func:`accuracy.evaluate.evaluate_log`) writing the listed ids' PNGs."""

    def __init__(self, directory: str | Path, ids: list[int], captions: list[str]) -> None:
        self.directory = Path(directory)
        self.ids = list(ids)
        self._wanted = set(ids)
        self.written: list[int] = []
        beyond = [i for i in self.ids if i < 0 or i >= len(captions)]
        if beyond:
            raise ValueError(f"ids {beyond[:5]} are not rows of the {len(captions)}-row captions file")
        self.directory.mkdir(parents=True, exist_ok=True)
        with open(self.directory / "captions.txt", "w") as handle:
            for idx in self.ids:
                handle.write(f"{idx}  {captions[idx]}\n")

    def __call__(self, qsl_idx: int, image: np.ndarray) -> None:
        if qsl_idx in self._wanted:
            Image.fromarray(image).save(self.directory / f"{qsl_idx}.png")
            self.written.append(qsl_idx)

    def describe(self) -> dict:
        missing = sorted(self._wanted - set(self.written))
        return {"path": str(self.directory), "ids": self.ids, "written": sorted(self.written), "missing": missing}
