"""`ftkit push`: stage a run's shareable files plus a generated model card, and upload them in one Hub commit.

The staged folder is the same for `--dry-run` (written to RUN/hub_upload by default) and for a real push (a
temporary folder uploaded with one `create_commit`), so a dry run shows exactly what would be uploaded.
The token is never printed: every message built from a hub error is scrubbed of it.

Only the run's canonical result is published: `eval.json`, the recipe's own evaluation of the final adapter
(`ftkit.evaluation.evaluate.canonical_problems` says why a file is not). A run without one is refused unless
`allow_no_eval`; other result files (`eval_train_n2.json`, `eval_base.json`...) are never uploaded or cited.
The model card is built with huggingface_hub's `ModelCard` / `ModelCardData`: `base_model` + `library_name: peft`
make the Hub list it as an adapter of the base model, and the canonical metrics go into `model-index`.

An `ftkit rl` run (summary.json `"stage": "rl"`) gets the card of an RL stage: where it started (`rl.init_from`),
the RL settings, the training reward, and its held-out before/after (`rl_eval.json`, uploaded with `reward.png`)
when that file evaluated the adapter the run holds. Its canonical eval.json comes from `ftkit eval RUN`, as for any
run.
"""

from __future__ import annotations

import json
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.run import rundir
from ftkit.run.lock import holds_run_lock
from ftkit.run.paths import RunPaths, is_rl_summary

REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
PLACEHOLDER_REPO = "YOUR_USER/YOUR_REPO"
RUN_FILES = (RunPaths.RECIPE, RunPaths.SUMMARY, RunPaths.LOSS_PLOT, RunPaths.REWARD_PLOT)  # copied when present
CARD_TAGS = ("diffusion-gemma", "block-diffusion", "ftkit")
NO_TOKEN_HELP = "no Hugging Face token found: run `hf auth login` or set HF_TOKEN"


@dataclass(frozen=True)
class PushPlan:
    run_dir: Path
    recipe: Any
    repo: str | None
    private: bool
    evaluation: dict[str, Any] | None = None  # the canonical eval.json, or None (pushed with allow_no_eval)
    # The run's weights are the whole model, not a LoRA adapter (a full fine-tune): changes the card's library,
    # title, warning and loading code.
    full_model: bool = False
    notes: tuple[str, ...] = ()  # what the push left out, for the user
    # An RL run's rl_eval.json (held-out before/after RL), when it evaluated the adapter the run holds.
    rl_comparison: dict[str, Any] | None = None


@holds_run_lock("push")
def push_run(
    run_dir,
    repo: str | None = None,
    private: bool | None = None,
    dry_run: bool = False,
    dry_run_dir=None,
    endpoint: str | None = None,
    token: str | None = None,
    allow_no_eval: bool = False,
    on_note=None,
) -> str:
    """Upload the run (adapter, tokenizer, recipe, canonical eval, summary, loss plot, model card) in one commit and
    return the repo URL; with `dry_run`, write the upload folder locally and return its path instead. A run without
    a canonical eval.json is refused unless `allow_no_eval`; `on_note(text)` hears what was left out."""
    plan = plan_push(Path(run_dir), repo, private, need_repo=not dry_run, allow_no_eval=allow_no_eval)
    for note in plan.notes:
        if on_note is not None:
            on_note(note)
    if dry_run:
        target = Path(dry_run_dir) if dry_run_dir is not None else RunPaths(plan.run_dir).hub_upload
        return _stage_in_place(target, lambda into: stage_upload(plan, into))

    token = token or _find_token()
    with tempfile.TemporaryDirectory(prefix="ftkit-push-") as tmp:
        folder = Path(tmp)
        stage_upload(plan, folder)
        return _upload(folder, plan, endpoint, token)


def _stage_in_place(target: Path, stage) -> str:
    """`stage(folder)` into a temporary folder beside `target`, then moved into place: a dry run that fails leaves
    no half-staged folder, and one that succeeds replaces the previous one whole."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        stage(staging)
        rundir.replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return str(target)


def _find_token() -> str:
    import huggingface_hub

    token = huggingface_hub.get_token()  # HF_TOKEN, then the token file written by `hf auth login`
    if not token:
        raise FtkitError(NO_TOKEN_HELP)
    return token


def plan_push(
    run_dir: Path,
    repo: str | None = None,
    private: bool | None = None,
    need_repo: bool = True,
    allow_no_eval: bool = False,
) -> PushPlan:
    """Check the run and what would be pushed; every refusal is one FtkitError saying what to do."""
    from ftkit.recipe.schema import load_recipe

    run_dir = rundir.require_run_dir(run_dir)
    recipe = load_recipe(RunPaths(run_dir).recipe)
    what = "full model" if recipe.is_full else "adapter"
    for name in RunPaths.weight_files(recipe.is_full):
        if not (run_dir / name).is_file():
            raise FtkitError(f"{run_dir}: no {name}: the run has no final {what} yet; train first (`ftkit train`)")
    if not RunPaths(run_dir).summary.is_file():
        raise FtkitError(f"{run_dir}: no {RunPaths.SUMMARY}: the run did not finish; train first (`ftkit train`)")
    repo = repo or recipe.hub.repo
    if repo is None and need_repo:
        raise FtkitError("no repo to push to: pass --repo USER/NAME or set `hub.repo` in the recipe")
    if repo is not None and not REPO_ID.fullmatch(repo):
        raise FtkitError(f"repo {repo!r}: expected a hub repo id of the form USER/NAME")
    if recipe.is_random_init and not recipe.is_full and not (RunPaths(run_dir).base / RunPaths.FULL_CONFIG).is_file():
        raise FtkitError(
            f"{run_dir}: a {recipe.model.base}-preset run must hold its base weights in base/; train first"
        )
    evaluation, notes = _canonical_eval(run_dir, recipe, allow_no_eval)
    rl_comparison, rl_notes = _rl_comparison(run_dir)
    return PushPlan(
        run_dir,
        recipe,
        repo,
        recipe.hub.private if private is None else private,
        evaluation,
        full_model=recipe.is_full,
        notes=tuple(notes + rl_notes),
        rl_comparison=rl_comparison,
    )


def _rl_comparison(run_dir: Path) -> tuple[dict[str, Any] | None, list[str]]:
    """An RL run's rl_eval.json, if it records evaluating the adapter the run holds now (else left out, with a
    note): a file without the hash cannot show which weights its "after" measured."""
    path = RunPaths(run_dir).rl_eval
    if not is_rl_summary(_read_json(RunPaths(run_dir).summary)) or not path.is_file():
        return None, []
    comparison = _read_json(path)
    made_with = comparison.get("adapter_sha256")
    if made_with is None:
        return None, [f"{path.name} left out: it does not record which {RunPaths.ADAPTER_WEIGHTS} it evaluated"]
    if made_with != rundir.weights_sha256(run_dir, full=False):
        return None, [f"{path.name} left out: it evaluated another {RunPaths.ADAPTER_WEIGHTS} than the run holds now"]
    return comparison, []


def _canonical_eval(run_dir: Path, recipe, allow_no_eval: bool) -> tuple[dict[str, Any] | None, list[str]]:
    from ftkit.evaluation.evaluate import canonical_problems

    path = RunPaths(run_dir).eval
    if not path.is_file():
        if allow_no_eval:
            return None, [f"no {RunPaths.EVAL}: the card says the model was not evaluated"]
        raise FtkitError(
            f"{run_dir}: no {RunPaths.EVAL}, the run's own evaluation that push publishes; run "
            f"`ftkit eval {run_dir}` first, or pass --allow-no-eval to push without results"
        )
    problems = canonical_problems(_read_json(path), recipe, run_dir)
    if not problems:
        return _read_json(path), []
    why = "; ".join(problems)
    if allow_no_eval:
        return None, [f"{RunPaths.EVAL} left out, it is not the run's own evaluation ({why})"]
    raise FtkitError(
        f"{path}: not the run's own evaluation ({why}); rerun `ftkit eval {run_dir}` to evaluate as "
        "the recipe says, or pass --allow-no-eval to push without results"
    )


# ----------------------------------------------------------------------------------------------------------------
# Staging


def upload_file_names(plan: PushPlan) -> list[str]:
    """Paths (relative to the run dir) of the run files that go into the upload, README.md excluded."""
    run_dir = plan.run_dir
    names = RunPaths.saved_model_files(run_dir, plan.full_model)
    names += [n for n in RunPaths.tokenizer_files() if (run_dir / n).is_file()]
    names += [n for n in RUN_FILES if (run_dir / n).is_file()]
    if plan.evaluation is not None:
        names.append(RunPaths.EVAL)
    if plan.rl_comparison is not None:
        names.append(RunPaths.RL_EVAL)
    if plan.recipe.is_random_init and not plan.full_model:
        # The random-init base is part of the model: without it the adapter cannot be loaded by anyone.
        names += sorted(f"{RunPaths.BASE}/{p.name}" for p in RunPaths(run_dir).base.iterdir() if p.is_file())
    return names


def stage_upload(plan: PushPlan, folder: Path) -> list[str]:
    """Copy the upload files into `folder` and write the model card; return the relative paths written."""
    names = upload_file_names(plan)
    for name in names:
        dest = folder / name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(plan.run_dir / name, dest)
    (folder / "README.md").write_text(model_card(plan), encoding="utf-8")
    return [*names, "README.md"]


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise FtkitError(f"{path}: not valid JSON") from None
    return data if isinstance(data, dict) else {}


# ----------------------------------------------------------------------------------------------------------------
# Model card


def _dataset(recipe) -> tuple[str, str, str | None]:
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
    _, _, hub_dataset = _dataset(recipe)
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

    dataset_type, dataset_name, _ = _dataset(recipe)
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

    from ftkit.model.load import TIED_NOTE

    recipe = plan.recipe
    summary = _read_json(RunPaths(plan.run_dir).summary)
    repo = plan.repo or PLACEHOLDER_REPO
    task = recipe.task.name
    what = "fine-tuned model" if plan.full_model else "LoRA adapter"

    lines = [f"# {repo.split('/')[-1]}: DiffusionGemma {what} for `{task}`", ""]
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

    lines += ["## Model", ""]
    base_desc = (
        f"{recipe.model.base} random-init DiffusionGemma"
        + (" (trained from scratch)" if plan.full_model else " (weights in `base/` of this repo)")
        if recipe.is_random_init
        else f"`{recipe.model.base}`" + (f" (revision `{recipe.model.revision}`)" if recipe.model.revision else "")
    )
    lines += [
        f"- **Base model:** {base_desc}",
        "- **Architecture:** `DiffusionGemmaForBlockDiffusion` (block-diffusion encoder–decoder, mixture of experts)",
        f"- **Task:** `{task}`" + (f" (options: {_inline(recipe.task.options)})" if recipe.task.options else ""),
        f"- **Quantization during training:** {_quant_text(recipe.quant)}",
    ]
    if plan.full_model:
        lines += ["- **Trained:** the full model (no adapter)", ""]
    else:
        lines += [
            f"- **LoRA:** r={recipe.lora.r}, alpha={recipe.lora.alpha}, dropout={recipe.lora.dropout}",
            *[f"  - {t}" for t in lora_target_lines(recipe.lora)],
            "",
        ]

    if is_rl_summary(summary):
        lines += ["## Training", "", *_rl_training_lines(summary, recipe, plan.rl_comparison), ""]
    else:
        lines += ["## Training", "", *_training_lines(summary, recipe), ""]
    lines += ["## Evaluation", "", *_eval_lines(plan.evaluation or {}), ""]
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


def lora_target_lines(lora) -> list[str]:
    """Human-readable LoRA targets, from the same switches `ftkit.model.load.lora_targets` turns into PEFT targets."""
    from ftkit.model.load import lora_targets

    regex, params = lora_targets(lora)
    stacks = " and ".join(s for s, on in (("encoder", lora.encoder), ("decoder", lora.decoder)) if on)
    out = []
    if lora.attention:
        out.append(f"attention `q_proj`, `k_proj`, `v_proj`, `o_proj` ({stacks} text layers)")
    if lora.experts:
        rank = "" if lora.expert_r in (None, lora.r) else f"; rank {lora.expert_r} per expert"
        out.append(
            f"MoE experts {', '.join(f'`{p}`' for p in params)} (fused expert tensors, via PEFT "
            f"`target_parameters`; {stacks}{rank})"
        )
    if lora.dense_mlp:
        out.append(f"dense MLP `gate_proj`, `up_proj`, `down_proj` ({stacks})")
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


def _training_lines(summary: dict[str, Any], recipe) -> list[str]:
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
                f"{'per position (checker flags)' if rl.credit == 'token' else 'per sample'} / {rl.negative_weight:g} / "
                f"{rl.guided} of {rl.group_size}"
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
    if comparison and isinstance(comparison.get("before"), dict) and isinstance(comparison.get("after"), dict):
        before, after = comparison["before"], comparison["after"]
        out += [
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


def _eval_lines(evaluation: dict[str, Any]) -> list[str]:
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
        f'model = PeftModel.from_pretrained(base, "{repo}")  # not merge_and_unload(): tied weights (`ftkit export` merges)',
        f'tokenizer = AutoTokenizer.from_pretrained("{repo}")',
    ]
    return lines


# ----------------------------------------------------------------------------------------------------------------
# Upload


def _upload(folder: Path, plan: PushPlan, endpoint: str | None, token: str) -> str:
    return _upload_folder(
        folder, plan.repo, plan.private, f"ftkit: {plan.recipe.task.name} LoRA adapter", endpoint, token
    )


def _upload_folder(folder: Path, repo: str, private: bool, message: str, endpoint: str | None, token: str) -> str:
    from huggingface_hub import CommitOperationAdd, HfApi

    api = HfApi(endpoint=endpoint, token=token)
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    try:
        url = api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        api.create_commit(
            repo,
            [CommitOperationAdd(path_in_repo=p.relative_to(folder).as_posix(), path_or_fileobj=str(p)) for p in files],
            commit_message=message,
            repo_type="model",
        )
    except Exception as e:  # noqa: BLE001 - every hub failure becomes one clear, token-free line
        raise FtkitError(_scrub(_explain(e, api.endpoint, repo), token)) from None
    return str(url)


# ----------------------------------------------------------------------------------------------------------------
# An export (`ftkit export RUN OUT`): the merged model, its card and the eval it was measured with, as written


def is_export_dir(path: Path) -> bool:
    from ftkit.export import EXPORT_MANIFEST

    return (Path(path) / EXPORT_MANIFEST).is_file()


def push_export(
    folder,
    repo: str | None = None,
    private: bool | None = None,
    dry_run: bool = False,
    dry_run_dir=None,
    endpoint: str | None = None,
    token: str | None = None,
    allow_no_eval: bool = False,
) -> str:
    """Upload an export folder's own files (those its ftkit_export.json lists) in one commit; the card's
    placeholder repo id becomes the real one. Refused without the run's evaluation unless `allow_no_eval`."""
    from ftkit.export import EXPORT_MANIFEST
    from ftkit.run import filecheck

    folder = Path(folder)
    manifest = _read_json(folder / EXPORT_MANIFEST)
    names = manifest.get("files")
    if not isinstance(names, list) or not names:
        raise FtkitError(f"{folder / EXPORT_MANIFEST}: lists no files; export again (`ftkit export RUN OUT`)")
    for name in names:
        what = filecheck.problem(folder / name)
        if what:
            raise FtkitError(f"{folder / name}: {what}; export again (`ftkit export RUN OUT`)")
    if manifest.get("eval") is None and not allow_no_eval:
        raise FtkitError(
            f"{folder}: the export holds no evaluation (eval.json): run `ftkit eval RUN`, export again, "
            "or pass --allow-no-eval to push without results"
        )
    if repo is None and not dry_run:
        raise FtkitError("no repo to push an export to: pass --repo USER/NAME")
    if repo is not None and not REPO_ID.fullmatch(repo):
        raise FtkitError(f"repo {repo!r}: expected a hub repo id of the form USER/NAME")

    def stage(into: Path) -> None:
        for name in names:
            shutil.copyfile(folder / name, into / name)
        card = into / "README.md"
        if card.is_file():
            card.write_text(
                card.read_text(encoding="utf-8").replace("PATH_OR_REPO", repo or PLACEHOLDER_REPO), encoding="utf-8"
            )

    if dry_run:
        default = folder.parent / f"{folder.name}-{RunPaths.HUB_UPLOAD}"
        target = Path(dry_run_dir) if dry_run_dir is not None else default
        return _stage_in_place(target, stage)
    token = token or _find_token()
    with tempfile.TemporaryDirectory(prefix="ftkit-push-") as tmp:
        stage(Path(tmp))
        message = f"ftkit: {manifest.get('task', 'DiffusionGemma')} model (merged export, {manifest.get('form')})"
        return _upload_folder(Path(tmp), repo, bool(private), message, endpoint, token)


def _transport_errors() -> tuple[type[BaseException], ...]:
    # huggingface_hub's HTTP client (httpx or its fork httpx2, by version): connection-level failures.
    found: list[type[BaseException]] = []
    for module in ("httpx2", "httpx", "requests"):
        try:
            mod = __import__(module)
        except ImportError:
            continue
        for name in ("TransportError", "ConnectionError", "Timeout"):
            cls = getattr(mod, name, None)
            if isinstance(cls, type) and issubclass(cls, BaseException):
                found.append(cls)
    return tuple(found)


def _explain(error: Exception, endpoint: str, repo: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(error, OfflineModeIsEnabled):
        return "cannot push: offline mode is on (unset HF_HUB_OFFLINE)"
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        status = error.response.status_code
        if status in (401, 403):
            return (
                f"permission denied by {endpoint} (HTTP {status}) for {repo}: the token is invalid or lacks write "
                "access to this namespace; run `hf auth login` with a write token or set HF_TOKEN"
            )
        if status == 404:
            return f"{endpoint}: repo {repo} not found or not accessible with this token (HTTP 404)"
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        return f"upload to {endpoint} failed (HTTP {status}): {first[:300]}"
    if isinstance(error, _transport_errors() + (ConnectionError, TimeoutError)):
        return f"cannot reach the Hugging Face Hub at {endpoint} ({error.__class__.__name__}); check the network or HF_ENDPOINT"
    first = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return f"upload to {endpoint} failed: {error.__class__.__name__}: {first[:300]}"


def _scrub(text: str, token: str | None) -> str:
    if token:
        text = text.replace(token, "***")
    return re.sub(r"hf_[A-Za-z0-9]{8,}", "hf_***", text)
