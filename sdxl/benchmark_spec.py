"""The MLPerf ``stable-diffusion-xl`` benchmark definition, as constants.

Every number here comes from the MLPerf Inference reference
(``text_to_image/backend_pytorch.py``, ``tools/latent.py``, ``loadgen/mlperf.conf``). Changing one
makes the run non-comparable with MLPerf results, so nothing in the harness overrides them.
"""

from __future__ import annotations

MLPERF_MODEL_NAME = "stable-diffusion-xl"
NUM_INFERENCE_STEPS = 20
GUIDANCE_SCALE = 8.0
NEGATIVE_PROMPT = "normal quality, low quality, worst quality, low res, blurry, nsfw, nude"
TOKENIZER_MAX_LENGTH = 77
LATENT_SEED = 0
LATENT_CHANNELS = 4
VAE_SCALE_FACTOR = 8
OFFICIAL_IMAGE_SIZE = 1024
#: LoadGen's performance_sample_count for SDXL (mlperf.conf), also the validation set size.
PERFORMANCE_SAMPLE_COUNT = 5000
#: Columns of MLPerf's captions TSV (``coco2014/captions/captions_source.tsv``).
CAPTIONS_TSV_COLUMNS = ("id", "image_id", "caption", "height", "width", "file_name", "coco_url")

#: sha256 of MLPerf's ``captions_source.tsv`` (file bytes) and of ``latents.pt``'s fp32 tensor contents,
#: so that ``run.json`` can say whether a run used the official inputs.
OFFICIAL_CAPTIONS_SHA256 = "2eeb95637b30fe5af26dd644bafa7affe4e5472ad0bda32d0feb1bd261280d5e"
OFFICIAL_LATENT_TENSOR_SHA256 = "ea2c5d770d8921c79b43fade2dcecab9c95baae0500f5a2bc860ceb45faeccb1"
