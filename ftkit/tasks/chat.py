"""Chat / instruction data of your own: any `datasets.load_dataset` source, in DiffusionGemma's chat format.

Data: `task.options.dataset` (or `task.data_path`) is a local JSONL / JSON, CSV, Parquet or Arrow file (or a
directory of them, or one written by `Dataset.save_to_disk`), or a Hub dataset id with `config`, `revision` and
the splits to read. Rows are either a `messages` column (a list of {"role", "content"} turns: system, user,
assistant; the last turn is the assistant's answer, the turns before it are the context) or a prompt column and a
completion column named in the recipe (with an optional `system_prompt`). With no `test_split`, a stable
`test_fraction` of the rows (by a hash of their content) is held out for evaluation.

A bad row (missing column value, wrong type, empty answer, a reference without an `answer_regex` match) is an error
naming the file and the row, or, with `on_bad_row: skip`, left out and counted; so is a row whose prompt is over
`train.max_prompt_length` tokens (checked when it is tokenized, see ftkit.tasks.data).

The canvas is the assistant's answer (one free piece); an answer longer than the canvas is trained and generated
block after block (`multi_block`). Answers are checked by the recipe's verifier (ftkit.tasks.verifiers).
"""

from __future__ import annotations

import hashlib
import logging
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ftkit.errors import FtkitError
from ftkit.tasks.base import Example, Piece, PromptCanvas, Violation, register, stratified_means
from ftkit.tasks.verifiers import ExactChecker, make_checker

log = logging.getLogger(__name__)
ROLES = ("system", "developer", "user", "assistant")
LOCAL_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}


@dataclass(frozen=True)
class ChatOptions:
    # A local file or directory (JSONL/JSON, CSV, Parquet, Arrow) or a Hub dataset id; task.data_path also works.
    dataset: str | None = None
    config: str | None = None  # Hub dataset config name (e.g. `main` for openai/gsm8k)
    revision: str | None = None  # Hub dataset revision; pin it so a cached copy cannot go stale
    train_split: str = "train"
    test_split: str | None = None  # null: hold out `test_fraction` of the train split's rows
    test_fraction: float = 0.1
    messages_column: str = "messages"
    prompt_column: str | None = None  # with completion_column: one user turn and the answer per row
    completion_column: str | None = None
    system_prompt: str | None = None  # a system turn before the prompt (prompt/completion rows)
    on_bad_row: Literal["error", "skip"] = "error"
    verifier: str = "exact"  # exact | regex | json_schema | python:module:function | none (ftkit.tasks.verifiers)
    answer_regex: str | None = None  # exact: compare only this regex's first group, e.g. "####\\s*(.+)"
    pattern: str | None = None  # regex: the whole answer must match it
    schema: dict[str, Any] | str | None = None  # json_schema: an inline schema or a .json file


def _hash_fraction(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


class BadRow(ValueError):
    """A row that cannot be an example; the message says why (the caller adds file and row)."""


@register
class ChatTask:
    name = "chat"
    Options = ChatOptions
    multi_block = True  # answers may be longer than one canvas

    def __init__(self, options: ChatOptions | None = None):
        self.options = o = options or ChatOptions()
        if (o.prompt_column is None) != (o.completion_column is None):
            raise FtkitError("task.options: prompt_column and completion_column go together (or use messages_column)")
        if not 0.0 < o.test_fraction < 1.0:
            raise FtkitError("task.options.test_fraction must be in (0, 1)")
        self.checker = make_checker(o.verifier, answer_regex=o.answer_regex, pattern=o.pattern, schema=o.schema)
        self.skip_bad_rows = o.on_bad_row == "skip"

    # -- data
    def data_state(self) -> Any:
        """The local data file's (size, mtime), so an edited file is read again (see ftkit.tasks.data)."""
        from ftkit.tasks.data import file_state

        return file_state(self.options.dataset)

    def build_dataset(self, split: str, size: int, seed: int, data_path: str | None = None) -> list[Example]:
        """`train`, `test` (the test split, or the held-out rows) or `all` (every row of the train split)."""
        o = self.options
        if split not in ("train", "test", "all"):
            raise FtkitError(f"chat: unknown split {split!r} (train, test or all)")
        source = data_path or o.dataset
        if not source:
            raise FtkitError(
                "chat: no data; set task.options.dataset (a data file or a Hub dataset id) or task.data_path"
            )
        own_test_split = split == "test" and o.test_split is not None and not data_path
        if own_test_split and Path(source).is_file():
            raise FtkitError(
                f"task.options.test_split={o.test_split!r}: {source} is a single file, i.e. one split; "
                "hold out rows with task.options.test_fraction instead (test_split: null)"
            )
        table = load_table(source, o.config, o.test_split if own_test_split else o.train_split, o.revision)
        name = Path(source).name if Path(source).exists() else source
        examples, skipped = [], []
        for i, row in enumerate(table):
            where = f"{name} row {i + 1}"
            try:
                turns, answer = self._turns(row)
            except BadRow as e:
                if not self.skip_bad_rows:
                    raise FtkitError(f"{where}: {e}") from None
                skipped.append(f"{where}: {e}")
                continue
            # With a test split of its own, the train split is all training data; else rows are held out by hash.
            held_out = o.test_split is None and _hash_fraction(f"chat/{turns}/{answer}") < o.test_fraction
            if split == "all" or own_test_split or held_out == (split == "test"):
                examples.append(
                    Example(id=where, question={"messages": turns}, answer=answer, meta={"source": name, "row": i + 1})
                )
        if skipped:
            log.warning(
                "%s: skipped %d bad row(s) of %d (task.options.on_bad_row=skip); first: %s",
                name,
                len(skipped),
                len(table),
                skipped[0],
            )
        random.Random(f"chat/{split}/{seed}").shuffle(examples)
        return examples[:size]

    def _turns(self, row: dict[str, Any]) -> tuple[tuple[tuple[str, str], ...], str]:
        """(the context turns, the answer) of a row, or BadRow."""
        o = self.options
        if o.prompt_column is not None:
            prompt, answer = row.get(o.prompt_column), row.get(o.completion_column)
            for key, value in ((o.prompt_column, prompt), (o.completion_column, answer)):
                if value is None:
                    raise BadRow(f"`{key}` is missing")
                if not isinstance(value, str):
                    raise BadRow(f"`{key}` must be a string, got {type(value).__name__}")
            if not prompt.strip():
                raise BadRow(f"`{o.prompt_column}` is empty")
            turns = ((("system", o.system_prompt),) if o.system_prompt else ()) + (("user", prompt),)
        else:
            messages = row.get(o.messages_column)
            if messages is None:
                raise BadRow(f"`{o.messages_column}` is missing")
            if not isinstance(messages, list) or not messages:
                raise BadRow(f"`{o.messages_column}` must be a non-empty list of {{role, content}} turns")
            pairs = []
            for k, turn in enumerate(messages, start=1):
                if (
                    not isinstance(turn, dict)
                    or turn.get("role") not in ROLES
                    or not isinstance(turn.get("content"), str)
                ):
                    raise BadRow(
                        f'`{o.messages_column}` turn {k}: expected {{"role": one of {", ".join(ROLES)}, '
                        f'"content": a string}}, got {str(turn)[:80]}'
                    )
                pairs.append((turn["role"], turn["content"]))
            if pairs[-1][0] != "assistant":
                raise BadRow(
                    f"`{o.messages_column}`: the last turn must be the assistant's answer, got {pairs[-1][0]!r}"
                )
            if not any(role == "user" for role, _ in pairs[:-1]):
                raise BadRow(f"`{o.messages_column}`: no user turn before the answer")
            turns, answer = tuple(pairs[:-1]), pairs[-1][1]
        if not answer.strip():
            raise BadRow("the answer (completion) is empty")
        if (
            isinstance(self.checker, ExactChecker)
            and self.checker.pattern is not None
            and self.checker.extract(answer) is None
        ):
            raise BadRow(f"the answer has no match of task.options.answer_regex={o.answer_regex!r}")
        return turns, answer

    def to_prompt_canvas(self, example: Example) -> PromptCanvas:
        turns = tuple(tuple(t) for t in example.question["messages"])
        return PromptCanvas(prompt=turns[-1][1], pieces=(Piece(example.answer, False),), messages=turns)

    def example_from_input(self, text: str) -> Example:
        """The user's message; the answer is open-ended (generated until the model ends its turn)."""
        if not text.strip():
            raise FtkitError("chat input: the message is empty")
        o = self.options
        turns = ((("system", o.system_prompt),) if o.system_prompt else ()) + (("user", text.strip()),)
        return Example(id="input", question={"messages": turns}, answer="", meta={"source": "input"})

    # -- checking
    def check(self, example: Example, output: str) -> list[Violation]:
        return self.checker(output, example)

    def metrics(self, examples: list[Example], outputs: list[str]) -> dict[str, float]:
        rows = [(self._one(ex, out), None) for ex, out in zip(examples, outputs)]
        return stratified_means(rows, []) if rows else {}

    def _one(self, example: Example, output: str) -> dict[str, float | None]:
        violated = {v.constraint for v in self.check(example, output)}
        row: dict[str, float | None] = {
            "verified": float(not violated),  # the recipe's verifier accepts the answer
            "exact_match": float(output.strip() == example.answer.strip()),
            "nonempty": float(bool(output.strip())),
        }
        if isinstance(self.checker, ExactChecker) and self.checker.pattern is not None:
            row["answer_found"] = float("answer_format" not in violated)
        return row


def load_table(source: str, config: str | None, split: str, revision: str | None):
    """One split of a dataset: a local JSON / JSON Lines file read as it is (`read_json_rows`), anything else through
    `datasets.load_dataset` (a local file or directory, or a Hub id). Every failure is one FtkitError naming the
    source (offline, missing file, no such split, unreadable rows, no rows at all)."""
    path = Path(source)
    if path.is_file() and LOCAL_BUILDERS.get(path.suffix.lower()) == "json":
        rows = read_json_rows(path)
    else:
        rows = _load_with_datasets(source, config, split, revision)
    if len(rows) == 0:
        raise FtkitError(f"{source}: no rows" + (" (the file is empty)" if path.is_file() else f" in split {split!r}"))
    return rows


def read_json_rows(path: Path) -> list[dict[str, Any]]:
    """The rows of a local JSON Lines file (or a JSON array of objects), with their values exactly as written.
    Not through datasets' Arrow reader: a column whose rows mix types (a string here, a number there) becomes a JSON
    column there, and decoding it turns the string "12" of another row into the number 12, so the row check would
    blame a good row and quote a value the file does not hold."""
    import json

    from ftkit.tasks.jsonl import read_objects

    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise FtkitError(f"{path}: not a UTF-8 text file") from None
    if path.suffix.lower() == ".json" and text.lstrip()[:1] == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise FtkitError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        for i, row in enumerate(data, start=1):
            if not isinstance(row, dict):
                raise FtkitError(f"{path}: element {i} of the array is a {type(row).__name__}, expected an object")
        return data
    return [row for _, row in read_objects(path)]


def _load_with_datasets(source: str, config: str | None, split: str, revision: str | None):
    import datasets

    path = Path(source)
    hub_reason = None
    try:
        if path.is_dir() and any(
            (path / f).is_file() for f in ("dataset_dict.json", "dataset_info.json", "state.json")
        ):
            loaded = datasets.load_from_disk(str(path))  # written by save_to_disk
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise FtkitError(f"{source}: no split {split!r} (splits: {', '.join(loaded)})")
                loaded = loaded[split]
            return loaded
        if path.is_file():
            builder = LOCAL_BUILDERS.get(path.suffix.lower())
            if builder is None:
                raise FtkitError(
                    f"{source}: unknown data file type {path.suffix!r} (expected {', '.join(sorted(LOCAL_BUILDERS))})"
                )
            # A single file is all one split: read it whatever the recipe's split names are.
            return datasets.load_dataset(builder, data_files=str(path), split="train")
        if path.is_dir():
            return datasets.load_dataset(str(path), split=split)
        if source.startswith((".", "/", "~")) or path.suffix.lower() in LOCAL_BUILDERS:
            raise FtkitError(f"{source}: data file not found")
        from ftkit.hub.access import offline_reason

        hub_reason = offline_reason()  # the Hub unreachable: the cache only, at once (no minute of retries)
        return datasets.load_dataset(source, config, split=split, revision=revision)
    except FtkitError:
        raise
    except Exception as e:
        if hub_reason is not None:
            from ftkit.hub.access import not_cached

            raise FtkitError(not_cached("task.options.dataset", source, hub_reason)) from None
        if isinstance(e, ValueError):
            raise FtkitError(f"{source}: {_first_line(e)}") from None
        offline = datasets.config.HF_HUB_OFFLINE or "offline" in str(e).lower() or "connect" in str(e).lower()
        if not path.exists() and offline:
            raise FtkitError(
                f"{source}: cannot load it from the Hugging Face Hub (offline or unreachable; a local "
                f"copy works: task.options.dataset=PATH): {_first_line(e)}"
            ) from None
        raise FtkitError(f"{source}: cannot load the dataset ({type(e).__name__}: {_first_line(_root(e))})") from None


def _root(e: BaseException) -> BaseException:
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    return e


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines() or [type(e).__name__])[0][:300]
