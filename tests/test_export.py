"""`ftkit export`: the standalone model computes base + adapter, in the released checkpoint's layout.

Tolerances. An fp32 export differs from the unmerged PEFT model only by the order of fp32 operations (x @ (W + sBA)
instead of x @ W + s(x @ A) @ B): a few units of fp32 rounding (2^-24) per operation, so the logits must agree to
2^-14 of their largest magnitude (1000x the fp32 unit, still 32x below one bf16 rounding, 2^-9). A bf16 export is
the fp32 one rounded once, tensor by tensor: checked bit for bit. The adapter's own effect on the logits is checked
to be far above the tolerance, so a missing or wrong update cannot pass.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny_specs import tiny_dims

from ftkit.errors import FtkitError
from ftkit.export import export_run
from ftkit.model.load import build_tiny, make_fully_trainable
from ftkit.model.lora import attach_lora
from ftkit.recipe import recipe_from_dict

TINY = tiny_dims(32)
FP32_RELATIVE = 2.0**-14


def make_run(root: Path, tokenizer, lora: dict | None = None, full: bool = False, seed: int = 0):
    """A tiny run directory as `ftkit train` leaves it (recipe, tokenizer, base/, adapter or full model, summary),
    with every LoRA tensor random (PEFT starts lora_B at zero, which would hide a missing update). Returns the run
    and the trained model (PEFT, fp32) that the export must reproduce."""
    run = root / "run"
    run.mkdir(parents=True)
    data = {
        "model": {"base": "tiny", "dtype": "float32", "tiny": TINY},
        "lora": {"r": 4, "alpha": 8, "dense_mlp": True, **(lora or {})},
        "train": {"output_dir": str(run), "trainable": "full" if full else "lora"},
        "task": {"name": "sudoku"},
        "eval": {"steps": 12, "entropy_bound": 0.25, "temperature_max": 0.5},
    }
    recipe = recipe_from_dict(data)
    (run / "recipe.yaml").write_text(recipe.to_yaml())
    tokenizer.save_pretrained(run)
    base = build_tiny(recipe.model.tiny, tokenizer)
    base.save_pretrained(run / "base")  # a preset run keeps its random-init base, full runs included
    g = torch.Generator().manual_seed(seed)
    if full:
        model = make_fully_trainable(copy.deepcopy(base))
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=g) * 0.02)
        model.save_pretrained(run)
    else:
        model = attach_lora(copy.deepcopy(base), recipe.lora)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.save_pretrained(run)
    (run / "summary.json").write_text(json.dumps({"steps": 6, "loss_start": 5.0, "loss_end": 3.0}))
    return run, base.eval(), model.eval()


def probe(tokenizer, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, len(tokenizer), (2, 7), generator=g)
    canvas = torch.randint(3, len(tokenizer), (2, TINY["canvas_length"]), generator=g)
    return dict(input_ids=ids, attention_mask=torch.ones_like(ids), decoder_input_ids=canvas)


def load_export(folder: Path, dtype=torch.float32):
    from transformers import DiffusionGemmaForBlockDiffusion

    model, info = DiffusionGemmaForBlockDiffusion.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def assert_logits_match(export_dir, reference, base, tokenizer):
    inputs = probe(tokenizer)
    with torch.no_grad():
        want, got, before = reference(**inputs).logits, load_export(export_dir)(**inputs).logits, base(**inputs).logits
    scale = want.abs().max()
    assert (got - want).abs().max() <= FP32_RELATIVE * scale
    assert (want - before).abs().max() > 100 * FP32_RELATIVE * scale  # the adapter matters


@pytest.mark.parametrize(
    "lora,form",
    [({}, "untied"), ({"shared_stacks": True}, "tied"), ({"encoder": False}, "untied")],
    ids=["separate-stacks", "shared-stacks", "decoder-only"],
)
def test_export_computes_base_plus_adapter(tmp_path, char_tokenizer, lora, form):
    """Attention, dense-MLP and expert LoRA, merged: from_pretrained(OUT) gives the PEFT model's logits."""
    run, base, model = make_run(tmp_path, char_tokenizer, lora)
    record = export_run(run, tmp_path / "fp32", dtype="float32")
    assert record["form"] == form and record["weights"] == "adapter"
    config = json.loads((tmp_path / "fp32" / "config.json").read_text())
    assert config["tie_word_embeddings"] is (form == "tied")
    assert_logits_match(tmp_path / "fp32", model, base, char_tokenizer)

    # bf16: the same merged values, each rounded once (small shards: the index path too).
    export_run(run, tmp_path / "bf16", max_shard_size="64KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    full_precision, rounded = tensors(tmp_path / "fp32"), tensors(tmp_path / "bf16")
    assert rounded.keys() == full_precision.keys()
    assert all(torch.equal(rounded[k], full_precision[k].to(torch.bfloat16)) for k in rounded)
    assert load_export(tmp_path / "bf16", dtype="auto").dtype == torch.bfloat16


def test_expert_and_linear_updates_are_pefts(tmp_path, char_tokenizer):
    """Each merged tensor minus its base is PEFT's own get_delta_weight (rank pattern included)."""
    from peft.tuners.lora import LoraLayer

    run, base, model = make_run(tmp_path, char_tokenizer, {"expert_r": 2})
    export_run(run, tmp_path / "out", dtype="float32")
    merged, original = tensors(tmp_path / "out"), base.state_dict()
    checked = 0
    for name, module in model.named_modules():
        if not isinstance(module, LoraLayer):
            continue
        owner = name.removeprefix("base_model.model.").replace(".base_layer", "")
        key = f"{owner}.{getattr(module, 'parameter_name', 'weight')}"
        want = module.get_delta_weight("default")
        got = merged[key] - original[key]
        assert torch.allclose(got, want, rtol=1e-5, atol=FP32_RELATIVE * want.abs().max().item()), key
        checked += 1
    # Both stacks, each layer: q/k/v/o, gate/up/down, the two expert tensors; the full-attention layer has no v_proj.
    assert checked == 2 * (TINY["layers"] * (4 + 3 + 2) - 1)


def test_layout_is_transformers_own_key_for_key(tmp_path, char_tokenizer):
    """Keys and shapes: the tied export = what save_pretrained writes for the (tied) base; the untied export = what
    it writes for the same model with tie_word_embeddings false."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from ftkit.model.arch import untie

    shapes = lambda d: {k: tuple(v.shape) for k, v in tensors(d).items()}  # noqa: E731
    run, base, _ = make_run(tmp_path, char_tokenizer, {"shared_stacks": True})
    export_run(run, tmp_path / "tied")
    base.save_pretrained(tmp_path / "reference-tied")
    assert shapes(tmp_path / "tied") == shapes(tmp_path / "reference-tied")

    run2, _, _ = make_run(tmp_path / "b", char_tokenizer)
    export_run(run2, tmp_path / "untied")
    untied = DiffusionGemmaForBlockDiffusion(untie(copy.deepcopy(base.config)))
    untied.save_pretrained(tmp_path / "reference-untied")
    assert shapes(tmp_path / "untied") == shapes(tmp_path / "reference-untied")
    assert len(shapes(tmp_path / "untied")) > len(shapes(tmp_path / "tied"))


def test_full_run_exports_as_it_is_tied(tmp_path, char_tokenizer):
    run, _, model = make_run(tmp_path, char_tokenizer, full=True)
    record = export_run(run, tmp_path / "out", dtype="float32")
    assert record["form"] == "tied" and record["weights"] == "full"
    inputs = probe(char_tokenizer)
    with torch.no_grad():
        assert torch.equal(load_export(tmp_path / "out")(**inputs).logits, model(**inputs).logits)


def test_generation_config_tokenizer_and_card(tmp_path, char_tokenizer):
    from transformers import AutoTokenizer
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import DiffusionGemmaGenerationConfig

    run, _, _ = make_run(tmp_path, char_tokenizer, {"shared_stacks": True})
    export_run(run, tmp_path / "out")
    gen = DiffusionGemmaGenerationConfig.from_pretrained(tmp_path / "out")
    assert (gen.max_denoising_steps, gen.sampler_config.entropy_bound, gen.t_min, gen.t_max) == (12, 0.25, 0.0, 0.5)
    assert (gen.stability_threshold, gen.confidence_threshold) == (3, 0.05)
    assert AutoTokenizer.from_pretrained(tmp_path / "out")("ab").input_ids == char_tokenizer("ab").input_ids
    card = (tmp_path / "out" / "README.md").read_text()
    assert "library_name: transformers" in card and "**tied**" in card and "Not evaluated" in card
    manifest = json.loads((tmp_path / "out" / "ftkit_export.json").read_text())
    assert set(manifest["files"]) == {p.name for p in (tmp_path / "out").iterdir()}


def test_refusals_leave_nothing_behind(tmp_path, char_tokenizer):
    run, _, _ = make_run(tmp_path, char_tokenizer)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(FtkitError, match="exists and is not an empty directory"):
        export_run(run, tmp_path / "busy")
    # A recipe that claims one shared adapter, over an adapter whose stacks differ.
    recipe = (run / "recipe.yaml").read_text().replace("shared_stacks: false", "shared_stacks: true")
    (run / "recipe.yaml").write_text(recipe)
    with pytest.raises(FtkitError, match="not trained with lora.shared_stacks"):
        export_run(run, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["busy", "run"]


def test_cli_exports_and_reports_bad_input_in_one_line(tmp_path, char_tokenizer):
    from typer.testing import CliRunner

    from ftkit.cli import app

    run, _, _ = make_run(tmp_path, char_tokenizer, {"shared_stacks": True})
    result = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "out"), "--max-shard-size", "100KB"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "out" / "model.safetensors.index.json").is_file()
    result = CliRunner().invoke(app, ["export", str(run), str(tmp_path / "out2"), "--dtype", "int8"])
    assert result.exit_code == 2 and "--dtype 'int8': expected one of bfloat16, float16, float32" in result.output
    assert not (tmp_path / "out2").exists()
