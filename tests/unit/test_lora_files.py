"""Adapter files: names, formats (converted by diffusers' own code), refusals, caps, rescans, fit to the model."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

from deployments.denoiser.lora.adapter import LoraAdapter, model_slots
from deployments.denoiser.lora.convert import to_diffusers_keys
from deployments.denoiser.lora.errors import LoraFitError, LoraFormatError, UnknownLoraError
from deployments.denoiser.lora.library import LoraLibrary, LoraSettings
from deployments.weights import loading
from deployments.denoiser.lora.random_adapters import diffusers_state, kohya_state, random_factors, write


@pytest.fixture(scope="module")
def transformer(tiny_source):
    return loading.load_transformer(tiny_source, torch.device("cpu"), torch.float32)


@pytest.fixture(scope="module")
def factors(transformer):
    return random_factors(transformer, rank=4, seed=0)


def library(directory, **caps) -> LoraLibrary:
    return LoraLibrary(LoraSettings(lora_dir=str(directory), **caps))


@pytest.mark.parametrize("fmt", ["diffusers", "kohya"])
def test_conversion_is_diffusers_own(factors, fmt):
    """Our keys and values are what diffusers' ZImagePipeline.lora_state_dict gives the same state dict."""
    from diffusers import ZImagePipeline

    state = diffusers_state(factors) if fmt == "diffusers" else kohya_state(factors, alpha=2.0)
    ours = to_diffusers_keys(state)
    reference = {k.removeprefix("transformer."): v for k, v in ZImagePipeline.lora_state_dict(dict(state)).items()}
    assert sorted(ours) == sorted(reference) and len(ours) == 2 * len(factors)
    for key, value in ours.items():
        torch.testing.assert_close(value, reference[key], rtol=0, atol=0)
    if fmt == "kohya":  # alpha / rank = 0.5 folded into the factors
        a, b = factors["layers.0.attention.to_q"]
        folded = ours["layers.0.attention.to_q.lora_B.weight"] @ ours["layers.0.attention.to_q.lora_A.weight"]
        torch.testing.assert_close(folded, 0.5 * b @ a)


@pytest.mark.parametrize("key, message", [
    ("text_encoder.layers.0.self_attn.q_proj.lora_A.weight", "text-encoder"),
    ("lora_te1_text_model_encoder_layers_0_mlp_fc1.lora_down.weight", "text-encoder"),
    ("transformer.layers.0.attention.to_q.lora_magnitude_vector", "DoRA"),
    ("lora_unet_layers_0_attention_to_q.dora_scale", "DoRA"),
    ("layers.0.attention.to_q.lokr_w1", "LoKr"),
    ("lora_unet_layers_0_attention_to_q.hada_w1_a", "LoHa"),
])
def test_unsupported_adapters_are_refused_with_a_reason(factors, key, message):
    state = {**diffusers_state(factors), key: torch.zeros(4, 4)}
    with pytest.raises(LoraFormatError, match=message):
        to_diffusers_keys(state)


def test_names_are_stems_never_paths(tmp_path, factors):
    write(tmp_path, "good_name-1", diffusers_state(factors))
    write(tmp_path, "bad.name", diffusers_state(factors))
    torch.save(diffusers_state(factors), tmp_path / "pickled.pt")  # never read
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "nested", diffusers_state(factors))
    lib = library(tmp_path)
    assert lib.names() == ["good_name-1"] and lib.offers_any()
    assert not library(tmp_path / "absent").offers_any()  # an unreadable directory offers none
    for name in ["../good_name-1", "sub/nested", "bad.name", "pickled", "", "/etc/passwd", "nested"]:
        with pytest.raises(UnknownLoraError):
            lib.file(name)


def test_a_file_added_or_replaced_while_serving_is_used(tmp_path, factors, transformer):
    lib = library(tmp_path)
    assert lib.names() == [] and not lib.offers_any()
    with pytest.raises(UnknownLoraError):
        lib.file("late")
    write(tmp_path, "late", diffusers_state(factors))
    assert lib.info("late").rank == 4  # a miss rescans
    first = lib.file("late").version
    os.utime(tmp_path / "late.safetensors", ns=(1, 1))  # the directory's mtime is unchanged
    save_file(diffusers_state(random_factors(transformer, rank=8, seed=1)), str(tmp_path / "late.safetensors"))
    assert lib.file("late").version != first and lib.info("late").rank == 8
    assert lib.load("late")[0].rank == 8


def test_listing_reads_headers_and_matches_the_loaded_adapter(tmp_path, factors):
    write(tmp_path, "kohya", kohya_state(factors, alpha=1.0))
    info = library(tmp_path).info("kohya")
    adapter, entry = library(tmp_path).load("kohya")
    assert (info.rank, list(info.target_modules), info.bytes) == (adapter.rank, adapter.targets, entry.size)
    assert info.target_modules == ("attention.to_k", "attention.to_out.0", "attention.to_q", "attention.to_v",
                                   "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")


def test_caps_on_size_rank_and_count(tmp_path, factors):
    for name in ("a1", "a2", "a3"):
        write(tmp_path, name, diffusers_state(factors))
    assert library(tmp_path, max_files=2).names() == ["a1", "a2"]
    size = (tmp_path / "a1.safetensors").stat().st_size
    assert "over the server's cap" in library(tmp_path, max_file_bytes=size - 1).info("a1").error
    with pytest.raises(LoraFormatError, match="cap"):
        library(tmp_path, max_file_bytes=size - 1).load("a1")
    with pytest.raises(LoraFitError, match="rank 4 is over"):
        library(tmp_path, max_rank=2).load("a1")


def test_keys_or_shapes_that_do_not_fit_name_the_first_bad_key(transformer, factors):
    slots = model_slots(transformer)
    LoraAdapter("ok", factors).check_fit(slots)
    wrong_layer = {**factors, "layers.99.attention.to_q": factors["layers.0.attention.to_q"]}
    with pytest.raises(LoraFitError) as info:
        LoraAdapter("x", wrong_layer).check_fit(slots)
    assert info.value.key == "layers.99.attention.to_q.lora_A.weight"
    a, b = factors["layers.1.feed_forward.w2"]
    wrong_shape = {**factors, "layers.1.feed_forward.w2": (a[:, :-1], b)}
    with pytest.raises(LoraFitError, match="do not fit") as info:
        LoraAdapter("x", wrong_shape).check_fit(slots)
    assert info.value.key == "layers.1.feed_forward.w2.lora_A.weight"
    adaln = {"layers.0.adaLN_modulation.0": factors["layers.0.attention.to_q"]}
    with pytest.raises(LoraFitError, match="not an attention or feed-forward linear"):
        LoraAdapter("x", adaln).check_fit(slots)


def test_a_pickle_is_never_unpickled_even_named_safetensors(tmp_path, factors):
    """torch.save's pickle under a .safetensors name: refused by the safetensors reader, nothing run."""
    import pickle

    class Boom:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "ran"),))

    with open(tmp_path / "evil.safetensors", "wb") as f:
        pickle.dump({"x": Boom()}, f)
    torch.save(diffusers_state(factors), tmp_path / "saved.safetensors")
    lib = library(tmp_path)
    for name in ("evil", "saved"):
        assert "not a readable safetensors file" in lib.info(name).error
        with pytest.raises(LoraFormatError, match="not a readable safetensors file"):
            lib.load(name)
    assert not (tmp_path / "ran").exists()


# ---- `zimage-lora random` (deployments.denoiser.lora.cli) -------------------------------------------


def test_the_command_writes_an_adapter_the_server_offers_and_that_fits_the_model(tmp_path, cache_dir, transformer):
    """The installed console script, as a user runs it: the file lands in the server's adapter folder
    (lora_dir's default, under the cache), reads back at its rank and fits the served model; a second
    run refuses to overwrite it, and a bad name is refused before anything is written."""
    import shutil
    import subprocess

    from deployments.settings import ModelSettings

    script = shutil.which("zimage-lora")
    assert script, "the zimage-lora entry point is not installed: pip install -e ."
    env = {**os.environ, "ZIMAGE_CACHE_DIR": str(cache_dir)}
    done = subprocess.run([script, "random", "newcomer0", "--rank", "8", "--lora-dir", str(tmp_path)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert f"wrote {tmp_path / 'newcomer0.safetensors'} (rank 8" in done.stdout
    adapter, _ = library(tmp_path).load("newcomer0")
    assert adapter.rank == 8 and len(adapter.targets) == 7
    adapter.check_fit(model_slots(transformer))
    again = subprocess.run([script, "random", "newcomer0", "--lora-dir", str(tmp_path)], capture_output=True,
                           text=True, env=env, timeout=300)
    assert again.returncode != 0 and "exists; pass --force" in again.stderr
    default_dir = ModelSettings(cache_dir=str(cache_dir)).lora_settings().directory()
    assert default_dir == cache_dir / "loras"  # where --lora-dir left out writes: what the server reads


@pytest.mark.parametrize("argv,message", [
    (["random", "../escape"], "is not an adapter name"),
    (["random", "ok", "--rank", "0"], "--rank must be within"),
])
def test_the_command_refuses_bad_arguments(tmp_path, argv, message):
    from deployments.denoiser.lora.cli import main

    with pytest.raises(SystemExit, match=message):
        main([*argv, "--lora-dir", str(tmp_path)])
    assert list(tmp_path.iterdir()) == []


def test_the_command_shapes_an_adapter_for_the_full_size_model(tmp_path):
    """`--model random`: the full-size DiT's shapes from its config on the meta device (no weights)."""
    from deployments.denoiser.lora.cli import main
    from deployments.weights.random_model import FULL_TRANSFORMER_CONFIG

    main(["random", "full", "--model", "random", "--rank", "1", "--format", "kohya", "--lora-dir", str(tmp_path)])
    adapter, _ = library(tmp_path).load("full")
    dim = FULL_TRANSFORMER_CONFIG["dim"]
    assert adapter.rank == 1 and adapter.factors["layers.0.attention.to_q"][0].shape == (1, dim)
