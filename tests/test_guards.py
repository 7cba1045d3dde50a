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
import subprocess
import sys
from pathlib import Path

from ftkit import rundir
from ftkit.runlock import LOCK_FILE
from test_faults import default_sigint, wait_for

ROOT = Path(__file__).resolve().parents[1]
PUZZLE = "510060980978215436403070501000501000004027050135006092207003860340008270000750014"
# A small, fast run whose own evaluation is 2 puzzles at 2 steps (so `ftkit eval RUN` is the recipe's evaluation).
SMALL = ["model.tiny.hidden=48", "model.tiny.heads=2", "model.tiny.intermediate=64", "task.train_size=32",
         "task.test_size=2", "train.batch_size=4", "train.save_steps=2", "train.logging_steps=1", "eval.steps=2",
         "eval.num_examples=2", "eval.batch_size=2"]


def ftkit(*args, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "ftkit", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env=env, timeout=300)


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


def test_a_half_trained_run_is_never_published_as_final(tmp_path):
    run = tmp_path / "run"
    train = ["train", "recipes/tiny/sudoku.yaml", f"train.output_dir={run}", "train.max_steps=400", *SMALL]

    # Ctrl-C once the first checkpoint is saved.
    proc = subprocess.Popen([sys.executable, "-m", "ftkit", *train], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, preexec_fn=default_sigint,
                            env={**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"})
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
    assert report["weights"] == {"source": "checkpoint", "checkpoint": newest.name,
                                 "file": f"checkpoints/{newest.name}/adapter_model.safetensors",
                                 "sha256": sha256(newest / "adapter_model.safetensors")}
    assert f"no final adapter yet (training has not finished): this evaluated its newest checkpoint, " \
           f"{newest.name}" in flat(done.stderr)
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
    (proj / LOCK_FILE).write_text("")
    line = error_line(ftkit(*train))
    assert "proj: exists and is not an ftkit run directory (it holds README.md)" in line
    assert (proj / "README.md").read_text() == "precious\n"
    assert sorted(p.name for p in proj.iterdir()) == [LOCK_FILE, "README.md"]
