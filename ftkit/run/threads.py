"""How many intra-op threads torch uses on the CPU, for `ftkit train` and `ftkit eval`.

torch's default is one thread per core of the machine, whatever the process may actually use. Two things make that
costly: a container or `taskset` that allows fewer CPUs (threads then share cores), and another busy process on
the same cores: OpenMP threads wait for each other at every op, so one descheduled thread stalls them all (measured
on this project's 2-core machine: tiny training 24-36x slower with 2 threads than with 1 while another process was
busy). So the count is, in order:

1. the recipe's `train.cpu_threads` when > 0;
2. `OMP_NUM_THREADS` when set (the user has decided);
3. the CPUs this process may run on (`os.sched_getaffinity`), less the ones other work keeps busy, at least 1.
   "Busy" is measured now: the machine's CPU time over a quarter second (`/proc/stat`). The 1-minute load average
   (the fallback where there is no /proc/stat) lags: a build or test run that ended a minute ago still counts
   there, and a quiet 2-core machine got 1 thread and trained at half speed.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

PROC_STAT = "/proc/stat"
SAMPLE_SECONDS = 0.25


@dataclass(frozen=True)
class ThreadChoice:
    threads: int
    reason: str

    def describe(self) -> str:
        return f"CPU threads: {self.threads} ({self.reason})"


def allowed_cpus() -> int:
    """CPUs this process may run on (its affinity mask; all CPUs where the OS has no such mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int]:
    """(idle, total) CPU time of the whole machine so far, in clock ticks (the `cpu` line of /proc/stat)."""
    with open(PROC_STAT, encoding="ascii") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal [guest guest_nice: already inside user and nice]
    return fields[3] + fields[4], sum(fields[:8])


def busy_cpus() -> int:
    """CPUs of the machine kept busy by other work right now: the non-idle share of all CPUs' time over
    SAMPLE_SECONDS, times the CPU count; where /proc/stat is missing, the 1-minute load average (0 where there is
    none). Read before any work starts, so this process does not count itself."""
    try:
        idle0, total0 = _cpu_times()
        time.sleep(SAMPLE_SECONDS)
        idle1, total1 = _cpu_times()
        if total1 > total0:
            return int(round((1 - (idle1 - idle0) / (total1 - total0)) * (os.cpu_count() or 1)))
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(round(os.getloadavg()[0]))
    except (AttributeError, OSError):
        return 0


def choose_threads(requested: int = 0) -> ThreadChoice:
    if requested > 0:
        return ThreadChoice(requested, "train.cpu_threads")
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return ThreadChoice(int(env), "OMP_NUM_THREADS")
    allowed = allowed_cpus()
    idle = (os.cpu_count() or allowed) - busy_cpus()
    threads = max(1, min(allowed, idle))
    why = f"{allowed} CPU(s) allowed to this process"
    if threads < allowed:
        why += f", {allowed - threads} kept busy by other work"
    return ThreadChoice(threads, why)


def apply_threads(requested: int = 0) -> ThreadChoice:
    """Choose (see `choose_threads`) and set torch's intra-op thread count; return the choice."""
    import torch

    choice = choose_threads(requested)
    torch.set_num_threads(choice.threads)
    return choice


def machine_description() -> str:
    """The CPU model and the CPUs this process may use, for the figures a run reports."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo", encoding="utf-8"):
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {allowed_cpus()} of {os.cpu_count()} CPU(s) allowed"
