"""prepare-dataset: MLPerf's tools/coco.py and coco_calibration.py flows on annotation files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from accuracy.prepare_dataset import prepare_dataset
from sdxl.dataset import CALIBRATION_IDS_FILE, read_calibration_ids

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "mlperf"


def _image(image_id: int) -> dict:
    return {"id": image_id, "file_name": f"COCO_val2014_{image_id:012d}.jpg", "height": 480 + image_id, "width": 640,
            "coco_url": f"http://images.cocodataset.org/val2014/COCO_val2014_{image_id:012d}.jpg",
            "license": 1, "date_captured": "2013-11-14", "flickr_url": "http://farm.example/x.jpg"}


def _write_annotations(path: Path, annotations: list[dict], image_ids: list[int]) -> Path:
    path.write_text(json.dumps({"info": {}, "licenses": [], "images": [_image(i) for i in image_ids],
                                "annotations": annotations}))
    return path


SYNTHETIC = [  # file order matters: the first annotation of an image is kept, not the lowest id
    {"id": 50, "image_id": 1, "caption": "A dog\n on grass. "},
    {"id": 10, "image_id": 1, "caption": "dropped: second annotation of image 1"},
    {"id": 30, "image_id": 2, "caption": "  Two cats"},
    {"id": 20, "image_id": 3, "caption": "A red bus\n"},
    {"id": 40, "image_id": 2, "caption": "dropped: second annotation of image 2"},
]


def test_synthetic_validation_rows_derived_by_hand(tmp_path):
    # dedup by image_id keeping the first in file order -> ids 50 (img 1), 30 (img 2), 20 (img 3);
    # all three kept (max 5000), newlines removed and stripped, merged with image metadata, sorted by id.
    annotations = _write_annotations(tmp_path / "captions_val2014.json", SYNTHETIC, [1, 2, 3])
    written = prepare_dataset(tmp_path / "coco", annotations)
    frame = pd.read_csv(written["captions"], sep="\t")
    assert list(frame.columns) == ["id", "image_id", "caption", "height", "width", "file_name", "coco_url"]
    assert frame["id"].tolist() == [20, 30, 50]
    assert frame["image_id"].tolist() == [3, 2, 1]
    assert frame["caption"].tolist() == ["A red bus", "Two cats", "A dog on grass."]
    assert frame["height"].tolist() == [483, 482, 481]
    assert frame["file_name"][0] == "COCO_val2014_000000000003.jpg"


def test_shuffle_with_seed_2023_then_keep_the_first_n(tmp_path):
    annotations = [{"id": 10 * k, "image_id": k, "caption": f"c{k}"} for k in range(1, 6)]
    path = _write_annotations(tmp_path / "a.json", annotations, list(range(1, 6)))
    frame = pd.read_csv(prepare_dataset(tmp_path / "out", path, max_images=2)["captions"], sep="\t")
    order = np.random.RandomState(2023).permutation(5)  # what pandas' sample(frac=1, random_state=2023) draws
    assert sorted(10 * (order[:2] + 1)) == frame["id"].tolist() == [10, 40]


def test_calibration_rows_are_the_listed_train_annotation_ids(tmp_path):
    ids = read_calibration_ids()
    assert len(ids) == 500 and len(set(ids)) == 500
    annotations = [{"id": i, "image_id": 1000 + n, "caption": f"cal {i}\n"} for n, i in enumerate(reversed(ids))]
    annotations += [{"id": 999_999_999, "image_id": 1000, "caption": "not in the list"}]
    train = _write_annotations(tmp_path / "captions_train2014.json", annotations, [1000 + n for n in range(500)])
    val = _write_annotations(tmp_path / "captions_val2014.json", SYNTHETIC, [1, 2, 3])
    written = prepare_dataset(tmp_path / "coco", val, calibration_annotations_path=train)
    frame = pd.read_csv(written["calibration"], sep="\t")
    assert frame["id"].tolist() == sorted(ids)
    assert frame["caption"].str.startswith("cal ").all() and not frame["caption"].str.contains("\n").any()


def test_calibration_ids_missing_from_the_file_are_an_error(tmp_path):
    val = _write_annotations(tmp_path / "val.json", SYNTHETIC, [1, 2, 3])
    with pytest.raises(ValueError, match="calibration ids .* not in the annotations file"):
        prepare_dataset(tmp_path / "coco", val, calibration_annotations_path=val)


def test_shipped_calibration_list_is_mlperfs():
    if not (SHARED / "coco_cal_captions_list.txt").is_file():
        pytest.skip(f"MLPerf reference files not found at {SHARED}")
    assert CALIBRATION_IDS_FILE.read_bytes() == (SHARED / "coco_cal_captions_list.txt").read_bytes()


def test_real_captions_source_tsv_round_trips(tmp_path):
    source = SHARED / "captions_source.tsv"
    if not source.is_file():
        pytest.skip(f"MLPerf reference files not found at {SHARED}")
    frame = pd.read_csv(source, sep="\t", keep_default_na=False)
    annotations = [{"id": int(r.id), "image_id": int(r.image_id), "caption": r.caption + (" \n" if r.id % 3 == 0 else "")}
                   for r in frame.itertuples()]
    # a second caption per image, later in the file: dropped by the dedup
    annotations += [{"id": int(r.id) + 1, "image_id": int(r.image_id), "caption": "second caption"}
                    for r in frame.iloc[::7].itertuples()]
    images = [{"id": int(r.image_id), "file_name": r.file_name, "coco_url": r.coco_url, "height": int(r.height),
               "width": int(r.width), "license": 3, "date_captured": "2013"} for r in frame.itertuples()]
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations}))
    written = prepare_dataset(tmp_path / "coco", path)
    assert Path(written["captions"]).read_bytes() == source.read_bytes()
