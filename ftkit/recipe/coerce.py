"""YAML values -> typed dataclasses, checked against the annotations: an unknown key is an error naming its dotted
path (with a "did you mean" suggestion), a wrong type names the key and the expected type. Used for the recipe's
sections and for each task's `Options`."""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from typing import Any, Literal

from ftkit.errors import RecipeError

# PyYAML (YAML 1.1) reads `1e-3` as a string; a plain scientific number is accepted where a float is meant.
SCI_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def type_name(tp: Any) -> str:
    """An annotation as the error messages and the reference name it: `int | null`, `'lora' | 'full'`, `mapping`."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def shown(text: str) -> str:
    """User text as it goes into a one-line error message."""
    return text if text.isprintable() else repr(text)


def build_dataclass(cls: type, data: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Build the frozen dataclass `cls` from a mapping, rejecting unknown keys and wrong types by dotted path."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        key_text = shown(key) if isinstance(key, str) else repr(key)
        path = f"{prefix}.{key_text}" if prefix else key_text
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean `{prefix + '.' if prefix else ''}{close[0]}`?" if close else ""
            raise RecipeError(f"{where}: unknown key `{path}`{hint} (known: {', '.join(names)})")
        kwargs[key] = coerce(value, hints[key], path, where)
    return cls(**kwargs)


def coerce(value: Any, tp: Any, path: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats). Raise naming the key path."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: `{path}` must be a mapping of {tp.__name__} keys, got {type(value).__name__}")
        return build_dataclass(tp, value, where, prefix=path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise RecipeError(f"{where}: `{path}` must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return coerce(value, option, path, where)
            except RecipeError:
                pass
        raise RecipeError(f"{where}: `{path}` expects {type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is not None:
            raise RecipeError(f"{where}: `{path}` expects null, got {value!r}")
        return None
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: `{path}` expects a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    return _scalar(value, tp, path, where)


def _got(value: Any) -> str:
    return f"got {value!r} ({type(value).__name__})"


def _scalar(value: Any, tp: Any, path: str, where: str) -> Any:
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: `{path}` expects bool (true/false), {_got(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: `{path}` expects int, {_got(value)}")
        return value
    if tp is float:
        if isinstance(value, str) and SCI_FLOAT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: `{path}` expects float, {_got(value)}")
        try:
            return float(value)
        except OverflowError:
            raise RecipeError(f"{where}: `{path}` is too large for a float") from None
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: `{path}` expects str, {_got(value)}")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a bug in a schema, not user input
