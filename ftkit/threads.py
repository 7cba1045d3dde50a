"""How many intra-op threads torch uses on the CPU, for `ftkit train` and `ftkit eval`.

torch's default is one thread per core of the machine, whatever the process may actually use. Two things make that
costly: a container or `taskset` that allows fewer CPUs (threads then share cores), and another busy process on
the same cores: OpenMP threads wait for each other at every op, so one descheduled thread stalls them all (measured
on this project's 2-core machine: tiny training 24-36x slower with 2 threads than with 1 while another process was
busy). So the count is, in order:

1. the recipe's `train.cpu_threads` when > 0;
2. `OMP_NUM_THREADS` when set (the user has decided);
3. the CPUs this process may run on (`os.sched_getaffinity`), less the ones other work keeps busy (the 1-minute
   load average over the machine's CPUs), at least 1.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


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


def busy_cpus() -> int:
    """CPUs of the machine kept busy by other work, from the 1-minute load average (0 where there is none). It
    includes this process once it has been running a while, which is why it is read before any work starts."""
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
        why += f", {allowed - threads} kept busy by other work (load average)"
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
