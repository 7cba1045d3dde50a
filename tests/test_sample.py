"""The constrained denoising sampler on a tiny random-init DiffusionGemma (CPU, a few steps)."""

from __future__ import annotations

import pytest
import torch

from ftkit.diffusion.sample import denoise, row_generators
from ftkit.diffusion.token_layout import AllowedTokens
from ftkit.model.char_tokenizer import build_char_tokenizer
from ftkit.model.load import build_tiny
from ftkit.recipe import PresetSpec

CANVAS = 32
KNOBS = dict(
    temperature_min=0.0, temperature_max=0.7, entropy_bound=0.3, stability_threshold=2, confidence_threshold=0.05
)


@pytest.fixture(scope="module")
def tokenizer():
    return build_char_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return build_tiny(PresetSpec(), tokenizer).eval()


@pytest.fixture(scope="module")
def batch(tokenizer):
    """Three right-padded prompts of different lengths, canvases with ~30% fixed positions and an EOS tail."""
    g = torch.Generator().manual_seed(1)
    vocab = len(tokenizer)
    lengths = [20, 12, 5]
    prompt = torch.randint(4, vocab, (3, max(lengths)), generator=g)
    mask = torch.zeros_like(prompt)
    for i, n in enumerate(lengths):
        mask[i, :n] = 1
        prompt[i, n:] = tokenizer.pad_token_id
    canvas = torch.randint(4, vocab, (3, CANVAS), generator=g)
    canvas[:, 24:] = tokenizer.eos_token_id
    fixed = torch.rand(3, CANVAS, generator=g) < 0.3
    fixed[:, 24:] = False
    return prompt, mask, canvas, fixed


def test_clamp_keeps_fixed_positions_identical_through_trajectory(model, batch):
    prompt, mask, canvas, fixed = batch
    res = denoise(
        model, prompt, mask, canvas, fixed, steps=5, generator=row_generators(0, 3), record_trajectory=True, **KNOBS
    )
    assert len(res.trajectory) == 1 + 5  # the start, then one canvas per step (a random model never stops early)
    for step, snapshot in enumerate(res.trajectory):
        assert torch.equal(snapshot[fixed], canvas[fixed]), f"a fixed position changed at trajectory entry {step}"
    assert torch.equal(res.canvas[fixed], canvas[fixed])
    assert not torch.equal(res.trajectory[0][~fixed], res.trajectory[-1][~fixed])  # free positions do move

    # Without clamping the same positions are free to drift: the check above would catch it.
    loose = denoise(
        model,
        prompt,
        mask,
        canvas,
        fixed,
        steps=5,
        generator=row_generators(0, 3),
        clamp=False,
        record_trajectory=True,
        **KNOBS,
    )
    assert any(not torch.equal(s[fixed], canvas[fixed]) for s in loose.trajectory)


def test_batch_equals_one_at_a_time(model, batch):
    prompt, mask, canvas, fixed = batch
    together = denoise(model, prompt, mask, canvas, fixed, steps=4, generator=row_generators(7, 3), **KNOBS)
    for b in range(3):
        n = int(mask[b].sum())
        alone = denoise(
            model,
            prompt[b : b + 1, :n],
            mask[b : b + 1, :n],
            canvas[b : b + 1],
            fixed[b : b + 1],
            steps=4,
            generator=row_generators(7, 1, offset=b),
            **KNOBS,
        )
        assert torch.equal(alone.canvas[0], together.canvas[b]), f"example {b} differs when batched"
        assert alone.steps_used[0] == together.steps_used[b]


def test_random_model_uses_every_step(model, batch):
    prompt, mask, canvas, fixed = batch
    res = denoise(model, prompt, mask, canvas, fixed, steps=3, generator=row_generators(0, 3), **KNOBS)
    assert res.steps_used.tolist() == [3, 3, 3]  # near-uniform logits are never confident
    assert res.forward_passes == 3
    assert res.canvas.shape == canvas.shape


def test_confident_model_stops_early(model, batch, tokenizer):
    """A real model whose head is biased hard towards a target canvas: its argmax is stable from the first step and
    its entropy near zero, so it stops after `stability_threshold` + 1 steps, well inside the budget."""
    prompt, mask, canvas, fixed = batch
    target = torch.randint(4, len(tokenizer), canvas.shape, generator=torch.Generator().manual_seed(3))
    target[:, 20:] = tokenizer.eos_token_id
    bias = 100.0 * torch.nn.functional.one_hot(target, len(tokenizer)).float()
    # The sampler runs the head on flattened positions; one chunk holds them all, in (example, position) order.
    handle = model.lm_head.register_forward_hook(lambda _m, _i, out: out + bias.reshape(out.shape).to(out.dtype))
    try:
        res = denoise(
            model, prompt, mask, canvas, fixed, steps=20, generator=row_generators(0, 3), chunk=3 * CANVAS, **KNOBS
        )
    finally:
        handle.remove()
    assert res.steps_used.tolist() == [KNOBS["stability_threshold"] + 1] * 3
    assert res.forward_passes == KNOBS["stability_threshold"] + 1
    assert torch.equal(res.canvas[~fixed], target[~fixed])  # free positions follow the model
    assert torch.equal(res.canvas[fixed], canvas[fixed])  # fixed ones follow the clamp
    # Generated tokens: free positions up to and including the first EOS (at 20, unless a fixed token sits there).
    ends = [1 + next(i for i in range(20, CANVAS) if res.canvas[b, i] == tokenizer.eos_token_id) for b in range(3)]
    expected = sum(int((~fixed[b, : ends[b]]).sum()) for b in range(3)) / 3 / (KNOBS["stability_threshold"] + 1)
    assert res.tokens_per_forward == pytest.approx(expected)


def test_verifier_renoises_only_reported_free_positions(model, batch):
    prompt, mask, canvas, fixed = batch
    steps = 4
    plain = denoise(model, prompt, mask, canvas, fixed, steps=steps, generator=row_generators(0, 3), **KNOBS)

    free0 = torch.nonzero(~fixed[0, :24]).flatten().tolist()
    fixed0 = torch.nonzero(fixed[0]).flatten().tolist()
    reported = [free0[0], free0[3], fixed0[0], 999]  # two free, one fixed (ignored), one out of range (ignored)
    calls = []

    def verifier(c):
        calls.append(c.clone())
        return [reported, [], []] if len(calls) == 1 else [[], [], []]

    res = denoise(
        model,
        prompt,
        mask,
        canvas,
        fixed,
        steps=steps,
        generator=row_generators(0, 3),
        verifier=verifier,
        max_renoise_rounds=3,
        record_trajectory=True,
        **KNOBS,
    )
    assert len(calls) == 2  # round 1 re-noised, round 2 found nothing
    assert torch.equal(calls[0], plain.canvas)  # the first pass is the plain sampler's, draw for draw
    assert res.renoised_cells == 2 and res.renoise_rounds == 1
    touched = {(0, free0[0]), (0, free0[3])}

    round_start = res.trajectory[1 + steps]
    diff = {tuple(p) for p in torch.nonzero(round_start != plain.canvas).tolist()}
    assert diff and diff <= touched  # fresh noise went exactly to reported free positions
    final_diff = {tuple(p) for p in torch.nonzero(res.canvas != plain.canvas).tolist()}
    assert final_diff <= touched
    for snapshot in res.trajectory[1 + steps :]:
        assert {tuple(p) for p in torch.nonzero(snapshot != plain.canvas).tolist()} <= touched
    # Only the re-noised example spent more decoder passes.
    assert res.steps_used[0] > plain.steps_used[0]
    assert res.steps_used[1:].tolist() == plain.steps_used[1:].tolist()


def test_rejects_bad_temperatures(model, batch):
    prompt, mask, canvas, fixed = batch
    with pytest.raises(ValueError, match="temperature"):
        denoise(
            model,
            prompt,
            mask,
            canvas,
            fixed,
            steps=2,
            generator=torch.Generator().manual_seed(0),
            **{**KNOBS, "temperature_max": 0.0},
        )


def test_pinned_logits_are_one_hot_and_free_ones_untouched():
    from ftkit.diffusion.sample import _pin_logits

    logits = torch.randn(2, 5, 11)
    pinned = torch.tensor([[True, False, False, True, False], [False] * 5])
    values = torch.randint(0, 11, (2, 5))
    out = _pin_logits(logits, pinned, values)
    assert torch.equal(out.argmax(-1)[pinned], values[pinned])
    entropy = torch.distributions.Categorical(logits=out).entropy()
    assert (entropy[pinned] < 1e-6).all()
    assert torch.equal(out[~pinned], logits[~pinned])


def test_single_generator_is_reproducible(model, batch):
    prompt, mask, canvas, fixed = batch
    runs = [
        denoise(model, prompt, mask, canvas, fixed, steps=2, generator=torch.Generator().manual_seed(5), **KNOBS)
        for _ in range(2)
    ]
    assert torch.equal(runs[0].canvas, runs[1].canvas)


def test_chunking_does_not_change_results(model, batch):
    """Everything over the vocabulary runs a chunk of positions at a time; the chunk size is invisible."""
    prompt, mask, canvas, fixed = batch
    runs = [
        denoise(
            model,
            prompt,
            mask,
            canvas,
            fixed,
            steps=4,
            generator=row_generators(3, 3),
            chunk=chunk,
            record_trajectory=True,
            **KNOBS,
        )
        for chunk in (None, 1, 7)
    ]
    for other in runs[1:]:
        assert torch.equal(other.canvas, runs[0].canvas)
        assert other.steps_used.tolist() == runs[0].steps_used.tolist()
        assert all(torch.equal(a, b) for a, b in zip(other.trajectory, runs[0].trajectory))


def test_entropy_and_acceptance_match_transformers():
    """ftkit computes entropies chunk by chunk and applies EntropyBoundSampler's rule to them: same selection as the
    library's accept_canvas on the full logits, masked (-inf) tokens included."""
    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        EntropyBoundSampler,
        EntropyBoundSamplerConfig,
    )

    from ftkit.diffusion.sample import _entropy, accept_lowest_entropy

    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(4, 40, 50, generator=g)
    logits[:, :10, 9:] = -torch.inf  # masked positions: only 9 tokens left
    logits[:, 10:15] = torch.where(torch.arange(50) == 7, 0.0, -1e4)  # pinned: zero entropy
    ours = _entropy(torch.log_softmax(logits, -1))
    theirs = torch.distributions.Categorical(logits=logits).entropy()
    torch.testing.assert_close(ours, theirs)
    for bound in (0.05, 0.3, 2.0, 50.0):
        sampler = EntropyBoundSampler(EntropyBoundSamplerConfig(entropy_bound=bound), 40, 50, 8)
        current, proposed = torch.zeros(4, 40, dtype=torch.long), torch.ones(4, 40, dtype=torch.long)
        sampler.accept_canvas(current, proposed, logits, 3)
        assert torch.equal(accept_lowest_entropy(theirs, bound), sampler.accepted_token_mask), bound


def test_inverse_cdf_draws_follow_probabilities_and_skip_masked_tokens():
    from ftkit.diffusion.sample import _inverse_cdf

    probs = torch.tensor([[0.2, 0.0, 0.5, 0.0, 0.3]]).expand(20000, 5).contiguous()
    uniform = torch.rand(20000, generator=torch.Generator().manual_seed(0))
    drawn = _inverse_cdf(probs, uniform)
    counts = torch.bincount(drawn, minlength=5).float() / 20000
    assert counts[1] == 0 and counts[3] == 0
    torch.testing.assert_close(counts[[0, 2, 4]], torch.tensor([0.2, 0.5, 0.3]), atol=0.015, rtol=0)
    # A uniform at (or rounded to) the total mass still lands on a possible token, never past the vocabulary.
    edge = _inverse_cdf(torch.tensor([[0.25, 0.75, 0.0, 0.0]]), torch.tensor([1.0]))
    assert edge.tolist() == [1]


def _rules(batch: int, length: int, vocab: int, spans) -> AllowedTokens:
    """Token rules over `spans` [(start, end, allowed ids)] of every row; elsewhere any token."""
    table = torch.zeros(len(spans), vocab, dtype=torch.bool)
    index = torch.full((batch, length), -1, dtype=torch.long)
    for s, (a, b, ids) in enumerate(spans):
        table[s, ids] = True
        index[:, a:b] = s
    return AllowedTokens(table, index)


def test_allowed_tokens_hold_on_the_output_and_every_step(model, batch, tokenizer):
    """A random model writes any token anywhere; with token rules every masked position of the argmax output holds
    an allowed token (digits on 0-23, EOS on the fill), and fixed positions stay clamped."""
    prompt, mask, canvas, fixed = batch
    digits = tokenizer.convert_tokens_to_ids(list("123456789"))
    eos = tokenizer.eos_token_id
    rules = _rules(3, CANVAS, len(tokenizer), [(0, 24, digits), (24, CANVAS, [eos])])
    free = ~fixed
    plain = denoise(model, prompt, mask, canvas, fixed, steps=4, generator=row_generators(0, 3), **KNOBS)
    assert not torch.isin(plain.canvas[:, :24][free[:, :24]], torch.tensor(digits)).all()  # the check can fail
    res = denoise(model, prompt, mask, canvas, fixed, steps=4, generator=row_generators(0, 3), allowed=rules, **KNOBS)
    assert torch.isin(res.canvas[:, :24][free[:, :24]], torch.tensor(digits)).all()
    assert (res.canvas[:, 24:] == eos).all()
    assert torch.equal(res.canvas[fixed], canvas[fixed])
    # With rules the batch is still the sum of its examples.
    alone = denoise(
        model,
        prompt[1:2, :12],
        mask[1:2, :12],
        canvas[1:2],
        fixed[1:2],
        steps=4,
        generator=row_generators(0, 1, offset=1),
        allowed=AllowedTokens(rules.table, rules.index[1:2]),
        **KNOBS,
    )
    assert torch.equal(alone.canvas[0], res.canvas[1])


def test_peak_memory_at_the_real_vocabulary_is_chunk_sized():
    """At Gemma's 262,144-token vocabulary (small hidden size, CPU), one denoising call never holds as much as one
    fp32 (batch, canvas, vocab) logits tensor: only chunk-sized vocabulary tensors exist. The full-width sampler
    this replaced peaked at 8x that tensor (ftkit.profiling.PeakLiveBytes, batch 2 x 64)."""
    import dataclasses

    from transformers import DiffusionGemmaForBlockDiffusion

    from ftkit.model.load import tiny_config
    from ftkit.profiling import PeakLiveBytes

    vocab, batch, length, chunk = 262_144, 2, 32, 4
    spec = dataclasses.replace(
        PresetSpec(),
        hidden=32,
        heads=2,
        kv_heads=1,
        head_dim=16,
        global_head_dim=32,
        intermediate=64,
        expert_intermediate=32,
        canvas_length=length,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        big = DiffusionGemmaForBlockDiffusion(tiny_config(spec, vocab)).eval()
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(4, vocab, (batch, 10), generator=g)
    canvas = torch.randint(4, vocab, (batch, length), generator=g)
    fixed = torch.rand(batch, length, generator=g) < 0.3
    with PeakLiveBytes() as peak:
        res = denoise(
            big,
            prompt,
            torch.ones_like(prompt),
            canvas,
            fixed,
            steps=2,
            generator=row_generators(0, batch),
            chunk=chunk,
            **KNOBS,
        )
    full_logits = batch * length * vocab * 4
    chunk_bytes = chunk * vocab * 4
    assert peak.peak <= 5 * chunk_bytes < full_logits / 2, f"peak {peak.peak / 1e6:.0f} MB"
    assert res.steps_used.tolist() == [2, 2]


@pytest.mark.gpu
def test_peak_cuda_memory_at_the_real_vocabulary_and_batch():
    """The eval configuration of the real recipes (batch 16 x 256 canvas, 262k vocabulary, bf16) on a GPU: the
    sampler's peak above the model stays under one bf16 (batch, canvas, vocab) tensor (2.1 GB) plus the default
    chunks, where the full-width path needed ~30 GB."""
    import dataclasses

    from transformers import DiffusionGemmaForBlockDiffusion

    from ftkit.diffusion.sample import default_chunk
    from ftkit.model.load import tiny_config

    vocab, batch, length = 262_144, 16, 256
    spec = dataclasses.replace(PresetSpec(), hidden=64, canvas_length=length)
    model = DiffusionGemmaForBlockDiffusion(tiny_config(spec, vocab)).to("cuda", torch.bfloat16).eval()
    g = torch.Generator(device="cuda").manual_seed(0)
    prompt = torch.randint(4, vocab, (batch, 32), generator=g, device="cuda")
    canvas = torch.randint(4, vocab, (batch, length), generator=g, device="cuda")
    fixed = torch.zeros(batch, length, dtype=torch.bool, device="cuda")
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    denoise(
        model,
        prompt,
        torch.ones_like(prompt),
        canvas,
        fixed,
        steps=2,
        generator=row_generators(0, batch, device="cuda"),
        **KNOBS,
    )
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    budget = batch * length * vocab * 2 + 5 * default_chunk(vocab) * vocab * 4
    assert extra <= budget, f"{extra / 2**30:.2f} GiB over the model, budget {budget / 2**30:.2f} GiB"


def test_decoder_with_soft_embeddings_equals_the_models_self_conditioning_path(model, batch, tokenizer):
    """The sampler calls the decoder with the self-conditioning signal as soft embeddings and applies the head
    itself; that gives the logits the model computes from self_conditioning_logits (fp32)."""
    from ftkit.diffusion.sample import _encode_prompt
    from ftkit.diffusion.self_conditioning import injected_soft_embeddings
    from ftkit.model.arch import head_logits

    prompt, mask, canvas, _ = batch
    cache, decoder_mask, positions = _encode_prompt(model, prompt, mask, CANVAS)
    previous = 3 * torch.randn(3, CANVAS, len(tokenizer), generator=torch.Generator().manual_seed(0))
    kwargs = dict(
        past_key_values=cache,
        decoder_input_ids=canvas,
        decoder_attention_mask=decoder_mask,
        decoder_position_ids=positions,
    )
    reference = model(**kwargs, self_conditioning_logits=previous).logits
    embed = model.model.decoder.embed_tokens
    soft = previous.softmax(-1).to(embed.weight.dtype) @ embed.weight * embed.embed_scale.to(embed.weight.dtype)
    with injected_soft_embeddings(model, soft):
        hidden = model.model.decoder(**kwargs).last_hidden_state
    torch.testing.assert_close(head_logits(model, hidden), reference)
