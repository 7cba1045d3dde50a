"""Checkpoints under two processes (DDP over gloo, launched by torchrun): every rank's part lands in the checkpoint
before it is renamed into place, and a launch killed in the middle of a checkpoint write resumes to the end of the
uninterrupted launch."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_faults import DRIVER, wait_for
from test_multiprocess import _torchrun

from ftkit.run import manifest, rundir
from ftkit.run.paths import RunPaths

STEPS = ["--max-steps", "6", "--save-steps", "2"]


def launch(out: Path, log: Path, *args: str) -> subprocess.Popen:
    cmd = [_torchrun(), "--nproc_per_node", "2", str(DRIVER), str(out), *STEPS, *args]
    return subprocess.Popen(
        cmd,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"},
    )


def _descendants(pid: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry.name))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def wait_gone(pids: list[int], timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in pids):
        assert time.time() < deadline, "workers survived SIGKILL"
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"


def losses(out: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in rundir.read_jsonl(out / "train_log.jsonl") if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    """Rank 1 writes its RNG state a second late: without a barrier, rank 0 would rename the checkpoint first."""
    root = tmp_path_factory.mktemp("ddp")
    proc = launch(root / "run", root / "log", "--slow-rank-save", "1")
    assert proc.wait(timeout=900) == 0, (root / "log").read_text()[-4000:]
    return root / "run"


def test_every_rank_part_is_in_the_checkpoint(uninterrupted):
    ckpts = rundir.checkpoints(uninterrupted)
    assert [c.name for c in ckpts] == ["checkpoint-6", "checkpoint-4", "checkpoint-2"][: len(ckpts)] and ckpts
    for ckpt in ckpts:
        files = json.loads((ckpt / RunPaths.MANIFEST).read_text())["files"]
        assert {"rng_state_0.pth", "rng_state_1.pth", "adapter_model.safetensors", "optimizer.pt"} <= set(files)
        assert manifest.verify(ckpt) is None
    assert not (uninterrupted / "checkpoints" / ".staging").exists()


def test_a_launch_killed_mid_checkpoint_resumes_to_the_uninterrupted_end(uninterrupted, tmp_path):
    out, log = tmp_path / "run", tmp_path / "killed.log"
    proc = launch(out, log, "--slow-save-step", "4")
    wait_for(lambda: "SAVING" in log.read_text(), proc, timeout=600)
    workers = _descendants(proc.pid)  # torchrun starts each worker in a session of its own
    assert len(workers) >= 2
    for pid in [proc.pid, *workers]:  # the whole launch at once, mid-write of checkpoint-4
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    wait_gone(workers)
    assert [c.name for c in rundir.checkpoints(out)] == ["checkpoint-2"]
    assert json.loads((out / ".ftkit.lock").read_text())["processes"] == 2  # held by the main process, for 2

    log = tmp_path / "resumed.log"
    proc = launch(out, log, "--resume")
    assert proc.wait(timeout=900) == 0, log.read_text()[-4000:]
    text = log.read_text()
    assert "taking over the lock of pid" in text and "2 processes" in text
    assert "resuming from checkpoint-2 (step 2 of 6)" in text
    assert not (out / "checkpoints" / ".staging").exists()
    got, want = losses(out), losses(uninterrupted)
    assert [s for s, _ in got] == [1, 2, 3, 4, 5, 6]
    for (step, a), (_, b) in zip(got, want):
        assert a == pytest.approx(b, rel=1e-5), step
    resumed, full = load_file(out / "adapter_model.safetensors"), load_file(uninterrupted / "adapter_model.safetensors")
    assert resumed.keys() == full.keys()
    for name in full:
        assert torch.allclose(resumed[name], full[name], rtol=1e-5, atol=1e-7), name
