"""CLI: ``accuracy``, ``compare``, ``fid-stats`` and ``prepare-dataset`` (registered by ``harness.cli``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sdxl.arg_types import int_at_least
from sdxl.io import check_writable_dir

from .report import INPUT_ERRORS, AuditOptions


def _user_error(exc: Exception):
    from sdxl.errors import UserError

    return UserError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)


def add_weight_arguments(parser: argparse.ArgumentParser) -> None:
    """The evaluation-network flags every command that computes FID/CLIP shares."""
    parser.add_argument("--inception-weights", help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth "
                                                     "(default: TORCH_HOME's hub cache)")
    parser.add_argument("--clip-weights", help="CLIP ViT-B-32 openai weights: OpenAI's ViT-B-32.pt or open_clip's "
                                               "open_clip_model.safetensors (default: the Hugging Face cache, then ~/.cache/clip)")
    parser.add_argument("--random-weights", action="store_true",
                        help="random Inception/CLIP networks: exercises the mechanics, numbers NOT comparable")
    parser.add_argument("--device", default="cpu", help="cpu (default), cuda or cuda:N")
    parser.add_argument("--batch-size", type=int_at_least(1), default=8, help="images per network call (default 8)")
    parser.add_argument("--image-size", type=int_at_least(1),
                        help="image side in pixels, for a log away from its run.json (default: run.json's, else 1024)")


def audit_options(args: argparse.Namespace, missing: str = "error") -> AuditOptions:
    """:class:`AuditOptions` from the flags of :func:`add_weight_arguments` (and ``--statistics-path``)."""
    return AuditOptions(statistics_path=getattr(args, "statistics_path", None), random_weights=args.random_weights,
                        inception_weights=args.inception_weights, clip_weights=args.clip_weights, device=args.device,
                        batch_size=args.batch_size, image_size=args.image_size, missing=missing)


def register(subparsers) -> None:
    accuracy = subparsers.add_parser("accuracy", help="FID and CLIP score of an accuracy log, with MLPerf's verdict",
                                     description="FID and CLIP score of a LoadGen mlperf_log_accuracy.json exactly as "
                                                 "MLPerf's tools/accuracy_coco.py, streamed (any log size).")
    accuracy.add_argument("--log", required=True, help="mlperf_log_accuracy.json, or a run directory")
    accuracy.add_argument("--dataset-path", help="captions TSV or reference-layout directory (default: run.json's)")
    accuracy.add_argument("--statistics-path", help="FID statistics npz (MLPerf: text_to_image/tools/val2014.npz)")
    accuracy.add_argument("--output", help="directory for accuracy.json and accuracy.txt (default: beside the log)")
    accuracy.add_argument("--compliance-images-path", help="write <idx>.png and captions.txt for --ids-path here")
    accuracy.add_argument("--ids-path", help="qsl indices of the compliance images (MLPerf: tools/sample_ids.txt)")
    add_weight_arguments(accuracy)
    accuracy.set_defaults(func=run_accuracy)

    compare = subparsers.add_parser("compare", help="per-image PSNR/SSIM, FID and CLIP difference against a reference run")
    compare.add_argument("--log", required=True, help="the quantized run's log (or run directory)")
    compare.add_argument("--reference-log", required=True, help="the reference run's log (or run directory)")
    compare.add_argument("--dataset-path", help="captions TSV for the CLIP difference (default: run.json's)")
    compare.add_argument("--output", required=True, help="directory for per_image.csv, compare.json and the PNGs")
    add_weight_arguments(compare)
    compare.set_defaults(func=run_compare)

    stats = subparsers.add_parser("fid-stats", help="FID statistics (mu, sigma npz) of a log's or a directory's images")
    source = stats.add_mutually_exclusive_group(required=True)
    source.add_argument("--log", help="mlperf_log_accuracy.json (image size from its run.json, else 1024)")
    source.add_argument("--images", help="directory of image files (e.g. COCO val2014 images)")
    source.add_argument("--testbed-scenes", metavar="CAPTIONS_TSV", nargs="?", const="default",
                        help="testbed-FID statistics: the real scenes of a testbed captions TSV (default: the "
                             "validation set), in the testbed scorer's 64 features")
    stats.add_argument("--output", required=True, help="npz file to write (keys mu, sigma)")
    add_weight_arguments(stats)
    stats.set_defaults(func=run_fid_stats)

    prepare = subparsers.add_parser("prepare-dataset", help="MLPerf's captions TSVs from COCO annotation files")
    prepare.add_argument("--annotations", required=True, help="captions_val2014.json")
    prepare.add_argument("--calibration-annotations", help="captions_train2014.json (writes calibration/captions.tsv)")
    prepare.add_argument("--max-images", type=int_at_least(1), default=5000, help="validation rows to keep (MLPerf: 5000)")
    prepare.add_argument("--output", required=True, help="dataset directory (captions/, calibration/)")
    prepare.set_defaults(func=run_prepare_dataset)


def run_accuracy(args: argparse.Namespace) -> int:
    from .compare import resolve_log
    from .report import audit_log, format_accuracy_report
    from .weights import WeightsUnavailable

    try:
        log = resolve_log(args.log)
        output = Path(args.output) if args.output else log.parent
        check_writable_dir(output, "--output")
        result = audit_log(log, dataset_path=args.dataset_path, output_dir=output, options=audit_options(args),
                           compliance_images_path=args.compliance_images_path, ids_path=args.ids_path)
    except (WeightsUnavailable, *INPUT_ERRORS) as exc:
        raise _user_error(exc) from None
    print(format_accuracy_report(result))
    print(f"wrote {output / 'accuracy.json'} and {output / 'accuracy.txt'}")
    return 0


def run_compare(args: argparse.Namespace) -> int:
    from .compare import compare_logs, format_compare_report, resolve_log
    from .weights import WeightsUnavailable

    check_writable_dir(Path(args.output), "--output")
    try:
        summary = compare_logs(resolve_log(args.log), resolve_log(args.reference_log), output_dir=args.output,
                               dataset_path=args.dataset_path, options=audit_options(args, missing="na"))
    except (WeightsUnavailable, *INPUT_ERRORS) as exc:
        raise _user_error(exc) from None
    print(format_compare_report(summary))
    return 0


def run_fid_stats(args: argparse.Namespace) -> int:
    from .evaluators import RANDOM_WEIGHTS_WARNING, build_evaluators
    from .fid_stats import fid_stats
    from .weights import WeightsUnavailable

    check_writable_dir(Path(args.output).parent, "--output")
    if args.testbed_scenes:
        return _testbed_fid_stats(args)
    try:
        options = audit_options(args)
        evaluators = build_evaluators(fid=True, clip=False, random_weights=options.random_weights,
                                      inception_weights=options.inception_weights, device=options.device)
        gaussian = fid_stats(args.output, evaluators.inception, log=args.log, images=args.images,
                             batch_size=options.batch_size, image_size=options.image_size)
    except (WeightsUnavailable, *INPUT_ERRORS) as exc:
        raise _user_error(exc) from None
    print(f"wrote {args.output}: mu/sigma of {gaussian.count} images")
    if options.random_weights:
        print(f"!!! {RANDOM_WEIGHTS_WARNING} !!!")
    return 0


def _testbed_fid_stats(args: argparse.Namespace) -> int:
    from sdxl.dataset import DatasetError, load_captions
    from sdxl.models import profile_default
    from testbed.scorer import load_scorer

    from .fid import save_statistics
    from .testbed_metrics import gaussian_of, real_scenes

    path = profile_default("testbed", "default_captions") if args.testbed_scenes == "default" else args.testbed_scenes
    try:
        frame = load_captions(path).frame
        images = real_scenes(frame["caption"].tolist(), frame["id"].tolist())
    except (DatasetError, ValueError) as exc:
        raise _user_error(exc) from None
    gaussian = gaussian_of(load_scorer().image_features(images))
    save_statistics(args.output, gaussian)
    print(f"wrote {args.output}: testbed-FID mu/sigma of the real scenes of {gaussian.count} captions ({path})")
    return 0


def run_prepare_dataset(args: argparse.Namespace) -> int:
    from .prepare_dataset import prepare_dataset

    if args.max_images < 1:
        raise _user_error(ValueError("--max-images must be >= 1"))
    try:
        written = prepare_dataset(args.output, args.annotations, args.calibration_annotations, args.max_images)
    except (FileNotFoundError, ValueError) as exc:
        raise _user_error(exc) from None
    print(json.dumps(written, indent=2))
    return 0
