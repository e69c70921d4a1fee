"""The DiT's speed-ups, one job a module; each rewrites a loaded `ZImageTransformer2DModel` in place
and keeps its call signature, so `DenoiseLoop` (and diffusers' own pipeline) call it as before.

- `blocks`: where the repeated transformer blocks are;
- `rotary`: real-valued RoPE and the attention processor that uses it (inductor cannot compile
  diffusers' complex-number RoPE);
- `fusion`: q/k/v and the SwiGLU's w1/w3 as single GEMMs;
- `fp8`: torchao FP8 rowwise dynamic quantization of the block linears;
- `regional_compile`: one compiled graph shared by every block, dynamic in batch and sequence;
- `warmup`: compiling and planning every graph a request needs before a replica is ready;
- `fused_quant`, `fp8_attention`, `fp8_linear`, `fused_block`: the fused FP8 path (single-pass
  Triton row kernels, cuDNN's FP8 attention, pre-quantized FP8 GEMMs), `fp8_kernels="fused"`;
- `optimize`: the composition, in the order the pieces need;
- `caption_buckets`: captions padded to their 32-token bucket with the model's own pad rows and pad
  mask, the same function as the exact length;
- `step_graphs`: batch-1 forwards replayed from CUDA graphs, one per image shape and caption bucket
  (`dit_cuda_graphs`);
- `size_warmup`: after ready, every caption bucket's graph at the warm-up sizes and a first forward
  at each preset size.

Measured effects (one H200, 1024x1024) are in benchmarks/RESULTS.md and shared/gpu/MEASURED.md.
"""
