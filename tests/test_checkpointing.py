"""Gradient checkpointing of both stacks: the encoder's KV-cache writes happen once, gradients are unchanged, and
the activations kept for backward shrink."""

import pytest
import torch
from tiny_specs import tiny_spec

from ftkit.diffusion.loss import decoder_inputs, diffusion_loss
from ftkit.diffusion.token_layout import collate, layout_example
from ftkit.model.checkpointing import CheckpointedEncoderLayer, set_gradient_checkpointing
from ftkit.model.load import build_tiny
from ftkit.model.lora import attach_lora
from ftkit.profiling import SavedActivations
from ftkit.recipe import DiffusionSection, LoraSection
from ftkit.tasks.sudoku import SudokuTask

SPEC = tiny_spec(96, layers=3)


@pytest.fixture(scope="module")
def setup():
    from ftkit.model.char_tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    model = attach_lora(build_tiny(SPEC, tok), LoraSection(r=4, alpha=8, dense_mlp=True))
    with torch.no_grad():  # PEFT starts lora_B at zero, which would hide most gradient paths
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    task = SudokuTask()
    exs = task.build_dataset("test", 3, 0)
    batch = collate([layout_example(tok, task.to_prompt_canvas(e), 96, 256) for e in exs], tok.pad_token_id)
    return model, batch


def _set_checkpointing(model, on: bool):
    set_gradient_checkpointing(model, on)
    if on:
        assert all(
            isinstance(layer, CheckpointedEncoderLayer)
            for layer in model.get_base_model().model.encoder.language_model.layers
        )
        assert all(layer.gradient_checkpointing for layer in model.get_base_model().model.decoder.layers)


def _step(model, batch, chunk):
    model.zero_grad()
    with SavedActivations(exclude=model) as saved:
        out = diffusion_loss(
            model, batch, DiffusionSection(loss_chunk=chunk, self_conditioning_p=0.5), torch.Generator().manual_seed(4)
        )
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}
    return out.loss.item(), grads, saved.bytes


@pytest.mark.parametrize("chunk", [0, 32])
def test_both_stacks_checkpointed_give_the_same_loss_and_gradients_with_less_saved(setup, chunk):
    model, batch = setup
    model.train()
    try:
        plain = _step(model, batch, chunk)
        _set_checkpointing(model, True)
        ckpt = _step(model, batch, chunk)
    finally:
        _set_checkpointing(model, False)
        model.eval()
    assert ckpt[0] == pytest.approx(plain[0], rel=1e-6)
    assert plain[1].keys() == ckpt[1].keys()
    assert any(".encoder." in n and "lora_" in n for n in plain[1])  # encoder LoRA gradients are compared too
    for name, g in plain[1].items():
        assert torch.allclose(ckpt[1][name], g, rtol=1e-4, atol=1e-7), name
    assert ckpt[2] < 0.6 * plain[2], (ckpt[2], plain[2])


def test_encoder_recompute_writes_the_cache_once(setup):
    """The recompute really runs (each encoder layer twice) and the cache the decoder read holds the prompt once."""
    model, batch = setup
    core = model.get_base_model()
    kwargs = decoder_inputs(model, batch, batch["canvas"][:, 0])
    calls = []
    hooks = [
        layer.self_attn.register_forward_pre_hook(lambda m, a: calls.append(m.layer_idx))
        for layer in core.model.encoder.language_model.layers
    ]
    model.train()
    try:
        _set_checkpointing(model, True)
        out = model(**kwargs)
        seq = batch["input_ids"].shape[1]
        assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [seq] * SPEC.layers
        assert sorted(calls) == list(range(SPEC.layers))
        (out.logits.float().pow(2).mean() + out.encoder_last_hidden_state.float().pow(2).mean()).backward()
        assert sorted(calls) == sorted(list(range(SPEC.layers)) * 2)  # recomputed in backward
        assert [layer.keys.shape[-2] for layer in out.past_key_values.layers] == [seq] * SPEC.layers
    finally:
        for h in hooks:
            h.remove()
        _set_checkpointing(model, False)
        model.eval()


def test_generation_style_calls_are_not_checkpointed(setup):
    """No grad, or a cache that already holds a prefix: the layer runs plainly (the write-once replay would be
    wrong for a cache that returns prefix + new states)."""
    model, batch = setup
    core = model.get_base_model()
    calls = []
    hook = core.model.encoder.language_model.layers[0].register_forward_pre_hook(lambda m, a: calls.append(1))
    model.train()
    try:
        _set_checkpointing(model, True)
        with torch.no_grad():
            model(**decoder_inputs(model, batch, batch["canvas"][:, 0]))
        assert len(calls) == 1
    finally:
        hook.remove()
        _set_checkpointing(model, False)
        model.eval()
