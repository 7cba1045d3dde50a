"""The recipe: its schema (every key with its help), loading with overrides, validation, the generated reference.

Callers write `from ftkit.recipe import Recipe, load_recipe`; the modules are
- `schema`: the sections (frozen dataclasses, each key's default and help, each section's own checks) and `Recipe`;
- `coerce`: YAML values -> typed dataclasses, errors naming the dotted key;
- `load`: YAML file / mapping + `a.b=value` overrides -> a validated `Recipe`;
- `validate`: the checks in order, the ones across sections among them;
- `training_args`: the recipe's side of transformers.TrainingArguments;
- `reference`: docs/recipe-reference.md (`python -m ftkit.recipe.reference`);
- `preflight`: `ftkit validate`'s model build (imports torch: not imported here).
"""

from ftkit.recipe.coerce import build_dataclass
from ftkit.recipe.load import apply_overrides, load_recipe, parse_override, read_yaml, recipe_from_dict
from ftkit.recipe.schema import (
    PRESETS,
    REAL_BASE,
    SAMPLER_KEYS,
    SMALL,
    TINY,
    DiffusionSection,
    EvalSection,
    HubSection,
    KeyRow,
    LoraSection,
    ModelSection,
    PresetSpec,
    QuantSection,
    Recipe,
    RewardWeights,
    RLSection,
    TaskSection,
    TrainSection,
    schema_rows,
)
from ftkit.recipe.training_args import TRAINING_ARGS_FROM_KEYS, TRAINING_ARGS_OWNED, make_training_arguments

__all__ = [
    "PRESETS",
    "REAL_BASE",
    "SAMPLER_KEYS",
    "SMALL",
    "TINY",
    "TRAINING_ARGS_FROM_KEYS",
    "TRAINING_ARGS_OWNED",
    "DiffusionSection",
    "EvalSection",
    "HubSection",
    "KeyRow",
    "LoraSection",
    "ModelSection",
    "PresetSpec",
    "QuantSection",
    "RLSection",
    "Recipe",
    "RewardWeights",
    "TaskSection",
    "TrainSection",
    "apply_overrides",
    "build_dataclass",
    "load_recipe",
    "make_training_arguments",
    "parse_override",
    "read_yaml",
    "recipe_from_dict",
    "schema_rows",
]
