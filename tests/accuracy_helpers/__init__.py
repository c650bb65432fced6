"""Builders of small LoadGen accuracy logs and run.json files for the accuracy tests and benchmark."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np


def random_images(n: int, size: int, seed: int = 0) -> list[np.ndarray]:
    """``n`` smooth-ish random HxWx3 uint8 images (low-frequency noise, so SSIM/Inception see structure)."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, size=(n, max(1, size // 8), max(1, size // 8), 3), dtype=np.uint8)
    return [np.kron(c, np.ones((8, 8, 1), dtype=np.uint8))[:size, :size] for c in coarse]


def write_accuracy_log(path: Path, entries: Iterable[tuple[int, np.ndarray]], extra_keys: dict | None = None) -> Path:
    """A LoadGen-format ``mlperf_log_accuracy.json``, written entry by entry (uppercase hex, as LoadGen)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        handle.write("[\n")
        for seq, (qsl_idx, image) in enumerate(entries):
            record = {"seq_id": seq, "qsl_idx": int(qsl_idx), "data": np.ascontiguousarray(image).tobytes().hex().upper()}
            record.update(extra_keys or {})
            handle.write(("," if seq else "") + json.dumps(record) + "\n")
        handle.write("]\n")
    return path


def write_run_json(run_dir: Path, image_size: int, *, dataset_path: str | None = None, dataset_sha256: str = "d" * 64,
                   latent_sha256: str = "l" * 64, max_samples: int | None = None, random_weights: bool = True) -> Path:
    """The keys of the spine's ``run.json`` that the accuracy tools read."""
    run_dir.mkdir(parents=True, exist_ok=True)
    data = {"image_size": image_size, "random_weights": random_weights, "profile": "tiny",
            "dataset": {"path": dataset_path, "sha256": dataset_sha256, "rows": 10, "builtin": False},
            "latent": {"source": "drawn", "sha256": latent_sha256, "shape": [1, 4, 32, 32], "dtype": "float32"},
            "max_samples": max_samples,
            "backend": {"name": "torch", "dtype": "fp32", "device": "cpu", "encodings": None, "recipe": None}}
    (run_dir / "run.json").write_text(json.dumps(data))
    return run_dir / "run.json"


def write_captions_tsv(path: Path, n: int) -> Path:
    """An MLPerf-format captions TSV with ``n`` rows (qsl_idx = row)."""
    import pandas as pd

    path.parent.mkdir(parents=True, exist_ok=True)
    frame = pd.DataFrame({"id": range(100, 100 + n), "image_id": range(n), "caption": [f"a photo of object {i}" for i in range(n)],
                          "height": 480, "width": 640, "file_name": [f"COCO_val2014_{i:012d}.jpg" for i in range(n)],
                          "coco_url": "http://images.cocodataset.org/val2014/x.jpg"})
    frame.to_csv(path, sep="\t", index=False)
    return path
