"""Benchmark of the accuracy command's memory and speed: streamed vs the reference's whole-JSON read.

Generates LoadGen-format logs of 10 and 50 random 1024x1024 entries, then in a fresh process each:
(a) our streaming audit (``accuracy.report.audit_log`` with random Inception/CLIP networks) and
(b) the reference's default read (``json.load`` of the whole file + ``bytes.fromhex`` per entry).
Reports peak RSS, RSS growth above the after-model-load level, and images/s.
Goal (issue 4): streamed RSS growth from 10 to 50 images < 20 MB; whole-JSON grows ~250 MB.

    .venv/bin/python bench/accuracy.py [--sizes 10 50] [--workdir build/bench-accuracy]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from sdxl.system_info import peak_rss_mb, rss_mb  # noqa: E402


def child(mode: str, log: str, captions: str) -> dict:
    """Runs in a fresh process: one measurement."""
    import numpy as np

    from accuracy.evaluators import build_evaluators
    from accuracy.report import AuditOptions, audit_log

    evaluators = build_evaluators(fid=True, clip=True, random_weights=True)
    base = rss_mb()
    start = time.perf_counter()
    if mode == "stream":
        result = audit_log(log, dataset_path=captions, options=AuditOptions(random_weights=True, missing="na"),
                           evaluators=evaluators)
        n = result["n_images"]
    else:  # the reference's default: the whole JSON in memory, decode every entry, then the same networks
        import csv

        with open(captions) as handle:
            texts = [row["caption"] for row in csv.DictReader(handle, delimiter="\t")]
        with open(log) as handle:
            entries = json.load(handle)
        images = [np.frombuffer(bytes.fromhex(e["data"]), np.uint8).reshape(1024, 1024, 3) for e in entries]
        for i in range(0, len(images), 8):
            evaluators.inception(images[i:i + 8])
            evaluators.clip(images[i:i + 8], [texts[e["qsl_idx"]] for e in entries[i:i + 8]])
        n = len(images)
    elapsed = time.perf_counter() - start
    return {"mode": mode, "images": n, "seconds": elapsed, "images_per_s": n / elapsed,
            "rss_after_load_mb": base, "peak_rss_mb": peak_rss_mb(), "growth_mb": peak_rss_mb() - base}


def parse_ms(log: Path, repeats: int = 3) -> dict[str, float]:
    """ms to parse one 1024^2 entry: ijson with its default 64 KB reads, with the reader's 8 MB reads, json.loads."""
    import io

    import ijson

    with open(log, "rb") as handle:
        first = next(ijson.items(handle, "item", buf_size=8 << 20))
    blob = json.dumps([first]).encode()
    ways = {"ijson 64 KB reads": lambda: list(ijson.items(io.BytesIO(blob), "item")),
            "ijson 8 MB reads": lambda: list(ijson.items(io.BytesIO(blob), "item", buf_size=8 << 20)),
            "json.loads": lambda: json.loads(blob)}
    out = {}
    for name, way in ways.items():
        way()
        out[name] = min(_timed(way) for _ in range(repeats)) * 1e3
    return out


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def make_log(path: Path, n: int) -> None:
    from accuracy_helpers import random_images, write_accuracy_log

    if not path.is_file():
        write_accuracy_log(path, ((i, random_images(1, 1024, seed=i)[0]) for i in range(n)))


def make_captions(path: Path, n: int) -> None:
    """A captions TSV in MLPerf's columns with one row per log entry (CLIP scores each against its row)."""
    rows = ["id\timage_id\tcaption\theight\twidth\tfile_name\tcoco_url"]
    rows += [f"{i}\t{i}\ta photo number {i}\t1024\t1024\tCOCO_val2014_{i:012d}.jpg\thttp://x/{i}.jpg" for i in range(n)]
    path.write_text("\n".join(rows) + "\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--workdir", default=str(REPO / "build" / "bench-accuracy"))
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    captions = workdir / "captions.tsv"
    make_captions(captions, max(args.sizes))
    for n in args.sizes:
        log = workdir / f"log_{n}.json"
        make_log(log, n)
        for mode in ("stream", "whole-json"):
            out = subprocess.run([sys.executable, __file__, "--child", mode, str(log), str(captions)], check=True,
                                 capture_output=True, text=True, env={"SDXL_BENCH_NO_PROGRESS": "1", **__import__("os").environ})
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
            print(json.dumps(rows[-1]))
    print("parse one entry (ms): " + ", ".join(f"{k} {v:.1f}" for k, v in parse_ms(workdir / f"log_{args.sizes[0]}.json").items()))
    for mode in ("stream", "whole-json"):
        growth = [r["growth_mb"] for r in rows if r["mode"] == mode]
        if len(growth) >= 2:
            print(f"{mode}: RSS growth {growth[0]:.0f} MB -> {growth[-1]:.0f} MB "
                  f"(+{growth[-1] - growth[0]:.0f} MB from {args.sizes[0]} to {args.sizes[-1]} images)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
