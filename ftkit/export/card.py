"""What an export says about itself: the generation config (the run's eval sampler settings, in the fields
transformers' DiffusionGemmaGenerationConfig and vLLM read) and the model card (README.md)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.run.paths import RunPaths

EXPORT_TAGS = ("diffusion-gemma", "block-diffusion", "ftkit")


def generation_config(base_dir: Path | None, recipe):
    """The base's generation config (special tokens, length) with the recipe's eval sampler settings, validated by
    transformers' own DiffusionGemmaGenerationConfig."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    config = DiffusionGemmaGenerationConfig()
    if base_dir is not None and (base_dir / RunPaths.GENERATION_CONFIG).is_file():
        try:
            config = DiffusionGemmaGenerationConfig.from_pretrained(str(base_dir))
        except (OSError, ValueError, TypeError) as e:
            raise FtkitError(
                f"{base_dir}/generation_config.json: cannot read it ({e.__class__.__name__}: {e})"
            ) from None
    e = recipe.eval
    values = e.generation_config_values()
    config.sampler_config = EntropyBoundSamplerConfig(entropy_bound=values.pop("entropy_bound"))
    for name, value in values.items():
        setattr(config, name, value)
    if e.max_new_tokens is not None:
        config.max_new_tokens = e.max_new_tokens
    config.validate()
    return config


@dataclass(frozen=True)
class ExportFacts:
    """What the card states about an export (also written to ftkit_export.json)."""

    form: str  # layout.TIED or layout.UNTIED
    dtype: str
    source: str  # "adapter" (merged onto the base) or "full" (a full fine-tune, as it is)
    base: str  # what the base weights were read from
    checkpoint: str | None  # None: the run's final weights
    evaluation: dict[str, Any] | None  # the run's canonical eval.json, when it evaluated these weights


def model_card(recipe, summary: dict[str, Any], facts: ExportFacts, name: str) -> str:
    from huggingface_hub import ModelCard, ModelCardData

    from ftkit.hub.card import card_dataset, card_eval_results, eval_lines, training_lines
    from ftkit.hub.plan import REPO_ID

    task = recipe.task.name
    base_model = recipe.model.base if not recipe.is_random_init and REPO_ID.fullmatch(recipe.model.base) else None
    _, _, hub_dataset = card_dataset(recipe)
    kind = ["full-finetune"] if facts.source == "full" else ["lora", "merged"]
    data = ModelCardData(
        base_model=base_model,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=[*EXPORT_TAGS, *kind, task] + ([f"{recipe.model.base}-random-init"] if recipe.is_random_init else []),
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=name,
        eval_results=card_eval_results(recipe, facts.evaluation) or None,
    )
    what = "full fine-tune" if facts.source == "full" else "LoRA fine-tune, merged"
    lines = [f"# DiffusionGemma {what} for `{task}` (ftkit export)", ""]
    if recipe.is_random_init:
        lines += [
            "> [!NOTE]",
            f"> The base is a random-init *{recipe.model.base}* DiffusionGemma (an ftkit preset), "
            "not the pretrained model: a small task model; the results below say nothing about the real one.",
            "",
        ]
    layout = (
        "**tied**: the released checkpoint's layout and size (one set of text weights serves the encoder and "
        "the decoder)"
        if facts.form == "tied"
        else "**untied** (`tie_word_embeddings: false`): the encoder and the decoder carried separate adapters, so "
        "their merged text weights differ and both are stored; transformers loads it, vLLM's single-backbone "
        "DiffusionGemma does not"
    )
    merged = (
        f"the adapter folded into the base weights in fp32, each tensor rounded once to {facts.dtype}"
        if facts.source == "adapter"
        else f"the trained weights, cast to {facts.dtype}"
    )
    revision = f" (revision `{recipe.model.revision}`)" if recipe.model.revision else ""
    lines += [
        "## Model",
        "",
        f"- **Base model:** `{recipe.model.base}`{revision}",
        "- **Architecture:** `DiffusionGemmaForBlockDiffusion`",
        f"- **Weights:** {merged}; no PEFT needed to load them",
        f"- **TokenLayout:** {layout}",
        "- **From:** the run's final weights"
        if facts.checkpoint is None
        else f"- **From:** checkpoint `{facts.checkpoint}` (not the run's final weights)",
        "- **Generation config:** the run's eval sampler settings (steps, entropy bound, temperatures, stopping); "
        "ftkit's constrained decoding (clamped pieces, token masks, verifier re-noising) is not part of it",
        "",
    ]
    if facts.source == "adapter" and recipe.quant.mode == "4bit":
        lines += [
            "The adapter was trained on a 4-bit base and is merged onto the full-precision base it was quantized "
            "from (the usual QLoRA merge): outputs differ from the 4-bit training model by the 4-bit "
            "quantization error of the base.",
            "",
        ]
    lines += ["## Training", "", *training_lines(summary, recipe), ""]
    lines += ["## Evaluation", ""]
    if facts.evaluation is None:
        lines += ["Not evaluated: no `ftkit eval` of these weights was found in the run (`eval.json`).", ""]
    else:
        lines += [
            *eval_lines(facts.evaluation),
            "",
            "Measured by `ftkit eval` on the unmerged adapter of the run "
            "(`eval.json` here); the merged weights compute the same model up to one bf16 rounding per weight.",
            "",
        ]
    lines += [
        "## How to load",
        "",
        "```python",
        "import torch",
        "from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion",
        "",
        'model = DiffusionGemmaForBlockDiffusion.from_pretrained("PATH_OR_REPO", dtype=torch.bfloat16)',
        'tokenizer = AutoTokenizer.from_pretrained("PATH_OR_REPO")',
        "```",
        "",
        "Serving with vLLM (tied exports only): see ftkit's docs/serving.md.",
        "",
    ]
    return str(ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)))
