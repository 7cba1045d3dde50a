"""Checkpoint manifests: every file of a checkpoint with its size and sha256, written last (before the checkpoint is
renamed into place), so a checkpoint can be verified before anything reads it.

A manifest does not protect against a crash (the staged rename does that); it catches what happens to a checkpoint
afterwards: a truncated copy, a disk error, a file deleted by hand.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ftkit.run import filecheck
from ftkit.run.paths import RunPaths

FORMAT = 1
# Checked structurally when a checkpoint has no manifest (one written before manifests existed).
KEY_FILES = (*RunPaths.adapter_files(), *RunPaths.TRAINER_STATE)


@dataclass(frozen=True)
class Damage:
    file: str  # relative to the checkpoint
    what: str

    def __str__(self) -> str:
        return f"{self.file}: {self.what}"


def sha256(path: Path) -> str:
    with path.open("rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _files(folder: Path) -> list[str]:
    files = (p for p in folder.rglob("*") if p.is_file() and p.name != RunPaths.MANIFEST)
    return sorted(p.relative_to(folder).as_posix() for p in files)


def write_manifest(folder: Path) -> Path:
    """Hash every file of `folder` and write `manifest.json` there (fsynced): the last file a checkpoint gets."""
    files = {name: {"size": (folder / name).stat().st_size, "sha256": sha256(folder / name)} for name in _files(folder)}
    path = folder / RunPaths.MANIFEST
    with path.open("w", encoding="utf-8") as f:
        json.dump({"format": FORMAT, "files": files}, f, indent=1)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    return path


def verify(folder: Path, only: tuple[str, ...] | None = None) -> Damage | None:
    """The first damaged file of a checkpoint (all its files, or the ones named in `only`), or None if intact."""
    path = folder / RunPaths.MANIFEST
    if not path.is_file():
        return _verify_structure(folder, only)
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        return Damage(RunPaths.MANIFEST, "unreadable")
    for name in only or files:
        entry = files.get(name)
        if entry is None:
            return Damage(name, "not in the manifest")
        file = folder / name
        if not file.is_file():
            return Damage(name, "missing")
        size = file.stat().st_size
        if size != entry["size"]:
            return Damage(name, f"{size} bytes, the manifest says {entry['size']}")
        if sha256(file) != entry["sha256"]:
            return Damage(name, "contents differ from the manifest (sha256)")
    return None


def _verify_structure(folder: Path, only: tuple[str, ...] | None) -> Damage | None:
    """No manifest: the checkpoint predates them. Check what can be checked without one."""
    for name in only or KEY_FILES:
        what = filecheck.problem(folder / name)
        if what:
            return Damage(name, what)
    return None
