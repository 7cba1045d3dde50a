"""The Task interface: one small class per task, registered by name; a task is one module.

A task turns its data into `Example`s, lays an example out as an encoder prompt plus a canvas made of pieces (each
piece fixed — the sampler clamps it — or free), checks a model output against the task's constraints, and aggregates
metrics. It also reads a user's raw input for `ftkit generate` (`example_from_input`), may bring its own look
(`view`, see `ftkit.tasks.view`) and may score an output for reinforcement learning (`reward`, optional: the default
is derived from `check`). Everything is text: the tokenizer (the tiny character tokenizer or Gemma's) is applied by
`ftkit.diffusion.token_layout`, so a task never sees token ids. Tasks of other packages register through the entry
point group `ftkit.tasks`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol, runtime_checkable

# Free pieces of a user input (`example_from_input`) have no ground truth; the sampler ignores their tokens, only
# their number matters. Digits are one token each in both the character tokenizer and Gemma's, so a run of "0"s has a
# known length.
PLACEHOLDER = "0"


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
    # Free pieces only: the characters this piece's tokens may consist of (e.g. Sudoku's digits); the sampler masks
    # every other token at its positions. None = any text token.
    allowed: str | None = None


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

    def example_from_input(self, text: str) -> Example:
        """`ftkit generate -i TEXT`: a user's raw input as an example. Free pieces have no ground truth: fill them with
        PLACEHOLDER characters of the right token length (the sampler ignores them). Bad input: FtkitError."""

    # Optional (read with getattr): `view`, an object drawing answers and denoising frames (ftkit.tasks.view.TextView
    # is the default; ftkit.tasks.sudoku.SudokuView draws grids).


@dataclass(frozen=True)
class RewardParts:
    """A verifier's score of one output: what `ftkit rl` turns into a reward (weights in the recipe's `rl.reward`).
    Neither part may use the ground-truth answer: the reward must come from the task's own verifier."""

    satisfied: float  # fraction of the task's constraints the output satisfies, in [0, 1]
    success: float  # 1.0 when it satisfies all of them (solved / valid / tests pass), else 0.0


@runtime_checkable
class Rewarding(Protocol):
    """Optional for a task: a reward finer than the default derived from `check()` (see `reward_parts`)."""

    def reward(self, example: Example, output: str) -> RewardParts: ...


def reward_from_violations(violations: list[Violation], length: int) -> RewardParts:
    """The default reward of any task, from its `check()` alone: success is "no violation"; `satisfied` counts every
    character position of the output (at least `length` of them) as one constraint and gives the fraction no
    violation flags. A violation without positions (a global one: unparsable, wrong length) flags everything."""
    if not violations:
        return RewardParts(1.0, 1.0)
    if any(not v.positions for v in violations):
        return RewardParts(0.0, 0.0)
    length = max(1, length)
    flagged = {p for v in violations for p in v.positions if 0 <= p < length}
    return RewardParts(1.0 - len(flagged) / length, 0.0)


def reward_parts(task: Any, example: Example, output: str) -> RewardParts:
    """`task.reward(example, output)` when the task defines it, else the default from its `check()`; the length
    counted is that of the output or of the expected canvas, whichever is longer (a truncated output loses)."""
    if isinstance(task, Rewarding):
        return task.reward(example, output)
    expected = len(task.to_prompt_canvas(example).canvas_text)
    return reward_from_violations(task.check(example, output), max(len(output), expected))


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
ENTRY_POINT_GROUP = "ftkit.tasks"
_PLUGIN_ERRORS: dict[str, str] = {}  # entry point name -> why it did not load
_PLUGINS_LOADED = False


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
        if name in _PLUGIN_ERRORS:
            raise KeyError(f"task {name!r} is installed but its plugin failed to load: {_PLUGIN_ERRORS[name]}")
        raise KeyError(f"unknown task {name!r}; known tasks: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[name]


def make_task(name: str, options: dict[str, Any] | None = None) -> Any:
    cls = get_task(name)
    return cls(cls.Options(**(options or {})))


def _load_builtin() -> None:
    # Importing registers them; each module imports its optional heavy deps lazily.
    from ftkit.tasks import chat, code_infill, protein, sudoku  # noqa: F401

    global _PLUGINS_LOADED
    if not _PLUGINS_LOADED:
        _PLUGINS_LOADED = True
        _load_plugins()


def _load_plugins() -> None:
    """Tasks other packages install: an entry point in the group `ftkit.tasks` naming the task class
    (`[project.entry-points."ftkit.tasks"] mytask = "mypkg.tasks:MyTask"`) or a module that registers its tasks with
    `@register` when imported. A plugin that fails to import is reported when its task is asked for, and never
    breaks the other tasks; a plugin cannot replace a built-in task."""
    from importlib.metadata import entry_points

    builtin = set(_REGISTRY)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            loaded = ep.load()
        except Exception as e:  # a third-party import error of any kind
            _PLUGIN_ERRORS[ep.name] = f"{ep.value}: {type(e).__name__}: {e}"
            continue
        if isinstance(loaded, type):
            name = getattr(loaded, "name", None)
            if not isinstance(name, str) or not hasattr(loaded, "Options"):
                _PLUGIN_ERRORS[ep.name] = f"{ep.value}: a task class needs `name` and `Options` (see docs/tasks.md)"
                continue
            if name != ep.name:
                _PLUGIN_ERRORS[ep.name] = f"{ep.value}: the entry point {ep.name!r} names the task {name!r}"
                continue
            if name in builtin and _REGISTRY[name] is not loaded:
                _PLUGIN_ERRORS[ep.name] = f"{ep.value}: the name {name!r} is a built-in task"
                continue
            register(loaded)
