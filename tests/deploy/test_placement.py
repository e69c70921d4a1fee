"""GPU shares decide placement: two Denoisers never share a GPU, and beside each Denoiser there is
room for one replica of each small GPU stage. Checked on serve_config.yaml and on the defaults each
stage declares next to its code (the shares `serve run serve_app:build_app` uses on a GPU)."""

from __future__ import annotations

import yaml

from tests.deploy.test_shipped_configs import ROOT

GPU_STAGES = ("TextEncoder", "Denoiser", "VaeDecoder")


def shipped_shares() -> dict[str, float]:
    app = yaml.safe_load((ROOT / "serve_config.yaml").read_text())["applications"][0]
    return {d["name"]: d["ray_actor_options"]["num_gpus"] for d in app["deployments"] if d["name"] in GPU_STAGES}


def declared_shares() -> dict[str, float]:
    from deployments.denoiser.deployment import Denoiser
    from deployments.text_encoder.deployment import TextEncoder
    from deployments.vae.deployment import VaeDecoder

    return {d.name: d.ray_actor_options["num_gpus"] for d in (TextEncoder, Denoiser, VaeDecoder)}


def check_shares(shares: dict[str, float]) -> None:
    denoiser, text, vae = shares["Denoiser"], shares["TextEncoder"], shares["VaeDecoder"]
    assert 2 * denoiser > 1, "two Denoisers could share one GPU while another GPU idles"
    assert denoiser + text + vae <= 1, "a GPU holding a Denoiser has no room for one of each small stage"
    assert denoiser + 2 * max(text, vae) <= 1 + 1e-9, "a second small replica of one stage would not fit"
    assert min(text, vae) > 0


def test_shipped_gpu_shares_keep_denoisers_apart_and_small_stages_placed():
    check_shares(shipped_shares())


def test_declared_gpu_shares_keep_denoisers_apart_and_small_stages_placed():
    assert declared_shares() == shipped_shares()
    check_shares(declared_shares())
