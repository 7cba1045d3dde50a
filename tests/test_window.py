"""The sliding window across blocks and batches (issue 22): at a window of 24 (prompts of 18 to 83 tokens, answers of
one to four 8-token blocks), block k of every example is trained with the decoder context generation gives it
(prompt + earlier blocks, the window applied per row), and a row's generated tokens do not depend on its batch
neighbours. The reference is transformers' own forward on one row alone: the encoder over prompt + earlier blocks
only, a plain cache (its sliding layers keep the last W-1 positions), no masks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tiny_specs import tiny_spec

from ftkit.diffusion.blocks import denoise_blocks
from ftkit.diffusion.corrupt import corrupt_canvas, sample_noise_level
from ftkit.diffusion.loss import choose_blocks, decoder_inputs, diffusion_loss
from ftkit.diffusion.sample import denoise, row_generators
from ftkit.diffusion.token_layout import collate, layout_example
from ftkit.model.checkpointing import set_gradient_checkpointing
from ftkit.model.load import tiny_config
from ftkit.model.lora import attach_lora
from ftkit.recipe import DiffusionSection, EvalSection, LoraSection
from ftkit.rl.likelihood import position_losses
from ftkit.tasks.base import Piece, PromptCanvas

W, L = 24, 8
SPEC = tiny_spec(L, layers=3)
# Prompt lengths 18, 30, 46, 83 (the chat template adds 16 tokens): one shorter than the window, three longer;
# answers of 4, 2, 1 and 3 blocks, so block starts fall on both sides of the window and of each other.
PROMPTS = ["Hi", "Add these two.", "Count the letters of this line", "Read all of this and then answer: " * 2]
ANSWERS = ["abcdefghij" * 3, "0123456789", "xyz", "the answer is ab"]
# Float32 logits (soft-capped at 30) summed in another order or shape agree to ~1e-6; the window bug moves them by
# ~0.1-1 (measured: 0.14-0.59 max abs at this size).
ATOL = 1e-4


def windowed_model(tok, window: int, attn: str = "sdpa"):
    """The tiny architecture (sliding, sliding, full attention) with the given sliding window and attention
    implementation; same weights for every window (the window shapes no parameter)."""
    from transformers import DiffusionGemmaForBlockDiffusion

    config = tiny_config(SPEC, len(tok), tok.pad_token_id, tok.eos_token_id, tok.bos_token_id)
    config.text_config.sliding_window = window
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        base = DiffusionGemmaForBlockDiffusion(config).float()
        torch.nn.init.normal_(base.model.decoder.embed_tokens.weight, std=SPEC.embedding_std)
    base.set_attn_implementation(attn)
    model = attach_lora(base, LoraSection(r=4, alpha=8, dense_mlp=True))
    with torch.no_grad():  # PEFT starts lora_B at zero: give the adapters a say, so gradients reach every path
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(1))
    return model.eval()


@pytest.fixture(scope="module")
def model(char_tokenizer):
    return windowed_model(char_tokenizer, W)


@pytest.fixture(scope="module")
def layouts(char_tokenizer):
    return [
        layout_example(char_tokenizer, PromptCanvas(prompt=p, pieces=(Piece(a, False),)), L, 256, max_blocks=None)
        for p, a in zip(PROMPTS, ANSWERS)
    ]


@pytest.fixture(scope="module")
def batch(layouts, char_tokenizer):
    return collate(layouts, char_tokenizer.pad_token_id)


def test_the_batch_straddles_the_window(layouts, batch):
    assert [len(lay.prompt_ids) for lay in layouts] == [18, 30, 46, 83]
    assert [lay.num_blocks for lay in layouts] == [4, 2, 1, 3]
    assert batch["input_ids"].shape[1] > 3 * W


def alone_logits(model, prefix: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """(L, vocab) decoder logits for `canvas` after `prefix`, the row alone, as generation computes them."""
    n = prefix.shape[0]
    with torch.no_grad():
        return model(
            input_ids=prefix[None],
            decoder_input_ids=canvas[None],
            decoder_position_ids=torch.arange(n, n + canvas.shape[0])[None],
        ).logits[0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_each_block_trains_with_the_context_generation_gives_it(model, char_tokenizer, batch, attn):
    """Every block of every row, batched with rows of other lengths: the training forward's decoder logits equal
    the row-alone forward's over prompt + earlier blocks (both attention implementations a recipe can pick)."""
    if attn != "sdpa":
        model = windowed_model(char_tokenizer, W, attn)
    canvas = torch.randint(3, 100, (4, L), generator=torch.Generator().manual_seed(0))
    response = batch["attention_mask"].sum(1) - batch["prompt_len"]
    checked = 0
    for k in range(4):
        start = batch["prompt_len"] + k * L
        with torch.no_grad():
            logits = model(**decoder_inputs(model, batch, canvas, start)).logits
        for b in range(4):
            if k * L >= response[b]:
                continue  # row b has no block k
            expected = alone_logits(model, batch["input_ids"][b, : int(start[b])], canvas[b])
            torch.testing.assert_close(logits[b], expected, atol=ATOL, rtol=0, msg=f"row {b} block {k}")
            checked += 1
    assert checked == 10


def expected_token_losses(model, batch, eps: float, seed: int):
    """The loss's own draws (block, noise level, corruption) replayed, each row's CE from its alone forward."""
    g = torch.Generator().manual_seed(seed)
    target, start, block = choose_blocks(batch, g)
    t = sample_noise_level(target.shape[0], eps, g, target.device)
    noisy, _ = corrupt_canvas(target, t, model.config.text_config.vocab_size, g)
    rows = [
        F.cross_entropy(
            alone_logits(model, batch["input_ids"][b, : int(start[b])], noisy[b]), target[b], reduction="none"
        )
        for b in range(target.shape[0])
    ]
    return torch.stack(rows), block


@pytest.mark.parametrize("checkpointed", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("chunk", [0, 8], ids=["reference", "lean"])
def test_both_loss_paths_train_each_row_as_alone(model, batch, chunk, checkpointed):
    """diffusion_loss's per-position CE (reference path and lean path, with and without the checkpointed encoder)
    equals the row-alone forward's on the same draws (seed 6 draws blocks 2, 1, 0 and 1)."""
    cfg = DiffusionSection(eps=0.1, self_conditioning_p=0.0, encoder_loss_weight=0.5, loss_chunk=chunk)
    if checkpointed:
        model.train()
        set_gradient_checkpointing(model, True)
    try:
        out = diffusion_loss(model, batch, cfg, torch.Generator().manual_seed(6))
        out.loss.backward()  # the checkpointed encoder's recompute runs
        model.zero_grad()
        expected, block = expected_token_losses(model, batch, 0.1, 6)
        assert out.block.tolist() == block.tolist() == [2, 1, 0, 1]
        torch.testing.assert_close(out.token_losses.detach(), expected, atol=ATOL, rtol=0)
    finally:
        if checkpointed:
            set_gradient_checkpointing(model, False)
        model.eval()


def test_rl_likelihood_scores_each_row_as_alone(model, batch):
    """RL's ELBO terms (position_losses: the training objective, one corruption draw per seed) on this batch."""
    cfg = DiffusionSection(eps=0.1, self_conditioning_p=0.0, encoder_loss_weight=0.5, loss_chunk=8)
    with torch.no_grad():
        got = position_losses(model, batch, cfg, [6, 1])
    expected = (expected_token_losses(model, batch, 0.1, 6)[0] + expected_token_losses(model, batch, 0.1, 1)[0]) / 2
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def _loss_and_grads(model, batch, chunk: int, p: float, seed: int):
    model.zero_grad()
    out = diffusion_loss(
        model, batch, DiffusionSection(loss_chunk=chunk, self_conditioning_p=p), torch.Generator().manual_seed(seed)
    )
    out.loss.backward()
    return out, {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad and q.grad is not None}


def _assert_same(a, b):
    (out_a, grads_a), (out_b, grads_b) = a, b
    assert out_a.loss.item() == pytest.approx(out_b.loss.item(), rel=1e-5)
    torch.testing.assert_close(out_a.token_losses.detach(), out_b.token_losses.detach(), atol=ATOL, rtol=0)
    assert grads_a.keys() == grads_b.keys() and any(".encoder." in n for n in grads_a)
    for name, g in grads_a.items():
        assert torch.allclose(grads_b[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max())), name


def test_lean_equals_reference_and_checkpointing_changes_nothing(model, batch):
    """The existing equalities at this window: lean == reference loss and gradients (half the rows
    self-conditioned: the lean path's subset first pass reads a row-selected cache), and the checkpointed encoder
    gives the same loss and gradients on both paths."""
    p = 0.5
    model.train()
    try:
        reference, lean = _loss_and_grads(model, batch, 0, p, 5), _loss_and_grads(model, batch, 8, p, 5)
        _assert_same(reference, lean)
        set_gradient_checkpointing(model, True)
        _assert_same(reference, _loss_and_grads(model, batch, 0, p, 5))
        _assert_same(lean, _loss_and_grads(model, batch, 8, p, 5))
    finally:
        set_gradient_checkpointing(model, False)
        model.eval()


def test_without_a_binding_window_the_old_layout_gives_the_same_logits(char_tokenizer, batch):
    """Window larger than every sequence (only the full-attention behaviour matters): the right-aligned cache gives
    the logits of the right-padded cache cut at the block start, the layout used before; the same weights at
    window 24 do not (the window really binds on this batch)."""
    canvas = torch.randint(3, 100, (4, L), generator=torch.Generator().manual_seed(1))
    start = batch["prompt_len"]
    seq = batch["input_ids"].shape[1]
    old_mask = torch.cat([(torch.arange(seq)[None] < start[:, None]).long(), torch.ones(4, L, dtype=torch.long)], 1)
    old = dict(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=canvas,
        decoder_attention_mask=old_mask,
        decoder_position_ids=start[:, None] + torch.arange(L)[None],
    )
    wide, narrow = windowed_model(char_tokenizer, 512), windowed_model(char_tokenizer, W)
    with torch.no_grad():
        new_wide = wide(**decoder_inputs(wide, batch, canvas)).logits
        torch.testing.assert_close(new_wide, wide(**old).logits, atol=ATOL, rtol=0)
        assert (narrow(**decoder_inputs(narrow, batch, canvas)).logits - new_wide).abs().max() > 100 * ATOL


def knobs(steps=3):
    return dict(steps=steps, **EvalSection().sampler_kwargs(), clamp=True)


def test_denoise_a_row_batched_equals_the_row_alone(model, layouts, char_tokenizer):
    """Right-padded prompts of 18 to 83 tokens at window 24: the short rows' cache entries used to fall out of the
    batch's window. Per-row generators: each row's canvas and step count are what it gets alone."""
    pad = char_tokenizer.pad_token_id
    width = max(len(lay.prompt_ids) for lay in layouts)
    prompt = torch.full((4, width), pad)
    mask = torch.zeros((4, width), dtype=torch.long)
    for i, lay in enumerate(layouts):
        prompt[i, : len(lay.prompt_ids)] = torch.tensor(lay.prompt_ids)
        mask[i, : len(lay.prompt_ids)] = 1
    init = torch.full((4, L), pad)
    fixed = torch.zeros((4, L), dtype=torch.bool)
    together = denoise(model, prompt, mask, init, fixed, generator=row_generators(5, 4), **knobs())
    for b, lay in enumerate(layouts):
        n = len(lay.prompt_ids)
        alone = denoise(
            model,
            prompt[b : b + 1, :n],
            mask[b : b + 1, :n],
            init[b : b + 1],
            fixed[b : b + 1],
            generator=row_generators(5, 1, offset=b),
            **knobs(),
        )
        assert alone.canvas[0].tolist() == together.canvas[b].tolist(), f"row {b} differs when batched"
        assert alone.steps_used[0] == together.steps_used[b]


def test_denoise_blocks_a_row_batched_equals_the_row_alone(model, layouts, char_tokenizer):
    """Two blocks per row (no stop tokens), so block 1 reads prompt + block 0 across the window."""
    run = dict(max_new_tokens=2 * L, stop_ids=(), pad_id=char_tokenizer.pad_token_id, **knobs(2))
    together = denoise_blocks(model, layouts, generators=row_generators(9, 4), **run)
    assert together.blocks == [2, 2, 2, 2]
    for b, lay in enumerate(layouts):
        alone = denoise_blocks(model, [lay], generators=row_generators(9, 1, offset=b), **run)
        assert alone.tokens[0] == together.tokens[b], f"row {b} differs when batched"
        assert alone.steps_used[0] == together.steps_used[b]
