"""The streaming accuracy-log reader: LoadGen's format, duplicates, truncation, corruption, sizes."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from accuracy_helpers import random_images, write_accuracy_log

from accuracy.log_reader import AccuracyLogError, LogStats, iter_accuracy_log


@pytest.fixture
def images():
    return random_images(4, 16, seed=3)


def test_first_entry_per_qsl_idx_counts_and_duplicates_are_skipped(tmp_path, images):
    log = write_accuracy_log(tmp_path / "log.json", [(2, images[0]), (0, images[1]), (2, images[2]), (1, images[3])],
                             extra_keys={"token_count": 1})
    stats = LogStats()
    got = list(iter_accuracy_log(log, 16, stats))
    assert [idx for idx, _ in got] == [2, 0, 1]
    for (_, image), expected in zip(got, (images[0], images[1], images[3])):
        assert image.shape == (16, 16, 3) and image.dtype == np.uint8
        np.testing.assert_array_equal(image, expected)
    assert (stats.entries, stats.images, stats.duplicates) == (4, 3, 1)
    assert stats.sha256 == hashlib.sha256(log.read_bytes()).hexdigest() and stats.bytes == log.stat().st_size


def test_lowercase_hex_is_accepted(tmp_path, images):
    log = tmp_path / "log.json"
    log.write_text(json.dumps([{"seq_id": 0, "qsl_idx": 5, "data": images[0].tobytes().hex()}]))
    [(idx, image)] = list(iter_accuracy_log(log, 16))
    assert idx == 5 and np.array_equal(image, images[0])


def test_truncated_tail_names_the_unreadable_entry(tmp_path, images):
    log = write_accuracy_log(tmp_path / "log.json", [(i, im) for i, im in enumerate(images)])
    log.write_bytes(log.read_bytes()[:-200])
    reader = iter_accuracy_log(log, 16)
    assert [next(reader)[0] for _ in range(3)] == [0, 1, 2]  # the good entries still stream before the error
    with pytest.raises(AccuracyLogError, match=r"truncated or corrupt JSON after entry #2 \(entry #3 unreadable"):
        next(reader)


def test_wrong_image_size_names_entry_and_the_size_it_looks_like(tmp_path, images):
    log = write_accuracy_log(tmp_path / "log.json", [(7, images[0])])
    with pytest.raises(AccuracyLogError, match=r"entry #0 \(qsl_idx 7\) holds 768 bytes \(16x16x3.*expected 3072"):
        list(iter_accuracy_log(log, 32))


def test_corrupt_hex_and_non_loadgen_entries(tmp_path):
    log = tmp_path / "log.json"
    log.write_text(json.dumps([{"seq_id": 0, "qsl_idx": 0, "data": "ZZ" * 12}]))
    with pytest.raises(AccuracyLogError, match=r"entry #0 \(qsl_idx 0\) has a corrupt data field"):
        list(iter_accuracy_log(log, 2))
    log.write_text(json.dumps([{"seq_id": 0, "data": "00"}]))
    with pytest.raises(AccuracyLogError, match="entry #0 is not a LoadGen accuracy entry"):
        list(iter_accuracy_log(log, 2))
    log.write_text(json.dumps([{"qsl_idx": -1, "data": "00"}]))
    with pytest.raises(AccuracyLogError, match="invalid qsl_idx -1"):
        list(iter_accuracy_log(log, 2))


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(AccuracyLogError, match="cannot open accuracy log"):
        list(iter_accuracy_log(tmp_path / "absent.json", 2))
