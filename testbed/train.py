"""``train-testbed``: train the testbed's SDXL-shaped model on generated scenes, as SDXL was trained.

Stages, each resumable (a checkpoint every ``checkpoint_every`` steps; a finished stage is a file):

1. ``vae``: the 8x AutoencoderKL, reconstruction (L1 + MSE) plus a small KL term.
2. ``clip_1``, ``clip_2``: two small CLIPs (text tower + ViT image tower), contrastive loss on
   (scene, caption) pairs; their text towers become ``text_encoder`` / ``text_encoder_2``, frozen, as
   SDXL's are. ``scorer``: a third CLIP, its own seed and widths, for testbed-CLIP / testbed-FID
   (MLPerf scores with a CLIP that SDXL does not contain).
3. ``unet``: noise prediction (epsilon) on the scheduler's 1,000 training noise levels over VAE
   latents of rendered scenes, caption dropout to MLPerf's negative prompt (the prompt the sampling
   loop feeds the unconditional branch), an EMA of the weights exported.

Every random draw comes from a generator seeded by (seed, stage, step), so a run resumed from a
checkpoint continues exactly as an uninterrupted one, and one seed gives one model on one machine.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from sdxl.benchmark_spec import NEGATIVE_PROMPT
from sdxl.io import write_json_atomic
from sdxl.progress import progress

from .scenes import IMAGE_SIZE, all_scenes, render

STAGES = ("vae", "clip_1", "clip_2", "scorer", "unet")
_STAGE_IDS = {name: k for k, name in enumerate(STAGES)}


@dataclass(frozen=True)
class TrainingPlan:
    """Steps, batch sizes and learning rates of each stage; :meth:`scaled` shortens all for a smoke test."""

    vae_steps: int = 1500
    vae_batch: int = 16
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    clip_steps: int = 700
    clip_batch: int = 128
    clip_lr: float = 1e-3
    unet_steps: int = 7000
    unet_batch: int = 32
    unet_lr: float = 5e-4
    unet_warmup: int = 200
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    one_shape_share: float = 0.5  # of each batch: one-shape scenes are 180 of the grammar's 1,260 captions
    latent_pool_per_caption: int = 8
    checkpoint_every: int = 250

    def scaled(self, factor: float) -> "TrainingPlan":
        def steps(n: int) -> int:
            return max(2, int(round(n * factor)))

        return TrainingPlan(**{**asdict(self), "vae_steps": steps(self.vae_steps), "clip_steps": steps(self.clip_steps),
                               "unet_steps": steps(self.unet_steps), "unet_warmup": steps(self.unet_warmup),
                               "latent_pool_per_caption": 1, "checkpoint_every": steps(self.checkpoint_every)})


#: the scorer's architecture: deliberately unlike the model's text towers (its own widths and seed)
SCORER_TEXT = {"hidden_size": 48, "intermediate_size": 96, "num_hidden_layers": 3, "num_attention_heads": 3}
SCORER_VISION = {"hidden_size": 96, "intermediate_size": 192, "num_hidden_layers": 3, "num_attention_heads": 4}
SCORER_PROJECTION = 64
MODEL_VISION = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4}


def _generator(seed: int, stage: str, step: int) -> tuple[torch.Generator, np.random.Generator]:
    entropy = np.random.SeedSequence([seed, _STAGE_IDS[stage], step]).generate_state(2)
    return torch.Generator().manual_seed(int(entropy[0])), np.random.default_rng(int(entropy[1]))


def images_to_tensor(images: np.ndarray) -> torch.Tensor:
    """``(N, H, W, 3)`` uint8 -> ``(N, 3, H, W)`` float in [-1, 1] (the VAE's and the CLIP towers' input)."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


class SceneSampler:
    """Batches of (scene index, rendered image) with a fixed share of one-shape scenes."""

    def __init__(self, one_shape_share: float):
        self.scenes = all_scenes()
        self.one = [i for i, s in enumerate(self.scenes) if s.kind == "one"]
        self.two = [i for i, s in enumerate(self.scenes) if s.kind == "two"]
        self.share = one_shape_share

    def indices(self, rng: np.random.Generator, n: int) -> np.ndarray:
        pick_one = rng.random(n) < self.share
        return np.where(pick_one, rng.choice(self.one, n), rng.choice(self.two, n))

    def batch(self, rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        idx = self.indices(rng, n)
        seeds = rng.integers(0, 2**31, n)
        return idx, np.stack([render(self.scenes[i], int(s)) for i, s in zip(idx, seeds)])


def _lr_at(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    return base * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


@dataclass
class _StageState:
    step: int = 0
    losses: list[float] = field(default_factory=list)


class Trainer:
    """Runs the stages into ``workdir``; finished stages are skipped, a checkpointed stage resumes."""

    def __init__(self, workdir: Path, config: dict, seed: int, plan: TrainingPlan, show_progress: bool = True,
                 log: Callable[[str], None] = print):
        self.workdir = Path(workdir)
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config = config
        self.seed = seed
        self.plan = plan
        self.show_progress = show_progress
        self.log = log
        self.sampler = SceneSampler(plan.one_shape_share)
        from sdxl.tokenizers import build_sdxl_tokenizers

        self.tokenizers = build_sdxl_tokenizers()

    # -- bookkeeping ---------------------------------------------------------------------------------
    def _done_path(self, stage: str) -> Path:
        return self.workdir / f"{stage}.pt"

    def _ckpt_path(self, stage: str) -> Path:
        return self.workdir / f"{stage}.ckpt.pt"

    def _save_atomic(self, obj, path: Path) -> None:
        tmp = path.with_suffix(path.suffix + ".tmp")
        torch.save(obj, tmp)
        tmp.replace(path)

    def _loop(self, stage: str, total: int, modules: dict[str, torch.nn.Module], optimizer: torch.optim.Optimizer,
              step_fn: Callable[[int, torch.Generator, np.random.Generator], torch.Tensor],
              lr: Callable[[int], float], extra: dict | None = None) -> list[float]:
        """The shared optimisation loop: resume, step, checkpoint, finish; returns the loss history."""
        state = _StageState()
        ckpt = self._ckpt_path(stage)
        if ckpt.is_file():
            saved = torch.load(ckpt, weights_only=False)
            for name, module in modules.items():
                module.load_state_dict(saved["modules"][name])
            optimizer.load_state_dict(saved["optimizer"])
            state = _StageState(saved["step"], saved["losses"])
            self.log(f"train-testbed: {stage} resumes at step {state.step}/{total}")
        bar = progress(range(state.step, total), desc=f"train {stage}", total=total - state.step,
                       disable=not self.show_progress)
        started, first = time.time(), state.step
        for step in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr(step)
            torch_gen, np_rng = _generator(self.seed, stage, step)
            loss = step_fn(step, torch_gen, np_rng)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if extra and "after_step" in extra:
                extra["after_step"]()
            state.losses.append(loss.item())
            state.step = step + 1
            if hasattr(bar, "set_postfix") and step % 20 == 0:
                bar.set_postfix(loss=f"{np.mean(state.losses[-50:]):.4f}")
            if state.step % self.plan.checkpoint_every == 0 and state.step < total:
                rate = (time.time() - started) / (state.step - first)
                self.log(f"train-testbed: {stage} step {state.step}/{total}, loss {np.mean(state.losses[-50:]):.4f}, "
                         f"{rate:.2f} s/step, {(total - state.step) * rate / 60:.1f} min left in this stage")
                self._save_atomic({"modules": {n: m.state_dict() for n, m in modules.items()},
                                   "optimizer": optimizer.state_dict(), "step": state.step,
                                   "losses": state.losses}, ckpt)
        return state.losses

    def _finish(self, stage: str, payload: dict) -> None:
        self._save_atomic(payload, self._done_path(stage))
        self._ckpt_path(stage).unlink(missing_ok=True)

    def done(self, stage: str):
        path = self._done_path(stage)
        return torch.load(path, weights_only=False) if path.is_file() else None

    # -- stages --------------------------------------------------------------------------------------
    def train_vae(self) -> dict:
        from diffusers import AutoencoderKL

        if (done := self.done("vae")) is not None:
            return done
        plan = self.plan
        torch.manual_seed(self.seed)
        vae = AutoencoderKL(**{**self.config["vae"], "scaling_factor": 1.0}).train()
        opt = torch.optim.AdamW(vae.parameters(), lr=plan.vae_lr, weight_decay=0.0)

        def step(_s, gen, rng):
            _, images = self.sampler.batch(rng, plan.vae_batch)
            x = images_to_tensor(images)
            posterior = vae.encode(x).latent_dist
            z = posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen)
            recon = vae.decode(z).sample
            return F.l1_loss(recon, x) + F.mse_loss(recon, x) + plan.vae_kl_weight * posterior.kl().mean()

        losses = self._loop("vae", plan.vae_steps, {"vae": vae}, opt, step,
                            lambda s: _lr_at(s, plan.vae_steps, plan.vae_lr, 100))
        payload = {"state": vae.state_dict(), "losses": losses}
        self._finish("vae", payload)
        return payload

    def _clip_config(self, stage: str):
        from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig

        vision = {"image_size": IMAGE_SIZE, "patch_size": 8, "hidden_act": "quick_gelu", **MODEL_VISION}
        if stage == "scorer":
            text = CLIPTextConfig(**{**self.config["text_encoder"], **SCORER_TEXT, "projection_dim": SCORER_PROJECTION})
            vision.update(SCORER_VISION)
            projection = SCORER_PROJECTION
        else:
            text = CLIPTextConfig(**self.config["text_encoder" if stage == "clip_1" else "text_encoder_2"])
            projection = text.projection_dim
        return CLIPConfig(text_config=text.to_dict(), vision_config=CLIPVisionConfig(**vision).to_dict(),
                          projection_dim=projection)

    def _caption_ids(self, which: int) -> torch.Tensor:
        """Token ids of every grammar caption (row i = scene i) with tokenizer ``which`` (1 or 2)."""
        from sdxl.tokenizers import tokenize

        return tokenize(self.tokenizers[which - 1], [s.caption() for s in self.sampler.scenes])

    def train_clip(self, stage: str) -> dict:
        from transformers import CLIPModel

        if (done := self.done(stage)) is not None:
            return done
        plan = self.plan
        torch.manual_seed(self.seed + 1 + _STAGE_IDS[stage] * 101)
        model = CLIPModel(self._clip_config(stage)).train()
        ids = self._caption_ids(2 if stage == "clip_2" else 1)
        opt = torch.optim.AdamW(model.parameters(), lr=plan.clip_lr, weight_decay=0.0)

        def step(_s, _gen, rng):
            idx, images = self.sampler.batch(rng, plan.clip_batch)
            out = model(input_ids=ids[idx], pixel_values=images_to_tensor(images), return_loss=False)
            logits = out.logits_per_image
            # a caption drawn twice in one batch is a true positive for both images
            same = torch.from_numpy(idx[:, None] == idx[None, :]).float()
            target = same / same.sum(1, keepdim=True)
            return 0.5 * (torch.sum(-target * logits.log_softmax(1), 1).mean()
                          + torch.sum(-target.T * logits.T.log_softmax(1), 1).mean())

        losses = self._loop(stage, plan.clip_steps, {"clip": model}, opt, step,
                            lambda s: _lr_at(s, plan.clip_steps, plan.clip_lr, 50))
        payload = {"state": model.state_dict(), "config": model.config.to_dict(), "losses": losses}
        self._finish(stage, payload)
        return payload

    def _text_encoders(self, clip_1: dict, clip_2: dict):
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

        te1 = CLIPTextModel(CLIPTextConfig(**self.config["text_encoder"]))
        te2 = CLIPTextModelWithProjection(CLIPTextConfig(**self.config["text_encoder_2"]))
        for module, clip, extra in ((te1, clip_1, ()), (te2, clip_2, ("text_projection.",))):
            prefixes = ("text_model.",) + extra
            state = {k: v for k, v in clip["state"].items() if k.startswith(prefixes)}
            module.load_state_dict(state, strict=False)
        return te1.eval().requires_grad_(False), te2.eval().requires_grad_(False)

    def _conditioning(self, te1, te2) -> dict[str, torch.Tensor]:
        """hidden_states[-2] of both towers and encoder 2's projection, for every caption and the negative prompt."""
        from sdxl.tokenizers import tokenize

        captions = [s.caption() for s in self.sampler.scenes] + [NEGATIVE_PROMPT]
        embeds, pooled = [], None
        with torch.no_grad():
            for encoder, tok in ((te1, self.tokenizers[0]), (te2, self.tokenizers[1])):
                out = encoder(tokenize(tok, captions), output_hidden_states=True)
                pooled = out[0]
                embeds.append(out.hidden_states[-2])
        return {"prompt_embeds": torch.cat(embeds, -1), "text_embeds": pooled}

    def _latent_pool(self, vae_state: dict) -> dict[str, torch.Tensor]:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL(**{**self.config["vae"], "scaling_factor": 1.0}).eval().requires_grad_(False)
        vae.load_state_dict(vae_state)
        n = len(self.sampler.scenes)
        per = self.plan.latent_pool_per_caption
        gen, rng = _generator(self.seed, "unet", 10**9)  # a step number no training step uses
        scene_idx = np.repeat(np.arange(n), per)
        seeds = rng.integers(0, 2**31, len(scene_idx))
        latents = []
        with torch.no_grad():
            for start in progress(range(0, len(scene_idx), 256), desc="encoding latent pool",
                                  disable=not self.show_progress):
                images = np.stack([render(self.sampler.scenes[i], int(s))
                                   for i, s in zip(scene_idx[start:start + 256], seeds[start:start + 256])])
                posterior = vae.encode(images_to_tensor(images)).latent_dist
                latents.append(posterior.mean + posterior.std * torch.randn(posterior.mean.shape, generator=gen))
        latents = torch.cat(latents)
        return {"latents": latents, "scene_idx": torch.from_numpy(scene_idx), "scaling_factor": float(1.0 / latents.std())}

    def train_unet(self, vae: dict, te1, te2) -> dict:
        from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

        if (done := self.done("unet")) is not None:
            return done
        plan = self.plan
        pool = self._latent_pool(vae["state"])
        cond = self._conditioning(te1, te2)
        negative = len(self.sampler.scenes)
        scheduler = EulerDiscreteScheduler.from_config(self.config["scheduler_config"])
        alphas = scheduler.alphas_cumprod.float()
        by_scene = [np.flatnonzero(pool["scene_idx"].numpy() == i) for i in range(negative)]
        size = IMAGE_SIZE
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)
        torch.manual_seed(self.seed + 7)
        unet = UNet2DConditionModel(**self.config["unet"]).train()
        ema = UNet2DConditionModel(**self.config["unet"]).eval().requires_grad_(False)
        ema.load_state_dict(unet.state_dict())
        opt = torch.optim.AdamW(unet.parameters(), lr=plan.unet_lr, weight_decay=0.0)
        scaling = pool["scaling_factor"]

        def step(_s, gen, rng):
            idx = self.sampler.indices(rng, plan.unet_batch)
            rows = np.array([rng.choice(by_scene[i]) for i in idx])
            x0 = pool["latents"][rows] * scaling
            cond_rows = np.where(rng.random(plan.unet_batch) < plan.caption_dropout, negative, idx)
            t = torch.randint(0, alphas.numel(), (plan.unet_batch,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            a = alphas[t].view(-1, 1, 1, 1)
            xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
            pred = unet(xt, t, encoder_hidden_states=cond["prompt_embeds"][cond_rows],
                        added_cond_kwargs={"text_embeds": cond["text_embeds"][cond_rows],
                                           "time_ids": time_ids.expand(plan.unet_batch, -1)}).sample
            return F.mse_loss(pred, noise)

        def update_ema():
            with torch.no_grad():
                for e, p in zip(ema.parameters(), unet.parameters()):
                    e.lerp_(p, 1 - plan.ema_decay)

        losses = self._loop("unet", plan.unet_steps, {"unet": unet, "ema": ema}, opt, step,
                            lambda s: _lr_at(s, plan.unet_steps, plan.unet_lr, plan.unet_warmup),
                            extra={"after_step": update_ema})
        payload = {"state": ema.state_dict(), "losses": losses, "scaling_factor": scaling}
        self._finish("unet", payload)
        return payload

    def run(self) -> dict:
        """All stages; returns ``{stage: payload}`` (payloads hold ``state`` and ``losses``)."""
        started = time.time()
        results = {"vae": self.train_vae()}
        for stage in ("clip_1", "clip_2", "scorer"):
            results[stage] = self.train_clip(stage)
        te1, te2 = self._text_encoders(results["clip_1"], results["clip_2"])
        results["unet"] = self.train_unet(results["vae"], te1, te2)
        results["text_encoder"], results["text_encoder_2"] = te1, te2
        results["seconds"] = time.time() - started
        return results


def write_report(workdir: Path, results: dict, plan: TrainingPlan, seed: int, command: str) -> dict:
    """``training_report.json`` and ``loss_curves.png`` in ``workdir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(STAGES), figsize=(4 * len(STAGES), 3))
    for ax, stage in zip(axes, STAGES):
        losses = np.asarray(results[stage]["losses"])
        ax.plot(losses, lw=0.4, alpha=0.4)
        window = max(1, len(losses) // 50)
        ax.plot(np.convolve(losses, np.ones(window) / window, mode="valid"), lw=1.2)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    axes[0].set_ylabel("loss")
    fig.tight_layout()
    fig.savefig(workdir / "loss_curves.png", dpi=100)
    plt.close(fig)
    report = {"command": command, "seed": seed, "plan": asdict(plan),
              "seconds": results.get("seconds"),
              "final_loss": {s: float(np.mean(results[s]["losses"][-100:])) for s in STAGES},
              "first_loss": {s: float(np.mean(results[s]["losses"][:20])) for s in STAGES},
              "vae_scaling_factor": results["unet"]["scaling_factor"]}
    write_json_atomic(workdir / "training_report.json", report)
    return report


def load_profile_config(path: Path) -> dict:
    config = json.loads(Path(path).read_text())
    config["scheduler_config"] = json.loads((Path(path).parent / config["scheduler"]).read_text())
    return config
