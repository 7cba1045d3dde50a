"""Every difference between the transformers releases ftkit supports, in one place.

ftkit supports transformers `SUPPORTED` (pyproject.toml says the same; tests/test_compat.py checks that). 5.17 is
the floor because Unsloth 2026.10 (the first with DiffusionGemma's FastDiffusionModel) caps transformers there and
the GPU image carries it; 5.24 is the ceiling because it renamed the encoder layer's cache argument. Inside the
range the differences are, each detected by the feature itself (never by comparing version numbers elsewhere):

- 5.23 renamed gradient checkpointing to activation checkpointing: `TrainingArguments(activation_checkpointing=,
  activation_checkpointing_kwargs=)` and `model.activation_checkpointing_enable/disable` (5.17-5.22 have only the
  `gradient_checkpointing*` names; 5.23 keeps them as deprecated aliases). `checkpointing_arguments`,
  `enable_decoder_checkpointing` and `disable_decoder_checkpointing` pick whichever the installed release has.
- The encoder layer's cache argument: `past_key_values` through 5.23, `cache` from 5.24 on (ftkit.model.checkpointing
  finds it by either name, via `ENCODER_CACHE_ARGUMENTS`, and refuses a cache it cannot find).
- transformers 5.17 (fixed in 5.18) resumes a multi-process CPU run's optimizer state with `map_location=cpu:N`,
  which torch cannot restore; `restore_indexed_cpu_locations` teaches torch.load that location.

A release outside the range is refused at startup by `check_transformers` with one error naming the range.
"""

from __future__ import annotations

import importlib.metadata

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from ftkit.errors import FtkitError

SUPPORTED = SpecifierSet(">=5.17,<5.24")

# The names under which an encoder layer's forward receives the KV cache it writes the prompt into.
ENCODER_CACHE_ARGUMENTS = ("past_key_values", "cache")


def transformers_version() -> Version:
    return Version(importlib.metadata.version("transformers"))


def check_transformers(version: Version | None = None) -> None:
    """Refuse a transformers release outside the supported range, before anything loads."""
    version = transformers_version() if version is None else version
    if version.release and Version(".".join(map(str, version.release))) in SUPPORTED:  # 5.23.0.dev0 counts as 5.23
        return
    raise FtkitError(
        f"transformers {version} is not supported: ftkit supports transformers{SUPPORTED} "
        f"(pip install 'transformers{SUPPORTED}')"
    )


def _has_activation_checkpointing() -> bool:
    from transformers import PreTrainedModel

    return hasattr(PreTrainedModel, "activation_checkpointing_enable")


def checkpointing_arguments(on: bool, kwargs: dict | None) -> dict:
    """The TrainingArguments fields that turn the Trainer's (decoder) checkpointing on, under this release's names."""
    import dataclasses

    from transformers import TrainingArguments

    fields = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation" if "activation_checkpointing" in fields else "gradient"
    return {f"{prefix}_checkpointing": on, f"{prefix}_checkpointing_kwargs": kwargs}


def enable_decoder_checkpointing(model, **checkpoint_kwargs) -> None:
    """transformers' own checkpointing of the layers it can checkpoint (DiffusionGemma: the decoder's)."""
    if _has_activation_checkpointing():
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=checkpoint_kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=checkpoint_kwargs)


def disable_decoder_checkpointing(model) -> None:
    if _has_activation_checkpointing():
        model.activation_checkpointing_disable()
    else:
        model.gradient_checkpointing_disable()


_INDEXED_CPU_RESTORE = False


def restore_indexed_cpu_locations() -> None:
    """Let torch.load take `map_location=torch.device("cpu", N)`: transformers 5.17 (fixed in 5.18) resumes a
    multi-process CPU run's optimizer state with the process's device, `cpu:0`, which torch's own deserializers
    refuse ("don't know how to restore data location ... (tagged with cpu:0)"). Storages for an indexed CPU device
    stay on the CPU; every other location is left to torch. Idempotent."""
    global _INDEXED_CPU_RESTORE
    if _INDEXED_CPU_RESTORE:
        return
    import re

    import torch

    def restore(obj, location: str):
        return obj if re.fullmatch(r"cpu:\d+", location) else None

    torch.serialization.register_package(100, lambda obj: None, restore)
    _INDEXED_CPU_RESTORE = True
