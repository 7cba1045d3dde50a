"""4-bit storage for the fused 3-D MoE expert tensors that bitsandbytes' `load_in_4bit` leaves in bf16.

`quantize_experts` swaps each experts module to a subclass (`QuantizedExperts` mixed into its own class) whose
forward runs on the NF4 storage: sort the (token, expert) pairs by expert, dequantize the layer's experts
transiently, grouped GEMM (`grouped.py`), gate, grouped GEMM, weight by the router and sum. Encoder and decoder
layers share each expert tensor; the shared NF4 storage is one child module of both, quantized once.

LoRA on the experts stays PEFT's own `target_parameters` adapter (same keys, same shapes): the module keeps a
shape-only placeholder Parameter under the original name for PEFT to find, and `ftkit.model.quant.lora` makes PEFT's
wrapper hand its low-rank factors to this forward (`QuantizedExperts.lora_factors_applied`), which adds them as a
low-rank grouped path (never a dense delta).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.utils import parametrize

from ftkit.errors import FtkitError
from ftkit.model.arch import EXPERT_TENSORS
from ftkit.model.mixins import add_mixin
from ftkit.model.quant.grouped import KERNELS, FrozenQuantizedGroupedLinear, low_rank_grouped_linear, resolve_kernel
from ftkit.model.quant.nf4 import NF4Tensor

_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


# One adapter's update of an expert tensor: (A (E, r, in), B (E, out, r), scaling).
LoraFactors = tuple[torch.Tensor, torch.Tensor, float]


class QuantizedExperts(nn.Module):
    """Mixin placed in front of a fused-experts class (gate_up_proj (E, 2I, H), down_proj (E, H, I))."""

    expert_kernel: str = "auto"
    # Experts dense at a time in forward/backward (quant.expert_chunk; 0 = the whole stack), set by quantize_experts.
    expert_chunk: int = 0

    def storage(self, name: str) -> NF4Tensor:
        return getattr(self, f"{name}_nf4")

    def lora_factors(self, name: str) -> list[LoraFactors]:
        """The low-rank updates `forward` adds to expert tensor `name` (set by `lora_factors_applied`)."""
        return self._active_lora_factors().get(name, [])

    @contextmanager
    def lora_factors_applied(self, name: str, factors: list[LoraFactors]) -> Iterator[None]:
        """While inside, `forward` adds these (A (E, r, in), B (E, out, r), scaling) updates to expert tensor `name`:
        how ftkit.model.quant.lora.QuantizedExpertLora hands its adapters' factors over for its forward."""
        slots = self._active_lora_factors()
        slots[name] = factors
        try:
            yield
        finally:
            slots.pop(name, None)

    def _active_lora_factors(self) -> dict[str, list[LoraFactors]]:
        # Kept in the instance dict: the mixin is swapped onto modules that were built without it (no __init__ ran).
        return self.__dict__.setdefault("_active_lora", {})

    def _project(self, name: str, x: torch.Tensor, offsets: torch.Tensor, kernel: str, slices) -> torch.Tensor:
        storage = self.storage(name)
        out = FrozenQuantizedGroupedLinear.apply(x, offsets, storage, storage.compute_dtype, kernel, slices)
        for lora_a, lora_b, scaling in self.lora_factors(name):
            # Low-rank path: (x @ A_e^T) @ B_e^T per expert, same math as PEFT's W + scaling * B_e @ A_e.
            out = out + scaling * low_rank_grouped_linear(x, lora_a.to(x.dtype), lora_b.to(x.dtype), offsets, kernel)
        return out

    def forward(
        self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
    ) -> torch.Tensor:
        if parametrize.is_parametrized(self):
            raise FtkitError(
                "a plain PEFT ParamWrapper is active on 4-bit experts (its LoRA would be ignored): call "
                "ftkit.model.quant.bind_expert_lora(model) after attaching or loading the adapter"
            )
        num_tokens, top_k = top_k_index.shape
        compute_dtype = self.storage("gate_up_proj").compute_dtype

        expert_ids, order = torch.sort(top_k_index.reshape(-1), stable=True)
        x = hidden_states[order // top_k].to(compute_dtype)
        # histc, not bincount: bincount's output size depends on the data, a host sync on CUDA at every layer call.
        # (As transformers' own grouped experts; histc wants floats on the CPU, and counts stay exact below 2**24.)
        ids = expert_ids.float() if expert_ids.device.type == "cpu" else expert_ids.int()
        counts = torch.histc(ids, bins=self.num_experts, min=0, max=self.num_experts - 1)
        offsets = torch.cumsum(counts, dim=0, dtype=torch.int32)
        # The placeholder carries the experts' device and compute dtype, all transformers' check reads of a weight.
        kernel = resolve_kernel(self.expert_kernel, x, self.gate_up_proj, offsets)

        slices = self._expert_slices(offsets)
        gated = self._apply_gate(self._project("gate_up_proj", x, offsets, kernel, slices))
        # The router weight scales each pair's down-projection input, which (the projection being linear) equals
        # scaling its output: autograd then keeps (pairs, 704) compute-dtype values instead of (pairs, 2816) fp32.
        gated = gated * top_k_weights.reshape(-1)[order].unsqueeze(-1).to(gated.dtype)
        out = self._project("down_proj", gated, offsets, kernel, slices)
        # Back to (token, k) order, then each token's k pairs summed in fp32 by a reshape + sum, as transformers'
        # grouped_mm experts do: index_add_ into the token rows would add the k pairs with atomics on CUDA, in an
        # order that changes from run to run. `order` is a permutation, so neither the gather nor its backward has
        # two writers to one row.
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=order.device)
        pairs = out[inverse].view(num_tokens, top_k, out.shape[-1])
        return pairs.sum(dim=1, dtype=torch.float32).to(hidden_states.dtype)

    def _expert_slices(self, offsets: torch.Tensor):
        """[(first, end expert), ...] per `expert_chunk` experts, or None for the whole stack at once. Expert ranges
        only: their rows are found from `offsets` where they are used (on the device, for the grouped kernel)."""
        chunk = self.expert_chunk
        if not chunk or chunk >= self.num_experts:
            return None
        if not all(self.storage(n).rows_sliceable() for n in EXPERT_TENSORS):
            return None
        return [(first, min(first + chunk, self.num_experts)) for first in range(0, self.num_experts, chunk)]

    def _apply(self, fn, recurse=True):
        # Keep the stride-0 placeholders out of the generic path (a cast would materialize them densely), then
        # re-point them at the (moved) shared storage so encoder and decoder still share one Parameter.
        for name in EXPERT_TENSORS:
            self._parameters.pop(name, None)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in EXPERT_TENSORS:
                self._parameters[name] = self.storage(name).placeholder()

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name in EXPERT_TENSORS:  # placeholders are not weights
            destination.pop(prefix + name, None)


def is_fused_experts(module: nn.Module) -> bool:
    params = module._parameters
    return (
        not isinstance(module, QuantizedExperts)
        and all(isinstance(params.get(n), nn.Parameter) and params[n].ndim == 3 for n in EXPERT_TENSORS)
        and hasattr(module, "num_experts")
        and not getattr(module, "is_transposed", False)
    )


@dataclass(frozen=True)
class QuantStats:
    modules: int  # experts modules now running on 4-bit storage (encoder + decoder)
    tensors: int  # distinct expert tensors quantized (shared ones counted once)
    numel: int  # their elements
    bytes_before: int  # their storage before (in the dtype they were loaded in)
    bytes_after: int  # packed codes + absmax (+ nested statistics)

    @property
    def bf16_ratio(self) -> float:
        """Shrink factor relative to bf16 storage of the same elements (the real model loads in bf16)."""
        return 2 * self.numel / max(1, self.bytes_after)


def expert_storage(model: nn.Module) -> list[NF4Tensor]:
    """Distinct NF4 expert tensors in the model."""
    seen: dict[int, NF4Tensor] = {}
    for module in model.modules():
        if isinstance(module, NF4Tensor):
            seen.setdefault(id(module), module)
    return list(seen.values())


def quantize_experts(model: nn.Module, quant, device: torch.device | str | None = None) -> QuantStats:
    """Quantize every fused expert tensor of `model` in place (quant: ftkit.recipe.schema.QuantSection).

    `device`: where the NF4 storage lives (default: where each dense tensor is). The dense tensors may sit elsewhere
    (the CPU, when `load_base` keeps them off the GPU): they are moved there one at a time, so the device never holds
    more than one dense expert tensor beyond the storage. Tied tensors (the same Parameter in an encoder and a
    decoder layer) are quantized once and stay shared; each dense copy is released as soon as it is quantized, even
    if something else still references the old Parameter object."""
    compute_dtype = _DTYPES[quant.compute_dtype]
    by_param: dict[int, NF4Tensor] = {}
    originals: list[nn.Parameter] = []  # keeps ids stable while the mapping is built
    modules = [m for m in model.modules() if is_fused_experts(m)]
    bytes_before = numel = 0
    for module in modules:
        for name in EXPERT_TENSORS:
            param = module._parameters.pop(name)
            if id(param) not in by_param:
                originals.append(param)
                numel += param.numel()
                bytes_before += param.numel() * param.element_size()
                by_param[id(param)] = _quantize_one(param, quant, compute_dtype, device)
                param.data = torch.empty(0, dtype=param.dtype, device=param.device)  # free the dense copy now
            storage = by_param[id(param)]
            module.add_module(f"{name}_nf4", storage)
            module._parameters[name] = storage.placeholder()
        # A subclass keeps isinstance checks (and the original's gate / act_fn) working.
        add_mixin(module, QuantizedExperts, "Quantized")
        module.expert_chunk = quant.expert_chunk
    stored = list(by_param.values())
    return QuantStats(
        modules=len(modules),
        tensors=len(stored),
        numel=numel,
        bytes_before=bytes_before,
        bytes_after=sum(s.nbytes for s in stored),
    )


def _quantize_one(param: nn.Parameter, quant, compute_dtype: torch.dtype, device) -> NF4Tensor:
    if param.device.type == "meta":
        raise FtkitError(
            f"cannot quantize an expert tensor of shape {tuple(param.shape)}: it is on the meta device (its weights "
            "were never loaded)"
        )
    with torch.no_grad():
        # The only dense copy on `device`: it goes out of scope (is freed) before the next tensor is moved.
        source = param.detach() if device is None else param.detach().to(device)
        return NF4Tensor(
            source,
            quant_type=quant.quant_type,
            blocksize=quant.blocksize,
            double_quant=quant.double_quant,
            compute_dtype=compute_dtype,
        )


def set_expert_kernel(model: nn.Module, kernel: str) -> None:
    """Force "grouped" or "loop" (default "auto") on every quantized experts module, e.g. to test both paths."""
    if kernel not in KERNELS:
        raise FtkitError(f"expert kernel must be one of {KERNELS}, got {kernel!r}")
    for module in model.modules():
        if isinstance(module, QuantizedExperts):
            module.expert_kernel = kernel
