"""Block after block generation (ftkit.diffusion.blocks): one-block answers unchanged, finished blocks as context,
positions continuing, stop tokens and budgets, the verifier judging whole answers."""

from __future__ import annotations

import pytest
import torch
from tiny_specs import tiny_spec

from ftkit.diffusion.blocks import block_budget, denoise_blocks
from ftkit.diffusion.sample import DenoiseResult, denoise, row_generators
from ftkit.diffusion.token_layout import layout_example, stop_token_ids
from ftkit.model.load import build_tiny
from ftkit.model.lora import attach_lora
from ftkit.recipe import EvalSection, LoraSection, PresetSpec
from ftkit.tasks.base import Piece, PromptCanvas
from ftkit.tasks.sudoku import SudokuTask

L = 32
SPEC = tiny_spec(L)


@pytest.fixture(scope="module")
def model(char_tokenizer):
    return attach_lora(build_tiny(SPEC, char_tokenizer), LoraSection(r=4, alpha=8)).eval()


def chat_layout(tok, prompt: str, answer: str = "", fixed_tail: str = ""):
    pieces = (Piece(answer, False),) + ((Piece(fixed_tail, True),) if fixed_tail else ())
    return layout_example(tok, PromptCanvas(prompt=prompt, pieces=pieces), L, 256, max_blocks=None)


def knobs(steps=2):
    return dict(steps=steps, **EvalSection().sampler_kwargs(), clamp=True)


def test_a_one_block_answer_is_exactly_one_denoise_call(model, char_tokenizer):
    task = SudokuTask()
    ex = task.build_dataset("test", 1, 0)[0]
    lay = layout_example(char_tokenizer, task.to_prompt_canvas(ex), 96, 256)
    big = attach_lora(
        build_tiny(
            PresetSpec(
                layers=1,
                hidden=48,
                heads=2,
                kv_heads=1,
                head_dim=24,
                global_head_dim=24,
                intermediate=64,
                canvas_length=96,
            ),
            char_tokenizer,
        ),
        LoraSection(r=4, alpha=8),
    ).eval()
    pad = char_tokenizer.pad_token_id
    out = denoise_blocks(
        big,
        [lay],
        generators=row_generators(3, 1),
        max_new_tokens=96,
        stop_ids=stop_token_ids(char_tokenizer),
        pad_id=pad,
        **knobs(3),
    )
    fixed = torch.tensor([lay.fixed])
    canvas = torch.tensor([lay.canvas_ids])
    direct = denoise(
        big,
        torch.tensor([lay.prompt_ids]),
        torch.ones(1, len(lay.prompt_ids), dtype=torch.long),
        torch.where(fixed, canvas, torch.full_like(canvas, pad)),
        fixed,
        generator=row_generators(3, 1),
        **knobs(3),
    )
    assert out.blocks == [1] and out.tokens == direct.canvas.tolist()
    assert out.steps_used == direct.steps_used.tolist() and out.forward_passes == direct.forward_passes


class Scripted:
    """A stand-in sampler: answers each call with the next scripted canvases and records what it was given."""

    def __init__(self, script):
        self.script = list(script)
        self.calls = []

    def __call__(self, *, model, prompt_ids, prompt_mask, canvas_init, fixed_mask, generator, verifier, **kw):
        rows = self.script.pop(0)
        self.calls.append(
            dict(
                prompt=[[t for t, m in zip(p, pm) if m] for p, pm in zip(prompt_ids.tolist(), prompt_mask.tolist())],
                init=canvas_init.clone(),
                fixed=fixed_mask.clone(),
                generators=list(generator),
                verified=verifier(torch.tensor(rows)) if verifier else None,
            )
        )
        return DenoiseResult(
            canvas=torch.tensor(rows), steps_used=torch.full((len(rows),), 2), forward_passes=2, tokens_per_forward=1.0
        )


def test_finished_blocks_become_prompt_and_rows_stop_at_their_stop_token(model, char_tokenizer):
    tok = char_tokenizer
    eot, eos = stop_token_ids(tok)
    long, short = chat_layout(tok, "a long one"), chat_layout(tok, "short")
    block0 = [list(range(10, 10 + L)), [20] * 5 + [eot] + [eos] * (L - 6)]
    block1 = [[30] * 7 + [eot] + [eos] * (L - 8)]
    sampler = Scripted([block0, block1])
    gens = row_generators(0, 2)
    out = denoise_blocks(
        model,
        [long, short],
        generators=gens,
        max_new_tokens=4 * L,
        stop_ids=(eot, eos),
        pad_id=tok.pad_token_id,
        sampler=sampler,
        **knobs(),
    )
    first, second = sampler.calls
    assert first["prompt"] == [long.prompt_ids, short.prompt_ids]
    # Block 1 runs the unfinished row only, its prompt extended by its finished block, with the same generator.
    assert second["prompt"] == [long.prompt_ids + block0[0]] and second["generators"] == [gens[0]]
    assert out.blocks == [2, 1] and out.block_rows == [[0, 1], [0]]
    assert out.tokens == [block0[0] + block1[0], block0[1]]
    assert out.steps_used == [4, 2] and out.forward_passes == 4
    # Free tokens up to and including the stop, per decoder pass: (32 + 8) / 4 and 6 / 2.
    assert out.tokens_per_forward == pytest.approx(((L + 8) / 4 + 6 / 2) / 2)
    assert not first["init"][~first["fixed"]].ne(tok.pad_token_id).any()  # nothing of an answer is given away


def test_budget_cuts_an_answer_that_never_stops(model, char_tokenizer):
    lay = chat_layout(char_tokenizer, "go on")
    sampler = Scripted([[[40] * L], [[41] * L]])
    out = denoise_blocks(
        model,
        [lay],
        generators=row_generators(0, 1),
        max_new_tokens=L + 5,
        stop_ids=(1,),
        pad_id=0,
        sampler=sampler,
        **knobs(),
    )
    assert block_budget(lay, L + 5) == 2 and out.blocks == [2]
    assert out.tokens == [[40] * L + [41] * 5]  # max_new_tokens, not whole blocks


def test_fixed_pieces_in_a_later_block_are_given_and_keep_the_loop_going(model, char_tokenizer):
    tok = char_tokenizer
    eot, eos = stop_token_ids(tok)
    lay = chat_layout(tok, "fill", answer="x" * 40, fixed_tail="END")  # 40 free + 3 fixed + <turn|>: two blocks
    assert lay.num_blocks == 2 and block_budget(lay, L) == 2
    early_stop = [[eot] + [eos] * (L - 1)]
    sampler = Scripted([early_stop, [[50] * L]])
    out = denoise_blocks(
        model,
        [lay],
        generators=row_generators(0, 1),
        max_new_tokens=L,
        stop_ids=(eot, eos),
        pad_id=tok.pad_token_id,
        sampler=sampler,
        **knobs(),
    )
    assert out.blocks == [2]  # a stop in block 0 does not end an answer whose fixed pieces come later
    init, fixed = sampler.calls[1]["init"][0], sampler.calls[1]["fixed"][0]
    assert fixed[8:11].all() and tok.decode(init[8:11].tolist()) == "END" and not fixed[:8].any()


def test_the_verifier_judges_whole_answers_and_renoises_inside_the_block(model, char_tokenizer):
    tok = char_tokenizer
    eot, eos = stop_token_ids(tok)
    lay = chat_layout(tok, "q")
    seen = []

    def verifier(rows, answers):
        seen.append((rows, answers.shape))
        return [[3, L + 2, L + 5]]  # one position in the finished block, two in the block being denoised

    block0, block1 = [[60] * L], [[61] * 6 + [eot] + [eos] * (L - 7)]
    sampler = Scripted([block0, block1])
    denoise_blocks(
        model,
        [lay],
        generators=row_generators(0, 1),
        max_new_tokens=3 * L,
        stop_ids=(eot, eos),
        pad_id=tok.pad_token_id,
        verifier=verifier,
        sampler=sampler,
        **knobs(),
    )
    # Block 0 has no stop and is not the last allowed: not judged. Block 1 ends the answer: judged whole.
    assert sampler.calls[0]["verified"] == [[]]
    assert seen == [([0], (1, 2 * L))]
    assert sampler.calls[1]["verified"] == [[2, 5]]


def test_real_model_reads_finished_blocks_and_continues_positions(model, char_tokenizer):
    """On the tiny model: block 1's encoder input is prompt + block 0's tokens, and its decoder positions start
    right after them (as training's cache cut and positions for block 1)."""
    lay = chat_layout(char_tokenizer, "Count.")
    core = model.get_base_model()
    enc_ids, dec_pos = [], []
    hooks = [
        core.model.encoder.register_forward_pre_hook(
            lambda m, a, kw: enc_ids.append(kw["input_ids"][kw["attention_mask"].bool()].tolist()), with_kwargs=True
        ),
        core.model.decoder.register_forward_pre_hook(
            lambda m, a, kw: dec_pos.append(kw["decoder_position_ids"][0].tolist()), with_kwargs=True
        ),
    ]
    try:
        out = denoise_blocks(
            model,
            [lay],
            generators=row_generators(1, 1),
            max_new_tokens=2 * L,
            stop_ids=(),
            pad_id=char_tokenizer.pad_token_id,
            **knobs(1),
        )
    finally:
        for h in hooks:
            h.remove()
    n = len(lay.prompt_ids)
    assert out.blocks == [2] and len(out.tokens[0]) == 2 * L
    assert enc_ids == [lay.prompt_ids, lay.prompt_ids + out.tokens[0][:L]]
    assert dec_pos == [list(range(n, n + L)), list(range(n + L, n + 2 * L))]
