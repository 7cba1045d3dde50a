"""The RL objective against hand computations: group advantages, the clipped per-token ratio with the k2 KL term
and its gradient, sample entropy; then the same loss through a tiny model (coupled ELBO estimates, the gradient as
the hand-weighted sum of per-sample likelihood gradients) and the reference policy swap."""

import math

import pytest
import torch
from tiny_specs import tiny_dims

from ftkit.diffusion.token_layout import collate, layout_example
from ftkit.model.load import build_tiny
from ftkit.model.lora import attach_lora
from ftkit.recipe import DiffusionSection, LoraSection, PresetSpec
from ftkit.rl.likelihood import ReferencePolicy, position_losses, sequence_loss
from ftkit.rl.objective import (
    STD_EPS,
    group_advantages,
    policy_terms,
    position_advantages,
    sample_entropy,
    scale_negatives,
    token_policy_terms,
)
from ftkit.tasks.sudoku import SudokuTask

TINY = tiny_dims(96)


def test_group_advantages_by_hand():
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, 0.5, 0.5, 0.5], [0.2, 0.4, 0.6, 0.8]])
    advantages, kept = group_advantages(rewards)
    assert kept.tolist() == [True, False, True]
    std1 = math.sqrt(4 * 0.25 / 3)  # Bessel-corrected
    assert advantages[0].tolist() == pytest.approx(
        [0.5 / (std1 + STD_EPS), -0.5 / (std1 + STD_EPS)] * 1 + [-0.5 / (std1 + STD_EPS), 0.5 / (std1 + STD_EPS)]
    )
    assert advantages[1].tolist() == [0.0, 0.0, 0.0, 0.0]  # all-equal group: skipped, no signal
    std3 = math.sqrt((0.09 + 0.01 + 0.01 + 0.09) / 3)
    assert advantages[2].tolist() == pytest.approx([d / (std3 + STD_EPS) for d in (-0.3, -0.1, 0.1, 0.3)], rel=1e-5)


def test_policy_loss_and_gradient_by_hand():
    # Five samples: unclipped A>0; clipped below with A<0; ratio 1; clipped above with A>0; above the clip with A<0
    # (the min picks the unclipped term, so the gradient flows).
    new = torch.tensor([1.0, 2.0, 1.5, 1.0, 1.0], requires_grad=True)
    old = torch.tensor([1.1, 1.7, 1.5, 1.5, 1.5])
    ref = torch.tensor([1.0, 1.9, 1.2, 1.0, 0.8])
    adv = torch.tensor([1.0, -2.0, 0.5, 1.0, -1.0])
    eps, beta = 0.2, 0.1
    terms = policy_terms(new, old, adv, eps, beta, ref)

    r = [math.exp(0.1), math.exp(-0.3), 1.0, math.exp(0.5), math.exp(0.5)]
    kl = [0.0, 0.5 * 0.1**2, 0.5 * 0.3**2, 0.0, 0.5 * 0.2**2]
    surrogate = [-r[0] * 1.0, -(0.8 * -2.0), -0.5, -1.2, -(r[4] * -1.0)]
    assert terms.ratio.tolist() == pytest.approx(r, rel=1e-6)
    assert terms.kl.tolist() == pytest.approx(kl, abs=1e-7)
    assert terms.clipped.tolist() == [False, True, False, True, False]
    assert terms.loss.tolist() == pytest.approx([s + beta * k for s, k in zip(surrogate, kl)], rel=1e-6)

    terms.loss.sum().backward()
    # d/dl_new of -ratio*A is A*ratio where unclipped, 0 where clipped; of beta*(l - l_ref)^2/2 it is beta*(l - l_ref).
    grad = [r[0] * 1.0, 0.0 + beta * 0.1, 0.5 * 1.0 + beta * 0.3, 0.0, r[4] * -1.0 + beta * 0.2]
    assert new.grad.tolist() == pytest.approx(grad, rel=1e-6)


def test_no_reference_means_no_kl_and_ratio_one_at_the_sampling_policy():
    new = torch.tensor([0.7, 1.3], requires_grad=True)
    terms = policy_terms(new, new.detach(), torch.tensor([1.0, -1.0]), 0.2, kl_coef=1.0, loss_ref=None)
    assert terms.kl.tolist() == [0.0, 0.0] and terms.ratio.tolist() == [1.0, 1.0]
    terms.loss.sum().backward()
    assert new.grad.tolist() == [1.0, -1.0]  # plain REINFORCE on the per-token log-likelihood at ratio 1


def test_position_advantages_by_hand():
    # P=2 groups of G=3 samples over L=4 positions; position 3 is clamped (not chosen) in both groups.
    clean = torch.tensor(
        [
            [[1.0, 0.0, 1.0, 0.0], [1.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 1.0]],
            [[1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 1.0]],
        ]
    )
    success = torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 0.0]])
    chosen = torch.tensor([[True, True, True, False], [True, True, True, False]])
    advantages, kept = position_advantages(clean, success, chosen, satisfied_weight=0.5, success_weight=0.5)
    # Group 0: reward 0.5 * clean + 0.5 * success; at each position minus the group mean there, not divided by a std.
    r0 = [[0.5, 0.0, 0.5], [0.5, 0.5, 0.0], [1.0, 1.0, 1.0]]
    means = [sum(r[k] for r in r0) / 3 for k in range(3)]
    expected = [[r[k] - means[k] for k in range(3)] + [0.0] for r in r0]
    assert torch.allclose(advantages[0], torch.tensor(expected), atol=1e-7)
    # Group 1 agrees everywhere (the same flags, no success): no signal at any position, so it is not kept.
    assert advantages[1].abs().sum() == 0 and kept.tolist() == [True, False]


def test_negative_weight_scales_only_the_below_average_samples():
    advantages = torch.tensor([[0.6, -0.2, -0.4], [0.0, 1.0, -1.0]])
    assert torch.equal(scale_negatives(advantages, 1.0), advantages)  # GRPO
    assert torch.allclose(scale_negatives(advantages, 0.25), torch.tensor([[0.6, -0.05, -0.1], [0.0, 1.0, -0.25]]))
    assert torch.equal(scale_negatives(advantages, 0.0), advantages.clamp(min=0))  # only the better ones


def test_token_policy_loss_and_gradient_by_hand():
    # One sample, three chosen positions and one that is not (its terms must not count anywhere).
    new = torch.tensor([[1.0, 2.0, 0.5, 9.0]], requires_grad=True)
    old = torch.tensor([[1.1, 1.7, 0.5, 3.0]])
    ref = torch.tensor([[0.8, 2.0, 0.9, 0.0]])
    adv = torch.tensor([[0.5, -0.25, 0.1, 7.0]])
    chosen = torch.tensor([[True, True, True, False]])
    eps, beta = 0.2, 0.3
    terms = token_policy_terms(new, old, adv, chosen, eps, beta, ref)

    r = [math.exp(0.1), math.exp(-0.3), 1.0]
    surrogate = [-r[0] * 0.5, -(0.8 * -0.25), -0.1]  # position 1: ratio below 1 - eps with A < 0, clipped
    diff = ((1.0 - 0.8) + (2.0 - 2.0) + (0.5 - 0.9)) / 3  # per-token sequence likelihood difference to the reference
    assert terms.ratio.tolist() == pytest.approx([sum(r) / 3], rel=1e-6)
    assert terms.clipped.tolist() == pytest.approx([1 / 3])
    assert terms.kl.tolist() == pytest.approx([0.5 * diff**2], rel=1e-5)
    assert terms.loss.tolist() == pytest.approx([sum(surrogate) / 3 + beta * 0.5 * diff**2], rel=1e-6)
    terms.loss.sum().backward()
    grad = [r[0] * 0.5 / 3 + beta * diff / 3, 0.0 + beta * diff / 3, 0.1 / 3 + beta * diff / 3, 0.0]
    assert new.grad[0].tolist() == pytest.approx(grad, rel=1e-5, abs=1e-8)


def test_token_credit_with_one_advantage_per_sample_is_the_sequence_objective():
    """At the sampling policy (ratio 1), giving every chosen position the sample's advantage is exactly the sequence
    objective on the masked mean: the token level only redistributes the credit."""
    torch.manual_seed(0)
    positions = torch.rand(3, 5, requires_grad=True)
    chosen = torch.tensor([[True, True, False, True, True], [True, False, False, False, True], [True] * 5])
    ref = torch.rand(3, 5)
    adv = torch.tensor([0.7, -1.2, 0.3])
    weights = chosen.float()
    sequence = (positions * weights).sum(1) / weights.sum(1)
    seq_ref = (ref * weights).sum(1) / weights.sum(1)
    expected = policy_terms(sequence, sequence.detach(), adv, 0.2, 0.5, seq_ref).loss.sum()
    (seq_grad,) = torch.autograd.grad(expected, positions)
    tokens = token_policy_terms(positions, positions.detach(), adv[:, None].expand(3, 5), chosen, 0.2, 0.5, ref)
    (tok_grad,) = torch.autograd.grad(tokens.loss.sum(), positions)
    assert tokens.loss.sum().item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.allclose(tok_grad, seq_grad, atol=1e-7)


def test_sample_entropy_by_hand():
    a, b, c, d = 5, 6, 7, 8
    canvases = torch.tensor([[[a, a, a], [a, a, b], [a, b, c], [a, b, d]]])  # (P=1, G=4, L=3)
    free = torch.tensor([[True, True, False]])
    # column 0: one token -> 0; column 1: two tokens twice each -> log 2; column 2 is fixed (left out)
    assert sample_entropy(canvases, free) == pytest.approx(math.log(2) / 2, rel=1e-6)
    assert sample_entropy(canvases, torch.tensor([[False, False, True]])) == pytest.approx(math.log(4), rel=1e-6)


@pytest.fixture(scope="module")
def tiny_policy(char_tokenizer):
    torch.manual_seed(0)
    model = attach_lora(build_tiny(PresetSpec(**TINY), char_tokenizer), LoraSection(r=4, alpha=8, dense_mlp=True))
    task = SudokuTask()
    examples = task.build_dataset("test", 3, 0)
    batch = collate(
        [layout_example(char_tokenizer, task.to_prompt_canvas(e), 96, 256) for e in examples],
        char_tokenizer.pad_token_id,
    )
    # B != 0 so the adapter changes the policy (a fresh adapter is the base exactly).
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model, batch


def test_sequence_loss_is_the_training_loss_on_free_positions_and_coupled_by_seed(tiny_policy):
    from ftkit.diffusion.loss import diffusion_loss

    model, batch = tiny_policy
    cfg = DiffusionSection(self_conditioning_p=0.5, loss_chunk=32)
    free = ~batch["fixed"][:, 0]  # one block per example
    with torch.no_grad():
        first = sequence_loss(model, batch, free, cfg, [11])
        second = sequence_loss(model, batch, free, cfg, [12])
        both = sequence_loss(model, batch, free, cfg, [11, 12])
        tokens = diffusion_loss(
            model,
            batch,
            DiffusionSection(self_conditioning_p=0.5, loss_chunk=32, encoder_loss_weight=0.0),
            torch.Generator().manual_seed(11),
        ).token_losses
    # The draws are the training objective's for that seed (t, corruption, self-conditioning gate), so the current,
    # sampling and reference policies evaluated with one seed are coupled; the mean runs over free positions only.
    assert torch.equal(first, (tokens * free).sum(1) / free.sum(1))
    assert not torch.allclose(first, second)
    assert torch.allclose(both, (first + second) / 2, rtol=1e-6)
    with torch.no_grad():
        per_position = position_losses(model, batch, cfg, [11, 12])  # token credit's (B, L) terms, same draws
    assert torch.allclose((per_position * free).sum(1) / free.sum(1), both, rtol=1e-6)


def test_rl_gradient_through_the_model_is_the_hand_weighted_likelihood_gradient(tiny_policy):
    """grad of mean_i loss_i == sum_i c_i grad l_i with c_i = (A_i ratio_i [unclipped] + beta (l_i - l_ref_i)) / N."""
    model, batch = tiny_policy
    cfg = DiffusionSection(self_conditioning_p=0.0)
    free = ~batch["fixed"][:, 0]  # one block per example
    # Only the last encoder layer's k/v projections feed the decoder's cache: the rest of that layer has no gradient
    # without the AR co-loss (allow_unused), on both sides of the comparison alike.
    params = [p for p in model.parameters() if p.requires_grad]
    new = sequence_loss(model, batch, free, cfg, [5])
    old = new.detach() + torch.tensor([0.05, -0.5, 0.0])  # ratios e^0.05, e^-0.5 (clipped for A<0), 1
    ref = new.detach() + torch.tensor([0.1, 0.2, -0.3])
    adv = torch.tensor([1.5, -1.0, 0.7])
    beta = 0.3
    terms = policy_terms(new, old, adv, 0.2, beta, ref)
    rl_grads = torch.autograd.grad(terms.loss.sum() / 3, params, retain_graph=True, allow_unused=True)

    ratio = [math.exp(0.05), math.exp(-0.5), 1.0]
    coef = [(1.5 * ratio[0] + beta * -0.1) / 3, (0.0 + beta * -0.2) / 3, (0.7 * ratio[2] + beta * 0.3) / 3]
    per_sample = [torch.autograd.grad(new[i], params, retain_graph=True, allow_unused=True) for i in range(3)]
    assert sum(g is not None for g in rl_grads) > len(params) // 2
    for k, g in enumerate(rl_grads):
        if g is None:
            assert all(per_sample[i][k] is None for i in range(3))
            continue
        expected = sum(coef[i] * per_sample[i][k] for i in range(3))
        assert torch.allclose(g, expected, rtol=1e-4, atol=1e-6 * expected.abs().max().item()), k


def test_reference_policy_swaps_in_the_frozen_adapter_and_back(tiny_policy, char_tokenizer):
    model, batch = tiny_policy
    cfg = DiffusionSection(self_conditioning_p=0.0)
    free = ~batch["fixed"][:, 0]  # one block per example
    with torch.no_grad():
        start = sequence_loss(model, batch, free, cfg, [1])
        frozen = ReferencePolicy(model, frozen_adapter=True)
        base = ReferencePolicy(model, frozen_adapter=False)
        params = list(frozen.params)
        for p in params:
            p.add_(0.01)  # "training"
        moved = sequence_loss(model, batch, free, cfg, [1])
        with frozen.active():
            assert torch.equal(sequence_loss(model, batch, free, cfg, [1]), start)
        assert torch.equal(sequence_loss(model, batch, free, cfg, [1]), moved)
        assert [p for p in model.parameters() if p.requires_grad] == params  # the same Parameter objects
        with base.active():
            without = sequence_loss(model, batch, free, cfg, [1])
        core = model.get_base_model()
        with model.disable_adapter():
            assert torch.equal(sequence_loss(core, batch, free, cfg, [1]), without)
    assert not torch.allclose(without, moved)
    with torch.no_grad():
        for p, value in zip(frozen.params, frozen.frozen):
            p.copy_(value)


def test_canonical_canvas_fills_free_positions_after_the_first_eos():
    from ftkit.rl.rollout import canonical_canvas

    eos = 1
    canvas = torch.tensor([[5, eos, 6, 7, 8], [5, 6, 7, 8, 9]])
    free = torch.tensor([[True, True, True, False, True], [True] * 5])
    assert canonical_canvas(canvas, free, eos).tolist() == [[5, eos, eos, 7, eos], [5, 6, 7, 8, 9]]


def test_round_prompts_cover_the_split_once_per_pass_and_are_reproducible(char_tokenizer):
    from ftkit.recipe import EvalSection, RLSection
    from ftkit.rl.rollout import Rollout, derived_seed

    examples = list(range(10))
    rollout = Rollout(None, char_tokenizer, examples, [], RLSection(prompts_per_step=5), EvalSection(), seed=3)
    first_pass = rollout.prompts_for(0) + rollout.prompts_for(1)
    assert sorted(first_pass) == examples and first_pass != examples
    assert rollout.prompts_for(1) == Rollout(
        None, char_tokenizer, examples, [], RLSection(prompts_per_step=5), EvalSection(), seed=3
    ).prompts_for(1)
    assert sorted(rollout.prompts_for(2) + rollout.prompts_for(3)) == examples
    assert len({derived_seed(3, "sample", r, i) for r in range(4) for i in range(8)}) == 32


def test_canonical_canvas_closes_the_turn_at_the_first_stop():
    """With a chat template the SFT canvas is text, end-of-turn, EOS fill: a sample that stops with EOS (or with
    end-of-turn) is written that way, fixed positions untouched."""
    from ftkit.rl.rollout import canonical_canvas

    eos, eot = 1, 2
    canvas = torch.tensor([[5, eos, 6, 7, 8], [5, 6, eot, eos, 9], [5, 6, 7, 8, 9]])
    free = torch.tensor([[True, True, True, False, True], [True] * 5, [True] * 5])
    out = canonical_canvas(canvas, free, eos, stop_ids=(eot, eos), end_of_turn=eot)
    assert out.tolist() == [[5, eot, eos, 7, eos], [5, 6, eot, eos, eos], [5, 6, 7, 8, 9]]


def test_the_likelihood_counts_the_positions_the_policy_chose(char_tokenizer):
    """Clamped positions and, under token masks, the end-of-turn and fill positions past a one-block layout's
    pieces (only a stop token may go there) are no choice of the policy; with masks off every free position is."""
    from ftkit.diffusion.token_layout import stop_token_ids
    from ftkit.rl.rollout import chosen_positions
    from ftkit.tasks.base import Piece, PromptCanvas

    pc = PromptCanvas(
        prompt="p", pieces=(Piece("12", True), Piece("345", False, "0123456789"), Piece("6", True), Piece("78", False))
    )
    lay = layout_example(char_tokenizer, pc, 12, 64)  # 8 answer tokens, end of turn, 3 fill
    stops = stop_token_ids(char_tokenizer)
    assert chosen_positions(lay, stops, token_masks=True) == [
        False,
        False,
        True,
        True,
        True,
        False,
        True,
        True,
        False,
        False,
        False,
        False,
    ]
    assert chosen_positions(lay, stops, token_masks=False) == [
        False,
        False,
        True,
        True,
        True,
        False,
        True,
        True,
        True,
        True,
        True,
        True,
    ]


def test_token_credit_rewards_each_position_by_the_checker(char_tokenizer):
    """`rl.credit: token`: a chosen position is clean unless the task's checker flags it; a clash flags both clashing
    blank cells and nothing else; a violation without positions (unparsable) flags every chosen position."""
    from ftkit.diffusion.token_layout import stop_token_ids
    from ftkit.recipe import EvalSection, RLSection
    from ftkit.rl.rollout import Rollout, chosen_positions
    from ftkit.tasks.base import Violation

    task = SudokuTask()
    ex = task.build_dataset("test", 1, 0)[0]
    lay = layout_example(char_tokenizer, task.to_prompt_canvas(ex), 96, 256)
    rollout = Rollout(task, char_tokenizer, [ex], [lay], RLSection(credit="token"), EvalSection(), seed=0)
    chosen = torch.tensor([chosen_positions(lay, stop_token_ids(char_tokenizer), True)])
    right = torch.tensor([lay.canvas_ids])
    assert torch.equal(rollout.clean_positions([0], right, chosen), chosen.float())  # the solution: nothing flagged

    # Two blank cells of one row swapped: both now clash (with a given or a correct cell of their column or box).
    solution = ex.answer
    cells = [p for p in range(81) if ex.question[p] == "0"]
    a, b = next((x, y) for x in cells for y in cells if x < y and x // 9 == y // 9 and solution[x] != solution[y])
    wrong = right.clone()  # the char tokenizer: canvas position p holds cell p
    wrong[0, a], wrong[0, b] = right[0, b], right[0, a]
    clean = rollout.clean_positions([0], wrong, chosen)
    flagged = set(torch.nonzero((1 - clean[0]) * chosen[0].float()).flatten().tolist())
    text = "".join(char_tokenizer.convert_ids_to_tokens(wrong[0, :81].tolist()))
    assert flagged == {p for v in task.check(ex, text) for p in v.positions}
    assert {a, b} <= flagged and all(ex.question[p] == "0" for p in flagged)

    class Unparsable(SudokuTask):
        def check(self, example, output):
            return [Violation("parse", "no grid")]

    rollout.task = Unparsable()
    assert rollout.clean_positions([0], right, chosen).sum() == 0
