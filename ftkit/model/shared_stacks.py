"""`lora.shared_stacks`: one LoRA adapter serving the encoder and the decoder, as the base weights do.

The base model ties every text weight of the encoder to the decoder's (`_tied_weights_keys`), but PEFT wraps each
stack's modules separately, giving each its own lora_A / lora_B. Sharing makes every encoder LoRA module the
decoder's own module object, so there is one set of adapter tensors: it trains once (the gradient sums both
stacks' uses), the optimizer holds it once, and merging it keeps the tie (`ftkit export`'s tied form).

PEFT saves the shared tensors under both stacks' names (same values), so the adapter stays a standard one that
plain `PeftModel.from_pretrained` loads correctly; `share_stack_adapters(..., verify=True)` re-ties such a loaded
adapter, refusing one whose two stacks differ.
"""

from __future__ import annotations

import torch
from torch import nn

from ftkit.errors import FtkitError
from ftkit.model.arch import DECODER_STACK, ENCODER_STACK

LORA_FACTORS = ("lora_A", "lora_B")


def stack_twins(model: nn.Module) -> list[tuple[str, nn.Module, nn.Module]]:
    """(encoder module name, encoder LoRA layer, its decoder twin) for every LoRA layer of the encoder stack."""
    from peft.tuners.lora import LoraLayer

    modules = dict(model.named_modules())
    twins = []
    for name, module in modules.items():
        if not isinstance(module, LoraLayer) or ENCODER_STACK not in name:
            continue
        twin = modules.get(name.replace(ENCODER_STACK, DECODER_STACK, 1))
        if not isinstance(twin, LoraLayer):
            raise FtkitError(f"lora.shared_stacks: {name} has a LoRA adapter but its decoder twin has none")
        twins.append((name, module, twin))
    return twins


def share_stack_adapters(model: nn.Module, verify: bool = False) -> int:
    """Make every encoder LoRA factor the decoder's own module (in place). `verify`: the two stacks must already
    hold equal values (an adapter saved by a shared-stacks run), else FtkitError. Returns how many layers share."""
    twins = stack_twins(model)
    if not twins:
        raise FtkitError("lora.shared_stacks: the model has no LoRA layers in the encoder to share")
    for name, encoder, decoder in twins:
        for factor in LORA_FACTORS:
            enc_dict, dec_dict = getattr(encoder, factor), getattr(decoder, factor)
            for adapter in list(enc_dict):
                if verify and not torch.equal(enc_dict[adapter].weight, dec_dict[adapter].weight):
                    raise FtkitError(
                        f"lora.shared_stacks: {name}.{factor} differs from the decoder's: this adapter was not "
                        "trained with one adapter for both stacks (lora.shared_stacks: false)"
                    )
                enc_dict[adapter] = dec_dict[adapter]
    return len(twins)


def stacks_share_adapters(model: nn.Module) -> bool:
    """Whether every encoder LoRA factor is the decoder's own module."""
    twins = stack_twins(model)
    return bool(twins) and all(
        getattr(enc, f)[a] is getattr(dec, f)[a] for _, enc, dec in twins for f in LORA_FACTORS for a in getattr(enc, f)
    )
