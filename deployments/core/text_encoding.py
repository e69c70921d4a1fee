"""Prompt encoding: Qwen3 chat template, penultimate hidden states, ragged per-prompt embeddings.

Computes what diffusers' `ZImagePipeline._encode_prompt` computes, with two differences that do not
change the result: a batch is padded to its longest prompt instead of always to 512 tokens (the
encoder is causal, so right padding never reaches real tokens), and a prompt over the token cap is
reported to the caller instead of being cut silently.
"""

from __future__ import annotations

import torch

from deployments.core.contracts import CaptionEmbedding

DEFAULT_MAX_TOKENS = 512


class PromptEncoder:
    def __init__(self, tokenizer, text_encoder, device: torch.device, max_tokens: int = DEFAULT_MAX_TOKENS):
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.device = device
        self.max_tokens = max_tokens

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
        if not prompts:
            return []
        full = [self.token_ids(p) for p in prompts]
        kept = [ids[: self.max_tokens] for ids in full]
        longest = max(len(ids) for ids in kept)
        pad_id = self.tokenizer.pad_token_id
        input_ids = torch.full((len(kept), longest), pad_id, dtype=torch.long)
        mask = torch.zeros((len(kept), longest), dtype=torch.bool)
        for row, ids in enumerate(kept):
            input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            mask[row, : len(ids)] = True
        hidden = self.text_encoder(
            input_ids=input_ids.to(self.device), attention_mask=mask.to(self.device)
        ).last_hidden_state
        hidden = hidden.to("cpu")
        return [
            CaptionEmbedding(
                embedding=hidden[row, : len(ids)].clone(),
                num_tokens=len(ids),
                truncated=len(full[row]) > len(ids),
                dropped_tokens=len(full[row]) - len(ids),
            )
            for row, ids in enumerate(kept)
        ]
