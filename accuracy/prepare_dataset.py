"""``prepare-dataset``: MLPerf's COCO-2014 captions TSVs from the COCO annotation files, offline.

Validation (``tools/coco.py``, the branch used when no TSV exists): from ``captions_val2014.json``
drop duplicate ``image_id`` keeping the first (file order), sort by annotation id, shuffle with
``sample(frac=1, random_state=2023)``, keep the first 5000, strip newlines, merge the image
metadata, sort by id -> ``DIR/captions/captions.tsv``. Calibration (``tools/coco_calibration.py``):
the train2014 annotations whose ids are in MLPerf's ``coco_cal_captions_list.txt`` (shipped in
``accuracy/data``), sorted by id, same clean-up -> ``DIR/calibration/captions.tsv``. Those ids are
train2014 annotation ids, not rows of the validation TSV.
"""

from __future__ import annotations

import contextlib
import io
from pathlib import Path

import numpy as np
import pandas as pd

from sdxl.benchmark_spec import CAPTIONS_TSV_COLUMNS
from sdxl.dataset import CALIBRATION_IDS_FILE, read_calibration_ids

SEED = 2023
MAX_IMAGES = 5000


def load_annotations(path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(annotations, images)`` frames of a COCO captions file, read with pycocotools as MLPerf's flow does."""
    from pycocotools.coco import COCO

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotations file {path} not found (captions_val2014.json / captions_train2014.json "
                                "are in http://images.cocodataset.org/annotations/annotations_trainval2014.zip)")
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints progress to stdout
            coco = COCO(str(path))
    except (ValueError, AssertionError, KeyError) as exc:
        raise ValueError(f"{path} is not a COCO captions annotation file ({exc})") from None
    missing = [key for key in ("annotations", "images") if key not in coco.dataset]
    if missing:
        raise ValueError(f"{path} lacks {', '.join(missing)}: not a COCO captions annotation file")
    return pd.DataFrame(coco.dataset["annotations"]), pd.DataFrame(coco.dataset["images"])


def _clean_and_merge(annotations: pd.DataFrame, images: pd.DataFrame) -> pd.DataFrame:
    annotations = annotations.copy()
    annotations["caption"] = annotations["caption"].apply(lambda text: text.replace("\n", "").strip())
    merged = (annotations.merge(images, how="inner", left_on="image_id", right_on="id")
              .drop(["id_y"], axis=1).rename(columns={"id_x": "id"})
              .sort_values(by=["id"]).reset_index(drop=True))
    return merged[list(CAPTIONS_TSV_COLUMNS)]


def validation_captions(annotations: pd.DataFrame, images: pd.DataFrame, max_images: int = MAX_IMAGES,
                        seed: int = SEED) -> pd.DataFrame:
    """The validation rows in MLPerf's order (see the module doc), ``CAPTIONS_TSV_COLUMNS`` only."""
    chosen = annotations.drop_duplicates(subset=["image_id"], keep="first").sort_values(by=["id"])
    chosen = chosen.sample(frac=1, random_state=seed).reset_index(drop=True).iloc[:max_images]
    return _clean_and_merge(chosen, images)


def calibration_captions(annotations: pd.DataFrame, images: pd.DataFrame, ids: list[int]) -> pd.DataFrame:
    """The train2014 annotations listed in ``ids``, sorted by id, cleaned and merged."""
    chosen = annotations[np.isin(annotations["id"], ids)].sort_values(by=["id"])
    missing = sorted(set(ids) - set(chosen["id"]))
    if missing:
        raise ValueError(f"{len(missing)} calibration ids (e.g. {missing[:3]}) are not in the annotations file; "
                         "coco_cal_captions_list.txt holds captions_train2014.json annotation ids")
    return _clean_and_merge(chosen, images)


def write_tsv(frame: pd.DataFrame, path: Path) -> None:
    """Tab-separated, header, no index: byte-compatible with the reference's ``to_csv(sep="\\t")``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_csv(path, sep="\t", index=False)


def prepare_dataset(output: str | Path, annotations_path: str | Path, calibration_annotations_path: str | Path | None = None,
                    max_images: int = MAX_IMAGES, calibration_ids_path: str | Path = CALIBRATION_IDS_FILE) -> dict[str, str]:
    """Write ``captions/captions.tsv`` (and ``calibration/captions.tsv``) under ``output``; their paths."""
    output = Path(output)
    written = {}
    annotations, images = load_annotations(annotations_path)
    validation = validation_captions(annotations, images, max_images)
    write_tsv(validation, output / "captions" / "captions.tsv")
    written["captions"] = str(output / "captions" / "captions.tsv")
    if calibration_annotations_path is not None:
        annotations, images = load_annotations(calibration_annotations_path)
        calibration = calibration_captions(annotations, images, read_calibration_ids(calibration_ids_path))
        write_tsv(calibration, output / "calibration" / "captions.tsv")
        written["calibration"] = str(output / "calibration" / "captions.tsv")
    return written
