"""Nothing a user has is lost or misreported, end to end with real `ftkit` processes (issue 24):

* a run without final weights (Ctrl-C'd, or still training) never gets an eval.json that `ftkit push` would take: its
  evaluation names the checkpoint it measured, with the weights' hash; `generate` says which checkpoint answered;
  push publishes only an evaluation of the weights it uploads;
* a command that finds no run leaves nothing behind (no lock file), and the "not made by ftkit" guard cannot be
  satisfied by a file a failed command wrote.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from test_faults import default_sigint, wait_for
from typer.testing import CliRunner

import ftkit.evaluation.evaluate as ev
from ftkit.cli import app
from ftkit.errors import FtkitError
from ftkit.evaluation.report import EvalReport, describe_file, render_sweep
from ftkit.evaluation.request import EvalRequest, check_answer_budget
from ftkit.evaluation.result_files import canonical_problems
from ftkit.hub import access as hub_access
from ftkit.recipe import EvalSection, LoraSection, ModelSection, PresetSpec, Recipe, TaskSection, TrainSection
from ftkit.run import rundir
from ftkit.run import start as runstart
from ftkit.run.lock import holds_run_lock
from ftkit.run.paths import RunPaths

ROOT = Path(__file__).resolve().parents[1]
PUZZLE = "510060980978215436403070501000501000004027050135006092207003860340008270000750014"
# A small, fast run whose own evaluation is 2 puzzles at 2 steps (so `ftkit eval RUN` is the recipe's evaluation).
SMALL = [
    "model.tiny.hidden=48",
    "model.tiny.heads=2",
    "model.tiny.intermediate=64",
    "task.train_size=32",
    "task.test_size=2",
    "train.batch_size=4",
    "train.save_steps=2",
    "train.logging_steps=1",
    "eval.steps=2",
    "eval.num_examples=2",
    "eval.batch_size=2",
]


def ftkit(*args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "ftkit", *map(str, args)], cwd=cwd, capture_output=True, text=True, env=env, timeout=300
    )


def error_line(done: subprocess.CompletedProcess) -> str:
    """Exit 2 and exactly one `error:` line, no traceback; return it."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, done.stderr
    return errors[0]


def flat(text: str) -> str:
    """Text with rich's line wrapping undone (a piped console is 80 columns wide)."""
    return " ".join(text.split())


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow  # eight `ftkit` processes: about 2 min on 2 quiet cores
def test_a_half_trained_run_is_never_published_as_final(tmp_path):
    run = tmp_path / "run"
    train = ["train", "recipes/tiny/sudoku.yaml", f"train.output_dir={run}", "train.max_steps=400", *SMALL]

    # Ctrl-C once the first checkpoint is saved.
    proc = subprocess.Popen(
        [sys.executable, "-m", "ftkit", *train],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=default_sigint,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )
    wait_for(lambda: (run / "checkpoints" / "checkpoint-2").is_dir(), proc)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=60)
    assert proc.returncode == 130
    newest = rundir.checkpoints(run)[0]
    assert not (run / "adapter_model.safetensors").exists()

    # The recipe's own evaluation of a run without final weights: exit 0, but it is the checkpoint's result, under
    # the checkpoint's name, with the hash of exactly the weights it measured; no eval.json.
    done = ftkit("eval", run)
    assert done.returncode == 0, done.stderr
    assert not (run / "eval.json").exists()
    report = json.loads((run / f"eval_{newest.name}.json").read_text())
    assert report["canonical"] is False and report["checkpoint"] == newest.name
    assert report["weights"] == {
        "source": "checkpoint",
        "checkpoint": newest.name,
        "file": f"checkpoints/{newest.name}/adapter_model.safetensors",
        "sha256": sha256(newest / "adapter_model.safetensors"),
    }
    assert (
        f"no final adapter yet (training has not finished): this evaluated its newest checkpoint, "
        f"{newest.name}" in flat(done.stderr)
    )
    assert f"eval_{newest.name}.json of {newest.name}" in flat(done.stderr) and "published by" not in done.stderr

    # `generate` during the run names the checkpoint that answers.
    done = ftkit("generate", run, "-i", PUZZLE, "--steps", "2")
    assert done.returncode in (0, 1), done.stderr
    assert f"({newest.name}: the run has no final adapter yet, so its newest checkpoint answers)" in flat(done.stdout)
    assert "fine-tuned adapter" not in done.stdout

    # An eval.json as an older ftkit wrote it at this point (checkpoint null, no hash), then the run finishes.
    stale = {**report, "file": "eval.json", "canonical": True, "checkpoint": None, "differs_from_recipe": []}
    for key in ("weights", "adapter_sha256"):
        stale.pop(key, None)
    (run / "eval.json").write_text(json.dumps(stale))
    finish = rundir.checkpoint_step(newest) + 2
    done = ftkit(*train[:3], f"train.max_steps={finish}", *SMALL, "--resume")
    assert done.returncode == 0, done.stderr
    final = run / "adapter_model.safetensors"
    assert final.is_file()

    # push publishes only an evaluation of the weights it uploads: the stale one is refused ...
    line = error_line(ftkit("push", run, "--dry-run"))
    assert "eval.json: not the run's own evaluation" in line and "does not record which weights it measured" in line
    assert not (run / "hub_upload").exists()
    # ... and the final adapter's own evaluation is what gets staged, with its hash.
    done = ftkit("eval", run)
    assert done.returncode == 0 and "the run's own evaluation (published by `ftkit push`)" in flat(done.stderr)
    done = ftkit("push", run, "--dry-run")
    assert done.returncode == 0, done.stderr
    staged = json.loads((run / "hub_upload" / "eval.json").read_text())
    assert staged["weights"] == {"source": "final", "file": "adapter_model.safetensors", "sha256": sha256(final)}
    assert staged["adapter_sha256"] == sha256(final) == sha256(run / "hub_upload" / "adapter_model.safetensors")
    # The final adapter answers `generate` now, and the run directory has no PEFT template card.
    done = ftkit("generate", run, "-i", PUZZLE, "--steps", "2")
    assert "(fine-tuned adapter)" in flat(done.stdout), done.stdout + done.stderr
    assert not (run / "README.md").exists()


def test_a_failed_command_leaves_nothing_and_cannot_disarm_the_guard(tmp_path):
    proj = tmp_path / "proj"
    proj.mkdir()
    (proj / "README.md").write_text("precious\n")

    # Commands that find no run there fail with one line, and leave the directory as it was.
    assert "not an ftkit run directory (no recipe.yaml)" in error_line(ftkit("eval", proj))
    assert "not an ftkit run directory (no recipe.yaml)" in error_line(ftkit("push", proj, "--dry-run"))
    assert "not an ftkit run directory (no recipe.yaml)" in error_line(ftkit("generate", proj, "-i", PUZZLE))
    assert sorted(p.name for p in proj.iterdir()) == ["README.md"]
    # The same in the repository's recipes/ folder: nothing for `git status` to show.
    before = sorted(p.name for p in (ROOT / "recipes").iterdir())
    error_line(ftkit("eval", "recipes"))
    assert sorted(p.name for p in (ROOT / "recipes").iterdir()) == before

    # Training into it is refused, the user's file untouched ...
    train = ["train", "recipes/tiny/sudoku.yaml", f"train.output_dir={proj}", "train.max_steps=1", *SMALL]
    line = error_line(ftkit(*train))
    assert "proj: exists and is not an ftkit run directory (it holds README.md)" in line
    # ... also when a lock file is there (as an earlier ftkit's failed eval left one): it does not vouch for the rest.
    (proj / RunPaths.LOCK).write_text("")
    line = error_line(ftkit(*train))
    assert "proj: exists and is not an ftkit run directory (it holds README.md)" in line
    assert (proj / "README.md").read_text() == "precious\n"
    assert sorted(p.name for p in proj.iterdir()) == [RunPaths.LOCK, "README.md"]


# ----------------------------------------------------------------------------------------------------------------
# The same guards, piece by piece (in-process, fast)


def _weights(folder: Path, content: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_model.safetensors").write_bytes(content)
    return folder / "adapter_model.safetensors"


def test_push_takes_only_an_evaluation_that_records_the_weights_it_uploads(tmp_path):
    recipe = Recipe(task=TaskSection(name="sudoku", test_size=2), eval=EvalSection(num_examples=2, steps=2))
    report = {"adapter": True, "checkpoint": None, "num_examples": 2, "eval": {"split": "test", "steps": 2}}
    assert canonical_problems(report, recipe, tmp_path) == ["the run has no final adapter_model.safetensors"]
    final = _weights(tmp_path, b"final weights")
    # What eval wrote for a run without final weights (before: accepted once the run had finished).
    assert canonical_problems(report, recipe, tmp_path) == [
        "it does not record which weights it measured (no hash of adapter_model.safetensors: made before the run "
        "had its final weights, or by an older ftkit)"
    ]
    assert canonical_problems({**report, "adapter_sha256": sha256(final)}, recipe, tmp_path) == []
    assert canonical_problems({**report, "adapter_sha256": "0" * 64}, recipe, tmp_path) == [
        "it was made with another adapter_model.safetensors than the run holds now"
    ]


def test_an_evaluation_names_the_checkpoint_it_measured(tmp_path, monkeypatch):
    from ftkit.model.char_tokenizer import build_char_tokenizer
    from ftkit.tasks.sudoku import SudokuTask

    ckpt = tmp_path / "checkpoints" / "checkpoint-4"
    weights = _weights(ckpt, b"step 4")
    recipe = Recipe(
        model=ModelSection(base="tiny"),
        task=TaskSection(name="sudoku", test_size=2),
        eval=EvalSection(steps=1, batch_size=2, num_examples=2),
    )
    run = SimpleNamespace(
        recipe=recipe,
        model=None,
        tokenizer=build_char_tokenizer(),
        task=SudokuTask(),
        canvas_length=PresetSpec().canvas_length,
        weights_dir=ckpt,
    )  # load_run's fallback
    monkeypatch.setattr(ev, "_load_run", lambda run_dir, adapter, checkpoint=None: run)
    monkeypatch.setattr(
        ev,
        "evaluate_examples",
        lambda *a, **kw: EvalReport(
            metrics={"cell_accuracy_blanks": 0.5},
            outputs=[],
            records=[],
            steps=1,
            verifier_renoise=False,
            mean_steps_used=1.0,
            tokens_per_forward=1.0,
            forward_passes=1,
            renoised_cells=0,
            seconds=1.0,
            examples_per_second=2.0,
            num_examples=2,
        ),
    )
    report = ev.evaluate_run(EvalRequest(tmp_path, num_examples=50))
    assert report["file"] == "eval_checkpoint-4.json" and not (tmp_path / "eval.json").exists()
    assert report["weights"] == {
        "source": "checkpoint",
        "checkpoint": "checkpoint-4",
        "file": "checkpoints/checkpoint-4/adapter_model.safetensors",
        "sha256": sha256(weights),
    }
    assert "adapter_sha256" not in report
    assert report["notes"] == [
        "the run has no final adapter yet (training has not finished): this evaluated its newest checkpoint, "
        "checkpoint-4",
        "-n 50: the test split has 2 examples (task.test_size); evaluated all of them",
    ]
    assert "eval_checkpoint-4.json of checkpoint-4 (adapter of checkpoint-4)" in describe_file(report)


def test_generate_names_the_weights_that_answer(tmp_path):
    from ftkit.evaluation.generate import weights_label

    lora, full = Recipe(), Recipe(train=TrainSection(trainable="full"))
    ckpt = tmp_path / "checkpoints" / "checkpoint-100"
    assert weights_label(SimpleNamespace(recipe=lora, run_dir=tmp_path, weights_dir=tmp_path)) == "fine-tuned adapter"
    assert weights_label(SimpleNamespace(recipe=full, run_dir=tmp_path, weights_dir=tmp_path)) == "fine-tuned model"
    assert (
        weights_label(SimpleNamespace(recipe=lora, run_dir=tmp_path, weights_dir=ckpt))
        == "checkpoint-100: the run has no final adapter yet, so its newest checkpoint answers"
    )
    assert (
        weights_label(SimpleNamespace(recipe=full, run_dir=tmp_path, weights_dir=None))
        == "base model: its untrained initial weights"
    )
    assert weights_label(SimpleNamespace(recipe=lora, run_dir=tmp_path, weights_dir=None)) == "base model, no adapter"


def test_a_command_that_finds_no_run_takes_no_lock(tmp_path):
    @holds_run_lock("eval")
    def command(run_dir):
        return (Path(run_dir) / RunPaths.LOCK).exists()

    (tmp_path / "README.md").write_text("mine")
    assert command(tmp_path) is False and sorted(p.name for p in tmp_path.iterdir()) == ["README.md"]
    (tmp_path / "recipe.yaml").write_text("{}\n")
    assert command(tmp_path) is True  # a run directory: held for the call


def test_only_versions_json_marks_a_directory_as_a_run(tmp_path):
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / RunPaths.LOCK).write_text("")
    assert rundir.foreign_entries(tmp_path) == ["README.md"]
    (tmp_path / "README.md").unlink()
    assert rundir.foreign_entries(tmp_path) == []  # only a lock file: an attempt that saved nothing
    (tmp_path / "README.md").write_text("mine")
    (tmp_path / RunPaths.VERSIONS).write_text("{}")
    assert rundir.foreign_entries(tmp_path) == []


def test_the_final_adapter_has_no_template_card(tmp_path):
    from ftkit.model.char_tokenizer import build_char_tokenizer
    from ftkit.model.load import build_tiny
    from ftkit.model.lora import attach_lora

    model = attach_lora(
        build_tiny(
            PresetSpec(
                layers=1,
                hidden=32,
                heads=2,
                kv_heads=1,
                head_dim=16,
                global_head_dim=16,
                intermediate=32,
                experts=2,
                top_k=1,
                expert_intermediate=16,
            ),
            build_char_tokenizer(),
        ),
        LoraSection(r=2, alpha=4),
    )
    runstart.save_weights(model, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    ckpt = tmp_path / "checkpoint-1"
    model.save_pretrained(ckpt)  # as the Trainer saves a checkpoint: PEFT's README.md included
    assert (ckpt / "README.md").is_file()
    final = tmp_path / "final"
    final.mkdir()
    runstart.copy_weights(ckpt, final)
    assert sorted(p.name for p in final.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]


# ----------------------------------------------------------------------------------------------------------------
# Model and data sources


def test_a_local_path_that_does_not_exist_is_not_a_hub_id(tmp_path, monkeypatch):
    from ftkit.model.load import base_is_local

    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    for path in ("runs/quickstart", "./quickstart", "../x/y", "/nowhere/model", "a/b/c"):
        with pytest.raises(
            FtkitError,
            match=r"model.base='.*': no such directory .* \(a relative path is taken "
            r"from the current directory\)",
        ):
            base_is_local(path)
    assert base_is_local("google/diffusiongemma") is False
    (tmp_path / "runs" / "quickstart").mkdir()
    assert base_is_local("runs/quickstart") is True
    recipe = Path(__file__).resolve().parents[1] / "recipes" / "quickstart_rl.yaml"
    done = CliRunner().invoke(app, ["validate", str(recipe), "model.base=runs/nope"])
    assert done.exit_code == 2 and "model.base='runs/nope': no such directory" in done.output, done.output


@pytest.fixture
def hub_unreachable(monkeypatch):
    """The Hub's host does not resolve (as on an offline machine); offline mode is not set by the user."""
    import datasets.config
    from huggingface_hub import constants

    attempts = []

    def fail(address, *a, **kw):
        attempts.append(address)
        raise socket.gaierror(-2, "Name or service not known")

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_access, "_unreachable", hub_access._UNKNOWN)
    monkeypatch.setattr(socket, "create_connection", fail)
    for name in hub_access.PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    return attempts


def test_an_unreachable_hub_fails_fast_and_once(hub_unreachable, capsys):
    from ftkit.model.load import load_tokenizer
    from ftkit.tasks import make_task

    started = time.perf_counter()
    with pytest.raises(
        FtkitError,
        match=r"model.base='google/not-cached-model': no such local path .*, not in the "
        r"local Hugging Face cache, and the Hub cannot be used \(huggingface.co: "
        r"Name or service not known\)",
    ):
        load_tokenizer(ModelSection(base="google/not-cached-model"))
    with pytest.raises(FtkitError, match=r"task.options.dataset='someone/not-cached-data': no such local path"):
        make_task("chat", {"dataset": "someone/not-cached-data"}).build_dataset("train", 5, 0)
    assert time.perf_counter() - started < 20  # before: about a minute of retries per file
    assert len(hub_unreachable) == 1  # one probe per process
    assert capsys.readouterr().err.count("the Hugging Face Hub cannot be reached") == 1


def _jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_a_bad_chat_row_is_named_with_what_it_holds(tmp_path):
    from ftkit.tasks import make_task

    rows = [
        {"messages": [{"role": "user", "content": f"What is {i} + 1?"}, {"role": "assistant", "content": f"{i + 1}"}]}
        for i in range(3)
    ]
    rows[2]["messages"][1]["content"] = 5
    task = make_task("chat", {"dataset": str(_jsonl(tmp_path / "chat.jsonl", rows))})
    # Before: datasets' Arrow reader made the column JSON and decoded row 1's "1" as 1, so row 1 was blamed.
    with pytest.raises(
        FtkitError,
        match=r"chat.jsonl row 3: `messages` turn 2: .*got \{'role': 'assistant', "
        r"'content': 5\}",
    ):
        task.build_dataset("all", 10, 0)
    rows[2]["messages"][1]["content"] = "3"
    _jsonl(tmp_path / "chat.jsonl", rows)
    assert [ex.answer for ex in sorted(task.build_dataset("all", 10, 0), key=lambda e: e.id)] == ["1", "2", "3"]
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(FtkitError, match=r"empty.jsonl: no rows \(the file is empty\)"):
        make_task("chat", {"dataset": str(tmp_path / "empty.jsonl")}).build_dataset("train", 5, 0)


# ----------------------------------------------------------------------------------------------------------------
# Messages


def test_inputs_and_paths_that_are_not_what_a_command_takes(tmp_path):
    runner = CliRunner()
    bad = tmp_path / "puzzle.txt"
    bad.write_bytes(b"\xff\xfe5300")
    for args in (["generate", tmp_path, "-i", f"@{bad}"], ["solve", tmp_path, f"@{bad}"]):
        done = runner.invoke(app, [str(a) for a in args])
        assert done.exit_code == 2 and "Traceback" not in done.output, done.output
        assert f"error: {bad}: not a UTF-8 text file (byte 0); save the input as UTF-8" in " ".join(done.output.split())
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("train:\n  output_dir: runs/mine\n")
    for command in ("eval", "push", "generate"):
        args = [command, str(recipe)] + (["-i", "x"] if command == "generate" else [])
        done = runner.invoke(app, args)
        assert done.exit_code == 2, done.output
        assert (
            f"mine.yaml: a file, not a run directory: a recipe? Its run directory is runs/mine, written by "
            f"`ftkit train {recipe}`"
        ) in " ".join(done.output.split())


def test_an_answer_budget_on_a_fixed_length_task_is_an_error():
    from ftkit.tasks import make_task

    with pytest.raises(FtkitError, match=r"--max-new-tokens: a sudoku answer has a fixed length"):
        check_answer_budget(make_task("sudoku", {}), 64)
    check_answer_budget(make_task("sudoku", {}), None)
    check_answer_budget(make_task("chat", {}), 64)  # block after block: the budget applies


def test_a_sweep_says_what_each_file_is(tmp_path):
    report = {
        "run_dir": str(tmp_path),
        "file": "eval.json",
        "canonical": True,
        "primary": "plain",
        "sweep_files": ["eval_sweep.json", "eval_sweep.png"],
        "sweep": [{"steps": s, "metrics": {"acc": 0.1 * s}, "mean_steps_used": s, "seconds": 1.0} for s in (1, 4)],
    }
    assert describe_file(report).splitlines() == [
        f"wrote {tmp_path}/eval.json: the run's own evaluation (published by `ftkit push`)",
        f"wrote {tmp_path}/eval_sweep.json: the metrics at each step count (1, 4), with the settings of eval.json",
        f"wrote {tmp_path}/eval_sweep.png: their plot against steps, with the settings of eval.json",
    ]
    assert render_sweep(report).row_count == 2


def test_piped_output_gets_no_progress_bars(monkeypatch):
    import datasets

    from ftkit import cli

    monkeypatch.setattr(sys.stderr, "isatty", lambda: False, raising=False)
    try:
        cli._quiet_libraries()
        assert not datasets.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()


def test_resume_names_the_settings_that_changed():
    assert runstart.changed_keys("lora", LoraSection(r=4), LoraSection(r=8)) == ["lora.r (4 -> 8)"]
    assert runstart.changed_keys("lora", LoraSection(), LoraSection()) == []


def test_rl_summary_labels(capsys):
    from ftkit import cli
    from ftkit.rl.run import _summary

    rows = [{"step": 1, "reward": 0.1, "kl": 0.02}, {"step": 2, "reward": 0.2}]  # the last window kept no sample
    summary = _summary(Recipe(), rows, {}, 1.0, 1.0, 0, {"before": {"acc": 0.25}, "after": {"acc": 0.5}}, 10)
    assert summary["kl_end"] == 0.02
    cli._print_rl_summary({**summary, "kl_end": None}, "runs/x")
    out = " ".join(capsys.readouterr().out.split())
    assert "kl_end │ n/a (no step kept a sample" in out and "│ acc │ 25.0% │ 50.0% │" in out


def test_a_python_verifier_that_cannot_be_imported_says_how_it_is_found():
    from ftkit.tasks.verifiers import make_checker

    with pytest.raises(
        FtkitError,
        match=r"cannot import 'my_checks_nowhere' .*importable by Python: installed, or in "
        r"a directory on PYTHONPATH \(for my_checks.py beside your recipe: "
        r"`PYTHONPATH=. ftkit train ...`",
    ):
        make_checker("python:my_checks_nowhere:check")


def test_docs_say_what_the_commands_do():
    docs = Path(__file__).resolve().parents[1] / "docs"
    runs = " ".join((docs / "runs.md").read_text().split())
    for written in ("hub_upload/", "_sweep.json", "eval_checkpoint-40.json", "README.md"):
        assert written in runs, written
    assert "so it waits for training to end" not in runs and "refuses at once (exit 2" in runs
    tasks = " ".join((docs / "tasks.md").read_text().split())
    assert "PYTHONPATH=. ftkit train recipe.yaml" in tasks and "for chat rows `example.question` is" in tasks
    assert "masked-diffusion" not in (docs / "recipe-reference.md").read_text()


def test_validate_says_what_an_uncached_hub_id_means(hub_unreachable, monkeypatch):
    import huggingface_hub

    from ftkit.errors import RecipeError
    from ftkit.recipe import recipe_from_dict
    from ftkit.recipe.preflight import check_model

    recipe = recipe_from_dict({"model": {"base": "runs/quickstart"}})  # no runs/ here: looks like owner/name
    notes = check_model(recipe, "r.yaml")
    assert (
        len(notes) == 1
        and "and the Hub cannot be used now (huggingface.co: Name or service not known): `ftkit train` would fail"
        in notes[0]
    )
    # With the Hub reachable, it is asked: no such model is an error, not "ok ... downloads it".
    monkeypatch.setattr(hub_access, "_unreachable", None)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "repo_exists", lambda repo, **kw: False)
    with pytest.raises(
        RecipeError,
        match=r"r.yaml: model.base='runs/quickstart': no local directory .*, and the Hub "
        r"has no such model",
    ):
        check_model(recipe, "r.yaml")
    monkeypatch.setattr(huggingface_hub, "repo_exists", lambda repo, **kw: True)
    assert "a hub id, not in the local cache: `ftkit train` downloads it" in check_model(recipe, "r.yaml")[0]
