"""The testbed's commands: ``train-testbed`` (one-time training, resumable) and ``testbed-captions``."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from sdxl.errors import UserError
from sdxl.models import PROFILE_DIR

TESTBED_PROFILE = PROFILE_DIR / "testbed.json"


def _train(args: argparse.Namespace) -> int:
    from sdxl.system_info import system_description

    from .export import export
    from .train import Trainer, TrainingPlan, load_profile_config, write_report

    if not 0 < args.scale <= 1:
        raise UserError(f"--scale must be in (0, 1] (got {args.scale})")
    profile = Path(args.profile_json)
    config = load_profile_config(profile)
    seed = config["seed"] if args.seed is None else args.seed
    plan = TrainingPlan() if args.scale == 1 else TrainingPlan().scaled(args.scale)
    workdir = Path(args.workdir)
    print(f"train-testbed: seed {seed}, plan {plan}, into {workdir} (resumes from what is there)", file=sys.stderr)
    trainer = Trainer(workdir, config, seed, plan, log=lambda m: print(m, file=sys.stderr, flush=True))
    results = trainer.run()
    command = "./run.sh train-testbed " + " ".join(shlex.quote(a) for a in sys.argv[2:])
    report = write_report(workdir, results, plan, seed, command.strip())
    report["machine"] = system_description()
    if args.export:
        config = export(results, trainer.tokenizers, profile, report, workdir)
        print(f"train-testbed: exported to {profile.parent / Path(config['weights']).parent} "
              f"(weights sha256 {config['weights_sha256'][:16]}...)", file=sys.stderr)
    print(f"train-testbed: done in {report['seconds'] / 60:.1f} min; first/final loss "
          + ", ".join(f"{s} {report['first_loss'][s]:.4f}/{report['final_loss'][s]:.4f}" for s in report["final_loss"]))
    return 0


def _captions(args: argparse.Namespace) -> int:
    from .datasets import write_caption_sets

    for path in write_caption_sets(Path(args.output_dir)):
        print(path)
    return 0


def register(subparsers) -> None:
    train = subparsers.add_parser("train-testbed", help="train the testbed model (one-time, <= 2 h on 2 cores, resumable)")
    train.add_argument("--seed", type=int, default=None, help="training seed (default: the profile's)")
    train.add_argument("--workdir", default="results/testbed-train", help="checkpoints, report and curves (resumes)")
    train.add_argument("--profile-json", default=str(TESTBED_PROFILE), help=argparse.SUPPRESS)
    train.add_argument("--scale", type=float, default=1.0, help="fraction of every stage's steps (smoke tests)")
    train.add_argument("--no-export", dest="export", action="store_false",
                       help="do not write the weights into the testbed profile")
    train.set_defaults(func=_train)
    captions = subparsers.add_parser("testbed-captions", help="write the testbed's validation and calibration TSVs")
    captions.add_argument("--output-dir", default=str(PROFILE_DIR / "testbed"))
    captions.set_defaults(func=_captions)
