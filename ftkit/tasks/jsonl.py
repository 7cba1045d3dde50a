"""Strict reading of a user's JSON Lines file: every error names the file and line."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError


def read_objects(path: str | Path) -> list[tuple[str, dict[str, Any]]]:
    """(`file:line`, object) per non-blank line. Not UTF-8, invalid JSON or a line that is not a JSON object is an
    FtkitError naming the file (and line)."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise FtkitError(f"{path}: not a UTF-8 text file") from None
    out = []
    for lineno, line in enumerate(lines, start=1):
        where = f"{path}:{lineno}"
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise FtkitError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise FtkitError(f"{where}: expected a JSON object, got {type(record).__name__}")
        out.append((where, record))
    return out
