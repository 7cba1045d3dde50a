"""The LoRA update of each base tensor, read from a saved PEFT adapter one target at a time.

PEFT itself decides what the adapter means: its LoraConfig (target modules and parameters, rank/alpha patterns,
rsLoRA) is applied to the base architecture built on the meta device (no memory, no weights), and each LoRA layer
there gives the adapter keys it owns, the base tensor it updates and its scaling. Only the update arithmetic is
ftkit's, so that it can run a few experts at a time: a whole fp32 update of the 26B model's gate_up_proj is 2 GB.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from ftkit.errors import FtkitError
from ftkit.run.paths import RunPaths

PEFT_PREFIX = "base_model.model."
# fp32 elements of an expert tensor updated at once (16 MB): one expert of the real model's gate_up_proj.
EXPERT_CHUNK_ELEMENTS = 4 * 2**20


@dataclass(frozen=True)
class LoraTarget:
    """One LoRA layer: which adapter keys it owns and how it updates its base tensor."""

    prefix: str  # adapter key prefix, e.g. base_model.model.model.decoder.layers.0.self_attn.q_proj
    scaling: float
    num_experts: int = 0  # 0: a Linear weight (out, in); else a 3-D expert tensor
    experts_out_in: bool = True  # expert tensor laid out (E, out, in) (PEFT's _did_swap_in_out_features)

    @property
    def keys(self) -> tuple[str, str]:
        return f"{self.prefix}.lora_A.weight", f"{self.prefix}.lora_B.weight"


def lora_targets(base_config, adapter_dir: Path) -> dict[str, LoraTarget]:
    """base tensor name (as the model names it, e.g. model.decoder.layers.0.experts.gate_up_proj) -> its LoRA."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer, ParamWrapper

    from ftkit.model import arch
    from ftkit.model.lora import expert_pattern_warning_silenced

    try:
        lora_config = LoraConfig.from_pretrained(str(adapter_dir))
    except (OSError, ValueError, TypeError) as e:
        raise FtkitError(f"{adapter_dir}: cannot read adapter_config.json ({e.__class__.__name__}: {e})") from None
    with torch.device("meta"), expert_pattern_warning_silenced():
        model = get_peft_model(arch.build_on_meta(base_config), lora_config)
    targets = {}
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
            continue
        owner = name.removeprefix(PEFT_PREFIX).replace(".base_layer", "")
        if isinstance(module, ParamWrapper):
            tensor = f"{owner}.{module.parameter_name}"
            target = LoraTarget(
                name, float(module.scaling["default"]), int(module.num_experts), bool(module._did_swap_in_out_features)
            )
        else:
            tensor = f"{owner}.weight"
            target = LoraTarget(name, float(module.scaling["default"]))
        targets[tensor] = target
    return targets


class AdapterTensors:
    """The adapter's safetensors file, read lazily (an expert adapter of the real model is gigabytes)."""

    def __init__(self, adapter_dir: Path):
        from safetensors import safe_open

        self.path = Path(adapter_dir) / RunPaths.ADAPTER_WEIGHTS
        try:
            self.file = safe_open(str(self.path), framework="pt")
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
            raise FtkitError(f"{self.path}: cannot read the adapter ({e.__class__.__name__}: {e})") from None
        self.names = set(self.file.keys())

    def factors(self, target: LoraTarget) -> tuple[torch.Tensor, torch.Tensor]:
        missing = [k for k in target.keys if k not in self.names]
        if missing:
            raise FtkitError(
                f"{self.path}: no tensor {missing[0]} (the adapter does not match its adapter_config.json)"
            )
        return tuple(self.file.get_tensor(k).float() for k in target.keys)

    def same_factors(self, a: LoraTarget, b: LoraTarget) -> bool:
        return a.scaling == b.scaling and all(torch.equal(x, y) for x, y in zip(self.factors(a), self.factors(b)))


def add_update(
    weight: torch.Tensor, target: LoraTarget, adapter: AdapterTensors, out_dtype: torch.dtype
) -> torch.Tensor:
    """`weight` + its LoRA update, computed in fp32 and rounded once to `out_dtype`. A 3-D expert tensor is done a
    few experts at a time, so no full-size fp32 copy of it ever exists."""
    lora_a, lora_b = adapter.factors(target)
    if not target.num_experts:
        # One fp32 copy (a copy even from fp32: the source may be the reader's), updated in place: addmm_ adds
        # scaling * B @ A without a product temporary.
        return weight.to(torch.float32, copy=True).addmm_(lora_b, lora_a, alpha=target.scaling).to(out_dtype)
    from ftkit.model.quant.lora import expert_factors

    per_expert_a, per_expert_b = expert_factors(lora_a, lora_b, target.num_experts)
    if not target.experts_out_in:  # the tensor is (E, in, out): B[e] @ A[e] transposed is A[e]^T @ B[e]^T
        per_expert_a, per_expert_b = per_expert_b.transpose(-2, -1), per_expert_a.transpose(-2, -1)
    out = torch.empty(weight.shape, dtype=out_dtype)  # never in place: `weight` may map the base file
    chunk = max(1, EXPERT_CHUNK_ELEMENTS // max(1, weight[0].numel()))
    for first in range(0, target.num_experts, chunk):
        end = min(first + chunk, target.num_experts)
        update = weight[first:end].to(torch.float32, copy=True)
        update.baddbmm_(per_expert_b[first:end], per_expert_a[first:end], alpha=target.scaling)
        out[first:end].copy_(update)  # rounds to out_dtype in the copy
    return out
