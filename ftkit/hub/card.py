"""The model card of `ftkit push`, built with huggingface_hub's `ModelCard` / `ModelCardData`.

`base_model` + `library_name: peft` make the Hub list the upload as an adapter of the base model, and the canonical
metrics go into `model-index`. An `ftkit rl` run gets the card of an RL stage: where it started (`rl.init_from`),
the RL settings, the training reward, and its held-out before/after when the plan carries one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftkit.hub.plan import PLACEHOLDER_REPO, REPO_ID, PushPlan, read_json
from ftkit.run.paths import RunPaths, is_rl_summary

CARD_TAGS = ("diffusion-gemma", "block-diffusion", "ftkit")


def card_dataset(recipe) -> tuple[str, str, str | None]:
    """(model-index dataset type, its pretty name, a Hub dataset id when the data is one) for the run's test data."""
    task, options = recipe.task.name, recipe.task.options
    if recipe.task.data_path:
        return f"{task}-custom", f"{task}: user data ({Path(recipe.task.data_path).name})", None
    if task == "code_infill" and options.get("source") == "humaneval":
        return "openai/openai_humaneval", "HumanEval (infill)", "openai/openai_humaneval"
    names = {
        "sudoku": ("sudoku-generated", "Sudoku puzzles with unique solutions (ftkit's held-out set)"),
        "protein": ("protein-pyhmmer", "protein sequences shipped with pyhmmer"),
        "code_infill": ("code_infill-stdlib", "Python standard library functions (held-out modules)"),
    }
    kind, name = names.get(task, (task, task))
    return kind, name, None


def card_metadata(plan: PushPlan):
    """The card's YAML front matter as huggingface_hub's ModelCardData (model-index from the canonical eval)."""
    from huggingface_hub import ModelCardData

    recipe = plan.recipe
    task = recipe.task.name
    repo = plan.repo or PLACEHOLDER_REPO
    _, _, hub_dataset = card_dataset(recipe)
    results = card_eval_results(recipe, plan.evaluation)
    base_model = recipe.model.base if not recipe.is_random_init and REPO_ID.fullmatch(recipe.model.base) else None
    kind = ["full-finetune"] if plan.full_model else ["lora", "peft"]
    return ModelCardData(
        base_model=base_model,
        library_name="transformers" if plan.full_model else "peft",
        pipeline_tag="text-generation",
        tags=[*CARD_TAGS, *kind, task] + ([f"{recipe.model.base}-random-init"] if recipe.is_random_init else []),
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=repo.split("/")[-1],
        eval_results=results or None,
    )


def card_eval_results(recipe, evaluation: dict[str, Any] | None) -> list:
    """The canonical eval's overall metrics as huggingface_hub EvalResults (the card's model-index)."""
    from huggingface_hub import EvalResult

    dataset_type, dataset_name, _ = card_dataset(recipe)
    results = []
    evaluation = evaluation or {}
    for key, value in (evaluation.get("metrics") or {}).items():
        if "/" in key or key.startswith("count") or not isinstance(value, (int, float)):
            continue  # model-index gets the overall metrics; the card's table has the strata
        results.append(
            EvalResult(
                task_type="text-generation",
                task_name=f"{recipe.task.name} (constrained denoising)",
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                dataset_split=evaluation.get("split"),
                metric_type=key,
                metric_name=f"{key} (%)",
                metric_value=round(100 * float(value), 2),
            )
        )
    return results


def model_card(plan: PushPlan) -> str:
    """The README.md of the upload: front matter from `card_metadata`, then the body."""
    from huggingface_hub import ModelCard

    recipe = plan.recipe
    summary = read_json(RunPaths(plan.run_dir).summary)
    repo = plan.repo or PLACEHOLDER_REPO
    what = "fine-tuned model" if plan.full_model else "LoRA adapter"

    lines = [f"# {repo.split('/')[-1]}: DiffusionGemma {what} for `{recipe.task.name}`", ""]
    lines += _notice_lines(plan)
    lines += ["## Model", "", *_model_lines(plan)]
    if is_rl_summary(summary):
        lines += ["## Training", "", *_rl_training_lines(summary, recipe, plan.rl_comparison), ""]
    else:
        lines += ["## Training", "", *training_lines(summary, recipe), ""]
    lines += ["## Evaluation", "", *eval_lines(plan.evaluation or {}), ""]
    lines += ["## How to load", "", "```python", *_load_snippet(recipe, repo, plan.full_model), "```", ""]
    if not plan.full_model:
        lines += [
            "Keep the adapter separate from the base model (see the warning above); "
            "`recipe.yaml` holds the full training recipe.",
            "",
        ]
    lines += [f"Trained with ftkit (`ftkit {'rl' if is_rl_summary(summary) else 'train'} recipe.yaml`).", ""]
    card = ModelCard(f"---\n{card_metadata(plan).to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


def _notice_lines(plan: PushPlan) -> list[str]:
    """The card's callouts: an adapter must not be merged; a random-init base says nothing about the real model."""
    from ftkit.model.lora import TIED_NOTE

    recipe = plan.recipe
    lines = []
    if not plan.full_model:
        lines += ["> [!WARNING]", f"> **Do not merge this adapter with PEFT.** {TIED_NOTE}", ""]
    if recipe.is_random_init and plan.full_model:
        lines += [
            "> [!NOTE]",
            f"> **Trained from scratch:** every weight, from a random-init *{recipe.model.base}* DiffusionGemma "
            "(an ftkit preset) — a small task model, not the pretrained DiffusionGemma; the results below say "
            "nothing about the real model.",
            "",
        ]
    elif recipe.is_random_init:
        lines += [
            "> [!NOTE]",
            f"> **The base model is a random-init *{recipe.model.base}* DiffusionGemma** (an ftkit preset), not a "
            "pretrained model. Its weights are included in `base/` so that this adapter can be loaded; the "
            "results below say nothing about the real model.",
            "",
        ]
    return lines


def _model_lines(plan: PushPlan) -> list[str]:
    """The "Model" section: base, architecture, task, quantization, and what was trained (LoRA targets)."""
    recipe = plan.recipe
    base_desc = (
        f"{recipe.model.base} random-init DiffusionGemma"
        + (" (trained from scratch)" if plan.full_model else " (weights in `base/` of this repo)")
        if recipe.is_random_init
        else f"`{recipe.model.base}`" + (f" (revision `{recipe.model.revision}`)" if recipe.model.revision else "")
    )
    options = f" (options: {_inline(recipe.task.options)})" if recipe.task.options else ""
    lines = [
        f"- **Base model:** {base_desc}",
        "- **Architecture:** `DiffusionGemmaForBlockDiffusion` (block-diffusion encoder–decoder, mixture of experts)",
        f"- **Task:** `{recipe.task.name}`" + options,
        f"- **Quantization during training:** {_quant_text(recipe.quant)}",
    ]
    if plan.full_model:
        return lines + ["- **Trained:** the full model (no adapter)", ""]
    return lines + [
        f"- **LoRA:** r={recipe.lora.r}, alpha={recipe.lora.alpha}, dropout={recipe.lora.dropout}",
        *[f"  - {t}" for t in lora_target_lines(recipe.lora)],
        "",
    ]


def _inline(options: dict[str, Any]) -> str:
    return ", ".join(f"`{k}={v}`" for k, v in options.items())


def _quant_text(quant) -> str:
    if quant.mode == "none":
        return "none (full-precision base)"
    experts = "experts quantized too" if quant.experts else "experts kept in full precision"
    if quant.mode == "8bit":
        return f"8-bit LLM.int8 linears (bitsandbytes, through Unsloth's loader), {experts}"
    return (
        f"4-bit {quant.quant_type} (double quantization: {str(quant.double_quant).lower()}, compute dtype "
        f"{quant.compute_dtype}, {experts}); load the base the same way for the closest behaviour"
    )


def _code_list(names) -> str:
    return ", ".join(f"`{n}`" for n in names)


def lora_target_lines(lora) -> list[str]:
    """Human-readable LoRA targets, from the same switches `ftkit.model.lora.lora_targets` turns into PEFT targets."""
    from ftkit.model.arch import ATTENTION_PROJ_NAMES, DENSE_MLP_PROJ_NAMES
    from ftkit.model.lora import lora_targets

    regex, params = lora_targets(lora)
    stacks = " and ".join(s for s, on in (("encoder", lora.encoder), ("decoder", lora.decoder)) if on)
    out = []
    if lora.attention:
        out.append(f"attention {_code_list(ATTENTION_PROJ_NAMES)} ({stacks} text layers)")
    if lora.experts:
        rank = "" if lora.expert_r in (None, lora.r) else f"; rank {lora.expert_r} per expert"
        out.append(
            f"MoE experts {', '.join(f'`{p}`' for p in params)} (fused expert tensors, via PEFT "
            f"`target_parameters`; {stacks}{rank})"
        )
    if lora.dense_mlp:
        out.append(f"dense MLP {_code_list(DENSE_MLP_PROJ_NAMES)} ({stacks})")
    if regex:
        out.append(f"`target_modules` regex: `{regex}`")
    if getattr(lora, "shared_stacks", False):
        out.append(
            "one adapter for both stacks (`lora.shared_stacks`): the encoder's LoRA tensors are the decoder's, "
            "saved under both names with equal values"
        )
    return out


def _fmt_number(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return "n/a" if value is None else str(value)


def training_lines(summary: dict[str, Any], recipe) -> list[str]:
    t = recipe.train
    rows = [
        ("steps", _fmt_number(summary.get("steps", t.max_steps))),
        ("batch size × grad accum", f"{t.batch_size} × {t.grad_accum}"),
        ("learning rate", f"{t.learning_rate:g} ({t.lr_scheduler})"),
        ("loss (start → end)", f"{_fmt_number(summary.get('loss_start'))} → {_fmt_number(summary.get('loss_end'))}"),
        (
            "diffusion loss (start → end)",
            f"{_fmt_number(summary.get('diffusion_loss_start'))} → {_fmt_number(summary.get('diffusion_loss_end'))}",
        ),
        ("canvas tokens / s", _fmt_number(summary.get("canvas_tokens_per_second"))),
        ("trainable parameters", _fmt_number(summary.get("trainable_parameters"))),
        ("training time (s)", _fmt_number(summary.get("train_seconds"))),
        ("device", _fmt_number(summary.get("device"))),
    ]
    out = ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows]]
    out += ["", "![training loss](loss.png)"]
    return out


def _rl_training_lines(summary: dict[str, Any], recipe, comparison: dict[str, Any] | None) -> list[str]:
    """An RL stage: where it started, its settings, the training reward, and the held-out before/after."""
    rl, t = recipe.rl, recipe.train
    start = (
        f"the adapter of the `ftkit train` run `{Path(rl.init_from).name}` (also the KL reference)"
        if rl.init_from
        else "the base model (a fresh LoRA; the base is the KL reference)"
    )
    rounds = t.max_steps // rl.num_iterations
    rows = [
        ("stage", "reinforcement learning (`ftkit rl`: GRPO, the task's verifier as reward)"),
        ("started from", start),
        (
            "steps",
            f"{_fmt_number(summary.get('steps', t.max_steps))} ({rounds} rounds of {rl.prompts_per_step} "
            f"prompts × {rl.group_size} samples, {rl.num_iterations} steps per round)",
        ),
        ("reward", f"{rl.reward.satisfied:g} × constraints satisfied + {rl.reward.success:g} × success"),
        ("learning rate", f"{t.learning_rate:g} ({t.lr_scheduler})"),
        ("KL coefficient / clip ε / ELBO draws", f"{rl.kl_coef:g} / {rl.clip_eps:g} / {rl.elbo_samples}"),
        (
            "credit / negative advantages × / guided samples per group",
            (
                f"{'per position (checker flags)' if rl.credit == 'token' else 'per sample'} / "
                f"{rl.negative_weight:g} / {rl.guided} of {rl.group_size}"
            ),
        ),
        (
            "training reward (start → end)",
            f"{_fmt_number(summary.get('reward_start'))} → {_fmt_number(summary.get('reward_end'))}",
        ),
        (
            "training success rate (start → end)",
            f"{_fmt_number(summary.get('success_start'))} → {_fmt_number(summary.get('success_end'))}",
        ),
        ("KL to the reference (end)", _fmt_number(summary.get("kl_end"))),
        ("trainable parameters", _fmt_number(summary.get("trainable_parameters"))),
        ("training time (s)", _fmt_number(summary.get("train_seconds"))),
        ("device", _fmt_number(summary.get("device"))),
    ]
    out = ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], "", "![reward per step](reward.png)"]
    return out + _rl_comparison_lines(comparison)


def _rl_comparison_lines(comparison: dict[str, Any] | None) -> list[str]:
    """The held-out before/after RL table of rl_eval.json (overall metrics present in both); [] without one."""
    if not (comparison and isinstance(comparison.get("before"), dict) and isinstance(comparison.get("after"), dict)):
        return []
    before, after = comparison["before"], comparison["after"]
    out = [
        "",
        f"Held-out `{comparison.get('split', 'test')}` split, {comparison.get('num_examples', '?')} "
        "examples, before and after RL with the same sampler settings and seeds "
        f"(`{RunPaths.RL_EVAL}`):",
        "",
        "| metric | before RL | after RL |",
        "|---|---:|---:|",
    ]
    for key, value in after.items():
        if (
            "/" in key
            or key.startswith("count")
            or not isinstance(value, (int, float))
            or not isinstance(before.get(key), (int, float))
        ):
            continue
        out.append(f"| {key} | {100 * before[key]:.1f}% | {100 * value:.1f}% |")
    return out


def eval_lines(evaluation: dict[str, Any]) -> list[str]:
    metrics = evaluation.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        return ["Not evaluated: pushed without the run's own evaluation (`ftkit eval RUN` writes it)."]
    strata: list[str] = []
    names: list[str] = []
    for key in metrics:
        name, _, stratum = str(key).partition("/")
        if name not in names:
            names.append(name)
        if (stratum or "all") not in strata:
            strata.append(stratum or "all")
    strata.sort(key=lambda s: s != "all")
    cfg = evaluation.get("eval") or {}
    constrained = "fixed pieces clamped" + (", per-position token masks" if cfg.get("token_masks") else "")
    head = (
        f"The recipe's own evaluation: split `{evaluation.get('split', '?')}`, "
        f"{evaluation.get('num_examples', '?')} examples, up to {cfg.get('steps', '?')} denoising steps, "
        f"constrained ({constrained}), mode `{evaluation.get('primary', '?')}`."
    )
    out = [head, "", "| metric | " + " | ".join(strata) + " |", "|---|" + "---:|" * len(strata)]
    for name in names:
        cells = []
        for s in strata:
            value = metrics.get(name if s == "all" else f"{name}/{s}")
            if isinstance(value, (int, float)):
                cells.append(str(int(value)) if name.startswith("count") else f"{100 * value:.1f}%")
            else:
                cells.append("")
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    primary = (evaluation.get("modes") or {}).get(evaluation.get("primary"), {})
    if isinstance(primary, dict) and "tokens_per_forward" in primary:
        out += [
            "",
            f"Decoder forwards per example: {_fmt_number(primary.get('mean_steps_used'))}; "
            f"tokens per forward pass: {_fmt_number(primary.get('tokens_per_forward'))}.",
        ]
    sandbox = evaluation.get("sandbox")
    if isinstance(sandbox, dict) and sandbox.get("isolation"):
        out += [
            "",
            f"Generated code was executed for the tests in ftkit's sandbox, isolation level: `{sandbox['isolation']}`.",
        ]
    return out


def _load_snippet(recipe, repo: str, full_model: bool = False) -> list[str]:
    if full_model:
        return [
            "from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion",
            "",
            f'model = DiffusionGemmaForBlockDiffusion.from_pretrained("{repo}", dtype="auto")',
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
        ]
    lines = [
        "from peft import PeftModel",
        "from transformers import AutoTokenizer, DiffusionGemmaForBlockDiffusion",
        "",
    ]
    if recipe.is_random_init:
        lines.append(f'base = DiffusionGemmaForBlockDiffusion.from_pretrained("{repo}", subfolder="base")')
    elif recipe.quant.mode == "4bit":
        q = recipe.quant
        lines = [
            "import torch",
            "from peft import PeftModel",
            "from transformers import AutoTokenizer, BitsAndBytesConfig, DiffusionGemmaForBlockDiffusion",
            "",
            f'bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="{q.quant_type}", '
            f"bnb_4bit_use_double_quant={q.double_quant}, bnb_4bit_compute_dtype=torch.{q.compute_dtype})",
            f'base = DiffusionGemmaForBlockDiffusion.from_pretrained("{recipe.model.base}", '
            'quantization_config=bnb, device_map="auto")',
        ]
    else:
        lines.append(f'base = DiffusionGemmaForBlockDiffusion.from_pretrained("{recipe.model.base}", dtype="auto")')
    lines += [
        f'model = PeftModel.from_pretrained(base, "{repo}")  '
        "# not merge_and_unload(): tied weights (`ftkit export` merges)",
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
    ]
    return lines
