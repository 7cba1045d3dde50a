"""Run directories you can trust: checkpoint manifests, damaged files named on load (no traceback, no Hub), resume
choices (damaged, finished, half-finished, crashed before the first checkpoint), an empty output_dir refused."""

import json
import shutil
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_train import CrashAt, tiny_recipe
from typer.testing import CliRunner

from ftkit.cli import app
from ftkit.errors import FtkitError, RecipeError
from ftkit.recipe import recipe_from_dict
from ftkit.run import manifest, rundir
from ftkit.run.paths import RunPaths
from ftkit.sft.run import train

PUZZLE = "53..7....6..195....98....6.8...6...34..8.3..17...2...6.6....28....419..5....8..79"


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("runs") / "done"
    train(tiny_recipe(out), progress=False)
    return out


@pytest.fixture
def run(finished, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(finished, copy)
    return copy


@pytest.fixture
def no_network(monkeypatch):
    """Any connection attempt (a Hub lookup) fails the test."""
    attempts = []

    def refuse(self, address, *a, **kw):
        attempts.append(address)
        raise AssertionError(f"network access to {address}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    yield attempts
    assert attempts == []


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result) -> str:
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    errors = [ln for ln in result.output.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1, result.output
    return errors[0]


def recipe_file(run: Path, tmp_path: Path) -> Path:
    path = tmp_path / "recipe.yaml"
    shutil.copyfile(run / "recipe.yaml", path)
    return path


# ----------------------------------------------------------------------------------------------------------------
# Manifests


def test_every_checkpoint_has_a_manifest_of_all_its_files(finished):
    for ckpt in rundir.checkpoints(finished):
        files = json.loads((ckpt / RunPaths.MANIFEST).read_text())["files"]
        on_disk = {p.name for p in ckpt.iterdir() if p.is_file()} - {RunPaths.MANIFEST}
        assert set(files) == on_disk and {"adapter_model.safetensors", "optimizer.pt", "rng_state.pth"} <= on_disk
        assert all(files[n]["size"] == (ckpt / n).stat().st_size for n in files)
        assert manifest.verify(ckpt) is None


def test_manifest_catches_truncation_changed_bytes_and_missing_files(run):
    ckpt = run / "checkpoints" / "checkpoint-6"
    weights = ckpt / "optimizer.pt"
    data = weights.read_bytes()
    weights.write_bytes(data[:-10])
    assert manifest.verify(ckpt) == manifest.Damage(
        "optimizer.pt", f"{len(data) - 10} bytes, the manifest says {len(data)}"
    )
    weights.write_bytes(data[:100] + bytes([data[100] ^ 1]) + data[101:])  # same size, one bit flipped
    assert manifest.verify(ckpt) == manifest.Damage("optimizer.pt", "contents differ from the manifest (sha256)")
    weights.unlink()
    assert manifest.verify(ckpt).what == "missing"
    assert manifest.verify(ckpt, only=("adapter_model.safetensors",)) is None  # eval checks only what it reads


def test_a_checkpoint_without_manifest_gets_the_structural_check(run):
    ckpt = run / "checkpoints" / "checkpoint-6"
    (ckpt / RunPaths.MANIFEST).unlink()
    assert manifest.verify(ckpt) is None
    weights = ckpt / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1])
    assert manifest.verify(ckpt).file == "adapter_model.safetensors"
    assert "truncated" in manifest.verify(ckpt).what


# ----------------------------------------------------------------------------------------------------------------
# Damaged files: one error line naming the file and what to do; nothing is fetched from the Hub


def _truncate(path: Path, keep: int | None = None) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: keep if keep is not None else len(data) // 2])


def _cut_before_section(path: Path, section: str) -> None:
    text = path.read_text()
    path.write_text(text[: text.index(f"\n{section}:") + 1])


DAMAGE = [
    (
        "truncated adapter",
        lambda r: _truncate(r / "adapter_model.safetensors", 100),
        ["adapter_model.safetensors: truncated", "--checkpoint latest", "--resume"],
    ),
    (
        "deleted adapter",
        lambda r: (r / "adapter_model.safetensors").unlink(),
        ["adapter_model.safetensors: missing", "--checkpoint latest"],
    ),
    (
        "truncated adapter config",
        lambda r: _truncate(r / "adapter_config.json"),
        ["adapter_config.json: not valid JSON", "--checkpoint latest"],
    ),
    ("deleted tokenizer", lambda r: (r / "tokenizer.json").unlink(), ["tokenizer.json: missing", "restore it"]),
    (
        "truncated tokenizer config",
        lambda r: _truncate(r / "tokenizer_config.json"),
        ["tokenizer_config.json: not valid JSON", "restore it"],
    ),
    (
        "recipe cut inside a line",
        lambda r: _truncate(r / "recipe.yaml", len((r / "recipe.yaml").read_bytes()) - 3),
        ["recipe.yaml: incomplete (its last line is cut", "ftkit validate RECIPE"],
    ),
    (
        "recipe cut between sections",
        lambda r: _cut_before_section(r / "recipe.yaml", "eval"),
        ["recipe.yaml: incomplete (no `eval` section", "ftkit validate RECIPE"],
    ),
    ("recipe emptied", lambda r: (r / "recipe.yaml").write_text(""), ["recipe.yaml: incomplete (no `model` section"]),
    (
        "truncated base weights",
        lambda r: _truncate(r / "base" / "model.safetensors"),
        ["base/model.safetensors: truncated", "random-init base weights"],
    ),
    ("deleted base config", lambda r: (r / "base" / "config.json").unlink(), ["base/config.json: missing"]),
]


@pytest.mark.parametrize("damage, needles", [pytest.param(d, n, id=i) for i, d, n in DAMAGE])
def test_damaged_run_file_is_one_clear_error(run, damage, needles, no_network):
    damage(run)
    line = one_error_line(invoke("eval", run, "-n", "1", "--steps", "1"))
    for needle in needles:
        assert needle in line, line
    assert not (run / "eval.json").exists()


def test_generate_checks_the_same_files(run, no_network):
    _truncate(run / "adapter_model.safetensors", 100)
    line = one_error_line(invoke("generate", run, "-i", PUZZLE, "--steps", "1"))
    assert "adapter_model.safetensors: truncated" in line
    shutil.rmtree(run / "base")
    assert "base/config.json: missing" in one_error_line(invoke("solve", run, PUZZLE))


def test_eval_checkpoint_verifies_the_checkpoint(run, no_network):
    weights = run / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-8] + bytes(8))  # same size, different bytes: only the manifest can tell
    for which in ("checkpoint-6", "latest"):
        line = one_error_line(invoke("eval", run, "--checkpoint", which, "-n", "1", "--steps", "1"))
        assert "checkpoint-6: damaged (adapter_model.safetensors: contents differ from the manifest" in line, line
        assert "--checkpoint checkpoint-3" in line and "--resume` moves it aside" in line
    result = invoke("eval", run, "--checkpoint", "checkpoint-3", "-n", "1", "--steps", "1")
    assert result.exit_code == 0, result.output


# ----------------------------------------------------------------------------------------------------------------
# What --resume does with what the run holds


def test_resume_on_a_complete_run_changes_nothing(run, tmp_path):
    before = {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()}
    log = (run / "train_log.jsonl").read_text()
    result = invoke("train", recipe_file(run, tmp_path), f"train.output_dir={run}", "--resume")
    assert result.exit_code == 0, result.output
    assert "the run is complete (step 6 of 6); nothing to resume" in result.output
    assert {p: p.read_bytes() for p in sorted((run / "checkpoints").rglob("*")) if p.is_file()} == before
    assert (run / "train_log.jsonl").read_text() == log


def test_resume_after_the_final_save_was_lost_writes_it_from_the_last_checkpoint(run, finished, capsys):
    for name in ("adapter_model.safetensors", "adapter_config.json", "summary.json"):
        (run / name).unlink()
    log = (run / "train_log.jsonl").read_text()
    summary = train(tiny_recipe(run), resume=True, progress=False)
    assert "resuming from checkpoint-6: training is done; writing the final adapter" in capsys.readouterr().err
    assert summary["resumed_from_step"] == 6 and (run / "summary.json").is_file()
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert (run / "train_log.jsonl").read_text() == log  # no step was trained
    got, want = load_file(run / "adapter_model.safetensors"), load_file(finished / "adapter_model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    assert rundir.load_run(run).weights_dir == run


def test_resume_without_an_intact_checkpoint_keeps_the_results(run):
    for ckpt in rundir.checkpoints(run):
        _truncate(ckpt / "trainer_state.json")
    with pytest.raises(FtkitError, match=r"no intact checkpoint to continue from, and the run holds results"):
        train(tiny_recipe(run), resume=True, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["damaged-checkpoint-3", "damaged-checkpoint-6"]
    assert (run / "adapter_model.safetensors").is_file()  # nothing replaced, nothing deleted


def test_a_past_max_steps_checkpoint_is_refused(run):
    with pytest.raises(FtkitError, match=r"checkpoint-6: step 6 is past train.max_steps=4"):
        train(tiny_recipe(run, max_steps=4), resume=True, progress=False)


def test_a_crash_before_the_first_checkpoint_blocks_nothing(tmp_path, capsys):
    out = tmp_path / "crashed"
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_recipe(out), progress=False, extra_callbacks=[CrashAt(1)])
    assert (out / "recipe.yaml").is_file() and not rundir.checkpoints(out)
    crashed_base = manifest.sha256(out / "base" / "model.safetensors")

    # The same command runs again...
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(tiny_recipe(out), progress=False, extra_callbacks=[CrashAt(1)])
    assert "an earlier attempt saved no checkpoint; starting over" in capsys.readouterr().err

    # ... and so does --resume with another model section: there is nothing to resume, so nothing to mismatch.
    changed = recipe_from_dict(
        {
            **tiny_recipe(out, max_steps=3).to_dict(),
            "model": {
                **tiny_recipe(out).to_dict()["model"],
                "tiny": {**tiny_recipe(out).to_dict()["model"]["tiny"], "init_seed": 5},
            },
        }
    )
    summary = train(changed, resume=True, progress=False)
    assert summary["steps"] == 3 and summary["resumed_from_step"] == 0
    assert manifest.sha256(out / "base" / "model.safetensors") != crashed_base  # the new base, not the leftover
    steps = [r["step"] for r in rundir.read_jsonl(out / "train_log.jsonl") if "loss" in r]
    assert steps == [1, 2, 3]


def test_empty_output_dir_is_refused(tmp_path, monkeypatch):
    with pytest.raises(RecipeError, match=r"`train.output_dir` must not be empty"):
        recipe_from_dict({"train": {"output_dir": ""}})
    monkeypatch.chdir(tmp_path)
    root = Path(__file__).resolve().parents[1]
    line = one_error_line(invoke("train", root / "recipes" / "tiny" / "sudoku.yaml", "train.output_dir="))
    assert "`train.output_dir` must not be empty" in line
    assert list(tmp_path.iterdir()) == []


def test_a_directory_ftkit_did_not_make_is_not_written_into(tmp_path):
    mine = tmp_path / "project"
    mine.mkdir()
    (mine / "recipe.yaml").write_text("my own recipe\n")
    (mine / "tokenizer.json").write_text("{}")  # a name a run file also has: must not be cleared
    before = {p.name: p.read_text() for p in mine.iterdir()}
    with pytest.raises(
        FtkitError,
        match=r"project: exists and is not an ftkit run directory \(it holds recipe.yaml, "
        r"tokenizer.json\); choose another train.output_dir",
    ):
        train(tiny_recipe(mine), progress=False)
    assert {p.name: p.read_text() for p in mine.iterdir()} == before  # untouched, no lock file either
    empty = tmp_path / "empty"
    empty.mkdir()
    train(tiny_recipe(empty, max_steps=1), progress=False)  # an empty directory is fine
    assert (empty / "adapter_model.safetensors").is_file()


def test_an_unwritable_run_is_a_clear_error(run, monkeypatch):
    import os

    real_open = os.open

    def read_only(path, flags, *a, **kw):
        if str(path).endswith(".ftkit.lock"):
            raise PermissionError(13, "Permission denied")
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(os, "open", read_only)
    line = one_error_line(invoke("eval", run, "-n", "1"))
    assert "cannot eval here: Permission denied" in line and "copy the run somewhere writable" in line
