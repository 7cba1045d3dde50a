"""ftkit.model.compat: the supported transformers range is declared once (pyproject agrees), refused outside it with one
clear error, and the encoder checkpointing keeps the prompt in the cache once whatever the cache argument is called
(transformers 5.24 renamed `past_key_values` to `cache`), or fails loudly."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.version import Version
from torch import nn
from typer.testing import CliRunner

from ftkit.errors import FtkitError
from ftkit.model import compat
from ftkit.model.checkpointing import CheckpointedEncoderLayer
from ftkit.model.mixins import add_mixin

ROOT = Path(__file__).resolve().parent.parent


def test_pyproject_declares_the_supported_range():
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    transformers = [Requirement(d) for d in deps if Requirement(d).name == "transformers"]
    assert len(transformers) == 1 and transformers[0].specifier == compat.SUPPORTED


def test_the_installed_transformers_is_supported():
    compat.check_transformers()


@pytest.mark.parametrize("version", ["5.17.0", "5.20.2", "5.23.0", "5.23.1.dev0"])
def test_versions_in_the_range_pass(version):
    compat.check_transformers(Version(version))


@pytest.mark.parametrize("version", ["5.16.1", "5.24.0", "5.25.0", "6.0.0"])
def test_versions_outside_the_range_are_one_error_naming_it(version):
    with pytest.raises(
        FtkitError,
        match=rf"transformers {version} is not supported: ftkit supports "
        r"transformers<5.24,>=5.17",
    ):
        compat.check_transformers(Version(version))


def test_the_cli_refuses_an_unsupported_transformers_at_startup(monkeypatch):
    from ftkit.cli import app

    monkeypatch.setattr(compat, "transformers_version", lambda: Version("5.24.0"))
    result = CliRunner().invoke(app, ["tasks"])
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines == [
        "error: transformers 5.24.0 is not supported: ftkit supports transformers<5.24,>=5.17 "
        "(pip install 'transformers<5.24,>=5.17')"
    ]


def test_training_arguments_take_the_checkpointing_fields(tmp_path):
    from transformers import TrainingArguments

    args = TrainingArguments(
        output_dir=str(tmp_path), use_cpu=True, **compat.checkpointing_arguments(True, {"use_reentrant": False})
    )
    assert args.gradient_checkpointing is True  # both names on 5.23 (alias), the only one before


class ToyEncoderLayer(nn.Module):
    """An encoder layer as transformers writes one: projects keys/values, writes them into the cache under the
    argument name `cache_name`, attends over what the cache returns."""

    def __init__(self, cache_name: str, writes: int = 1):
        super().__init__()
        self.layer_idx, self.cache_name, self.writes = 0, cache_name, writes
        self.proj = nn.Linear(8, 8)

    def forward(self, hidden_states, **kwargs):
        cache = kwargs[self.cache_name]
        kv = self.proj(hidden_states).unsqueeze(1)  # (batch, heads=1, seq, dim)
        for _ in range(self.writes):
            keys, values = cache.update(kv, kv, self.layer_idx)
        scores = (hidden_states.unsqueeze(1) @ keys.transpose(-1, -2)).softmax(-1)
        return hidden_states + (scores @ values).squeeze(1)


def _checkpointed_step(layer: nn.Module, cache_name: str):
    from transformers import DynamicCache

    add_mixin(layer, CheckpointedEncoderLayer, "Checkpointed")
    layer.train()
    cache = DynamicCache()
    hidden = torch.randn(2, 5, 8, generator=torch.Generator().manual_seed(0), requires_grad=True)
    layer(hidden, **{cache_name: cache}).pow(2).sum().backward()
    return cache


@pytest.mark.parametrize("name", compat.ENCODER_CACHE_ARGUMENTS)
def test_the_cache_holds_the_prompt_once_under_either_argument_name(name):
    layer = ToyEncoderLayer(name)
    cache = _checkpointed_step(layer, name)
    assert cache.get_seq_length(0) == 5
    assert layer.proj.weight.grad is not None


def test_a_cache_under_an_unknown_argument_name_is_refused():
    with pytest.raises(RuntimeError, match="KV cache as 'kv_cache'.*twice"):
        _checkpointed_step(ToyEncoderLayer("kv_cache"), "kv_cache")


def test_a_layer_that_writes_the_cache_twice_is_refused():
    """The length check after the first run: whatever the reason, a cache longer than the prompt stops training."""
    with pytest.raises(RuntimeError, match="cache holds 10 positions after the first run, not the prompt's 5"):
        _checkpointed_step(ToyEncoderLayer("past_key_values", writes=2), "past_key_values")


def test_an_indexed_cpu_map_location_loads(tmp_path):
    """transformers 5.17 resumes a multi-process CPU run's optimizer state with map_location=cpu:0."""
    path = tmp_path / "optimizer.pt"
    torch.save({"exp_avg": torch.arange(3.0)}, path)
    compat.restore_indexed_cpu_locations()
    loaded = torch.load(path, map_location=torch.device("cpu", 0), weights_only=True)
    assert torch.equal(loaded["exp_avg"], torch.arange(3.0)) and loaded["exp_avg"].device.type == "cpu"


def test_a_training_call_without_a_cache_the_layer_could_write_is_refused():
    """The encoder always passes a cache; a layer that reaches one some other way must not be checkpointed blind."""
    layer = ToyEncoderLayer("past_key_values")
    add_mixin(layer, CheckpointedEncoderLayer, "Checkpointed")
    layer.train()
    with pytest.raises(RuntimeError, match="got no KV cache under a name ftkit knows"):
        layer(torch.randn(1, 3, 8, requires_grad=True))
    with torch.no_grad():  # generation-style calls are not checkpointed, so nothing to refuse
        with pytest.raises(KeyError):  # (the toy layer itself needs its cache)
            layer(torch.randn(1, 3, 8))
