"""The recipe's schema: one frozen dataclass per YAML section, each key with its default and its help, and each
section's own checks (`check(where)`) beside its fields.

How a YAML file becomes a `Recipe` (types, overrides, presets) is `ftkit.recipe.load`; the checks that span
sections, and the ones that ask transformers or the task, are `ftkit.recipe.validate`.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple

import yaml

from ftkit.errors import RecipeError
from ftkit.recipe.coerce import type_name

TINY = "tiny"
SMALL = "small"
REAL_BASE = "google/diffusiongemma-26B-A4B-it"


def require(ok: bool, where: str, path: str, message: str) -> None:
    """A range check's failure, naming the recipe (`where`) and the key (`path`)."""
    if not ok:
        raise RecipeError(f"{where}: `{path}` {message}")


@dataclass(frozen=True)
class PresetSpec:
    """Dimensions of a random-init preset (`model.base: tiny` or `small`): the same classes as the real model, small
    enough for a CPU. The defaults are the `tiny` preset's."""

    layers: int = field(default=2, metadata={"help": "Text layers: sliding-window attention, the last one global."})
    hidden: int = field(default=96, metadata={"help": "Hidden size."})
    heads: int = field(default=4, metadata={"help": "Attention heads; a multiple of `kv_heads`."})
    kv_heads: int = field(default=2, metadata={"help": "Key/value heads (grouped-query attention)."})
    head_dim: int = field(default=24, metadata={"help": "Width of one head of the sliding-window layers."})
    global_head_dim: int = field(default=48, metadata={"help": "Width of one head of the global-attention layers."})
    intermediate: int = field(default=192, metadata={"help": "Width of the shared dense MLP beside the experts."})
    experts: int = field(default=4, metadata={"help": "Experts per MoE layer."})
    top_k: int = field(default=2, metadata={"help": "Experts each token is routed to; at most `experts`."})
    expert_intermediate: int = field(default=64, metadata={"help": "Width of one expert's MLP."})
    canvas_length: int = field(default=96, metadata={"help": "Tokens in the decoder's canvas (the real model: 256)."})
    init_seed: int = field(default=0, metadata={"help": "Seed of the random initialization."})
    embedding_std: float = field(
        default=0.15,
        metadata={
            "help": "Init scale of the (tied, frozen) embeddings; bounds the reachable logits at about "
            "hidden * embedding_std."
        },
    )

    def check(self, where: str) -> None:
        require(self.top_k <= self.experts, where, "model.tiny.top_k", "must be <= model.tiny.experts")
        for key in (
            "layers",
            "hidden",
            "heads",
            "kv_heads",
            "head_dim",
            "global_head_dim",
            "intermediate",
            "experts",
            "top_k",
            "expert_intermediate",
            "canvas_length",
        ):
            require(getattr(self, key) > 0, where, f"model.tiny.{key}", "must be > 0")
        require(self.heads % self.kv_heads == 0, where, "model.tiny.heads", "must be a multiple of model.tiny.kv_heads")
        require(self.embedding_std > 0, where, "model.tiny.embedding_std", "must be > 0")


# The random-init presets `model.base` can name. `model.tiny` holds the dimensions; the keys a recipe leaves out of it
# take the named preset's values (`tiny`: CPU tests and demos; `small`: ~8M parameters, from-scratch training on a
# GPU, e.g. recipes/small/sudoku.yaml).
PRESETS: dict[str, PresetSpec] = {
    TINY: PresetSpec(),
    SMALL: PresetSpec(
        layers=6,
        hidden=256,
        heads=8,
        kv_heads=4,
        head_dim=32,
        global_head_dim=64,
        intermediate=512,
        experts=8,
        top_k=2,
        expert_intermediate=128,
        embedding_std=0.05,
    ),
}


@dataclass(frozen=True)
class ModelSection:
    """Which base model to load, and how. `base: tiny` or `base: small` builds a random-init DiffusionGemma from
    `model.tiny`; keys left out of `model.tiny` take the named preset's values (the defaults below are `tiny`'s;
    `small` is 6 layers, hidden 256, 8 experts of 128, intermediate 512: 8.8M parameters)."""

    base: str = field(
        default=REAL_BASE,
        metadata={
            "help": "A Hugging Face hub id, a local directory, or a random-init preset: `tiny` or `small` (built "
            "from `model.tiny`)."
        },
    )
    dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16",
        metadata={
            "help": "dtype of the base's weights (a preset, or full training, keeps float32 weights and computes in "
            "bfloat16 under autocast on a GPU when this is bfloat16)."
        },
    )
    attn_implementation: Literal["sdpa", "eager"] = field(
        default="sdpa", metadata={"help": "transformers' attention implementation."}
    )
    revision: str | None = field(
        default=None, metadata={"help": "Hub revision (branch, tag or commit) of `base`; null: the default branch."}
    )
    loader: Literal["transformers", "unsloth"] = field(
        default="transformers",
        metadata={
            "help": "transformers: `from_pretrained` (ftkit's 4-bit path streams the experts through the GPU). "
            "unsloth: Unsloth's FastDiffusionModel (`pip install ftkit[unsloth]`; its 4-bit/8-bit loading). "
            "See docs/performance.md."
        },
    )
    tiny: PresetSpec = field(
        default_factory=PresetSpec, metadata={"help": "The preset's dimensions (used when `base` is a preset)."}
    )

    def check(self, where: str) -> None:
        self.tiny.check(where)


@dataclass(frozen=True)
class QuantSection:
    """Quantization of the frozen base (QLoRA). `mode: 8bit` needs `model.loader: unsloth`, whose 4-bit loading is NF4
    with double quantization computing in `model.dtype` (other settings are refused)."""

    mode: Literal["none", "4bit", "8bit"] = field(
        default="none",
        metadata={
            "help": "none: full precision. 4bit: bitsandbytes 4-bit. 8bit: bitsandbytes LLM.int8 linears, only "
            "with `model.loader: unsloth`."
        },
    )
    quant_type: Literal["nf4", "fp4"] = field(
        default="nf4", metadata={"help": "4-bit data type (Unsloth's loading needs nf4)."}
    )
    double_quant: bool = field(
        default=True,
        metadata={"help": "Quantize the quantization constants too (Unsloth's loading needs true)."},
    )
    compute_dtype: Literal["bfloat16", "float16", "float32"] = field(
        default="bfloat16",
        metadata={"help": "dtype the 4-bit weights compute in (Unsloth's loading needs `model.dtype`)."},
    )
    experts: bool = field(
        default=True,
        metadata={
            "help": "Also quantize the fused 3-D MoE expert tensors, which bitsandbytes skips (ftkit quantizes them "
            "itself)."
        },
    )
    blocksize: int = field(
        default=64,
        metadata={"help": "Weights per 4-bit quantization block: a power of two in [32, 4096]."},
    )
    expert_chunk: int = field(
        default=32,
        metadata={
            "help": "Experts dequantized at a time in the 4-bit expert forward and backward; 0: all 128 at once. "
            "Bounds the transient dense copy to expert_chunk/128 of ~1.5 GB per layer at the real widths."
        },
    )

    def check(self, where: str) -> None:
        require(self.expert_chunk >= 0, where, "quant.expert_chunk", "must be >= 0 (0 = all experts at once)")
        if self.mode == "4bit":
            require(
                self.blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096),
                where,
                "quant.blocksize",
                "must be a power of two in [32, 4096]",
            )


@dataclass(frozen=True)
class LoraSection:
    """Which modules get LoRA adapters (unused when `train.trainable: full`). Expert LoRA goes through PEFT's
    `target_parameters`."""

    r: int = field(default=16, metadata={"help": "LoRA rank."})
    alpha: int = field(default=32, metadata={"help": "LoRA alpha: the update is scaled by alpha / r."})
    dropout: float = field(default=0.0, metadata={"help": "LoRA dropout, in [0, 1); must be 0 when `experts` is true."})
    attention: bool = field(default=True, metadata={"help": "Adapt q/k/v/o of the encoder and decoder text layers."})
    experts: bool = field(
        default=True,
        metadata={
            "help": "Adapt the fused MoE expert tensors (each expert's gate/up and down projections), through PEFT's "
            "`target_parameters`."
        },
    )
    expert_r: int | None = field(
        default=None,
        metadata={
            "help": "Rank of each expert's LoRA; null: `r`. Every one of the 128 experts gets its own pair (at r=16 "
            "~0.95B parameters at full depth); alpha is scaled with it (alpha / r is kept)."
        },
    )
    dense_mlp: bool = field(default=False, metadata={"help": "Adapt the shared dense MLP beside the experts."})
    encoder: bool = field(default=True, metadata={"help": "Adapt the encoder stack."})
    decoder: bool = field(default=True, metadata={"help": "Adapt the decoder stack."})
    shared_stacks: bool = field(
        default=False,
        metadata={
            "help": "One adapter serves both stacks, as the base weights do (every encoder LoRA tensor is the "
            "decoder's), so `ftkit export` keeps the released checkpoint's tied layout and size (docs/serving.md)."
        },
    )

    def check(self, where: str) -> None:
        require(self.r > 0, where, "lora.r", "must be > 0")
        require(self.expert_r is None or self.expert_r > 0, where, "lora.expert_r", "must be > 0 (or null for lora.r)")
        require(0.0 <= self.dropout < 1.0, where, "lora.dropout", "must be in [0, 1)")
        # PEFT's ParamWrapper (LoRA on the fused expert tensors) cannot factor dropout out of x @ (W + BA).
        require(self.dropout == 0.0 or not self.experts, where, "lora.dropout", "must be 0 when `lora.experts` is true")
        require(self.encoder or self.decoder, where, "lora.encoder", "and `lora.decoder` cannot both be false")
        require(
            not self.shared_stacks or (self.encoder and self.decoder),
            where,
            "lora.shared_stacks",
            "needs `lora.encoder` and `lora.decoder` both true (one adapter serves both stacks)",
        )
        require(
            self.attention or self.experts or self.dense_mlp,
            where,
            "lora.attention",
            "`lora.experts` and `lora.dense_mlp` cannot all be false: nothing would train",
        )


@dataclass(frozen=True)
class DiffusionSection:
    """The block-diffusion training objective: one response block per example, its tokens replaced by uniform random
    tokens at a noise level t (ftkit/diffusion/loss.py)."""

    eps: float = field(default=1e-3, metadata={"help": "Minimum corruption ratio: t ~ U(eps, 1); in [0, 1)."})
    self_conditioning_p: float = field(
        default=0.5,
        metadata={
            "help": "Probability that the decoder is conditioned on its own predictions from a first, no-grad pass."
        },
    )
    encoder_loss_weight: float = field(
        default=1.0,
        metadata={"help": "Weight of the encoder's autoregressive cross-entropy added to the diffusion loss; 0: off."},
    )
    loss_chunk: int = field(
        default=0,
        metadata={
            "help": "Canvas positions per chunk of the cross-entropy over the vocabulary; 0: unchunked. Must be 0 "
            "under FSDP (docs/multi-gpu.md)."
        },
    )

    def check(self, where: str) -> None:
        require(0.0 <= self.eps < 1.0, where, "diffusion.eps", "must be in [0, 1)")
        require(0.0 <= self.self_conditioning_p <= 1.0, where, "diffusion.self_conditioning_p", "must be in [0, 1]")
        require(self.encoder_loss_weight >= 0.0, where, "diffusion.encoder_loss_weight", "must be >= 0")
        require(self.loss_chunk >= 0, where, "diffusion.loss_chunk", "must be >= 0")


@dataclass(frozen=True)
class TrainSection:
    """Optimisation and the run directory (`output_dir`)."""

    output_dir: str = field(
        default="runs/run", metadata={"help": "The run directory: everything the run writes goes here."}
    )
    trainable: Literal["lora", "full"] = field(
        default="lora",
        metadata={
            "help": "lora: adapters on a frozen base (the `lora` section). full: every weight of the text model "
            "trains (router included) and the run saves a full model: for random-init presets and small local "
            "checkpoints; refused for a 4-bit base and for bases over 2B parameters."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the training run (TrainingArguments' seed and data_seed)."})
    max_steps: int = field(default=200, metadata={"help": "Optimizer steps to train."})
    batch_size: int = field(default=8, metadata={"help": "Examples per device per forward pass."})
    grad_accum: int = field(default=1, metadata={"help": "Forward passes accumulated per optimizer step."})
    learning_rate: float = field(default=2e-4, metadata={"help": "Peak learning rate (after warmup)."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay."})
    warmup_steps: int = field(
        default=10, metadata={"help": "Warmup steps to `learning_rate` (for the schedulers that warm up)."}
    )
    lr_scheduler: Literal[
        "constant",
        "constant_with_warmup",
        "linear",
        "cosine",
        "cosine_with_min_lr",
        "cosine_with_restarts",
        "polynomial",
        "inverse_sqrt",
        "warmup_stable_decay",
    ] = field(
        default="cosine",
        metadata={
            "help": "transformers' scheduler name; its arguments (e.g. cosine_with_min_lr's min_lr) go in "
            "`training_args.lr_scheduler_kwargs`."
        },
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor"] = field(
        default="adamw_torch",
        metadata={
            "help": "transformers' optimizer name; the 8-bit ones (bitsandbytes) keep AdamW's two states in 1 byte "
            "each."
        },
    )
    logging_steps: int = field(default=10, metadata={"help": "Log the metrics every this many steps."})
    save_steps: int = field(default=50, metadata={"help": "Write a checkpoint every this many steps."})
    save_total_limit: int = field(default=2, metadata={"help": "Checkpoints kept; older ones are deleted."})
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    checkpoint_encoder: bool = field(
        default=True,
        metadata={
            "help": "With `gradient_checkpointing`, checkpoint the encoder layers too (ftkit keeps their KV-cache "
            "writes to one)."
        },
    )
    max_prompt_length: int = field(
        default=512,
        metadata={
            "help": "Longest prompt in tokens; a longer example is an error naming it (or skipped, by tasks "
            "that skip bad rows)."
        },
    )
    num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes; 0: the main process."})
    cpu_threads: int = field(
        default=0,
        metadata={
            "help": "Intra-op CPU threads for train and eval; 0: OMP_NUM_THREADS if set, else the CPUs this process "
            "may use that other work leaves idle (ftkit/run/threads.py)."
        },
    )
    report_to: Literal["none", "tensorboard", "wandb"] = field(
        default="none", metadata={"help": "Where transformers also reports the metrics."}
    )

    def check(self, where: str) -> None:
        require(
            self.output_dir.strip() != "",
            where,
            "train.output_dir",
            "must not be empty (a run is a directory of its own)",
        )
        for key in ("max_steps", "batch_size", "grad_accum", "logging_steps", "save_steps", "max_prompt_length"):
            require(getattr(self, key) > 0, where, f"train.{key}", "must be > 0")
        require(self.learning_rate > 0, where, "train.learning_rate", "must be > 0")
        require(self.cpu_threads >= 0, where, "train.cpu_threads", "must be >= 0 (0 = automatic)")


@dataclass(frozen=True)
class TaskSection:
    """The task plugin and its data. `name: chat` trains on your own data (docs/tasks.md)."""

    name: str = field(
        default="sudoku", metadata={"help": "A registered task (`ftkit tasks` lists them; options below)."}
    )
    train_size: int = field(default=2000, metadata={"help": "Training examples to build or read; 0: none."})
    test_size: int = field(default=100, metadata={"help": "Held-out (test split) examples to build or read."})
    seed: int = field(default=0, metadata={"help": "Seed the task builds (or draws) its examples with."})
    data_path: str | None = field(
        default=None,
        metadata={"help": "Your data (CSV, FASTA, ...) in the task's format; null: the task's built-in examples."},
    )
    options: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "The task's own options, checked against its `Options` (see Task options below)."},
    )

    def check(self, where: str) -> None:
        for key in ("train_size", "test_size"):
            require(getattr(self, key) >= 0, where, f"task.{key}", "must be >= 0")


# The eval keys that set the sampler, each by the name transformers' DiffusionGemmaGenerationConfig gives it (ftkit's
# own `denoise` takes the recipe's names). In the order a rejected setting is looked for.
SAMPLER_KEYS = {
    "steps": "max_denoising_steps",
    "entropy_bound": "entropy_bound",
    "temperature_min": "t_min",
    "temperature_max": "t_max",
    "stability_threshold": "stability_threshold",
    "confidence_threshold": "confidence_threshold",
}


@dataclass(frozen=True)
class EvalSection:
    """Constrained denoising used by `ftkit eval`, `ftkit generate` and `ftkit solve`."""

    split: str = field(default="test", metadata={"help": "The split `ftkit eval` evaluates: test or train."})
    num_examples: int = field(default=100, metadata={"help": "Examples evaluated (at most the split's size)."})
    batch_size: int = field(default=16, metadata={"help": "Examples denoised together."})
    steps: int = field(default=32, metadata={"help": "Most denoising steps per canvas (it may stop earlier)."})
    temperature_min: float = field(
        default=0.0,
        metadata={
            "help": "Low end of the linear temperature schedule (transformers' t_min; the last of `steps` steps "
            "samples at t_min + (t_max - t_min) / steps)."
        },
    )
    temperature_max: float = field(default=0.7, metadata={"help": "Sampling temperature at the first step."})
    entropy_bound: float = field(
        default=0.3,
        metadata={
            "help": "Each step accepts the lowest-entropy tokens whose summed entropy (nats, less the largest) stays "
            "under this bound; the rest are re-noised."
        },
    )
    stability_threshold: int = field(
        default=3,
        metadata={
            "help": "Stop once the argmax canvas is unchanged for this many steps and confident "
            "(`confidence_threshold`)."
        },
    )
    confidence_threshold: float = field(
        default=0.05,
        metadata={"help": "Confident: the mean entropy (nats) of the free positions is under this value."},
    )
    clamp: bool = field(
        default=True,
        metadata={
            "help": "Pin the positions the task fixes (given cells, text around a hole) to their tokens; false: they "
            "start as noise like the rest and the model must reproduce them."
        },
    )
    token_masks: bool = field(
        default=True,
        metadata={
            "help": "Constrained decoding: mask each canvas position's logits to the tokens the task allows there "
            "(digits on Sudoku cells, residues in a protein, no end-of-text before given content), every step."
        },
    )
    verifier_renoise: bool = field(
        default=False,
        metadata={
            "help": "After a pass, re-noise the positions the task's checker flags and denoise again (`ftkit eval "
            "--verifier`)."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed of the sampler (one generator per example)."})
    max_new_tokens: int | None = field(
        default=None,
        metadata={
            "help": "Answer length in tokens, generated block after block until a stop token (end of turn / EOS); "
            "null: one canvas."
        },
    )
    allow_weak_sandbox: bool = field(
        default=False,
        metadata={
            "help": "Run model-written code (code_infill tests) in the weak sandbox (a Python audit hook, not a "
            "security boundary) where the kernel refuses the real one's namespaces; false: such an evaluation "
            "stops with an error."
        },
    )

    def check(self, where: str) -> None:
        for key in ("num_examples", "batch_size", "steps"):
            require(getattr(self, key) > 0, where, f"eval.{key}", "must be > 0")
        require(
            self.max_new_tokens is None or self.max_new_tokens > 0,
            where,
            "eval.max_new_tokens",
            "must be > 0 (or null for one canvas)",
        )

    def sampler_kwargs(self) -> dict[str, Any]:
        """The sampler settings as `ftkit.diffusion.sample.denoise`'s keyword arguments (its step budget, `steps`,
        is the caller's: a command line may change it)."""
        return {key: getattr(self, key) for key in SAMPLER_KEYS if key != "steps"}

    def generation_config_values(self) -> dict[str, Any]:
        """The sampler settings by the names of transformers' DiffusionGemmaGenerationConfig."""
        return {name: getattr(self, key) for key, name in SAMPLER_KEYS.items()}

    def check_sampler(self, where: str) -> None:
        """The sampler settings through transformers' own DiffusionGemmaGenerationConfig validation (not a copy of
        its rules): what it rejects, `ftkit eval` would fail on."""
        from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
            DiffusionGemmaGenerationConfig,
            EntropyBoundSamplerConfig,
        )

        def build(**kwargs) -> Exception | None:
            try:
                if "entropy_bound" in kwargs:
                    kwargs["sampler_config"] = EntropyBoundSamplerConfig(entropy_bound=kwargs.pop("entropy_bound"))
                DiffusionGemmaGenerationConfig(**kwargs)
            except (ValueError, TypeError, AttributeError) as e:  # AttributeError: some of its messages are broken
                return e
            return None

        values = self.generation_config_values()
        error = build(**values)
        if error is None:
            return
        recipe_key = {name: f"eval.{key}" for key, name in SAMPLER_KEYS.items()}
        # Name the keys: the first one rejected on its own, else the pair that clashes (t_min / t_max).
        alone = [name for name in values if build(**{name: values[name]}) is not None]
        names = alone[:1] or ["t_min", "t_max"]
        keys = " and ".join(f"`{recipe_key[n]}`={values[n]!r}" for n in names)
        message = f"{where}: {keys}: rejected by transformers' DiffusionGemmaGenerationConfig"
        if isinstance(error, ValueError):  # (a few of its messages raise an AttributeError themselves: no detail then)
            pattern = re.compile(r"\b(" + "|".join(recipe_key) + r")\b")
            message += f" ({pattern.sub(lambda m: recipe_key[m.group(1)], str(error))})"
        raise RecipeError(message)


@dataclass(frozen=True)
class RewardWeights:
    """reward = satisfied * (fraction of the task's constraints the output satisfies) + success * (1 if it
    satisfies them all: solved / valid / tests pass). Defined per task by `Task.reward` or derived from `check()`."""

    satisfied: float = field(
        default=0.5, metadata={"help": "Weight of the fraction of the task's constraints the output satisfies."}
    )
    success: float = field(
        default=0.5, metadata={"help": "Weight of success: every constraint satisfied (solved / valid / tests pass)."}
    )


@dataclass(frozen=True)
class RLSection:
    """`ftkit rl`: group-relative policy optimization (GRPO) with the task's verifier as reward and the diffusion ELBO
    as likelihood (docs/rl.md)."""

    init_from: str | None = field(
        default=None,
        metadata={
            "help": "A finished `ftkit train` run whose adapter RL continues (its model/quant/lora sections must "
            "equal this recipe's); null: a fresh LoRA on `model.base`."
        },
    )
    group_size: int = field(
        default=8,
        metadata={"help": "Canvases sampled per prompt; advantages are normalized within each group (at least 2)."},
    )
    prompts_per_step: int = field(default=4, metadata={"help": "Prompts per round of sampling."})
    num_iterations: int = field(
        default=2,
        metadata={"help": "Optimizer steps per round of samples (the ratio is taken against the sampling policy)."},
    )
    clip_eps: float = field(
        default=0.2,
        metadata={"help": "The importance ratio is clipped to [1 - clip_eps, 1 + clip_eps]; in (0, 1)."},
    )
    kl_coef: float = field(
        default=1.0,
        metadata={
            "help": "Weight of the k2 KL penalty to the reference policy, on the per-token likelihood difference "
            "(ESPO's beta=0.01 on the sequence-level difference of a 256-token answer is about 2.5 here)."
        },
    )
    elbo_samples: int = field(default=2, metadata={"help": "Corruption draws averaged per likelihood (ELBO) estimate."})
    reward: RewardWeights = field(
        default_factory=RewardWeights, metadata={"help": "The reward's weights (see `rl.reward.*`)."}
    )
    credit: Literal["sequence", "token"] = field(
        default="sequence",
        metadata={
            "help": "Who gets the credit. sequence: every chosen position of a sample shares its group-normalized "
            "advantage (ESPO). token: a position's reward is whether the task's checker flags it (plus the "
            "sample's success), compared with the group at the same position."
        },
    )
    guided: int = field(
        default=0,
        metadata={
            "help": "Samples of each group drawn with verifier-guided re-noising instead of by the policy alone "
            "(off-policy targets with a reward spread the policy can learn); 0: every sample is the policy's own. "
            "Less than `group_size`."
        },
    )
    negative_weight: float = field(
        default=1.0,
        metadata={
            "help": "Scale of the negative advantages, in [0, 1]: 1 = GRPO, 0 = only better-than-group samples are "
            "reinforced (filtered self-training); pushing tokens down raises the sampler's entropy (docs/rl.md)."
        },
    )
    evaluate: bool = field(
        default=True,
        metadata={"help": "Evaluate the held-out split before and after RL (same sampler, same seeds): rl_eval.json."},
    )

    def check(self, where: str) -> None:
        require(
            self.group_size >= 2, where, "rl.group_size", "must be >= 2 (advantages compare samples within a group)"
        )
        for key in ("prompts_per_step", "num_iterations", "elbo_samples"):
            require(getattr(self, key) > 0, where, f"rl.{key}", "must be > 0")
        require(0.0 < self.clip_eps < 1.0, where, "rl.clip_eps", "must be in (0, 1)")
        require(0.0 <= self.negative_weight <= 1.0, where, "rl.negative_weight", "must be in [0, 1]")
        require(
            0 <= self.guided < self.group_size,
            where,
            "rl.guided",
            f"must be >= 0 and < rl.group_size ({self.group_size}): a group needs at least one sample of the "
            "policy's own",
        )
        require(self.kl_coef >= 0.0, where, "rl.kl_coef", "must be >= 0")
        reward = self.reward
        require(reward.satisfied >= 0.0 and reward.success >= 0.0, where, "rl.reward", "weights must be >= 0")
        require(reward.satisfied + reward.success > 0.0, where, "rl.reward", "weights cannot both be 0")


@dataclass(frozen=True)
class HubSection:
    """Defaults for `ftkit push`."""

    repo: str | None = field(
        default=None, metadata={"help": "Hub repo id USER/NAME to push to; `ftkit push --repo` overrides it."}
    )
    private: bool = field(default=False, metadata={"help": "Create the repo private."})


@dataclass(frozen=True)
class Recipe:
    model: ModelSection = field(default_factory=ModelSection, metadata={"help": "The base model."})
    quant: QuantSection = field(default_factory=QuantSection, metadata={"help": "Quantization of the base."})
    lora: LoraSection = field(default_factory=LoraSection, metadata={"help": "The LoRA adapters."})
    diffusion: DiffusionSection = field(default_factory=DiffusionSection, metadata={"help": "The training objective."})
    train: TrainSection = field(default_factory=TrainSection, metadata={"help": "Optimisation and the run directory."})
    task: TaskSection = field(default_factory=TaskSection, metadata={"help": "The task and its data."})
    eval: EvalSection = field(default_factory=EvalSection, metadata={"help": "The sampler and the evaluation."})
    hub: HubSection = field(default_factory=HubSection, metadata={"help": "Defaults for `ftkit push`."})
    training_args: dict[str, Any] = field(
        default_factory=dict,
        metadata={
            "help": "Any other `transformers.TrainingArguments` field, passed through: e.g. `adam_beta1: 0.95`, "
            "`lr_scheduler_kwargs: {min_lr: 1.5e-5}` (with `train.lr_scheduler: cosine_with_min_lr`). Checked "
            "against TrainingArguments' own fields and types; a field that has a recipe key (`learning_rate` is "
            "`train.learning_rate`) or that ftkit sets itself (`bf16`, `save_strategy`, ...) is an error naming "
            "where it goes."
        },
    )
    rl: RLSection = field(default_factory=RLSection, metadata={"help": "`ftkit rl`."})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def is_random_init(self) -> bool:
        """A random-init preset (`tiny` or `small`): built from `model.tiny`, its base saved under RUN/base."""
        return self.model.base in PRESETS

    @property
    def is_full(self) -> bool:
        """Full-parameter training: the run holds a full model (config.json + model.safetensors), not an adapter."""
        return self.train.trainable == "full"


class KeyRow(NamedTuple):
    """One key of the schema as the reference lists it."""

    key: str  # the dotted path, e.g. `train.max_steps`
    type: str
    default: str  # as YAML writes it
    help: str  # the field's `metadata["help"]` ("" when it has none)


def schema_rows(cls: type | None = None, prefix: str = "") -> list[KeyRow]:
    """Every key of the schema (default: the whole `Recipe`), nested sections flattened: the source of
    docs/recipe-reference.md."""
    cls = Recipe if cls is None else cls
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(schema_rows(tp, path))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = f.default_factory()  # type: ignore[misc]
        else:
            default = None
        shown = yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip()
        rows.append(KeyRow(path, type_name(tp), shown, f.metadata.get("help", "")))
    return rows
