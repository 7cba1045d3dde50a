"""Is this run file intact? Cheap structural checks that catch a truncated, emptied or deleted file before a library
reads it (and fails with a traceback, or, for a missing local file, goes looking for it on the Hub).

Each check returns None for a good file, else a short description of what is wrong with it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path


def safetensors_problem(path: Path) -> str | None:
    """A safetensors file is an 8-byte header length, a JSON header giving every tensor's byte range, then the data:
    complete exactly when the file is as long as the header says."""
    if not path.is_file():
        return "missing"
    size = path.stat().st_size
    if size < 8:
        return f"truncated ({size} bytes)"
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if 8 + header_len > size:
            return f"truncated ({size} bytes; its header alone needs {8 + header_len})"
        try:
            header = json.loads(f.read(header_len))
        except ValueError:
            return "not a safetensors file (unreadable header)"
    if not isinstance(header, dict):
        return "not a safetensors file (unreadable header)"
    ends = [
        int(v["data_offsets"][1])
        for k, v in header.items()
        if k != "__metadata__" and isinstance(v, dict) and "data_offsets" in v
    ]
    expected = 8 + header_len + max(ends, default=0)
    if size != expected:
        return f"truncated ({size} of {expected} bytes)" if size < expected else f"{size - expected} bytes too long"
    return None


def json_problem(path: Path) -> str | None:
    if not path.is_file():
        return "missing"
    try:
        json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        return f"not valid JSON ({e.__class__.__name__}; truncated?)"
    return None


def nonempty_problem(path: Path) -> str | None:
    if not path.is_file():
        return "missing"
    if path.stat().st_size == 0:
        return "empty"
    return None


def problem(path: Path) -> str | None:
    """The check that fits the file's kind."""
    if path.suffix == ".safetensors":
        return safetensors_problem(path)
    if path.suffix == ".json":
        return json_problem(path)
    return nonempty_problem(path)
