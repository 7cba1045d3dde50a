"""LoRA on the DiffusionGemma base: which modules and expert tensors the recipe's switches adapt, attaching a PEFT
adapter, and the parameter report. (`ftkit.model.quant.lora` is the other half for a 4-bit base: PEFT's expert
LoRA running on the quantized experts.)"""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ftkit.model import arch
from ftkit.recipe import LoraSection

TIED_NOTE = (
    "The encoder and decoder share tied base weights but carry separate adapters: do not call PEFT's "
    "`merge_and_unload` (it would fold both deltas into the shared tensors); `ftkit export` merges correctly."
)


def lora_targets(lora: LoraSection, num_layers: int | None = None) -> tuple[str | None, list[str]]:
    """(target_modules regex, target_parameters) for the recipe's LoRA switches.

    PEFT matches `target_parameters` by name suffix and ignores `exclude_modules` for them, so when only one stack
    is adapted the expert parameters are listed per layer of that stack."""
    stacks = [s for s, on in ((arch.ENCODER_LAYERS, lora.encoder), (arch.DECODER_LAYERS, lora.decoder)) if on]
    projs = [p for p, on in ((arch.ATTENTION_PROJ, lora.attention), (arch.DENSE_MLP_PROJ, lora.dense_mlp)) if on]
    regex = None
    if stacks and projs:
        regex = rf"({'|'.join(stacks)})\.({'|'.join(projs)})"
    if not lora.experts:
        return regex, []
    if lora.encoder and lora.decoder:
        return regex, list(arch.EXPERT_PARAMS)
    if num_layers is None:
        raise ValueError("num_layers is needed to scope expert LoRA to one stack")
    prefix = arch.ENCODER_LAYER_PREFIX if lora.encoder else arch.DECODER_LAYER_PREFIX
    return regex, [f"{prefix}.{i}.{name}" for i in range(num_layers) for name in arch.EXPERT_PARAMS]


def expert_rank_patterns(lora: LoraSection) -> dict[str, dict[str, float]]:
    """PEFT `rank_pattern` / `alpha_pattern` giving the expert tensors rank `lora.expert_r` at the same alpha/r
    (standard adapter_config.json fields: the adapter loads anywhere PEFT does)."""
    if not lora.experts or lora.expert_r is None or lora.expert_r == lora.r:
        return {}
    alpha = lora.alpha * lora.expert_r / lora.r
    return {
        "rank_pattern": {arch.EXPERT_PARAM_PATTERN: lora.expert_r},
        "alpha_pattern": {arch.EXPERT_PARAM_PATTERN: int(alpha) if alpha.is_integer() else alpha},
    }


@contextmanager
def expert_pattern_warning_silenced():
    """PEFT checks rank/alpha patterns against target_modules only and calls the expert pattern unmatched, although
    it does apply it to the target_parameters (tests/test_model.py checks the ranks): that warning would mislead."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"The following (rank|alpha)_pattern keys did not match")
        yield


def attach_lora(model: torch.nn.Module, lora: LoraSection):
    """Wrap the frozen base in a PEFT LoRA model (attention / dense MLP by module regex, experts by parameter)."""
    from peft import LoraConfig, get_peft_model

    regex, params = lora_targets(lora, arch.num_text_layers(model.config))
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=regex if regex else [],
        target_parameters=params or None,
        bias="none",
        **expert_rank_patterns(lora),
    )
    with expert_pattern_warning_silenced():
        peft_model = get_peft_model(model, config)
    if lora.shared_stacks:
        from ftkit.model.shared_stacks import share_stack_adapters

        share_stack_adapters(peft_model)  # one adapter for both stacks, before the optimizer sees the parameters
    from ftkit.model.quant import bind_expert_lora, exclude_quantized_state_from_ddp

    if params:
        bind_expert_lora(peft_model)  # no-op unless ftkit.model.quant made the experts 4-bit
    # The PEFT model is what the Trainer hands to DDP: keep DDP off the 4-bit expert storage (no-op if unquantized).
    exclude_quantized_state_from_ddp(peft_model)
    return peft_model


@dataclass(frozen=True)
class ParamGroup:
    name: str
    trainable: int
    total: int


def parameter_groups(model: torch.nn.Module) -> list[ParamGroup]:
    """Trainable and total parameter counts by group (tied tensors counted once)."""
    groups: dict[str, list[int]] = {}
    for name, p in model.named_parameters():
        g = groups.setdefault(arch.parameter_group(name), [0, 0])
        g[1] += p.numel()
        if p.requires_grad:
            g[0] += p.numel()
    return [ParamGroup(k, v[0], v[1]) for k, v in sorted(groups.items())]


def trainable_names(model: torch.nn.Module) -> list[str]:
    return [n for n, p in model.named_parameters() if p.requires_grad]
