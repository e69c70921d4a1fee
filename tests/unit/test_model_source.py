"""Model sources: tiny built and loaded through the real path; every start-up error names its cause."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch

from deployments.weights import loading
from deployments.weights.model_source import ModelSourceError, resolve_model_source
from deployments.weights.tiny_checkpoint import ensure_tiny_checkpoint

CPU = torch.device("cpu")


def digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_tiny_is_in_diffusers_layout_and_loads_in_diffusers(tiny_source, diffusers_t2i):
    root = Path(tiny_source.location)
    for part in ("model_index.json", "transformer", "text_encoder", "tokenizer", "vae", "scheduler"):
        assert (root / part).exists(), part
    assert type(diffusers_t2i).__name__ == "ZImagePipeline"
    assert type(diffusers_t2i.transformer).__name__ == "ZImageTransformer2DModel"
    assert tiny_source.random_weights


def test_tiny_build_is_deterministic(tiny_source, tmp_path):
    again = ensure_tiny_checkpoint(tmp_path)
    assert digest(again) == digest(Path(tiny_source.location))


def test_tiny_tokenizer_is_a_real_bpe_with_qwen3_chat_template(tiny_source):
    tokenizer = loading.load_tokenizer(tiny_source)
    ids = tokenizer("a red fox in fresh snow")["input_ids"]
    assert 1 < len(ids) < len("a red fox in fresh snow")  # merges happened, not one id per byte
    assert tokenizer.decode(ids) == "a red fox in fresh snow"
    messages = [{"role": "user", "content": "a cat"}]
    thinking = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=True)
    plain = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert thinking == "<|im_start|>user\na cat<|im_end|>\n<|im_start|>assistant\n"
    assert plain == thinking + "<think>\n\n</think>\n\n"
    assert tokenizer.convert_tokens_to_ids("<|im_start|>") != tokenizer.unk_token_id
    assert len(tokenizer.tokenize("<|im_start|>")) == 1


def test_text_encoder_output_is_diffusers_penultimate_hidden_state(tiny_source, diffusers_t2i):
    ours = loading.load_text_encoder(tiny_source, CPU, torch.float32)
    ids = torch.tensor([[5, 17, 200, 33, 8]])
    full = diffusers_t2i.text_encoder(input_ids=ids, output_hidden_states=True).hidden_states[-2]
    assert torch.allclose(ours(input_ids=ids).last_hidden_state, full, atol=1e-6)
    assert len(ours.layers) == diffusers_t2i.text_encoder.config.num_hidden_layers - 1


def copy_checkpoint(tiny_source, tmp_path) -> Path:
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_source.location, target)
    return target


def test_unknown_name_is_rejected_with_the_accepted_forms():
    with pytest.raises(ModelSourceError, match="unknown model 'not a model'.*'tiny' or 'random'"):
        resolve_model_source("not a model")


def test_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelSourceError, match="does not exist"):
        resolve_model_source(str(tmp_path / "nowhere"))


def test_directory_without_model_index_is_rejected(tmp_path):
    with pytest.raises(ModelSourceError, match="model_index.json is missing"):
        resolve_model_source(str(tmp_path))


@pytest.mark.parametrize(
    "remove,loader,message",
    [
        ("vae", "load_vae", "the vae/ folder is missing"),
        ("vae/diffusion_pytorch_model.safetensors", "load_vae", "vae/ has no weight files"),
        ("transformer/config.json", "load_transformer", "transformer/config.json is missing"),
        ("scheduler/scheduler_config.json", "load_scheduler", "scheduler/scheduler_config.json is missing"),
        ("tokenizer/tokenizer.json", "load_tokenizer", "tokenizer/ has neither tokenizer.json"),
    ],
)
def test_incomplete_directory_names_the_missing_part(tiny_source, tmp_path, remove, loader, message):
    root = copy_checkpoint(tiny_source, tmp_path)
    victim = root / remove
    shutil.rmtree(victim) if victim.is_dir() else victim.unlink()
    source = resolve_model_source(str(root))
    args = () if loader in ("load_scheduler", "load_tokenizer") else (CPU, torch.float32)
    with pytest.raises(ModelSourceError, match=message):
        getattr(loading, loader)(source, *args)


def test_component_of_the_wrong_class_is_named(tiny_source, tmp_path):
    root = copy_checkpoint(tiny_source, tmp_path)
    index = json.loads((root / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    (root / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelSourceError, match="'transformer' is a FluxTransformer2DModel, expected"):
        loading.load_transformer(resolve_model_source(str(root)), CPU, torch.float32)


def test_each_stage_loads_only_its_own_parts(tiny_source, tmp_path):
    """A checkpoint holding only the VAE still serves the VAE stage."""
    root = copy_checkpoint(tiny_source, tmp_path)
    for part in ("transformer", "text_encoder"):
        shutil.rmtree(root / part)
    vae = loading.load_vae(resolve_model_source(str(root)), CPU, torch.float32)
    assert type(vae).__name__ == "AutoencoderKL"


def test_cuda_without_a_gpu_fails_at_start():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(ModelSourceError, match="no CUDA device"):
        loading.resolve_device("cuda")
    assert loading.resolve_device("auto").type == "cpu"


def test_hub_id_is_recognised_without_touching_the_network():
    source = resolve_model_source("Tongyi-MAI/Z-Image-Turbo")
    assert (source.kind, source.location) == ("hub", "Tongyi-MAI/Z-Image-Turbo")
    assert resolve_model_source("random").is_random


@pytest.mark.parametrize("loader, cls_path, subfolder", [
    ("load_transformer", "diffusers.ZImageTransformer2DModel", "transformer"),
    ("load_vae", "diffusers.AutoencoderKL", "vae"),
    ("load_text_encoder", "transformers.Qwen3Model", "text_encoder"),
])
def test_weights_are_read_onto_the_stages_device_and_equal_a_plain_load(tiny_source, monkeypatch, loader, cls_path,
                                                                         subfolder):
    """Each model part is read with `device_map` at the stage's device (safetensors straight onto it,
    no host copy first on a GPU), and holds the same weights as diffusers' or transformers' plain load."""
    import importlib

    module_name, name = cls_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), name)
    plain = cls.from_pretrained(tiny_source.location, subfolder=subfolder).to(torch.float32).state_dict()
    original, maps = cls.from_pretrained.__func__, []

    def recording(klass, *args, **kwargs):
        maps.append(kwargs.get("device_map"))
        return original(klass, *args, **kwargs)

    monkeypatch.setattr(cls, "from_pretrained", classmethod(recording))
    ours = getattr(loading, loader)(tiny_source, CPU, torch.float32).state_dict()
    assert maps == ["cpu"]
    assert all(torch.equal(ours[key], plain[key]) for key in ours)  # the text encoder drops its last layer
    assert all(tensor.device == CPU for tensor in ours.values())


def test_a_controlnet_directory_is_read_onto_the_stages_device(tiny_controlnet, monkeypatch):
    from diffusers import ZImageControlNetModel

    from deployments.weights.controlnet_source import load_controlnet

    original, maps = ZImageControlNetModel.from_pretrained.__func__, []

    def recording(klass, *args, **kwargs):
        maps.append(kwargs.get("device_map"))
        return original(klass, *args, **kwargs)

    plain = ZImageControlNetModel.from_pretrained(tiny_controlnet.location).to(torch.float32).state_dict()
    monkeypatch.setattr(ZImageControlNetModel, "from_pretrained", classmethod(recording))
    ours = load_controlnet(tiny_controlnet, CPU, torch.float32).state_dict()
    assert maps == ["cpu"]
    assert ours.keys() == plain.keys() and all(torch.equal(ours[key], plain[key]) for key in ours)
