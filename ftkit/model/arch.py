"""DiffusionGemma's structure: the one module that knows where things are in `DiffusionGemmaForBlockDiffusion`.

Everything else in ftkit reaches the model's parts through here: the core model under PEFT / DDP wrappers, the
encoder and decoder stacks and their layers, the fused experts, the LM head and its soft-capping, the decoder's
token embeddings and self-conditioning block, the vocabulary and canvas sizes, the ties between weights, and the
module-name patterns LoRA and quantization select modules by. tests/test_arch.py checks that no module outside
`ftkit/model/` names these parts itself.

Module paths are as `named_modules()` of the core model gives them:
  model.encoder.language_model.layers.{i}.{self_attn,mlp,router,experts}   the causal encoder's text layers
  model.decoder.layers.{i}.{self_attn,mlp,router,experts}                  the bidirectional decoder's layers
  model.decoder.embed_tokens, model.decoder.self_conditioning, lm_head
The encoder's text weights are tied to the decoder's, and the head to the decoder's embeddings.
"""

from __future__ import annotations

import re

import torch

# ----------------------------------------------------------------------------------------------------------------
# Module-name patterns

# LoRA is scoped to the *text* layers of the encoder and the decoder: a bare `q_proj` also matches the vision tower
# (whose clippable linears PEFT cannot wrap) and `mlp.*_proj`-like names in the self-conditioning block.

# The released checkpoint (google/diffusiongemma-26B-A4B-it) in a preset's terms (ftkit.recipe.PresetSpec fields):
# what benchmarks and the 26B-sized tests build at its true widths.
RELEASED = {
    "layers": 30,
    "hidden": 2816,
    "heads": 16,
    "kv_heads": 8,
    "head_dim": 256,
    "global_head_dim": 512,
    "intermediate": 2112,
    "experts": 128,
    "top_k": 8,
    "expert_intermediate": 704,
    "canvas_length": 256,
}
RELEASED_VOCAB = 262144

ENCODER_LAYERS = r"model\.encoder\.language_model\.layers\.\d+"
DECODER_LAYERS = r"model\.decoder\.layers\.\d+"
ATTENTION_PROJ = r"self_attn\.[qkvo]_proj"
DENSE_MLP_PROJ = r"mlp\.(gate|up|down)_proj"
# Unsloth's LoRA targets (attention + dense MLP of both text stacks), as one regex over full module names.
TEXT_LINEAR_LAYERS = rf".*({ENCODER_LAYERS}|{DECODER_LAYERS})\.({ATTENTION_PROJ}|{DENSE_MLP_PROJ})"
# The same projections by their bare names (for people: model cards).
ATTENTION_PROJ_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj")
DENSE_MLP_PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")

# The fused 3-D expert tensors of an experts module: gate_up_proj (E, 2I, H), down_proj (E, H, I).
EXPERT_TENSORS = ("gate_up_proj", "down_proj")
EXPERT_PARAMS = ("experts.gate_up_proj", "experts.down_proj")
# PEFT matches rank/alpha patterns for `target_parameters` against "<module path>.<parameter name>".
EXPERT_PARAM_PATTERN = r"experts\.(gate_up_proj|down_proj)"
# The layer-list prefixes of each stack below the core model's `model.` (PEFT matches target_parameters by suffix).
ENCODER_LAYER_PREFIX = "encoder.language_model.layers"
DECODER_LAYER_PREFIX = "decoder.layers"
# The same stacks as substrings of a module name, to pair an encoder module with its decoder twin.
ENCODER_STACK = ".encoder.language_model.layers."
DECODER_STACK = ".decoder.layers."

# Modules bitsandbytes must leave in full precision: the frozen router (4-bit scores would change which experts a
# token goes to), the self-conditioning block, the tied head, and the vision tower (unused by text fine-tuning; its
# clippable linears must stay plain). transformers matches a plain name only from the start of a module's path or as
# its suffix ("router" would miss "...layers.0.router.proj"), so these are regexes up to a module boundary.
KEEP_UNQUANTIZED = (r".*\.router", r".*\.self_conditioning", r".*vision_tower", r".*embed_vision", "lm_head")

# Modules text training never reaches (no gradient): they stay frozen, so "every trainable tensor trains" holds.
UNUSED_BY_TEXT = re.compile(r"(^|\.)(vision_tower|embed_vision)\.")


def parameter_group(name: str) -> str:
    """The group a parameter's name belongs to in the parameter report (e.g. "lora/decoder/experts")."""
    stack = "encoder" if ".encoder." in name else "decoder" if ".decoder." in name else "other"
    if "lora_" in name:
        kind = (
            "experts"
            if ".experts." in name
            else "attention"
            if ".self_attn." in name
            else "dense_mlp"
            if ".mlp." in name
            else "other"
        )
        return f"lora/{stack}/{kind}"
    if ".experts." in name:
        return "base/experts"
    if ".router." in name:
        return "base/router"
    if "embed" in name or "lm_head" in name:
        return "base/embeddings"
    if "vision" in name:
        return "base/vision"
    return "base/other"


# ----------------------------------------------------------------------------------------------------------------
# The classes, and the model under its wrappers


def model_class():
    from transformers import DiffusionGemmaForBlockDiffusion

    return DiffusionGemmaForBlockDiffusion


def config_class():
    from transformers import DiffusionGemmaConfig

    return DiffusionGemmaConfig


def build_on_meta(config) -> torch.nn.Module:
    """The architecture of `config` on the meta device: no memory, no weights."""
    cls = model_class()
    with torch.device("meta"):
        return cls(config)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The DiffusionGemmaForBlockDiffusion under PEFT / DDP wrappers (LoRA layers are injected in place)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    # Unwrap explicitly: PeftModel forwards attribute lookups (lm_head...) to the base, so duck-typing would stop early.
    for _ in range(4):
        if isinstance(model, DiffusionGemmaForBlockDiffusion):
            return model
        if isinstance(model.__dict__.get("_modules", {}).get("module"), torch.nn.Module):  # DDP / FSDP
            model = model.module
        elif hasattr(model, "get_base_model"):  # PeftModel
            model = model.get_base_model()
    raise TypeError(f"not a DiffusionGemmaForBlockDiffusion: {type(model).__name__}")


# ----------------------------------------------------------------------------------------------------------------
# Sizes (from a model, wrapped or not, or from its config)


def text_config(config):
    return config.get_text_config()


def decoder_text_config(core: torch.nn.Module):
    """The text config the decoder's KV cache is laid out by (layer types, sliding window)."""
    return core.config.get_text_config(decoder=True)


def vocab_size(model: torch.nn.Module) -> int:
    return unwrap_model(model).config.get_text_config().vocab_size


def eos_token_id(core: torch.nn.Module):
    """The model's end-of-sequence id(s) (an int, a list of them, or None), as its text config declares them."""
    return core.config.get_text_config().eos_token_id


def canvas_length(model_or_config) -> int:
    """Tokens the decoder denoises at once (one block)."""
    config = model_or_config.config if isinstance(model_or_config, torch.nn.Module) else model_or_config
    return int(config.canvas_length)


def num_text_layers(config) -> int:
    """Layers of each text stack (the encoder and the decoder have as many)."""
    return config.text_config.num_hidden_layers


def expert_module_names(config) -> list[str]:
    """The fused-experts modules of both text stacks (every layer has one), as `named_modules()` names them."""
    layers = range(num_text_layers(config))
    return [f"model.encoder.language_model.layers.{i}.experts" for i in layers] + [
        f"model.decoder.layers.{i}.experts" for i in layers
    ]


# ----------------------------------------------------------------------------------------------------------------
# Parts of the core model (`core`: what `unwrap_model` returns)


def encoder(core: torch.nn.Module) -> torch.nn.Module:
    """The causal encoder: reads the prompt (and earlier blocks) and writes the KV cache."""
    return core.model.encoder


def decoder(core: torch.nn.Module) -> torch.nn.Module:
    """The bidirectional decoder: denoises a canvas over the encoder's KV cache."""
    return core.model.decoder


def encoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The encoder's text layers, of a wrapped or bare model."""
    return list(unwrap_model(model).model.encoder.language_model.layers)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder's layers, of a wrapped or bare model."""
    return list(unwrap_model(model).model.decoder.layers)


def decoder_token_embedding(core: torch.nn.Module) -> torch.nn.Module:
    """The decoder's token embedding (its `weight` is the head's too; it carries `embed_scale`)."""
    return core.model.decoder.embed_tokens


def embedding_weight_and_scale(core: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """(E (vocab, hidden), the embedding scale in E's dtype): what the decoder's self-conditioning signal is made of."""
    embed = decoder_token_embedding(core)
    weight = embed.weight
    return weight, embed.embed_scale.to(weight.dtype)


def self_conditioning_block(core: torch.nn.Module) -> torch.nn.Module:
    """The decoder's self-conditioning block, called as (inputs_embeds, signal)."""
    return core.model.decoder.self_conditioning


def head_logits(core: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """lm_head + tanh soft-capping, in fp32, exactly as DiffusionGemmaForBlockDiffusion.forward computes logits."""
    cap = core.final_logit_softcapping
    logits = core.lm_head(hidden).float()
    return torch.tanh(logits / cap) * cap


# ----------------------------------------------------------------------------------------------------------------
# Ties between weights (what a checkpoint stores once)


def tied_targets(config) -> dict[str, str]:
    """Tie target -> source, as transformers expands `_tied_weights_keys` for this config: every encoder text
    weight is the decoder's, the head is the decoder's embeddings."""
    return build_on_meta(config).get_expanded_tied_weights_keys(all_submodels=True)


def untie(config):
    """The config of the untied form: every tie undone (the top level governs transformers' ties, the text config
    the head's in other loaders)."""
    config.tie_word_embeddings = False
    config.get_text_config().tie_word_embeddings = False
    return config
