"""``torch`` (alias ``pytorch``): the SDXL components as PyTorch modules, fp32/fp16/bf16, CPU or CUDA.

With ``--encodings`` the same modules run fake-quantized (quantize -> dequantize at the points the
encodings name), which is the numerical reference for the ONNX Runtime and TensorRT backends.
"""

from __future__ import annotations

import warnings

import torch

from sdxl.backend import DTYPES, Backend, BackendOptions
from sdxl.models import ModelComponents, load_components
from sdxl.system_info import slow_dtype_warning

from .registry import register_backend


class TorchBackend(Backend):
    name = "torch"
    #: components a subclass runs (and quantizes) in another runtime from the same encodings
    runs_elsewhere: tuple[str, ...] = ()

    def __init__(self, spec, options: BackendOptions, components: ModelComponents | None = None):
        super().__init__(spec, options)
        if options.recipe and not options.encodings:
            raise ValueError(f"backend options name recipe {options.recipe!r} but no encodings: a backend loads "
                             "encodings and never calibrates (calibrate first, or use run --recipe)")
        if (slow := slow_dtype_warning(options.dtype, options.device)) is not None:
            warnings.warn(slow, stacklevel=2)
        if components is None:
            components = load_components(spec, self.dtype, options.show_progress)
        self.components = components
        # a component another runtime runs stays as loaded: its exporter reads the FP32 module on the CPU
        placed = {name: getattr(components, name) if name in self.runs_elsewhere
                  else _placed(getattr(components, name), self.device, self.component_dtype(name))
                  for name in ("text_encoder", "text_encoder_2", "unet", "vae")}
        self.text_encoder, self.text_encoder_2 = placed["text_encoder"], placed["text_encoder_2"]
        self.unet, self.vae = placed["unet"], placed["vae"]
        if self._use_channels_last():
            for name in ("unet", "vae"):
                if name not in self.runs_elsewhere:
                    placed[name].to(memory_format=torch.channels_last)
        self.quantization = None
        if options.encodings:
            from quant.fake_quant import apply_to_components, load_encodings_for

            encodings = load_encodings_for(components, options.encodings,
                                           bool(options.extra.get("allow_fingerprint_mismatch")))
            self.quantization = apply_to_components(components, encodings, options.encodings, skip=self.runs_elsewhere)

    @classmethod
    def from_components(cls, components: ModelComponents, show_progress: bool = False) -> "TorchBackend":
        """The torch backend over already-loaded components, as they are: no second load, no quantization.

        The calibration capture runs the very modules it then calibrates (in their own dtype).
        """
        dtype = next(name for name, value in DTYPES.items() if value == next(components.unet.parameters()).dtype)
        return cls(components.spec, BackendOptions(dtype=dtype, show_progress=show_progress), components)

    def component_dtype(self, name: str) -> torch.dtype:
        """``--dtype``, but the VAE's FP32 in FP16 runs: diffusers upcasts SDXL's VAE (``force_upcast``), whose
        FP16 decode overflows."""
        if name == "vae" and self.dtype == torch.float16 and self.components.vae.config.force_upcast:
            return torch.float32
        return self.dtype

    def _use_channels_last(self) -> bool:
        """Channels-last helps cuDNN/oneDNN convolutions on GPUs; on CPUs it measured no gain for fp32."""
        if self.options.channels_last is not None:
            return self.options.channels_last
        return self.device.type == "cuda"

    def describe(self) -> dict:
        out = super().describe()
        if self.quantization is not None:
            out["quantization"] = self.quantization.describe()
        return out

    @property
    def vae_scaling_factor(self) -> float:
        return float(self.vae.config.scaling_factor)

    def encode_prompts(self, ids_1, ids_2):
        embeds = []
        pooled = None
        for encoder, ids in ((self.text_encoder, ids_1), (self.text_encoder_2, ids_2)):
            out = encoder(ids.to(self.device), output_hidden_states=True)
            pooled = out[0]
            embeds.append(out.hidden_states[-2])
        return torch.cat(embeds, dim=-1).to(self.text_encoder_2.dtype), pooled

    def predict_noise(self, latent_input, timestep, prompt_embeds, text_embeds, time_ids):
        return self.unet(latent_input, timestep, encoder_hidden_states=prompt_embeds,
                         added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids},
                         return_dict=False)[0]

    def decode(self, latents):
        vae_dtype = next(self.vae.post_quant_conv.parameters()).dtype
        return self.vae.decode(latents.to(vae_dtype), return_dict=False)[0]


register_backend("torch", TorchBackend, aliases=("pytorch",))


def _placed(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` on ``device`` in ``dtype``, cast only when it is not already (diffusers warns on every cast)."""
    module = module.to(device)
    return module if module.dtype == dtype else module.to(dtype)
