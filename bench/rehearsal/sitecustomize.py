"""The GPU rehearsal's import hook: on `PYTHONPATH`, Python imports this at startup (bench/gpu_check.py puts it there
in `smoke` mode, for every process the rehearsal starts).

The top-level modules named in FTKIT_REHEARSAL_BLOCK_MODULES (comma-separated) become unimportable, and the
distributions in FTKIT_REHEARSAL_BLOCK_DISTS invisible to `importlib.metadata`: the packages installed here that the
device image lacks and the bundle does not carry. To the code that runs they look as they look on the device: absent
(`import x` raises `ModuleNotFoundError: No module named 'x'`, `importlib.util.find_spec("x")` is None), so
optional-dependency checks (transformers' `is_*_available`) answer as they would there.
"""

from __future__ import annotations

import os
import re
import sys

_MODULES = frozenset(m for m in os.environ.get("FTKIT_REHEARSAL_BLOCK_MODULES", "").split(",") if m)
_DISTS = frozenset(d for d in os.environ.get("FTKIT_REHEARSAL_BLOCK_DISTS", "").split(",") if d)


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


class _WithoutBlocked:
    """A meta-path finder wrapped so that it finds no blocked module and no blocked distribution."""

    def __init__(self, finder):
        self._finder = finder

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in _MODULES:
            return None
        find = getattr(self._finder, "find_spec", None)
        return find(name, path, target) if find else None

    def find_distributions(self, *args, **kwargs):
        find = getattr(self._finder, "find_distributions", None)
        for dist in find(*args, **kwargs) if find else ():
            if _canonical(dist.metadata["Name"] or "") not in _DISTS:
                yield dist

    def invalidate_caches(self):
        invalidate = getattr(self._finder, "invalidate_caches", None)
        if invalidate:
            invalidate()

    def __getattr__(self, name):
        return getattr(self._finder, name)


if _MODULES or _DISTS:
    for _name in list(sys.modules):
        if _name.partition(".")[0] in _MODULES:  # nothing should have loaded one yet; make sure of it
            del sys.modules[_name]
    sys.meta_path[:] = [_WithoutBlocked(f) for f in sys.meta_path]
