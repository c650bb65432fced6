"""Weight loaders on locally saved random files in the exact cache layouts; QuickGELU; missing-file messages.

No real weights can be downloaded here, so each accepted layout gets a random file of the right
architecture: pytorch-fid's checkpoint in ``$TORCH_HOME/hub/checkpoints``, open_clip >= 3's Hugging
Face cache entry (``HF_HUB_OFFLINE=1``), and a TorchScript archive like OpenAI's ``ViT-B-32.pt``.
"""

from __future__ import annotations

import pytest
import torch
from accuracy_helpers.fixtures import random_clip, random_inception  # noqa: F401 (fixtures)

from accuracy.clip_score import ClipScorer, load_clip_state_dict, uses_quick_gelu
from accuracy.fid import InceptionFeatures
from accuracy.spec import weight_info
from accuracy.weights import WeightsUnavailable, file_sha256, resolve_clip, resolve_inception


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # ~/.cache/clip
    return tmp_path


def test_missing_weights_are_one_line_naming_the_file_and_how_to_get_it(empty_caches):
    with pytest.raises(WeightsUnavailable) as inception:
        resolve_inception()
    message = str(inception.value)
    assert "\n" not in message and "pt_inception-2015-12-05-6726825d.pth" in message
    assert str(empty_caches / "torch" / "hub" / "checkpoints") in message and "releases/download/fid_weights" in message
    with pytest.raises(WeightsUnavailable) as clip:
        resolve_clip()
    message = str(clip.value)
    assert "\n" not in message and "timm/vit_base_patch32_clip_224.openai" in message and "ViT-B-32.pt" in message
    with pytest.raises(WeightsUnavailable, match="--clip-weights .*absent.pt not found"):
        resolve_clip(empty_caches / "absent.pt")


def test_inception_from_torch_hub_cache_layout(empty_caches, random_inception):
    state_dict = {k: torch.randn_like(v) if v.is_floating_point() else v
                  for k, v in _fid_inception_state_dict(random_inception).items()}
    target = empty_caches / "torch" / "hub" / "checkpoints" / weight_info("inception")["file_name"]
    target.parent.mkdir(parents=True)
    torch.save(state_dict, target)
    weights = resolve_inception()
    assert weights.path == target and weights.source == "torch hub cache" and weights.format == "state_dict"
    assert weights.sha256 == file_sha256(target) and weights.official is False  # random, not the official bytes
    loaded = InceptionFeatures(weights)
    conv = loaded.model.blocks[0][0].conv.weight
    assert torch.equal(conv, state_dict["Conv2d_1a_3x3.conv.weight"])


def _fid_inception_state_dict(features: InceptionFeatures) -> dict:
    """pytorch-fid's checkpoint keys (torchvision Inception3 names) from the blocks of a built network."""
    names = ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", None, "Conv2d_3b_1x1", "Conv2d_4a_3x3", None,
             "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
             "Mixed_7a", "Mixed_7b", "Mixed_7c", None]
    modules = [m for block in features.model.blocks for m in block]
    state = {}
    for name, module in zip(names, modules):
        if name:
            state.update({f"{name}.{k}": v for k, v in module.state_dict().items()})
    state["fc.weight"], state["fc.bias"] = torch.zeros(1008, 2048), torch.zeros(1008)
    return state


def test_clip_from_hugging_face_cache_layout_offline(empty_caches, random_clip):
    from safetensors.torch import save_file

    info = weight_info("clip_hf")
    repo = empty_caches / "hf" / "hub" / ("models--" + info["repo_id"].replace("/", "--"))
    revision = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    snapshot = repo / "snapshots" / revision / "open_clip_model.safetensors"
    snapshot.parent.mkdir(parents=True)
    state = {k: (torch.randn_like(v) if v.is_floating_point() else v).half().contiguous()
             for k, v in random_clip.model.state_dict().items()}
    save_file(state, str(snapshot))
    weights = resolve_clip()
    assert weights.path == snapshot and weights.format == "safetensors" and weights.official is None  # HF sha not pinned
    loaded = ClipScorer(weights)
    assert torch.equal(loaded.model.visual.conv1.weight, state["visual.conv1.weight"].float())
    assert uses_quick_gelu(loaded.model)


class _OpenAIStyleArchive(torch.nn.Module):
    """A TorchScript archive with OpenAI's extra integer entries (input_resolution, ...) beside the weights."""

    def __init__(self) -> None:
        super().__init__()
        self.positional_embedding = torch.nn.Parameter(torch.randn(3, 2))
        self.ln_final = torch.nn.LayerNorm(2)
        self.register_buffer("input_resolution", torch.tensor(224))
        self.register_buffer("context_length", torch.tensor(77))
        self.register_buffer("vocab_size", torch.tensor(49408))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln_final(x + self.positional_embedding)


def test_openai_torchscript_file_is_recognised_and_its_extra_keys_dropped(empty_caches):
    import warnings

    target = empty_caches / "home" / ".cache" / "clip" / "ViT-B-32.pt"
    target.parent.mkdir(parents=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.script(_OpenAIStyleArchive())
        module.save(str(target))
        weights = resolve_clip()
        assert weights.path == target and weights.format == "torchscript" and weights.source == "openai clip cache"
        assert weights.official is False  # the file name says OpenAI, the bytes do not
        state = load_clip_state_dict(weights)
    assert set(state) == {"positional_embedding", "ln_final.weight", "ln_final.bias"}
    assert torch.equal(state["positional_embedding"], module.positional_embedding)


def test_clip_model_uses_quick_gelu_like_open_clip_2_26_openai(random_clip):
    from open_clip.transformer import QuickGELU

    activations = [m for m in random_clip.model.modules() if isinstance(m, (QuickGELU, torch.nn.GELU))]
    assert len(activations) == 24 and all(type(m) is QuickGELU for m in activations)  # 12 visual + 12 text blocks
    assert uses_quick_gelu(random_clip.model)


def test_wrong_architecture_in_a_clip_file_is_a_clear_error(empty_caches):
    bad = empty_caches / "bad.bin"
    torch.save({"visual.conv1.weight": torch.zeros(1)}, bad)
    with pytest.raises(ValueError, match="is not a CLIP ViT-B-32 checkpoint"):
        ClipScorer(resolve_clip(bad))
