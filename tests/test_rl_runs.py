"""`ftkit rl`'s run directory behaves as `ftkit train`'s (docs/runs.md): one writer, resume past a damaged
checkpoint, a complete run left alone, lost final files rewritten without training, a crash that blocks nothing,
Ctrl-C naming the resume command, the init_from run's files checked; `ftkit eval` and `push` on an RL run; what RL
refuses (answers over one canvas, a full-parameter init run) and a chat task with a verifier as an RL task."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_rl import CrashAt, rl_rows, rl_run, sevens_registered, sft_run, toy_recipe  # noqa: F401 (fixtures)
from tiny_specs import tiny_dims

from ftkit.errors import FtkitError
from ftkit.recipe import recipe_from_dict
from ftkit.run import rundir

ROOT = Path(__file__).resolve().parents[1]
RL_KW = {"evaluate": True, "elbo_samples": 2}  # the rl section of test_rl's rl_run


@pytest.fixture
def run(rl_run, tmp_path) -> Path:
    """A copy of the finished RL run, to damage."""
    copy = tmp_path / "run"
    shutil.copytree(rl_run[0], copy)
    return copy


def files_of(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def adapter(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def same_adapter(a: Path, b: Path) -> bool:
    x, y = adapter(a), adapter(b)
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


# ----------------------------------------------------------------------------------------------------------------
# Resume, completion, crashes


def test_resume_on_a_complete_run_changes_nothing(run, sft_run, capsys):
    from ftkit.rl.run import rl

    before = files_of(run)
    summary = rl(toy_recipe(run, init_from=sft_run, rl=RL_KW), resume=True, progress=False)
    assert "the run is complete (step 4 of 4); nothing to resume" in capsys.readouterr().err
    assert summary == json.loads((run / "summary.json").read_text())
    after = files_of(run)
    after.pop(".ftkit.lock"), before.pop(".ftkit.lock")
    assert after == before


def test_resume_past_a_damaged_checkpoint_reproduces_the_run(run, rl_run, sft_run, capsys):
    from ftkit.rl.run import rl

    weights = run / "checkpoints" / "checkpoint-4" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-8] + bytes(8))  # same size: only the manifest can tell
    summary = rl(toy_recipe(run, init_from=sft_run, rl=RL_KW), resume=True, progress=False)
    err = capsys.readouterr().err
    assert "checkpoint-4 is damaged (adapter_model.safetensors: contents differ from the manifest" in err
    assert "moved it aside to damaged-checkpoint-4" in err and "resuming from checkpoint-2 (step 2 of 4)" in err
    assert summary["resumed_from_step"] == 2
    assert [r["step"] for r in rl_rows(run)] == [1, 2, 3, 4]
    for x, y in zip(rl_rows(rl_run[0]), rl_rows(run)):
        assert x["reward"] == pytest.approx(y["reward"]) and x["loss"] == pytest.approx(y["loss"], abs=1e-7)
    assert same_adapter(run, rl_run[0])
    assert (run / "checkpoints" / "damaged-checkpoint-4").is_dir()


def test_lost_final_files_are_written_from_the_last_checkpoint_without_training(run, rl_run, sft_run, capsys):
    from ftkit.rl.run import rl

    for name in ("adapter_model.safetensors", "adapter_config.json", "summary.json", "rl_eval.json", "reward.png"):
        (run / name).unlink()
    log = (run / "train_log.jsonl").read_text()
    summary = rl(toy_recipe(run, init_from=sft_run, rl=RL_KW), resume=True, progress=False)
    assert "resuming from checkpoint-4: training is done; writing the final adapter" in capsys.readouterr().err
    assert summary["resumed_from_step"] == 4 and (run / "train_log.jsonl").read_text() == log  # no step trained
    assert same_adapter(run, rl_run[0]) and (run / "reward.png").is_file()
    want = json.loads((rl_run[0] / "rl_eval.json").read_text())
    assert json.loads((run / "rl_eval.json").read_text())["after"] == want["after"]


def test_a_crash_before_the_first_checkpoint_blocks_nothing(sft_run, tmp_path, capsys):
    from ftkit.rl.run import rl

    out = tmp_path / "crashed"
    recipe = toy_recipe(out, init_from=sft_run, train={"max_steps": 2, "save_steps": 2})
    with pytest.raises(RuntimeError, match="simulated crash"):
        rl(recipe, progress=False, extra_callbacks=[CrashAt(1)])
    assert (out / "reference_adapter" / "adapter_model.safetensors").is_file() and not rundir.checkpoints(out)
    summary = rl(recipe, progress=False)  # the same command again
    err = capsys.readouterr().err
    assert "an earlier attempt saved no checkpoint; starting over" in err
    assert summary["steps"] == 2 and [r["step"] for r in rl_rows(out)] == [1, 2]


def test_thread_choice_and_one_log_line_per_step_when_piped(rl_run, capsys, tmp_path, sft_run):
    from ftkit.rl.run import rl

    rl(toy_recipe(tmp_path / "piped", init_from=sft_run, train={"max_steps": 2, "save_steps": 2}), progress=False)
    err = capsys.readouterr().err
    assert "CPU threads: " in err
    steps = [ln for ln in err.splitlines() if ln.startswith("step ")]
    assert steps[0].startswith("step 1/2  loss ") and " reward " in steps[0] and " kl " in steps[0], err


def test_a_damaged_reference_copy_stops_resume_with_one_clear_error(run, sft_run):
    from ftkit.rl.run import rl

    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    weights = run / "reference_adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:50])
    with pytest.raises(
        FtkitError,
        match=r"reference_adapter/adapter_model.safetensors: truncated .*the copy of "
        r"rl.init_from's adapter this run started from",
    ):
        rl(toy_recipe(run, init_from=sft_run, rl=RL_KW), resume=True, progress=False)


def test_resume_keeps_the_rl_section(run, sft_run):
    from ftkit.rl.run import rl

    shutil.rmtree(run / "checkpoints" / "checkpoint-4")
    with pytest.raises(
        FtkitError,
        match=r"--resume with other settings than the run was started with: "
        r"rl.kl_coef \(\d.*-> 0.5\);",
    ):
        rl(toy_recipe(run, init_from=sft_run, rl={**RL_KW, "kl_coef": 0.5}), resume=True, progress=False)


# ----------------------------------------------------------------------------------------------------------------
# The init_from run's files


def _damage_truncated_adapter(r: Path) -> None:
    path = r / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:100])


INIT_DAMAGE = [
    (
        "truncated adapter",
        _damage_truncated_adapter,
        r"adapter_model.safetensors: truncated .*adapter RL would continue",
    ),
    (
        "no adapter",
        lambda r: [(r / n).unlink() for n in ("adapter_model.safetensors", "adapter_config.json", "summary.json")],
        r"the run has no final adapter \(unfinished\?",
    ),
    (
        "cut recipe",
        lambda r: (r / "recipe.yaml").write_text((r / "recipe.yaml").read_text()[:-3]),
        r"recipe.yaml: incomplete \(its last line is cut",
    ),
    ("deleted tokenizer", lambda r: (r / "tokenizer.json").unlink(), r"tokenizer.json: missing"),
    (
        "truncated base",
        lambda r: (r / "base" / "model.safetensors").write_bytes(b"x" * 10),
        r"base/model.safetensors: truncated",
    ),
    (
        "full-parameter run",
        lambda r: (r / "recipe.yaml").write_text(
            (r / "recipe.yaml").read_text().replace("  trainable: lora\n", "  trainable: full\n")
        ),
        r"a full-parameter run \(train.trainable: full\); ftkit rl continues a LoRA adapter only",
    ),
]


@pytest.mark.parametrize("damage, needle", [pytest.param(d, n, id=i) for i, d, n in INIT_DAMAGE])
def test_init_from_files_are_checked_with_one_clear_error(sft_run, tmp_path, damage, needle):
    from ftkit.rl.run import rl

    init = tmp_path / "sft"
    shutil.copytree(sft_run, init)
    damage(init)
    with pytest.raises(FtkitError, match=rf"^rl.init_from={init}: .*{needle}"):
        rl(toy_recipe(tmp_path / "out", init_from=init), progress=False)
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------------
# eval and push on an RL run


def test_eval_and_push_of_an_rl_run(run, tmp_path):
    from ftkit.evaluation import EvalRequest, evaluate_run
    from ftkit.hub.push import push_run

    with pytest.raises(FtkitError, match=r"no eval.json.*ftkit eval"):
        push_run(run, repo="me/toy", dry_run=True)
    report = evaluate_run(EvalRequest(run))  # `ftkit eval RUN`: the canonical eval.json push publishes
    comparison = json.loads((run / "rl_eval.json").read_text())
    assert report["metrics"] == comparison["after"]  # the RL run's own "after" is that evaluation
    folder = Path(push_run(run, repo="me/toy", dry_run=True, dry_run_dir=tmp_path / "up"))
    assert {"reward.png", "rl_eval.json", "eval.json", "summary.json"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "reference_adapter").exists() and not (folder / "rl_eval_before.json").exists()
    card = (folder / "README.md").read_text()
    assert "| stage | reinforcement learning (`ftkit rl`" in card and "`ftkit rl recipe.yaml`" in card
    assert "the adapter of the `ftkit train` run `run`" in card and "![reward per step](reward.png)" in card
    assert "loss (start → end)" not in card  # no empty SFT fields
    assert "| credit / negative advantages × / guided samples per group | per sample / 1 / 0 of 8 |" in card
    before, after = comparison["before"]["solve_rate"], comparison["after"]["solve_rate"]
    assert f"| solve_rate | {100 * before:.1f}% | {100 * after:.1f}% |" in card
    assert "model-index:" in card and "- type: solve_rate" in card  # from the canonical eval.json


def test_push_leaves_out_an_rl_eval_of_another_adapter(run, tmp_path):
    from ftkit.evaluation import EvalRequest, evaluate_run
    from ftkit.hub.push import push_run

    evaluate_run(EvalRequest(run))
    comparison = json.loads((run / "rl_eval.json").read_text())
    (run / "rl_eval.json").write_text(json.dumps({**comparison, "adapter_sha256": "0" * 64}))
    notes = []
    folder = Path(push_run(run, repo="me/toy", dry_run=True, dry_run_dir=tmp_path / "up", on_note=notes.append))
    assert not (folder / "rl_eval.json").exists() and "before RL" not in (folder / "README.md").read_text()
    assert notes == ["rl_eval.json left out: it evaluated another adapter_model.safetensors than the run holds now"]


# ----------------------------------------------------------------------------------------------------------------
# What RL refuses, and a chat task with a verifier


def test_a_full_parameter_rl_recipe_is_refused(tmp_path):
    from ftkit.errors import RecipeError
    from ftkit.rl.run import check_rl_recipe

    recipe = recipe_from_dict({**toy_recipe(tmp_path / "x").to_dict(), "train": {"trainable": "full"}})
    with pytest.raises(RecipeError, match=r"r.yaml: `train.trainable`=full: ftkit rl trains a LoRA adapter only"):
        check_rl_recipe(recipe, where="r.yaml")


def chat_recipe(out: Path, data: Path, **rl):
    tiny = tiny_dims(24, layers=1)
    return recipe_from_dict(
        {
            "model": {"base": "tiny", "dtype": "float32", "tiny": tiny},
            "lora": {"r": 4, "alpha": 8},
            "diffusion": {"self_conditioning_p": 0.0},
            "train": {
                "output_dir": str(out),
                "max_steps": 2,
                "batch_size": 8,
                "learning_rate": 1e-2,
                "warmup_steps": 0,
                "save_steps": 2,
                "logging_steps": 1,
            },
            "task": {
                "name": "chat",
                "train_size": 16,
                "test_size": 4,
                "options": {"dataset": str(data), "verifier": "exact", "answer_regex": r"####\s*(-?\d+)"},
            },
            "eval": {"num_examples": 4, "batch_size": 8, "steps": 2},
            "rl": {"group_size": 2, "prompts_per_step": 2, "elbo_samples": 1, "evaluate": True, **rl},
        }
    )


def test_a_chat_task_with_a_verifier_is_an_rl_task(tmp_path):
    from test_task_chat import write_jsonl

    from ftkit.diffusion.token_layout import TokenRule
    from ftkit.model.load import load_tokenizer
    from ftkit.rl.run import one_canvas_layouts, rl
    from ftkit.tasks import make_task

    data = write_jsonl(
        tmp_path / "chat.jsonl",
        [
            {"messages": [{"role": "user", "content": f"{i}+1?"}, {"role": "assistant", "content": f"#### {i + 1}"}]}
            for i in range(30)
        ],
    )
    recipe = chat_recipe(tmp_path / "run", data)
    # Laid out as `ftkit eval` lays a chat answer out: open-ended (the reference answer's length is not given away).
    task = make_task("chat", recipe.task.options)
    tokenizer = load_tokenizer(recipe.model)
    examples, layouts = one_canvas_layouts(task, tokenizer, task.build_dataset("train", 4, 0), 24, 512)
    past_answer = layouts[0].allowed[layouts[0].content_length]
    assert isinstance(past_answer, TokenRule) and past_answer.exclude  # any text token or a stop, not only a stop
    summary = rl(recipe, progress=False)
    rows = rl_rows(tmp_path / "run")
    assert [r["step"] for r in rows] == [1, 2] and all(0.0 <= r["reward"] <= 1.0 for r in rows)
    comparison = json.loads((tmp_path / "run" / "rl_eval.json").read_text())
    assert set(comparison["after"]) >= {"verified", "exact_match", "answer_found"}
    assert summary["stage"] == "rl" and (tmp_path / "run" / "adapter_model.safetensors").is_file()
    # The reward is the verifier's: the right answer 1; a wrong number keeps the credit of its `#### ` format (the
    # violation flags the number's characters), no answer format none.
    from ftkit.tasks.base import RewardParts, reward_parts

    assert reward_parts(task, examples[0], examples[0].answer) == RewardParts(1.0, 1.0)
    assert reward_parts(task, examples[0], "#### -5") == RewardParts(5 / 7, 0.0)
    assert reward_parts(task, examples[0], "five") == RewardParts(0.0, 0.0)


def test_answers_longer_than_one_canvas_are_refused(tmp_path):
    from test_task_chat import chats, write_jsonl

    from ftkit.rl.run import rl

    data = write_jsonl(tmp_path / "chat.jsonl", chats(30, long_every=3))
    with pytest.raises(
        FtkitError,
        match=r"task chat: \d+ of \d+ training answers are longer than one canvas "
        r"\(first: example chat.jsonl row \d+, \d+ tokens with its end-of-turn token; "
        r"canvas_length=24\); ftkit rl samples and scores one canvas per answer and "
        r"does not support multi-block answers",
    ):
        rl(chat_recipe(tmp_path / "run", data), progress=False)
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------------------------
# Two real processes, Ctrl-C


def test_one_writer_and_ctrl_c_through_the_cli(tmp_path):
    """A second `ftkit rl` on a running RL run is refused naming the holder; Ctrl-C names the last checkpoint and the
    exact command, which resumes from it."""
    from test_faults import default_sigint, wait_for

    out = tmp_path / "run"
    args = [
        "rl",
        "recipes/tiny/sudoku_rl.yaml",
        f"train.output_dir={out}",
        "rl.init_from=null",
        "rl.evaluate=false",
        "rl.group_size=2",
        "rl.prompts_per_step=2",
        "rl.elbo_samples=1",
        "train.max_steps=400",
        "train.save_steps=2",
        "task.train_size=16",
        "train.batch_size=4",
        "eval.steps=2",
        "model.tiny.layers=1",
        "model.tiny.hidden=48",
        "model.tiny.heads=2",
        "model.tiny.intermediate=64",
    ]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}

    def start(argv) -> subprocess.Popen:
        return subprocess.Popen(
            [sys.executable, "-m", "ftkit", *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            preexec_fn=default_sigint,
        )

    def interrupt(proc) -> str:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        return err

    first = start(args)
    try:
        wait_for(lambda: (out / "checkpoints" / "checkpoint-2").is_dir(), first)
        second = subprocess.run(
            [sys.executable, "-m", "ftkit", *args, "--resume"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        errors = [ln for ln in second.stderr.splitlines() if ln.startswith("error:")]
        assert second.returncode == 2 and len(errors) == 1, second.stderr
        assert (
            f"in use by pid {first.pid} on {socket.gethostname()}: `ftkit rl recipes/tiny/sudoku_rl.yaml" in errors[0]
        )
        err = interrupt(first)
    finally:
        if first.poll() is None:
            first.kill()
    newest = rundir.checkpoints(out)[0]
    resume = shlex.join(["ftkit", *args, "--resume"])
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    assert lines == [
        f"interrupted; last saved checkpoint: {newest} (step {rundir.checkpoint_step(newest)}); resume with: {resume}"
    ], err

    step = rundir.checkpoint_step(newest)
    again = start(shlex.split(resume)[1:])
    try:
        wait_for(lambda: rundir.checkpoints(out)[0].name != newest.name, again)
        err = interrupt(again)
    finally:
        if again.poll() is None:
            again.kill()
    assert f"resuming from checkpoint-{step} (step {step} of 400)" in err
