"""The Task interface: one small class per task, registered by name.

A task turns its data into `Example`s, lays an example out as an encoder prompt plus a canvas made of pieces (each
piece fixed — the sampler clamps it — or free), checks a model output against the task's constraints, and aggregates
metrics. Everything is text: the tokenizer (the tiny character tokenizer or Gemma's) is applied by
`ftkit.layout`, so a task never sees token ids.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable


@dataclass(frozen=True)
class Example:
    """One task instance. `answer` is the ground-truth canvas text; `meta` carries task data (difficulty, family...)."""

    id: str
    question: Any  # task-specific input (a puzzle string, a motif spec, a (prefix, suffix) pair...)
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Piece:
    text: str
    fixed: bool  # fixed pieces are given: clamped during sampling, excluded from "generated" metrics


@dataclass(frozen=True)
class PromptCanvas:
    """The model's view of an example: the encoder prompt and the canvas, as ordered pieces of text."""

    prompt: str
    pieces: tuple[Piece, ...]
    # The conversation before the answer as (role, content) turns (system / user / assistant); when given, the
    # encoder reads it (chat-templated) instead of `prompt`.
    messages: tuple[tuple[str, str], ...] = ()

    @property
    def canvas_text(self) -> str:
        return "".join(p.text for p in self.pieces)


@dataclass(frozen=True)
class Violation:
    """A violated constraint. `positions` are character offsets into the canvas text (for re-noising)."""

    constraint: str  # a stable short name, e.g. "row", "givens", "alphabet", "parse"
    detail: str
    positions: tuple[int, ...] = ()


@runtime_checkable
class Task(Protocol):
    name: ClassVar[str]
    Options: ClassVar[type]  # a frozen dataclass validated from `task.options` in the recipe
    # Optional (read with getattr, default False): answers may be longer than one canvas. Training then draws one
    # response block per example and generation denoises block after block; otherwise a longer canvas is an error.
    # multi_block: ClassVar[bool]

    def build_dataset(self, split: str, size: int, seed: int, data_path: str | None = None) -> list[Example]:
        """The examples of `split` ("train" or "test"). Raise FtkitError naming file and line on bad data."""

    def to_prompt_canvas(self, example: Example) -> PromptCanvas:
        """The prompt and canvas pieces; the concatenated pieces equal `example.answer` for a perfect output."""

    def check(self, example: Example, output: str) -> list[Violation]:
        """The constraints `output` (the decoded canvas text) violates; [] for a valid output."""

    def metrics(self, examples: list[Example], outputs: list[str]) -> dict[str, float]:
        """Aggregate metrics (fractions in [0, 1], named `metric` or `metric/stratum`)."""


def stratified_means(rows: list[tuple[dict[str, float | None], str | None]], strata: list[str]) -> dict[str, float]:
    """Per-example metric rows -> the mean of each metric over all examples (`metric`) and per stratum
    (`metric/stratum`, in the order of `strata`), with `count` per group. A None value (a metric that does not apply
    to that example) is left out of its mean."""
    groups: dict[str, list[dict[str, float | None]]] = {"all": []}
    for row, stratum in rows:
        groups["all"].append(row)
        if stratum:
            groups.setdefault(stratum, []).append(row)
    result: dict[str, float] = {}
    for name in ["all", *strata]:
        members = groups.get(name)
        if not members:
            continue
        suffix = "" if name == "all" else f"/{name}"
        for key in members[0]:
            values = [r[key] for r in members if r.get(key) is not None]
            if values:
                result[f"{key}{suffix}"] = sum(values) / len(values)
        result[f"count{suffix}"] = float(len(members))
    return result


_REGISTRY: dict[str, type] = {}


def register(cls: type) -> type:
    """Class decorator: make a task available by its `name`."""
    _REGISTRY[cls.name] = cls
    return cls


def known_tasks() -> list[str]:
    _load_builtin()
    return sorted(_REGISTRY)


def get_task(name: str) -> type:
    _load_builtin()
    if name not in _REGISTRY:
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_task(name: str, options: dict[str, Any] | None = None) -> Any:
    cls = get_task(name)
    return cls(cls.Options(**(options or {})))


def _load_builtin() -> None:
    # Importing registers them; each module imports its optional heavy deps lazily.
    from ftkit.tasks import code_infill, protein, sudoku  # noqa: F401
