"""`ftkit rl` end to end on the tiny preset, with a toy task registered only here ("write 7 in every free cell",
reward known by construction): RL alone lifts it from ~0 to ~1; a run from an SFT adapter starts at KL 0, evaluates
the starting policy exactly as `ftkit eval` evaluates the SFT run, resumes reproducibly, and leaves a standard run
directory. Plus the recipe / CLI errors and the per-task rewards."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_train import CrashAt
from tiny_specs import tiny_dims
from typer.testing import CliRunner

from ftkit.errors import FtkitError, RecipeError
from ftkit.recipe import recipe_from_dict
from ftkit.run import rundir
from ftkit.run.paths import RunPaths
from ftkit.tasks import base as task_base
from ftkit.tasks.base import Example, Piece, PromptCanvas, RewardParts, Violation, reward_parts

CELLS = 4
DIGITS = "0123456789"
TOY_TINY = tiny_dims(CELLS + 1, layers=1)  # the cells, then the end-of-turn token


@dataclass(frozen=True)
class SevensOptions:
    cells: int = CELLS


class SevensTask:
    """Every canvas cell is free and must hold the digit 7. No `reward` method: the default from check() applies."""

    name = "sevens"
    Options = SevensOptions

    def __init__(self, options: SevensOptions | None = None):
        self.options = options or SevensOptions()

    def build_dataset(self, split, size, seed, data_path=None):
        return [Example(id=f"{split}-{i}", question=i, answer="7" * self.options.cells) for i in range(size)]

    def to_prompt_canvas(self, example):
        # Each cell holds a digit (the token masks enforce it, as Sudoku's do); which digit is RL's to learn.
        return PromptCanvas(prompt=f"sevens {example.question}", pieces=(Piece(example.answer, False, DIGITS),))

    def check(self, example, output):
        n = self.options.cells
        bad = tuple(i for i in range(max(n, len(output))) if i >= n or i >= len(output) or output[i] != "7")
        return [Violation("seven", f"{len(bad)} cell(s) are not 7", bad)] if bad else []

    def metrics(self, examples, outputs):
        rows = [
            (float(not self.check(e, o)), sum(c == "7" for c in o[: self.options.cells]) / self.options.cells)
            for e, o in zip(examples, outputs)
        ]
        return {"solve_rate": sum(r[0] for r in rows) / len(rows), "sevens": sum(r[1] for r in rows) / len(rows)}


@pytest.fixture(scope="module", autouse=True)
def sevens_registered():
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(task_base._REGISTRY, "sevens", SevensTask)
        yield


def toy_recipe(out, init_from=None, train=None, rl=None, **sections):
    return recipe_from_dict(
        {
            "model": {"base": "tiny", "dtype": "float32", "tiny": TOY_TINY},
            "lora": {"r": 4, "alpha": 8, "attention": True, "experts": True, "dense_mlp": True},
            "diffusion": {"self_conditioning_p": 0.0},
            "train": {
                "output_dir": str(out),
                "max_steps": 4,
                "batch_size": 64,
                "learning_rate": 1e-2,
                "warmup_steps": 0,
                "lr_scheduler": "constant",
                "logging_steps": 1,
                "save_steps": 2,
                "seed": 0,
                **(train or {}),
            },
            "task": {"name": "sevens", "train_size": 16, "test_size": 4},
            "eval": {"num_examples": 4, "batch_size": 64, "steps": 4},
            "rl": {
                "init_from": str(init_from) if init_from else None,
                "group_size": 8,
                "prompts_per_step": 4,
                "num_iterations": 2,
                "elbo_samples": 1,
                "kl_coef": 0.01,
                "evaluate": False,
                **(rl or {}),
            },
            **sections,
        }
    )


def rl_rows(run_dir: Path) -> list[dict]:
    return [r for r in rundir.read_jsonl(RunPaths(run_dir).train_log) if "reward" in r]


@pytest.mark.slow  # 40 RL steps (~8 s alone on an idle 2-core machine, several times that under load)
@pytest.mark.parametrize("credit, negative_weight", [("sequence", 1.0), ("token", 0.0)])
def test_rl_alone_teaches_the_toy_task(tmp_path, credit, negative_weight):
    """No SFT data: a fresh LoRA on the random-init base. The reward (the default from check(): the fraction of
    cells holding 7, half, plus all-7, half) starts near 0 and ends near 1 within 40 steps: GRPO's credit per
    sample, or per position from the checker's flags with the better samples reinforced only (with negatives, that
    one reached 0.9 by step 9 and then swung between 0.75 and 1.0: pushing tokens down raised the entropy on Sudoku).

    The cells are digits (token masks, as on Sudoku); which digit is left to RL. With any text token allowed, the
    random-init policy of the chat-format canvas wrote a 7 in about 1 of 1,000 cells, so the run waited 20-60 steps
    for a first group with a reward spread, by luck, before anything moved."""
    from ftkit.rl.run import rl

    out = tmp_path / "toy"
    summary = rl(
        toy_recipe(
            out, train={"max_steps": 40, "save_steps": 40}, rl={"credit": credit, "negative_weight": negative_weight}
        ),
        progress=False,
    )
    rows = rl_rows(out)
    rewards = [r["reward"] for r in rows]
    assert len(rewards) == 40
    assert rewards[0] < 0.1 and rows[0]["success"] == 0.0, rewards  # round 0: the starting policy's samples
    assert sum(rewards[-10:]) / 10 > 0.9 and rows[-1]["success"] > 0.9, rewards
    # From the base, the reference is the base with the adapter disabled: the KL is 0 at the first step with a
    # gradient (steps before it had no group with a reward spread, so nothing moved).
    first = next(i for i, r in enumerate(rows) if "kl" in r)
    assert rows[first]["kl"] == 0.0 and all(r["grad_norm"] == 0.0 for r in rows[:first])
    assert summary["reward_end"] > 0.9 and summary["cost"]["rounds"] == 20


def test_guided_samples_are_steered_by_the_checker(tmp_path):
    """`rl.guided`: the last samples of each group are drawn with verifier re-noising, so on the toy task (the
    random-init policy writes a 7 in about one cell of ten) they hold more 7s than the policy's own; the logged
    reward follows the policy's own samples, `guided_reward` the guided ones."""
    from ftkit.rl.run import rl

    out = tmp_path / "guided"
    rl(toy_recipe(out, train={"max_steps": 2, "save_steps": 2}, rl={"guided": 4, "credit": "token"}), progress=False)
    first = rl_rows(out)[0]
    assert first["guided_reward"] > first["reward"] + 0.05, first


# ----------------------------------------------------------------------------------------------------------------
# From an SFT run: KL 0 at the start, the before-evaluation, resume, the run directory


@pytest.fixture(scope="module")
def sft_run(tmp_path_factory):
    from ftkit.sft.run import train

    out = tmp_path_factory.mktemp("sft") / "run"
    recipe = toy_recipe(out, train={"max_steps": 2, "batch_size": 8, "save_steps": 10})
    train(recipe, progress=False)
    return out


@pytest.fixture(scope="module")
def rl_run(sft_run, tmp_path_factory):
    from ftkit.rl.run import rl

    out = tmp_path_factory.mktemp("rl") / "run"
    summary = rl(toy_recipe(out, init_from=sft_run, rl={"evaluate": True, "elbo_samples": 2}), progress=False)
    return out, summary


def test_kl_to_the_sft_reference_is_zero_at_step_zero_and_grows(rl_run):
    out, _ = rl_run
    rows = rl_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert rows[0]["kl"] == 0.0 and rows[0]["ratio"] == 1.0 and rows[0]["clip_fraction"] == 0.0
    assert rows[-1]["kl"] > 0.0
    for key in (
        "reward",
        "reward_std",
        "satisfied",
        "success",
        "skipped_groups",
        "sample_entropy",
        "elbo_loss",
        "loss",
        "grad_norm",
    ):
        assert key in rows[0], key


def test_run_directory_is_a_standard_run(rl_run, sft_run):
    out, summary = rl_run
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "recipe.yaml",
        "summary.json",
        "train_log.jsonl",
        "reward.png",
        "rl_eval.json",
        "rl_eval_before.json",
        "tokenizer.json",
        "base/config.json",
        "reference_adapter/adapter_model.safetensors",
    ):
        assert (out / name).is_file(), name
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["checkpoint-2", "checkpoint-4"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and not (out / "adapter_config.json").read_text().count("reference")
    run = rundir.load_run(out)  # what `ftkit eval` / `generate` / `push` load
    sft = rundir.load_run(sft_run)
    changed = [
        n
        for n, p in run.model.named_parameters()
        if "lora_" in n and not torch.equal(p, dict(sft.model.named_parameters())[n])
    ]
    assert changed  # RL moved the SFT adapter
    assert summary["steps"] == 4 and summary["init_from"] == str(sft_run)


def test_before_evaluation_is_the_sft_runs_own_evaluation(rl_run, sft_run):
    from ftkit.evaluation import EvalRequest, evaluate_run

    out, summary = rl_run
    report = evaluate_run(EvalRequest(sft_run))  # `ftkit eval` on the SFT run: same task, eval section and seeds
    comparison = json.loads((out / "rl_eval.json").read_text())
    assert comparison["before"] == report["metrics"]
    assert summary["before"] == report["metrics"] and set(comparison["after"]) == set(report["metrics"])
    assert comparison["delta"]["solve_rate"] == pytest.approx(
        comparison["after"]["solve_rate"] - comparison["before"]["solve_rate"]
    )


def test_resume_mid_rl_reproduces_the_uninterrupted_run(rl_run, sft_run, tmp_path):
    from ftkit.rl.run import rl

    full, _ = rl_run
    out = tmp_path / "resumed"
    recipe = toy_recipe(out, init_from=sft_run, rl={"evaluate": True, "elbo_samples": 2})
    with pytest.raises(RuntimeError, match="simulated crash"):
        rl(recipe, progress=False, extra_callbacks=[CrashAt(3)])
    assert rundir.latest_checkpoint(out).name == "checkpoint-2"
    assert not (out / "adapter_config.json").exists() and not (out / "rl_eval.json").exists()
    summary = rl(recipe, resume=True, progress=False)
    assert summary["resumed_from_step"] == 2
    a, b = rl_rows(full), rl_rows(out)
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    for x, y in zip(a, b):
        for key in ("reward", "loss", "kl", "ratio", "elbo_loss", "sample_entropy"):
            assert x[key] == pytest.approx(y[key], rel=1e-5, abs=1e-9), (x["step"], key)
    assert (
        json.loads((out / "rl_eval.json").read_text())["after"]
        == json.loads((full / "rl_eval.json").read_text())["after"]
    )


def test_existing_run_needs_resume_and_resume_keeps_the_rl_section(rl_run, sft_run):
    from ftkit.rl.run import rl

    out, _ = rl_run
    with pytest.raises(FtkitError, match=r"already holds a run \(.*\); pass --resume"):
        rl(toy_recipe(out, init_from=sft_run, rl={"evaluate": True, "elbo_samples": 2}), progress=False)
    with pytest.raises(
        FtkitError,
        match=r"--resume with other settings than the run was started with: "
        r"rl.elbo_samples \(2 -> 3\);",
    ):
        rl(toy_recipe(out, init_from=sft_run, rl={"evaluate": True, "elbo_samples": 3}), resume=True, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# Recipe and CLI errors


def test_rl_keys_are_validated():
    with pytest.raises(RecipeError, match=r"`rl\.group_size` must be >= 2"):
        recipe_from_dict({"rl": {"group_size": 1}}, where="r.yaml")
    with pytest.raises(RecipeError, match=r"`rl\.clip_eps` must be in \(0, 1\)"):
        recipe_from_dict({"rl": {"clip_eps": 1.5}})
    with pytest.raises(RecipeError, match=r"`rl\.reward` weights cannot both be 0"):
        recipe_from_dict({"rl": {"reward": {"satisfied": 0, "success": 0}}})
    with pytest.raises(RecipeError, match=r"unknown key `rl\.groups_size`; did you mean `rl\.group_size`"):
        recipe_from_dict({"rl": {"groups_size": 4}})
    with pytest.raises(RecipeError, match=r"`rl\.guided` must be >= 0 and < rl\.group_size \(8\)"):
        recipe_from_dict({"rl": {"guided": 8}})
    with pytest.raises(RecipeError, match=r"`rl\.negative_weight` must be in \[0, 1\]"):
        recipe_from_dict({"rl": {"negative_weight": -0.5}})
    with pytest.raises(RecipeError, match=r"rl\.credit"):
        recipe_from_dict({"rl": {"credit": "tokens"}})


@pytest.mark.parametrize(
    "train, lora, needle",
    [
        ({"save_steps": 3}, {}, "`train.save_steps`=3 must be a multiple of `rl.num_iterations`=2"),
        ({"grad_accum": 2}, {}, "`train.grad_accum` must be 1"),
        ({}, {"dropout": 0.1, "experts": False}, "`lora.dropout` must be 0"),
    ],
)
def test_rl_needs_of_other_sections_are_checked_before_loading(tmp_path, train, lora, needle):
    from ftkit.rl.run import check_rl_recipe, rl

    data = toy_recipe(tmp_path / "x", train=train).to_dict()
    data["lora"].update(lora)
    recipe = recipe_from_dict(data)
    with pytest.raises(
        RecipeError, match=f"r.yaml: {needle}".replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")
    ):
        check_rl_recipe(recipe, where="r.yaml")
    with pytest.raises(RecipeError):
        rl(recipe, progress=False)
    assert not (tmp_path / "x").exists()


def test_init_from_must_be_a_finished_run_of_the_same_model(sft_run, tmp_path):
    from ftkit.rl.run import rl

    with pytest.raises(FtkitError, match="rl.init_from=.*nowhere: no such run directory"):
        rl(toy_recipe(tmp_path / "a", init_from=tmp_path / "nowhere"), progress=False)
    other = recipe_from_dict(
        {**toy_recipe(tmp_path / "b", init_from=sft_run).to_dict(), "lora": {"r": 8, "alpha": 16, "dense_mlp": True}}
    )
    with pytest.raises(FtkitError, match=r"its `lora` section differs from this recipe's"):
        rl(other, progress=False)
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_cli_rl_bad_input_is_one_clean_error_line(tmp_path):
    from ftkit.cli import app

    recipe = tmp_path / "r.yaml"
    recipe.write_text("rl:\n  num_iterations: 3\ntrain:\n  save_steps: 10\n  output_dir: " + str(tmp_path / "o") + "\n")
    result = CliRunner().invoke(app, ["rl", str(recipe)])
    assert result.exit_code == 2, result.output
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert lines[-1].startswith("error:") and "r.yaml" in lines[-1] and "rl.num_iterations" in lines[-1], result.output
    assert "Traceback" not in result.output
    help_result = CliRunner().invoke(app, ["rl", "--help"])
    assert help_result.exit_code == 0 and "--init-from" in help_result.output


# ----------------------------------------------------------------------------------------------------------------
# Rewards per task: from the verifier, never from the answer


def test_default_reward_comes_from_check():
    task = SevensTask()
    ex = task.build_dataset("train", 1, 0)[0]
    assert reward_parts(task, ex, "7777") == RewardParts(1.0, 1.0)
    assert reward_parts(task, ex, "7x77") == RewardParts(0.75, 0.0)
    assert reward_parts(task, ex, "77") == RewardParts(0.5, 0.0)  # the missing cells are flagged
    assert reward_parts(task, ex, "777777") == RewardParts(1 - 2 / 6, 0.0)  # too long: the extra cells are flagged


def test_sudoku_reward_needs_no_solution():
    from ftkit.tasks.sudoku import SudokuTask

    task = SudokuTask()
    ex = task.build_dataset("test", 1, 0)[0]
    blind = Example(ex.id, ex.question, answer="", meta=ex.meta)  # the reward must not look at the answer
    assert task.reward(blind, ex.answer) == RewardParts(1.0, 1.0)
    blank = next(i for i, q in enumerate(ex.question) if q == "0")
    wrong = ex.answer[:blank] + ("1" if ex.answer[blank] != "1" else "2") + ex.answer[blank + 1 :]
    parts = task.reward(blind, wrong)
    # one cell changed: its row, column and box each lose one distinct digit
    assert parts.success == 0.0 and parts.satisfied == pytest.approx(1 - 3 / (27 * 9))
    given = next(i for i, q in enumerate(ex.question) if q != "0")
    changed = ex.answer[:given] + "?" + ex.answer[given + 1 :]
    assert task.reward(blind, changed).satisfied == pytest.approx(1 - 3 / (27 * 9))
    assert task.reward(blind, "").satisfied == 0.0


def test_protein_reward_parts():
    from ftkit.tasks import make_task

    task = make_task("protein", {"mode": "scaffold"})
    ex = task.build_dataset("test", 1, 0)[0]
    assert task.reward(ex, ex.answer) == RewardParts(1.0, 1.0)
    start, residues = ex.question["motif"][0]
    junk = "".join("BJOUXZ"[k % 6] for k in range(len(residues)))  # not residues, and not a low-complexity run
    broken = ex.answer[:start] + junk + ex.answer[start + len(residues) :]
    parts = task.reward(ex, broken)
    n_fixed = sum(len(r) for _, r in ex.question["motif"])
    canonical = 1 - len(residues) / len(broken)
    assert parts.success == 0.0
    assert parts.satisfied == pytest.approx((canonical + 1.0 + 1.0 + (1 - len(residues) / n_fixed) + 1.0) / 5)
    short = task.reward(ex, ex.answer[: len(ex.answer) // 2])  # half the asked length: the length part is 0.5
    assert short.success == 0.0 and 0.5 < short.satisfied < 1.0


def test_code_infill_reward_stages():
    from ftkit.tasks.code_infill import CodeInfillTask

    task = CodeInfillTask()
    ex = task.build_dataset("test", 1, 0)[0]
    assert task.reward(ex, ex.answer) == RewardParts(1.0, 1.0)
    q = ex.question
    unparsable = q["prefix"] + "    return (\n" + q["suffix"]
    assert task.reward(ex, unparsable) == RewardParts(2 / 4, 0.0)  # context intact, filled; no parse, no compile
    # An empty middle fills nothing, even where the function parses without it (the policy found this once).
    empty = q["prefix"] + q["suffix"]
    assert [v.constraint for v in task.check(ex, empty)][:1] == ["empty"]
    assert task.reward(ex, empty) == RewardParts(1 / 4, 0.0)
    assert task.metrics([ex], [empty])["parse_rate"] == 0.0


@pytest.mark.gpu
@pytest.mark.parametrize("credit", [{}, {"credit": "token", "guided": 2, "negative_weight": 0.0}])
def test_rl_on_cuda_with_the_memory_lean_settings(tmp_path, credit):
    """The CUDA path: model, generators and likelihoods on the GPU, with `ftkit train`'s memory settings (both stacks
    checkpointed, chunked loss, 8-bit AdamW); also with per-position credit and verifier-guided samples."""
    from ftkit.rl.run import rl

    out = tmp_path / "cuda"
    recipe = toy_recipe(
        out,
        train={"max_steps": 4, "save_steps": 2, "gradient_checkpointing": True, "optim": "adamw_bnb_8bit"},
        rl={"evaluate": True, **credit},
        diffusion={"self_conditioning_p": 0.5, "loss_chunk": 2},
    )
    summary = rl(recipe, progress=False)
    rows = rl_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3, 4] and summary["device"] == "cuda"
    first = next((r for r in rows if "kl" in r), None)
    assert first is None or first["kl"] == 0.0
    assert (out / "rl_eval.json").is_file()
