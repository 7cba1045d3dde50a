"""How a generation's trajectory is shown: replayed live in the terminal, or written as a PNG contact sheet or a GIF.

Each frame is drawn by the task's view (`ftkit.tasks.view`); the answer frame marks the pieces holding a violation.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

from ftkit.errors import FtkitError
from ftkit.run.rundir import atomic_write
from ftkit.tasks.view import INK, WHITE, font

if TYPE_CHECKING:
    from ftkit.evaluation.generate import GenerateResult

TRAJECTORY_SUFFIXES = (".png", ".gif")
SHEET_MAX_WIDTH = 1600  # pixels: a contact sheet wraps its frames into rows no wider than a screen


def check_trajectory_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in TRAJECTORY_SUFFIXES:
        raise FtkitError(f"--save-trajectory {path}: expected a .png or .gif file name")
    return path


def frame_renderable(result: GenerateResult, k: int):
    return result.view.frame(result.example, result.frames[k], result.frames[k - 1] if k else None)


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


def trajectory_images(result: GenerateResult) -> list:
    """One Pillow image per frame, drawn by the task's view; the answer frame marks violating pieces."""
    images = []
    last = len(result.frames) - 1
    for k, frame in enumerate(result.frames):
        previous = result.frames[k - 1] if k else None
        images.append(result.view.image(result.example, frame, previous, result.bad_pieces() if k == last else set()))
    return images


def legend_strip(legend, width: int):
    """A white strip with the view's colour key: a swatch and its meaning per entry, wrapped to `width`."""
    from PIL import Image, ImageDraw

    face, pad, swatch, line_h = font(12), 8, 12, 18
    entries, x, rows = [], pad, 1
    for colour, label in legend:
        w = swatch + 6 + int(face.getlength(label)) + 16
        if x + w > width - pad and x > pad:
            x, rows = pad, rows + 1
        entries.append((x, rows - 1, colour, label))
        x += w
    img = Image.new("RGB", (width, rows * line_h + 2 * pad), WHITE)
    draw = ImageDraw.Draw(img)
    for x, row, colour, label in entries:
        y = pad + row * line_h
        draw.rectangle((x, y, x + swatch, y + swatch), fill=colour, outline=INK)
        draw.text((x + swatch + 6, y - 1), label, fill=INK, font=face)
    return img


def contact_sheet(images: list, legend):
    """The frames in a grid as wide as fits SHEET_MAX_WIDTH (one frame per cell, in order), the colour key below."""
    from PIL import Image

    w, h = max(i.width for i in images), max(i.height for i in images)
    cols = max(1, min(len(images), SHEET_MAX_WIDTH // w))
    rows = (len(images) + cols - 1) // cols
    key = legend_strip(legend, cols * w)
    sheet = Image.new("RGB", (cols * w, rows * h + key.height), WHITE)
    for n, img in enumerate(images):
        sheet.paste(img, ((n % cols) * w, (n // cols) * h))
    sheet.paste(key, (0, rows * h))
    return sheet


def save_trajectory_image(result: GenerateResult, path: Path) -> Path:
    """A GIF with one frame per step, or a PNG contact sheet of all steps; both with the view's colour key;
    written atomically."""
    from PIL import Image

    if not result.frames:
        raise FtkitError("no trajectory was recorded")
    images = trajectory_images(result)
    legend = result.view.legend

    def write(tmp: str) -> None:
        if path.suffix.lower() == ".gif":
            w, h = max(i.width for i in images), max(i.height for i in images)
            key = legend_strip(legend, w)
            frames = []
            for img in images:
                frame = Image.new("RGB", (w, h + key.height), WHITE)
                frame.paste(img, (0, 0))
                frame.paste(key, (0, h))
                frames.append(frame)
            frames[0].save(tmp, format="GIF", save_all=True, append_images=frames[1:], duration=250, loop=0)
            return
        contact_sheet(images, legend).save(tmp, format="PNG")

    return atomic_write(path, write)
