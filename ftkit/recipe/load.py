"""A YAML recipe -> a validated `Recipe`: read the file, apply the command line's `a.b=value` overrides, fill a
preset's dimensions, build the typed sections (`ftkit.recipe.coerce`) and check them (`ftkit.recipe.validate`)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from ftkit.errors import RecipeError
from ftkit.recipe.coerce import build_dataclass, shown
from ftkit.recipe.schema import PRESETS, TINY, Recipe
from ftkit.recipe.validate import validate


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    data = read_yaml(path)
    if data is None:
        # All defaults would mean the 26B hub model and its download: never what an empty file meant.
        raise RecipeError(
            f"{path}: the recipe file is empty; start from one in recipes/ (e.g. recipes/tiny/sudoku.yaml)"
        )
    return recipe_from_dict(data, where=str(path), overrides=overrides)


def recipe_from_dict(data: Any, where: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: the top level must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
    return validate(build_dataclass(Recipe, _with_preset_dims(data), where), where)


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or e.__class__.__name__
        raise RecipeError(f"{path}:{line}: malformed YAML: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    except ValueError as e:  # PyYAML's constructors raise plain ValueErrors, e.g. for a date like 2001-13-01
        raise RecipeError(f"{path}: malformed YAML value: {e}") from None


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=10` -> (["train", "max_steps"], 10). The value is parsed as YAML (so `null`, `1e-4`,
    `[1,2]`)."""
    text_shown = shown(text)
    if "=" not in text:
        raise RecipeError(f"override `{text_shown}`: expected KEY.PATH=VALUE, e.g. train.max_steps=10")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not key.strip() or any(not p for p in parts):
        raise RecipeError(f"override `{text_shown}`: empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"override `{text_shown}`: value is not valid YAML ({e.__class__.__name__})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override `{shown(text)}`: `{shown('.'.join(parts[: i + 1]))}` is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def _with_preset_dims(data: dict[str, Any]) -> dict[str, Any]:
    """For `model.base: small` (a preset other than tiny, whose values are the schema defaults): the preset's
    dimensions under the `model.tiny` keys the recipe sets. The resolved recipe then states every dimension, so
    reloading it gives the same model."""
    model = data.get("model")
    base = model.get("base") if isinstance(model, dict) else None
    if not isinstance(base, str) or base not in PRESETS or base == TINY:  # a wrong type: build_dataclass names it
        return data
    dims = model.get("tiny")
    if dims is not None and not isinstance(dims, dict):
        return data  # build_dataclass names the wrong type
    preset = dataclasses.asdict(PRESETS[model["base"]])
    return {**data, "model": {**model, "tiny": {**preset, **(dims or {})}}}
