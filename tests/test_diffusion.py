"""The objective's pieces against hand-computed values, and the whole loss against a step-by-step reference."""

import math

import pytest
import torch
import torch.nn.functional as F
from tiny_specs import tiny_spec

from ftkit.diffusion.corrupt import corrupt_canvas, sample_noise_level
from ftkit.diffusion.loss import (
    chunked_head_token_losses,
    decoder_inputs,
    diffusion_loss,
    encoder_targets,
)
from ftkit.diffusion.token_layout import collate, layout_example
from ftkit.model.arch import head_logits
from ftkit.model.compat import disable_decoder_checkpointing, enable_decoder_checkpointing
from ftkit.model.load import build_tiny
from ftkit.model.lora import attach_lora
from ftkit.recipe import DiffusionSection, LoraSection
from ftkit.tasks.sudoku import SudokuTask


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_noise_level_range_and_eps():
    t = sample_noise_level(10_000, 0.25, gen(), torch.device("cpu"))
    assert t.min() >= 0.25 and t.max() < 1.0
    assert abs(t.mean().item() - 0.625) < 0.01  # mean of U(0.25, 1)


def test_corruption_extremes_hand_checked():
    canvas = torch.tensor([[5, 6, 7, 8], [5, 6, 7, 8]])
    noisy, mask = corrupt_canvas(canvas, torch.tensor([0.0, 1.0]), vocab_size=1000, generator=gen(3))
    assert mask.tolist() == [[False] * 4, [True] * 4]  # t=0 keeps everything, t=1 corrupts everything
    assert noisy[0].tolist() == [5, 6, 7, 8]
    assert ((noisy[1] >= 0) & (noisy[1] < 1000)).all()
    assert noisy[1].tolist() != [5, 6, 7, 8]  # 4 draws from 1000 hitting the originals: ~1e-12


def test_corruption_rate_is_t_and_tokens_uniform():
    canvas = torch.zeros(4, 20_000, dtype=torch.long)
    t = torch.tensor([0.1, 0.3, 0.6, 0.9])
    noisy, mask = corrupt_canvas(canvas, t, vocab_size=10, generator=gen(1))
    assert torch.allclose(mask.float().mean(1), t, atol=0.015)
    counts = torch.bincount(noisy[mask], minlength=10).float()
    assert (counts / counts.sum() - 0.1).abs().max() < 0.01  # uniform over the vocabulary, no mask token


def test_encoder_targets_hand_computed():
    ids = torch.tensor([[2, 10, 11, 12, 0], [2, 20, 0, 0, 0]])
    att = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    assert encoder_targets(ids, att).tolist() == [[10, 11, 12, -100], [20, -100, -100, -100]]


def test_decoder_inputs_right_align_the_cache_at_the_block_start(tiny_setup):
    """Row 0's block starts at 2, row 1's at 4 (row 1 has a padded last position): each row's prefix ends at the
    cache's last column, the rest is masked; canvas positions continue from the block start."""
    model, _ = tiny_setup
    batch = {
        "input_ids": torch.zeros(2, 6, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * 6, [1] * 5 + [0]]),
        "prompt_len": torch.tensor([2, 4]),
    }
    kw = decoder_inputs(model, batch, torch.zeros(2, 3, dtype=torch.long))
    assert kw["decoder_attention_mask"].long().tolist() == [[0, 0, 0, 0, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1, 1, 1]]
    assert kw["past_key_values"].index.tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 0, 1, 2, 3]]
    assert kw["decoder_position_ids"].tolist() == [[2, 3, 4], [4, 5, 6]]


class _Head(torch.nn.Module):
    def __init__(self, weight, cap):
        super().__init__()
        self.lm_head = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False)
        self.lm_head.weight.data.copy_(weight)
        self.final_logit_softcapping = cap


def test_head_and_token_losses_hand_computed():
    # Identity head on 2-d hidden states, vocab 2, cap 30: logits = 30*tanh(h/30).
    core = _Head(torch.eye(2), cap=30.0)
    hidden = torch.tensor([[[3.0, 0.0], [0.0, 0.0]]])
    logits = head_logits(core, hidden)
    assert logits[0, 0, 0].item() == pytest.approx(30 * math.tanh(0.1), rel=1e-6)
    losses = chunked_head_token_losses(core, hidden, torch.tensor([[0, 1]]), chunk=1)
    a = 30 * math.tanh(0.1)
    assert losses[0, 0].item() == pytest.approx(math.log(1 + math.exp(-a)), rel=1e-5)  # CE of the right class
    assert losses[0, 1].item() == pytest.approx(math.log(2), rel=1e-6)  # uniform logits
    ignored = chunked_head_token_losses(core, hidden, torch.tensor([[0, -100]]), chunk=2)
    assert ignored[0, 1].item() == 0.0


@pytest.fixture(scope="module")
def tiny_setup():
    from ftkit.model.char_tokenizer import build_char_tokenizer

    tok = build_char_tokenizer()
    spec = tiny_spec(96)
    model = attach_lora(build_tiny(spec, tok), LoraSection(r=4, alpha=8))
    task = SudokuTask()
    exs = task.build_dataset("test", 3, 0)
    batch = collate([layout_example(tok, task.to_prompt_canvas(e), 96, 256) for e in exs], tok.pad_token_id)
    return model, batch


def test_loss_matches_reference_steps(tiny_setup):
    """No self-conditioning: the loss equals corrupt -> forward -> flat CE + weighted encoder AR CE, done by hand."""
    model, batch = tiny_setup
    cfg = DiffusionSection(eps=0.1, self_conditioning_p=0.0, encoder_loss_weight=0.5)
    out = diffusion_loss(model, batch, cfg, gen(7))

    g = gen(7)
    torch.rand(3, generator=g)  # the block draw: every Sudoku response is one block
    t = 0.1 + 0.9 * torch.rand(3, generator=g)
    corrupt = torch.rand(3, 96, generator=g) < t[:, None]
    canvas = batch["canvas"][:, 0]
    noisy = torch.where(corrupt, torch.randint(model.config.text_config.vocab_size, (3, 96), generator=g), canvas)
    seq = batch["input_ids"].shape[1]
    cache = (torch.arange(seq)[None] < batch["prompt_len"][:, None]).long()
    ref = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        decoder_input_ids=noisy,
        decoder_attention_mask=torch.cat([cache, torch.ones(3, 96, dtype=torch.long)], 1),
        decoder_position_ids=batch["prompt_len"][:, None] + torch.arange(96)[None],
    )
    diff = F.cross_entropy(ref.logits.reshape(-1, ref.logits.shape[-1]), canvas.reshape(-1))
    core = model.get_base_model()
    enc_logits = torch.tanh(core.lm_head(ref.encoder_last_hidden_state).float() / 30.0) * 30.0
    pairs = batch["attention_mask"][:, :-1].bool() & batch["attention_mask"][:, 1:].bool()
    enc = F.cross_entropy(
        enc_logits[:, :-1].reshape(-1, enc_logits.shape[-1]),
        torch.where(pairs, batch["input_ids"][:, 1:], -100).reshape(-1),
        ignore_index=-100,
    )
    assert out.t.tolist() == pytest.approx(t.tolist()) and out.block.tolist() == [0, 0, 0]
    assert out.diffusion.item() == pytest.approx(diff.item(), rel=1e-5)
    assert out.encoder.item() == pytest.approx(enc.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(diff.item() + 0.5 * enc.item(), rel=1e-5)


LONG = "".join(chr(ord("a") + (7 * i) % 26) for i in range(200))  # 200 characters + <turn|>: blocks of 96, 96, 9


@pytest.fixture(scope="module")
def long_batch():
    """A three-block response (201 tokens in 96-token canvases) beside a one-block Sudoku example."""
    from ftkit.model.char_tokenizer import build_char_tokenizer
    from ftkit.tasks.base import Piece, PromptCanvas

    tok = build_char_tokenizer()
    long = layout_example(tok, PromptCanvas(prompt="Write.", pieces=(Piece(LONG, False),)), 96, 256, max_blocks=None)
    sudoku = layout_example(tok, SudokuTask().to_prompt_canvas(SudokuTask().build_dataset("test", 1, 0)[0]), 96, 256)
    return tok, [long, sudoku], collate([long, sudoku], tok.pad_token_id)


def test_collate_lays_out_blocks_and_reads_only_real_tokens(long_batch):
    tok, (long, sudoku), batch = long_batch
    assert (long.num_blocks, long.content_length, sudoku.num_blocks) == (3, 201, 1)
    assert batch["canvas"].shape == (2, 3, 96) and batch["fixed"].shape == (2, 3, 96)
    eos, eot = tok.eos_token_id, tok.convert_tokens_to_ids("<turn|>")
    ids = tok(LONG, add_special_tokens=False).input_ids + [eot]
    assert batch["canvas"][0].flatten().tolist() == ids + [eos] * (288 - 201)  # the last block is EOS-filled
    assert batch["canvas"][1, 0].tolist() == sudoku.canvas_ids
    # The encoder reads prompt + response, never the EOS fill: its AR co-loss covers real tokens only.
    lengths = batch["attention_mask"].sum(1).tolist()
    assert lengths == [len(long.prompt_ids) + 201, len(sudoku.prompt_ids) + 82]
    assert batch["input_ids"][0, lengths[0] - 1].item() == eot
    assert (encoder_targets(batch["input_ids"], batch["attention_mask"]) != -100).sum(1).tolist() == [
        n - 1 for n in lengths
    ]


def test_long_example_loss_matches_hand_computation_for_each_block(tiny_setup, long_batch):
    """For each block the long example can draw, the loss equals: that block's clean canvas (EOS-filled for the
    last), the decoder's cache cut at the block's start, positions continuing from there, flat CE over the canvas,
    plus the encoder's AR CE over the real tokens of both examples."""
    model, _ = tiny_setup
    _, (long, _), batch = long_batch
    vocab = model.config.text_config.vocab_size
    cfg = DiffusionSection(eps=0.1, self_conditioning_p=0.0, encoder_loss_weight=0.5)
    seen = set()
    for seed in range(40):
        g = gen(seed)
        block = (torch.rand(2, generator=g) * torch.tensor([3, 1])).long()
        if block[0].item() in seen:
            continue
        seen.add(block[0].item())
        out = diffusion_loss(model, batch, cfg, gen(seed))
        b = block[0].item()
        assert out.block.tolist() == [b, 0]
        target = torch.stack([batch["canvas"][0, b], batch["canvas"][1, 0]])
        assert target[0].tolist() == long.canvas_ids[96 * b : 96 * (b + 1)]
        t = 0.1 + 0.9 * torch.rand(2, generator=g)
        corrupt = torch.rand(2, 96, generator=g) < t[:, None]
        noisy = torch.where(corrupt, torch.randint(vocab, (2, 96), generator=g), target)
        start = batch["prompt_len"] + torch.tensor([96 * b, 0])
        seq = batch["input_ids"].shape[1]
        cache = (torch.arange(seq)[None] < start[:, None]).long()
        with torch.no_grad():
            ref = model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                decoder_input_ids=noisy,
                decoder_attention_mask=torch.cat([cache, torch.ones(2, 96, dtype=torch.long)], 1),
                decoder_position_ids=start[:, None] + torch.arange(96)[None],
            )
        diff = F.cross_entropy(ref.logits.reshape(-1, vocab), target.reshape(-1))
        enc_logits = torch.tanh(model.get_base_model().lm_head(ref.encoder_last_hidden_state).float() / 30.0) * 30.0
        mask = batch["attention_mask"]
        pairs = mask[:, :-1].bool() & mask[:, 1:].bool()
        enc = F.cross_entropy(
            enc_logits[:, :-1].reshape(-1, vocab),
            torch.where(pairs, batch["input_ids"][:, 1:], -100).reshape(-1),
            ignore_index=-100,
        )
        assert out.diffusion.item() == pytest.approx(diff.item(), rel=1e-5), b
        assert out.encoder.item() == pytest.approx(enc.item(), rel=1e-5), b
        assert out.loss.item() == pytest.approx(diff.item() + 0.5 * enc.item(), rel=1e-5), b
    assert seen == {0, 1, 2}


def reference_and_lean(model, batch, p: float, seed: int):
    """The loss on the reference path (loss_chunk 0) and the lean one (50), same draws, each with its LoRA gradients."""
    results = []
    for chunk in (0, 50):
        model.zero_grad()
        out = diffusion_loss(model, batch, DiffusionSection(loss_chunk=chunk, self_conditioning_p=p), gen(seed))
        out.loss.backward()
        grads = {n: q.grad.clone() for n, q in model.named_parameters() if q.requires_grad and q.grad is not None}
        results.append((out, grads))
    return results


@pytest.mark.parametrize("p", [0.0, 1.0])
def test_lean_path_equals_reference_on_a_multi_block_batch(tiny_setup, long_batch, p):
    model, _ = tiny_setup
    _, _, batch = long_batch
    (ref, ref_grads), (lean, lean_grads) = reference_and_lean(model, batch, p, seed=4)
    assert ref.block.tolist() == lean.block.tolist() and ref.block[0].item() > 0  # a later block, not block 0
    for part in ("loss", "diffusion", "encoder"):
        assert getattr(lean, part).item() == pytest.approx(getattr(ref, part).item(), rel=1e-5), part
    for name, g in ref_grads.items():
        assert torch.allclose(lean_grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max())), name


@pytest.mark.parametrize("p", [0.0, 0.5, 1.0])
def test_lean_path_equals_reference_loss_and_gradients(tiny_setup, p):
    """loss_chunk > 0 (encoder once, first pass on the self-conditioned examples only, chunked soft embeddings and
    CE) gives the reference path's loss parts, per-example losses and every LoRA gradient."""
    model, batch = tiny_setup
    (ref, ref_grads), (lean, lean_grads) = reference_and_lean(model, batch, p, seed=11)
    if p == 0.5:
        assert 0 < lean.self_conditioned.item() < 1  # a mixed batch: the subset first pass is really exercised
    assert lean.self_conditioned.item() == ref.self_conditioned.item()
    for part in ("loss", "diffusion", "encoder"):
        assert getattr(lean, part).item() == pytest.approx(getattr(ref, part).item(), rel=1e-5), part
    assert torch.allclose(lean.per_example, ref.per_example, rtol=1e-5)
    assert ref_grads.keys() == lean_grads.keys() and len(ref_grads) > 0
    for name, g in ref_grads.items():
        # Float32 sums in another order differ in the last bits; an absolute floor scaled to the tensor keeps
        # near-zero entries from failing on reordering alone (a wrong gradient is off by far more).
        assert torch.allclose(lean_grads[name], g, rtol=1e-4, atol=1e-5 * float(g.abs().max())), name


def _batch_sizes(core):
    """Records the batch size of every encoder and decoder call."""
    calls = {"encoder": [], "decoder": []}
    hooks = [
        core.model.encoder.language_model.register_forward_pre_hook(
            lambda m, a, kw: calls["encoder"].append(kw["inputs_embeds"].shape[0]), with_kwargs=True
        ),
        core.model.decoder.register_forward_pre_hook(
            lambda m, a, kw: calls["decoder"].append(kw["decoder_input_ids"].shape[0]), with_kwargs=True
        ),
    ]
    return calls, hooks


def test_lean_path_encodes_once_and_first_pass_runs_only_where_needed(tiny_setup):
    model, batch = tiny_setup
    core = model.get_base_model()
    seen = {}
    for chunk in (0, 50):
        calls, hooks = _batch_sizes(core)
        try:
            out = diffusion_loss(model, batch, DiffusionSection(loss_chunk=chunk, self_conditioning_p=0.5), gen(11))
        finally:
            for h in hooks:
                h.remove()
        seen[chunk] = (calls, round(out.self_conditioned.item() * 3))
    (ref_calls, _), (lean_calls, n_sc) = seen[0], seen[50]
    assert ref_calls == {"encoder": [3, 3], "decoder": [3, 3]}  # the reference re-encodes in its no-grad pass
    assert lean_calls == {"encoder": [3], "decoder": [n_sc, 3]} and 0 < n_sc < 3


def test_lean_path_never_materializes_batch_by_canvas_by_vocab(tiny_setup):
    from ftkit.profiling import LargestTensor

    model, batch = tiny_setup
    vocab = model.config.text_config.vocab_size
    full_logits = batch["canvas"].numel() * vocab * 4  # the (B, L, V) fp32 logits
    largest = {}
    for chunk in (0, 50):
        with LargestTensor(last_dim=vocab) as meter:
            diffusion_loss(
                model, batch, DiffusionSection(loss_chunk=chunk, self_conditioning_p=1.0), gen(3)
            ).loss.backward()
        largest[chunk] = meter.bytes
    assert largest[0] >= full_logits  # the meter sees the reference path's logits
    assert largest[50] <= 50 * vocab * 4 < full_logits  # one chunk of fp32 logits at most


def test_self_conditioning_changes_the_second_pass(tiny_setup):
    model, batch = tiny_setup
    with torch.no_grad():
        off = diffusion_loss(model, batch, DiffusionSection(self_conditioning_p=0.0), gen(5))
        on = diffusion_loss(model, batch, DiffusionSection(self_conditioning_p=1.0), gen(5))
    assert on.self_conditioned.item() == 1.0 and off.self_conditioned.item() == 0.0
    # Same noise (the gate draw comes after corruption), different conditioning signal -> different loss.
    assert on.t.tolist() == off.t.tolist()
    assert on.diffusion.item() != pytest.approx(off.diffusion.item(), rel=1e-7)


def test_gradient_checkpointing_keeps_loss_and_gradients(tiny_setup):
    """Decoder layers are recomputed in backward; the encoder (which writes the KV cache) is not checkpointed, so
    the recompute reads the same cache and loss/gradients are unchanged."""
    model, batch = tiny_setup
    core = model.get_base_model()
    results = []
    for checkpointing in (False, True):
        if checkpointing:
            enable_decoder_checkpointing(core, use_reentrant=False)
            assert all(getattr(layer, "gradient_checkpointing", False) for layer in core.model.decoder.layers)
        model.train()
        model.zero_grad()
        out = diffusion_loss(model, batch, DiffusionSection(), gen(2))
        out.loss.backward()
        results.append(
            (out.loss.item(), [p.grad.clone() for p in model.parameters() if p.requires_grad and p.grad is not None])
        )
    disable_decoder_checkpointing(core)
    model.eval()
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-6)
    assert len(results[0][1]) == len(results[1][1]) > 0
    for a, b in zip(results[0][1], results[1][1]):
        assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)
