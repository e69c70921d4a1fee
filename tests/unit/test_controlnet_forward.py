"""The controlled forward of our own (deployments.denoiser.dit.forward, control_forward) against what
diffusers computes with the same weights: `ZImageControlNetModel.forward` over the controlled rows,
then `ZImageTransformer2DModel.forward` with those hints (zeros for the other rows), float32 on the
CPU, tiny checkpoint, for each published layout (Union 1.0: 16 channels, no control refiner of its
own; 2.0: the control layers refine; 2.1: a control refiner), one image and mixed batches.

Our forward reuses the DiT's refined tokens and keeps its hints in a list; diffusers' recomputes them
and stacks them. Where they differ beyond float32 rounding, an index, a pad row, a mask or a scale
is wrong: each case also checks that the control moved the output far more than the tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch

from deployments.denoiser.control import ControlContext, ControlNetRunner, control_context
from deployments.denoiser.dit import forward as dit_forward
from deployments.denoiser.dit.caption_buckets import bucketed, padded_transformer_fn
from deployments.weights import loading
from deployments.weights.controlnet_source import TINY_CONTROLNET_CONFIG, build_tiny_controlnet

CPU = torch.device("cpu")
LAYOUTS = {  # the tiny ControlNet in each published layout
    "1.0": {**TINY_CONTROLNET_CONFIG, "control_in_dim": 16, "add_control_noise_refiner": None,
            "control_refiner_layers_places": None},
    "2.0": {**TINY_CONTROLNET_CONFIG, "add_control_noise_refiner": "control_layers"},
    "2.1": TINY_CONTROLNET_CONFIG,
}
TOL = 1e-5  # float32: row counts and masks (diffusers' ControlNet always passes one) round differently


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.fixture(scope="module")
def dit(tiny_source):
    return loading.load_transformer(tiny_source, CPU, torch.float32)


@pytest.fixture(scope="module")
def pairs(dit):
    """layout -> (our runner, diffusers' ControlNet with the same weights, attached to the same DiT)."""
    from diffusers import ZImageControlNetModel

    made = {}

    def pair(layout: str):
        if layout not in made:
            stock = build_tiny_controlnet(LAYOUTS[layout]).eval().requires_grad_(False)
            reference = ZImageControlNetModel.from_transformer(copy.deepcopy(stock), dit)
            made[layout] = (ControlNetRunner(stock, dit), reference)
        runner, reference = made[layout]
        dit._controlnet = runner  # the runner joined last serves the DiT's controlled forwards
        return runner, reference

    return pair


def inputs(cfg, items, seed=0):
    """Latents, t and captions for `items` of (latent height, width, caption tokens)."""
    g = torch.Generator().manual_seed(seed)
    latents = [torch.randn(cfg.in_channels, 1, h, w, generator=g) for h, w, _ in items]
    captions = [torch.randn(n, cfg.cap_feat_dim, generator=g) for *_, n in items]
    return latents, torch.rand(len(items), generator=g) * 0.8 + 0.1, captions


def controls_for(runner, latents, scales, seed=1, mask=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for x, scale in zip(latents, scales):
        if scale is None:
            out.append(None)
            continue
        h, w = x.shape[-2:]
        keep = masked = None
        if mask:
            keep, masked = (torch.rand(1, 1, h, w, generator=g) > 0.5).float(), torch.randn(1, 16, h, w, generator=g)
        out.append(ControlContext(control_context(torch.randn(1, 16, h, w, generator=g), runner.in_dim, keep, masked),
                                  scale))
    return out


@torch.inference_mode()
def diffusers_forward(reference, dit, latents, t, captions, controls):
    """What the ControlNet pipelines compute, for a batch: the ControlNet over the controlled rows, its
    hints zero-padded to the batch, the transformer with them."""
    rows = [i for i, c in enumerate(controls) if c is not None]
    dtype = latents[0].dtype
    scales = torch.tensor([controls[i].scale for i in rows]).view(-1, 1, 1).to(dtype)
    out = reference([latents[i] for i in rows], t[rows], [captions[i] for i in rows],
                    [controls[i].context.to(dtype) for i in rows], conditioning_scale=scales)
    length = max(x.shape[-2] * x.shape[-1] // 4 + (-(x.shape[-2] * x.shape[-1] // 4)) % 32 + len(c) + (-len(c)) % 32
                 for x, c in zip(latents, captions))
    hints = {}
    for layer, hint in out.items():
        hints[layer] = hint.new_zeros(len(latents), length, hint.shape[-1])
        for j, i in enumerate(rows):
            hints[layer][i, : hint.shape[1]] = hint[j]
    return dit(latents, t, captions, controlnet_block_samples=hints, return_dict=False)[0]


CASES = {  # (latent h, w, caption tokens) per row, and each row's scale (None: not controlled)
    "one image": ([(16, 16, 20)], [0.75]),
    "ragged, all controlled": ([(16, 16, 20), (16, 24, 50)], [0.4, 1.3]),
    "mixed": ([(16, 24, 7), (16, 16, 40), (24, 16, 70)], [None, 0.9, 0.3]),
}


@pytest.mark.parametrize("layout,case", [("2.1", case) for case in CASES] + [("2.0", "mixed"), ("1.0", "mixed")])
def test_the_controlled_forward_computes_diffusers(pairs, dit, layout, case):
    """Every case for Union 2.1 (the default), the mixed batch (control over some rows, ragged, with the
    inpainting layout where the ControlNet takes it) for the other layouts."""
    runner, reference = pairs(layout)
    items, scales = CASES[case]
    latents, t, captions = inputs(dit.config, items)
    controls = controls_for(runner, latents, scales, mask=runner.takes_mask and case == "mixed")
    want = diffusers_forward(reference, dit, latents, t, captions, controls)
    got = runner.forward(latents, t, captions, controls)
    with torch.inference_mode():
        plain = dit(latents, t, captions, return_dict=False)[0]
    for i, (ours, theirs, base) in enumerate(zip(got, want, plain)):
        assert ours.shape == theirs.shape
        assert rel_err(ours, theirs) <= TOL, (i, rel_err(ours, theirs))
        if scales[i] is None:
            assert torch.equal(ours, base)  # an uncontrolled row: no hint touches it
        else:
            assert rel_err(theirs, base) > 1e3 * TOL  # the control moved it: the comparison can fail


def test_the_hints_of_a_mixed_batch_are_each_rows_alone(pairs, dit):
    runner, _ = pairs("2.1")
    latents, t, captions = inputs(dit.config, CASES["mixed"][0], seed=3)
    controls = controls_for(runner, latents, CASES["mixed"][1], seed=4)
    hints = runner.hints(latents, t, captions, controls)
    assert sorted(hints) == list(runner.controlnet.config.control_layers_places)
    for row in (1, 2):
        alone = runner.hints(latents[row : row + 1], t[row : row + 1], captions[row : row + 1], controls[row : row + 1])
        for layer, hint in hints.items():
            n = alone[layer].shape[1]
            assert rel_err(hint[row, :n], alone[layer][0]) <= TOL  # past n: the rows' batch padding
    assert not any(hint[0].any() for hint in hints.values())  # the uncontrolled row


@torch.inference_mode()
def test_our_dit_forward_without_hints_is_diffusers_bit_for_bit(dit):
    for items in ([(16, 16, 20)], [(16, 24, 7), (16, 16, 40)]):
        latents, t, captions = inputs(dit.config, items, seed=5)
        want = dit(latents, t, captions, return_dict=False)[0]
        got = dit_forward.finish(dit, dit_forward.tokens(dit, latents, t, captions))
        assert all(torch.equal(a, b) for a, b in zip(got, want))


def test_a_bucket_padded_caption_controls_as_its_exact_length(pairs, dit):
    """The CUDA graphs run captions padded to their bucket (`caption_buckets`): controlled too, the
    same function as the exact caption."""
    runner, _ = pairs("2.1")
    latents, t, captions = inputs(dit.config, [(16, 16, 21)], seed=6)
    controls = controls_for(runner, latents, [0.6], seed=7)
    padded = bucketed(padded_transformer_fn(dit))
    with torch.inference_mode(), runner.using(controls):
        (exact,) = runner.controlled(latents, t, captions)
        (bucket,) = padded(latents, t, captions)
    assert rel_err(bucket, exact) <= TOL
