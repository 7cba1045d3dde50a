"""`ftkit validate`'s checks beyond the schema: the model the recipe describes can be built and trained.

1. The model is built from its config on the meta device (no memory, no weights) and the LoRA adapter attached to
   it: a config transformers refuses, or LoRA targets PEFT cannot place, fail here instead of at load.
2. The tiny preset, whose weights are random anyway, also runs one real training step (forward and backward of the
   recipe's loss on a one-example batch, on the CPU): some widths build fine and fail only in a kernel, e.g.
   `model.tiny.hidden=7` (the grouped expert matmul needs 16-byte strides).

A hub model is built from its config when that is in the local cache or a local directory; nothing is downloaded
(`validate` stays offline), and the notes say what could not be checked.
"""

from __future__ import annotations

import torch

from ftkit.errors import FtkitError, RecipeError

# The tiny preset's real step is skipped above this size (a "tiny" spec someone made large).
SMOKE_MAX_PARAMETERS = 50_000_000


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{error.__class__.__name__}: {text[0][:300]}" if text else error.__class__.__name__


def _config(recipe, tokenizer):
    from transformers import AutoConfig

    from ftkit.model.load import tiny_config

    model = recipe.model
    if recipe.is_random_init:
        return tiny_config(
            model.tiny, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id
        )
    from ftkit.model.load import base_is_local

    base_is_local(model.base)  # a local path that does not exist is an error, never a hub id
    try:
        return AutoConfig.from_pretrained(model.base, revision=model.revision, local_files_only=True)
    except (OSError, ValueError):
        return None


def _uncached_hub_model(model, where: str) -> str:
    """The note on a model.base that is a hub id not in the local cache, once the Hub says it exists; a RecipeError
    when the Hub says it does not (a mistyped local path such as `runs/quickstart` from another directory looks like
    an owner/name id)."""
    from pathlib import Path

    from ftkit.hub.access import offline_reason

    local = f"no local directory {Path(model.base).resolve()} and nothing in the local Hugging Face cache"
    reason = offline_reason()
    if reason is not None:
        return (
            f"model {model.base}: {local}, and the Hub cannot be used now ({reason}): `ftkit train` would fail "
            "(the model was not built)"
        )
    from huggingface_hub import repo_exists
    from huggingface_hub.errors import HfHubHTTPError

    try:
        exists = repo_exists(model.base)
    except (HfHubHTTPError, OSError):
        exists = True  # cannot tell: train will say
    if not exists:
        raise RecipeError(
            f"{where}: model.base={model.base!r}: {local}, and the Hub has no such model (a local path "
            "is taken from the current directory)"
        )
    return f"model {model.base}: a hub id, not in the local cache: `ftkit train` downloads it (the model was not built)"


def check_model(recipe, where: str) -> list[str]:
    """Build the recipe's model (see the module docstring); raise RecipeError naming the section that fails, and
    return notes on what was checked."""
    from transformers import DiffusionGemmaForBlockDiffusion

    tokenizer = None
    if recipe.is_random_init:
        from ftkit.model.char_tokenizer import build_char_tokenizer

        tokenizer = build_char_tokenizer()
    section = "model.tiny" if recipe.is_random_init else "model"
    try:
        config = _config(recipe, tokenizer)
    except (ValueError, TypeError) as e:
        raise RecipeError(f"{where}: `{section}` gives a config transformers rejects: {_first_line(e)}") from None
    if config is None:
        return [_uncached_hub_model(recipe.model, where)]
    try:
        with torch.device("meta"):
            model = DiffusionGemmaForBlockDiffusion(config)
    except Exception as e:  # noqa: BLE001 - whatever the constructor raises is a config the recipe cannot use
        raise RecipeError(f"{where}: the model of `{section}` does not build: {_first_line(e)}") from None
    parameters = sum(p.numel() for p in model.parameters())
    if recipe.is_full:
        from ftkit.model.load import check_full_training

        try:
            check_full_training(config, recipe.model.base)
        except FtkitError as e:
            raise RecipeError(f"{where}: {e}") from None
        notes = [f"model built on the meta device ({parameters:,} parameters), every weight trainable"]
    else:
        _attach(model, recipe, where)
        notes = [f"model built on the meta device ({parameters:,} parameters) with its LoRA adapter"]
    if recipe.is_random_init:
        notes.append(_smoke_step(recipe, tokenizer, parameters, where))
    return notes


def _attach(model, recipe, where: str):
    from ftkit.model.load import make_fully_trainable
    from ftkit.model.lora import attach_lora, expert_pattern_warning_silenced

    if recipe.is_full:
        return make_fully_trainable(model)
    for p in model.parameters():
        p.requires_grad_(False)
    try:
        with expert_pattern_warning_silenced():
            return attach_lora(model, recipe.lora)
    except (ValueError, RuntimeError, KeyError, TypeError) as e:
        raise RecipeError(f"{where}: the `lora` section does not fit this model: {_first_line(e)}") from None


def _smoke_step(recipe, tokenizer, parameters: int, where: str) -> str:
    """One forward + backward of the recipe's loss on the real tiny model, CPU, float32."""
    from ftkit.diffusion.loss import diffusion_loss
    from ftkit.model.load import build_tiny

    if parameters > SMOKE_MAX_PARAMETERS:
        return f"no training step run: {parameters:,} parameters is over the preflight's {SMOKE_MAX_PARAMETERS:,}"
    spec = recipe.model.tiny
    model = _attach(build_tiny(spec, tokenizer), recipe, where)
    model.train()
    g = torch.Generator().manual_seed(0)
    prompt, canvas = 8, spec.canvas_length
    ids = torch.randint(4, len(tokenizer), (1, prompt + canvas), generator=g)
    batch = {
        "input_ids": ids,
        "attention_mask": torch.ones_like(ids),
        "prompt_len": torch.tensor([prompt]),
        "canvas": ids[:, prompt:].clone(),
        "fixed": torch.zeros(1, canvas, dtype=torch.bool),
    }
    try:
        loss = diffusion_loss(model, batch, recipe.diffusion, g).loss
        loss.backward()
    except (RuntimeError, ValueError, IndexError) as e:
        raise RecipeError(
            f"{where}: one training step of this `model.tiny` fails on the CPU: {_first_line(e)}"
        ) from None
    if not torch.isfinite(loss):
        raise RecipeError(f"{where}: one training step of this `model.tiny` gives a non-finite loss ({loss.item()})")
    return "one training step of the tiny model ran on the CPU (forward + backward)"
