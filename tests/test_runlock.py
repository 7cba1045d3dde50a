"""One writer per run directory: a second command is refused naming the holder, a dead holder's lock is taken over."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from test_faults import DRIVER, ROOT, kill9, wait_for

from ftkit.run import rundir
from ftkit.run.lock import RunLock, RunLocked, _process_start
from ftkit.run.paths import RunPaths


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    with RunLock(tmp_path, "train"):
        with pytest.raises(RunLocked) as err:
            RunLock(tmp_path, "eval").acquire()
        message = str(err.value)
        assert f"in use by pid {os.getpid()} on {socket.gethostname()}: `" in message
        assert "(started 20" in message and "wait for it to finish or stop it" in message
    with RunLock(tmp_path, "eval") as again:  # released: free again, and nothing stale to report
        assert again.taken_over is None
    assert (tmp_path / RunPaths.LOCK).read_text() == ""


def test_the_lock_of_a_dead_process_is_taken_over_saying_so(tmp_path, capsys):
    dead = {
        "pid": _dead_pid(),
        "host": socket.gethostname(),
        "command": "ftkit train r.yaml",
        "purpose": "train",
        "processes": 2,
        "started": "2025-01-01 10:00:00 +0000",
        "process_start": "1",
    }
    (tmp_path / RunPaths.LOCK).write_text(json.dumps(dead))
    with RunLock(tmp_path, "train") as lock:
        assert lock.taken_over == dead
        holder = json.loads((tmp_path / RunPaths.LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["purpose"] == "train"
    err = capsys.readouterr().err
    assert (
        f"taking over the lock of pid {dead['pid']} on {dead['host']}, 2 processes: `ftkit train r.yaml` "
        "(started 2025-01-01 10:00:00 +0000), which is no longer running" in err
    )


def test_a_live_holder_is_refused_even_where_flock_is_not_enforced(tmp_path):
    """On a filesystem that ignores flock the record of a live holder on this host still keeps a second one out."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = {
            "pid": sleeper.pid,
            "host": socket.gethostname(),
            "command": "ftkit train r.yaml",
            "started": "now",
            "process_start": _process_start(sleeper.pid),
        }
        (tmp_path / RunPaths.LOCK).write_text(json.dumps(live))
        with pytest.raises(RunLocked, match=rf"in use by pid {sleeper.pid} .*does not enforce locks"):
            RunLock(tmp_path, "train").acquire()
    finally:
        sleeper.kill()
        sleeper.wait()


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*") if p.is_file()
    }


def _cli(*args) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ftkit", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=600
    )


def test_two_real_processes_one_writer_then_takeover(tmp_path):
    out, gate, log = tmp_path / "run", tmp_path / "gate", tmp_path / "first.log"
    # The first writer stops after step 4 (checkpoint-3 saved) and waits there, holding the lock, writing nothing.
    first = subprocess.Popen(
        [sys.executable, str(DRIVER), str(out), "--gate", str(gate), "--gate-step", "4"],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        wait_for(lambda: "GATED" in log.read_text(), first)
        before = _snapshot(out)
        for args in (
            ("train", "recipes/tiny/sudoku.yaml", f"train.output_dir={out}"),
            ("train", "recipes/tiny/sudoku.yaml", f"train.output_dir={out}", "--resume"),
            ("eval", out, "-n", "1"),
        ):
            proc = _cli(*args)
            assert proc.returncode == 2, proc.stderr
            errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
            assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
            assert f"in use by pid {first.pid} on {socket.gethostname()}: `" in errors[0]
            assert "train_driver.py" in errors[0] and "(started " in errors[0]
        assert _snapshot(out) == before  # the refused commands touched nothing
    finally:
        kill9(first)

    second = subprocess.run(
        [sys.executable, str(DRIVER), str(out), "--resume"],
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert second.returncode == 0, second.stdout + second.stderr
    assert f"taking over the lock of pid {first.pid}" in second.stderr
    assert "resuming from checkpoint-3 (step 3 of 12)" in second.stderr
    steps = [r["step"] for r in rundir.read_jsonl(out / "train_log.jsonl") if "loss" in r]
    assert steps == list(range(1, 13))
