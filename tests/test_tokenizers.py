"""SDXL's tokenizers, built offline from open_clip's BPE: literal ids, including the two pad ids."""

import open_clip
import pytest

from sdxl.tokenizers import build_sdxl_tokenizers, tokenize


@pytest.fixture(scope="module")
def tokenizers():
    return build_sdxl_tokenizers()


def test_known_caption_ids(tokenizers):
    t1, t2 = tokenizers
    ids_1 = tokenize(t1, ["a photo of a cat"])[0].tolist()
    ids_2 = tokenize(t2, ["a photo of a cat"])[0].tolist()
    # <|startoftext|> a photo of a cat <|endoftext|>, as OpenAI's CLIP tokenizes it
    assert ids_1[:7] == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert ids_2[:7] == ids_1[:7]
    assert len(ids_1) == len(ids_2) == 77
    assert ids_1[7:] == [49407] * 70  # tokenizer 1 pads with <|endoftext|>
    assert ids_2[7:] == [0] * 70  # tokenizer 2 (OpenCLIP bigG) pads with "!" = 0


def test_mlperf_negative_prompt_and_vocab(tokenizers):
    t1, t2 = tokenizers
    assert len(t1) == len(t2) == 49408
    assert t2.convert_ids_to_tokens(0) == "!"
    text = "normal quality, low quality, worst quality, low res, blurry, nsfw, nude"
    ids = tokenize(t1, [text])[0]
    # open_clip's own tokenizer (the CLIP score's) agrees token for token up to its zero padding
    reference = open_clip.tokenize([text])[0]
    n = int((reference != 0).sum())
    assert ids[:n].tolist() == reference[:n].tolist()
    assert ids[1:4].tolist() == [5967, 3027, 267]  # "normal", "quality", ","


def test_truncation_keeps_77_and_ends_with_eos(tokenizers):
    t1, _ = tokenizers
    ids = tokenize(t1, ["cat " * 200])[0].tolist()
    assert len(ids) == 77 and ids[0] == 49406 and ids[-1] == 49407
