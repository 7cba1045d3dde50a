"""The intra-op thread count of train/eval: recipe key, then OMP_NUM_THREADS, then the idle allowed CPUs."""

from __future__ import annotations

import os

import pytest

from ftkit.run import threads


@pytest.fixture
def machine(monkeypatch):
    """A machine of `cpus` CPUs, `allowed` of them in this process's affinity mask, `load` busy."""

    def set_machine(cpus: int, allowed: int, load: float, load_average: float | None = None):
        """`load`: CPUs busy now (what /proc/stat shows over the sample); `load_average`: the 1-minute average
        (default: the same)."""
        monkeypatch.setattr(os, "cpu_count", lambda: cpus)
        monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(allowed)))
        avg = load if load_average is None else load_average
        monkeypatch.setattr(os, "getloadavg", lambda: (avg, avg, avg))
        snapshots = iter([(0, 0), (round((cpus - load) * 100), cpus * 100)] * 10)  # (idle, total) ticks
        monkeypatch.setattr(threads, "_cpu_times", lambda: next(snapshots))
        monkeypatch.setattr(threads, "SAMPLE_SECONDS", 0.0)

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return set_machine


def test_idle_machine_uses_the_allowed_cpus(machine):
    machine(cpus=64, allowed=8, load=0.1)
    assert threads.choose_threads() == threads.ThreadChoice(8, "8 CPU(s) allowed to this process")


def test_busy_cores_are_left_to_the_other_work(machine):
    """The issue's case: 2 cores, another process busy on one: 1 thread, not 2 (24-36x slower measured)."""
    machine(cpus=2, allowed=2, load=1.2)
    choice = threads.choose_threads()
    assert choice.threads == 1 and "1 kept busy" in choice.reason
    machine(cpus=2, allowed=2, load=5.0)
    assert threads.choose_threads().threads == 1  # never below one


def test_busy_is_measured_now_not_from_the_lagging_load_average(machine, monkeypatch):
    """Work that ended a minute ago still holds the 1-minute load average up: a quiet 2-core machine must get both
    cores (it got 1, and the quickstart trained at half speed, right after a pip install or a test run)."""
    machine(cpus=2, allowed=2, load=0.0, load_average=1.6)
    assert threads.choose_threads().threads == 2
    machine(cpus=2, allowed=2, load=1.0, load_average=0.0)
    assert threads.choose_threads().threads == 1

    def no_proc_stat():
        raise OSError("no /proc/stat")

    monkeypatch.setattr(threads, "_cpu_times", no_proc_stat)  # elsewhere: the load average
    assert threads.choose_threads().threads == 2
    monkeypatch.setattr(os, "getloadavg", lambda: (1.2, 1.2, 1.2))
    assert threads.choose_threads().threads == 1


def test_proc_stat_is_read_on_this_machine():
    idle, total = threads._cpu_times()
    assert 0 <= idle <= total and total > 0
    assert 0 <= threads.busy_cpus() <= (os.cpu_count() or 1)


def test_recipe_key_then_environment_win(machine, monkeypatch):
    machine(cpus=2, allowed=2, load=0.0)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads() == threads.ThreadChoice(3, "OMP_NUM_THREADS")
    assert threads.choose_threads(requested=5) == threads.ThreadChoice(5, "train.cpu_threads")
    monkeypatch.setenv("OMP_NUM_THREADS", "")  # set but empty: ignored
    assert threads.choose_threads().threads == 2


def test_apply_sets_torch_threads(machine):
    import torch

    before = torch.get_num_threads()
    try:
        machine(cpus=4, allowed=1, load=0.0)
        assert threads.apply_threads().threads == 1 and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_machine_description_names_the_cpus(machine):
    machine(cpus=4, allowed=2, load=0.0)
    assert threads.machine_description().endswith("2 of 4 CPU(s) allowed")
