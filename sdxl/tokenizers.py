"""SDXL's two CLIP BPE tokenizers, built offline from the vocabulary that ships inside ``open_clip``.

SDXL uses OpenAI's CLIP BPE (49,408 tokens) twice: tokenizer 1 pads with ``<|endoftext|>`` (id 49407),
tokenizer 2 (OpenCLIP ViT-bigG's) pads with ``!`` (id 0). Both truncate/pad to 77 tokens. The merges
file ``bpe_simple_vocab_16e6.txt.gz`` inside ``open_clip`` is the same BPE; we derive ``vocab.json``
and ``merges.txt`` from it exactly as ``open_clip.SimpleTokenizer`` orders them, so no download is
needed and the ids are the real ones.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tempfile
from functools import lru_cache
from pathlib import Path

from transformers import CLIPTokenizer

from .benchmark_spec import TOKENIZER_MAX_LENGTH
from .errors import UserError

#: Entries of the BPE merges list that CLIP uses (49152 - 256 - 2 + 1, as open_clip slices it).
_NUM_MERGES = 49152 - 256 - 2
PAD_TOKEN_1 = "<|endoftext|>"
PAD_TOKEN_2 = "!"


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable-unicode map."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def open_clip_bpe_path() -> Path:
    """Path of the CLIP BPE merges shipped by open_clip (no network)."""
    import open_clip

    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise UserError(f"{path} is missing: reinstall open_clip_torch (it ships the CLIP BPE vocabulary)")
    return path


def write_clip_vocab(directory: Path) -> tuple[Path, Path]:
    """Write ``vocab.json`` and ``merges.txt`` for the CLIP BPE into ``directory``; return both paths."""
    lines = gzip.open(open_clip_bpe_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : _NUM_MERGES + 1]]
    tokens = list(_bytes_to_unicode().values())
    tokens = tokens + [t + "</w>" for t in tokens] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    vocab_path, merges_path = directory / "vocab.json", directory / "merges.txt"
    vocab_path.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False), encoding="utf-8")
    merges_path.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    return vocab_path, merges_path


@lru_cache(maxsize=1)
def _vocab_dir() -> Path:
    """A per-user cache of the derived vocabulary, keyed on the BPE file's hash."""
    digest = hashlib.sha256(open_clip_bpe_path().read_bytes()).hexdigest()[:16]
    directory = Path.home() / ".cache" / "sdxl-ptq-bench" / f"clip-bpe-{digest}"
    if not (directory / "merges.txt").is_file():
        tmp = Path(tempfile.mkdtemp(prefix=directory.name, dir=directory.parent if directory.parent.exists() else None))
        write_clip_vocab(tmp)
        directory.parent.mkdir(parents=True, exist_ok=True)
        try:
            tmp.replace(directory)  # atomic; a concurrent writer may have won, which is equally fine
        except OSError:
            shutil.rmtree(tmp, ignore_errors=True)
    return directory


def build_sdxl_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """SDXL's ``tokenizer`` and ``tokenizer_2``: the same BPE, padded with 49407 and with 0 respectively.

    ``from_pretrained`` on a directory of ``vocab.json`` + ``merges.txt`` works across transformers
    4.x (slow tokenizer files) and 5.x (tokenizers backend), whose constructors differ.
    """
    directory = _vocab_dir()
    common = dict(model_max_length=TOKENIZER_MAX_LENGTH, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                  unk_token="<|endoftext|>")
    return (CLIPTokenizer.from_pretrained(directory, pad_token=PAD_TOKEN_1, **common),
            CLIPTokenizer.from_pretrained(directory, pad_token=PAD_TOKEN_2, **common))


def save_tokenizer(tokenizer: CLIPTokenizer, directory: Path) -> None:
    """``save_pretrained`` plus ``vocab.json`` and ``merges.txt``, the files real SDXL checkpoints ship.

    transformers 5 writes only ``tokenizer.json``; checkpoints we write must look like the ones users
    download (and load under transformers 4), so the BPE files are written from the tokenizer's own model.
    """
    tokenizer.save_pretrained(directory)
    if (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file():
        return
    model = json.loads(tokenizer.backend_tokenizer.to_str())["model"] if hasattr(tokenizer, "backend_tokenizer") else None
    if model is None or model.get("type") != "BPE":
        raise ValueError(f"cannot write vocab.json/merges.txt for {type(tokenizer).__name__}: not a BPE tokenizer")
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    (directory / "vocab.json").write_text(json.dumps(model["vocab"], ensure_ascii=False), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n", encoding="utf-8")


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]):
    """Token ids as the MLPerf reference makes them: pad to 77, truncate, ``(N, 77)`` int64 tensor."""
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
