"""`lora.shared_stacks`: one adapter for both stacks, as the base weights are one set for both. It trains once
(its gradient is the sum of both stacks' uses), saves as a standard PEFT adapter, reloads tied, runs on 4-bit
experts, and trains, checkpoints and resumes like any run."""

from __future__ import annotations

import copy

import pytest
import torch
from test_train import TINY, crash_and_resume, probe_batch, tiny_recipe

from ftkit.diffusion.loss import diffusion_loss
from ftkit.errors import FtkitError
from ftkit.model.load import build_tiny
from ftkit.model.lora import attach_lora
from ftkit.model.shared_stacks import stacks_share_adapters
from ftkit.recipe import DiffusionSection, LoraSection, PresetSpec, QuantSection, recipe_from_dict
from ftkit.run import rundir
from ftkit.sft.run import train

SEPARATE = LoraSection(r=4, alpha=8, dense_mlp=True)
SHARED = LoraSection(r=4, alpha=8, dense_mlp=True, shared_stacks=True)


def _randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def _batch(tokenizer):
    from ftkit.diffusion.token_layout import collate, layout_example
    from ftkit.tasks.sudoku import SudokuTask

    examples = SudokuTask().build_dataset("test", 2, 0)
    return collate(
        [layout_example(tokenizer, SudokuTask().to_prompt_canvas(e), TINY["canvas_length"], 256) for e in examples],
        tokenizer.pad_token_id,
    )


def test_one_adapter_trains_with_the_sum_of_both_stacks_gradients(char_tokenizer):
    base = build_tiny(PresetSpec(**TINY), char_tokenizer)
    shared = attach_lora(copy.deepcopy(base), SHARED)
    separate = attach_lora(copy.deepcopy(base), SEPARATE)
    assert stacks_share_adapters(shared) and not stacks_share_adapters(separate)
    trainable = lambda m: {n: p for n, p in m.named_parameters() if p.requires_grad}  # noqa: E731
    assert 2 * sum(p.numel() for p in trainable(shared).values()) == sum(
        p.numel() for p in trainable(separate).values()
    )
    _randomize(shared)
    # The separate model holds the same values in both stacks: it computes the same function.
    separate.load_state_dict(shared.state_dict())
    batch = _batch(char_tokenizer)
    for model in (shared, separate):
        diffusion_loss(model, batch, DiffusionSection(), torch.Generator().manual_seed(0)).loss.backward()
    grads = {n: p.grad for n, p in separate.named_parameters() if p.requires_grad}
    for name, p in trainable(shared).items():  # named after the encoder, its first user
        twin = name.replace(".encoder.language_model.layers.", ".decoder.layers.")
        assert twin != name
        assert torch.allclose(p.grad, grads[name] + grads[twin], rtol=1e-4, atol=1e-7), name


def test_saved_adapter_is_standard_and_reloads_tied(char_tokenizer, tmp_path):
    from peft import PeftModel

    base = build_tiny(PresetSpec(**TINY), char_tokenizer)
    shared = attach_lora(copy.deepcopy(base), SHARED)
    _randomize(shared)
    shared.save_pretrained(tmp_path / "shared")
    plain = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path / "shared")  # no ftkit involved
    tied = rundir.load_adapter(copy.deepcopy(base), tmp_path / "shared", trainable=True, shared_stacks=True)
    assert stacks_share_adapters(tied) and not stacks_share_adapters(plain)
    with torch.no_grad():
        want = shared.eval()(**probe_batch()).logits
        assert torch.equal(plain.eval()(**probe_batch()).logits, want)
        assert torch.equal(tied.eval()(**probe_batch()).logits, want)

    separate = attach_lora(copy.deepcopy(base), SEPARATE)
    _randomize(separate)
    separate.save_pretrained(tmp_path / "separate")
    with pytest.raises(FtkitError, match="not trained with one adapter for both stacks"):
        rundir.load_adapter(copy.deepcopy(base), tmp_path / "separate", shared_stacks=True)


def test_shared_adapter_on_4bit_experts(char_tokenizer):
    """Expert LoRA shared on ftkit's 4-bit experts: bound to the quantized forward, tied, and computing what the
    same adapter computes on the dequantized base."""
    from ftkit.model.quant import QuantizedExperts, quantize_experts
    from ftkit.model.quant.lora import quantized_wrapper_class

    spec = PresetSpec(**{**TINY, "hidden": 64, "head_dim": 32, "global_head_dim": 32})
    base = build_tiny(spec, char_tokenizer)
    quantized = copy.deepcopy(base)
    quantize_experts(quantized, QuantSection(mode="4bit", compute_dtype="float32", blocksize=32))
    reference = copy.deepcopy(base)
    with torch.no_grad():
        for q, r in zip(quantized.model.decoder.layers, reference.model.decoder.layers):  # encoder shares them
            for name in ("gate_up_proj", "down_proj"):
                getattr(r.experts, name).copy_(q.experts.storage(name).dequantize(torch.float32))
    outputs = []
    for model in (quantized, reference):
        adapted = attach_lora(model, SHARED)
        _randomize(adapted)
        assert stacks_share_adapters(adapted)
        with torch.no_grad():
            outputs.append(adapted.eval()(**probe_batch()).logits)
        if model is quantized:
            wrappers = [m for m in adapted.modules() if isinstance(m, quantized_wrapper_class())]
            assert wrappers and all(isinstance(w.get_base_layer(), QuantizedExperts) for w in wrappers)
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5, rtol=1e-4)


def _shared_recipe(out, **train_overrides):
    data = tiny_recipe(out, **train_overrides).to_dict()
    data["lora"]["shared_stacks"] = True
    data["train"]["gradient_checkpointing"] = True
    return recipe_from_dict(data)


@pytest.fixture(scope="module")
def shared_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("shared") / "a"
    return out, train(_shared_recipe(out), progress=False)


def test_shared_run_trains_saves_one_adapter_and_evaluates_tied(shared_run):
    out, summary = shared_run
    assert summary["loss_end"] < summary["loss_start"]
    run = rundir.load_run(out)
    assert stacks_share_adapters(run.model)


def test_shared_run_resumes_to_the_uninterrupted_run(shared_run, tmp_path):
    crash_and_resume(_shared_recipe, shared_run[0], tmp_path / "b", "adapter_config.json")


def test_recipe_refuses_shared_stacks_on_one_stack(tmp_path):
    from ftkit.errors import RecipeError

    data = tiny_recipe(tmp_path).to_dict()
    data["lora"].update(shared_stacks=True, encoder=False)
    with pytest.raises(RecipeError, match=r"`lora.shared_stacks` needs `lora.encoder` and `lora.decoder` both true"):
        recipe_from_dict(data)


def test_export_of_a_trained_shared_run_is_tied(shared_run, tmp_path):
    """From a tiny run trained with one adapter: the export keeps the tied layout and computes the run's model."""
    from transformers import DiffusionGemmaForBlockDiffusion

    from ftkit.export import export_run

    out, _ = shared_run
    record = export_run(out, tmp_path / "export", dtype="float32")
    assert record["form"] == "tied"
    run = rundir.load_run(out)
    exported = DiffusionGemmaForBlockDiffusion.from_pretrained(tmp_path / "export", dtype=torch.float32).eval()
    with torch.no_grad():
        want = run.model(**probe_batch()).logits
        got = exported(**probe_batch()).logits
    assert (got - want).abs().max() <= 2.0**-14 * want.abs().max()


@pytest.mark.slow  # an SFT run and an RL run (~45 s under load)
def test_rl_continues_a_shared_adapter_as_one(tmp_path):
    """`ftkit rl` from a shared-stacks SFT run: the copied adapter is re-tied, trained as one, saved with equal
    stacks (so it exports tied), and its reference policy is the SFT adapter (KL 0 at the first step)."""
    from safetensors.torch import load_file
    from test_rl import SevensTask, rl_rows, toy_recipe

    from ftkit.rl.run import rl
    from ftkit.tasks import base as task_base

    shared = {"r": 4, "alpha": 8, "attention": True, "experts": True, "dense_mlp": True, "shared_stacks": True}
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(task_base._REGISTRY, "sevens", SevensTask)
        sft = tmp_path / "sft"
        train(toy_recipe(sft, train={"max_steps": 2, "batch_size": 8, "save_steps": 10}, lora=shared), progress=False)
        out = tmp_path / "rl"
        rl(toy_recipe(out, init_from=sft, lora=shared), progress=False)
    rows = rl_rows(out)
    assert rows[0]["kl"] == 0.0 and rows[-1]["kl"] > 0.0
    saved = load_file(out / "adapter_model.safetensors")
    sft_saved = load_file(sft / "adapter_model.safetensors")
    encoder = sorted(k for k in saved if ".encoder.language_model.layers." in k)
    assert encoder
    for key in encoder:
        twin = key.replace(".encoder.language_model.layers.", ".decoder.layers.")
        assert torch.equal(saved[key], saved[twin]), key
    assert any(not torch.equal(saved[k], sft_saved[k]) for k in encoder)  # it trained
