"""MLPerf's captions TSV: reading, validating, and the built-in caption set of the tiny profile.

The TSV (``coco2014/captions/captions_source.tsv`` in the reference) has the columns
``id image_id caption height width file_name coco_url``; its row order is the ``qsl_idx`` that LoadGen
logs and that the accuracy script uses to find each image's caption. A bad file is reported here,
before any model is built or LoadGen starts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .benchmark_spec import CAPTIONS_TSV_COLUMNS
from .errors import UserError

BUILTIN_CAPTIONS = Path(__file__).parent / "data" / "builtin_captions.tsv"
#: MLPerf's calibration set: 500 COCO train2014 *annotation* ids (``coco_cal_captions_list.txt``)
CALIBRATION_IDS_FILE = Path(__file__).parent / "data" / "coco_cal_captions_list.txt"
HOW_TO_GET_CAPTIONS = ("MLPerf's file is text_to_image/coco2014/captions/captions_source.tsv in mlcommons/inference "
                       "(or run its tools/download-coco-2014.sh)")


class DatasetError(UserError, ValueError):
    """A captions file that cannot be used; the message names the file and the problem."""


@dataclass(frozen=True)
class CaptionSet:
    path: Path
    sha256: str
    frame: pd.DataFrame  # one row per qsl_idx, in file order
    builtin: bool = False

    def __len__(self) -> int:
        return len(self.frame)

    @property
    def captions(self) -> list[str]:
        return self.frame["caption"].tolist()

    def describe(self) -> dict:
        return {"path": str(self.path), "sha256": self.sha256, "rows": len(self), "builtin": self.builtin}


def resolve_captions_path(path: str | Path | None) -> Path:
    """``--dataset-path``: the TSV itself, or a reference-layout directory holding ``captions/captions.tsv``."""
    if path is None:
        return BUILTIN_CAPTIONS
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "captions" / "captions.tsv", path / "captions" / "captions_source.tsv", path / "captions.tsv"):
            if candidate.is_file():
                return candidate
        raise DatasetError(f"{path} is a directory without captions/captions.tsv; {HOW_TO_GET_CAPTIONS}")
    if not path.is_file():
        raise DatasetError(f"captions file {path} not found; {HOW_TO_GET_CAPTIONS}")
    return path


def file_sha256(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_captions_tsv(file: Path, columns: tuple[str, ...] = CAPTIONS_TSV_COLUMNS) -> pd.DataFrame:
    """The one reader of a captions TSV (the benchmark's, or the calibration set's); captions as text.

    Checks what both uses need: the file parses, has ``columns``, has rows, and no caption is empty.
    """
    try:
        frame = pd.read_csv(file, sep="\t", dtype={"caption": str}, keep_default_na=False)
    except UnicodeDecodeError:
        raise DatasetError(f"cannot read captions file {file}: {_first_non_utf8(file)}") from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise DatasetError(f"cannot read captions file {file}: {exc}") from None
    _check_row_count(file, frame)
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DatasetError(f"{file} lacks column(s) {', '.join(missing)}; expected the MLPerf TSV header "
                           f"{' '.join(CAPTIONS_TSV_COLUMNS)}")
    if frame.empty:
        raise DatasetError(f"{file} has a header but no rows")
    empty = frame.index[frame["caption"].str.strip() == ""].tolist()
    if empty:
        raise DatasetError(f"{file}: empty caption in row(s) {_rows(empty)} (qsl_idx)")
    return frame


def _first_non_utf8(file: Path) -> str:
    """Where a file stops being UTF-8, as line and column (pandas reports a byte offset in its buffer)."""
    lines = file.read_bytes().split(b"\n")
    header = lines[0].decode("utf-8", errors="replace").rstrip("\r").split("\t")
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as exc:
            field = line[:exc.start].count(b"\t")
            name = header[field] if number > 1 and field < len(header) else f"field {field + 1}"
            where = f"line {number}" + (f" (row {number - 2}, column {name})" if number > 1 else " (the header)")
            return f"not UTF-8 at {where}, byte {exc.start + 1} of the line (0x{line[exc.start]:02x})"
    return "not UTF-8"


def _check_row_count(file: Path, frame: pd.DataFrame) -> None:
    """Fail when the rows parsed are not the file's data lines: a quote swallowed a row separator.

    pandas' default quoting stays (it is MLPerf's own read, and 8 of its 5000 captions are CSV-quoted),
    but a caption that opens an unbalanced ``"`` silently merges the rows up to the next quote.
    """
    data_lines = sum(1 for line in file.read_bytes().split(b"\n")[1:] if line.strip())
    if len(frame) == data_lines:
        return
    merged = frame.index[frame["caption"].astype(str).str.contains("[\n\t]", regex=True)].tolist()
    where = ""
    if merged:
        line = 2 + merged[0] + int(frame["caption"].iloc[: merged[0]].astype(str).str.count("\n").sum())
        where = f"; the caption of row {merged[0]} (line {line}) opens a quote that runs over a row separator"
    raise DatasetError(f"{file}: {len(frame)} rows parsed from {data_lines} data lines{where}")


def load_captions(path: str | Path | None = None, max_samples: int | None = None) -> CaptionSet:
    """Read and validate MLPerf's captions TSV; ``max_samples`` keeps the first N rows (qsl_idx 0..N-1)."""
    file = resolve_captions_path(path)
    frame = read_captions_tsv(file)
    duplicated = frame.index[frame["id"].duplicated()].tolist()
    if duplicated:
        raise DatasetError(f"{file}: duplicate id {frame['id'][duplicated[0]]} in row(s) {_rows(duplicated)} (qsl_idx)")
    if max_samples is not None:
        if max_samples < 1:
            raise DatasetError(f"--max-samples must be >= 1 (got {max_samples})")
        frame = frame.iloc[:max_samples]
    return CaptionSet(file, file_sha256(file), frame.reset_index(drop=True), builtin=file == BUILTIN_CAPTIONS)


def read_calibration_ids(path: str | Path = CALIBRATION_IDS_FILE) -> list[int]:
    return [int(token) for token in Path(path).read_text().split()]


def _rows(indices: list[int], limit: int = 5) -> str:
    shown = ", ".join(str(i) for i in indices[:limit])
    return shown + (f" and {len(indices) - limit} more" if len(indices) > limit else "")
