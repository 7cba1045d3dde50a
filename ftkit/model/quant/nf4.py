"""One frozen tensor stored as bitsandbytes 4-bit (NF4/FP4) blocks: packed uint8 codes + blockwise absmax
(itself 8-bit quantized with double quant).

It is an `nn.Module` holding plain buffers, not a tensor subclass: `model.to(device)` moves it like any buffer and
nothing in autograd or PEFT ever sees a 4-bit tensor pretending to be bf16. The `QuantState` is rebuilt on each
`dequantize()` from the buffers, so it always lives on the buffers' device.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class NF4Tensor(nn.Module):
    def __init__(
        self, source: torch.Tensor, *, quant_type: str, blocksize: int, double_quant: bool, compute_dtype: torch.dtype
    ):
        super().__init__()
        import bitsandbytes.functional as bnbf

        packed, state = bnbf.quantize_4bit(
            source.detach(), blocksize=blocksize, compress_statistics=double_quant, quant_type=quant_type
        )
        self.shape = tuple(source.shape)
        self.blocksize = state.blocksize
        self.quant_type = state.quant_type
        self.compute_dtype = compute_dtype
        self.source_nbytes = source.numel() * source.element_size()
        # Not persistent: the base model's weights are never saved from the quantized copy (adapters only).
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("absmax", state.absmax, persistent=False)
        self.register_buffer("code", state.code, persistent=False)
        self.nested = state.nested
        if state.nested:
            self.register_buffer("offset", torch.as_tensor(state.offset, device=packed.device), persistent=False)
            self.register_buffer("absmax2", state.state2.absmax, persistent=False)
            self.register_buffer("code2", state.state2.code, persistent=False)
            self.blocksize2 = state.state2.blocksize
        self._placeholders: dict[torch.device, nn.Parameter] = {}

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def quant_state(self, dtype: torch.dtype):
        from bitsandbytes.functional import QuantState

        state2 = None
        if self.nested:
            state2 = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32)
        return QuantState(
            absmax=self.absmax,
            shape=torch.Size(self.shape),
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=dtype,
            offset=self.offset if self.nested else None,
            state2=state2,
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """A fresh dense copy in `dtype` (default: the compute dtype). Callers keep it only transiently."""
        import bitsandbytes.functional as bnbf

        return bnbf.dequantize_4bit(self.packed, self.quant_state(dtype or self.compute_dtype))

    def rows_sliceable(self) -> bool:
        """Whether dequantize_rows can cut at any row: each row (expert) must fill whole 4-bit blocks and bytes."""
        per_row = math.prod(self.shape[1:])
        return per_row % self.blocksize == 0 and per_row % 2 == 0

    def absmax_fp32(self) -> torch.Tensor:
        """The blockwise scales in fp32 (decoding the double quantization, as bitsandbytes does before its kernel)."""
        if not self.nested:
            return self.absmax.float()
        import bitsandbytes.functional as bnbf
        from bitsandbytes.functional import QuantState

        nested = QuantState(absmax=self.absmax2, code=self.code2, blocksize=self.blocksize2, dtype=torch.float32)
        return bnbf.dequantize_blockwise(self.absmax, nested) + self.offset

    def dequantize_rows(self, start: int, stop: int, dtype: torch.dtype, absmax: torch.Tensor) -> torch.Tensor:
        """Rows [start, stop) of the tensor (experts start..stop-1), dense in `dtype`, from `absmax_fp32()`: the same
        values as `dequantize()[start:stop]` without the rest of the stack. Needs `rows_sliceable()`."""
        import bitsandbytes.functional as bnbf
        from bitsandbytes.functional import QuantState

        per_row = math.prod(self.shape[1:])
        state = QuantState(
            absmax=absmax[start * per_row // self.blocksize : stop * per_row // self.blocksize],
            shape=torch.Size((stop - start, *self.shape[1:])),
            code=self.code,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            dtype=dtype,
        )
        return bnbf.dequantize_4bit(self.packed[start * per_row // 2 : stop * per_row // 2], state)

    def placeholder(self) -> nn.Parameter:
        """A Parameter with this tensor's shape, compute dtype and device, backed by ONE element (stride 0).

        PEFT's `target_parameters` finds the expert tensors through `named_parameters()` and reads only their
        shape/dtype/device; this gives it that without 46 GB. Its value is NaN so any accidental dense use is loud.
        Cached per device so encoder and decoder modules keep sharing one Parameter, as before quantization."""
        device = self.packed.device
        if device not in self._placeholders:
            one = torch.full((1,) * len(self.shape), float("nan"), dtype=self.compute_dtype, device=device)
            self._placeholders[device] = nn.Parameter(one.expand(self.shape), requires_grad=False)
        return self._placeholders[device]

    def _apply(self, fn, recurse=True):
        # Follow device moves only: a dtype cast (model.bfloat16()) must not touch the fp32 absmax / uint8 codes.
        device = fn(torch.empty(0, device=self.packed.device)).device
        for name, buf in self._buffers.items():
            if buf is not None:
                self._buffers[name] = buf.to(device)
        return self

    def extra_repr(self) -> str:
        return f"shape={self.shape}, {self.quant_type}, blocksize={self.blocksize}, double_quant={self.nested}"
