"""Putting a mixin in front of a live module's class, and taking it away again.

The module keeps its parameters, names and isinstance checks while the mixin overrides a method (the 4-bit experts'
forward, the checkpointed encoder layer's forward). One class is generated per (mixin, class) pair and reused, so
every layer of a model shares it.
"""

from __future__ import annotations

from torch import nn

_CLASSES: dict[tuple[type, type], type] = {}


def add_mixin(module: nn.Module, mixin: type, prefix: str) -> None:
    """Make `module` an instance of `<prefix><its class>(mixin, its class)`; a no-op if it already has the mixin."""
    if isinstance(module, mixin):
        return
    cls = type(module)
    if (mixin, cls) not in _CLASSES:
        _CLASSES[(mixin, cls)] = type(f"{prefix}{cls.__name__}", (mixin, cls), {})
    module.__class__ = _CLASSES[(mixin, cls)]


def remove_mixin(module: nn.Module, mixin: type) -> None:
    """Give `module` back the class `add_mixin` found it with; a no-op if it does not have the mixin."""
    if isinstance(module, mixin):
        module.__class__ = next(cls for (m, cls), made in _CLASSES.items() if m is mixin and made is type(module))
