"""The encodings file: round trip, clear errors naming the key, and the AIMET 1.0.0 export vs a golden file."""

from __future__ import annotations

import json

import pytest
import torch

from quant.aimet_export import export_aimet, to_aimet
from quant.encodings import Encoding, Encodings, EncodingsError
from quant.formats import get_format
from quant.quantizers import qparams_from_range

RECIPE = {"name": "w8a8", "weights": {"dtype": "int8", "symmetric": True, "axis": 0, "observer": "minmax"},
          "inputs": {"dtype": "uint8", "symmetric": False, "axis": None, "observer": "minmax"}}


def _enc(dtype, scale, offset, axis=None, symmetric=False) -> Encoding:
    return Encoding(dtype, get_format(dtype).bits, symmetric, axis, scale, offset, [], [])


def _example() -> Encodings:
    enc = Encodings(recipe=RECIPE, model={"profile": "tiny", "fingerprint": "tiny-abc"})
    unet = enc.component("unet")
    unet["conv_in:weight[0]"] = _enc("int8", [0.5, 0.25], [0, 0], axis=0, symmetric=True)
    unet["conv_in:input[0]"] = _enc("uint8", [0.02], [100])
    unet["mid_block.attn.to_q:input[0]"] = _enc("float8e4m3fn", [0.01], [0], symmetric=True)
    unet["up.proj:input[0]"] = _enc("uint16", [0.001], [30000])
    unet["up.proj:weight[0]"] = _enc("uint8", [0.125], [7])
    enc.excluded["unet"] = ["conv_out"]
    return enc


# Written by hand from the AIMET 1.0.0 spec (qualcomm/aimet Docs/techniques/encoding_spec.rst) and the
# offset convention of aimet_onnx qc_quantize_op.py (offset = -zero_point, minus 2**(bw-1) when signed).
GOLDEN_AIMET_UNET = {
    "version": "1.0.0",
    "activation_encodings": [
        {"name": "conv_in:input[0]", "enc_type": "PER_TENSOR", "dtype": "INT", "bw": 8, "is_sym": False,
         "scale": [0.02], "offset": [-100]},
        {"name": "mid_block.attn.to_q:input[0]", "enc_type": "PER_TENSOR", "dtype": "FLOAT", "bw": 8},
        {"name": "up.proj:input[0]", "enc_type": "PER_TENSOR", "dtype": "INT", "bw": 16, "is_sym": False,
         "scale": [0.001], "offset": [-30000]},
    ],
    "param_encodings": [
        {"name": "conv_in.weight", "enc_type": "PER_CHANNEL", "dtype": "INT", "bw": 8, "is_sym": True,
         "scale": [0.5, 0.25], "offset": [-128, -128]},
        {"name": "up.proj.weight", "enc_type": "PER_TENSOR", "dtype": "INT", "bw": 8, "is_sym": False,
         "scale": [0.125], "offset": [-7]},
    ],
    "quantizer_args": {"activation_bitwidth": 8, "dtype": "int", "is_symmetric": True, "param_bitwidth": 8,
                       "per_channel_quantization": True, "quant_scheme": "post_training_tf"},
    "excluded_layers": ["conv_out"],
}


def test_aimet_export_matches_golden_file(tmp_path):
    doc, lost = to_aimet(_example(), "unet")
    assert doc == GOLDEN_AIMET_UNET
    assert lost == ["mid_block.attn.to_q:input[0]"]  # AIMET 1.0.0 FLOAT encodings carry no scale
    written = export_aimet(_example(), tmp_path / "enc.json")
    assert json.loads(written["unet"].read_text()) == GOLDEN_AIMET_UNET
    assert written["unet"].name == "enc.aimet.unet.json"


def test_aimet_offset_round_trips_to_the_same_real_range():
    """AIMET's grid is [0, 2**bw - 1] with min = offset * scale: check it equals our ONNX-style range."""
    for dtype, symmetric, lo, hi in (("int8", True, -1.3, 0.7), ("uint8", False, -0.4, 2.2), ("uint16", False, -3.0, 1.0)):
        fmt = get_format(dtype)
        enc = Encoding.from_qparams(qparams_from_range(torch.tensor(lo), torch.tensor(hi), fmt, symmetric))
        entry = to_aimet(Encodings(components={"m": {"x:input[0]": enc}}), "m")[0]["activation_encodings"][0]
        aimet_min = entry["offset"][0] * entry["scale"][0]
        aimet_max = aimet_min + entry["scale"][0] * (2 ** fmt.bits - 1)
        assert aimet_min == pytest.approx(enc.min[0], rel=1e-6) and aimet_max == pytest.approx(enc.max[0], rel=1e-6)


def test_encodings_round_trip(tmp_path):
    enc = _example()
    enc.component("unet")["a.b:output[0]"] = [
        Encoding("uint8", 8, False, None, [0.1], [3], [], [], timesteps=(501, 999)),
        Encoding("uint8", 8, False, None, [0.2], [5], [], [], timesteps=(1, 500))]
    path = enc.save(tmp_path / "e.json")
    back = Encodings.load(path)
    assert back.to_json() == Encodings.from_json(json.loads(path.read_text())).to_json()
    assert back.components["unet"]["conv_in:weight[0]"].scale == [0.5, 0.25]
    assert back.components["unet"]["a.b:output[0]"][1].timesteps == (1, 500)
    assert back.model["fingerprint"] == "tiny-abc"
    assert back.components["unet"]["conv_in:input[0]"].min == pytest.approx([-2.0])


@pytest.mark.parametrize("mutate,message", [
    (lambda d: d["components"]["unet"].update({"conv_in:wieght[0]": d["components"]["unet"]["conv_in:weight[0]"]}),
     "conv_in:wieght\\[0\\]: bad key"),
    (lambda d: d["components"]["unet"]["conv_in:input[0]"].update(scale=[-1.0]), "conv_in:input\\[0\\]: every scale"),
    (lambda d: d["components"]["unet"]["conv_in:input[0]"].update(dtype="int9"), "conv_in:input\\[0\\]: unknown quantized dtype"),
    (lambda d: d["components"]["unet"]["conv_in:input[0]"].update(offset=[300]), "offset outside"),
    (lambda d: d["components"]["unet"]["conv_in:weight[0]"].update(axis=None), "no axis"),
    (lambda d: d.update(format="aimet"), "not an sdxl-ptq-bench encodings file"),
])
def test_bad_files_name_the_key(mutate, message):
    data = _example().to_json()
    mutate(data)
    with pytest.raises(EncodingsError, match=message):
        Encodings.from_json(data, "f.json")
