"""4-bit (NF4/FP4) storage and compute for the fused MoE expert tensors, with standard PEFT LoRA on top."""

from ftkit.model.quant.ddp import exclude_quantized_state_from_ddp
from ftkit.model.quant.experts import QuantizedExperts, QuantStats, expert_storage, quantize_experts, set_expert_kernel
from ftkit.model.quant.lora import bind_expert_lora

__all__ = [
    "QuantizedExperts",
    "QuantStats",
    "bind_expert_lora",
    "exclude_quantized_state_from_ddp",
    "expert_storage",
    "quantize_experts",
    "set_expert_kernel",
]
