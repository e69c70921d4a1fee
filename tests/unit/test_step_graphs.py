"""deployments.denoiser.dit.step_graphs on the CPU: which forwards are captured, replayed or run plain.

A CUDA graph cannot be captured without a GPU, so the capture here is a stand-in with a graph's
contract: it records the forward on the static inputs it is given, and a replay recomputes it on
whatever those inputs hold then, writing into the same output tensors. The real capture and its
results against plain forwards are checked on the GPU (tests/gpu/test_gpu_step_graphs.py).
"""

from __future__ import annotations

import pytest
import torch

from deployments.denoiser.dit.step_graphs import GraphedTransformerFn


def forward(latents, t, captions):
    """A transformer's contract: one output per image, depending on its latents, t and caption."""
    return [x * t[i] + c.float().mean() for i, (x, c) in enumerate(zip(latents, captions))]


def stand_in_capture(log):
    def capture(fn):
        outputs = fn()
        log.append("capture")

        def replay():
            for out, fresh in zip(outputs, fn()):
                out.copy_(fresh)

        return replay, outputs

    return capture


def inputs(size=4, tokens=5, value=1.0, batch=1):
    latents = [torch.full((2, 1, size, size), value + i) for i in range(batch)]
    captions = [torch.full((tokens + i, 3), value) for i in range(batch)]
    return latents, torch.full((batch,), 0.5 * value), captions


def test_a_shape_runs_plain_then_captures_then_replays_with_new_values():
    log = []
    graphed = GraphedTransformerFn(forward, stand_in_capture(log))
    for value in (1.0, 2.0, 3.0, 4.0):
        got = graphed(*inputs(value=value))
        want = forward(*inputs(value=value))
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    assert graphed.stats == {"plain": 1, "captures": 1, "replays": 3, "evicted": 0, "capture_failures": 0}
    assert log == ["capture"]


def test_replayed_outputs_are_copies():
    graphed = GraphedTransformerFn(forward, stand_in_capture([]))
    graphed(*inputs(value=1.0))
    first = graphed(*inputs(value=2.0))[0]
    kept = first.clone()
    graphed(*inputs(value=3.0))  # a later replay writes the graph's outputs again
    assert torch.equal(first, kept)


def test_each_caption_length_and_size_is_its_own_graph_and_batches_run_plain():
    graphed = GraphedTransformerFn(forward, stand_in_capture([]), max_batch=1)
    for shape in [(4, 5), (4, 6), (8, 5)] * 3:
        graphed(*inputs(*shape))
    for _ in range(3):
        graphed(*inputs(batch=2))
    assert graphed.graph_count() == 3
    assert graphed.stats["captures"] == 3 and graphed.stats["replays"] == 6  # a capture replays too
    assert graphed.stats["plain"] == 3 + 3  # each shape's first sight, and the batches of two


def test_least_recently_used_graph_is_dropped():
    graphed = GraphedTransformerFn(forward, stand_in_capture([]), max_graphs=2)
    for tokens in (5, 6, 7):
        graphed(*inputs(tokens=tokens))
        graphed(*inputs(tokens=tokens))
    assert graphed.graph_count() == 2 and graphed.stats["evicted"] == 1
    graphed(*inputs(tokens=5))  # dropped: seen again, so captured again on this call
    assert graphed.stats["captures"] == 4


def test_a_failed_capture_is_counted_and_the_shape_runs_plain(caplog):
    def failing(fn):
        raise RuntimeError("operation not permitted when stream is capturing")

    graphed = GraphedTransformerFn(forward, failing)
    for value in (1.0, 2.0, 3.0):
        got = graphed(*inputs(value=value))
        assert torch.equal(got[0], forward(*inputs(value=value))[0])
    assert graphed.stats["capture_failures"] == 1 and graphed.stats["plain"] == 3
    assert "CUDA graph capture failed" in caplog.text


def test_graphs_need_a_cuda_device():
    with pytest.raises(ValueError, match="CUDA"):
        GraphedTransformerFn.on(forward, torch.device("cpu"))


def module_state_capture(slots, log):
    """`stand_in_capture` that also keeps what a CUDA graph bakes in: the factors the update op read
    at capture (`lora.ops.FACTORS`), which its replays read whatever the forward has set since."""
    from deployments.denoiser.lora import ops

    def capture(fn):
        held = {sid: ops.FACTORS.get(sid) for sid in slots.ids.values()}
        outputs = fn()
        log.append("capture")

        def replay():
            now = {sid: ops.FACTORS.get(sid) for sid in slots.ids.values()}
            ops.FACTORS.update(held)
            try:
                fresh = fn()
            finally:
                ops.FACTORS.update(now)
            for out, value in zip(outputs, fresh):
                out.copy_(value)

        return replay, outputs

    return capture


def test_forwards_with_adapters_replay_one_graph_for_any_adapter_up_to_its_rank(tiny_source):
    """Tiny model, float32: a forward with adapters is captured once per shape on the static factors;
    other adapters, scales and ranks up to `lora_rank` replay it, with the outputs of a plain forward
    with those adapters; a larger rank and a batch of two run plain."""
    from deployments.denoiser.dit.caption_buckets import padded_transformer_fn
    from deployments.denoiser.lora.adapter import LoraAdapter
    from deployments.denoiser.lora.slots import install_lora
    from deployments.denoiser.loop import diffusers_transformer_fn
    from deployments.weights import loading
    from deployments.denoiser.lora.random_adapters import random_factors

    model = loading.load_transformer(tiny_source, torch.device("cpu"), torch.float32)
    slots = install_lora(model)
    log = []
    graphed = GraphedTransformerFn(diffusers_transformer_fn(model), module_state_capture(slots, log),
                                   padded=padded_transformer_fn(model), lora=slots, lora_rank=32)
    plain = diffusers_transformer_fn(model)

    def adapter(rank, seed):
        return slots.lay_out(LoraAdapter(f"r{rank}", random_factors(model, rank, seed, strength=0.3)))

    g = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 1, 32, 32, generator=g)]
    t, caption = torch.tensor([0.4]), [torch.randn(20, 64, generator=g)]
    small, large, too_large = adapter(4, 1), adapter(30, 2), adapter(40, 3)
    with torch.inference_mode():
        for rows in ([((small, 1.0),)], [((small, 1.0),)], [((large, -0.5),)], [((small, 2.0),)],
                     [((too_large, 1.0),)], [((small, 1.0), (large, 0.3))]):
            with slots.using(rows):
                (got,) = graphed(x, t, caption)
                (want,) = plain(x, t, caption)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            with slots.using([()]):
                (without,) = plain(x, t, caption)
            assert (got - without).abs().max() > 1e-3  # the adapters changed it
        with slots.using([((small, 1.0),), ()]):
            graphed(x * 2, torch.tensor([0.4, 0.4]), caption * 2)
    stats = graphed.as_dict()
    assert log == ["capture"] and stats["lora_graphs"] == 1 and stats["captures"] == 1
    # plain: the first sight, rank 40 (48 padded), two adapters side by side (16 + 32), the batch of two
    assert stats["plain"] == 4 and stats["replays"] == 3
    assert graphed.summary().startswith("1 held (one per size and caption bucket; 1 with LoRA adapters, 0 controlled)")


def control_state_capture(runner, log):
    """`stand_in_capture` that also keeps what a CUDA graph bakes in: the control inputs in effect at
    capture (the static ones, `ControlInputs.static`), which its replays read whatever the forward has
    put in effect since; so a replay is right only if the forward's inputs were copied into them."""

    def capture(fn):
        held = runner.active
        outputs = fn()
        log.append("capture")

        def replay():
            with runner.applied(held):
                fresh = fn()
            for out, value in zip(outputs, fresh):
                out.copy_(value)

        return replay, outputs

    return capture


@pytest.fixture(scope="module")
def controlled_tiny(tiny_source, tiny_controlnet):
    """The tiny DiT with the tiny ControlNet (Union 2.x layout) and one LoRA adapter, float32."""
    from deployments.denoiser.control import ControlNetRunner
    from deployments.denoiser.lora.adapter import LoraAdapter
    from deployments.denoiser.lora.random_adapters import random_factors
    from deployments.denoiser.lora.slots import install_lora
    from deployments.weights import loading
    from deployments.weights.controlnet_source import load_controlnet

    model = loading.load_transformer(tiny_source, torch.device("cpu"), torch.float32)
    slots = install_lora(model)
    runner = ControlNetRunner(load_controlnet(tiny_controlnet, torch.device("cpu"), torch.float32), model)
    adapter = slots.lay_out(LoraAdapter("ink", random_factors(model, 4, seed=1, strength=0.3)))
    return model, runner, adapter


def test_controlled_forwards_replay_one_graph_for_any_control_input(controlled_tiny):
    """A one-image controlled forward is captured once per shape on static control inputs; other
    control images, scales, the inpainting layout and caption lengths of the bucket replay it, with the
    outputs of the controlled forward without graphs; with adapters too, a graph of its own; a batch of
    two controlled images runs plain."""
    from deployments.denoiser.control import ControlContext, control_context
    from deployments.denoiser.dit.caption_buckets import padded_transformer_fn
    from deployments.denoiser.loop import diffusers_transformer_fn

    model, runner, adapter = controlled_tiny
    log = []
    graphed = GraphedTransformerFn(diffusers_transformer_fn(model), control_state_capture(runner, log),
                                   padded=padded_transformer_fn(model), lora=model._lora_slots, lora_rank=32,
                                   control=runner)
    g = torch.Generator().manual_seed(0)
    x, t = [torch.randn(16, 1, 16, 16, generator=g)], torch.tensor([0.4])

    def control(scale, mask=False):
        keep = (torch.rand(1, 1, 16, 16, generator=g) > 0.5).float() if mask else None
        masked = torch.randn(1, 16, 16, 16, generator=g) if mask else None
        return ControlContext(control_context(torch.randn(1, 16, 16, 16, generator=g), 33, keep, masked), scale)

    first = control(0.75)
    calls = [(first, 20, ()), (first, 20, ()), (control(1.3, mask=True), 20, ()), (control(0.2), 30, ()),
             (None, 20, ()), (control(0.5), 20, ((adapter, 1.0),)), (control(0.9), 25, ((adapter, -0.5),))]
    with torch.inference_mode():
        for ctl, tokens, adapters in calls:
            caption = [torch.randn(tokens, 64, generator=g)]
            with model._lora_slots.using([adapters]), runner.using([ctl]):
                (got,) = graphed(x, t, caption)
                (want,) = diffusers_transformer_fn(model)(x, t, caption)
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
            if ctl is not None:
                with model._lora_slots.using([adapters]):
                    (without,) = model(x, t, caption, return_dict=False)[0]
                assert (got - without).abs().max() > 1e-3  # the control changed it
        with runner.using([first, first]):
            graphed(x * 2, torch.tensor([0.4, 0.4]), [caption[0]] * 2)
    stats = graphed.as_dict()
    assert log == ["capture", "capture"]  # controlled; controlled with adapters
    assert stats["control_graphs"] == 2 and stats["lora_graphs"] == 1 and stats["control_inputs_mib"] >= 0
    # plain: the first sights (controlled; uncontrolled; controlled with adapters) and the batch of two
    assert stats["plain"] == 4 and stats["replays"] == 4 and stats["captures"] == 2


def test_the_loop_replays_controlled_steps(controlled_tiny, tiny_source):
    """The denoise loop routes a controlled job through its `transformer_fn` (the graphs): its steps
    replay, with the latents of a loop without graphs."""
    from deployments.contracts import DenoiseJob
    from deployments.denoiser.control import ControlContext, control_context
    from deployments.denoiser.dit.caption_buckets import padded_transformer_fn
    from deployments.denoiser.loop import DenoiseLoop, diffusers_transformer_fn
    from deployments.weights import loading

    model, runner, _ = controlled_tiny
    graphed = GraphedTransformerFn(diffusers_transformer_fn(model), control_state_capture(runner, []),
                                   padded=padded_transformer_fn(model), control=runner)
    g = torch.Generator().manual_seed(3)
    ctl = ControlContext(control_context(torch.randn(1, 16, 16, 16, generator=g), 33), 0.8)
    job = DenoiseJob(caption=torch.randn(12, 64, generator=g), width=128, height=128, steps=4, seed=3, control=ctl)
    scheduler = loading.load_scheduler(tiny_source)
    kwargs = {"lora": True, "control": runner}
    cpu, f32 = torch.device("cpu"), torch.float32
    (ours,) = DenoiseLoop(model, scheduler, cpu, f32, transformer_fn=graphed, **kwargs).run([job])
    (plain,) = DenoiseLoop(model, scheduler, cpu, f32, **kwargs).run([job])
    assert graphed.stats["replays"] == 3 and graphed.as_dict()["control_graphs"] == 1
    torch.testing.assert_close(ours.latents, plain.latents, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["dense", "fp8"])
def test_replays_follow_adapters_through_eviction_and_new_layouts(tiny_source, tmp_path, monkeypatch, family):
    """The adapter cache evicts adapters and lays them out anew; the one-image graph keeps its static
    factors and copies a forward's in only when they are not the ones it holds (`GraphFactors.fill`,
    by `ForwardFactors.serial`); on FP8 weights, A lives in the weights' tails, which every forward with
    adapters writes. So each replay must give the eager forward with its own adapter: X; X again, its
    factors still the graph's (no copy) though a plain batch of two rewrote the tails since; Y once X is
    evicted; X read and laid out anew; X's file replaced."""
    from deployments.contracts import LoraRef
    from deployments.denoiser.dit import fused_block, fusion, rotary
    from deployments.denoiser.lora.cache import AdapterCache
    from deployments.denoiser.lora.library import LoraLibrary, LoraSettings
    from deployments.denoiser.lora.random_adapters import diffusers_state, random_factors, write
    from deployments.denoiser.lora.slots import install_lora
    from deployments.denoiser.loop import diffusers_transformer_fn
    from deployments.weights import loading

    monkeypatch.setenv("ZIMAGE_METRICS", "0")
    cpu = torch.device("cpu")
    model = loading.load_transformer(tiny_source, cpu, torch.float32 if family == "dense" else torch.bfloat16)

    def write_adapter(name, rank, seed):  # ranks 8, 12 and 4 pad to 16, Y's 32 is the graphs' rank
        write(tmp_path, name, diffusers_state(random_factors(model, rank, seed, strength=0.3)))

    for name, rank, seed in (("x", 8, 1), ("y", 32, 2), ("z", 4, 3)):
        write_adapter(name, rank, seed)
    if family == "fp8":
        rotary.install_real_rope(model)
        fusion.fuse_projections(model)
        fused_block.install_fused_blocks(model, attention="bf16")
    slots = install_lora(model)
    assert bool(slots.tails) == (family == "fp8")
    cache = AdapterCache(LoraLibrary(LoraSettings(lora_dir=str(tmp_path))), slots, capacity_bytes=1 << 30)
    log = []
    plain = diffusers_transformer_fn(model)
    graphed = GraphedTransformerFn(plain, module_state_capture(slots, log), lora=slots, lora_rank=32)
    dtype = model.x_pad_token.dtype
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(16, 1, 16, 16, generator=g).to(dtype)]
    t, caption = torch.tensor([0.4]).to(dtype), [torch.randn(20, 64, generator=g).to(dtype)]
    tolerance = 1e-5 if family == "dense" else 1e-3  # measured: equal

    def step(name):
        """The graphed forward with `name`'s adapter (as the loop calls it: inside `using`), then the
        eager one with the same adapter, which it must equal."""
        rows = [cache.resolve([LoraRef(name)])]
        with torch.inference_mode(), slots.using(rows):
            (got,) = graphed(x, t, caption)
            (want,) = plain(x, t, caption)
        torch.testing.assert_close(got, want, rtol=tolerance, atol=tolerance)
        return got

    with torch.inference_mode(), slots.using([()]):
        (without,) = plain(x, t, caption)
    first = [step("x") for _ in range(3)]  # first sight, capture, replay
    assert log == ["capture"] and graphed.stats["replays"] == 2
    with torch.inference_mode(), slots.using([cache.resolve([LoraRef("z")]), cache.resolve([LoraRef("x")])]):
        graphed(x * 2, torch.cat([t, t]), caption * 2)  # plain: writes the tails with two groups
    assert graphed.stats["plain"] == 2
    held = graphed.lora_factors.holds
    step("x")  # the plan is cached: the graph holds its factors already (no copy), the tails were rewritten
    assert graphed.lora_factors.holds == held
    cache.capacity_bytes = 0  # from here, each adapter evicts the others
    evictions = cache.counts.evictions
    by_y = step("y")
    assert cache.resident_names() == ["y"] and cache.counts.evictions == evictions + 2
    loads = cache.counts.loads
    again = step("x")  # read and laid out anew
    assert cache.counts.loads == loads + 1
    write_adapter("x", 12, 9)  # the file replaced: another version
    replaced = step("x")
    assert cache.counts.loads == loads + 2 and graphed.stats["replays"] == 6 and log == ["capture"]
    torch.testing.assert_close(again, first[-1], rtol=tolerance, atol=tolerance)
    for a, b in [(first[-1], without), (by_y, first[-1]), (replaced, first[-1]), (by_y, replaced)]:
        assert (a.float() - b.float()).abs().max() > 100 * tolerance  # each adapter changes the output its own way
