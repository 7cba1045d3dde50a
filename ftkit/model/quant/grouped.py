"""Grouped expert matmuls: rows of `x` are sorted by expert and `offsets` holds each expert's cumulative end row.

`grouped_linear(x, w, offsets)` computes `x[rows of e] @ w[e].T` for every expert e in one call:
- "grouped": transformers' own grouped-GEMM dispatcher (`transformers.integrations.moe._grouped_mm`:
  `torch.nn.functional.grouped_mm`, else `torch._grouped_mm`, else its per-expert fallback), the CUDA bf16 hot path;
- "loop": one matmul per hit expert (the CPU fallback; also the reference the grouped path is tested against).
`low_rank_grouped_linear` is the LoRA path on top: two grouped GEMMs through a rank-r bottleneck.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.integrations import moe as hf_moe

KERNELS = ("auto", "grouped", "loop")

# The grouped kernels need every row stride of their operands to be a multiple of 16 bytes ("strides should be
# multiple of 16 bytes"); a LoRA rank is the only expert dimension that may not be.
_STRIDE_BYTES = 16


def has_native_grouped_mm() -> bool:
    """Whether this torch has a fused grouped GEMM at all (transformers falls back to a loop otherwise)."""
    return hasattr(torch.nn.functional, "grouped_mm") or hasattr(torch, "_grouped_mm")


def resolve_kernel(kernel: str, x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> str:
    """`auto` -> grouped where the fused kernel runs for this device/dtype, else loop. CUDA bf16 only (elsewhere the
    loop is as fast and exact), and only where transformers' own check says this torch build supports the GPU
    (torch <= 2.8 has `torch._grouped_mm` on sm90 only; later builds on sm80+). `weight`: any tensor with the
    expert weights' device and compute dtype."""
    if kernel != "auto":
        return kernel
    if x.device.type == "cuda" and weight.dtype == torch.bfloat16 and hf_moe._can_use_grouped_mm(x, weight, offsets):
        return "grouped"
    return "loop"


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, kernel: str) -> torch.Tensor:
    """x: (S, in) sorted by expert; weight: (E, out, in); offsets: (E,) int32 cumulative row ends -> (S, out)."""
    if kernel == "grouped":
        return hf_moe._grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    ends = offsets.tolist()  # host sync: the loop is the CPU fallback (and the reference), not the GPU hot path
    pieces, start = [], 0
    for expert, end in enumerate(ends):
        if end > start:
            pieces.append(torch.nn.functional.linear(x[start:end], weight[expert]))
        start = end
    if not pieces:
        return x.new_zeros(0, weight.shape[-2])
    return torch.cat(pieces)


def low_rank_grouped_linear(
    x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, offsets: torch.Tensor, kernel: str
) -> torch.Tensor:
    """(x @ A_e^T) @ B_e^T per expert. lora_a: (E, r, in), lora_b: (E, out, r), both in x's dtype.

    The grouped kernel needs the rank to span a multiple of 16 bytes (8 in bf16): any other rank is zero-padded
    here, for the duration of the call. The padded rank columns of A give zero activations, and the matching padded
    columns of B multiply only those zeros, so outputs and the gradients of the real entries are unchanged; the
    adapter itself (PEFT's lora_A / lora_B) keeps its own rank."""
    if kernel == "grouped":
        align = max(1, _STRIDE_BYTES // x.element_size())
        pad = -lora_a.shape[1] % align
        if pad:
            lora_a = F.pad(lora_a, (0, 0, 0, pad))  # (E, r + pad, in)
            lora_b = F.pad(lora_b, (0, pad))  # (E, out, r + pad)
    return grouped_linear(grouped_linear(x, lora_a, offsets, kernel), lora_b, offsets, kernel)


def frozen_grouped_linear(x, offsets, storage, dtype, kernel, slices=None, transpose: bool = False):
    """grouped_linear against the 4-bit weight, dense only transiently. `slices`: None dequantizes the whole
    (E, out, in) stack at once; else [(first expert, end expert), ...] covering every expert, one slice of experts
    dense at a time (rows of x are sorted by expert, so a slice owns a contiguous block of rows)."""
    if slices is None:
        weight = storage.dequantize(dtype)
        return grouped_linear(x, weight.transpose(-2, -1) if transpose else weight, offsets, kernel)
    absmax = storage.absmax_fp32()
    out_features = storage.shape[-1] if transpose else storage.shape[-2]

    def dense(first: int, end: int) -> torch.Tensor:
        weight = storage.dequantize_rows(first, end, dtype, absmax)
        return weight.transpose(-2, -1) if transpose else weight

    if kernel == "grouped":
        return _grouped_by_slices(x, offsets, slices, dense, out_features)
    ends = [0] + offsets.tolist()  # one host read: the loop reads every offset anyway
    out = x.new_empty(x.shape[0], out_features)
    for first, end in slices:
        row0, row1 = ends[first], ends[end]
        if row1 > row0:
            out[row0:row1] = grouped_linear(x[row0:row1], dense(first, end), offsets[first:end] - row0, kernel)
    return out


def _grouped_by_slices(x, offsets, slices, dense, out_features: int) -> torch.Tensor:
    """The grouped kernel one slice of experts at a time, with no host read: where a slice's rows start is a device
    value, so they are brought to the front by a gather over a rotated index (the kernel computes rows up to the
    slice's last offset only and leaves the rest unwritten, masked here), and rotated back into place."""
    rows_total = x.shape[0]
    out = x.new_zeros(rows_total, out_features)
    if rows_total == 0:
        return out
    rows = torch.arange(rows_total, device=x.device)
    for first, end in slices:
        start = offsets[first - 1].long() if first else offsets.new_zeros((), dtype=torch.long)
        local = offsets[first:end] - start.to(offsets.dtype)
        part = grouped_linear(x[(rows + start) % rows_total], dense(first, end), local, "grouped")
        part = torch.where((rows < local[-1]).unsqueeze(-1), part, 0)
        out += part[(rows - start) % rows_total]
    return out


class FrozenQuantizedGroupedLinear(torch.autograd.Function):
    """grouped_linear against a frozen 4-bit weight that is dequantized in forward and AGAIN in backward.

    Saving the dense weight for backward would keep ~1.5 GB per MoE layer alive until backward (for every layer of
    a non-checkpointed stack), which is what 4-bit is meant to avoid; re-dequantizing costs one pass over the
    weight. The input is not saved either: the weight is frozen, so only grad wrt x is needed. With `slices`, only
    one slice of experts is dense at any time (forward and backward)."""

    @staticmethod
    def forward(ctx, x, offsets, storage, dtype, kernel, slices):
        ctx.save_for_backward(offsets)
        ctx.storage, ctx.dtype, ctx.kernel, ctx.slices = storage, dtype, kernel, slices
        return frozen_grouped_linear(x, offsets, storage, dtype, kernel, slices)

    @staticmethod
    def backward(ctx, grad_out):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None, None
        (offsets,) = ctx.saved_tensors
        # d/dx (x @ W_e^T) = grad @ W_e, i.e. grouped_linear against W_e^T.
        grad_x = frozen_grouped_linear(
            grad_out.to(ctx.dtype).contiguous(), offsets, ctx.storage, ctx.dtype, ctx.kernel, ctx.slices, transpose=True
        )
        return grad_x, None, None, None, None, None
