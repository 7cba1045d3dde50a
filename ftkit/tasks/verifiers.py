"""Checkers for user data, selected in a recipe (`task.options.verifier` of the chat task).

Each returns `Violation`s whose positions are character offsets into the answer, so verifier-guided re-noising
(`eval.verifier_renoise`) re-noises the characters at fault, as it does for the built-in tasks:

- `exact`: the answer equals the reference. With `answer_regex` (e.g. GSM8K's `####\\s*(.+)`), only the extracted
  answers are compared (the last match; its first group, else the whole match), after normalizing whitespace and,
  for numbers, commas and a trailing `.0`. A missing answer points at the end of the output, a wrong one at itself.
- `regex`: the whole answer must match `pattern` (a full match). The violation starts where the longest prefix that
  can still match ends (the `regex` package's partial matching).
- `json_schema`: the answer must be JSON valid against `schema` (the `jsonschema` library); each schema violation
  points at the characters of the field it is about.
- `python:module:function`: your own checker, `function(output: str, example: Example)` returning True/False, a
  list of `Violation`s, or a list of (constraint, detail, positions) tuples.
- `none`: accept everything (metrics then only compare with the reference).

An input typed into `ftkit generate` has no reference (`example.answer` is empty): `exact` then only checks that an
answer can be extracted.
"""

from __future__ import annotations

import importlib
import json
import re
from collections.abc import Callable
from json.decoder import scanstring
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.tasks.base import Example, Violation

Checker = Callable[[str, Example], list[Violation]]
KINDS = ("exact", "regex", "json_schema", "none")
PAST_END = 8  # positions after the text a checker may name: the answer should continue there


def _after(output: str) -> tuple[int, ...]:
    return tuple(range(len(output), len(output) + PAST_END))


# ----------------------------------------------------------------------------------------------------------------
# exact


_NUMBER = re.compile(r"[-+]?\d+(\.\d+)?")


def normalize_answer(text: str) -> str:
    """Whitespace collapsed; a number loses thousands separators, a leading $ and a trailing `.0`/`.`."""
    text = " ".join(text.split())
    number = text.replace(",", "").removeprefix("$").rstrip(".")
    if _NUMBER.fullmatch(number):
        value = float(number)
        return str(int(value)) if value.is_integer() else repr(value)
    return text


class ExactChecker:
    def __init__(self, answer_regex: str | None):
        self.pattern = _compile(answer_regex, "task.options.answer_regex") if answer_regex else None

    def extract(self, text: str) -> tuple[str, tuple[int, int]] | None:
        """(the answer, its character span) or None; the whole stripped text without `answer_regex`."""
        if self.pattern is None:
            stripped = text.strip()
            start = text.find(stripped) if stripped else len(text)
            return stripped, (start, start + len(stripped))
        matches = list(self.pattern.finditer(text))
        if not matches:
            return None
        last = matches[-1]
        group = 1 if self.pattern.groups else 0
        return last.group(group).strip(), last.span(group)

    def __call__(self, output: str, example: Example) -> list[Violation]:
        got = self.extract(output)
        if got is None:
            last_line = output.rfind("\n") + 1
            return [
                Violation(
                    "answer_format",
                    f"no answer matching {self.pattern.pattern!r}",
                    tuple(range(last_line, len(output))) + _after(output),
                )
            ]
        if not example.answer:  # a typed-in input: nothing to compare with
            return []
        want = self.extract(example.answer)
        if want is None:
            raise FtkitError(
                f"example {example.id}: the reference answer has no match of "
                f"task.options.answer_regex={self.pattern.pattern!r}"
            )
        if normalize_answer(got[0]) != normalize_answer(want[0]):
            start, end = got[1]
            return [
                Violation(
                    "answer",
                    f"answer {got[0][:60]!r}, expected {want[0][:60]!r}",
                    tuple(range(start, end)) or _after(output),
                )
            ]
        return []


# ----------------------------------------------------------------------------------------------------------------
# regex


class RegexChecker:
    def __init__(self, pattern: str | None):
        if not pattern:
            raise FtkitError("task.options.pattern: the regex verifier needs a pattern (the whole answer must match)")
        import regex

        try:
            self.pattern = regex.compile(pattern)
        except regex.error as e:
            raise FtkitError(f"task.options.pattern: not a valid regular expression: {e}") from None

    def matching_prefix(self, output: str) -> int:
        """The length of the longest prefix of `output` that a longer string could still complete to a match."""
        lo, hi = 0, len(output)  # prefix lo can still match (the empty prefix may not: then 0 is reported anyway)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if self.pattern.fullmatch(output[:mid], partial=True):
                lo = mid
            else:
                hi = mid - 1
        return lo

    def __call__(self, output: str, example: Example) -> list[Violation]:
        if self.pattern.fullmatch(output):
            return []
        k = self.matching_prefix(output)
        where = tuple(range(k, len(output))) if k < len(output) else _after(output)
        detail = f"does not match {self.pattern.pattern[:80]!r} " + (
            f"from character {k + 1} on" if k < len(output) else "(it stops short)"
        )
        return [Violation("pattern", detail, where)]


# ----------------------------------------------------------------------------------------------------------------
# json_schema


def value_spans(text: str) -> dict[tuple, tuple[int, int]]:
    """For valid JSON `text`: the character span of every value, by its path (keys and list indices)."""
    decoder = json.JSONDecoder()
    spans: dict[tuple, tuple[int, int]] = {}

    def skip(i: int) -> int:
        while i < len(text) and text[i] in " \t\n\r":
            i += 1
        return i

    def value(i: int, path: tuple) -> int:
        i = skip(i)
        start = i
        if text[i] in "{[":
            closing, index = ("}" if text[i] == "{" else "]"), 0
            i = skip(i + 1)
            while text[i] != closing:
                if closing == "}":
                    key, i = scanstring(text, i + 1)
                    i = value(skip(i) + 1, path + (key,))  # past the ':'
                else:
                    i = value(i, path + (index,))
                    index += 1
                i = skip(i)
                if text[i] == ",":
                    i = skip(i + 1)
            i += 1
        else:
            _, i = decoder.raw_decode(text, i)
        spans[path] = (start, i)
        return i

    value(0, ())
    return spans


class JsonSchemaChecker:
    def __init__(self, schema: str | dict | None):
        import jsonschema

        if schema is None:
            raise FtkitError("task.options.schema: the json_schema verifier needs a schema (a .json file or a mapping)")
        if isinstance(schema, str):
            path = Path(schema)
            if not path.is_file():
                raise FtkitError(f"task.options.schema: {schema}: file not found")
            try:
                schema = json.loads(path.read_text(encoding="utf-8"))
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise FtkitError(f"task.options.schema: {path}: not a JSON file ({e})") from None
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as e:
            raise FtkitError(f"task.options.schema: not a valid JSON Schema: {e.message}") from None
        self.validator = cls(schema)

    def __call__(self, output: str, example: Example) -> list[Violation]:
        try:
            document = json.loads(output)
        except json.JSONDecodeError as e:
            where = tuple(range(e.pos, len(output))) if e.pos < len(output) else _after(output)
            return [Violation("json", f"not JSON: {e.msg} at character {e.pos + 1}", where)]
        spans = value_spans(output)
        out = []
        for error in sorted(self.validator.iter_errors(document), key=lambda err: list(err.absolute_path)):
            path = tuple(error.absolute_path)
            start, end = spans.get(path, (0, len(output)))
            field = "/".join(str(p) for p in path) or "(the document)"
            out.append(Violation("schema", f"{field}: {error.message[:200]}", tuple(range(start, end))))
        return out


# ----------------------------------------------------------------------------------------------------------------
# python: module:function


class PythonChecker:
    def __init__(self, spec: str):
        target = spec.split(":", 1)[1].strip()
        module_name, _, function = target.partition(":")
        if not module_name or not function:
            raise FtkitError(f"task.options.verifier={spec!r}: expected python:module:function")
        try:
            module = importlib.import_module(module_name)
        except ImportError as e:
            raise FtkitError(
                f"task.options.verifier={spec!r}: cannot import {module_name!r} ({e}); the module must be "
                "importable by Python: installed, or in a directory on PYTHONPATH (for my_checks.py "
                "beside your recipe: `PYTHONPATH=. ftkit train ...` from that directory)"
            ) from None
        self.function = getattr(module, function, None)
        if not callable(self.function):
            raise FtkitError(f"task.options.verifier={spec!r}: {module_name} has no function {function!r}")
        self.spec = spec

    def __call__(self, output: str, example: Example) -> list[Violation]:
        try:
            verdict = self.function(output, example)
        except Exception as e:  # the user's code: any failure is reported as theirs, by name
            raise FtkitError(f"{self.spec} raised {type(e).__name__} on example {example.id}: {e}") from None
        if verdict is True or verdict is None:
            return []
        if verdict is False:
            return [Violation("python", f"{self.spec} rejected the answer", tuple(range(len(output))))]
        out = []
        for item in verdict:
            if isinstance(item, Violation):
                out.append(item)
            elif isinstance(item, (tuple, list)) and len(item) == 3:
                out.append(Violation(str(item[0]), str(item[1]), tuple(int(p) for p in item[2])))
            else:
                raise FtkitError(
                    f"{self.spec}: expected True/False or a list of Violation or (constraint, detail, "
                    f"positions) tuples, got {item!r}"
                )
        return out


def _compile(pattern: str, key: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise FtkitError(f"{key}: not a valid regular expression: {e}") from None


def make_checker(
    kind: str,
    *,
    answer_regex: str | None = None,
    pattern: str | None = None,
    schema: str | dict[str, Any] | None = None,
) -> Checker:
    """The checker named `kind` (exact, regex, json_schema, python:module:function, none); errors name the key."""
    if kind == "exact":
        return ExactChecker(answer_regex)
    if kind == "regex":
        return RegexChecker(pattern)
    if kind == "json_schema":
        return JsonSchemaChecker(schema)
    if kind.startswith("python:"):
        return PythonChecker(kind)
    if kind == "none":
        return lambda output, example: []
    raise FtkitError(f"task.options.verifier={kind!r}: expected one of {', '.join(KINDS)} or python:module:function")
