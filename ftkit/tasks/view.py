"""How a task's answers look: the answer panel of `ftkit generate`, the frames of `--live`, and the images of
`--save-trajectory`.

A `Frame` is the canvas at one denoising step as the text of each canvas piece, followed by one entry per token
generated past the pieces (an open-ended answer has no pieces to hold it). `TextView` draws any task as text; a task
with its own look has a `view` attribute (Sudoku draws grids: `ftkit.tasks.sudoku.SudokuView`). `view_of(task)`
picks. Rich and Pillow are imported inside the methods: tasks are imported by `ftkit validate` too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

UNKNOWN_CELL = "·"  # shown for a token that is not printable text (EOS, a special token, a noise byte)
GIVEN_FILL, CHANGED_FILL, VIOLATION_FILL = (210, 228, 255), (255, 221, 140), (255, 190, 190)
WHITE, INK, RULE = (255, 255, 255), (0, 0, 0), (200, 200, 200)


@dataclass
class Frame:
    pieces: list[str]  # per canvas piece, then per token past the pieces: its text (UNKNOWN_CELL if not printable)
    fixed: list[bool]  # per entry of `pieces`: a given (clamped) piece
    label: str  # "start (noise)", "step 3", "block 2 · step 1", "answer"

    @property
    def text(self) -> str:
        return "".join(self.pieces)


def changed(previous: Frame | None, current: Frame) -> set[int]:
    """Indices of the entries that differ from the previous frame (new entries count as changed)."""
    if previous is None:
        return set()
    old = previous.pieces
    return {i for i, text in enumerate(current.pieces) if i >= len(old) or old[i] != text}


def font(size: int):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no sized default font
        return ImageFont.load_default()


class TextView:
    """Any task as text: the answer in a panel; frames with the pieces that changed highlighted."""

    legend: tuple[tuple[tuple[int, int, int], str], ...] = (
        (CHANGED_FILL, "changed this step"),
        (VIOLATION_FILL, "violates a constraint (answer)"),
    )
    columns = 60  # characters per line in an image

    def answer(self, example, output: str, frame: Frame, bad: set[int]) -> Any:
        from rich.panel import Panel
        from rich.text import Text

        return Panel(Text(output or "(empty)"), title="answer")

    def frame(self, example, frame: Frame, previous: Frame | None) -> Any:
        from rich.panel import Panel
        from rich.text import Text

        text = Text()
        moved = changed(previous, frame)
        for i, piece in enumerate(frame.pieces):
            text.append(piece, style="bold yellow" if i in moved else "")
        return Panel(text, title=frame.label)

    def image(self, example, frame: Frame, previous: Frame | None, bad: set[int]):
        """The canvas text wrapped at `columns` characters; changed pieces (or violating ones, on the answer)
        get a highlight behind their characters."""
        from PIL import Image, ImageDraw

        char_w, line_h, pad = 9, 18, 8
        moved = changed(previous, frame)
        lines, x = 1, 0
        for ch in frame.text.replace("\t", "    "):
            if ch == "\n" or x >= self.columns:
                lines, x = lines + 1, 0
            x += ch != "\n"
        img = Image.new("RGB", (self.columns * char_w + 2 * pad, line_h * (lines + 1) + 2 * pad), WHITE)
        draw = ImageDraw.Draw(img)
        face = font(14)
        draw.text((pad, pad - 4), frame.label, fill=INK, font=face)
        x, y = pad, pad + line_h
        for i, piece in enumerate(frame.pieces):
            fill = VIOLATION_FILL if i in bad else CHANGED_FILL if i in moved else None
            for ch in piece.replace("\t", "    "):
                if ch == "\n" or x >= pad + self.columns * char_w:
                    x, y = pad, y + line_h
                    if ch == "\n":
                        continue
                if fill is not None:
                    draw.rectangle((x, y, x + char_w, y + line_h - 1), fill=fill)
                draw.text((x, y), ch, fill=INK, font=face)
                x += char_w
        return img


def view_of(task) -> Any:
    """The task's own view (its `view` attribute), else `TextView`."""
    return getattr(task, "view", None) or TextView()
