"""FP8 attention for the DiT's joint image + caption sequence: cuDNN's FP8 SDPA on Hopper.

Attention is about a quarter of a 1024x1024 step in bf16 (cuDNN, ~530 TFLOP/s: RESULTS.md, "Where a
DiT step goes", 2026-11-22). cuDNN's FP8 flash
attention (through the cuDNN frontend's Python graph API, package `nvidia-cudnn-frontend`) runs
Q K^T and P V on FP8 tensor cores with one scale per tensor:

- `qkv_norm_rope_quant` (Triton, one program per token, every head): the per-head RMS norms of q and
  k, the rotary embedding, and the cast of q, k and v to FP8, reading the fused q/k/v GEMM's output
  once. q and k take a static scale: after an RMS norm with weight `w` every rotated pair has norm
  at most `sqrt(head_dim) * max|w|`, so that bound maps to 448 and nothing can overflow (FP8 is a
  floating-point format: a loose bound costs range at the bottom, not precision). v takes its
  tensor's absolute maximum: a first kernel reduces each row and takes the maximum across rows
  with one atomic per row (inductor's reduction of the same slice to one value took 74 us of a
  1024x1024 block: RESULTS.md, round of 2026-12-01, this one reads the slice once).
- `sdpa_fp8`: the cuDNN graph, built once per (batch, sequence, heads, head_dim, padded) and cached.
  Hopper writes the output in FP8; every output row is a convex combination of v's rows, so v's
  scale bounds it exactly and the output projection takes it as is (`descale_v` per row), with no
  quantization pass in between.

Ragged batches: each item's real tokens are a prefix of its padded sequence (diffusers pads the
joint sequence at the end), so the key-padding mask is one length per item: cuDNN's padding mask
(`seq_lens`). Under load almost every batch is ragged (captions differ), so this is the common case
of a busy replica, not a corner.
"""

from __future__ import annotations

import math
import threading

import torch

from deployments.denoiser.dit import fused_quant
from deployments.denoiser.dit.fused_quant import AMAX_FLOOR, FP8_MAX, register_op, row_split, triton

SOFTMAX_SCALE = FP8_MAX  # P is in [0, 1]: 1 maps to 448


def qk_static_scales(norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor) -> torch.Tensor:
    """`[2]` float32: the dequantization scales of q and k (bound / 448), from the norms' weights."""
    head_dim = norm_q_weight.numel()
    bounds = torch.stack([norm_q_weight.detach().float().abs().max(), norm_k_weight.detach().float().abs().max()])
    return (bounds * math.sqrt(head_dim)).clamp_min(AMAX_FLOOR) / FP8_MAX


if triton is not None:
    import triton.language as tl

    @triton.jit
    def _norm_rope_quant_heads(src_ptr, dst_ptr, w_ptr, src_row, dst_row, cos, sin, descale, heads, eps,
                               HEADS: tl.constexpr, HALF: tl.constexpr):
        """One token's heads `[HEADS, 2 * HALF]`, read and written as contiguous rows; the rotation
        pairs (even, odd) come from splitting the last dimension in registers."""
        head = tl.arange(0, HEADS)[:, None]
        col = tl.arange(0, 2 * HALF)[None, :]
        mask = head < heads
        offsets = head * (2 * HALF) + col
        x = tl.load(src_ptr + src_row + offsets, mask=mask, other=0.0).to(tl.float32)
        rms = tl.rsqrt(tl.sum(x * x, axis=1) / (2 * HALF) + eps)[:, None]
        x = x * rms * tl.load(w_ptr + col).to(tl.float32)
        even, odd = tl.split(tl.reshape(x, (HEADS, HALF, 2)))
        rotated = tl.reshape(tl.join(even * cos - odd * sin, even * sin + odd * cos), (HEADS, 2 * HALF))
        rotated = tl.clamp(rotated / descale, -448.0, 448.0)
        tl.store(dst_ptr + dst_row + offsets, rotated.to(dst_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _v_amax_kernel(qkv_ptr, amax_ptr, width, row_stride, HEAD: tl.constexpr, TAIL: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        v_head, v_tail = fused_quant._load_row(qkv_ptr, row * row_stride + 2 * width, width, HEAD, TAIL)
        tl.atomic_max(amax_ptr, tl.maximum(tl.max(tl.abs(v_head), axis=0), tl.max(tl.abs(v_tail), axis=0)))

    @triton.jit
    def _qkv_norm_rope_quant_kernel(qkv_ptr, wq_ptr, wk_ptr, rope_ptr, qk_descale_ptr, v_amax_ptr, v_descale_ptr,
                                    q_ptr, k_ptr, v_ptr, heads, row_stride, eps_q, eps_k,
                                    HEADS: tl.constexpr, HALF: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        width = heads * 2 * HALF
        src_row = row * row_stride
        dst_row = row * width
        table = tl.load(rope_ptr + row * 2 * HALF + tl.arange(0, 2 * HALF))  # (cos, sin) pairs
        cos, sin = tl.split(tl.reshape(table, (HALF, 2)))
        cos, sin = cos[None, :].to(tl.float32), sin[None, :].to(tl.float32)
        _norm_rope_quant_heads(qkv_ptr, q_ptr, wq_ptr, src_row, dst_row, cos, sin, tl.load(qk_descale_ptr),
                               heads, eps_q, HEADS, HALF)
        _norm_rope_quant_heads(qkv_ptr, k_ptr, wk_ptr, src_row + width, dst_row, cos, sin,
                               tl.load(qk_descale_ptr + 1), heads, eps_k, HEADS, HALF)
        head = tl.arange(0, HEADS)[:, None]
        offsets = head * (2 * HALF) + tl.arange(0, 2 * HALF)[None, :]
        mask = head < heads
        v_descale = tl.maximum(tl.load(v_amax_ptr), 1e-12) / 448.0
        v = tl.load(qkv_ptr + src_row + 2 * width + offsets, mask=mask, other=0.0).to(tl.float32)
        v = tl.clamp(v / v_descale, -448.0, 448.0)
        tl.store(v_ptr + dst_row + offsets, v.to(v_ptr.dtype.element_ty), mask=mask)
        if row == 0:
            tl.store(v_descale_ptr, v_descale)

    def _qkv_norm_rope_quant_op(qkv: torch.Tensor, norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                                rope: torch.Tensor, qk_descale: torch.Tensor, heads: int, eps_q: float, eps_k: float
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = qkv.shape[0]
        width = qkv.shape[1] // 3
        q, k, v = (torch.empty((rows, width), dtype=fused_quant.FP8_DTYPE, device=qkv.device) for _ in range(3))
        v_amax = torch.zeros(1, dtype=torch.float32, device=qkv.device)
        v_descale = torch.empty(1, dtype=torch.float32, device=qkv.device)
        head, tail = row_split(width)
        _v_amax_kernel[(rows,)](qkv, v_amax, width, qkv.stride(0), HEAD=head, TAIL=tail, num_warps=8)
        _qkv_norm_rope_quant_kernel[(rows,)](
            qkv, norm_q_weight, norm_k_weight, rope, qk_descale, v_amax, v_descale, q, k, v, heads, qkv.stride(0),
            eps_q, eps_k,
            HEADS=triton.next_power_of_2(heads), HALF=width // heads // 2, num_warps=8,
        )
        return q, k, v, v_descale

    def _qkv_norm_rope_quant_fake(qkv, norm_q_weight, norm_k_weight, rope, qk_descale, heads, eps_q, eps_k):
        rows, width = qkv.shape[0], qkv.shape[1] // 3
        fp8 = tuple(qkv.new_empty((rows, width), dtype=fused_quant.FP8_DTYPE) for _ in range(3))
        return (*fp8, qkv.new_empty(1, dtype=torch.float32))

    register_op("qkv_norm_rope_quant(Tensor qkv, Tensor norm_q_weight, Tensor norm_k_weight, Tensor rope, "
                "Tensor qk_descale, int heads, float eps_q, float eps_k) -> (Tensor, Tensor, Tensor, Tensor)",
                _qkv_norm_rope_quant_op, _qkv_norm_rope_quant_fake)


def v_descale_of(qkv: torch.Tensor) -> torch.Tensor:
    """`[1]` float32: v's dequantization scale, its absolute maximum over 448."""
    width = qkv.shape[-1] // 3
    return (qkv[..., 2 * width:].abs().amax().float().clamp_min(AMAX_FLOOR) / FP8_MAX).reshape(1)


def qkv_norm_rope_quant(qkv: torch.Tensor, norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                        rope: torch.Tensor, qk_descale: torch.Tensor, heads: int, eps_q: float, eps_k: float,
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """`qkv` `[rows, 3 * heads * head_dim]` bf16 and `rope` `[rows, head_dim / 2, 2]` float32 (cos, sin)
    -> FP8 q, k, v `[rows, heads * head_dim]` and v's `[1]` dequantization scale. `qkv`'s rows may lie
    further apart than their width (`fused_quant.strided_rows`)."""
    qkv = fused_quant.strided_rows(qkv)
    if not fused_quant.triton_available(qkv.device):
        v_descale = v_descale_of(qkv)
        q, k, v = qkv_norm_rope_quant_reference(qkv, norm_q_weight, norm_k_weight, rope, qk_descale, v_descale,
                                                heads, eps_q, eps_k)
        return q, k, v, v_descale
    return torch.ops.zimage.qkv_norm_rope_quant(qkv, norm_q_weight, norm_k_weight, rope, qk_descale, heads,
                                                eps_q, eps_k)


def qkv_norm_rope_reference(qkv: torch.Tensor, norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                            rope: torch.Tensor, heads: int, eps_q: float, eps_k: float
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """float32 q, k (normed, rotated) and v, each `[rows, heads, head_dim]`: the attention's inputs."""
    rows = qkv.shape[0]
    q, k, v = qkv.float().reshape(rows, 3, heads, -1).unbind(1)
    cos, sin = rope[..., 0].float().unsqueeze(1), rope[..., 1].float().unsqueeze(1)

    def norm_rope(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.float()
        even, odd = x[..., 0::2], x[..., 1::2]
        return torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)

    return norm_rope(q, norm_q_weight, eps_q), norm_rope(k, norm_k_weight, eps_k), v


def qkv_norm_rope_quant_reference(qkv: torch.Tensor, norm_q_weight: torch.Tensor, norm_k_weight: torch.Tensor,
                                  rope: torch.Tensor, qk_descale: torch.Tensor, v_descale: torch.Tensor,
                                  heads: int, eps_q: float, eps_k: float
                                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`qkv_norm_rope_quant` in float32, eagerly (CPU, and the tests' reference)."""
    rows = qkv.shape[0]
    q, k, v = qkv_norm_rope_reference(qkv, norm_q_weight, norm_k_weight, rope, heads, eps_q, eps_k)

    def cast(x: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
        return (x / descale).clamp(-FP8_MAX, FP8_MAX).reshape(rows, -1).to(fused_quant.FP8_DTYPE)

    return cast(q, qk_descale[0]), cast(k, qk_descale[1]), cast(v, v_descale)


class _Fp8SdpaGraph:
    """One built cuDNN graph with its tensors' uids and its own scratch (workspace, the amax outputs):
    a call only fills in device pointers (the sequence lengths twice, for queries and keys, when
    padded). Calls on a device come from its one model thread, in stream order, so the scratch is
    never in use twice at once."""

    def __init__(self, graph, tensors: tuple, device: torch.device):
        self.graph = graph
        self.uids = [t.get_uid() for t in tensors]
        self.workspace = torch.empty(max(graph.get_workspace_size(), 1), dtype=torch.uint8, device=device)
        self.amax = torch.empty(2, dtype=torch.float32, device=device)


class _CudnnFp8Sdpa:
    """cuDNN FP8 SDPA graphs, one per (device, batch, sequence, heads, head_dim, padded), built on first use."""

    def __init__(self) -> None:
        self._graphs: dict[tuple[int, ...], _Fp8SdpaGraph] = {}
        self._handles: dict[int, object] = {}
        self._streams: dict[int, int] = {}
        self._constants: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.Lock()

    def _handle(self, device: torch.device):
        import cudnn

        index = device.index if device.index is not None else torch.cuda.current_device()
        if index not in self._handles:
            with torch.cuda.device(index):
                self._handles[index] = cudnn.create_handle()
                self._constants[index] = (
                    torch.full((1,), 1.0 / SOFTMAX_SCALE, dtype=torch.float32, device=device),
                    torch.full((1,), SOFTMAX_SCALE, dtype=torch.float32, device=device),
                )
        return index, self._handles[index]

    def _graph(self, index: int, handle, device: torch.device, batch: int, seq: int, heads: int,
               head_dim: int, padded: bool) -> _Fp8SdpaGraph:
        key = (index, batch, seq, heads, head_dim, padded)
        if key in self._graphs:
            return self._graphs[key]
        import cudnn

        fp8, fp32 = cudnn.data_type.FP8_E4M3, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=fp8, intermediate_data_type=fp32, compute_data_type=fp32, handle=handle)
        dims = [batch, heads, seq, head_dim]
        strides = [seq * heads * head_dim, head_dim, heads * head_dim, 1]  # [B, S, H, D] in memory
        q, k, v = (graph.tensor(name=n, dim=dims, stride=strides, data_type=fp8) for n in ("q", "k", "v"))
        scalars = [graph.tensor(name=n, dim=[1, 1, 1, 1], stride=[1, 1, 1, 1], data_type=fp32)
                   for n in ("descale_q", "descale_k", "descale_v", "descale_s", "scale_s", "scale_o")]
        lengths = ()
        if padded:  # [B, 1, 1, 1] int32: the real tokens of each item, for queries and for keys
            lengths = tuple(graph.tensor(name=n, dim=[batch, 1, 1, 1], stride=[1, 1, 1, 1],
                                         data_type=cudnn.data_type.INT32) for n in ("seq_len_q", "seq_len_kv"))
        masking = dict(use_padding_mask=True, seq_len_q=lengths[0], seq_len_kv=lengths[1]) if padded else {}
        out, _, amax_s, amax_o = graph.sdpa_fp8(
            q=q, k=k, v=v, descale_q=scalars[0], descale_k=scalars[1], descale_v=scalars[2],
            descale_s=scalars[3], scale_s=scalars[4], scale_o=scalars[5],
            generate_stats=False, attn_scale=1.0 / math.sqrt(head_dim), use_causal_mask=False, name="sdpa_fp8",
            **masking,
        )
        out.set_output(True).set_dim(dims).set_stride(strides).set_data_type(fp8)
        for amax in (amax_s, amax_o):
            amax.set_output(True).set_dim([1, 1, 1, 1]).set_stride([1, 1, 1, 1]).set_data_type(fp32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()
        graph.build_plans()
        entry = _Fp8SdpaGraph(graph, (q, k, v, *scalars, out, amax_s, amax_o, *lengths), device)
        self._graphs[key] = entry
        return entry

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor,
                 descale_k: torch.Tensor, descale_v: torch.Tensor, heads: int,
                 seq_lens: torch.Tensor | None = None) -> torch.Tensor:
        import cudnn

        batch, seq, width = q.shape
        padded = seq_lens is not None
        with self._lock:
            index, handle = self._handle(q.device)
            entry = self._graph(index, handle, q.device, batch, seq, heads, width // heads, padded)
        descale_s, scale_s = self._constants[index]
        # padded query rows are not written: zeros keep them finite (an FP8 NaN there would reach
        # the next block's v scale through its amax, which reads every row)
        out = torch.zeros_like(q) if padded else torch.empty_like(q)
        scale_o = 1.0 / descale_v
        pointers = (q, k, v, descale_q, descale_k, descale_v, descale_s, scale_s, scale_o, out,
                    entry.amax[0:1], entry.amax[1:2])
        if padded:
            seq_lens = seq_lens.to(torch.int32).contiguous()
            pointers += (seq_lens, seq_lens)
        stream = torch.cuda.current_stream(q.device).cuda_stream
        if self._streams.get(index) != stream:
            cudnn.set_stream(handle=handle, stream=stream)
            self._streams[index] = stream
        # the pybind call with raw pointers: the Python `execute` wrapper only maps tensors to these
        entry.graph._execute(dict(zip(entry.uids, (t.data_ptr() for t in pointers))), entry.workspace.data_ptr(),
                             handle)
        return out


_SDPA = _CudnnFp8Sdpa()


def _sdpa_fp8_op(q, k, v, descale_q, descale_k, descale_v, heads, seq_lens=None):
    if q.device.type != "cuda":
        raise RuntimeError("sdpa_fp8 runs on CUDA GPUs (cuDNN); use the bf16 attention elsewhere")
    return _SDPA(q, k, v, descale_q, descale_k, descale_v, heads, seq_lens)


register_op("sdpa_fp8(Tensor q, Tensor k, Tensor v, Tensor descale_q, Tensor descale_k, Tensor descale_v, "
            "int heads, Tensor? seq_lens=None) -> Tensor", _sdpa_fp8_op,
            lambda q, k, v, descale_q, descale_k, descale_v, heads, seq_lens=None: torch.empty_like(q))


def sdpa_fp8(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor, descale_k: torch.Tensor,
             descale_v: torch.Tensor, heads: int, seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """FP8 attention over `[B, S, heads * head_dim]` FP8 q, k, v; the FP8 output has v's
    dequantization scale. `seq_lens` `[B]`: item b attends over its first `seq_lens[b]` tokens and its
    rows past them are zeros (a key-padding mask whose real tokens are a prefix). CUDA only (cuDNN)."""
    return torch.ops.zimage.sdpa_fp8(q, k, v, descale_q, descale_k, descale_v, heads, seq_lens)


def prefix_lengths(attn_mask: torch.Tensor) -> torch.Tensor:
    """`[B]` int32 real tokens per item, from a `[B, S]` key-padding mask (True = real) whose real
    tokens are a prefix, as diffusers' Z-Image builds it."""
    return attn_mask.sum(dim=1, dtype=torch.int32)


def sdpa_fp8_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, descale_q: torch.Tensor,
                       descale_k: torch.Tensor, descale_v: torch.Tensor, heads: int,
                       seq_lens: torch.Tensor | None = None) -> torch.Tensor:
    """The dequantized attention in float32, `[B, S, heads * head_dim]` (the tests' reference); with
    `seq_lens`, keys past each item's length are masked and its rows past it are zeros."""
    def heads_first(x: torch.Tensor, descale: torch.Tensor) -> torch.Tensor:
        return (x.float() * descale.float()).unflatten(-1, (heads, -1)).transpose(1, 2)

    mask = None
    if seq_lens is not None:
        real = torch.arange(q.shape[1], device=q.device)[None, :] < seq_lens.to(q.device)[:, None]  # [B, S]
        mask = real[:, None, None, :]
    out = torch.nn.functional.scaled_dot_product_attention(
        heads_first(q, descale_q), heads_first(k, descale_k), heads_first(v, descale_v), attn_mask=mask
    ).transpose(1, 2).flatten(2)
    return out if seq_lens is None else out * real[..., None]


def cudnn_fp8_attention_available(device: torch.device) -> bool:
    """cuDNN's frontend is importable and the GPU is a Hopper (FP8 SDPA forward needs sm_90)."""
    if device.type != "cuda" or not torch.cuda.is_available() or triton is None:
        return False
    if torch.cuda.get_device_capability(device) < (9, 0):
        return False
    try:
        import cudnn  # noqa: F401
    except ImportError:
        return False
    return True
