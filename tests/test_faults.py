"""Faults: kill -9 during training and during a checkpoint write, a full disk while saving, Ctrl-C, and a soak test
that kills one run at random moments until it is done."""

import errno
import json
import os
import random
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_train import tiny_recipe

from ftkit.errors import FtkitError
from ftkit.run import manifest, rundir
from ftkit.sft.run import train

DRIVER = Path(__file__).resolve().parent / "helpers" / "train_driver.py"
ROOT = Path(__file__).resolve().parents[1]


def start_driver(out: Path, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, str(DRIVER), str(out), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=env,
    )


def default_sigint() -> None:
    """Popen's preexec_fn for a child that must see Ctrl-C: a shell without job control starts background commands
    (CI's `.ci/run &`) with SIGINT ignored, every child inherits that across exec, and Python then installs no
    KeyboardInterrupt handler, so the child would train on to the end."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def wait_for(predicate, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        if proc.poll() is not None:
            raise AssertionError(f"driver exited early:\n{proc.stdout.read()}")
        time.sleep(0.1)
    proc.kill()
    raise AssertionError("timed out waiting for the driver")


def kill9(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL


def assert_checkpoint_loads(ckpt: Path) -> None:
    from safetensors.torch import load_file

    assert manifest.verify(ckpt) is None
    assert json.loads((ckpt / "trainer_state.json").read_text())["global_step"] == int(ckpt.name.split("-")[1])
    assert load_file(ckpt / "adapter_model.safetensors")
    torch.load(ckpt / "optimizer.pt", weights_only=True)


def resume_to_the_end(out: Path) -> dict:
    summary = train(tiny_recipe(out, max_steps=12), resume=True, progress=False)
    steps = [r["step"] for r in rundir.read_jsonl(out / "train_log.jsonl") if "loss" in r]
    assert steps == list(range(1, 13))
    assert (out / "adapter_model.safetensors").is_file()
    return summary


def test_kill9_during_training_then_resume(tmp_path):
    out = tmp_path / "run"
    proc = start_driver(out, "--step-sleep", "0.4")
    wait_for(
        lambda: rundir.latest_checkpoint(out) is not None and rundir.latest_checkpoint(out).name == "checkpoint-6", proc
    )
    time.sleep(0.5)  # somewhere inside step 7
    kill9(proc)
    last = rundir.latest_checkpoint(out)
    assert_checkpoint_loads(last)
    summary = resume_to_the_end(out)
    assert summary["resumed_from_step"] == int(last.name.split("-")[1]) >= 6


def test_kill9_during_checkpoint_write_leaves_no_corrupt_checkpoint(tmp_path):
    out = tmp_path / "run"
    proc = start_driver(out, "--slow-save-step", "6")
    wait_for(
        lambda: (
            (out / "checkpoints" / ".staging" / "checkpoint-6").is_dir()
            and any((out / "checkpoints" / ".staging" / "checkpoint-6").iterdir())
        ),
        proc,
    )
    deadline = time.time() + 60
    while "SAVING" not in proc.stdout.readline() and time.time() < deadline:
        pass
    kill9(proc)
    # The half-written checkpoint-6 is only in the staging area; the newest complete checkpoint is 3.
    assert not (out / "checkpoints" / "checkpoint-6").exists()
    last = rundir.latest_checkpoint(out)
    assert last.name == "checkpoint-3"
    assert_checkpoint_loads(last)
    summary = resume_to_the_end(out)
    assert summary["resumed_from_step"] == 3
    assert not (out / "checkpoints" / ".staging").exists()


def test_disk_full_on_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    real_save = torch.save

    def full_disk(obj, f, *a, **kw):
        if "checkpoint-6" in str(f):
            raise OSError(errno.ENOSPC, "No space left on device", str(f))
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(FtkitError, match=r"disk full while writing checkpoint-6; the previous checkpoint is intact"):
        train(tiny_recipe(out, max_steps=12), progress=False)
    monkeypatch.setattr(torch, "save", real_save)
    assert not (out / "checkpoints" / "checkpoint-6").exists()
    assert not (out / "checkpoints" / ".staging").exists()
    last = rundir.latest_checkpoint(out)
    assert last.name == "checkpoint-3"
    assert_checkpoint_loads(last)
    assert resume_to_the_end(out)["resumed_from_step"] == 3


def test_ctrl_c_names_the_last_checkpoint_and_the_exact_resume_command(tmp_path):
    out = tmp_path / "run"
    args = [
        "train",
        "recipes/tiny/sudoku.yaml",
        f"train.output_dir={out}",
        "train.max_steps=400",
        "train.save_steps=2",
        "task.train_size=32",
        "train.batch_size=4",
        "model.tiny.hidden=48",
        "model.tiny.heads=2",
        "model.tiny.intermediate=64",
    ]

    def run_until(argv, predicate) -> str:
        proc = subprocess.Popen(
            [sys.executable, "-m", "ftkit", *argv],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
            preexec_fn=default_sigint,
        )
        wait_for(predicate, proc)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
        return err

    err = run_until(args, lambda: (out / "checkpoints" / "checkpoint-2").is_dir())
    lines = [ln for ln in err.splitlines() if ln.startswith("interrupted")]
    newest = rundir.checkpoints(out)[0]
    resume = shlex.join(["ftkit", *args, "--resume"])
    assert lines == [
        f"interrupted; last saved checkpoint: {newest} (step {rundir.checkpoint_step(newest)}); resume with: {resume}"
    ], err

    # The printed command continues the run from that checkpoint.
    step = rundir.checkpoint_step(newest)
    err = run_until(shlex.split(resume)[1:], lambda: rundir.checkpoints(out)[0].name != newest.name)
    assert f"resuming from checkpoint-{step} (step {step} of 400)" in err
    assert "interrupted; last saved checkpoint:" in err


SOAK_STEPS = 40
SOAK_KILLS = 15


def _soak_driver(out: Path, log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [
            sys.executable,
            str(DRIVER),
            str(out),
            "--soak",
            "--resume",
            "--step-sleep",
            "0.02",
            "--max-steps",
            str(SOAK_STEPS),
            "--save-steps",
            "2",
        ],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env=env,
    )


def _adapter(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "adapter_model.safetensors")


@pytest.mark.slow
def test_soak_fifteen_random_kills_end_like_the_uninterrupted_run(tmp_path):
    """One run killed with SIGKILL at 15 random moments — inside a step, inside a checkpoint write (before, during or
    after the manifest and rename), halfway through a log row — and resumed each time, ends with the adapter of the
    uninterrupted run and a log holding each step once."""
    reference = tmp_path / "reference"
    proc = _soak_driver(reference, tmp_path / "reference.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "reference.log").read_text()[-3000:]

    out = tmp_path / "run"
    rng = random.Random(14)
    # Kill moments spread over the whole run: a step to reach (increasing, so each attempt gets past the last
    # checkpoint), then the first marker of the chosen phase from that step on, then a random delay.
    targets = sorted(rng.sample(range(2, SOAK_STEPS - 1), SOAK_KILLS))
    kills = []

    def reached(log: Path, step: int, phase: str) -> bool:
        text = log.read_text()
        at = text.find(f"STEP {step}\n")
        return at >= 0 and phase in text[at:]

    for i, step in enumerate(targets):
        log = tmp_path / f"cycle{i}.log"
        phase, delay = rng.choice(["STEP", "SAVING", "LOGGING"]), rng.uniform(0.0, 0.12)
        proc = _soak_driver(out, log)
        wait_for(lambda log=log, step=step, phase=phase: reached(log, step, phase), proc, timeout=600)
        time.sleep(delay)
        kill9(proc)
        kills.append((step, phase, round(delay, 3)))
    proc = _soak_driver(out, tmp_path / "final.log")
    assert proc.wait(timeout=900) == 0, (tmp_path / "final.log").read_text()[-3000:]
    outputs = [(tmp_path / f"cycle{i}.log").read_text() for i in range(SOAK_KILLS)]
    assert any("taking over the lock" in text for text in outputs[1:])  # a kill -9 leaves a stale lock behind

    steps = [r["step"] for r in rundir.read_jsonl(out / "train_log.jsonl") if "loss" in r]
    assert steps == list(range(1, SOAK_STEPS + 1)), kills
    got, want = _adapter(out), _adapter(reference)
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), (name, kills)
    for ckpt in rundir.checkpoints(out):
        assert manifest.verify(ckpt) is None
    assert not (out / "checkpoints" / ".staging").exists()
