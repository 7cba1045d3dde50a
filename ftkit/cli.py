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
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape

from ftkit.errors import FtkitError


class _FlagsWithoutType:
    """A flag takes no value, so its help row shows no type (typer prints `<bool>` there)."""

    def get_params(self, ctx):
        params = super().get_params(ctx)
        for param in params:
            if getattr(param, "is_flag", False) and param.metavar is None:
                param.metavar = ""
        return params


class Command(_FlagsWithoutType, typer.core.TyperCommand):
    pass


class Group(_FlagsWithoutType, typer.core.TyperGroup):
    pass


app = typer.Typer(
    name="ftkit",
    help="Fine-tune DiffusionGemma (block-diffusion MoE) with LoRA on attention and experts.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=Group,
)
console = Console(stderr=True)
out = Console()


def _print_version(value: bool) -> None:
    if value:
        from ftkit import __version__

        out.print(f"ftkit {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print ftkit's version and exit.")
    ] = False,
) -> None:
    """Fine-tune DiffusionGemma (block-diffusion MoE) with LoRA on attention and experts."""
    from ftkit.model.compat import check_transformers

    try:
        check_transformers()  # an unsupported transformers is one line here, not a failure deep inside a run
    except FtkitError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        raise typer.Exit(e.exit_code) from None


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
    if not sys.stderr.isatty():
        # A bar redrawn with \r is kilobytes of noise in a piped log; a terminal still gets datasets' bars.
        import datasets

        datasets.disable_progress_bars()


RecipeArg = Annotated[Path, typer.Argument(help="Recipe YAML file.")]
AllowWeakSandbox = Annotated[
    bool,
    typer.Option(
        "--allow-weak-sandbox",
        help="Run model-written code (code_infill tests) even where only the weak sandbox (an audit hook, no "
        "namespaces) is available; same as eval.allow_weak_sandbox: true.",
    ),
]
Overrides = Annotated[list[str] | None, typer.Argument(help="Overrides KEY.PATH=VALUE, e.g. train.max_steps=10.")]


@app.command(cls=Command)
@friendly_errors
def validate(recipe: RecipeArg, overrides: Overrides = None) -> None:
    """Check a recipe and build its model on the meta device; print it resolved.

    Keys, types, ranges, task options, sampler settings; the tiny preset also runs one training step on the CPU."""
    from ftkit.recipe import load_recipe

    resolved = load_recipe(recipe, overrides or [])
    _quiet_libraries()
    from ftkit.recipe.preflight import check_model

    notes = check_model(resolved, str(recipe))
    out.print(resolved.to_yaml(), highlight=False, end="")
    for note in notes:
        console.print(f"  {note}", highlight=False, style="dim")
    console.print(f"[green]ok[/] {recipe}")


Resume = Annotated[bool, typer.Option("--resume", help="Continue from the run's last checkpoint.")]
OutputDir = Annotated[Path | None, typer.Option("--output-dir", "-o", help="Overrides train.output_dir.")]


def _training_recipe(recipe: Path, overrides: list[str] | None, output_dir: Path | None, options: dict):
    """The recipe of `train` / `rl`: the file, then its `key=value` overrides, then the command's options (an option
    left out changes nothing)."""
    from ftkit.recipe import load_recipe

    extra = list(overrides or [])
    if output_dir is not None:
        extra.append(f"train.output_dir={output_dir}")
    extra += [f"{key}={value}" for key, value in options.items() if value is not None]
    return load_recipe(recipe, extra)


@app.command(cls=Command)
@friendly_errors
def train(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Resume = False,
    output_dir: OutputDir = None,
    model: Annotated[str | None, typer.Option("--model", help="Overrides model.base (e.g. `tiny`).")] = None,
) -> None:
    # One line: the command list shows the docstring's line breaks as they are.
    """Train a LoRA adapter (or every weight: train.trainable=full) with the diffusion objective; writes the run directory."""  # noqa: E501
    resolved = _training_recipe(recipe, overrides, output_dir, {"model.base": model})
    _quiet_libraries()
    from ftkit.sft.run import train as run_training

    summary = _run_until_interrupted(run_training, resolved, resume)
    if summary:
        _print_train_summary(summary, resolved.train.output_dir)


def _run_until_interrupted(run, resolved, resume: bool) -> dict:
    """A training command (`train`, `rl`); on Ctrl-C, one line with the last checkpoint and the exact resume command,
    exit code 130."""
    try:
        return run(resolved, resume=resume, progress=sys.stderr.isatty())
    except KeyboardInterrupt:
        console.print(
            _interrupted_line(Path(resolved.train.output_dir), resolved.train.save_steps),
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
        raise typer.Exit(130) from None


def _interrupted_line(run_dir: Path, save_steps: int) -> str:
    """Where a Ctrl-C'd training run (`ftkit train` or `ftkit rl`) stands and the exact command that continues it."""
    import shlex

    from ftkit.run import rundir

    argv = ["ftkit", *sys.argv[1:]]
    if "--resume" not in argv:
        argv.append("--resume")
    command = shlex.join(argv)
    saved = rundir.checkpoints(run_dir)
    if saved:
        return (
            f"interrupted; last saved checkpoint: {saved[0]} (step {rundir.checkpoint_step(saved[0])}); "
            f"resume with: {command}"
        )
    return f"interrupted before the first checkpoint (every {save_steps} steps); start again with: {command}"


def _print_train_summary(summary: dict, run_dir: str) -> None:
    from rich.table import Table

    table = Table(title=f"ftkit train — {run_dir}", show_header=False)
    for key in (
        "base_model",
        "task",
        "steps",
        "loss_start",
        "loss_end",
        "diffusion_loss_start",
        "diffusion_loss_end",
        "encoder_loss_start",
        "encoder_loss_end",
        "canvas_tokens_per_second",
        "trainable_parameters",
        "train_seconds",
    ):
        value = summary.get(key)
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    out.print(table)


@app.command(cls=Command)
@friendly_errors
def rl(
    recipe: RecipeArg,
    overrides: Overrides = None,
    resume: Resume = False,
    output_dir: OutputDir = None,
    init_from: Annotated[
        Path | None, typer.Option("--init-from", help="Overrides rl.init_from (a finished `ftkit train` run).")
    ] = None,
) -> None:
    """Reinforcement learning from the task's verifier (GRPO on the diffusion ELBO); writes the run directory."""
    resolved = _training_recipe(recipe, overrides, output_dir, {"rl.init_from": init_from})
    from ftkit.rl.run import check_rl_recipe

    check_rl_recipe(resolved, where=str(recipe))
    _quiet_libraries()
    from ftkit.rl.run import rl as run_rl

    summary = _run_until_interrupted(run_rl, resolved, resume)
    _print_rl_summary(summary, resolved.train.output_dir)


def _print_rl_summary(summary: dict, run_dir: str) -> None:
    from rich.table import Table

    table = Table(title=f"ftkit rl — {run_dir}", show_header=False)
    for key in (
        "base_model",
        "task",
        "init_from",
        "steps",
        "reward_start",
        "reward_end",
        "success_start",
        "success_end",
        "kl_end",
        "train_seconds",
        "train_cpu_seconds",
    ):
        value = summary.get(key)
        if key == "kl_end" and value is None:
            value = "n/a (no step kept a sample: every group's rewards were equal)"
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
            held_out.add_row(key, f"{100 * before[key]:.1f}%", f"{100 * value:.1f}%")  # as `ftkit eval` shows them
        out.print(held_out)


@app.command("eval", cls=Command)
@friendly_errors
def eval_(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `ftkit train`.")],
    split: Annotated[str | None, typer.Option(help="Dataset split (default: the recipe's eval.split).")] = None,
    steps: Annotated[int | None, typer.Option(help="Denoising steps (default: eval.steps).")] = None,
    num_examples: Annotated[int | None, typer.Option("--num-examples", "-n", help="How many examples.")] = None,
    base: Annotated[
        bool,
        typer.Option(
            "--base",
            help="Evaluate the untrained base model instead: without the adapter (a full run: its initial weights).",
        ),
    ] = False,
    verifier: Annotated[
        bool | None, typer.Option("--verifier/--no-verifier", help="Verifier-guided re-noising.")
    ] = None,
    compare_verifier: Annotated[
        bool,
        typer.Option(
            "--compare-verifier",
            help="Plain vs verifier-guided on the same examples and seeds, plus plain best-of-n at the verifier's "
            "decoder forwards.",
        ),
    ] = False,
    sweep_steps: Annotated[str | None, typer.Option("--sweep-steps", help="Comma list, e.g. 1,4,16,64.")] = None,
    checkpoint: Annotated[
        str | None,
        typer.Option(
            "--checkpoint", help="A checkpoint (checkpoint-N, a path, or latest) instead of the final adapter."
        ),
    ] = None,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            help="Answer length budget in tokens, block after block (default: eval.max_new_tokens, else one canvas).",
        ),
    ] = None,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data",
            help="Evaluate every example of this data file (the task's format, read as task.data_path) instead of "
            "the recipe's split; writes eval_data-<name>.json.",
        ),
    ] = None,
    token_masks: Annotated[
        bool | None,
        typer.Option(
            "--token-masks/--no-token-masks",
            help="Mask each position to the tokens the task allows there (default: eval.token_masks).",
        ),
    ] = None,
    allow_weak_sandbox: AllowWeakSandbox = False,
) -> None:
    """Constrained denoising on the task's test split (or a data file); writes the result and prints the table.

    Only the recipe's own evaluation writes eval.json (what push publishes); others write e.g. eval_train_n2.json."""
    _quiet_libraries()
    from ftkit.evaluation import EvalRequest, describe_file, evaluate_run, render_sweep, render_table
    from ftkit.tasks.sandbox import SandboxPolicy

    sweep = _int_list(sweep_steps, "--sweep-steps") if sweep_steps else None
    with SandboxPolicy(allow_weak=allow_weak_sandbox), EvalProgress(console) as progress:
        request = EvalRequest(
            run_dir,
            split=split,
            steps=steps,
            num_examples=num_examples,
            base_only=base,
            verifier_renoise=verifier,
            sweep_steps=sweep,
            compare_verifier=compare_verifier,
            checkpoint=checkpoint,
            data_path=str(data) if data is not None else None,
            token_masks=token_masks,
            max_new_tokens=max_new_tokens,
        )
        report = evaluate_run(request, progress=progress)
    out.print(render_table(report))
    if report.get("sweep"):
        out.print(render_sweep(report))
    console.print(describe_file(report), highlight=False, soft_wrap=True, markup=False)


class EvalProgress:
    """`evaluate_run`'s progress: rich bars on a terminal, one plain line per batch when stderr is piped."""

    def __init__(self, console: Console):
        self.console = console
        self.bars = None
        self.tasks: dict[str, int] = {}
        self.started: dict[str, float] = {}

    def __enter__(self) -> EvalProgress:
        if self.console.is_terminal:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

            self.bars = Progress(
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.bars.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.bars is not None:
            self.bars.stop()

    def __call__(self, label: str, done: int, total: int) -> None:
        import time

        self.started.setdefault(label, time.perf_counter())
        if self.bars is not None:
            if label not in self.tasks:
                self.tasks[label] = self.bars.add_task(label, total=total)
            self.bars.update(self.tasks[label], completed=done)
        elif done:  # piped: a clean line per batch
            seconds = time.perf_counter() - self.started[label]
            print(f"eval {label}: {done}/{total} examples, {seconds:.1f} s", file=sys.stderr, flush=True)


def _int_list(text: str, flag: str) -> list[int]:
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise FtkitError(f"{flag}: expected comma-separated integers, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise FtkitError(f"{flag}: expected positive integers, got {text!r}")
    return values


@app.command(cls=Command)
@friendly_errors
def generate(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `ftkit train`.")],
    input: Annotated[
        str,
        typer.Option(
            "--input", "-i", help="The task input: a puzzle, a motif spec, a code snippet, a question, or @FILE."
        ),
    ],
    steps: Annotated[int | None, typer.Option(help="Denoising steps per block (default: eval.steps).")] = None,
    live: Annotated[bool, typer.Option("--live", help="Show the canvas being denoised.")] = False,
    save_trajectory: Annotated[
        Path | None, typer.Option("--save-trajectory", help="Write the denoising steps as PNG or GIF.")
    ] = None,
    base: Annotated[
        bool,
        typer.Option(
            "--base", help="Use the untrained base model: without the adapter (a full run: its initial weights)."
        ),
    ] = False,
    seed: Annotated[int, typer.Option(help="Sampling seed.")] = 0,
    max_new_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-new-tokens",
            help="Answer length budget in tokens, block after block (default: eval.max_new_tokens, else one canvas).",
        ),
    ] = None,
    allow_weak_sandbox: AllowWeakSandbox = False,
) -> None:
    """Denoise one input with the fine-tuned model and print the answer with its constraint check.

    An answer longer than one canvas is generated block after block; each block is printed as it lands. An empty
    answer exits with code 1."""
    _generate(
        run_dir,
        input,
        steps=steps,
        live=live,
        save_trajectory=save_trajectory,
        base=base,
        seed=seed,
        max_new_tokens=max_new_tokens,
        allow_weak_sandbox=allow_weak_sandbox,
    )


def _generate(run_dir: Path, input: str, task_name: str | None = None, **options) -> None:
    _quiet_libraries()
    from ftkit.evaluation.generate import generate_one
    from ftkit.tasks.sandbox import SandboxPolicy

    def show_block(k: int, text: str, last: bool) -> None:
        if k or not last:  # a one-block answer prints once, below
            console.print(f"[dim]block {k + 1}:[/] {escape(text)}", highlight=False)

    text = _read_input(input)
    base = options.pop("base")
    allow_weak = options.pop("allow_weak_sandbox", False)
    with SandboxPolicy(allow_weak=allow_weak or _run_allows_weak_sandbox(run_dir)):
        result = generate_one(run_dir, text, base_only=base, task_name=task_name, on_block=show_block, **options)
    out.print(result.render(), highlight=False)
    if result.empty:
        raise typer.Exit(1)


def _run_allows_weak_sandbox(run_dir: Path) -> bool:
    """The run's own `eval.allow_weak_sandbox` (generate reads no other eval setting from this command)."""
    from ftkit.recipe import load_recipe
    from ftkit.run.paths import RunPaths

    try:
        return load_recipe(RunPaths(run_dir).recipe).eval.allow_weak_sandbox
    except FtkitError:
        return False  # generate reports the run directory's problem itself


@app.command(cls=Command)
@friendly_errors
def solve(
    run_dir: Annotated[Path, typer.Argument(help="Run directory of a Sudoku run.")],
    puzzle: Annotated[str, typer.Argument(help="81 characters, 0 or . for blanks (or @FILE).")],
    steps: Annotated[int | None, typer.Option(help="Denoising steps.")] = None,
    live: Annotated[bool, typer.Option("--live", help="Show the grid being denoised.")] = False,
    save_trajectory: Annotated[Path | None, typer.Option("--save-trajectory", help="PNG or GIF of the steps.")] = None,
) -> None:
    """Solve one Sudoku (shorthand for `generate` on a Sudoku run)."""
    _generate(
        run_dir, puzzle, task_name="sudoku", steps=steps, live=live, save_trajectory=save_trajectory, base=False, seed=0
    )


def _read_input(text: str) -> str:
    if text.startswith("@"):
        path = Path(text[1:])
        if not path.is_file():
            raise FtkitError(f"{path}: input file not found")
        try:
            return path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FtkitError(f"{path}: not a UTF-8 text file (byte {e.start}); save the input as UTF-8") from None
    return text


@app.command(cls=Command)
@friendly_errors
def export(
    run_dir: Annotated[Path, typer.Argument(help="Run directory written by `ftkit train` or `ftkit rl`.")],
    out_dir: Annotated[Path, typer.Argument(metavar="OUT", help="New directory for the standalone model.")],
    checkpoint: Annotated[
        str | None,
        typer.Option(
            "--checkpoint", help="A checkpoint (checkpoint-N, a path, or latest) instead of the final weights."
        ),
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Weight dtype: bfloat16, float16 or float32.")] = "bfloat16",
    max_shard_size: Annotated[
        str,
        typer.Option(
            "--max-shard-size", help="Largest safetensors shard (host RAM holds one shard while it is written)."
        ),
    ] = "4GB",
) -> None:
    """Merge the adapter into the base (a full fine-tune as it is) and write a model plain transformers loads: config,
    sharded safetensors, tokenizer, generation config (the eval sampler settings), model card."""
    _quiet_libraries()
    from ftkit.export import export_run
    from ftkit.export.shards import return_freed_memory_to_os

    return_freed_memory_to_os()  # resident memory stays one shard + one tensor (docs/serving.md)

    record = export_run(
        run_dir,
        out_dir,
        checkpoint=checkpoint,
        dtype=dtype,
        max_shard_size=max_shard_size,
        on_note=lambda note: console.print(f"note: {note}", highlight=False),
    )
    console.print(f"{record['form']} {record['dtype']} export of {record['weights']} weights", highlight=False)
    out.print(str(out_dir), highlight=False)


@app.command(cls=Command)
@friendly_errors
def push(
    run_dir: Annotated[
        Path, typer.Argument(help="Run directory written by `ftkit train`, or an `ftkit export` folder.")
    ],
    repo: Annotated[str | None, typer.Option("--repo", help="Hub repo id user/name (default: hub.repo).")] = None,
    private: Annotated[bool | None, typer.Option("--private/--public", help="Create the repo private.")] = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Write the exact upload folder locally; upload nothing.")
    ] = False,
    dry_run_dir: Annotated[
        Path | None, typer.Option("--dry-run-dir", help="Where --dry-run writes (default RUN/hub_upload).")
    ] = None,
    allow_no_eval: Annotated[
        bool,
        typer.Option(
            "--allow-no-eval",
            help="Push a run that has no eval.json of its own (the card then says it was not evaluated).",
        ),
    ] = False,
) -> None:
    """Upload the adapter, tokenizer, recipe, the run's own eval.json and a model card to the Hugging Face Hub; or,
    given a folder written by `ftkit export`, the merged model with its card and eval.json."""
    from ftkit.hub.push import is_export_dir, push_export, push_run

    if is_export_dir(run_dir):
        url = push_export(
            run_dir, repo=repo, private=private, dry_run=dry_run, dry_run_dir=dry_run_dir, allow_no_eval=allow_no_eval
        )
        out.print(url, highlight=False)
        return
    url = push_run(
        run_dir,
        repo=repo,
        private=private,
        dry_run=dry_run,
        dry_run_dir=dry_run_dir,
        allow_no_eval=allow_no_eval,
        on_note=lambda note: console.print(f"note: {note}", highlight=False),
    )
    out.print(url, highlight=False)


@app.command(cls=Command)
def tasks() -> None:
    """List the registered tasks."""
    from ftkit.tasks import known_tasks

    for name in known_tasks():
        out.print(name)


if __name__ == "__main__":
    app()
