"""`ftkit generate` / `ftkit solve`: denoise one user input with a run's model and show the answer.

The run's task turns the raw text into an `Example` (`task.example_from_input`), which is laid out exactly as in
evaluation and generated block after block (`ftkit.diffusion.blocks`: one block for an answer that fits the canvas)
with its fixed pieces clamped, then checked with the task's constraints. How answers and denoising frames look is
the task's view (`ftkit.tasks.view`: Sudoku draws grids, the other tasks text). The trajectory can be replayed live
in the terminal (`live`) or written as a PNG contact sheet / GIF (`save_trajectory`; `ftkit.evaluation.trajectory`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.evaluation.trajectory import check_trajectory_path, replay_live, save_trajectory_image
from ftkit.model import arch
from ftkit.tasks.base import Example, Violation
from ftkit.tasks.view import UNKNOWN_CELL, Frame, view_of


def example_from_input(task, text: str) -> Example:
    """The task's `example_from_input(text)`: raw user input -> an example (free pieces hold placeholders)."""
    parse = getattr(task, "example_from_input", None)
    if not callable(parse):
        raise FtkitError(
            f"generate: task {task.name!r} does not read raw input (it has no `example_from_input` "
            "method; see docs/tasks.md)"
        )
    return parse(text)


# ----------------------------------------------------------------------------------------------------------------
# Result


@dataclass
class CanvasMap:
    """Where each piece of the canvas text lives: per piece, its token span and its first character's offset."""

    token_spans: list[tuple[int, int]]
    char_offsets: list[int]
    fixed: list[bool]
    texts: list[str]

    @property
    def end(self) -> int:
        """The token index after the last piece (where an open-ended answer's text continues)."""
        return self.token_spans[-1][1] if self.token_spans else 0


@dataclass
class GenerateResult:
    task_name: str
    run_dir: Path
    example: Example
    output: str
    violations: list[Violation]
    steps_used: int
    steps_budget: int
    forward_passes: int
    tokens_per_forward: float
    renoised_cells: int
    weights: str  # which weights answered: the fine-tuned adapter/model, a checkpoint's, or the base model
    canvas_map: CanvasMap
    answer: Frame  # the final canvas, piece by piece
    view: Any  # the task's view (ftkit.tasks.view)
    blocks: int = 1
    frames: list[Frame] = field(default_factory=list)  # the trajectory: start, each step (block after block), answer
    trajectory_file: Path | None = None

    @property
    def empty(self) -> bool:
        """No answer at all (the model ended its turn at once): a failed generation."""
        return not self.output.strip()

    def bad_pieces(self) -> set[int]:
        """The answer's pieces holding a violation's character position."""
        offsets = list(self.canvas_map.char_offsets)
        cursor = sum(len(t) for t in self.canvas_map.texts)
        for text in self.answer.pieces[len(offsets) :]:  # tokens past the pieces: offsets continue
            offsets.append(cursor)
            cursor += len(text)
        positions = {p for v in self.violations for p in v.positions}
        return {
            i
            for i, (start, text) in enumerate(zip(offsets, self.answer.pieces))
            if any(start <= p < start + max(1, len(text)) for p in positions)
        }

    def render(self):
        from rich.console import Group
        from rich.text import Text

        parts: list[Any] = [Text.assemble((f"{self.task_name}", "bold"), f" — {self.run_dir} ({self.weights})")]
        parts.append(self.view.answer(self.example, self.output, self.answer, self.bad_pieces()))
        if self.empty:
            parts.append(Text("✗ empty answer: the model ended its turn without writing anything", style="bold red"))
        if self.violations:
            parts.append(Text(f"✗ {len(self.violations)} constraint violation(s):", style="bold red"))
            for v in self.violations:
                parts.append(Text(f"  - {v.constraint}: {v.detail}", style="red"))
        elif not self.empty:
            parts.append(Text("✓ all constraints satisfied", style="bold green"))
        stats = (
            f"steps used {self.steps_used} / {self.steps_budget * self.blocks} · forward passes "
            f"{self.forward_passes} · tokens per forward {self.tokens_per_forward:.2f}"
        )
        if self.blocks > 1:
            stats += f" · blocks {self.blocks}"
        if self.renoised_cells:
            stats += f" · re-noised positions {self.renoised_cells}"
        parts.append(Text(stats, style="dim"))
        if self.trajectory_file is not None:
            parts.append(Text(f"trajectory: {self.trajectory_file}", style="dim"))
        return Group(*parts)


# ----------------------------------------------------------------------------------------------------------------
# Generation


def _canvas_map(pieces, char_starts: list[int]) -> CanvasMap:
    """Token spans per piece, from the layout's per-token character starts (so tokenization is not redone)."""
    spans, offsets, offset, t = [], [], 0, 0
    for piece in pieces:
        start = t
        while t < len(char_starts) and char_starts[t] < offset + len(piece.text):
            t += 1
        spans.append((start, t))
        offsets.append(offset)
        offset += len(piece.text)
    return CanvasMap(spans, offsets, [p.fixed for p in pieces], [p.text for p in pieces])


def _shown(text: str, width: int | None = None) -> str:
    """Text as a frame shows it: printable (newlines and tabs kept) and, for a piece, no wider than the reference
    (`width`); anything else shows as UNKNOWN_CELL."""
    ok = text and all(ch.isprintable() or ch in "\n\t" for ch in text) and (width is None or len(text) <= max(1, width))
    return text if ok else UNKNOWN_CELL * max(1, width or 1)


def _frame(tokenizer, tokens: list[int], cmap: CanvasMap, label: str) -> Frame:
    """A frame: each piece's text (a layout newline stays a newline), then each token past the pieces."""
    pieces = []
    for (a, b), reference in zip(cmap.token_spans, cmap.texts):
        if reference == "\n" or a == b:
            pieces.append(reference if reference == "\n" else "")
            continue
        pieces.append(_shown(tokenizer.decode(tokens[a:b], skip_special_tokens=True), len(reference)))
    tail = [_shown(tokenizer.decode([t], skip_special_tokens=True)) for t in tokens[cmap.end :]]
    return Frame(pieces + tail, list(cmap.fixed) + [False] * len(tail), label)


def _until_stop(tokens: list[int], stops) -> list[int]:
    end = next((i for i, t in enumerate(tokens) if t in stops), len(tokens))
    return tokens[:end]


def weights_label(run) -> str:
    """Which weights a loaded run answers with, as `generate` prints it: a run still training (no final weights) is
    answered by its newest checkpoint, and says so."""
    full = run.recipe.is_full
    if run.weights_dir is None:
        return "base model: its untrained initial weights" if full else "base model, no adapter"
    if Path(run.weights_dir).resolve() == Path(run.run_dir).resolve():
        return "fine-tuned model" if full else "fine-tuned adapter"
    return (
        f"{Path(run.weights_dir).name}: the run has no final {'model' if full else 'adapter'} yet, so its newest "
        "checkpoint answers"
    )


def run_task_name(run_dir) -> str:
    """The task a run was trained on, from its recipe alone (no model loaded)."""
    from ftkit.recipe import load_recipe
    from ftkit.run.paths import RunPaths
    from ftkit.run.rundir import require_run_dir

    return load_recipe(RunPaths(require_run_dir(run_dir)).recipe).task.name


def generate_one(
    run_dir,
    text: str,
    steps: int | None = None,
    live: bool = False,
    save_trajectory=None,
    base_only: bool = False,
    seed: int = 0,
    console=None,
    max_new_tokens: int | None = None,
    task_name: str | None = None,
    on_block: Callable[[int, str, bool], None] | None = None,
) -> GenerateResult:
    """Denoise one raw input with the run's model (clamped fixed pieces, block after block); check it; optionally
    show/save the steps. `task_name`: refuse a run of another task before loading anything (`ftkit solve`).
    `on_block(k, text, last)` gets each block's text as it lands."""
    from ftkit.diffusion.token_layout import canvas_to_text, layout_example, stop_token_ids, task_max_blocks
    from ftkit.evaluation.request import check_answer_budget
    from ftkit.run.rundir import load_run

    traj_path = _check_request(run_dir, text, steps, save_trajectory, max_new_tokens, task_name)
    run = load_run(run_dir, trained=not base_only)
    check_answer_budget(run.task, max_new_tokens)
    example = example_from_input(run.task, text)
    pc = run.task.to_prompt_canvas(example)
    lay = layout_example(
        run.tokenizer, pc, run.canvas_length, run.recipe.train.max_prompt_length, "input", task_max_blocks(run.task)
    )
    cmap = _canvas_map(pc.pieces, lay.char_starts)
    stops = stop_token_ids(run.tokenizer)
    record = live or traj_path is not None
    n_steps = steps or run.recipe.eval.steps
    result = _denoise_input(run, example, lay, stops, n_steps, seed, max_new_tokens, record, on_block)
    tokens = result.tokens[0]
    output = canvas_to_text(run.tokenizer, tokens)
    answer = _frame(run.tokenizer, _until_stop(tokens, set(stops)), cmap, "answer")
    out = GenerateResult(
        task_name=run.task.name,
        run_dir=Path(run_dir),
        example=example,
        output=output,
        violations=run.task.check(example, output),
        steps_used=int(result.steps_used[0]),
        steps_budget=n_steps,
        forward_passes=result.forward_passes,
        tokens_per_forward=float(result.tokens_per_forward),
        renoised_cells=result.renoised_cells,
        weights=weights_label(run),
        canvas_map=cmap,
        answer=answer,
        view=view_of(run.task),
        blocks=result.blocks[0],
        frames=_trajectory_frames(run, result, cmap, answer) if record else [],
    )
    if live:
        replay_live(out, console=console)
    if traj_path is not None:
        out.trajectory_file = save_trajectory_image(out, traj_path)
    return out


def _check_request(run_dir, text: str, steps, save_trajectory, max_new_tokens, task_name) -> Path | None:
    """The flags' own errors, before a model is loaded; returns the trajectory file to write, if any."""
    for flag, value in (("--steps", steps), ("--max-new-tokens", max_new_tokens)):
        if value is not None and value <= 0:
            raise FtkitError(f"{flag} must be > 0, got {value}")
    traj_path = check_trajectory_path(save_trajectory) if save_trajectory is not None else None
    if not text or not text.strip():
        raise FtkitError("generate: the input is empty")
    if task_name is not None:
        trained = run_task_name(run_dir)
        if trained != task_name:
            raise FtkitError(
                f"{run_dir}: a {trained} run, not a {task_name} run; use `ftkit generate {run_dir} -i INPUT` for it"
            )
    return traj_path


def _denoise_input(run, example: Example, lay, stops, n_steps: int, seed: int, max_new_tokens, record: bool, on_block):
    """Denoise the one laid-out input block after block with the recipe's eval settings (clamped; verifier-guided
    when the recipe says so); `on_block(k, text, last)` hears each block as it lands."""
    from ftkit.diffusion.blocks import denoise_blocks
    from ftkit.diffusion.sample import row_generators
    from ftkit.diffusion.token_layout import canvas_to_text

    cfg = run.recipe.eval
    device = next(run.model.parameters()).device
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id

    verifier = None
    if cfg.verifier_renoise:
        from ftkit.evaluation.verify import rows_verifier

        verifier = rows_verifier(run.tokenizer, run.task, [example])

    def landed(k, rows, canvas, last):
        if on_block is not None:
            on_block(k, canvas_to_text(run.tokenizer, canvas[0].tolist()), last[0])

    return denoise_blocks(
        run.model,
        [lay],
        generators=row_generators(seed, 1, device),
        max_new_tokens=max_new_tokens or cfg.max_new_tokens or run.canvas_length,
        stop_ids=stops,
        pad_id=pad_id,
        verifier=verifier,
        on_block=landed,
        steps=n_steps,
        **cfg.sampler_kwargs(),
        clamp=True,
        record_trajectory=record,
        vocab_size=arch.vocab_size(run.model) if cfg.token_masks else None,
    )


def _trajectory_frames(run, result, cmap: CanvasMap, answer: Frame) -> list[Frame]:
    """The recorded trajectory as frames: each block's start and steps (earlier blocks' tokens before it), then the
    answer."""
    tokens = result.tokens[0]
    length = run.canvas_length
    frames = []
    for k, steps_of_block in enumerate(result.trajectories):
        prefix = f"block {k + 1} · " if result.blocks[0] > 1 else ""
        for i, canvas in enumerate(steps_of_block):
            label = prefix + ("start (noise)" if i == 0 else f"step {i}")
            frames.append(_frame(run.tokenizer, tokens[: k * length] + canvas[0].tolist(), cmap, label))
    frames.append(answer)
    return frames
