"""The text encoder on one long prompt: the full model padded to 512 tokens as diffusers runs it,
against ours cut after the layer Z-Image reads, with CUDA graphs and compiled layers."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import Bench, rel_err
import deployments.text_encoder.compile as text_encoder_compile
from deployments.runtime import compile_cache
from deployments.weights import loading

PROMPTS = Path(__file__).resolve().parents[1] / "prompts.txt"


def make_prompt(encoder: Any, tokens: int) -> str:
    """A prompt from benchmarks/prompts.txt whose templated length is about `tokens`."""
    lines = [ln.strip() for ln in PROMPTS.read_text().splitlines() if ln.strip()]
    words: list[str] = []
    for line in lines * 10:
        words += line.split()
        if len(encoder.token_ids(" ".join(words))) >= tokens:
            break
    while len(words) > 1 and len(encoder.token_ids(" ".join(words))) > tokens:
        words.pop()
    return " ".join(words)


def section_text(bench: Bench, source: Any) -> None:
    from deployments.text_encoder.encoding import PromptEncoder

    tokenizer = loading.load_tokenizer(source)
    model = loading.load_text_encoder(source, bench.device, bench.dtype, penultimate_only=False)
    encoder = PromptEncoder(tokenizer, model, bench.device)
    prompt = make_prompt(encoder, bench.args.prompt_tokens)
    n_tokens = len(encoder.token_ids(prompt))
    bench.results["text_prompt_tokens"] = n_tokens

    def plain() -> torch.Tensor:
        inputs = tokenizer(
            [encoder.template(prompt)], padding="max_length", max_length=512, truncation=True, return_tensors="pt"
        )
        mask = inputs.attention_mask.to(bench.device).bool()
        with torch.no_grad():
            hidden = model(
                input_ids=inputs.input_ids.to(bench.device), attention_mask=mask, output_hidden_states=True
            ).hidden_states[-2]
        return hidden[0][mask[0]]

    timing = bench.measure(plain)
    bench.row("text_encoder", None, "plain_full_pad512", timing, tokens=n_tokens)
    reference = plain().float().cpu()
    bench.write()

    loading.truncate_to_penultimate(model)
    timing = bench.measure(lambda: encoder.encode([prompt]))
    bench.row("text_encoder", None, "ours_truncated", timing, tokens=n_tokens)
    bench.results["accuracy"]["text_encoder/ours_truncated"] = rel_err(encoder.encode([prompt])[0].embedding, reference)
    bench.write()

    if bench.cuda:
        graphed = PromptEncoder(tokenizer, model, bench.device, cuda_graphs=True)
        start = time.perf_counter()
        captured = graphed.warmup()
        bench.results["compile"]["text_encoder_cuda_graphs"] = {"graphs": captured,
                                                                "capture_s": round(time.perf_counter() - start, 2)}
        timing = bench.measure(lambda: graphed.encode([prompt]))
        bench.row("text_encoder", None, "ours_cuda_graphs", timing, tokens=n_tokens)
        bench.results["accuracy"]["text_encoder/ours_cuda_graphs"] = rel_err(
            graphed.encode([prompt])[0].embedding, reference
        )
        bench.write()
        del graphed
        if not bench.args.skip_compile:  # what the TextEncoder runs: compiled layers inside the graphs
            compile_cache.configure_compile_cache(bench.args.cache_dir)
            text_encoder_compile.optimize_text_encoder(model, compile=True, backend=bench.backend)
            compiled = PromptEncoder(tokenizer, model, bench.device, cuda_graphs=True)
            start = time.perf_counter()
            captured = compiled.warmup()
            bench.results["compile"]["text_encoder_compiled_cuda_graphs"] = {
                "graphs": captured, "compile_and_capture_s": round(time.perf_counter() - start, 2)}
            timing = bench.measure(lambda: compiled.encode([prompt]))
            bench.row("text_encoder", None, "ours_compiled_cuda_graphs", timing, tokens=n_tokens)
            bench.results["accuracy"]["text_encoder/ours_compiled_cuda_graphs"] = rel_err(
                compiled.encode([prompt])[0].embedding, reference
            )
            batch = [make_prompt(encoder, t) for t in (40, 90, 160, 256, 120, 60, 200, 30)]
            timing = bench.measure(lambda: compiled.encode(batch))
            bench.row("text_encoder_batch8", None, "ours_compiled_cuda_graphs", timing, tokens=n_tokens)
            bench.write()
            del compiled

    del model, encoder
    bench.free()
