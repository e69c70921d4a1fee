"""Prompt encoding: Qwen3 chat template, penultimate hidden states, ragged per-prompt embeddings.

Computes what diffusers' `ZImagePipeline._encode_prompt` computes, with differences that do not
change the result: a batch is padded on the right to a length bucket instead of always to 512
tokens, and no padding mask is built. The encoder is causal, so a real token only ever attends to
earlier tokens, which are real; what the padding positions compute is dropped. A prompt over the
token cap is reported to the caller instead of being cut silently.

Batch invariance: a batch pads every prompt to the bucket of its longest prompt, and on the CPU the
kernels' rounding depends on that length (it sets the GEMMs' row counts and the attention's length),
so a prompt's embedding would depend on its company. With `batch_invariant` (the CPU default) each prompt runs in
a forward of its own, padded to its own bucket, exactly as when it is encoded alone.

On a GPU the encoder is launch-bound (36 small layers for a few hundred tokens), so each
(batch, length) bucket is captured once as a CUDA graph and replayed; with the decoder layers
compiled (`text_encoder_compile.optimize_text_encoder`) the graphs replay fused kernels.

The model gets its attention mask as a ready per-layer-type mapping of None: transformers then
builds no mask and SDPA runs plain causal attention, the same function as the causal mask it would
build for rows without padding. Building one also differs between eager calls and CUDA-graph
capture (a materialized mask there), which would make compiled layers recompile inside a capture.
"""

from __future__ import annotations

import torch

from deployments.contracts import CaptionEmbedding

DEFAULT_MAX_TOKENS = 512
LENGTH_BUCKETS = (32, 64, 128, 256, 384, 512)
BATCH_BUCKETS = (1, 2, 4, 8, 16)


def bucket(value: int, buckets: tuple[int, ...]) -> int:
    return next((b for b in buckets if b >= value), value)


class PromptEncoder:
    def __init__(
        self,
        tokenizer,
        text_encoder,
        device: torch.device,
        max_tokens: int = DEFAULT_MAX_TOKENS,
        cuda_graphs: bool = False,
        batch_invariant: bool | None = None,
    ):
        """`batch_invariant` (None: on for the CPU, off elsewhere) encodes each prompt in a forward of
        its own, so that its embedding is bitwise the same alone or in any batch."""
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.max_tokens = max_tokens
        self.cuda_graphs = cuda_graphs and device.type == "cuda"
        self.batch_invariant = device.type == "cpu" if batch_invariant is None else batch_invariant
        self._graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self._pool = None
        layer_types = set(getattr(text_encoder.config, "layer_types", None) or ["full_attention"])
        self._causal_only = {"full_attention": None} if layer_types == {"full_attention"} else None

    def template(self, prompt: str) -> str:
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}],
            tokenize=False,
            add_generation_prompt=True,
            enable_thinking=True,
        )

    def token_ids(self, prompt: str) -> list[int]:
        return self.tokenizer(self.template(prompt), add_special_tokens=True)["input_ids"]

    @torch.inference_mode()
    def encode(self, prompts: list[str]) -> list[CaptionEmbedding]:
        """Encodes a batch of prompts; each result is `[L_i, hidden]` on the CPU."""
        if self.batch_invariant:  # one forward per prompt: the forward it gets alone
            return [item for prompt in prompts for item in self._encode_together([prompt])]
        return self._encode_together(prompts)

    def _encode_together(self, prompts: list[str]) -> list[CaptionEmbedding]:
        """One forward for all `prompts`, padded on the right to one length bucket."""
        if not prompts:
            return []
        full = [self.token_ids(p) for p in prompts]
        kept = [ids[: self.max_tokens] for ids in full]
        length = bucket(max(len(ids) for ids in kept), LENGTH_BUCKETS)
        rows = bucket(len(kept), BATCH_BUCKETS) if self.cuda_graphs else len(kept)
        input_ids = torch.full((rows, length), self.tokenizer.pad_token_id, dtype=torch.long)
        for row, ids in enumerate(kept):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        hidden = self._forward(input_ids.to(self.device)).to("cpu")
        return [
            CaptionEmbedding(
                embedding=hidden[row, : len(ids)].clone(),
                num_tokens=len(ids),
                truncated=len(full[row]) > len(ids),
                dropped_tokens=len(full[row]) - len(ids),
            )
            for row, ids in enumerate(kept)
        ]

    def run_model(self, input_ids: torch.Tensor) -> torch.Tensor:
        """One plain forward of padded token ids `[rows, length]`: the hidden states Z-Image reads."""
        return self.text_encoder(input_ids=input_ids, attention_mask=self._causal_only, use_cache=False).last_hidden_state

    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.cuda_graphs or input_ids.shape[0] > BATCH_BUCKETS[-1]:
            return self.run_model(input_ids)
        graph, static_ids, static_out = self._graph_for(*input_ids.shape)
        static_ids.copy_(input_ids)
        graph.replay()
        return static_out.clone()

    def _graph_for(self, rows: int, length: int):
        key = (rows, length)
        if key not in self._graphs:
            static_ids = torch.full((rows, length), self.tokenizer.pad_token_id, dtype=torch.long, device=self.device)
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # warm the kernels (and their autotuning) outside capture
                for _ in range(2):
                    self.run_model(static_ids)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self._pool):
                static_out = self.run_model(static_ids)
            self._graphs[key] = (graph, static_ids, static_out)
        return self._graphs[key]

    def warmup(self) -> int:
        """Captures every bucket up front so that no request pays for a capture; returns the count."""
        if self.cuda_graphs:
            with torch.inference_mode():
                for rows in (1,) if self.batch_invariant else BATCH_BUCKETS:  # invariant: one prompt a forward
                    for length in LENGTH_BUCKETS:
                        self._graph_for(rows, length)
        return len(self._graphs)
