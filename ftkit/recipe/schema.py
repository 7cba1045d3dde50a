"""YAML recipe -> frozen, typed sections.

Every key is checked against the dataclasses below: an unknown key is an error naming its dotted path (with a
"did you mean" suggestion), a wrong type names the key and the expected type, and `a.b=v` overrides from the
command line go through the same validation. Task-specific options (`task.options`) are validated against the
options dataclass the task itself declares.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from ftkit.errors import FtkitError, RecipeError

TINY = "tiny"
SMALL = "small"
REAL_BASE = "google/diffusiongemma-26B-A4B-it"


@dataclass(frozen=True)
class PresetSpec:
    """Dimensions of the random-init `tiny` preset: the same classes as the real model, small enough for CPU."""

    layers: int = 2
    hidden: int = 96
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 24
    global_head_dim: int = 48
    intermediate: int = 192
    experts: int = 4
    top_k: int = 2
    expert_intermediate: int = 64
    canvas_length: int = 96
    init_seed: int = 0
    # Init scale of the (tied, frozen) embeddings; bounds the reachable logits at ~hidden * embedding_std.
    embedding_std: float = 0.15


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
    base: str = REAL_BASE  # hub id, local directory, or a random-init preset: "tiny" or "small"
    dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    attn_implementation: Literal["sdpa", "eager"] = "sdpa"
    revision: str | None = None
    # How the base is loaded: transformers' from_pretrained (ftkit's 4-bit path: experts streamed through the GPU)
    # or Unsloth's FastDiffusionModel (pip install ftkit[unsloth]; its 4-bit/8-bit loading). docs/performance.md.
    loader: Literal["transformers", "unsloth"] = "transformers"
    tiny: PresetSpec = field(default_factory=PresetSpec)  # preset dimensions (defaults shown: the `tiny` preset's)


@dataclass(frozen=True)
class QuantSection:
    mode: Literal["none", "4bit", "8bit"] = "none"  # 8bit: bitsandbytes LLM.int8 linears, with model.loader=unsloth
    quant_type: Literal["nf4", "fp4"] = "nf4"
    double_quant: bool = True
    compute_dtype: Literal["bfloat16", "float16", "float32"] = "bfloat16"
    # bitsandbytes skips the fused 3-D expert tensors; ftkit quantizes them itself when this is on.
    experts: bool = True
    blocksize: int = 64
    # Experts dequantized at a time in the 4-bit expert forward/backward (0 = all 128 at once): bounds the transient
    # dense copy to expert_chunk/128 of ~1.5 GB per layer at the real widths.
    expert_chunk: int = 32


@dataclass(frozen=True)
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    attention: bool = True  # q/k/v/o of encoder and decoder text layers
    experts: bool = True  # experts.gate_up_proj / experts.down_proj via PEFT target_parameters
    # Rank of each expert's LoRA (null = r). PEFT gives every one of the 128 experts its own rank-r pair, so at r=16
    # the experts carry ~0.95B LoRA parameters at full depth; alpha is scaled with it (alpha/r is kept).
    expert_r: int | None = None
    dense_mlp: bool = False  # the shared dense MLP beside the experts
    encoder: bool = True
    decoder: bool = True
    # One adapter serves both stacks, as the base weights do (the encoder's text weights are the decoder's): every
    # encoder LoRA tensor is the decoder's. `ftkit export` then keeps the released checkpoint's tied layout and size.
    shared_stacks: bool = False


@dataclass(frozen=True)
class DiffusionSection:
    eps: float = 1e-3  # minimum corruption ratio: t ~ U(eps, 1)
    self_conditioning_p: float = 0.5
    encoder_loss_weight: float = 1.0
    # Chunk size (canvas positions) of the cross-entropy over the vocabulary; 0 = unchunked.
    loss_chunk: int = 0


@dataclass(frozen=True)
class TrainSection:
    output_dir: str = "runs/run"
    # lora: adapters on a frozen base (the `lora` section). full: every weight of the text model trains (router
    # included) and the run saves a full model instead of an adapter: for random-init presets and small local
    # checkpoints; refused for a 4-bit base and for bases over 2B parameters.
    trainable: Literal["lora", "full"] = "lora"
    seed: int = 0
    max_steps: int = 200
    batch_size: int = 8
    grad_accum: int = 1
    learning_rate: float = 2e-4
    weight_decay: float = 0.0
    warmup_steps: int = 10
    # transformers' scheduler names; arguments (e.g. cosine_with_min_lr's min_lr) go in training_args.lr_scheduler_kwargs
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
    ] = "cosine"
    max_grad_norm: float = 1.0
    # transformers' optimizer names; the 8-bit ones (bitsandbytes) keep AdamW's two states in 1 byte each.
    optim: Literal["adamw_torch", "adamw_torch_fused", "adamw_bnb_8bit", "paged_adamw_8bit", "adafactor"] = (
        "adamw_torch"
    )
    logging_steps: int = 10
    save_steps: int = 50
    save_total_limit: int = 2
    gradient_checkpointing: bool = False
    # With gradient_checkpointing: checkpoint the encoder layers too (ftkit keeps their KV-cache writes to one).
    checkpoint_encoder: bool = True
    max_prompt_length: int = 512
    num_workers: int = 0
    # Intra-op CPU threads for train and eval (0 = OMP_NUM_THREADS if set, else the CPUs this process may use that
    # other work leaves idle; see ftkit/run/threads.py).
    cpu_threads: int = 0
    report_to: Literal["none", "tensorboard", "wandb"] = "none"


@dataclass(frozen=True)
class TaskSection:
    name: str = "sudoku"
    train_size: int = 2000
    test_size: int = 100
    seed: int = 0
    data_path: str | None = None  # user data (CSV, FASTA, ...) instead of the built-in builder
    options: dict[str, Any] = field(default_factory=dict)  # validated by the task's own Options dataclass


@dataclass(frozen=True)
class EvalSection:
    split: str = "test"
    num_examples: int = 100
    batch_size: int = 16
    steps: int = 32
    temperature_min: float = 0.0
    temperature_max: float = 0.7
    entropy_bound: float = 0.3
    stability_threshold: int = 3
    confidence_threshold: float = 0.05
    clamp: bool = True
    # Constrained decoding: mask each canvas position's logits to the tokens the task allows there (digits on Sudoku
    # cells, residues in a protein, no end-of-text before given content, stop tokens on the fill), every step.
    token_masks: bool = True
    verifier_renoise: bool = False
    seed: int = 0
    # Answer length in tokens, generated block after block until a stop token (end of turn / EOS); null: one canvas.
    max_new_tokens: int | None = None
    # Run model-written code (code_infill tests) in the weak sandbox (a Python audit hook, not a security boundary)
    # where the kernel refuses the namespaces of the real one; off: such an evaluation stops with an error instead.
    allow_weak_sandbox: bool = False


@dataclass(frozen=True)
class RewardWeights:
    """reward = satisfied * (fraction of the task's constraints the output satisfies) + success * (1 if it
    satisfies them all: solved / valid / tests pass). Defined per task by `Task.reward` or derived from `check()`."""

    satisfied: float = 0.5
    success: float = 0.5


@dataclass(frozen=True)
class RLSection:
    """`ftkit rl`: group-relative policy optimization with the task's verifier as reward (docs/rl.md)."""

    # A finished `ftkit train` run whose adapter RL continues (its model/quant/lora sections must equal this
    # recipe's); null = a fresh LoRA on model.base.
    init_from: str | None = None
    group_size: int = 8  # canvases sampled per prompt; advantages are normalized within each group
    prompts_per_step: int = 4  # prompts per round of sampling
    num_iterations: int = 2  # optimizer steps per round of samples (the ratio is taken against the sampling policy)
    clip_eps: float = 0.2  # the importance ratio is clipped to [1 - clip_eps, 1 + clip_eps]
    # Weight of the k2 KL penalty to the reference policy, on the per-token likelihood difference (ESPO's beta=0.01
    # on the sequence-level difference of a 256-token answer is about 2.5 here).
    kl_coef: float = 1.0
    elbo_samples: int = 2  # corruption draws averaged per likelihood (ELBO) estimate
    reward: RewardWeights = field(default_factory=RewardWeights)
    # Who gets the credit. sequence: every chosen position of a sample shares its group-normalized advantage
    # (ESPO). token: a position's reward is whether the task's checker flags it (plus the sample's success),
    # compared with the group at the same position: the verifier's per-position verdicts as dense credit.
    credit: Literal["sequence", "token"] = "sequence"
    # Of each group's samples, how many are drawn with verifier-guided re-noising (`ftkit eval --verifier`) instead
    # of by the policy alone: the checker steers them to better answers, so the group has a reward spread in a
    # direction the policy can learn (off-policy targets; 0 = every sample is the policy's own).
    guided: int = 0
    # Scale of the negative advantages: 1 = GRPO, 0 = only the better-than-group samples are reinforced (filtered
    # self-training); pushing tokens down raises the sampler's entropy (docs/rl.md).
    negative_weight: float = 1.0
    evaluate: bool = True  # evaluate the held-out split before and after RL (same sampler, same seeds): rl_eval.json


@dataclass(frozen=True)
class HubSection:
    repo: str | None = None
    private: bool = False


@dataclass(frozen=True)
class Recipe:
    model: ModelSection = field(default_factory=ModelSection)
    quant: QuantSection = field(default_factory=QuantSection)
    lora: LoraSection = field(default_factory=LoraSection)
    diffusion: DiffusionSection = field(default_factory=DiffusionSection)
    train: TrainSection = field(default_factory=TrainSection)
    task: TaskSection = field(default_factory=TaskSection)
    eval: EvalSection = field(default_factory=EvalSection)
    hub: HubSection = field(default_factory=HubSection)
    # Any other transformers.TrainingArguments field (adam_beta1, lr_scheduler_kwargs, ...), passed through unchanged;
    # checked against TrainingArguments' own fields and types (`_validate_training_args`).
    training_args: dict[str, Any] = field(default_factory=dict)
    rl: RLSection = field(default_factory=RLSection)

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


# ----------------------------------------------------------------------------------------------------------------
# Validation


_SCI_FLOAT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if origin is dict:
        return "mapping"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, path: str, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats). Raise naming the key path."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if value is None:
            value = {}
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: `{path}` must be a mapping of {tp.__name__} keys, got {type(value).__name__}")
        return build_dataclass(tp, value, where, prefix=path)
    if origin is Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise RecipeError(f"{where}: `{path}` must be one of {', '.join(map(repr, allowed))}; got {value!r}")
        return value
    if origin in (typing.Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, path, where)
            except RecipeError as e:
                errors.append(e)
        raise RecipeError(f"{where}: `{path}` expects {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if tp is type(None):
        if value is not None:
            raise RecipeError(f"{where}: `{path}` expects null, got {value!r}")
        return None
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{where}: `{path}` expects a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{where}: `{path}` expects bool (true/false), got {value!r} ({type(value).__name__})")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{where}: `{path}` expects int, got {value!r} ({type(value).__name__})")
        return value
    if tp is float:
        # PyYAML (YAML 1.1) reads `1e-3` as a string; accept plain scientific notation for float keys.
        if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
            return float(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{where}: `{path}` expects float, got {value!r} ({type(value).__name__})")
        try:
            return float(value)
        except OverflowError:
            raise RecipeError(f"{where}: `{path}` is too large for a float") from None
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{where}: `{path}` expects str, got {value!r} ({type(value).__name__})")
        return value
    raise TypeError(f"unsupported annotation {tp!r} at {path}")  # a bug in a schema, not user input


def build_dataclass(cls: type, data: dict[str, Any], where: str, prefix: str = "") -> Any:
    """Build the frozen dataclass `cls` from a mapping, rejecting unknown keys and wrong types by dotted path."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        shown = _shown(key) if isinstance(key, str) else repr(key)
        path = f"{prefix}.{shown}" if prefix else shown
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean `{prefix + '.' if prefix else ''}{close[0]}`?" if close else ""
            raise RecipeError(f"{where}: unknown key `{path}`{hint} (known: {', '.join(names)})")
        kwargs[key] = _coerce(value, hints[key], path, where)
    return cls(**kwargs)


def _check_ranges(recipe: Recipe, where: str) -> None:
    def need(cond: bool, path: str, msg: str) -> None:
        if not cond:
            raise RecipeError(f"{where}: `{path}` {msg}")

    need(0.0 <= recipe.diffusion.eps < 1.0, "diffusion.eps", "must be in [0, 1)")
    need(0.0 <= recipe.diffusion.self_conditioning_p <= 1.0, "diffusion.self_conditioning_p", "must be in [0, 1]")
    need(recipe.diffusion.encoder_loss_weight >= 0.0, "diffusion.encoder_loss_weight", "must be >= 0")
    need(recipe.diffusion.loss_chunk >= 0, "diffusion.loss_chunk", "must be >= 0")
    need(recipe.lora.r > 0, "lora.r", "must be > 0")
    need(recipe.lora.expert_r is None or recipe.lora.expert_r > 0, "lora.expert_r", "must be > 0 (or null for lora.r)")
    need(0.0 <= recipe.lora.dropout < 1.0, "lora.dropout", "must be in [0, 1)")
    # PEFT's ParamWrapper (LoRA on the fused expert tensors) cannot factor dropout out of x @ (W + BA).
    need(recipe.lora.dropout == 0.0 or not recipe.lora.experts, "lora.dropout", "must be 0 when `lora.experts` is true")
    need(recipe.lora.encoder or recipe.lora.decoder, "lora.encoder", "and `lora.decoder` cannot both be false")
    need(
        not recipe.lora.shared_stacks or (recipe.lora.encoder and recipe.lora.decoder),
        "lora.shared_stacks",
        "needs `lora.encoder` and `lora.decoder` both true (one adapter serves both stacks)",
    )
    need(
        recipe.lora.attention or recipe.lora.experts or recipe.lora.dense_mlp,
        "lora.attention",
        "`lora.experts` and `lora.dense_mlp` cannot all be false: nothing would train",
    )
    need(
        recipe.train.output_dir.strip() != "", "train.output_dir", "must not be empty (a run is a directory of its own)"
    )
    for key in ("max_steps", "batch_size", "grad_accum", "logging_steps", "save_steps", "max_prompt_length"):
        need(getattr(recipe.train, key) > 0, f"train.{key}", "must be > 0")
    need(recipe.train.learning_rate > 0, "train.learning_rate", "must be > 0")
    need(recipe.train.cpu_threads >= 0, "train.cpu_threads", "must be >= 0 (0 = automatic)")
    for key in ("train_size", "test_size"):
        need(getattr(recipe.task, key) >= 0, f"task.{key}", "must be >= 0")
    for key in ("num_examples", "batch_size", "steps"):
        need(getattr(recipe.eval, key) > 0, f"eval.{key}", "must be > 0")
    need(
        recipe.eval.max_new_tokens is None or recipe.eval.max_new_tokens > 0,
        "eval.max_new_tokens",
        "must be > 0 (or null for one canvas)",
    )
    rl = recipe.rl
    need(rl.group_size >= 2, "rl.group_size", "must be >= 2 (advantages compare samples within a group)")
    for key in ("prompts_per_step", "num_iterations", "elbo_samples"):
        need(getattr(rl, key) > 0, f"rl.{key}", "must be > 0")
    need(0.0 < rl.clip_eps < 1.0, "rl.clip_eps", "must be in (0, 1)")
    need(0.0 <= rl.negative_weight <= 1.0, "rl.negative_weight", "must be in [0, 1]")
    need(
        0 <= rl.guided < rl.group_size,
        "rl.guided",
        f"must be >= 0 and < rl.group_size ({rl.group_size}): a group needs at least one sample of the policy's own",
    )
    need(rl.kl_coef >= 0.0, "rl.kl_coef", "must be >= 0")
    need(rl.reward.satisfied >= 0.0 and rl.reward.success >= 0.0, "rl.reward", "weights must be >= 0")
    need(rl.reward.satisfied + rl.reward.success > 0.0, "rl.reward", "weights cannot both be 0")
    t = recipe.model.tiny
    need(t.top_k <= t.experts, "model.tiny.top_k", "must be <= model.tiny.experts")
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
        need(getattr(t, key) > 0, f"model.tiny.{key}", "must be > 0")
    need(t.heads % t.kv_heads == 0, "model.tiny.heads", "must be a multiple of model.tiny.kv_heads")
    need(t.embedding_std > 0, "model.tiny.embedding_std", "must be > 0")
    need(recipe.quant.expert_chunk >= 0, "quant.expert_chunk", "must be >= 0 (0 = all experts at once)")
    need(
        not (recipe.is_full and recipe.quant.mode != "none"),
        "train.trainable",
        f"is `full`, which needs a full-precision base: {recipe.quant.mode} weights cannot be trained (set "
        f"quant.mode=none, or train.trainable=lora to train adapters on the {recipe.quant.mode} base)",
    )
    _check_loader(recipe, need)
    if recipe.quant.mode == "4bit":
        need(
            recipe.quant.blocksize in (32, 64, 128, 256, 512, 1024, 2048, 4096),
            "quant.blocksize",
            "must be a power of two in [32, 4096]",
        )


def _check_loader(recipe: Recipe, need) -> None:
    """What Unsloth's loading cannot honour is refused rather than silently changed: it builds its own bitsandbytes
    config (NF4, double quantization, computing in model.dtype) and has the 8-bit mode the transformers path lacks."""
    q = recipe.quant
    if recipe.model.loader == "transformers":
        need(q.mode != "8bit", "quant.mode", "is 8bit, which only model.loader=unsloth loads (use 4bit or none)")
    elif q.mode == "4bit":
        need(q.quant_type == "nf4", "quant.quant_type", "must be nf4 with model.loader=unsloth (its 4-bit loading)")
        need(q.double_quant, "quant.double_quant", "must be true with model.loader=unsloth (its 4-bit loading)")
        need(
            q.compute_dtype == recipe.model.dtype,
            "quant.compute_dtype",
            f"must equal model.dtype ({recipe.model.dtype}) with model.loader=unsloth (its 4-bit loading)",
        )


# The recipe's eval keys by the name DiffusionGemmaGenerationConfig gives them, for its error messages.
_SAMPLER_KEYS = {
    "max_denoising_steps": "eval.steps",
    "entropy_bound": "eval.entropy_bound",
    "t_min": "eval.temperature_min",
    "t_max": "eval.temperature_max",
    "stability_threshold": "eval.stability_threshold",
    "confidence_threshold": "eval.confidence_threshold",
}


def _check_sampler(cfg: EvalSection, where: str) -> None:
    """The sampler settings through transformers' own DiffusionGemmaGenerationConfig validation (not a copy of its
    rules): what it rejects, `ftkit eval` would fail on."""
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

    values = {
        "max_denoising_steps": cfg.steps,
        "entropy_bound": cfg.entropy_bound,
        "t_min": cfg.temperature_min,
        "t_max": cfg.temperature_max,
        "stability_threshold": cfg.stability_threshold,
        "confidence_threshold": cfg.confidence_threshold,
    }
    error = build(**values)
    if error is None:
        return
    # Name the keys: the first one rejected on its own, else the pair that clashes (t_min / t_max).
    alone = [name for name in values if build(**{name: values[name]}) is not None]
    names = alone[:1] or ["t_min", "t_max"]
    keys = " and ".join(f"`{_SAMPLER_KEYS[n]}`={values[n]!r}" for n in names)
    message = f"{where}: {keys}: rejected by transformers' DiffusionGemmaGenerationConfig"
    if isinstance(error, ValueError):  # (a few of its messages raise an AttributeError themselves: no detail then)
        pattern = re.compile(r"\b(" + "|".join(_SAMPLER_KEYS) + r")\b")
        message += f" ({pattern.sub(lambda m: _SAMPLER_KEYS[m.group(1)], str(error))})"
    raise RecipeError(message)


def _validate_task(recipe: Recipe, where: str) -> Recipe:
    from ftkit.tasks import get_task  # late: tasks import heavy optional deps

    try:
        task_cls = get_task(recipe.task.name)
    except KeyError as e:
        raise RecipeError(f"{where}: `task.name`: {e.args[0]}") from None
    options = build_dataclass(task_cls.Options, recipe.task.options, where, prefix="task.options")
    try:
        task_cls(options)  # the task checks its option ranges in its constructor: surface them at validation
    except FtkitError as e:
        raise RecipeError(f"{where}: {e}") from None
    return dataclasses.replace(recipe, task=dataclasses.replace(recipe.task, options=dataclasses.asdict(options)))


# TrainingArguments fields a recipe sets through its own keys (one place per setting) ...
TRAINING_ARGS_FROM_KEYS = {
    "output_dir": "train.output_dir",
    "max_steps": "train.max_steps",
    "per_device_train_batch_size": "train.batch_size",
    "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.learning_rate",
    "weight_decay": "train.weight_decay",
    "warmup_steps": "train.warmup_steps",
    "lr_scheduler_type": "train.lr_scheduler",
    "max_grad_norm": "train.max_grad_norm",
    "optim": "train.optim",
    "logging_steps": "train.logging_steps",
    "save_steps": "train.save_steps",
    "save_total_limit": "train.save_total_limit",
    "seed": "train.seed",
    "data_seed": "train.seed",
    "activation_checkpointing": "train.gradient_checkpointing",
    "gradient_checkpointing": "train.gradient_checkpointing",
    "dataloader_num_workers": "train.num_workers",
    "report_to": "train.report_to",
}
# ... and the ones ftkit decides itself (the device and precision, the checkpoint layout, the batch columns).
TRAINING_ARGS_OWNED = {
    "use_cpu": "it follows the device",
    "bf16": "it follows model.dtype and the device",
    "fp16": "it follows model.dtype",
    "save_strategy": "checkpoints are written every train.save_steps",
    "remove_unused_columns": "the collator needs every column",
    "disable_tqdm": "ftkit shows its own progress",
    "ddp_find_unused_parameters": "ftkit sets it for DDP",
    "activation_checkpointing_kwargs": "ftkit checkpoints without reentrancy",
    "gradient_checkpointing_kwargs": "ftkit checkpoints without reentrancy",
    "push_to_hub": "use `ftkit push`",
    "resume_from_checkpoint": "use --resume",
}


def _accepts(value: Any, tp: Any) -> bool:
    """Does `value` (from YAML) fit the TrainingArguments annotation `tp`? Unknown kinds of annotation are left to
    TrainingArguments itself; an enum (even `Enum | str`) must be one of its values."""
    import enum

    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is Any or tp is None and value is None:
        return True
    if tp is type(None):
        return value is None
    if origin in (typing.Union, types.UnionType):
        enums = [a for a in args if isinstance(a, type) and issubclass(a, enum.Enum)]
        if enums and isinstance(value, str):
            return any(value in {m.value for m in e} for e in enums)
        return any(_accepts(value, a) for a in args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return value in {m.value for m in tp}
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is list or origin is list:
        return isinstance(value, list) and (not args or all(_accepts(v, args[0]) for v in value))
    if tp is dict or origin is dict:
        return isinstance(value, dict)
    return True


def _enum_values(tp: Any) -> list[Any]:
    import enum

    kinds = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return [m.value for k in kinds if isinstance(k, type) and issubclass(k, enum.Enum) for m in k]


def _floats(value: Any) -> Any:
    """PyYAML reads `1e-5` as a string; in training_args a plain scientific number is meant as a float."""
    if isinstance(value, str) and _SCI_FLOAT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return value


def _validate_training_args(recipe: Recipe, where: str) -> Recipe:
    if not recipe.training_args:
        return recipe
    from transformers import TrainingArguments  # late: a second or more to import

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    hints = typing.get_type_hints(TrainingArguments)
    values = _floats(recipe.training_args)
    for key, value in values.items():
        path = f"training_args.{_shown(str(key))}"
        if key in TRAINING_ARGS_FROM_KEYS:
            raise RecipeError(f"{where}: `{path}` is set by `{TRAINING_ARGS_FROM_KEYS[key]}`; set it there")
        if key in TRAINING_ARGS_OWNED:
            raise RecipeError(f"{where}: `{path}` is not configurable here: {TRAINING_ARGS_OWNED[key]}")
        if key not in fields:
            close = difflib.get_close_matches(str(key), sorted(fields), n=1)
            hint = f"; did you mean `training_args.{close[0]}`?" if close else ""
            raise RecipeError(f"{where}: unknown key `{path}`: not a transformers.TrainingArguments field{hint}")
        if hints.get(key) is None:
            raise RecipeError(f"{where}: `{path}` is deprecated in this transformers version")
        if not _accepts(value, hints[key]):
            choices = _enum_values(hints[key])
            expected = f"one of {', '.join(map(repr, choices))}" if choices else _type_name(hints[key])
            raise RecipeError(f"{where}: `{path}` expects {expected}, got {value!r}")
    return dataclasses.replace(recipe, training_args=values)


def _shown(text: str) -> str:
    """User text as it goes into a one-line error message."""
    return text if text.isprintable() else repr(text)


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.max_steps=10` -> (["train", "max_steps"], 10). The value is parsed as YAML (so `null`, `1e-4`, `[1,2]`)."""
    shown = _shown(text)
    if "=" not in text:
        raise RecipeError(f"override `{shown}`: expected KEY.PATH=VALUE, e.g. train.max_steps=10")
    key, raw = text.split("=", 1)
    parts = [p for p in key.strip().split(".")]
    if not key.strip() or any(not p for p in parts):
        raise RecipeError(f"override `{shown}`: empty key path")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise RecipeError(f"override `{shown}`: value is not valid YAML ({e.__class__.__name__})") from None
    return parts, value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = _deep_copy(data)
    for text in overrides:
        parts, value = parse_override(text)
        shown = _shown(text)
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"override `{shown}`: `{_shown('.'.join(parts[: i + 1]))}` is not a section")
            node = child
        node[parts[-1]] = value
    return data


def _deep_copy(data: Any) -> Any:
    if isinstance(data, dict):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data


def recipe_from_dict(data: Any, where: str = "<recipe>", overrides: list[str] | None = None) -> Recipe:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: the top level must be a mapping of sections, got {type(data).__name__}")
    if overrides:
        data = apply_overrides(data, overrides)
    recipe = build_dataclass(Recipe, _with_preset_dims(data), where)
    _check_ranges(recipe, where)
    _check_sampler(recipe.eval, where)
    return _validate_training_args(_validate_task(recipe, where), where)


def _with_preset_dims(data: dict[str, Any]) -> dict[str, Any]:
    """For `model.base: small` (a preset other than tiny, whose values are the schema defaults): the preset's
    dimensions under the `model.tiny` keys the recipe sets. The resolved recipe then states every dimension, so
    reloading it gives the same model."""
    model = data.get("model")
    base = model.get("base") if isinstance(model, dict) else None
    if not isinstance(base, str) or base not in PRESETS or base == TINY:  # a wrong type: build_dataclass names it
        return data
    dims = model.get("tiny")
    if dims is not None and not isinstance(dims, dict):
        return data  # build_dataclass names the wrong type
    preset = dataclasses.asdict(PRESETS[model["base"]])
    return {**data, "model": {**model, "tiny": {**preset, **(dims or {})}}}


def read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or e.__class__.__name__
        raise RecipeError(f"{path}:{line}: malformed YAML: {problem}") from None
    except UnicodeDecodeError:
        raise RecipeError(f"{path}: not a UTF-8 text file") from None
    except ValueError as e:  # PyYAML's constructors raise plain ValueErrors, e.g. for a date like 2001-13-01
        raise RecipeError(f"{path}: malformed YAML value: {e}") from None


def load_recipe(path: str | Path, overrides: list[str] | None = None) -> Recipe:
    data = read_yaml(path)
    if data is None:
        # All defaults would mean the 26B hub model and its download: never what an empty file meant.
        raise RecipeError(
            f"{path}: the recipe file is empty; start from one in recipes/ (e.g. recipes/tiny/sudoku.yaml)"
        )
    return recipe_from_dict(data, where=str(path), overrides=overrides)


def schema_rows(cls: type = Recipe, prefix: str = "") -> list[tuple[str, str, str]]:
    """(key path, type, default) for every key of the schema: the source of docs/recipe-reference.md."""
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
        rows.append(
            (path, _type_name(tp), yaml.safe_dump(default, default_flow_style=True).strip().removesuffix("...").strip())
        )
    return rows
