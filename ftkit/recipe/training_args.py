"""The recipe's side of `transformers.TrainingArguments`, in one place: which fields the recipe's keys set, which
ftkit decides itself, the keyword arguments a run is trained with, and the checks on `training_args` (every other
field, passed through)."""

from __future__ import annotations

import dataclasses
import difflib
import enum
import types
import typing
from typing import Any

from ftkit.errors import RecipeError
from ftkit.recipe.coerce import SCI_FLOAT, shown, type_name

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


def make_training_arguments(recipe, output_dir: str, *, cuda: bool, bf16: bool, distributed: bool):
    """The run's TrainingArguments: the recipe's keys, ftkit's own settings and `training_args` (a field set twice is
    the TypeError TrainingArguments raises). `output_dir`: where the Trainer writes checkpoints; `cuda`: train on the
    GPU; `bf16`: mixed precision; `distributed`: more than one process (DDP)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        **ftkit_training_arguments(recipe, output_dir, cuda=cuda, bf16=bf16, distributed=distributed),
        **recipe.training_args,  # every other TrainingArguments field, validated by check_training_args
    )


def ftkit_training_arguments(recipe, output_dir: str, *, cuda: bool, bf16: bool, distributed: bool) -> dict[str, Any]:
    """The TrainingArguments fields ftkit sets: from the recipe's keys (TRAINING_ARGS_FROM_KEYS) and its own
    (TRAINING_ARGS_OWNED, and `logging_first_step`)."""
    from ftkit.model.compat import checkpointing_arguments  # the field names depend on the transformers release

    t = recipe.train
    return dict(
        output_dir=output_dir,
        max_steps=t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate,
        weight_decay=t.weight_decay,
        warmup_steps=t.warmup_steps,
        lr_scheduler_type=t.lr_scheduler,
        max_grad_norm=t.max_grad_norm,
        optim=t.optim,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_steps=t.save_steps,
        save_total_limit=t.save_total_limit,
        seed=t.seed,
        data_seed=t.seed,
        bf16=bf16,
        use_cpu=not cuda,
        # Decoder layers (transformers' GradientCheckpointingLayer); the encoder's are ftkit.model.checkpointing's, in
        # train(). Non-reentrant: reentrant checkpointing would replay the encoder's cache writes.
        **checkpointing_arguments(
            t.gradient_checkpointing, {"use_reentrant": False} if t.gradient_checkpointing else None
        ),
        remove_unused_columns=False,
        # A safety margin, not a need today: every LoRA tensor is reached each step (an expert's LoRA is a slice of
        # one tensor per layer, so experts no token was routed to still share a gradient tensor), but a LoRA target
        # a step's graph skips would make DDP error at the next step without it. Costs one graph traversal a step.
        ddp_find_unused_parameters=distributed,
        dataloader_num_workers=t.num_workers,
        report_to=[] if t.report_to == "none" else [t.report_to],
        disable_tqdm=True,  # the rich progress bar replaces tqdm
    )


def check_training_args(recipe, where: str):
    """The recipe with its `training_args` checked against TrainingArguments' own fields and types (a scientific
    number read as a string becomes a float); a field the recipe or ftkit sets is an error naming where it goes."""
    if not recipe.training_args:
        return recipe
    from transformers import TrainingArguments  # late: a second or more to import

    fields = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    hints = typing.get_type_hints(TrainingArguments)
    values = _floats(recipe.training_args)
    for key, value in values.items():
        path = f"training_args.{shown(str(key))}"
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
            expected = f"one of {', '.join(map(repr, choices))}" if choices else type_name(hints[key])
            raise RecipeError(f"{where}: `{path}` expects {expected}, got {value!r}")
    return dataclasses.replace(recipe, training_args=values)


def _accepts(value: Any, tp: Any) -> bool:
    """Does `value` (from YAML) fit the TrainingArguments annotation `tp`? Unknown kinds of annotation are left to
    TrainingArguments itself; an enum (even `Enum | str`) must be one of its values."""
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
    kinds = typing.get_args(tp) if typing.get_origin(tp) in (typing.Union, types.UnionType) else (tp,)
    return [m.value for k in kinds if isinstance(k, type) and issubclass(k, enum.Enum) for m in k]


def _floats(value: Any) -> Any:
    """PyYAML reads `1e-5` as a string; in training_args a plain scientific number is meant as a float."""
    if isinstance(value, str) and SCI_FLOAT.fullmatch(value.strip()):
        return float(value)
    if isinstance(value, dict):
        return {k: _floats(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_floats(v) for v in value]
    return value
