"""The stage lifecycle: every stage declares load, optimize and warm-up; the base runs them in order,
times each as a start phase, reports ready the same way for every stage, and warms the rest after
ready on the model thread. The VAE decoder's dynamic graph is one such rest: until it is warm, sizes
without a static graph decode eagerly and compile nothing."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from torch._dynamo.utils import counters

import deployments.vae.compile as vae_compile
from deployments.runtime.stage import StageBase
from deployments.weights import loading


class Toy(StageBase):
    def __init__(self, fail_in: str | None = None, after: int = 2):
        self._init_stage("Toy")
        self.calls: list[tuple[str, str]] = []
        self.fail_in, self.after = fail_in, after
        self.start()

    def _note(self, phase: str) -> None:
        self.calls.append((phase, threading.current_thread().name))
        if phase == self.fail_in:
            raise RuntimeError(f"broken {phase}")
        time.sleep(0.02)

    def load(self):
        self._note("load")

    def optimize(self):
        self._note("optimize")

    def warm_up(self):
        self._note("warmup")

    def warm_up_after_ready(self):
        return [(f"later{i}", lambda i=i: self._note(f"later{i}")) for i in range(self.after)]


def test_phases_run_in_order_timed_and_warm_up_on_the_model_thread():
    stage = Toy()
    assert stage.after_ready.wait(10)
    phases = [phase for phase, _ in stage.calls]
    assert phases == ["load", "optimize", "warmup", "later0", "later1"]
    threads = dict(stage.calls)
    assert threads["load"] == threads["optimize"] == threading.current_thread().name
    assert threads["warmup"] == threads["later0"] == threads["later1"] != threads["load"]  # the lane's one thread
    seconds = stage.start_phases.as_dict()
    assert all(seconds[f"{p}_s"] >= 0.02 for p in ("load", "optimize", "warmup"))
    assert seconds["ready_s"] >= seconds["load_s"] + seconds["optimize_s"] + seconds["warmup_s"]
    stats = stage.stats()
    assert stats["state"] == "ready" and stats["warm_after_ready"]["calls_done"] == 2
    assert stats["start_phases"]["warmup_after_ready_s"] >= 0.04
    stage.check_health()


def test_a_stage_with_nothing_to_warm_later_is_fully_warm_at_ready():
    stage = Toy(after=0)
    assert stage.after_ready.ready.is_set() and stage.is_ready


def test_a_failed_phase_stops_the_start_and_the_replica_is_not_healthy():
    with pytest.raises(RuntimeError, match="broken optimize"):
        Toy(fail_in="optimize")
    stage = Toy.__new__(Toy)  # what Serve would hold had the constructor not raised
    stage._init_stage("Toy")
    stage.fail_in, stage.calls, stage.after = "warmup", [], 0
    with pytest.raises(RuntimeError):
        stage.start()
    assert stage.state == "warmup" and not stage.is_ready
    with pytest.raises(RuntimeError, match="not started"):
        stage.check_health()


def test_random_weights_are_timed_apart_from_loading():
    from deployments.runtime.start_phases import StartPhases

    phases = StartPhases()
    with phases.phase("load"):
        with loading._building_on(torch.device("cpu"), torch.float32):
            torch.nn.Linear(512, 512)
            time.sleep(0.05)
    seconds = phases.as_dict()
    assert seconds["random_init_s"] >= 0.05 and seconds["load_s"] < 0.05


def test_the_vae_decodes_eagerly_until_its_dynamic_graph_is_warm(tiny_source):
    vae = loading.load_vae(tiny_source, torch.device("cpu"), torch.float32)
    vae_compile.optimize_vae(vae, compile=True, channels_last=False, backend="eager", dynamic_warm=False)
    decoder = vae.decoder.forward
    g = torch.Generator("cpu").manual_seed(0)
    graphs = lambda: counters["stats"]["unique_graphs"]  # noqa: E731
    with torch.inference_mode():
        with decoder.recording_static():
            vae.decoder(torch.randn(1, 16, 8, 8, generator=g))
        before = graphs()
        odd = torch.randn(1, 16, 6, 10, generator=g)
        plain = type(vae.decoder).forward(vae.decoder, odd)
        assert torch.equal(vae.decoder(odd), plain)  # eager: nothing compiled on a request
        assert graphs() == before
        with decoder.warming_dynamic():  # the warm-up after ready compiles the dynamic graph
            vae.decoder(torch.randn(1, 16, 10, 6, generator=g))
        assert graphs() > before
        decoder.dynamic_warm = True
        warmed = graphs()
        assert torch.allclose(vae.decoder(odd), plain, atol=1e-5)
        assert graphs() == warmed  # the warm dynamic graph serves the odd size
