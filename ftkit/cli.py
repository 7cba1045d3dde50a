"""The `ftkit` command line: train / rl / eval / generate / solve / push / validate / tasks.

Bad input (an FtkitError) prints one line `error: ...` and exits with code 2; nothing else is caught, so a bug
still shows its traceback.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console

from ftkit.errors import FtkitError

app = typer.Typer(
    name="ftkit",
    help="Fine-tune DiffusionGemma (block-diffusion MoE) with LoRA on attention and experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()


def friendly_errors(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except FtkitError as e:
            console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130) from None

    return wrapper


def _quiet_libraries() -> None:
    import warnings

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # Library deprecation chatter and bitsandbytes' "no CPU kernel package" notice are not the user's business.
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.")]
Overrides = Annotated[Optional[list[str]], typer.Argument(help="Overrides KEY.PATH=VALUE, e.g. train.max_steps=10.")]


@app.command()
@friendly_errors
def validate(recipe: RecipeArg, overrides: Overrides = None) -> None:
    """Check a recipe (keys, types, ranges, task options) and print it resolved."""
    from ftkit.recipe import load_recipe

    resolved = load_recipe(recipe, overrides or [])
    out.print(resolved.to_yaml(), highlight=False, end="")
    console.print(f"[green]ok[/] {recipe}")


@app.command()
@friendly_errors
def train(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Overrides train.output_dir.")] = None,
    model: Annotated[Optional[str], typer.Option("--model", help="Overrides model.base (e.g. `tiny`).")] = None,
) -> None:
    """Train a LoRA adapter with the diffusion objective; writes the run directory."""
    from ftkit.recipe import load_recipe

    extra = list(overrides or [])
    if output_dir is not None:
        extra.append(f"train.output_dir={output_dir}")
    if model is not None:
        extra.append(f"model.base={model}")
    resolved = load_recipe(recipe, extra)
    _quiet_libraries()
    from ftkit.train import train as run_training

    summary = run_training(resolved, resume=resume, progress=sys.stderr.isatty())
    if summary:
        _print_train_summary(summary, resolved.train.output_dir)


def _print_train_summary(summary: dict, run_dir: str) -> None:
    from rich.table import Table

    table = Table(title=f"ftkit train — {run_dir}", show_header=False)
    for key in ("base_model", "task", "steps", "loss_start", "loss_end", "diffusion_loss_start", "diffusion_loss_end",
                "encoder_loss_start", "encoder_loss_end", "canvas_tokens_per_second", "trainable_parameters", "train_seconds"):
        value = summary.get(key)
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


@app.command()
@friendly_errors
def rl(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")] = False,
    output_dir: Annotated[Optional[Path], typer.Option("--output-dir", "-o", help="Overrides train.output_dir.")] = None,
    init_from: Annotated[Optional[Path], typer.Option("--init-from", help="Overrides rl.init_from (a finished `ftkit train` run).")] = None,
) -> None:
    """Reinforcement learning from the task's verifier (GRPO on the diffusion ELBO); writes the run directory."""
    from ftkit.recipe import load_recipe

    extra = list(overrides or [])
    if output_dir is not None:
        extra.append(f"train.output_dir={output_dir}")
    if init_from is not None:
        extra.append(f"rl.init_from={init_from}")
    resolved = load_recipe(recipe, extra)
    from ftkit.rl.run import check_rl_recipe

    check_rl_recipe(resolved, where=str(recipe))
    _quiet_libraries()
    from ftkit.rl.run import rl as run_rl

    summary = run_rl(resolved, resume=resume, progress=sys.stderr.isatty())
    _print_rl_summary(summary, resolved.train.output_dir)


def _print_rl_summary(summary: dict, run_dir: str) -> None:
    from rich.table import Table

    table = Table(title=f"ftkit rl — {run_dir}", show_header=False)
    for key in ("base_model", "task", "init_from", "steps", "reward_start", "reward_end", "success_start",
                "success_end", "kl_end", "train_seconds"):
        value = summary.get(key)
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    for key, value in summary.get("cost", {}).items():
        table.add_row(f"cost: {key}", f"{value:.1f}" if isinstance(value, float) else str(value))
    out.print(table)
    before, after = summary.get("before"), summary.get("after")
    if before and after:
        held_out = Table(title="held-out split: before RL -> after RL (same sampler, same seeds)")
        for col in ("metric", "before", "after"):
            held_out.add_column(col, justify="left" if col == "metric" else "right")
        for key, value in after.items():
            if "/" in key or key.startswith("count") or key not in before:
                continue
            held_out.add_row(key, f"{before[key]:.4f}", f"{value:.4f}")
        out.print(held_out)


@app.command("eval")
@friendly_errors
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `ftkit train`.")],
    split: Annotated[Optional[str], typer.Option(help="Dataset split (default: the recipe's eval.split).")] = None,
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default: eval.steps).")] = None,
    num_examples: Annotated[Optional[int], typer.Option("--num-examples", "-n", help="How many examples.")] = None,
    base: Annotated[bool, typer.Option("--base", help="Evaluate the untuned base model instead.")] = False,
    verifier: Annotated[Optional[bool], typer.Option("--verifier/--no-verifier", help="Verifier-guided re-noising.")] = None,
    compare_verifier: Annotated[bool, typer.Option("--compare-verifier", help="Plain vs verifier-guided, same run.")] = False,
    sweep_steps: Annotated[Optional[str], typer.Option("--sweep-steps", help="Comma list, e.g. 1,4,16,64.")] = None,
    checkpoint: Annotated[Optional[str], typer.Option("--checkpoint", help="A checkpoint (checkpoint-N, a path, or latest) instead of the final adapter.")] = None,
) -> None:
    """Constrained denoising on the task's test split; writes eval.json and prints the table."""
    _quiet_libraries()
    from ftkit.evaluate import evaluate_run, render_table

    sweep = _int_list(sweep_steps, "--sweep-steps") if sweep_steps else None
    report = evaluate_run(run_dir, split=split, steps=steps, num_examples=num_examples, base_only=base,
                          verifier_renoise=verifier, sweep_steps=sweep, compare_verifier=compare_verifier,
                          checkpoint=checkpoint)
    out.print(render_table(report))


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FtkitError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise FtkitError(f"{flag}: expected positive integers, got {text!r}")
    return values


@app.command()
@friendly_errors
def generate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `ftkit train`.")],
    input: Annotated[str, typer.Option("--input", "-i", help="The task input: a puzzle, a motif spec, a code snippet, or @FILE.")],
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps (default: eval.steps).")] = None,
    live: Annotated[bool, typer.Option("--live", help="Show the canvas being denoised.")] = False,
    save_trajectory: Annotated[Optional[Path], typer.Option("--save-trajectory", help="Write the denoising steps as PNG or GIF.")] = None,
    base: Annotated[bool, typer.Option("--base", help="Use the untuned base model.")] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
) -> None:
    """Denoise one input with the fine-tuned model and print the answer with its constraint check."""
    _quiet_libraries()
    from ftkit.generate import generate_one

    text = _read_input(input)
    result = generate_one(run_dir, text, steps=steps, live=live, save_trajectory=save_trajectory, base_only=base, seed=seed)
    out.print(result.render(), highlight=False)


@app.command()
@friendly_errors
def solve(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a Sudoku run.")],
    puzzle: Annotated[str, typer.Argument(help="81 characters, 0 or . for blanks (or @FILE).")],
    steps: Annotated[Optional[int], typer.Option(help="Denoising steps.")] = None,
    live: Annotated[bool, typer.Option("--live", help="Show the grid being denoised.")] = False,
    save_trajectory: Annotated[Optional[Path], typer.Option("--save-trajectory", help="PNG or GIF of the steps.")] = None,
) -> None:
    """Solve one Sudoku (shorthand for `generate` on a Sudoku run)."""
    generate(run_dir, input=puzzle, steps=steps, live=live, save_trajectory=save_trajectory)


def _read_input(text: str) -> str:
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise FtkitError(f"{path}: input file not found")
        return path.read_text(encoding="utf-8")
    return text


@app.command()
@friendly_errors
def push(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `ftkit train`.")],
    repo: Annotated[Optional[str], typer.Option("--repo", help="Hub repo id user/name (default: hub.repo).")] = None,
    private: Annotated[Optional[bool], typer.Option("--private/--public", help="Create the repo private.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Write the exact upload folder locally; upload nothing.")] = False,
    dry_run_dir: Annotated[Optional[Path], typer.Option("--dry-run-dir", help="Where --dry-run writes (default RUN/hub_upload).")] = None,
) -> None:
    """Upload the adapter, tokenizer, recipe, eval.json and a model card to the Hugging Face Hub."""
    from ftkit.hub import push_run

    url = push_run(run_dir, repo=repo, private=private, dry_run=dry_run, dry_run_dir=dry_run_dir)
    out.print(url, highlight=False)


@app.command()
def tasks() -> None:
    """List the registered tasks."""
    from ftkit.tasks import known_tasks

    for name in known_tasks():
        out.print(name)


if __name__ == "__main__":
    app()
