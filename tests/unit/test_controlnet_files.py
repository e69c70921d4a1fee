"""The published ControlNet single files load offline (deployments.weights.controlnet_files): files
of each Union layout (1.0, 2.0, 2.1) with the published tensor names at a tiny size, written here, go
through `controlnet: <file>` with every socket refused, load every tensor they hold into the layout's
shipped config, and run attached to a DiT of the published depth; files of no published layout are
refused with a message saying what they hold. Also: the shipped configs against the published files'
full size, and the `random` ControlNet against the 2.1 config."""

from __future__ import annotations

import socket

import pytest
import torch
from safetensors.torch import save_file

from deployments.weights.controlnet_files import checkpoint_layout, union_config
from deployments.weights.controlnet_source import FULL_CONTROLNET_CONFIG, load_controlnet, resolve_controlnet
from deployments.weights.model_source import ModelSourceError

DIM, HEADS = 64, 2  # tiny; the published files have 3840 and 30
BLOCK = {  # one transformer block's tensors, as the published files name them: name -> shape(dim, head_dim)
    "attention.to_q.weight": lambda d, h: (d, d), "attention.to_k.weight": lambda d, h: (d, d),
    "attention.to_v.weight": lambda d, h: (d, d), "attention.to_out.0.weight": lambda d, h: (d, d),
    "attention.norm_q.weight": lambda d, h: (h,), "attention.norm_k.weight": lambda d, h: (h,),
    "feed_forward.w1.weight": lambda d, h: (int(d / 3 * 8), d), "feed_forward.w2.weight": lambda d, h: (d, int(d / 3 * 8)),
    "feed_forward.w3.weight": lambda d, h: (int(d / 3 * 8), d),
    "attention_norm1.weight": lambda d, h: (d,), "attention_norm2.weight": lambda d, h: (d,),
    "ffn_norm1.weight": lambda d, h: (d,), "ffn_norm2.weight": lambda d, h: (d,),
    "adaLN_modulation.0.weight": lambda d, h: (4 * d, min(d, 256)), "adaLN_modulation.0.bias": lambda d, h: (4 * d,),
}


def published_shapes(layout: str, dim: int = DIM, heads: int = HEADS) -> dict[str, tuple[int, ...]]:
    """The tensors of a published file of `layout`: "1.0", "2.0" (control refiner blocks held, unused),
    "2.0-bare" (2.0 without them) or "2.1"; at `dim` and `heads`."""
    in_dim, layers = (16, 6) if layout == "1.0" else (33, 15)
    shapes = {"control_all_x_embedder.2-1.weight": (dim, 4 * in_dim), "control_all_x_embedder.2-1.bias": (dim,)}

    def block(prefix: str, control: bool, first: bool) -> None:
        shapes.update({prefix + name: shape(dim, dim // heads) for name, shape in BLOCK.items()})
        for proj in ("before_proj", "after_proj") if first else ("after_proj",) if control else ():
            shapes.update({f"{prefix}{proj}.weight": (dim, dim), f"{prefix}{proj}.bias": (dim,)})

    for i in range(layers):
        block(f"control_layers.{i}.", control=True, first=i == 0)
    for i in range(0 if layout == "2.0-bare" else 2):
        block(f"control_noise_refiner.{i}.", control=layout != "1.0", first=i == 0 and layout != "1.0")
    return shapes


def write_file(path, layout: str, drop: str | None = None) -> dict[str, torch.Tensor]:
    """A file of `layout` with random tensors (2.0: its refiner's `before_proj` zero, as published)."""
    generator = torch.Generator().manual_seed(len(layout))
    tensors = {name: torch.randn(shape, generator=generator) * 0.05
               for name, shape in published_shapes(layout).items() if name != drop}
    if layout == "2.0":
        tensors["control_noise_refiner.0.before_proj.weight"].zero_()
    if str(path).endswith(".safetensors"):
        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors}, path)
    return tensors


@pytest.fixture()
def offline(monkeypatch):
    """No connection can be opened: a config or weight fetched from the hub fails the test."""
    def refuse(*args, **kwargs):
        raise OSError("network access in an offline test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def tiny_dit_of_published_depth():
    """A DiT of the published depth (30 layers, 2 refiner layers) at the tiny width, so that every
    control layer and refiner hint has its main layer."""
    from diffusers import ZImageTransformer2DModel

    from deployments.weights.tiny_checkpoint import TINY_TRANSFORMER_CONFIG

    torch.manual_seed(0)
    return ZImageTransformer2DModel(**{**TINY_TRANSFORMER_CONFIG, "n_layers": 30, "n_refiner_layers": 2}).eval()


@pytest.mark.parametrize("layout,suffix", [("1.0", ".safetensors"), ("2.0", ".safetensors"),
                                           ("2.0-bare", ".safetensors"), ("2.1", ".safetensors"), ("2.1", ".pt")])
def test_a_published_layout_loads_offline_with_its_shipped_config(tmp_path, offline, layout, suffix):
    from deployments.denoiser.control import ControlContext, ControlNetRunner, control_context

    path = tmp_path / f"Z-Image-Turbo-Fun-Controlnet-Union{suffix}"
    written = write_file(path, layout)
    source = resolve_controlnet(str(path))
    assert source.kind == "single_file"
    model = load_controlnet(source, torch.device("cpu"), torch.float32)
    version = layout.removesuffix("-bare")
    shipped = union_config(version)
    for key in ("control_layers_places", "control_refiner_layers_places", "control_in_dim", "add_control_noise_refiner"):
        assert model.config[key] == shipped[key], key
    assert (model.config.dim, model.config.n_heads) == (DIM, HEADS)
    loaded = model.state_dict()
    used = {name: t for name, t in written.items() if version != "2.0" or not name.startswith("control_noise_refiner.")}
    assert set(loaded) == set(used)  # 2.0: its refiner blocks left out, as diffusers does; nothing missing
    assert all(torch.equal(loaded[name], tensor) for name, tensor in used.items())

    runner = ControlNetRunner(model, tiny_dit_of_published_depth())
    latents, caption = torch.randn(16, 1, 16, 16), torch.randn(20, 64)
    context = ControlContext(control_context(torch.randn(1, 16, 16, 16), runner.in_dim), 0.75)
    hints = runner.hints([latents], torch.tensor([0.5]), [caption], [context])
    assert sorted(hints) == shipped["control_layers_places"]
    assert all(torch.isfinite(hint).all() and hint.any() for hint in hints.values())


BAD_FILES = [  # layout, the tensor left out, what the error says
    ("1.0", "control_layers.5.after_proj.weight", "lacks 1 weights of that layout .*, e.g. control_layers.5.after_proj.weight"),
    ("2.1", "control_layers.14.attention.to_q.weight", "lacks 1 weights"),
    ("2.1", "control_noise_refiner.1.ffn_norm2.weight", "lacks 1 weights"),
    ("2.1", "control_all_x_embedder.2-1.weight", "not a Z-Image ControlNet"),
]


@pytest.mark.parametrize("layout,drop,message", BAD_FILES, ids=lambda v: str(v)[:30])
def test_a_file_short_of_its_layout_is_refused_naming_what_it_lacks(tmp_path, offline, layout, drop, message):
    path = tmp_path / "controlnet.safetensors"
    write_file(path, layout, drop)
    with pytest.raises(ModelSourceError, match=message):
        load_controlnet(resolve_controlnet(str(path)), torch.device("cpu"), torch.float32)


def test_a_file_of_no_published_layout_is_refused_when_the_app_is_built(tmp_path):
    path = tmp_path / "other.safetensors"
    shapes = published_shapes("2.1")
    shapes = {name: shape for name, shape in shapes.items() if not name.startswith("control_layers.14.")}
    save_file({name: torch.zeros(shape) for name, shape in shapes.items()}, str(path))
    with pytest.raises(ModelSourceError, match="matches none of the published .* 14 control layers"):
        resolve_controlnet(str(path))
    sixteen = published_shapes("2.1")
    sixteen["control_all_x_embedder.2-1.weight"] = (DIM, 64)  # 16 channels where 2.x has 33
    with pytest.raises(ModelSourceError, match="16 control channels"):
        checkpoint_layout(sixteen, False)
    (tmp_path / "text.safetensors").write_text("not a safetensors file")
    with pytest.raises(ModelSourceError, match="not a readable"):
        resolve_controlnet(str(tmp_path / "text.safetensors"))


@pytest.mark.parametrize("layout", ["1.0", "2.0", "2.0-bare", "2.1"])
def test_the_shipped_configs_are_the_published_files_full_size(layout):
    """At the published size (dim 3840, 30 heads) a file's names and shapes give back its shipped
    config exactly; and the model that config builds holds the file's tensors (2.0: but its unused
    refiner blocks), by name and shape."""
    from diffusers import ZImageControlNetModel

    version = layout.removesuffix("-bare")
    shapes = published_shapes(layout, dim=3840, heads=30)
    zero = {"1.0": None, "2.0": True, "2.0-bare": None, "2.1": False}[layout]  # the refiner's before_proj
    found = checkpoint_layout(shapes, zero)
    assert found.version == version and found.config() == union_config(version)
    with torch.device("meta"):
        model = ZImageControlNetModel(**union_config(version))
    expected = {name: shape for name, shape in shapes.items()
                if version != "2.0" or not name.startswith("control_noise_refiner.")}
    assert {name: tuple(t.shape) for name, t in model.state_dict().items()} == expected


def test_the_random_controlnet_is_union_2_1():
    """`controlnet: random` builds the shipped 2.1 config, and its tensors are a 2.1 file's."""
    from diffusers import ZImageControlNetModel

    assert FULL_CONTROLNET_CONFIG == union_config("2.1")
    with torch.device("meta"):
        model = ZImageControlNetModel(**FULL_CONTROLNET_CONFIG)
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == published_shapes("2.1", dim=3840, heads=30)
    assert checkpoint_layout(shapes, False).config() == union_config("2.1")
