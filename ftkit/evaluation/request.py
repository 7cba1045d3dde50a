"""What `ftkit eval RUN` asks for (`EvalRequest`), checked before anything loads.

Every field left at its default means "as the recipe says": the request's settings are the recipe's eval section
with the flags given on top (`EvalRequest.settings`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ftkit.diffusion.token_layout import task_max_blocks
from ftkit.errors import FtkitError
from ftkit.recipe import EvalSection

DATA_FILE_LIMIT = 1_000_000  # --data without -n: every example of the file


@dataclass(frozen=True)
class EvalRequest:
    """One evaluation of a run directory.

    `checkpoint`: a name under checkpoints/, a path, or `latest`. `data_path`: every example of another data file of
    the task's format (up to `num_examples`), read as `task.data_path` would be, instead of a split of the recipe's.
    With `sweep_steps`, the primary mode is also evaluated at each step count (`<stem>_sweep.json`, `.png`). With
    `compare_verifier`, plain and verifier-guided sampling run on the same examples and seeds, plus plain best-of-n
    at the verifier row's decoder forwards."""

    run_dir: Path
    split: str | None = None
    steps: int | None = None
    num_examples: int | None = None
    base_only: bool = False
    verifier_renoise: bool | None = None
    sweep_steps: list[int] | None = None
    compare_verifier: bool = False
    checkpoint: str | None = None
    data_path: str | None = None
    token_masks: bool | None = None
    max_new_tokens: int | None = None

    def check(self) -> None:
        """The flags' own errors (values, exclusions, a missing --data file), before a model is loaded."""
        counts = (("steps", self.steps), ("num_examples", self.num_examples), ("max_new_tokens", self.max_new_tokens))
        for name, value in counts:
            if value is not None and value <= 0:
                raise FtkitError(f"--{name.replace('_', '-')} must be > 0, got {value}")
        if self.sweep_steps and any(s <= 0 for s in self.sweep_steps):
            raise FtkitError(f"sweep steps must all be > 0, got {self.sweep_steps}")
        if self.data_path is not None:
            if self.split is not None:
                raise FtkitError("--data and --split exclude each other: --data evaluates the whole file")
            if not Path(self.data_path).exists():
                raise FtkitError(f"--data {self.data_path}: file not found")
        if self.base_only and self.checkpoint is not None:
            raise FtkitError("--base and --checkpoint exclude each other")

    def settings(self, own: EvalSection) -> EvalSection:
        """The recipe's eval section with this request's flags on top (--data evaluates the split "all")."""
        cfg = dataclasses.replace(
            own,
            split=self.split or own.split,
            steps=self.steps or own.steps,
            num_examples=self.num_examples or own.num_examples,
            verifier_renoise=own.verifier_renoise if self.verifier_renoise is None else self.verifier_renoise,
            token_masks=own.token_masks if self.token_masks is None else self.token_masks,
            max_new_tokens=self.max_new_tokens or own.max_new_tokens,
        )
        return dataclasses.replace(cfg, split="all") if self.data_path is not None else cfg


def check_answer_budget(task, max_new_tokens: int | None) -> None:
    """--max-new-tokens only means something for a task whose answers run block after block; elsewhere the answer's
    length is fixed by its pieces, and a flag that changes nothing is an error, not silently ignored."""
    if max_new_tokens is not None and task_max_blocks(task) is not None:
        raise FtkitError(
            f"--max-new-tokens: a {task.name} answer has a fixed length (one canvas), so an answer "
            "budget changes nothing; it applies to tasks whose answers run block after block (chat)"
        )
