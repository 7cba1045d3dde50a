"""A task's examples and their token layouts, built through 🤗 `datasets` and cached by fingerprint.

`load_examples` runs `task.build_dataset` inside `Dataset.from_generator`; `load_layouts` tokenizes the examples
with `Dataset.map`. Both are cached as Arrow files under the `datasets` cache (HF_DATASETS_CACHE), keyed by an
explicit fingerprint of everything that determines them: the task's name, options and source code, the split, size
and seed, the data file's size and modification time; for layouts also the tokenizer, the canvas length and the
layout code. So the 20,000 puzzles of recipes/sudoku.yaml are generated once, not on every start and every rank
(`datasets` serializes concurrent builders of one fingerprint with a file lock; `ftkit train` also lets the main
process go first), and an edited data file or task is rebuilt.

An example's `question` and `meta` are stored as JSON (tuples kept as tuples), so a task gets back exactly the
examples it built.
"""

from __future__ import annotations

import dataclasses
import hashlib
import inspect
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ftkit.diffusion.token_layout import TokenLayout, layout_example, task_max_blocks
from ftkit.errors import FtkitError
from ftkit.tasks.base import Example

log = logging.getLogger(__name__)
FORMAT_VERSION = "1"  # bump when the stored row format changes


# ----------------------------------------------------------------------------------------------------------------
# Example <-> row


def _to_json(value: Any) -> Any:
    if isinstance(value, tuple):
        return {"__tuple__": [_to_json(v) for v in value]}
    if isinstance(value, list):
        return [_to_json(v) for v in value]
    if isinstance(value, dict):
        return {k: _to_json(v) for k, v in value.items()}
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if set(value) == {"__tuple__"}:
            return tuple(_from_json(v) for v in value["__tuple__"])
        return {k: _from_json(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_json(v) for v in value]
    return value


def example_to_row(example: Example) -> dict[str, str]:
    return {
        "id": example.id,
        "question": json.dumps(_to_json(example.question)),
        "answer": example.answer,
        "meta": json.dumps(_to_json(example.meta)),
    }


def row_to_example(row: dict[str, str]) -> Example:
    return Example(
        id=row["id"],
        question=_from_json(json.loads(row["question"])),
        answer=row["answer"],
        meta=_from_json(json.loads(row["meta"])),
    )


# ----------------------------------------------------------------------------------------------------------------
# Fingerprints


def _digest(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _source_digest(obj: Any) -> str:
    """The source file defining `obj`: editing a task's builder invalidates its cached examples."""
    try:
        path = inspect.getsourcefile(obj)
        return hashlib.sha256(Path(path).read_bytes()).hexdigest() if path else "?"
    except (TypeError, OSError):
        return "?"


def file_state(data_path: str | None) -> Any:
    """A local data file's (size, mtime); for a directory, its files'. None for no file (a Hub id, a generator)."""
    if not data_path or not Path(data_path).exists():
        return None
    path = Path(data_path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files]


def _options(task) -> Any:
    options = getattr(task, "options", None)
    return dataclasses.asdict(options) if dataclasses.is_dataclass(options) else repr(options)


def examples_fingerprint(task, split: str, size: int, seed: int, data_path: str | None) -> str:
    return _digest(
        "examples",
        FORMAT_VERSION,
        task.name,
        _options(task),
        _source_digest(type(task)),
        split,
        size,
        seed,
        data_path,
        file_state(data_path),
        _extra_state(task),
    )


def _extra_state(task) -> Any:
    """What else a task's data depends on (e.g. the chat task's own data file), from its optional `data_state()`."""
    state = getattr(task, "data_state", None)
    return state() if callable(state) else None


def _tokenizer_digest(tokenizer) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    return _digest(text, getattr(tokenizer, "chat_template", None), tokenizer.eos_token_id, tokenizer.pad_token_id)


# ----------------------------------------------------------------------------------------------------------------
# Building


def _generate(
    task_name: str, options: dict[str, Any], split: str, size: int, seed: int, data_path: str | None
) -> Iterator[dict[str, str]]:
    from ftkit.tasks import make_task

    task = make_task(task_name, options)
    for example in task.build_dataset(split, size, seed, data_path):
        yield example_to_row(example)


def examples_dataset(task, split: str, size: int, seed: int, data_path: str | None = None):
    """The examples as a `datasets.Dataset` (columns id, question, answer, meta), built once per fingerprint."""
    from datasets import Dataset, Features, Value

    features = Features({key: Value("string") for key in ("id", "question", "answer", "meta")})
    options = _options(task)
    return _ftkit_errors_unwrapped(
        Dataset.from_generator,
        _generate,
        features=features,
        gen_kwargs={
            "task_name": task.name,
            "options": options,
            "split": split,
            "size": size,
            "seed": seed,
            "data_path": data_path,
        },
        fingerprint=examples_fingerprint(task, split, size, seed, data_path),
    )


def _ftkit_errors_unwrapped(call, *args, **kwargs):
    """`call(...)`; a task's FtkitError (bad data, naming file and line) comes out as itself, not wrapped in the
    DatasetGenerationError `datasets` raises around a failed generator."""
    try:
        return call(*args, **kwargs)
    except FtkitError:
        raise
    except Exception as e:
        cause = e.__cause__ or e.__context__
        while cause is not None:
            if isinstance(cause, FtkitError):
                raise cause from None
            cause = cause.__cause__ or cause.__context__
        raise


def load_examples(
    task, split: str, size: int, seed: int, data_path: str | None = None, say_fewer: bool = True
) -> list[Example]:
    """`task.build_dataset(split, size, seed, data_path)`, through the cache. Fewer examples than asked is said,
    unless `say_fewer` is false (asking for "everything there is")."""
    if size <= 0:
        return []
    dataset = examples_dataset(task, split, size, seed, data_path)
    examples = [row_to_example(row) for row in dataset]
    if say_fewer:
        _say_if_fewer(task, data_path, split, size, len(examples))
    return examples


def _say_if_fewer(task, data_path: str | None, split: str, asked: int, built: int) -> None:
    """A task may have less data than asked for (code_infill's stdlib functions that fit the canvas): say so."""
    if 0 < built < asked:
        log.warning(
            "%s: %d %s example(s) asked, %d built (all the data there is)",
            data_path or f"task {task.name}",
            asked,
            split,
            built,
        )


# ----------------------------------------------------------------------------------------------------------------
# Laying examples out (bad rows: an error, or skipped and counted)


def layout_or_skip(
    task, tokenizer, example: Example, canvas_length: int, max_prompt_length: int, token_rules: bool = True
) -> TokenLayout | str:
    """The example's token layout; one that does not fit the model (a prompt over `max_prompt_length`, a canvas
    longer than the model's) is an error naming it, or, for a task whose `skip_bad_rows` is true, the error's text
    returned instead: the caller leaves the example out and counts it (`warn_skipped`)."""
    try:
        return layout_example(
            tokenizer,
            task.to_prompt_canvas(example),
            canvas_length,
            max_prompt_length,
            example.id,
            task_max_blocks(task),
            token_rules=token_rules,
        )
    except FtkitError as e:
        if not getattr(task, "skip_bad_rows", False):
            raise
        return str(e)


def lay_out_examples(
    task, tokenizer, examples: list[Example], canvas_length: int, max_prompt_length: int
) -> tuple[list[Example], list[TokenLayout], list[str]]:
    """(the examples that fit, their layouts with the sampler's token rules, why each left-out one does not fit)."""
    kept, layouts, skipped = [], [], []
    for example in examples:
        lay = layout_or_skip(task, tokenizer, example, canvas_length, max_prompt_length)
        if isinstance(lay, str):
            skipped.append(lay)
            continue
        kept.append(example)
        layouts.append(lay)
    return kept, layouts, skipped


def warn_skipped(
    logger: logging.Logger, skipped: list[str], total: int, who: str = "", what: str = "example(s)"
) -> None:
    """One warning for the examples left out, with the first one's reason, on the caller's logger."""
    if skipped:
        logger.warning(
            "%sskipped %d of %d %s that do not fit the model (first: %s)", who, len(skipped), total, what, skipped[0]
        )


def load_layouts(task, examples_ds, tokenizer, canvas_length: int, max_prompt_length: int):
    """The examples' token layouts as a `datasets.Dataset` (the TokenLayout fields), tokenized once per fingerprint.

    An example that does not fit (prompt over `max_prompt_length`, a canvas longer than the model's) is an error
    naming it, or, for a task whose `skip_bad_rows` is true, left out and counted in a warning."""
    max_blocks = task_max_blocks(task)
    skip = bool(getattr(task, "skip_bad_rows", False))
    fingerprint = _digest(
        "layouts",
        FORMAT_VERSION,
        examples_ds._fingerprint,
        _tokenizer_digest(tokenizer),
        canvas_length,
        max_prompt_length,
        max_blocks,
        skip,
        _source_digest(layout_example),
    )

    def lay_out(row: dict[str, str]) -> dict[str, Any]:
        lay = layout_or_skip(task, tokenizer, row_to_example(row), canvas_length, max_prompt_length, token_rules=False)
        if isinstance(lay, str):
            return {**_empty_layout(), "error": lay}
        return {**{k: v for k, v in dataclasses.asdict(lay).items() if k in _STORED}, "error": ""}

    kept = _ftkit_errors_unwrapped(
        examples_ds.map,
        lay_out,
        remove_columns=examples_ds.column_names,
        new_fingerprint=fingerprint,
        features=_layout_features(),
        desc="layout",
    )
    errors = [e for e in kept["error"] if e]
    if errors:
        warn_skipped(log, errors, len(kept))
        kept = kept.filter(lambda row: not row["error"], new_fingerprint=_digest(fingerprint, "kept"))
    return kept.remove_columns("error")


def _layout_features():
    from datasets import Features, Sequence, Value

    ints = Sequence(Value("int64"))
    return Features(
        {
            "prompt_ids": ints,
            "canvas_ids": ints,
            "fixed": Sequence(Value("bool")),
            "content_length": Value("int64"),
            "char_starts": ints,
            "canvas_length": Value("int64"),
            "error": Value("string"),
        }
    )


def _empty_layout() -> dict[str, Any]:
    return {
        "prompt_ids": [],
        "canvas_ids": [],
        "fixed": [],
        "content_length": 0,
        "char_starts": [],
        "canvas_length": None,
    }


# The TokenLayout fields a training layout is stored with (its sampler token rules are not needed for training).
_STORED = ("prompt_ids", "canvas_ids", "fixed", "content_length", "char_starts", "canvas_length")


def row_to_layout(row: dict[str, Any]) -> TokenLayout:
    return TokenLayout(**{name: row[name] for name in _STORED})


class LayoutDataset:
    """A torch map-style dataset over a layouts `datasets.Dataset`: rows become `TokenLayout`s as they are read."""

    def __init__(self, layouts):
        self.layouts = layouts

    def __len__(self) -> int:
        return len(self.layouts)

    def __getitem__(self, i: int) -> TokenLayout:
        return row_to_layout(self.layouts[int(i)])


def build_training_data(task, tokenizer, recipe, canvas_length: int) -> LayoutDataset:
    """The train split's layouts for `ftkit train`; an empty result is an error naming where the data came from."""
    t = recipe.task
    examples = examples_dataset(task, "train", t.train_size, t.seed, t.data_path) if t.train_size > 0 else None
    if examples is None or len(examples) == 0:
        where = t.data_path or f"the {t.name} builder"
        raise FtkitError(f"{where}: the train dataset is empty")
    _say_if_fewer(task, t.data_path, "train", t.train_size, len(examples))
    layouts = load_layouts(task, examples, tokenizer, canvas_length, recipe.train.max_prompt_length)
    if len(layouts) == 0:
        raise FtkitError(f"{t.data_path or t.name}: every train example was skipped (see the warning above)")
    return LayoutDataset(layouts)
