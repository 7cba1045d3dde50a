"""A built recipe's checks, in the order they run: each section's own (`Section.check`), the ones that span
sections, then those that ask transformers (the sampler settings) or the task (its options)."""

from __future__ import annotations

import dataclasses

from ftkit.errors import FtkitError, RecipeError
from ftkit.recipe.coerce import build_dataclass
from ftkit.recipe.schema import Recipe, require
from ftkit.recipe.training_args import check_training_args


def validate(recipe: Recipe, where: str) -> Recipe:
    """Raise a RecipeError naming the first key that fails; return the recipe with its task options and
    training_args resolved (the task's option defaults filled in, scientific numbers as floats)."""
    for section in (recipe.diffusion, recipe.lora, recipe.train, recipe.task, recipe.eval, recipe.rl, recipe.model):
        section.check(where)
    recipe.quant.check(where)
    check_across_sections(recipe, where)
    recipe.eval.check_sampler(where)
    return check_training_args(check_task_options(recipe, where), where)


def check_across_sections(recipe: Recipe, where: str) -> None:
    """Settings that are each valid but not together."""
    mode = recipe.quant.mode
    require(
        not (recipe.is_full and mode != "none"),
        where,
        "train.trainable",
        f"is `full`, which needs a full-precision base: {mode} weights cannot be trained (set "
        f"quant.mode=none, or train.trainable=lora to train adapters on the {mode} base)",
    )
    _check_loader(recipe, where)


def _check_loader(recipe: Recipe, where: str) -> None:
    """What Unsloth's loading cannot honour is refused rather than silently changed: it builds its own bitsandbytes
    config (NF4, double quantization, computing in model.dtype) and has the 8-bit mode the transformers path lacks."""
    q = recipe.quant
    if recipe.model.loader == "transformers":
        require(
            q.mode != "8bit", where, "quant.mode", "is 8bit, which only model.loader=unsloth loads (use 4bit or none)"
        )
    elif q.mode == "4bit":
        unsloth = "with model.loader=unsloth (its 4-bit loading)"
        require(q.quant_type == "nf4", where, "quant.quant_type", f"must be nf4 {unsloth}")
        require(q.double_quant, where, "quant.double_quant", f"must be true {unsloth}")
        require(
            q.compute_dtype == recipe.model.dtype,
            where,
            "quant.compute_dtype",
            f"must equal model.dtype ({recipe.model.dtype}) {unsloth}",
        )


def check_task_options(recipe: Recipe, where: str) -> Recipe:
    """`task.options` against the options dataclass the task declares, and its ranges by the task's constructor; the
    recipe comes back with every option stated."""
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
