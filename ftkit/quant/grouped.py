"""Grouped expert matmuls: rows of `x` are sorted by expert and `offsets` holds each expert's cumulative end row.

`grouped_linear(x, w, offsets)` computes `x[rows of e] @ w[e].T` for every expert e in one call:
- "grouped": `torch.nn.functional.grouped_mm` / `torch._grouped_mm` (one kernel; the CUDA bf16 hot path);
- "loop": one matmul per hit expert (the CPU fallback; also the reference the grouped path is tested against).
"""

from __future__ import annotations

import torch

KERNELS = ("auto", "grouped", "loop")

_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def resolve_kernel(kernel: str, device: torch.device, dtype: torch.dtype) -> str:
    """`auto` -> grouped where the fused kernel exists for this device/dtype (CUDA sm80+, bf16), else loop."""
    if kernel != "auto":
        return kernel
    if _grouped_mm is not None and device.type == "cuda" and dtype == torch.bfloat16:
        if torch.cuda.get_device_capability(device) >= (8, 0):
            return "grouped"
    return "loop"


def grouped_linear(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, kernel: str) -> torch.Tensor:
    """x: (S, in) sorted by expert; weight: (E, out, in); offsets: (E,) int32 cumulative row ends -> (S, out)."""
    if kernel == "grouped":
        if _grouped_mm is None:
            raise RuntimeError("this torch build has no grouped_mm")
        return _grouped_mm(x, weight.transpose(-2, -1), offs=offsets)
    ends = offsets.tolist()  # host sync: acceptable on the CPU fallback only
    pieces, start = [], 0
    for expert, end in enumerate(ends):
        if end > start:
            pieces.append(torch.nn.functional.linear(x[start:end], weight[expert]))
        start = end
    if not pieces:
        return x.new_zeros(0, weight.shape[-2])
    return torch.cat(pieces)


def frozen_grouped_linear(x, offsets, storage, dtype, kernel, slices=None, transpose: bool = False):
    """grouped_linear against the 4-bit weight, dense only transiently. `slices`: None dequantizes the whole
    (E, out, in) stack at once; else [(first expert, end expert, first row, end row), ...] covering every expert and
    row, one slice of experts dense at a time (rows of x are sorted by expert, so a slice owns a contiguous block)."""
    if slices is None:
        weight = storage.dequantize(dtype)
        return grouped_linear(x, weight.transpose(-2, -1) if transpose else weight, offsets, kernel)
    absmax = storage.absmax_fp32()
    out_features = storage.shape[-1] if transpose else storage.shape[-2]
    out = x.new_empty(x.shape[0], out_features)
    for first, end, row0, row1 in slices:
        if row1 > row0:
            weight = storage.dequantize_rows(first, end, dtype, absmax)
            weight = weight.transpose(-2, -1) if transpose else weight
            out[row0:row1] = grouped_linear(x[row0:row1], weight, offsets[first:end] - row0, kernel)
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
        grad_x = frozen_grouped_linear(grad_out.to(ctx.dtype).contiguous(), offsets, ctx.storage, ctx.dtype,
                                       ctx.kernel, ctx.slices, transpose=True)
        return grad_x, None, None, None, None, None
