"""`model.loader: unsloth`: the base loads through Unsloth's FastDiffusionModel (its 4-bit loading included), then
ftkit's expert quantization and expert LoRA apply as on the default path; what the combination cannot honour is a
recipe error.

The recipe checks run everywhere. The loading tests need Unsloth (`pip install -e ".[unsloth]"`, README): they are
skipped without it, except where FTKIT_REQUIRE_UNSLOTH=1 (CI's Unsloth environment, .ci/run), which makes a missing
or broken Unsloth a failure instead of a skip."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from tiny_specs import QUANT_TINY, tiny_spec

from ftkit.errors import FtkitError, RecipeError
from ftkit.recipe import LoraSection, ModelSection, QuantSection, recipe_from_dict

TINY_SUDOKU = str(Path(__file__).resolve().parent.parent / "recipes" / "tiny" / "sudoku.yaml")
REQUIRED = os.environ.get("FTKIT_REQUIRE_UNSLOTH") == "1"
needs_unsloth = pytest.mark.skipif(
    importlib.util.find_spec("unsloth") is None and not REQUIRED,
    reason="Unsloth is not installed (pip install -e '.[unsloth]'; CI's Unsloth environment runs these)",
)

# Widths that are multiples of 32 where bitsandbytes' CPU 4-bit kernel needs it (as tests/test_quant_load.py).
SPEC = tiny_spec(96, base=QUANT_TINY, experts=32)
LORA = LoraSection(r=4, alpha=8, attention=True, experts=True, dense_mlp=True)


def _recipe(model=None, quant=None):
    return {
        "model": {"base": "tiny", "dtype": "float32", **(model or {})},
        "quant": quant or {},
        "task": {"name": "sudoku"},
    }


@pytest.mark.parametrize(
    "model, quant, key",
    [
        ({}, {"mode": "8bit"}, "quant.mode"),
        ({"loader": "unsloth"}, {"mode": "4bit", "quant_type": "fp4", "compute_dtype": "float32"}, "quant.quant_type"),
        (
            {"loader": "unsloth"},
            {"mode": "4bit", "double_quant": False, "compute_dtype": "float32"},
            "quant.double_quant",
        ),
        ({"loader": "unsloth"}, {"mode": "4bit", "compute_dtype": "bfloat16"}, "quant.compute_dtype"),
    ],
)
def test_what_unsloth_loading_cannot_honour_is_refused(model, quant, key):
    with pytest.raises(RecipeError, match=rf"`{key}`"):
        recipe_from_dict(_recipe(model, quant))


def test_unsloth_loading_it_can_honour_validates():
    assert recipe_from_dict(_recipe({"loader": "unsloth"}, {"mode": "8bit"})).quant.mode == "8bit"
    assert recipe_from_dict(_recipe({"loader": "unsloth"}, {"mode": "4bit", "compute_dtype": "float32"}))


def test_a_missing_unsloth_is_one_clear_error(monkeypatch):
    from ftkit.model.load import import_fast_diffusion_model

    monkeypatch.setitem(sys.modules, "unsloth", None)  # `import unsloth` raises ImportError
    with pytest.raises(FtkitError, match=r"model.loader=unsloth: Unsloth .*pip install -e \"\.\[unsloth\]\""):
        import_fast_diffusion_model()


@pytest.fixture(scope="module")
def base_dir(char_tokenizer, tmp_path_factory):
    from ftkit.model.load import build_tiny

    path = tmp_path_factory.mktemp("unsloth-base")
    build_tiny(SPEC, char_tokenizer).save_pretrained(path)
    return path


def _step_grads(model, char_tokenizer) -> dict[str, torch.Tensor]:
    """One diffusion-loss backward on a Sudoku batch; the trainable tensors' gradients."""
    from ftkit.diffusion.loss import diffusion_loss
    from ftkit.diffusion.token_layout import collate, layout_example
    from ftkit.recipe import DiffusionSection
    from ftkit.tasks.sudoku import SudokuTask

    task = SudokuTask()
    exs = task.build_dataset("test", 2, 0)
    batch = collate(
        [layout_example(char_tokenizer, task.to_prompt_canvas(e), SPEC.canvas_length, 256) for e in exs],
        char_tokenizer.pad_token_id,
    )
    model.train()
    out = diffusion_loss(model, batch, DiffusionSection(loss_chunk=0), torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    out.loss.backward()
    return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


@needs_unsloth
def test_unsloth_loads_the_same_weights_and_ftkit_lora_trains_the_experts(base_dir, char_tokenizer):
    from transformers import DiffusionGemmaForBlockDiffusion

    from ftkit.model.load import load_with_unsloth
    from ftkit.model.lora import attach_lora

    model = load_with_unsloth(
        str(base_dir), ModelSection(base=str(base_dir), dtype="float32", loader="unsloth"), QuantSection()
    )
    assert getattr(model, "_unsloth_slow_diffusion", False)  # it really went through FastDiffusionModel
    assert model.config._attn_implementation == "sdpa"  # the recipe's, not Unsloth's default (eager)
    reference = DiffusionGemmaForBlockDiffusion.from_pretrained(base_dir, dtype=torch.float32).state_dict()
    loaded = model.state_dict()
    assert loaded.keys() == reference.keys() and all(torch.equal(loaded[k], reference[k]) for k in reference)
    assert not any(p.requires_grad for p in model.parameters())
    grads = _step_grads(attach_lora(model, LORA), char_tokenizer)
    expert_lora = [g for n, g in grads.items() if ".experts." in n and "lora_B" in n]  # lora_A: 0 at B=0
    assert expert_lora and all(g is not None and g.abs().sum() > 0 for g in expert_lora)


@needs_unsloth
def test_checkpointing_both_stacks_keeps_the_gradients_after_unsloth_patched_transformers(base_dir, char_tokenizer):
    """Importing Unsloth patches transformers' gradient checkpointing; ftkit's (decoder through transformers, encoder
    its own) must still give the unchecked step's loss and gradients."""
    from ftkit.model.checkpointing import set_gradient_checkpointing
    from ftkit.model.load import load_with_unsloth
    from ftkit.model.lora import attach_lora

    model = load_with_unsloth(
        str(base_dir), ModelSection(base=str(base_dir), dtype="float32", loader="unsloth"), QuantSection()
    )
    model = attach_lora(model, LORA)
    with torch.no_grad():  # PEFT starts lora_B at zero, which would hide most gradient paths
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    plain = {n: g.clone() for n, g in _step_grads(model, char_tokenizer).items()}
    model.zero_grad()
    set_gradient_checkpointing(model, True)
    checkpointed = _step_grads(model, char_tokenizer)
    assert checkpointed.keys() == plain.keys()
    for name, g in plain.items():
        assert torch.allclose(checkpointed[name], g, rtol=1e-4, atol=1e-7), name


@needs_unsloth
def test_unsloth_4bit_then_ftkit_nf4_experts_and_expert_lora(base_dir, char_tokenizer, monkeypatch):
    """Unsloth's bitsandbytes 4-bit linears (on the CPU here, as tests/test_quant_load.py runs ftkit's), the experts
    it leaves dense quantized by ftkit, and the expert LoRA bound to them."""
    import bitsandbytes as bnb

    from ftkit.model.load import load_with_unsloth
    from ftkit.model.lora import attach_lora
    from ftkit.model.quant import expert_storage

    monkeypatch.setattr("ftkit.model.load.quant_device", lambda: torch.device("cpu"))
    quant = QuantSection(mode="4bit", compute_dtype="float32")
    model = load_with_unsloth(str(base_dir), ModelSection(base=str(base_dir), dtype="float32", loader="unsloth"), quant)
    core = model.model
    layer = core.decoder.layers[0]
    assert isinstance(layer.self_attn.q_proj, bnb.nn.Linear4bit)
    assert isinstance(core.encoder.language_model.layers[0].mlp.down_proj, bnb.nn.Linear4bit)
    assert not isinstance(layer.router.proj, bnb.nn.Linear4bit)  # Unsloth keeps the router dense, as ftkit does
    assert len(expert_storage(model)) == 2 * SPEC.layers  # gate_up + down per layer, tied across the stacks
    grads = _step_grads(attach_lora(model, LORA), char_tokenizer)
    expert_lora = [g for n, g in grads.items() if ".experts." in n and "lora_B" in n]  # lora_A: 0 at B=0
    assert expert_lora and all(g is not None and g.abs().sum() > 0 for g in expert_lora)


@needs_unsloth
def test_tiny_sudoku_trains_and_evaluates_with_the_unsloth_loader(tmp_path):
    from typer.testing import CliRunner

    from ftkit.cli import app

    run = tmp_path / "run"
    runner = CliRunner()
    trained = runner.invoke(
        app,
        [
            "train",
            TINY_SUDOKU,
            "model.loader=unsloth",
            "train.max_steps=3",
            "task.train_size=8",
            "train.batch_size=4",
            "train.logging_steps=1",
            "train.save_steps=3",
            "eval.num_examples=2",
            "eval.steps=2",
            f"train.output_dir={run}",
        ],
    )
    assert trained.exit_code == 0, trained.output
    assert "FastDiffusionModel" in trained.output  # Unsloth's own load banner
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["loss_end"] is not None
    evaluated = runner.invoke(app, ["eval", str(run)])
    assert evaluated.exit_code == 0, evaluated.output
    assert "FastDiffusionModel" in evaluated.output  # the run's recipe loads its base through Unsloth again
    assert "cell_accuracy" in (run / "eval.json").read_text()
