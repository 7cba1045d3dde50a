"""One round of RL samples: which prompts, G canvases per prompt from the eval sampler, rewards and advantages.

Every random choice is a pure function of (train.seed, round index[, row]): the prompts of round r come from a
seeded permutation of the training split (a fresh one per pass over it), and row i of round r is denoised with its
own generator seeded by (seed, r, i). So a resumed run samples exactly what the uninterrupted run sampled, and a row
does not depend on its batch neighbours.
"""

from __future__ import annotations

import dataclasses
import hashlib
import time
from dataclasses import dataclass

import torch

from ftkit.diffusion.blocks import denoise_blocks
from ftkit.diffusion.loss import core_model
from ftkit.diffusion.sample import denoise, schedule_kwargs
from ftkit.layout import Layout, canvas_to_text, end_of_turn_id, stop_token_ids
from ftkit.recipe import EvalSection, RLSection
from ftkit.rl.objective import group_advantages, sample_entropy
from ftkit.tasks.base import Example, reward_parts


def derived_seed(*parts: object) -> int:
    """A 63-bit seed from a tuple of ints/strings: distinct tuples give unrelated streams."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") >> 1


def seeded_generator(seed: int, device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed)
    return generator


@dataclass
class Round:
    index: int
    prompts: list[int]  # training-example index of each group
    samples: list[Layout]  # per sample (group-major): its prompt layout with the sampled canvas as canvas_ids
    outputs: list[str]  # decoded text per sample
    rewards: torch.Tensor  # (N,) weighted reward
    satisfied: torch.Tensor  # (N,) fraction of constraints satisfied
    success: torch.Tensor  # (N,) 0/1
    advantages: torch.Tensor  # (N,)
    kept: torch.Tensor  # (N,) bool: the sample's group has a reward spread (others are skipped)
    chosen: torch.Tensor  # (N, L) bool: the positions the likelihood counts (`chosen_positions`)
    group_size: int
    entropy: float  # sample_entropy of the round
    decoder_calls: int  # batched decoder forward calls the sampler made
    seconds: float

    @property
    def kept_indices(self) -> list[int]:
        return torch.nonzero(self.kept).flatten().tolist()

    def metrics(self) -> dict[str, float]:
        groups = self.rewards.view(-1, self.group_size)
        return {
            "reward": float(self.rewards.mean()),
            "reward_std": float(groups.std(dim=1).mean()),
            "satisfied": float(self.satisfied.mean()),
            "success": float(self.success.mean()),
            "skipped_groups": float((~self.kept.view(-1, self.group_size)[:, 0]).float().mean()),
            "sample_entropy": self.entropy,
        }


def chosen_positions(layout: Layout, stops, token_masks: bool) -> list[bool]:
    """Per canvas position of a one-block layout: whether the sampled token there is the policy's choice. Not a
    clamped position, and not one whose token rule admits only stop tokens (past a one-block layout's pieces,
    under `eval.token_masks`): every sample ends there, the masked policy gives that token probability 1 whatever
    its weights, and counting it in the per-token likelihood would only dilute the ratio and the gradient (a
    protein canvas is about half such fill)."""
    _, fixed = layout.block(0)
    rules = layout.block_rules(0) if token_masks else []
    stop_set = frozenset(stops)
    chosen = []
    for p, clamped in enumerate(fixed):
        rule = rules[p] if p < len(rules) else None
        forced = rule is not None and not rule.exclude and rule.ids <= stop_set
        chosen.append(not clamped and not forced)
    return chosen


def canonical_canvas(canvas: torch.Tensor, free: torch.Tensor, eos_id: int, stop_ids=None,
                     end_of_turn: int | None = None) -> torch.Tensor:
    """The canvas the SFT data would hold for the same text: at the first stop token (`stop_ids`, default EOS) the
    end-of-turn token (when the chat template has one), EOS on every free position after it. The decoded text (and
    so the reward) is unchanged, and the likelihood does not reward junk after the end. Fixed positions are never
    touched."""
    stops = torch.tensor(sorted(set(stop_ids) if stop_ids is not None else {eos_id}), device=canvas.device)
    is_stop = torch.isin(canvas, stops)
    seen = is_stop.long().cumsum(dim=1)
    first, after = is_stop & (seen == 1), seen > 0
    out = torch.where(after & free, torch.full_like(canvas, eos_id), canvas)
    if end_of_turn is not None:
        out = torch.where(first & free, torch.full_like(canvas, end_of_turn), out)
    return out


class Rollout:
    """Samples rounds for one training split with the recipe's `eval` sampler settings (verifier re-noising off:
    the samples must be the policy's own, or the reward would credit the verifier's corrections)."""

    def __init__(self, task, tokenizer, examples: list[Example], layouts: list[Layout], rl: RLSection,
                 sampler_cfg: EvalSection, seed: int, sampler=denoise):
        self.task = task
        self.tokenizer = tokenizer
        self.examples = examples
        self.layouts = layouts
        self.rl = rl
        self.sampler_cfg = sampler_cfg
        self.seed = seed
        self.sampler = sampler
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def prompts_for(self, index: int) -> list[int]:
        """Round `index`'s prompts: consecutive slots of a sequence of seeded permutations of the training split."""
        n, count = len(self.examples), self.rl.prompts_per_step
        out = []
        for slot in range(index * count, (index + 1) * count):
            epoch, position = divmod(slot, n)
            order = torch.randperm(n, generator=seeded_generator(derived_seed(self.seed, "prompts", epoch), "cpu"))
            out.append(int(order[position]))
        return out

    @torch.no_grad()
    def sample(self, model, index: int) -> Round:
        started = time.perf_counter()
        device = next(model.parameters()).device
        group = self.rl.group_size
        prompts = self.prompts_for(index)
        rows = [p for p in prompts for _ in range(group)]
        layouts = [self.layouts[p] for p in rows]
        length = layouts[0].block_length
        eos = self.tokenizer.eos_token_id
        stops = stop_token_ids(self.tokenizer)
        vocab = core_model(model).config.get_text_config().vocab_size if self.sampler_cfg.token_masks else None
        fixed = torch.tensor([lay.block(0)[1] for lay in layouts], dtype=torch.bool)
        canvases, calls = [], 0
        batch_size = self.sampler_cfg.batch_size
        for start in range(0, len(rows), batch_size):
            chunk = layouts[start : start + batch_size]
            # One canvas per sample (an RL action is one block), with the task's token masks as in `ftkit eval`.
            result = denoise_blocks(
                model, chunk,
                generators=[seeded_generator(derived_seed(self.seed, "sample", index, start + i), device)
                            for i in range(len(chunk))],
                max_new_tokens=length, stop_ids=stops, pad_id=self.pad_id, vocab_size=vocab, sampler=self.sampler,
                steps=self.sampler_cfg.steps, **schedule_kwargs(self.sampler_cfg), clamp=self.sampler_cfg.clamp,
            )
            block = torch.tensor([(tokens + [eos] * length)[:length] for tokens in result.tokens], dtype=torch.long)
            canvases.append(canonical_canvas(block, ~fixed[start : start + len(chunk)], eos, stops,
                                             end_of_turn_id(self.tokenizer)))
            calls += result.forward_passes
        canvas = torch.cat(canvases)
        outputs = [canvas_to_text(self.tokenizer, row) for row in canvas.tolist()]
        parts = [reward_parts(self.task, self.examples[p], out) for p, out in zip(rows, outputs)]
        satisfied = torch.tensor([r.satisfied for r in parts], dtype=torch.float32)
        success = torch.tensor([r.success for r in parts], dtype=torch.float32)
        rewards = self.rl.reward.satisfied * satisfied + self.rl.reward.success * success
        advantages, kept_groups = group_advantages(rewards.view(-1, group))
        samples = [_sample_layout(lay, row, set(stops)) for lay, row in zip(layouts, canvas.tolist())]
        chosen = torch.tensor([chosen_positions(lay, stops, self.sampler_cfg.token_masks) for lay in layouts],
                              dtype=torch.bool)
        return Round(
            index=index,
            prompts=prompts,
            samples=samples,
            outputs=outputs,
            rewards=rewards,
            satisfied=satisfied,
            success=success,
            advantages=advantages.flatten(),
            kept=kept_groups.repeat_interleave(group),
            chosen=chosen,
            group_size=group,
            entropy=sample_entropy(canvas.view(-1, group, canvas.shape[1]), chosen.view(-1, group, chosen.shape[1])[:, 0]),
            decoder_calls=calls,
            seconds=time.perf_counter() - started,
        )


def _sample_layout(layout: Layout, row: list[int], stops: set[int]) -> Layout:
    """The prompt's layout with a sampled canvas as its one block: the encoder reads the prompt and the sample up to
    and including its first stop token, as it reads an SFT answer."""
    content = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    return dataclasses.replace(layout, canvas_ids=row, fixed=layout.block(0)[1], content_length=content, allowed=[])
