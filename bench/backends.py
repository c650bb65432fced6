"""Backend benchmark (issue 6): UNet latency and images/s of torch vs ONNX Runtime, FP32 vs quantized.

One run, one machine, interleaved repeats, so the ratios are side by side:

* UNet latency (CFG batch 2, best of ``--repeats``) for torch FP32, torch fake-quant (w8a8), ORT FP32,
  ORT INT8 (A8W8: ``w8a8``, and ``w8a8-qlinear`` whose conv outputs are quantized so ONNX Runtime fuses
  QLinearConv) and ORT A16W8 (``w8a16``), on tiny and on an SDXL-width UNet slice
  (SDXL's 320/640/1280 channels and attention widths, one layer per block, 32x32 latent);
* end-to-end images/s on tiny through the one SDXL pipeline for the same five variants (``--images``,
  20 steps each);
* ceilings: int8 GEMM throughput (ORT ``MatMulInteger`` u8s8) against fp32 GEMM (torch and ORT MatMul),
  and an Amdahl bound for the slice from its share of quantized MACs (attention's Q.K^T and softmax.V and
  the excluded layers stay fp32): ``1 / ((1 - f) + f / s)`` with ``s`` the int8/fp32 GEMM ratio.

Goal (issue 6): ORT A8W8 reaches >= 80% of the Amdahl bound over both torch FP32 and ORT FP32 on the
slice. A16W8 is reported only (ONNX Runtime's CPU EP runs it through fp32).

Usage: ``.venv/bin/python bench/backends.py [--repeats 5] [--images 1] [--skip-e2e]``. Prints tables
and writes JSON under ``results/bench/`` with the CPU model and ISA.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
OUT_DIR = ROOT / "results" / "bench"

from backends.onnx_export import unet_signature  # noqa: E402
from backends.ort_backend import create_session, run_bound  # noqa: E402
from backends.qdq_model import build_unet_model  # noqa: E402
from bench.calibration import sdxl_width_slice  # noqa: E402
from calibration.quantize import quantize  # noqa: E402
from quant.fake_quant import apply_encodings  # noqa: E402
from sdxl.io import format_table, write_json_atomic  # noqa: E402
from sdxl.system_info import isa_summary, system_description  # noqa: E402

RECIPES = {"ORT INT8 (A8W8)": "w8a8", "ORT INT8 (w8a8-qlinear)": "w8a8-qlinear", "ORT A16W8": "w8a16"}


def _unet_call(unet: torch.nn.Module, inputs: tuple) -> torch.Tensor:
    sample, timestep, states, text_embeds, time_ids = inputs
    return unet(sample, timestep, encoder_hidden_states=states,
                added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)[0]


def calibrate_unet(unet: torch.nn.Module, recipe: str, inputs: tuple, scales: tuple[float, ...] = (1.0, 0.7)):
    """Encodings from batches of the benchmark's own inputs, scaled (what is timed, not what is accurate).

    A recipe with ``MatMul`` adds the attention matmul modules to ``unet`` (pass a copy to keep it as is).
    """
    sample = inputs[0]
    loop = lambda m: [_unet_call(m, (sample * s, *inputs[1:])) for s in scales]  # noqa: E731
    return quantize(unet, recipe, loop, component="unet", apply=False)


def unet_variants(unet: torch.nn.Module, cache: Path, threads: int) -> tuple[dict, tuple, dict]:
    """name -> a callable running one CFG UNet call, for every variant; the inputs; name -> ORT model path."""
    inputs = unet_signature(unet, batch=2).example_inputs
    feeds = dict(zip(("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"), inputs))
    w8a8 = calibrate_unet(unet, "w8a8", inputs).components["unet"]
    fake_quant = copy.deepcopy(unet)
    apply_encodings(fake_quant, w8a8, "unet")
    variants = {"torch FP32": lambda: _unet_call(unet, inputs), "torch fake-quant (w8a8)": lambda: _unet_call(fake_quant, inputs)}
    models = {"ORT FP32": build_unet_model(unet, {}, cache / "fp32", show_progress=False)}
    for name, recipe in RECIPES.items():
        entries = w8a8 if recipe == "w8a8" else calibrate_unet(unet, recipe, inputs).components["unet"]
        models[name] = build_unet_model(unet, entries, cache / recipe, show_progress=False)
    for name, path in models.items():
        session = create_session(path, "cpu", threads)
        variants[name] = lambda session=session: run_bound(session, feeds, "noise_pred", inputs[0].shape)
    return variants, inputs, models


def kernel_shares(model: Path, inputs: tuple, threads: int, runs: int = 3) -> dict[str, float]:
    """Share of ONNX Runtime's kernel time per op type (its profiler, ``runs`` calls after a warm-up).

    What tells whether the integer kernels fired: an INT8 model whose time sits in fp32 ``Conv`` and
    ``DequantizeLinear`` runs its convolutions in floating point.
    """
    import json as _json
    from collections import Counter

    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.log_severity_level = 3
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    feeds = {name: t.numpy() for name, t in zip(("sample", "timestep", "encoder_hidden_states", "text_embeds",
                                                   "time_ids"), inputs)}
    session.run(None, feeds)
    options.enable_profiling = True
    options.profile_file_prefix = str(model.with_name("profile"))
    session = ort.InferenceSession(str(model), options, providers=["CPUExecutionProvider"])
    for _ in range(runs):
        session.run(None, feeds)
    events = _json.loads(Path(session.end_profiling()).read_text())
    times: Counter = Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            times[event["args"]["op_name"]] += event["dur"]
    total = sum(times.values()) or 1
    return {op: t / total for op, t in times.most_common()}


def conv_kernels(channels: int = 320, size: int = 32, repeats: int = 10) -> dict[str, float]:
    """ms of one 3x3 conv (batch 2, SDXL's first-level width) as fp32 ``Conv``, ``ConvInteger`` and ``QLinearConv``.

    ``ConvInteger`` would keep a ``w8a8`` model's numerics (no output quantizer); ``QLinearConv`` is
    what ONNX Runtime fuses when a QuantizeLinear follows the conv.
    """
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    shape = [2, channels, size, size]
    w = rng.standard_normal((channels, channels, 3, 3)).astype(np.float32)
    wq = rng.integers(-127, 127, (channels, channels, 3, 3)).astype(np.int8)
    scalars = {"xs": np.array(0.02, np.float32), "xz": np.array(128, np.uint8), "ws": np.array(0.01, np.float32),
               "wz": np.array(0, np.int8), "ys": np.array(0.05, np.float32), "yz": np.array(128, np.uint8)}

    def session(node, in_type, out_type, weight, extra=()):
        inits = [numpy_helper.from_array(weight, "w")] + [numpy_helper.from_array(scalars[k], k) for k in extra]
        graph = helper.make_graph([node], "conv", [helper.make_tensor_value_info("x", in_type, shape)],
                                  [helper.make_tensor_value_info("y", out_type, None)], initializer=inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    pads = {"pads": [1, 1, 1, 1]}
    x32, x8 = rng.standard_normal(shape).astype(np.float32), rng.integers(0, 255, shape).astype(np.uint8)
    kernels = {
        "fp32 Conv": (session(helper.make_node("Conv", ["x", "w"], ["y"], **pads), TensorProto.FLOAT, TensorProto.FLOAT, w), x32),
        "ConvInteger": (session(helper.make_node("ConvInteger", ["x", "w", "xz"], ["y"], **pads), TensorProto.UINT8,
                                TensorProto.INT32, wq, ("xz",)), x8),
        "QLinearConv": (session(helper.make_node("QLinearConv", ["x", "xs", "xz", "w", "ws", "wz", "ys", "yz"], ["y"], **pads),
                                TensorProto.UINT8, TensorProto.UINT8, wq, ("xs", "xz", "ws", "wz", "ys", "yz")), x8)}
    out = {}
    for name, (sess, x) in kernels.items():
        sess.run(None, {"x": x})
        out[name] = min(_timed(lambda: sess.run(None, {"x": x})) for _ in range(repeats)) * 1e3
    return out


def interleaved_best(variants: dict, repeats: int) -> dict[str, float]:
    """Best wall time per variant over ``repeats`` rounds, variants interleaved within each round."""
    best = {name: float("inf") for name in variants}
    with torch.inference_mode():
        for fn in variants.values():
            fn()  # warm-up
        for _ in range(repeats):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def gemm_ceilings(m: int = 2048, k: int = 1280, n: int = 1280, repeats: int = 10) -> dict[str, float]:
    """GOP/s of ORT MatMulInteger (u8 x s8) and GFLOP/s of fp32 GEMM in torch and ORT, SDXL-like shape."""
    import onnxruntime as ort
    from onnx import TensorProto, helper

    def session(op: str, a_type: int, b_type: int, out_type: int):
        graph = helper.make_graph([helper.make_node(op, ["a", "b"], ["y"])], op,
                                  [helper.make_tensor_value_info("a", a_type, [m, k]),
                                   helper.make_tensor_value_info("b", b_type, [k, n])],
                                  [helper.make_tensor_value_info("y", out_type, [m, n])])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
        options = ort.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])

    def best(fn) -> float:
        fn()
        return min(_timed(fn) for _ in range(repeats))

    rng = np.random.default_rng(0)
    a8, b8 = rng.integers(0, 255, (m, k), dtype=np.uint8), rng.integers(-128, 127, (k, n), dtype=np.int8)
    a32, b32 = rng.standard_normal((m, k), dtype=np.float32), rng.standard_normal((k, n), dtype=np.float32)
    int8 = session("MatMulInteger", TensorProto.UINT8, TensorProto.INT8, TensorProto.INT32)
    fp32 = session("MatMul", TensorProto.FLOAT, TensorProto.FLOAT, TensorProto.FLOAT)
    ta, tb = torch.from_numpy(a32), torch.from_numpy(b32)
    ops = 2.0 * m * k * n / 1e9
    return {"ort_int8_gops": ops / best(lambda: int8.run(None, {"a": a8, "b": b8})),
            "ort_fp32_gflops": ops / best(lambda: fp32.run(None, {"a": a32, "b": b32})),
            "torch_fp32_gflops": ops / best(lambda: torch.mm(ta, tb)), "shape": [m, k, n]}


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def quantized_mac_share(unet: torch.nn.Module, entries: dict, inputs: tuple) -> float:
    """Fraction of the UNet's MACs in layers whose weights the encodings quantize (attention bmm = fp32)."""
    quantized_modules = {key.split(":")[0] for key in entries if key.endswith(":weight[0]")}
    macs = {"quantized": 0, "float": 0}
    hooks = []
    for name, module in unet.named_modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            def hook(mod, args, out, name=name):
                per_output = mod.in_features if isinstance(mod, torch.nn.Linear) else \
                    mod.in_channels // mod.groups * mod.kernel_size[0] * mod.kernel_size[1]
                macs["quantized" if name in quantized_modules else "float"] += out.numel() * per_output
            hooks.append(module.register_forward_hook(hook))
        elif type(module).__name__ == "Attention":
            def attn_hook(mod, args, kwargs, out):
                hidden = args[0] if args else kwargs["hidden_states"]
                context = kwargs.get("encoder_hidden_states")
                lk = (context if context is not None else hidden).shape[1]
                macs["float"] += 2 * hidden.shape[0] * hidden.shape[1] * lk * mod.inner_dim  # QK^T and PV
            hooks.append(module.register_forward_hook(attn_hook, with_kwargs=True))
    with torch.inference_mode():
        _unet_call(unet, inputs)
    for handle in hooks:
        handle.remove()
    return macs["quantized"] / (macs["quantized"] + macs["float"])


def component_macs() -> dict[str, float]:
    """TMAC per 1024^2 image of each full-size SDXL component, counted on the meta device (no weights, no memory).

    Answers where a backend pays beyond the UNet: the VAE decode and the text encoders are a few
    percent of an image, so moving them to ONNX Runtime could gain at most that share.
    """
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.utils.flop_counter import FlopCounterMode
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from sdxl.models import model_spec

    config = model_spec("sdxl-random").profile_config

    def tmac(fn) -> float:
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            fn()
        return counter.get_total_flops() / 2 / 1e12

    with torch.device("meta"):
        unet = UNet2DConditionModel(**config["unet"]).eval()
        vae = AutoencoderKL(**config["vae"]).eval()
        encoders = [CLIPTextModel(CLIPTextConfig(**config["text_encoder"])).eval(),
                    CLIPTextModelWithProjection(CLIPTextConfig(**config["text_encoder_2"])).eval()]
        unet_call = tmac(lambda: unet(torch.randn(2, 4, 128, 128), torch.tensor(951.0),
                                      encoder_hidden_states=torch.randn(2, 77, 2048),
                                      added_cond_kwargs={"text_embeds": torch.randn(2, 1280),
                                                         "time_ids": torch.randn(2, 6)}))
        ids = torch.zeros(1, 77, dtype=torch.long)
        return {"unet (20 CFG calls)": 20 * unet_call, "vae decode": tmac(lambda: vae.decode(torch.randn(1, 4, 128, 128))),
                "text encoders (the prompt)": sum(tmac(lambda e=e: e(ids)) for e in encoders)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--images", type=int, default=1, help="tiny images per backend, end to end (default 1)")
    parser.add_argument("--skip-e2e", action="store_true", help="UNet latency and ceilings only")
    args = parser.parse_args()
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    threads = torch.get_num_threads()
    from sdxl.models import load_components, model_spec

    tiny_unet = load_components(model_spec("tiny"), show_progress=False).unet
    models = {"tiny": tiny_unet, "sdxl-width slice": sdxl_width_slice()}
    latency, shares, profiles = {}, {}, {}
    with tempfile.TemporaryDirectory(prefix="bench-backends-") as tmp:
        for label, unet in models.items():
            print(f"preparing {label}: calibrating, exporting", flush=True)
            variants, inputs, onnx_models = unet_variants(unet, Path(tmp) / label.replace(" ", "-"), threads)
            latency[label] = interleaved_best(variants, args.repeats)
            shares[label] = quantized_mac_share(unet, calibrate_unet(unet, "w8a8", inputs).components["unet"], inputs)
            if label == "tiny":
                tiny_inputs = inputs
            else:
                profiles = {name: kernel_shares(path, inputs, threads) for name, path in onnx_models.items()}
    convs = conv_kernels()
    ceilings = gemm_ceilings()
    components = component_macs()
    e2e = {} if args.skip_e2e else end_to_end(args.images, tiny_unet, tiny_inputs)

    print(f"\nCPU: {system_description()['cpu_model']} ({isa_summary()}), {threads} threads\n")
    names = list(next(iter(latency.values())))
    rows = [[name] + [f"{latency[label][name] * 1e3:.1f}" for label in latency]
            + [f"{latency['sdxl-width slice']['torch FP32'] / latency['sdxl-width slice'][name]:.2f}x"] for name in names]
    print("UNet latency, CFG batch 2 (ms, best of repeats, interleaved)")
    print(format_table(["variant"] + [f"{label} (ms)" for label in latency] + ["slice vs torch FP32"], rows))
    gemm_ratio = ceilings["ort_int8_gops"] / ceilings["ort_fp32_gflops"]
    f = shares["sdxl-width slice"]
    bound = 1 / ((1 - f) + f / gemm_ratio)
    slice_ms = latency["sdxl-width slice"]
    speedups = {name: {"vs_torch_fp32": slice_ms["torch FP32"] / slice_ms[name],
                       "vs_ort_fp32": slice_ms["ORT FP32"] / slice_ms[name]}
                for name in ("ORT INT8 (A8W8)", "ORT INT8 (w8a8-qlinear)")}
    print(f"\nGEMM {ceilings['shape']}: ORT int8 u8s8 {ceilings['ort_int8_gops']:.0f} GOP/s, ORT fp32 "
          f"{ceilings['ort_fp32_gflops']:.0f} GFLOP/s, torch fp32 {ceilings['torch_fp32_gflops']:.0f} GFLOP/s")
    print(f"slice: {f:.1%} of MACs quantized; Amdahl bound {bound:.2f}x (int8/fp32 GEMM {gemm_ratio:.2f}x)")
    for name, speedup in speedups.items():
        vs_torch, vs_ort = speedup["vs_torch_fp32"], speedup["vs_ort_fp32"]
        print(f"{name} speed-up: {vs_torch:.2f}x over torch FP32 ({vs_torch / bound:.0%} of bound), "
              f"{vs_ort:.2f}x over ORT FP32 ({vs_ort / bound:.0%} of bound); goal >= 80%")
    print("\nslice: ONNX Runtime kernel time by op type (its profiler)")
    for name, share in profiles.items():
        print(f"  {name}: " + ", ".join(f"{op} {v:.0%}" for op, v in list(share.items())[:5]))
    print("one 3x3 conv, 2x320x32x32 (ms): " + ", ".join(f"{k} {v:.2f}" for k, v in convs.items()))
    total = sum(components.values())
    print("\nfull-size SDXL compute per 1024^2 image (meta-device count): " +
          ", ".join(f"{name} {v:.2f} TMAC ({v / total:.1%})" for name, v in components.items()))
    if e2e:
        print("\ntiny end to end, 20 steps, batch 1 (text encoders and VAE: torch, fake-quantized where encoded)")
        print(format_table(["backend", "images/s"], [[k, f"{v:.3f}"] for k, v in e2e.items()]))
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    path = OUT_DIR / f"backends-{stamp}.json"
    write_json_atomic(path, {"benchmark": "backends", "system": system_description(), "threads": threads,
                             "unet_latency_s": latency, "quantized_mac_share": shares, "gemm": ceilings,
                             "amdahl_bound": bound, "a8w8_speedup": speedups,
                             "full_size_tmac_per_image": components, "slice_kernel_shares": profiles,
                             "conv_kernels_ms": convs,
                             "end_to_end_images_per_s": e2e})
    print(f"\nwritten {path}")
    return 0


def end_to_end(images: int, unet: torch.nn.Module, inputs: tuple) -> dict[str, float]:
    """Images/s of tiny through the one SDXL pipeline (the harness's real path) for every variant."""
    from backends import BackendOptions, create_backend
    from sdxl.latents import draw_latent
    from sdxl.models import load_tokenizers, model_spec
    from sdxl.pipeline import SDXLPipeline
    from sdxl.tokenizers import tokenize

    spec = model_spec("tiny")
    tokenizers = load_tokenizers(spec)
    ids = [tokenize(t, ["a photo of a cat"]) for t in tokenizers]
    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as cache:
        files = {recipe: str(calibrate_unet(unet, recipe, inputs).save(Path(cache) / f"{recipe}.json"))
                 for recipe in ("w8a8", "w8a8-qlinear", "w8a16")}
        variants = {"torch FP32": ("torch", None), "torch fake-quant (w8a8)": ("torch", files["w8a8"]),
                    "ORT FP32": ("ort", None), "ORT INT8 (A8W8)": ("ort", files["w8a8"]),
                    "ORT INT8 (w8a8-qlinear)": ("ort", files["w8a8-qlinear"]), "ORT A16W8": ("ort", files["w8a16"])}
        for name, (backend_name, encodings) in variants.items():
            options = BackendOptions(show_progress=False, encodings=encodings, extra={"cache_dir": cache})
            pipeline = SDXLPipeline(create_backend(backend_name, spec, options), spec, tokenizers)
            pipeline.generate(*ids, draw_latent(spec.latent_size))  # warm-up
            start = time.perf_counter()
            for _ in range(images):
                pipeline.generate(*ids, draw_latent(spec.latent_size))
            out[name] = images / (time.perf_counter() - start)
    return out


if __name__ == "__main__":
    raise SystemExit(main())
