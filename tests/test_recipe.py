from pathlib import Path

import pytest

from ftkit.errors import RecipeError
from ftkit.recipe import Recipe, load_recipe, parse_override, recipe_from_dict, schema_rows

RECIPES = sorted(Path(__file__).resolve().parent.parent.joinpath("recipes").rglob("*.yaml"))


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_every_committed_recipe_validates(path):
    recipe = load_recipe(path)
    assert isinstance(recipe, Recipe)


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"sudoku.yaml"} <= names


def test_unknown_key_names_its_path_and_suggests():
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"train": {"max_step": 3}}, where="r.yaml")
    msg = str(e.value)
    assert "r.yaml" in msg and "`train.max_step`" in msg and "did you mean `train.max_steps`" in msg


def test_unknown_section():
    with pytest.raises(RecipeError, match=r"unknown key `trian`; did you mean `train`"):
        recipe_from_dict({"trian": {}})


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(RecipeError, match=r"`lora\.r` expects int, got 'sixteen'"):
        recipe_from_dict({"lora": {"r": "sixteen"}})
    with pytest.raises(RecipeError, match=r"`lora\.attention` expects bool"):
        recipe_from_dict({"lora": {"attention": 1}})
    with pytest.raises(RecipeError, match=r"`quant\.mode` must be one of 'none', '4bit', '8bit'"):
        recipe_from_dict({"quant": {"mode": "16bit"}})
    with pytest.raises(RecipeError, match=r"`train` must be a mapping"):
        recipe_from_dict({"train": [1, 2]})


def test_int_widens_to_float_but_bool_is_not_int():
    r = recipe_from_dict({"train": {"learning_rate": 1}})
    assert r.train.learning_rate == 1.0 and isinstance(r.train.learning_rate, float)
    with pytest.raises(RecipeError):
        recipe_from_dict({"train": {"max_steps": True}})


def test_ranges():
    with pytest.raises(RecipeError, match=r"`diffusion\.self_conditioning_p` must be in \[0, 1\]"):
        recipe_from_dict({"diffusion": {"self_conditioning_p": 1.5}})
    with pytest.raises(RecipeError, match="nothing would train"):
        recipe_from_dict({"lora": {"attention": False, "experts": False}})
    with pytest.raises(RecipeError, match=r"`lora\.dropout` must be 0 when `lora\.experts`"):
        recipe_from_dict({"lora": {"dropout": 0.1}})


def test_overrides_go_through_validation():
    r = recipe_from_dict({}, overrides=["train.max_steps=7", "lora.r=4", "train.learning_rate=1e-3", "hub.repo=me/x"])
    assert (r.train.max_steps, r.lora.r, r.train.learning_rate, r.hub.repo) == (7, 4, 1e-3, "me/x")
    with pytest.raises(RecipeError, match=r"`train\.max_steps` expects int, got 'ten'"):
        recipe_from_dict({}, overrides=["train.max_steps=ten"])
    with pytest.raises(RecipeError, match=r"unknown key `train\.max_stepz`"):
        recipe_from_dict({}, overrides=["train.max_stepz=3"])
    with pytest.raises(RecipeError, match="expected KEY.PATH=VALUE"):
        parse_override("train.max_steps")
    with pytest.raises(RecipeError, match="is not a section"):
        recipe_from_dict({"train": {"max_steps": 3}}, overrides=["train.max_steps.x=3"])


def test_task_options_validated_by_the_task():
    with pytest.raises(
        RecipeError, match=r"unknown key `task\.options\.min_givns`; did you mean `task\.options\.min_givens`"
    ):
        recipe_from_dict({"task": {"name": "sudoku", "options": {"min_givns": 30}}})
    with pytest.raises(RecipeError, match=r"`task\.name`: unknown task 'chess'; known tasks: .*sudoku"):
        recipe_from_dict({"task": {"name": "chess"}})


def test_malformed_yaml_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  max_steps: 3\n  lr: [1, 2\n")
    with pytest.raises(RecipeError, match=r"bad\.yaml: line \d+, column \d+: malformed YAML"):
        load_recipe(bad)
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "missing.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- 1\n- 2\n")
    with pytest.raises(RecipeError, match="top level must be a mapping"):
        load_recipe(top)


def test_roundtrip_through_yaml(tmp_path):
    r = recipe_from_dict({"model": {"base": "tiny"}, "lora": {"r": 8}})
    p = tmp_path / "r.yaml"
    p.write_text(r.to_yaml())
    assert load_recipe(p) == r


def test_schema_rows_cover_every_key():
    rows = {row.key for row in schema_rows()}
    assert "model.tiny.layers" in rows and "diffusion.self_conditioning_p" in rows and "hub.private" in rows


def test_task_option_ranges_are_checked_at_validation():
    with pytest.raises(RecipeError, match=r"r\.yaml: task\.options: need 17 <= min_givens"):
        recipe_from_dict({"task": {"name": "sudoku", "options": {"min_givens": 90}}}, where="r.yaml")


def test_empty_recipe_file_is_an_error_naming_it(tmp_path):
    for text in ("", "# only a comment\n"):
        empty = tmp_path / "empty.yaml"
        empty.write_text(text)
        with pytest.raises(RecipeError, match=r"empty\.yaml: the recipe file is empty"):
            load_recipe(empty)


def test_sampler_settings_are_checked_by_transformers_config():
    """What DiffusionGemmaGenerationConfig rejects is rejected here, named by the recipe's keys."""
    with pytest.raises(RecipeError, match=r"`eval\.entropy_bound`=0\.0: rejected by transformers' Diffusion"):
        recipe_from_dict({"eval": {"entropy_bound": 0, "temperature_max": 0}}, where="r.yaml")
    with pytest.raises(RecipeError, match=r"`eval\.temperature_min`=0\.9 and `eval\.temperature_max`=0\.7"):
        recipe_from_dict({"eval": {"temperature_min": 0.9}})
    with pytest.raises(RecipeError, match=r"`eval\.stability_threshold`=-1"):
        recipe_from_dict({"eval": {"stability_threshold": -1}})
    assert recipe_from_dict({"eval": {"temperature_min": 0.1, "temperature_max": 0.9}}).eval.temperature_max == 0.9


def test_cpu_threads_key():
    assert recipe_from_dict({"train": {"cpu_threads": 3}}).train.cpu_threads == 3
    with pytest.raises(RecipeError, match=r"`train\.cpu_threads` must be >= 0"):
        recipe_from_dict({"train": {"cpu_threads": -1}})


# ----------------------------------------------------------------------------------------------------------------
# training_args: every other TrainingArguments field, validated


def test_training_args_reach_the_optimizer_and_scheduler(tmp_path):
    """The reference recipe's settings (betas 0.95/0.99, cosine with min_lr 1.5e-5) written in a recipe reach the
    Trainer's optimizer and scheduler."""
    import torch
    from transformers import Trainer

    from ftkit.run.prepare import training_arguments

    r = recipe_from_dict(
        {
            "train": {
                "learning_rate": 1.5e-4,
                "lr_scheduler": "cosine_with_min_lr",
                "warmup_steps": 2,
                "max_steps": 10,
            },
            "training_args": {"adam_beta1": 0.95, "adam_beta2": 0.99, "lr_scheduler_kwargs": {"min_lr": "1.5e-5"}},
        }
    )
    args = training_arguments(r, tmp_path)
    assert (args.adam_beta1, args.adam_beta2, args.lr_scheduler_kwargs) == (0.95, 0.99, {"min_lr": 1.5e-5})
    trainer = Trainer(model=torch.nn.Linear(2, 1), args=args)
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    assert trainer.optimizer.defaults["betas"] == (0.95, 0.99)
    for _ in range(10):
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    assert trainer.lr_scheduler.get_last_lr()[0] == pytest.approx(1.5e-5)


@pytest.mark.parametrize(
    "section,needle",
    [
        (
            {"adam_beta": 0.9},
            "unknown key `training_args.adam_beta`: not a transformers.TrainingArguments field; did you "
            "mean `training_args.adam_beta",
        ),
        ({"learning_rate": 1e-4}, "`training_args.learning_rate` is set by `train.learning_rate`"),
        ({"per_device_train_batch_size": 2}, "is set by `train.batch_size`"),
        ({"bf16": True}, "`training_args.bf16` is not configurable here"),
        ({"adam_beta1": "high"}, "`training_args.adam_beta1` expects float, got 'high'"),
        ({"eval_strategy": "sometimes"}, "`training_args.eval_strategy` expects one of 'no', 'steps', 'epoch'"),
        ({"label_names": [1]}, "`training_args.label_names` expects list | null"),
    ],
)
def test_training_args_are_checked_against_trainingarguments(section, needle):
    with pytest.raises(RecipeError) as e:
        recipe_from_dict({"training_args": section}, where="r.yaml")
    assert "r.yaml" in str(e.value) and needle in str(e.value)


def test_training_arguments_ftkit_sets_are_declared(tmp_path):
    """Every TrainingArguments field ftkit sets is one a recipe key owns or one ftkit decides, so `training_args`
    cannot set it a second time unnoticed (logging_first_step is the one setting left open to a TypeError)."""
    from ftkit.recipe.training_args import TRAINING_ARGS_FROM_KEYS, TRAINING_ARGS_OWNED, ftkit_training_arguments

    for on in (False, True):
        r = recipe_from_dict({"train": {"gradient_checkpointing": on}})
        fields = ftkit_training_arguments(r, str(tmp_path), cuda=False, bf16=False, distributed=False)
        undeclared = set(fields) - set(TRAINING_ARGS_FROM_KEYS) - set(TRAINING_ARGS_OWNED) - {"logging_first_step"}
        assert not undeclared


# ----------------------------------------------------------------------------------------------------------------
# The schema's help and its one-owner maps


def _sections(cls=Recipe):
    import dataclasses
    import typing

    yield cls
    for tp in typing.get_type_hints(cls).values():
        if dataclasses.is_dataclass(tp):
            yield from _sections(tp)


def test_every_key_has_help():
    import dataclasses

    missing = [
        f"{cls.__name__}.{f.name}"
        for cls in _sections()
        for f in dataclasses.fields(cls)
        if not str(f.metadata.get("help", "")).strip()
    ]
    assert not missing, f"recipe keys without metadata['help']: {missing}"
    assert all(row.help for row in schema_rows())


def test_sampler_keys_fit_denoise_and_the_generation_config():
    import inspect

    from transformers.models.diffusion_gemma.generation_diffusion_gemma import (
        DiffusionGemmaGenerationConfig,
        EntropyBoundSamplerConfig,
    )

    from ftkit.diffusion.sample import denoise
    from ftkit.recipe import EvalSection

    e = EvalSection(steps=7, temperature_min=0.1, temperature_max=0.9, entropy_bound=0.2, confidence_threshold=0.3)
    kwargs = e.sampler_kwargs()
    assert set(kwargs) | {"steps"} <= set(inspect.signature(denoise).parameters)
    assert kwargs["temperature_min"] == 0.1 and kwargs["entropy_bound"] == 0.2
    values = e.generation_config_values()
    config = DiffusionGemmaGenerationConfig(
        sampler_config=EntropyBoundSamplerConfig(entropy_bound=values.pop("entropy_bound")), **values
    )
    assert (config.max_denoising_steps, config.t_min, config.t_max, config.confidence_threshold) == (7, 0.1, 0.9, 0.3)


# Outside the recipe package nothing maps the eval section's sampler keys or builds TrainingArguments by hand.
SAMPLER_FIELDS = {"temperature_min", "temperature_max", "entropy_bound", "stability_threshold", "confidence_threshold"}


def _one_owner_violations(root: Path) -> list[str]:
    import ast

    found = []
    for path in sorted(root.rglob("*.py")):
        if "recipe" in path.relative_to(root).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr in SAMPLER_FIELDS:
                found.append(f"{path.relative_to(root)}:{node.lineno}: reads .{node.attr}")
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) == (
                "TrainingArguments"
            ):
                found.append(f"{path.relative_to(root)}:{node.lineno}: builds TrainingArguments")
    return found


def test_sampler_keys_and_training_arguments_have_one_owner(tmp_path):
    import ftkit

    root = Path(ftkit.__file__).parent
    assert _one_owner_violations(root) == []
    planted = tmp_path / "ftkit" / "evaluation"
    planted.mkdir(parents=True)
    (planted / "x.py").write_text("def f(cfg, TrainingArguments):\n    return cfg.entropy_bound, TrainingArguments()\n")
    assert len(_one_owner_violations(tmp_path / "ftkit")) == 2
