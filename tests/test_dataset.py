"""The captions TSV: MLPerf's real file, the built-in set, and every kind of bad file."""

import pytest

from sdxl.benchmark_spec import OFFICIAL_CAPTIONS_SHA256
from sdxl.dataset import BUILTIN_CAPTIONS, DatasetError, load_captions

HEADER = "id\timage_id\tcaption\theight\twidth\tfile_name\tcoco_url\n"


def test_official_captions(mlperf_dir):
    captions = load_captions(mlperf_dir / "captions_source.tsv")
    assert len(captions) == 5000 and captions.sha256 == OFFICIAL_CAPTIONS_SHA256
    assert captions.frame["id"].is_monotonic_increasing  # MLPerf sorts by annotation id: row = qsl_idx
    assert load_captions(mlperf_dir / "captions_source.tsv", max_samples=10).captions == captions.captions[:10]


def test_reference_layout_directory(tmp_path):
    (tmp_path / "captions").mkdir()
    (tmp_path / "captions" / "captions.tsv").write_text(BUILTIN_CAPTIONS.read_text())
    assert load_captions(tmp_path).captions == load_captions().captions


def test_builtin_set():
    captions = load_captions()
    assert captions.builtin and len(captions) == 16 and all(c.strip() for c in captions.captions)


@pytest.mark.parametrize("body, message", [
    ("id\timage_id\tcaption\n1\t2\ta cat\n", "lacks column"),
    (HEADER + "1\t2\t\t512\t512\tf.jpg\tu\n", r"empty caption in row\(s\) 0"),
    (HEADER + "1\t2\ta cat\t512\t512\tf.jpg\tu\n1\t3\ta dog\t512\t512\tg.jpg\tu\n", r"duplicate id 1 in row\(s\) 1"),
    (HEADER, "no rows"),
    ("", "cannot read"),
])
def test_bad_files_are_clear_errors(tmp_path, body, message):
    path = tmp_path / "captions.tsv"
    path.write_text(body)
    with pytest.raises(DatasetError, match=message):
        load_captions(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(DatasetError, match="not found"):
        load_captions(tmp_path / "nope.tsv")
    with pytest.raises(DatasetError, match="captions/captions.tsv"):
        load_captions(tmp_path)
    with pytest.raises(DatasetError, match="max-samples"):
        load_captions(max_samples=0)
