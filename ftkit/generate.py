"""`ftkit generate` / `ftkit solve`: denoise one user input with a run's model and show the answer.

Raw text becomes an `Example` through an input parser looked up by task name: a task may define
`example_from_input(text) -> Example` itself, or a parser may be registered here with `register_input_parser`
(Sudoku's is below). The example is laid out exactly as in evaluation, denoised with its fixed pieces clamped, and
checked with the task's constraints. The denoising trajectory can be replayed live in the terminal (`live`) or
written as a PNG contact sheet / GIF (`save_trajectory`).
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.rundir import atomic_write
from ftkit.tasks.base import Example, Violation

InputParser = Callable[[Any, str], Example]
_INPUT_PARSERS: dict[str, InputParser] = {}
TRAJECTORY_SUFFIXES = (".png", ".gif")
UNKNOWN_CELL = "·"  # shown for a canvas position whose token is not a single printable character
# Free pieces of a user input have no ground truth; the sampler ignores their tokens, only their number matters.
# Digits are one token each in both the character tokenizer and Gemma's, so a run of "0"s has a known length.
PLACEHOLDER = "0"


def register_input_parser(task_name: str) -> Callable[[InputParser], InputParser]:
    """Decorator: `parser(task, text) -> Example` turns a user's raw input for `task_name` into an example."""

    def wrap(fn: InputParser) -> InputParser:
        _INPUT_PARSERS[task_name] = fn
        return fn

    return wrap


def example_from_input(task, text: str) -> Example:
    own = getattr(task, "example_from_input", None)
    if callable(own):
        return own(text)
    parser = _INPUT_PARSERS.get(task.name)
    if parser is None:
        raise FtkitError(
            f"generate: task {task.name!r} does not read raw input yet (it needs an `example_from_input` method or "
            f"a parser registered with ftkit.generate.register_input_parser); supported: "
            f"{', '.join(sorted(_INPUT_PARSERS)) or 'none'}"
        )
    return parser(task, text)


# ----------------------------------------------------------------------------------------------------------------
# Input parsers


SUDOKU_SEPARATORS = set(" \t\r\n|+-_,;")


@register_input_parser("sudoku")
def sudoku_example(task, text: str) -> Example:
    """81 cells, digits 1-9 with 0 or . for blanks; whitespace and grid-drawing characters (| + - _ , ;) ignored."""
    from ftkit.tasks.sudoku import UNITS, difficulty, parse_grid

    cells = "".join(ch for ch in text if ch not in SUDOKU_SEPARATORS)
    grid = parse_grid(cells, "sudoku input", blanks=True)
    for unit, idx in UNITS:
        seen: dict[int, int] = {}
        for i in idx:
            if grid[i] and grid[i] in seen:
                raise FtkitError(f"sudoku input: the givens repeat {grid[i]} in {unit} (cells {seen[grid[i]] + 1} and "
                                 f"{i + 1}, counting row by row): no solution exists")
            seen.setdefault(grid[i], i)
    givens = sum(1 for d in grid if d)
    quiz = "".join(str(d) for d in grid)
    # The answer is unknown: blanks keep the placeholder "0" (one token, like a digit); the sampler ignores it.
    answer = "\n".join(quiz[r * 9 : r * 9 + 9] for r in range(9)) if task.options.rows_on_lines else quiz
    return Example(id="input", question=quiz, answer=answer, meta={"givens": givens, "difficulty": difficulty(givens)})


@register_input_parser("protein")
def protein_example(task, text: str) -> Example:
    """A length (`64`: unconditional) or a scaffold template (`MKT____GLL___A`: letters fixed, `_` free)."""
    from ftkit.tasks.protein import CANONICAL

    spec = "".join(text.split())
    o = task.options
    if spec.isdigit():
        length, motif = int(spec), []
    else:
        bad = [(i, ch) for i, ch in enumerate(spec) if ch != "_" and ch.upper() not in CANONICAL]
        if bad:
            i, ch = bad[0]
            raise FtkitError(f"protein input: {ch!r} at position {i + 1} is neither a canonical residue "
                             f"({CANONICAL}) nor _ (a free residue); or give just a length, e.g. 64")
        spec = spec.upper()
        length, motif, i = len(spec), [], 0
        while i < len(spec):
            if spec[i] == "_":
                i += 1
                continue
            j = i
            while j < len(spec) and spec[j] != "_":
                j += 1
            motif.append((i, spec[i:j]))
            i = j
        if "_" not in spec:
            raise FtkitError("protein input: the template has no free residue (_) to generate")
    if not o.min_length <= length <= o.max_length:
        raise FtkitError(f"protein input: length {length} is outside this run's [{o.min_length}, {o.max_length}] "
                         "(task.options.min_length/max_length)")
    answer = list(PLACEHOLDER * length)
    for start, residues in motif:
        answer[start : start + len(residues)] = residues
    return Example(id="input", question={"length": length, "motif": motif}, answer="".join(answer),
                   meta={"mode": "scaffold" if motif else "unconditional", "source": "input"})


HOLE_MARK = re.compile(r"<HOLE(?::(\d+))?>")
DEFAULT_HOLE_CHARS = 32


@register_input_parser("code_infill")
def code_infill_example(task, text: str) -> Example:
    """Python code with one `<HOLE>` (or `<HOLE:N>`: N characters/tokens to generate, default 32) where the
    middle goes. A hole alone on its line generates whole lines (the middle ends with a newline)."""
    holes = list(HOLE_MARK.finditer(text))
    if len(holes) != 1:
        raise FtkitError(f"code_infill input: expected exactly one <HOLE> (or <HOLE:N>) marker, found {len(holes)}")
    hole = holes[0]
    n = int(hole.group(1)) if hole.group(1) else DEFAULT_HOLE_CHARS
    if n <= 0:
        raise FtkitError("code_infill input: <HOLE:N> needs N > 0")
    prefix, suffix = text[: hole.start()], text[hole.end() :]
    whole_lines = suffix.startswith("\n") and (not prefix or prefix.endswith("\n"))
    if whole_lines:
        suffix = suffix[1:]
    middle = PLACEHOLDER * (n - 1) + "\n" if whole_lines and n > 1 else PLACEHOLDER * n
    return Example(id="input", question={"head": "", "prefix": prefix, "suffix": suffix, "test": None,
                                         "entry_point": None},
                   answer=prefix + middle + suffix, meta={"origin": "input"})


# ----------------------------------------------------------------------------------------------------------------
# Result


@dataclass
class CanvasMap:
    """Where each piece of the canvas text lives: per piece, its token span and its first character's offset."""

    token_spans: list[tuple[int, int]]
    char_offsets: list[int]
    fixed: list[bool]
    texts: list[str]


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
    adapter: bool
    canvas_map: CanvasMap
    answer_pieces: list[str] = field(default_factory=list)  # the final canvas, piece by piece (EOS etc. shown as ·)
    frames: list[list[str]] = field(default_factory=list)  # per trajectory step: the text of each piece
    trajectory_file: Path | None = None

    @property
    def is_sudoku(self) -> bool:
        return self.task_name == "sudoku"

    def sudoku_cells(self) -> list[str]:
        """The 81 cells of the final canvas (a cell holding EOS or another non-digit token shows as ·)."""
        return _cells(self.answer_pieces)

    def violating_cells(self) -> set[int]:
        cell_of_offset = {}
        cell = 0
        for off, text in zip(self.canvas_map.char_offsets, self.canvas_map.texts):
            if text != "\n":
                cell_of_offset[off] = cell
                cell += 1
        return {cell_of_offset[p] for v in self.violations for p in v.positions if p in cell_of_offset}

    def render(self):
        from rich.console import Group
        from rich.panel import Panel
        from rich.text import Text

        parts: list[Any] = []
        source = "fine-tuned adapter" if self.adapter else "base model (no adapter)"
        parts.append(Text.assemble((f"{self.task_name}", "bold"), f" — {self.run_dir} ({source})"))
        if self.is_sudoku:
            givens = [q != "0" for q in self.example.question]
            body = sudoku_grid_text(self.sudoku_cells(), givens, bad=self.violating_cells())
            parts.append(Panel.fit(body, title="answer"))
            parts.append(Text.from_markup("[bold cyan]givens[/] · generated · [red]violating[/]", style="dim"))
        else:
            parts.append(Panel(Text(self.output or "(empty)"), title="answer"))
        if self.violations:
            parts.append(Text(f"✗ {len(self.violations)} constraint violation(s):", style="bold red"))
            for v in self.violations:
                parts.append(Text(f"  - {v.constraint}: {v.detail}", style="red"))
        else:
            parts.append(Text("✓ all constraints satisfied", style="bold green"))
        stats = (f"steps used {self.steps_used} / {self.steps_budget} · forward passes {self.forward_passes} · "
                 f"tokens per forward {self.tokens_per_forward:.2f}")
        if self.renoised_cells:
            stats += f" · re-noised positions {self.renoised_cells}"
        parts.append(Text(stats, style="dim"))
        if self.trajectory_file is not None:
            parts.append(Text(f"trajectory: {self.trajectory_file}", style="dim"))
        return Group(*parts)


def sudoku_grid_text(cells: list[str], givens: list[bool], changed: set[int] | None = None, bad: set[int] | None = None):
    """A 9×9 rich Text grid with box rules: givens bold cyan, changed cells yellow, violating cells red."""
    from rich.text import Text

    changed, bad = changed or set(), bad or set()
    text = Text()
    for r in range(9):
        if r and r % 3 == 0:
            text.append("──────┼───────┼──────\n", style="dim")
        for c in range(9):
            i = r * 9 + c
            if c and c % 3 == 0:
                text.append("│ ", style="dim")
            style = "bold cyan" if givens[i] else "red" if i in bad else "bold yellow" if i in changed else ""
            text.append(cells[i] if cells[i] else UNKNOWN_CELL, style=style)
            text.append(" " if c < 8 else "")
        text.append("\n" if r < 8 else "")
    return text


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


def _piece_texts(tokenizer, row: list[int], cmap: CanvasMap) -> list[str]:
    """Each piece's text in a (possibly noisy) canvas; a piece that is not printable text shows as UNKNOWN_CELL."""
    out = []
    for (a, b), fixed_text in zip(cmap.token_spans, cmap.texts):
        if fixed_text == "\n":
            out.append("\n")
            continue
        text = tokenizer.decode(row[a:b], skip_special_tokens=True)
        ok = text and text.isprintable() and len(text) <= max(1, len(fixed_text))
        out.append(text if ok else UNKNOWN_CELL * max(1, len(fixed_text)))
    return out


def check_trajectory_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in TRAJECTORY_SUFFIXES:
        raise FtkitError(f"--save-trajectory {path}: expected a .png or .gif file name")
    return path


def generate_one(run_dir, text: str, steps: int | None = None, live: bool = False, save_trajectory=None,
                 base_only: bool = False, seed: int = 0, console=None) -> GenerateResult:
    """Denoise one raw input with the run's model (clamped fixed pieces); check it; optionally show/save the steps."""
    import torch

    from ftkit.diffusion.sample import denoise, row_generators, schedule_kwargs
    from ftkit.layout import allowed_tokens, canvas_to_text, layout_example
    from ftkit.rundir import load_run

    if steps is not None and steps <= 0:
        raise FtkitError(f"--steps must be > 0, got {steps}")
    traj_path = check_trajectory_path(save_trajectory) if save_trajectory is not None else None
    if not text or not text.strip():
        raise FtkitError("generate: the input is empty")

    run = load_run(run_dir, adapter=not base_only)
    cfg = run.recipe.eval
    example = example_from_input(run.task, text)
    pc = run.task.to_prompt_canvas(example)
    lay = layout_example(run.tokenizer, pc, run.canvas_length, run.recipe.train.max_prompt_length, "input")
    cmap = _canvas_map(pc.pieces, lay.char_starts)

    device = next(run.model.parameters()).device
    pad_id = run.tokenizer.pad_token_id if run.tokenizer.pad_token_id is not None else run.tokenizer.eos_token_id
    fixed = torch.tensor([lay.fixed], dtype=torch.bool, device=device)
    canvas = torch.tensor([lay.canvas_ids], dtype=torch.long, device=device)
    verifier = None
    if cfg.verifier_renoise:
        from ftkit.evaluate import make_verifier

        verifier = make_verifier(run.tokenizer, run.task, [example])
    n_steps = steps or cfg.steps
    result = denoise(
        run.model,
        torch.tensor([lay.prompt_ids], dtype=torch.long, device=device),
        torch.ones((1, len(lay.prompt_ids)), dtype=torch.long, device=device),
        torch.where(fixed, canvas, torch.full_like(canvas, pad_id)),  # only the fixed pieces reach the sampler
        fixed,
        steps=n_steps,
        **schedule_kwargs(cfg),
        generator=row_generators(seed, 1, device),
        clamp=True,
        verifier=verifier,
        record_trajectory=live or traj_path is not None,
        allowed=allowed_tokens([lay], run.model.config.get_text_config().vocab_size, device) if cfg.token_masks else None,
    )
    row = result.canvas[0].tolist()
    output = canvas_to_text(run.tokenizer, row)
    answer_pieces = _piece_texts(run.tokenizer, row, cmap)
    frames = [_piece_texts(run.tokenizer, step[0].tolist(), cmap) for step in result.trajectory]
    if frames:
        frames.append(answer_pieces)  # the answer (argmax of the last step)
    out = GenerateResult(
        task_name=run.task.name, run_dir=Path(run_dir), example=example, output=output,
        violations=run.task.check(example, output), steps_used=int(result.steps_used[0]), steps_budget=n_steps,
        forward_passes=result.forward_passes, tokens_per_forward=float(result.tokens_per_forward),
        renoised_cells=result.renoised_cells, adapter=not base_only, canvas_map=cmap, answer_pieces=answer_pieces,
        frames=frames,
    )
    if live:
        replay_live(out, console=console)
    if traj_path is not None:
        out.trajectory_file = save_trajectory_image(out, traj_path)
    return out


# ----------------------------------------------------------------------------------------------------------------
# Live view and trajectory images


def _changed(prev: list[str] | None, cur: list[str]) -> set[int]:
    return set() if prev is None else {i for i, (a, b) in enumerate(zip(prev, cur)) if a != b}


def _cells(frame: list[str]) -> list[str]:
    return [t for t in frame if t != "\n"]


def frame_renderable(result: GenerateResult, k: int):
    from rich.panel import Panel
    from rich.text import Text

    frame = result.frames[k]
    last = k == len(result.frames) - 1
    title = "answer" if last else f"step {k} / {len(result.frames) - 2}" if k else "start (noise)"
    if result.is_sudoku:
        cells = _cells(frame)
        prev = _cells(result.frames[k - 1]) if k else None
        givens = [q != "0" for q in result.example.question]
        return Panel.fit(sudoku_grid_text(cells, givens, changed=_changed(prev, cells)), title=title)
    return Panel(Text("".join(frame)), title=title)


def replay_live(result: GenerateResult, console=None, seconds_per_frame: float = 0.08) -> None:
    """Replay the recorded trajectory in a rich Live view (one frame per denoising step)."""
    from rich.console import Console
    from rich.live import Live

    if not result.frames:
        return
    console = console or Console(stderr=True)
    with Live(frame_renderable(result, 0), console=console, refresh_per_second=30, transient=False) as view:
        for k in range(1, len(result.frames)):
            if console.is_terminal:
                time.sleep(seconds_per_frame)
            view.update(frame_renderable(result, k))


GIVEN_FILL, CHANGED_FILL, VIOLATION_FILL = (210, 228, 255), (255, 221, 140), (255, 190, 190)


def _font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


def _draw_sudoku(draw, x0: int, y0: int, cells: list[str], givens: list[bool], changed: set[int], bad: set[int],
                 cell: int, font) -> None:
    for i, value in enumerate(cells[:81]):
        r, c = divmod(i, 9)
        box = (x0 + c * cell, y0 + r * cell, x0 + (c + 1) * cell, y0 + (r + 1) * cell)
        fill = GIVEN_FILL if givens[i] else VIOLATION_FILL if i in bad else CHANGED_FILL if i in changed else (255, 255, 255)
        draw.rectangle(box, fill=fill, outline=(200, 200, 200))
        draw.text(((box[0] + box[2]) / 2, (box[1] + box[3]) / 2), value, fill=(0, 0, 0), font=font, anchor="mm")
    for k in range(0, 10, 3):
        draw.line((x0 + k * cell, y0, x0 + k * cell, y0 + 9 * cell), fill=(0, 0, 0), width=2)
        draw.line((x0, y0 + k * cell, x0 + 9 * cell, y0 + k * cell), fill=(0, 0, 0), width=2)


def trajectory_images(result: GenerateResult) -> list:
    """One Pillow image per frame: a Sudoku grid (changed cells highlighted), or the canvas text wrapped in rows."""
    from PIL import Image, ImageDraw

    images = []
    font = _font(14)
    givens = [q != "0" for q in result.example.question] if result.is_sudoku else []
    for k, frame in enumerate(result.frames):
        last = k == len(result.frames) - 1
        label = "answer" if last else f"step {k}" if k else "start"
        if result.is_sudoku:
            cell, pad = 22, 8
            img = Image.new("RGB", (9 * cell + 2 * pad, 9 * cell + 2 * pad + 18), "white")
            draw = ImageDraw.Draw(img)
            cells = _cells(frame)
            prev = _cells(result.frames[k - 1]) if k else None
            bad = result.violating_cells() if last else set()
            _draw_sudoku(draw, pad, pad + 18, cells, givens, _changed(prev, cells), bad, cell, font)
            draw.text((pad, 2), label, fill=(0, 0, 0), font=font)
        else:
            text = "".join(frame).replace("\t", "    ")
            rows = [line[i : i + 60] for line in text.split("\n") for i in range(0, max(1, len(line)), 60)]
            img = Image.new("RGB", (60 * 9 + 16, 18 * (len(rows) + 1) + 12), "white")
            draw = ImageDraw.Draw(img)
            draw.text((8, 4), label, fill=(0, 0, 0), font=font)
            prev = result.frames[k - 1] if k else None
            changed = _changed(prev, frame)
            # Changed pieces get a highlight behind their characters: walk the pieces in canvas order.
            x, y = 8, 22
            for i, piece in enumerate(frame):
                for ch in piece.replace("\t", "    "):
                    if ch == "\n" or x > 8 + 60 * 9 - 9:
                        x, y = 8, y + 18
                        if ch == "\n":
                            continue
                    if i in changed:
                        draw.rectangle((x, y, x + 9, y + 17), fill=CHANGED_FILL)
                    draw.text((x, y), ch, fill=(0, 0, 0), font=font)
                    x += 9
        images.append(img)
    return images


def save_trajectory_image(result: GenerateResult, path: Path) -> Path:
    """A GIF with one frame per step, or a PNG contact sheet of all steps; written atomically."""
    from PIL import Image

    if not result.frames:
        raise FtkitError("no trajectory was recorded")
    images = trajectory_images(result)
    path.parent.mkdir(parents=True, exist_ok=True)

    def write(tmp: str) -> None:
        if path.suffix.lower() == ".gif":
            images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:], duration=250, loop=0)
            return
        cols = min(8, len(images))
        w, h = max(i.width for i in images), max(i.height for i in images)
        rows = (len(images) + cols - 1) // cols
        sheet = Image.new("RGB", (cols * w, rows * h), "white")
        for n, img in enumerate(images):
            sheet.paste(img, ((n % cols) * w, (n // cols) * h))
        sheet.save(tmp, format="PNG")

    return atomic_write(path, write)
