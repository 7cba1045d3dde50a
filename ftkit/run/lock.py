"""One writer per run directory: an exclusive lock that `train`, `eval` and `push` hold while they use a run.

The lock is `flock(2)` on RUN/.ftkit.lock. The kernel drops it when its holder dies (kill -9 included), so a lock
can never outlive its process; on NFSv4 Linux maps flock to the server's byte-range locks, so two hosts sharing a
run directory are kept apart too. The file's content names the holder (pid, host, command, start time) for the
error a second command prints; it is left in place when the holder dies, which is how a stale lock is recognized
and reported when the next command takes it over.

Under a multi-process launch (torchrun, accelerate launch) only the main process takes the lock, for the whole
launch; the other ranks never touch it (ftkit.sft.run hands them the main process's verdict).
"""

from __future__ import annotations

import fcntl
import functools
import inspect
import json
import os
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any

from ftkit.errors import FtkitError
from ftkit.run.paths import RunPaths


class RunLocked(FtkitError):
    """Another live process holds the run directory."""


def _process_start(pid: int) -> str | None:
    """The kernel's start time of `pid` (clock ticks since boot): with the pid it tells a process from a later one
    that reused its pid."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def describe(holder: dict[str, Any]) -> str:
    procs = holder.get("processes", 1)
    launch = f", {procs} processes" if procs and procs > 1 else ""
    return (
        f"pid {holder.get('pid')} on {holder.get('host')}{launch}: `{holder.get('command')}` "
        f"(started {holder.get('started')})"
    )


def command_line() -> str:
    """The command as the user typed it (`python -m ftkit` shows as `ftkit`)."""
    argv = list(sys.argv)
    if argv and (argv[0].endswith("ftkit") or argv[0].endswith(os.path.join("ftkit", "__main__.py"))):
        argv[0] = "ftkit"
    return shlex.join(argv)


class RunLock:
    """`with RunLock(run_dir, "eval"):` — exclusive use of `run_dir`, or RunLocked naming the holder."""

    def __init__(self, run_dir: str | Path, purpose: str, processes: int = 1):
        self.run_dir = Path(run_dir)
        self.path = RunPaths(self.run_dir).lock
        self.purpose = purpose
        self.processes = processes
        self._fd: int | None = None
        self.taken_over: dict[str, Any] | None = None  # the dead holder whose lock this one replaced

    def acquire(self) -> RunLock:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise FtkitError(
                f"{self.run_dir}: cannot {self.purpose} here: {e.strerror} (ftkit needs to write into "
                "a run directory it uses; copy the run somewhere writable)"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._read(fd, retries=20)
            os.close(fd)
            who = describe(holder) if holder else "another process (its details are still being written)"
            raise RunLocked(
                f"{self.run_dir}: in use by {who}; wait for it to finish or stop it "
                f"(a lock left by a dead process is taken over automatically)"
            ) from None
        previous = self._read(fd)
        if previous and self._still_running(previous):
            # flock granted while the recorded holder runs on this host: this filesystem does not enforce flock
            # (e.g. NFS mounted with local_lock=all). Refuse rather than write beside it.
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise RunLocked(
                f"{self.run_dir}: in use by {describe(previous)} (this filesystem does not enforce "
                "locks, so ftkit cannot tell more); wait for it to finish or stop it"
            )
        self._fd = fd
        if previous:
            self.taken_over = previous
            print(
                f"note: {self.run_dir}: taking over the lock of {describe(previous)}, which is no longer running",
                file=sys.stderr,
                flush=True,
            )
        self._write(
            {
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "command": command_line(),
                "purpose": self.purpose,
                "processes": self.processes,
                "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                "process_start": _process_start(os.getpid()),
            }
        )
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)  # an empty lock file: nobody to report, nothing stale
        except OSError:
            pass  # the directory may be gone (a failed fresh run removes it); the lock goes with the descriptor
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    # -- holder file
    def _write(self, holder: dict[str, Any]) -> None:
        data = (json.dumps(holder) + "\n").encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)
        os.fsync(self._fd)

    @staticmethod
    def _read(fd: int, retries: int = 0) -> dict[str, Any] | None:
        """The holder's record; a holder that has just taken the lock may still be writing it, hence `retries`."""
        for attempt in range(retries + 1):
            raw = os.pread(fd, 1 << 16, 0)
            if raw.strip():
                try:
                    holder = json.loads(raw)
                    if isinstance(holder, dict):
                        return holder
                except ValueError:
                    pass
            if attempt < retries:
                time.sleep(0.05)
        return None

    @staticmethod
    def _still_running(holder: dict[str, Any]) -> bool:
        if holder.get("host") != socket.gethostname() or not isinstance(holder.get("pid"), int):
            return False  # another host's process: the lock server released it, so it is gone
        pid = holder["pid"]
        if pid == os.getpid():
            return False  # our own record, left by an earlier use in this process
        if holder.get("process_start") is not None:
            return _process_start(pid) == holder["process_start"]
        return _pid_alive(pid)


def holds_run_lock(purpose: str):
    """Decorator for functions whose first argument is a run directory they write into (eval, push): the lock is
    held for the call. A path that is not a run directory (no recipe.yaml, which `ftkit train` writes before it
    trains) is passed through untouched, for the function's own error: a command that finds no run leaves no lock
    file behind in a directory that is not one."""

    def wrap(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def locked(*args, **kwargs):
            run_dir = Path(signature.bind(*args, **kwargs).arguments["run_dir"])
            if not RunPaths(run_dir).recipe.is_file():  # a run directory holds it from its first moments
                return fn(*args, **kwargs)
            with RunLock(run_dir, purpose):
                return fn(*args, **kwargs)

        return locked

    return wrap
