"""The pipeline's stages, one package each, with what they share.

    style/          PromptStyler: style presets applied to prompts (CPU)
    text_encoder/   TextEncoder: Qwen3 prompt encoding, its CUDA graphs and compile
    denoiser/       Denoiser: the denoise loop, its scheduling and pending work, the DiT's kernels (dit/)
    vae/            VaeDecoder: the tiled VAE codec (decode, previews, upload encoding) and its compile

Each stage package holds its Serve shell (`deployment.py`: options, live config, batching, metrics)
and the plain PyTorch code it wraps, which imports and tests without Ray. Beside them:

    runtime/        the stage base and its lifecycle, batching, the GPU lane, deadlines, start phases,
                    compile caches, stage metrics, the cluster's free room
    weights/        model sources (hub id, local directory, `tiny`, `random`) and loading each component
    geometry        image sizes, `WxH` parsing, upload fitting, latent and patch sizes (pure Python)
    contracts       the typed values passed between stages: the Denoiser's request and job, an image's
                    trace of stage times
    settings        ModelSettings: what every model stage loads, where, and how fast
    speed           `auto` speed settings resolved on each replica's own device
    autoscaling     the Denoiser's queued-work autoscaling policy (named in serve_config.yaml)
    local_pipeline  the four stages in one process, without Serve (the CLI and tests use it)
    cli             `zimage-generate`: one image from the command line
"""

from deployments.runtime.quiet import quiet_known_warnings

quiet_known_warnings()  # before any stage imports torchao or diffusers
