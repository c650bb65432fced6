"""Accuracy audits of MLPerf SDXL runs: FID and CLIP score from LoadGen's accuracy log, the MLPerf
window verdict, fidelity against a reference run, and MLPerf's COCO dataset preparation.

Modules, smallest first: :mod:`accuracy.spec` (the MLPerf numbers, one data file),
:mod:`accuracy.log_reader` (streaming ``mlperf_log_accuracy.json``), :mod:`accuracy.run_info`
(``run.json``), :mod:`accuracy.weights` (finding the evaluation weights), :mod:`accuracy.fid`,
:mod:`accuracy.clip_score`, :mod:`accuracy.fidelity` (PSNR/SSIM), :mod:`accuracy.evaluate` (one
streaming pass feeding the metrics), :mod:`accuracy.verdict`, :mod:`accuracy.report` (``accuracy.json``,
the entry point :func:`accuracy.report.evaluate_run`), :mod:`accuracy.compare`,
:mod:`accuracy.prepare_dataset` and :mod:`accuracy.commands` (the CLI).
"""
