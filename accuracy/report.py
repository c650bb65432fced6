"""``accuracy.json`` / ``accuracy.txt`` of a log, and :func:`evaluate_run`, the spine's end-of-run hook.

``accuracy.txt`` is what MLPerf's submission checker reads: the reference's stdout line
``Accuracy Results: {'FID_SCORE': '...', 'CLIP_SCORE': '...'}`` plus ``hash=<sha256 of the log>``.
``accuracy.json`` holds everything a later tool needs (fields: docs/accuracy.md).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from sdxl.dataset import DatasetError, load_captions

from .compliance_images import ComplianceImageWriter, read_ids
from .evaluate import evaluate_log
from .evaluators import RANDOM_WEIGHTS_REASON, RANDOM_WEIGHTS_WARNING, Evaluators, build_evaluators
from .fid import FidUndefined, frechet_distance, load_statistics
from .log_reader import AccuracyLogError
from .run_info import RunInfoError, load_run_info
from .spec import official_image_size, official_sample_count, statistics_info, window
from .verdict import mlperf_verdict

LOG_NAME = "mlperf_log_accuracy.json"
ACCURACY_JSON_VERSION = 1
#: Everything that means "these inputs cannot be audited" (a user-fixable problem, not a bug).
INPUT_ERRORS = (AccuracyLogError, RunInfoError, DatasetError, FileNotFoundError, ValueError)


@dataclass
class AuditOptions:
    """How to evaluate: weights, FID statistics, device, and what to do when something is missing.

    ``missing="error"`` raises on absent weights/statistics (stand-alone commands); ``"na"`` reports
    the metric as N/A with the how-to line and carries on (end of ``run --accuracy``).
    """

    statistics_path: str | None = None
    random_weights: bool = False
    inception_weights: str | None = None
    clip_weights: str | None = None
    device: str = "cpu"
    batch_size: int = 8
    image_size: int | None = None  # --image-size: overrides run.json's (a log copied away from its run)
    missing: str = "error"


def statistics_how_to() -> str:
    info = statistics_info()
    return f"no FID statistics given (--statistics-path); MLPerf's is {info['file_name']}: {info['where']}"


def mlperf_results_line(fid: float | None, clip_score: float | None) -> str:
    """The reference's stdout line; values quoted as the checker's regexes accept, 'N/A' when absent."""
    value = lambda v: "N/A" if v is None else str(float(v))  # noqa: E731
    return f"Accuracy Results: {{'FID_SCORE': '{value(fid)}', 'CLIP_SCORE': '{value(clip_score)}'}}"


def _load_statistics(options: AuditOptions) -> tuple[Any, str | None, dict | None]:
    """(``(mu, sigma)`` or None, why not, description)."""
    if options.statistics_path is None:
        return None, statistics_how_to(), None
    from .weights import file_sha256

    path = Path(options.statistics_path)
    try:
        stats = load_statistics(path)
    except (FileNotFoundError, ValueError) as exc:
        if options.missing == "error":
            raise
        return None, str(exc), {"path": str(path)}
    return stats, None, {"path": str(path.resolve()), "sha256": file_sha256(path)}


def load_caption_list(dataset_path: str | Path | None, run_info, options: AuditOptions) -> tuple[list[str] | None, dict | None, str | None]:
    path = dataset_path or run_info.dataset.get("path")
    if path is None:
        note = "no --dataset-path and no run.json naming the captions file"
        if options.missing == "error":
            raise DatasetError(note + " (CLIP needs each image's caption)")
        return None, None, note
    captions = load_captions(path)
    return captions.captions, captions.describe(), None


def audit_log(log_path: str | Path, *, dataset_path: str | Path | None = None, output_dir: str | Path | None = None,
              options: AuditOptions | None = None, compliance_images_path: str | Path | None = None,
              ids_path: str | Path | None = None, evaluators: Evaluators | None = None) -> dict[str, Any]:
    """FID, CLIP score and MLPerf verdict of one accuracy log; writes ``accuracy.json``/``.txt`` to ``output_dir``.

    Raises one of :data:`INPUT_ERRORS` (or :class:`accuracy.weights.WeightsUnavailable`) for inputs
    that cannot be audited. ``evaluators`` lets a caller that audits several logs build the networks once.
    """
    options = options or AuditOptions()
    log_path = Path(log_path)
    if not log_path.is_file():
        raise FileNotFoundError(f"accuracy log {log_path} not found")
    run_info = load_run_info(log_path, options.image_size)
    image_size = run_info.image_size
    if run_info.data.get("profile") == "testbed":
        return _audit_testbed(log_path, run_info, dataset_path, options, output_dir)
    statistics, fid_note, statistics_desc = _load_statistics(options)
    captions, dataset_desc, caption_note = load_caption_list(dataset_path, run_info, options)
    if evaluators is None:
        evaluators = build_evaluators(fid=statistics is not None, clip=captions is not None,
                                      random_weights=options.random_weights, inception_weights=options.inception_weights,
                                      clip_weights=options.clip_weights, device=options.device, missing=options.missing)
    sinks = []
    compliance = None
    if compliance_images_path is not None:
        if ids_path is None or captions is None:
            raise ValueError("--compliance-images-path needs --ids-path and the captions (--dataset-path)")
        compliance = ComplianceImageWriter(compliance_images_path, read_ids(ids_path), captions)
        sinks.append(compliance)
    evaluation = evaluate_log(log_path, image_size, captions=captions,
                              inception=evaluators.inception if statistics is not None else None,
                              clip=evaluators.clip, sinks=tuple(sinks), batch_size=options.batch_size)
    fid = None
    if statistics is not None and evaluation.gaussian is not None:
        try:
            fid = frechet_distance(evaluation.gaussian.mean, evaluation.gaussian.covariance, *statistics)
        except FidUndefined as exc:
            fid_note = str(exc)
    elif statistics is not None:
        fid_note = evaluators.fid_note
    clip_score = evaluation.clip_score
    clip_note = caption_note if captions is None else (evaluators.clip_note if clip_score is None else None)

    not_comparable = ([RANDOM_WEIGHTS_REASON] if options.random_weights else []) + evaluators.unofficial_weights()
    verdict = mlperf_verdict(fid=fid, clip_score=clip_score, n_images=evaluation.n_images, image_size=image_size,
                             comparable=not not_comparable, fid_note=fid_note, clip_note=clip_note,
                             not_comparable_reason="; ".join(not_comparable))
    result: dict[str, Any] = {
        "accuracy_json_version": ACCURACY_JSON_VERSION,
        "fid": fid,
        "clip_score": clip_score,
        "fid_note": fid_note if fid is None else None,
        "clip_score_note": clip_note if clip_score is None else None,
        "n_images": evaluation.n_images,
        "n_entries": evaluation.stats.entries,
        "duplicates_skipped": evaluation.stats.duplicates,
        "image_size": image_size,
        "image_size_source": run_info.image_size_source,
        "window": {"fid": window("fid").as_list(), "clip_score": window("clip_score").as_list(),
                   "applies_to": {"image_size": official_image_size(), "n_images": official_sample_count()}},
        "fid_in_window": None if fid is None else window("fid").contains(fid),
        "clip_score_in_window": None if clip_score is None else window("clip_score").contains(clip_score),
        "verdict": verdict.status,
        "verdict_reason": verdict.reason,
        "comparable": not not_comparable,
        "not_comparable_reasons": not_comparable,
        "random_weights": options.random_weights,
        "model_random_weights": run_info.model_random_weights,
        "weights": evaluators.describe_weights(),
        "statistics": statistics_desc,
        "log": {"path": str(log_path.resolve()), "sha256": evaluation.stats.sha256, "bytes": evaluation.stats.bytes},
        "dataset": dataset_desc,
        "run": run_info.describe(),
        "compliance_images": compliance.describe() if compliance else None,
        "mlperf_results_line": mlperf_results_line(fid, clip_score),
    }
    if output_dir is not None:
        write_accuracy_outputs(result, Path(output_dir))
    return result


def _audit_testbed(log_path: Path, run_info, dataset_path, options: AuditOptions, output_dir) -> dict[str, Any]:
    """A testbed run's ``accuracy.json``: the testbed metrics, MLPerf's FID/CLIP N/A, no verdict."""
    from .testbed_metrics import NOT_MLPERF, audit_testbed_log

    path = dataset_path or run_info.dataset.get("path")
    if path is None:
        raise DatasetError("no --dataset-path and no run.json naming the captions file (the testbed metrics need "
                           "each image's caption)")
    captions = load_captions(path)
    metrics = audit_testbed_log(log_path, captions.frame, run_info.image_size, options.statistics_path,
                                None if output_dir is None else Path(output_dir))
    stats = metrics.pop("log_stats")
    result: dict[str, Any] = {
        "accuracy_json_version": ACCURACY_JSON_VERSION, "profile": "testbed", **metrics,
        "fid": None, "clip_score": None, "fid_note": NOT_MLPERF, "clip_score_note": NOT_MLPERF,
        "image_size": run_info.image_size, "verdict": "N/A", "verdict_reason": NOT_MLPERF, "comparable": False,
        "not_comparable_reasons": [NOT_MLPERF], "random_weights": False, "model_random_weights": False,
        "statistics": {"path": options.statistics_path} if options.statistics_path else None,
        "log": {"path": str(log_path.resolve()), "sha256": stats.sha256, "bytes": stats.bytes},
        "dataset": captions.describe(), "run": run_info.describe(),
        "mlperf_results_line": mlperf_results_line(None, None),
    }
    if output_dir is not None:
        write_accuracy_outputs(result, Path(output_dir))
    return result


def write_accuracy_outputs(result: dict[str, Any], output_dir: Path) -> None:
    """``accuracy.json`` and the checker's ``accuracy.txt`` (results line + ``hash=``)."""
    from sdxl.io import write_json_atomic, write_text_atomic

    write_json_atomic(output_dir / "accuracy.json", result)
    lines = ([f"# {RANDOM_WEIGHTS_WARNING}"] if result["random_weights"] else []) + \
            [result["mlperf_results_line"], f"hash={result['log']['sha256']}"]
    write_text_atomic(output_dir / "accuracy.txt", "\n".join(lines) + "\n")


def format_accuracy_report(result: dict[str, Any]) -> str:
    """The printed table: metric, value, window, in-window; then verdict, caveats and the MLPerf line."""
    from sdxl.io import format_table

    if result.get("profile") == "testbed":
        from .testbed_metrics import format_testbed_report

        return format_testbed_report(result)

    def fmt(value):
        return "N/A" if value is None else f"{value:.4f}"

    def inside(flag):
        return "-" if flag is None else ("yes" if flag else "no")

    rows = [["FID", fmt(result["fid"]), f"{result['window']['fid'][0]} - {result['window']['fid'][1]}",
             inside(result["fid_in_window"])],
            ["CLIP score", fmt(result["clip_score"]),
             f"{result['window']['clip_score'][0]} - {result['window']['clip_score'][1]}",
             inside(result["clip_score_in_window"])]]
    lines = [format_table(["metric", "value", "MLPerf window", "in window"], rows),
             f"\nimages: {result['n_images']} ({result['image_size']}x{result['image_size']}, "
             f"{result['duplicates_skipped']} duplicate entries skipped)",
             f"verdict: {result['verdict']} -- {result['verdict_reason']}"]
    for key in ("fid_note", "clip_score_note"):
        if result.get(key):
            lines.append(f"{key.replace('_note', '').replace('_', ' ')} unavailable: {result[key]}")
    for reason in result["not_comparable_reasons"]:
        lines.append(f"!!! NOT COMPARABLE: {reason} !!!")
    if result.get("model_random_weights"):
        lines.append("note: the run's model had random weights (run.json); its images are noise")
    lines.append(result["mlperf_results_line"])
    return "\n".join(lines)


def evaluate_run(run_dir: str | Path, *, statistics_path: str | None = None, reference_run: str | Path | None = None,
                 random_weights: bool = False, inception_weights: str | None = None, clip_weights: str | None = None,
                 dataset_path: str | None = None, device: str = "cpu", batch_size: int = 8,
                 stream: TextIO | None = None, quiet: bool = False) -> dict[str, Any]:
    """Audit the accuracy log of a finished run directory; the one call the spine makes after ``run --accuracy``.

    Reads ``<run_dir>/accuracy/mlperf_log_accuracy.json`` (and ``<run_dir>/run.json``), writes
    ``accuracy.json`` and ``accuracy.txt`` into ``<run_dir>/accuracy/``, and with ``reference_run`` (a
    run directory or a log file) the fidelity outputs of :func:`accuracy.compare.compare_logs` into
    ``<run_dir>/compare/``. Missing evaluation weights or FID statistics never stop it: the metric
    is N/A with the one-line how-to (``random_weights=True`` uses random evaluation networks and marks
    everything not comparable). Bad inputs (corrupt log, wrong image size) do not raise either.

    Returns a flat dict for a table row: ``fid``, ``clip_score``, ``n_images``, ``verdict``,
    ``verdict_reason``, ``comparable``, ``accuracy_json``, and with a reference ``psnr_mean_db``,
    ``psnr_min_db``, ``ssim_mean``, ``compare_json``; ``error`` (one line) when the audit failed.
    The printed report goes to ``stream`` (default: ``sys.stdout`` at call time); ``quiet=True`` prints nothing.
    """
    stream = None if quiet else (stream or sys.stdout)
    run_dir = Path(run_dir)
    log_path = run_dir / "accuracy" / LOG_NAME
    options = AuditOptions(statistics_path=statistics_path, random_weights=random_weights,
                           inception_weights=inception_weights, clip_weights=clip_weights, device=device,
                           batch_size=batch_size, missing="na")
    row: dict[str, Any] = {"run_dir": str(run_dir)}
    try:
        if load_run_info(log_path).data.get("profile") == "testbed":  # MLPerf's networks do not apply
            evaluators = Evaluators(fid_note="testbed run: see its testbed-FID", clip_note="testbed run: see its testbed-CLIP")
        else:
            evaluators = build_evaluators(fid=statistics_path is not None or reference_run is not None, clip=True,
                                          random_weights=random_weights, inception_weights=inception_weights,
                                          clip_weights=clip_weights, device=device, missing="na")
        result = audit_log(log_path, dataset_path=dataset_path, output_dir=run_dir / "accuracy", options=options,
                           evaluators=evaluators)
    except INPUT_ERRORS as exc:
        row["error"] = f"accuracy audit of {log_path} failed: {exc}"
        if stream is not None:
            print(f"error: {row['error']}", file=stream)
        return row
    row.update({key: result[key] for key in ("fid", "clip_score", "n_images", "verdict", "verdict_reason", "comparable")})
    for key in ("testbed_clip", "testbed_fid"):
        if key in result:
            row[key] = result[key]
    if "caption_accuracy" in result:
        row["caption_accuracy"] = result["caption_accuracy"]["overall"]["all"]
    row["accuracy_json"] = str(run_dir / "accuracy" / "accuracy.json")
    if stream is not None:
        print(format_accuracy_report(result), file=stream)
    if reference_run is not None:
        from .compare import compare_logs, format_compare_report, resolve_log

        try:
            summary = compare_logs(log_path, resolve_log(reference_run), output_dir=run_dir / "compare",
                                   dataset_path=dataset_path, options=options, evaluators=evaluators)
        except INPUT_ERRORS as exc:
            row["error"] = f"comparison with {reference_run} failed: {exc}"
            if stream is not None:
                print(f"error: {row['error']}", file=stream)
            return row
        row.update({"psnr_mean_db": summary["psnr_db"]["mean"], "psnr_min_db": summary["psnr_db"]["min"],
                    "ssim_mean": summary["ssim"]["mean"], "compare_json": str(run_dir / "compare" / "compare.json")})
        if stream is not None:
            print(format_compare_report(summary), file=stream)
    return row
