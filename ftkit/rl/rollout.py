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
from ftkit.diffusion.sample import denoise
from ftkit.diffusion.token_layout import TokenLayout, canvas_to_text, end_of_turn_id, stop_token_ids
from ftkit.evaluation.verify import MAX_RENOISE_ROUNDS, flagged_tokens, rows_verifier
from ftkit.model import arch
from ftkit.recipe import EvalSection, RLSection
from ftkit.rl.objective import group_advantages, position_advantages, sample_entropy, scale_negatives
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
    samples: list[TokenLayout]  # per sample (group-major): its prompt layout with the sampled canvas as canvas_ids
    outputs: list[str]  # decoded text per sample
    rewards: torch.Tensor  # (N,) weighted reward
    satisfied: torch.Tensor  # (N,) fraction of constraints satisfied
    success: torch.Tensor  # (N,) 0/1
    advantages: torch.Tensor  # (N,), or (N, L) per position with `rl.credit: token`
    kept: torch.Tensor  # (N,) bool: the sample's group has a reward spread (others are skipped)
    guided: torch.Tensor  # (N,) bool: drawn with verifier re-noising (`rl.guided`), not by the policy alone
    chosen: torch.Tensor  # (N, L) bool: the positions the likelihood counts (`chosen_positions`)
    group_size: int
    entropy: float  # sample_entropy of the round
    flagged: float  # fraction of the chosen positions the task's checker flags (token credit; 0 otherwise)
    decoder_calls: int  # batched decoder forward calls the sampler made
    seconds: float

    @property
    def kept_indices(self) -> list[int]:
        return torch.nonzero(self.kept).flatten().tolist()

    def metrics(self) -> dict[str, float]:
        groups = self.rewards.view(-1, self.group_size)
        own = ~self.guided  # the reward curve follows the policy's own samples
        guided = {"guided_reward": float(self.rewards[self.guided].mean())} if self.guided.any() else {}
        return {
            "reward": float(self.rewards[own].mean()),
            "reward_std": float(groups.std(dim=1).mean()),
            "satisfied": float(self.satisfied[own].mean()),
            "success": float(self.success[own].mean()),
            **guided,
            "skipped_groups": float((~self.kept.view(-1, self.group_size)[:, 0]).float().mean()),
            "sample_entropy": self.entropy,
            **({"flagged": self.flagged} if self.advantages.dim() == 2 else {}),
        }


def chosen_positions(layout: TokenLayout, stops, token_masks: bool) -> list[bool]:
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


def canonical_canvas(
    canvas: torch.Tensor, free: torch.Tensor, eos_id: int, stop_ids=None, end_of_turn: int | None = None
) -> torch.Tensor:
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

    def __init__(
        self,
        task,
        tokenizer,
        examples: list[Example],
        layouts: list[TokenLayout],
        rl: RLSection,
        sampler_cfg: EvalSection,
        seed: int,
        sampler=denoise,
    ):
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
        group = self.rl.group_size
        prompts = self.prompts_for(index)
        rows = [p for p in prompts for _ in range(group)]
        layouts = [self.layouts[p] for p in rows]
        length = layouts[0].block_length
        eos = self.tokenizer.eos_token_id
        stops = stop_token_ids(self.tokenizer)
        fixed = torch.tensor([lay.block(0)[1] for lay in layouts], dtype=torch.bool)
        guided = torch.tensor([i % group >= group - self.rl.guided for i in range(len(rows))])
        blocks, calls = self._denoise(model, index, rows, layouts, guided)
        canvas = canonical_canvas(torch.stack(blocks), ~fixed, eos, stops, end_of_turn_id(self.tokenizer))
        outputs = [canvas_to_text(self.tokenizer, row) for row in canvas.tolist()]
        parts = [reward_parts(self.task, self.examples[p], out) for p, out in zip(rows, outputs)]
        satisfied = torch.tensor([r.satisfied for r in parts], dtype=torch.float32)
        success = torch.tensor([r.success for r in parts], dtype=torch.float32)
        rewards = self.rl.reward.satisfied * satisfied + self.rl.reward.success * success
        samples = [_sample_layout(lay, row, set(stops)) for lay, row in zip(layouts, canvas.tolist())]
        chosen = torch.tensor(
            [chosen_positions(lay, stops, self.sampler_cfg.token_masks) for lay in layouts], dtype=torch.bool
        )
        advantages, kept_groups, flagged = self._advantages(rows, canvas, chosen, rewards, success, length)
        return Round(
            index=index,
            prompts=prompts,
            samples=samples,
            outputs=outputs,
            rewards=rewards,
            satisfied=satisfied,
            success=success,
            advantages=advantages,
            kept=kept_groups.repeat_interleave(group),
            guided=guided,
            chosen=chosen,
            group_size=group,
            entropy=sample_entropy(
                canvas.view(-1, group, canvas.shape[1]), chosen.view(-1, group, chosen.shape[1])[:, 0]
            ),
            flagged=flagged,
            decoder_calls=calls,
            seconds=time.perf_counter() - started,
        )

    def _denoise(self, model, index: int, rows: list[int], layouts, guided: torch.Tensor):
        """(one block of tokens per sample, decoder calls): the plain samples first, then the guided ones, in
        batches of eval.batch_size, each sample under its own seed."""
        device = next(model.parameters()).device
        length = layouts[0].block_length
        eos = self.tokenizer.eos_token_id
        stops = stop_token_ids(self.tokenizer)
        vocab = arch.vocab_size(model) if self.sampler_cfg.token_masks else None
        blocks: list[torch.Tensor | None] = [None] * len(rows)
        calls = 0
        batch_size = self.sampler_cfg.batch_size
        for use_verifier in (False, True):
            indices = [i for i in range(len(rows)) if bool(guided[i]) == use_verifier]
            for start in range(0, len(indices), batch_size):
                chunk = indices[start : start + batch_size]
                # One canvas per sample (an RL action is one block), with the task's token masks as in `ftkit
                # eval`; a guided sample is re-noised where the task's checker flags it, as `eval --verifier` does.
                result = denoise_blocks(
                    model,
                    [layouts[i] for i in chunk],
                    generators=[seeded_generator(derived_seed(self.seed, "sample", index, i), device) for i in chunk],
                    max_new_tokens=length,
                    stop_ids=stops,
                    pad_id=self.pad_id,
                    vocab_size=vocab,
                    sampler=self.sampler,
                    verifier=self._verifier([rows[i] for i in chunk]) if use_verifier else None,
                    max_renoise_rounds=MAX_RENOISE_ROUNDS if use_verifier else 0,
                    steps=self.sampler_cfg.steps,
                    **self.sampler_cfg.sampler_kwargs(),
                    clamp=self.sampler_cfg.clamp,
                )
                for i, tokens in zip(chunk, result.tokens):
                    blocks[i] = torch.tensor((tokens + [eos] * length)[:length], dtype=torch.long)
                calls += result.forward_passes
        return blocks, calls

    def _advantages(self, rows: list[int], canvas, chosen, rewards, success, length: int):
        """(advantages, kept groups, flagged fraction): per position from the checker's flags with token credit,
        else per sample from the group's rewards; negatives scaled by rl.negative_weight."""
        group = self.rl.group_size
        flagged = 0.0
        if self.rl.credit == "token":
            clean = self.clean_positions(rows, canvas, chosen)
            flagged = float(((1 - clean) * chosen).sum() / chosen.sum().clamp(min=1))
            per_group = chosen.view(-1, group, length)[:, 0]
            advantages, kept_groups = position_advantages(
                clean.view(-1, group, length),
                success.view(-1, group),
                per_group,
                self.rl.reward.satisfied,
                self.rl.reward.success,
            )
            advantages = advantages.flatten(0, 1)
        else:
            advantages, kept_groups = group_advantages(rewards.view(-1, group))
            advantages = advantages.flatten()
        return scale_negatives(advantages, self.rl.negative_weight), kept_groups, flagged

    def _verifier(self, rows: list[int]):
        return rows_verifier(self.tokenizer, self.task, [self.examples[p] for p in rows])

    def clean_positions(self, rows: list[int], canvas: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
        """(N, L) float: 1 at a chosen position the task's checker does not flag in that sample, 0 where it does
        (a violation with no positions, such as "unparsable", flags every chosen position, as in the reward)."""
        stops = stop_token_ids(self.tokenizer)
        clean = chosen.clone().float()  # 0 off the chosen positions from the start
        for i, (p, row) in enumerate(zip(rows, canvas.tolist())):
            tokens, global_violation = flagged_tokens(self.tokenizer, self.task, self.examples[p], row, stops)
            if global_violation:
                clean[i] = 0.0
            else:
                clean[i, tokens] = 0.0
        return clean


def _sample_layout(layout: TokenLayout, row: list[int], stops: set[int]) -> TokenLayout:
    """The prompt's layout with a sampled canvas as its one block: the encoder reads the prompt and the sample up to
    and including its first stop token, as it reads an SFT answer."""
    content = next((i + 1 for i, t in enumerate(row) if t in stops), len(row))
    return dataclasses.replace(layout, canvas_ids=row, fixed=layout.block(0)[1], content_length=content, allowed=[])
