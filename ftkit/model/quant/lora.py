"""PEFT `target_parameters` LoRA on 4-bit experts, with PEFT's own adapter format.

PEFT's `ParamWrapper` applies LoRA by registering a parametrization that materializes `W + scaling * B @ A` for the
whole (E, out, in) stack on every forward. Over 4-bit storage that would mean a dense weight plus a dense delta per
layer. `QuantizedExpertLora` is the same wrapper (same lora_A / lora_B modules, so the same state-dict keys and the
same `adapter_model.safetensors`), except that while it is active it hands its low-rank factors to the quantized
experts forward instead, which adds them as a low-rank grouped path.
"""

from __future__ import annotations

from contextlib import contextmanager

from torch import nn

from ftkit.errors import FtkitError
from ftkit.model.quant.experts import QuantizedExperts


def expert_factors(weight_a, weight_b, num_experts: int):
    """PEFT's lora_A / lora_B weights of a 3-D expert parameter as per-expert factors (A (E, r, in), B (E, out, r)):
    lora_A.weight rows are expert-major (e * r + k), lora_B.weight columns rank-major (k * E + e), as PEFT's own
    `ParamWrapper.get_delta_weight` reads them. Expert e's update is B[e] @ A[e] (times the scaling)."""
    lora_a = weight_a.reshape(num_experts, -1, weight_a.shape[-1])
    lora_b = weight_b.reshape(weight_b.shape[0], -1, num_experts).permute(2, 0, 1).contiguous()
    return lora_a, lora_b


def _param_wrapper_class():
    from peft.tuners.lora.layer import ParamWrapper

    return ParamWrapper


def _make_wrapper_class():
    ParamWrapper = _param_wrapper_class()

    class QuantizedExpertLora(ParamWrapper):
        def expert_factors(self, adapter: str):
            """(A (E, r, in), B (E, out, r), scaling), in PEFT's own layout of lora_A / lora_B for 3-D params:
            lora_A.weight rows are expert-major (e * r + k), lora_B.weight columns rank-major (k * E + e)."""
            if not self._did_swap_in_out_features:
                raise FtkitError("4-bit experts expect (E, out, in) expert tensors (is_transposed=False)")
            lora_a, lora_b = expert_factors(self.lora_A[adapter].weight, self.lora_B[adapter].weight, self.num_experts)
            return lora_a, lora_b, self.scaling[adapter]

        @contextmanager
        def _activate_lora(self, active_adapters):
            adapters = [a for a in active_adapters if a in self.lora_A]
            factors = [self.expert_factors(a) for a in adapters]
            with self.get_base_layer().lora_factors_applied(self.parameter_name, factors):
                yield

        def merge(self, safe_merge: bool = False, adapter_names=None) -> None:
            raise FtkitError("cannot merge LoRA into 4-bit experts; load the adapter on a bf16 base to merge")

    return QuantizedExpertLora


_WRAPPER = None


def quantized_wrapper_class():
    global _WRAPPER
    if _WRAPPER is None:
        _WRAPPER = _make_wrapper_class()
    return _WRAPPER


def bind_expert_lora(model: nn.Module) -> int:
    """Turn PEFT's ParamWrappers over 4-bit experts into QuantizedExpertLora (in place; idempotent). Call after
    `get_peft_model` or `PeftModel.from_pretrained` on a quantized base. Returns how many wrappers were bound."""
    try:
        ParamWrapper = _param_wrapper_class()
    except ImportError:
        return 0
    wrapper_cls = quantized_wrapper_class()
    bound = 0
    for module in model.modules():
        if type(module) is ParamWrapper and isinstance(module.get_base_layer(), QuantizedExperts):
            module.__class__ = wrapper_cls
            bound += 1
    return bound
