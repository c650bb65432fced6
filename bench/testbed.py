"""Testbed bench (issue 13): has the FP32 testbed learned its task, and does quantization hurt it in order?

    .venv/bin/python bench/testbed.py [--max-samples 500] [--recipes fp32,w8a16,w8a8,w4a8] [--output DIR]

1. ``study`` (torch backend) of the recipes over the first ``--max-samples`` validation captions:
   caption accuracy / testbed-CLIP / PSNR vs FP32 with 95% bootstrap intervals of the paired
   per-caption differences;
2. the FP32 run: caption accuracy per attribute, one- and two-shape captions apart, and testbed-FID
   beside its anchors: real scenes drawn with other seeds (~0: same captions, other jitter) and real
   scenes under shuffled captions (what "wrong content" costs), all against the real scenes of the
   run's captions;
3. activation statistics of the UNet's Linear/Conv inputs over 20 steps of 4 prompts, testbed vs tiny:
   max|x|/std per layer, excess kurtosis, and the outlier-channel ratio (largest channel absmax over
   the median channel's);
4. a grid of FP32 images with their captions (``docs/testbed/fp32_grid.png`` with ``--docs``).

Writes ``testbed-bench.json`` and ``testbed-bench.md`` into the output directory (with the CPU and
ISA); numbers in docs/testbed.md quote such a run.
"""

from __future__ import annotations

import argparse
import datetime as dt
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from accuracy.fid import frechet_distance  # noqa: E402
from accuracy.testbed_metrics import gaussian_of, real_scenes  # noqa: E402
from sdxl.io import format_table, write_json_atomic  # noqa: E402
from sdxl.system_info import isa_summary, system_description  # noqa: E402


def run_study(args, out: Path) -> dict:
    command = [sys.executable, "-m", "harness", "study", "--profile", "testbed", "--recipes", args.recipes,
               "--backends", "torch", "--max-samples", str(args.max_samples), "--output", str(out / "study")]
    if args.num_prompts:
        command += ["--num-prompts", str(args.num_prompts)]
    subprocess.run(command, cwd=ROOT, check=False)
    import json

    return json.loads((out / "study" / "study.json").read_text())


def fid_anchors(fp32_run: Path) -> dict:
    """testbed-FID of real scenes with other seeds / shuffled captions, against the run's captions' real scenes."""
    from testbed.scorer import load_scorer

    per_caption = pd.read_csv(fp32_run / "accuracy" / "testbed_per_caption.csv")
    captions, ids = per_caption["caption"].tolist(), per_caption["id"].tolist()
    scorer = load_scorer()
    reference = gaussian_of(scorer.image_features(real_scenes(captions, ids)))
    stats = (reference.mean, reference.covariance)

    def fid(images) -> float:
        g = gaussian_of(scorer.image_features(images))
        return frechet_distance(g.mean, g.covariance, *stats)

    shuffled = list(pd.Series(captions).sample(frac=1, random_state=0))
    return {"real_other_seeds": fid(real_scenes(captions, [i + 100_000 for i in ids])),
            "real_shuffled_captions": fid(real_scenes(shuffled, ids)),
            "n": len(captions)}


def vae_round_trip(fp32_run: Path) -> dict:
    """Caption accuracy and testbed-FID of the shipped VAE's reconstructions of the real scenes: the UNet's ceiling."""
    from accuracy.testbed_metrics import testbed_metrics
    from sdxl.image_bytes import images_to_uint8
    from sdxl.models import load_components, model_spec
    from testbed.train import images_to_tensor

    per_caption = pd.read_csv(fp32_run / "accuracy" / "testbed_per_caption.csv")
    captions, ids = per_caption["caption"].tolist(), per_caption["id"].tolist()
    vae = load_components(model_spec("testbed"), show_progress=False).vae
    real = np.stack(real_scenes(captions, ids))
    with torch.no_grad():
        decoded = [vae.decode(vae.encode(images_to_tensor(real[i:i + 100])).latent_dist.mean).sample
                   for i in range(0, len(real), 100)]
    images = list(images_to_uint8(torch.cat(decoded), from_vae=True))
    summary, _ = testbed_metrics(captions, ids, images)
    return {"caption_accuracy": summary["caption_accuracy"], "testbed_fid": summary["testbed_fid"],
            "testbed_clip": summary["testbed_clip"]}


def activation_statistics(profile: str, prompts: list[str]) -> dict:
    """Per Linear/Conv input of the UNet over a full generation: max|x|/std, kurtosis, outlier-channel ratio."""
    from backends import BackendOptions, create_backend
    from sdxl.latents import draw_latent
    from sdxl.models import load_tokenizers, model_spec
    from sdxl.pipeline import SDXLPipeline
    from sdxl.tokenizers import tokenize

    spec = model_spec(profile)
    backend = create_backend("torch", spec, BackendOptions(show_progress=False))
    tokenizers = load_tokenizers(spec)
    stats: dict[str, dict[str, list]] = {}

    def hook(name):
        def record(_module, inputs):
            x = inputs[0].detach().double()
            channels = x.transpose(0, 1).reshape(x.shape[1], -1) if x.dim() == 4 else x.reshape(-1, x.shape[-1]).T
            centred = x - x.mean()
            std = centred.std()
            entry = stats.setdefault(name, {"max_over_std": [], "kurtosis": [], "outlier_channel_ratio": []})
            entry["max_over_std"].append(float(x.abs().max() / std))
            entry["kurtosis"].append(float((centred ** 4).mean() / std ** 4 - 3))
            absmax = channels.abs().amax(1)
            entry["outlier_channel_ratio"].append(float(absmax.max() / absmax.median().clamp_min(1e-12)))
        return record

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in backend.unet.named_modules()
               if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
    pipeline = SDXLPipeline(backend, spec, tokenizers)
    ids = [tokenize(t, prompts) for t in tokenizers]
    pipeline.generate(*ids, draw_latent(spec.latent_size))
    for h in handles:
        h.remove()
    per_layer = {n: {k: float(np.max(v)) if k != "kurtosis" else float(np.mean(v)) for k, v in s.items()}
                 for n, s in stats.items()}
    summary = {}
    for key in ("max_over_std", "kurtosis", "outlier_channel_ratio"):
        values = np.array([p[key] for p in per_layer.values()])
        summary[key] = {"median": float(np.median(values)), "p90": float(np.percentile(values, 90)),
                        "max": float(values.max())}
    return {"layers": len(per_layer), "summary": summary, "per_layer": per_layer}


def fp32_grid(fp32_run: Path, path: Path, n: int = 16) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from accuracy.log_reader import iter_accuracy_log

    per_caption = pd.read_csv(fp32_run / "accuracy" / "testbed_per_caption.csv").set_index("qsl_idx")
    images = dict(iter_accuracy_log(fp32_run / "accuracy" / "mlperf_log_accuracy.json", 64))
    chosen = sorted(images)[:n]
    cols = 4
    fig, axes = plt.subplots((len(chosen) + cols - 1) // cols, cols, figsize=(cols * 2.6, 2.9 * ((len(chosen) + cols - 1) // cols)))
    for ax, idx in zip(np.ravel(axes), chosen):
        ax.imshow(images[idx], interpolation="nearest")
        ok = "✓" if per_caption.loc[idx, "correct_all"] else "✗"
        caption = per_caption.loc[idx, "caption"].removeprefix("a ")
        words = caption.split()
        ax.set_title(f"{ok} " + " ".join(words[:4]) + "\n" + " ".join(words[4:]), fontsize=7)
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in np.ravel(axes)[len(chosen):]:
        ax.axis("off")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-samples", type=int, default=500)
    parser.add_argument("--num-prompts", type=int, default=None, help="calibration prompts (default: all 500)")
    parser.add_argument("--recipes", default="fp32,w8a16,w8a8,w4a8")
    parser.add_argument("--output", default=None)
    parser.add_argument("--docs", action="store_true", help="also write docs/testbed/fp32_grid.png")
    args = parser.parse_args()
    out = Path(args.output or ROOT / "results" / "bench" / f"testbed-{dt.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    study = run_study(args, out)
    fp32_run = out / "study" / "runs" / "fp32-torch"
    accuracy = __import__("json").loads((fp32_run / "accuracy" / "accuracy.json").read_text())
    anchors = fid_anchors(fp32_run)
    anchors["vae_round_trip"] = vae_round_trip(fp32_run)
    from sdxl.dataset import load_captions
    from sdxl.models import profile_default

    testbed_prompts = load_captions(profile_default("testbed", "default_captions")).captions[:4]
    activations = {"testbed": activation_statistics("testbed", testbed_prompts),
                   "tiny": activation_statistics("tiny", load_captions(None).captions[:4])}
    fp32_grid(fp32_run, out / "fp32_grid.png")
    if args.docs:
        fp32_grid(fp32_run, ROOT / "docs" / "testbed" / "fp32_grid.png")
    result = {"benchmark": "testbed", "system": system_description(), "max_samples": args.max_samples,
              "study": study, "fp32_caption_accuracy": accuracy["caption_accuracy"],
              "fp32_testbed_fid": accuracy["testbed_fid"], "fp32_testbed_clip": accuracy["testbed_clip"],
              "fid_anchors": anchors, "activations": {k: {kk: vv for kk, vv in v.items() if kk != "per_layer"}
                                                      for k, v in activations.items()},
              "activations_per_layer": {k: v["per_layer"] for k, v in activations.items()}}
    write_json_atomic(out / "testbed-bench.json", result)
    acc = accuracy["caption_accuracy"]
    attrs = ("colour", "shape", "size", "placement", "all")
    lines = [f"# testbed bench, {args.max_samples} captions; CPU {system_description()['cpu_model']} ({isa_summary()})", "",
             "## FP32 caption accuracy (%)", "",
             format_table(["captions", "n", *attrs], [[g, acc[g]["n"], *(f"{100 * acc[g][a]:.1f}" for a in attrs)]
                                                      for g in ("overall", "one_shape", "two_shapes") if acc[g]["n"]],
                          markdown=True), "",
             "## testbed-FID against the real scenes of the same captions", "",
             format_table(["images", "testbed-FID"], [["FP32 testbed", f"{accuracy['testbed_fid']:.3f}"],
                                                      ["real scenes, other seeds", f"{anchors['real_other_seeds']:.3f}"],
                                                      ["real scenes, shuffled captions",
                                                       f"{anchors['real_shuffled_captions']:.3f}"],
                                                      ["VAE round trip of the real scenes",
                                                       f"{anchors['vae_round_trip']['testbed_fid']:.3f}"]],
                          markdown=True), "",
             "VAE round trip caption accuracy (all attributes): "
             f"{100 * anchors['vae_round_trip']['caption_accuracy']['overall']['all']:.1f}% (the UNet's ceiling); "
             f"testbed-CLIP: FP32 {accuracy['testbed_clip']:.2f}, VAE round trip "
             f"{anchors['vae_round_trip']['testbed_clip']:.2f}", "",
             "## UNet activations (Linear/Conv inputs, one 20-step generation of 4 prompts)", "",
             format_table(["profile", "layers", "max/std median", "max/std p90", "max/std max", "kurtosis median",
                           "kurtosis max", "outlier-channel median", "outlier-channel max"],
                          [[k, v["layers"], *(f"{v['summary'][m][s]:.1f}" for m, s in (
                              ("max_over_std", "median"), ("max_over_std", "p90"), ("max_over_std", "max"),
                              ("kurtosis", "median"), ("kurtosis", "max"), ("outlier_channel_ratio", "median"),
                              ("outlier_channel_ratio", "max")))] for k, v in activations.items()], markdown=True), "",
             "## study", "", (out / "study" / "study.md").read_text()]
    (out / "testbed-bench.md").write_text("\n".join(str(x) for x in lines) + "\n")
    print((out / "testbed-bench.md").read_text())
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
