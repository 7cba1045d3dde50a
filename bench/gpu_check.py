"""The steps of `bash bench/gpu_check.sh` (the one device command), each a subprocess with its own time limit, its
full output kept in a log, and `gpu_report.md` rewritten after every step (a kill still leaves a report).

  1 env         bench/gpu_env.py check: ftkit's requirements and the bundle's pins against what is installed, then
                every runtime dependency through ftkit's own code (tokenizer, the four tasks, verifiers, NF4)
  2 pytest      `pytest -m gpu`: CUDA grouped vs loop numerics in bf16, determinism, the load-time peak
  3 cli         the user's path at real width: a 2-layer true-width random checkpoint (char tokenizer saved with it,
                config vocabulary 262144), `ftkit train` with the real Sudoku recipe (4-bit experts, LoRA attention +
                experts, lean loss, both stacks checkpointed) for 20 steps, `ftkit eval` on 16 puzzles, `ftkit generate`
  4 throughput  bench/train_throughput.py at L = 2 and 4: ftkit 4-bit vs transformers+PEFT 4-bit (same LoRA targets)
                vs Unsloth FastDiffusionModel, with the fit to 30 layers
  5 memory      bench/memory_budget.py: the measured peak beside the budget's prediction

`smoke` is the rehearsal: the same steps on the CPU at tiny widths (tests/test_gpu_check.py runs it), with only the
packages the device will have importable (the image's, bench/gpu_image_packages.txt, and the bundle's,
bench/gpu_bundle.txt; bench/rehearsal/sitecustomize.py hides every other installed one). pytest only collects the GPU
tests, the CLI trains without 4-bit (bitsandbytes' 4-bit load needs CUDA), the throughput runs `--tiny`, the budget
counts its parts at 2 layers without measuring activations.

Time limits (the device run must end within 7 minutes, bundle unpacking included, so that a second try fits in the
15 minutes of device time): each step's limit is its measured rehearsal time scaled by the work the GPU run adds,
see STEP_BUDGET below.

usage: python bench/gpu_check.py gpu|smoke --out DIR [--started EPOCH] [--budget-s S] [--steps 1,3]
       python bench/gpu_check.py build-checkpoint DIR --layers N [--tiny]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import gpu_env  # noqa: E402  (bench/ is not a package)

PY = sys.executable
REPORT = "gpu_report.md"
SMOKE_VOCAB = 1024  # larger than the char tokenizer, as the real 262144 is: the config's vocab is not the tokenizer's
TAIL_LINES = 80  # of a failed step's log, in the report (the log keeps everything)
LOG_LIMIT = 15 << 20  # the device returns files of at most 16 MiB: a longer log keeps its head and its tail


@dataclass
class Step:
    name: str
    title: str
    limit_s: int
    commands: list[list[str]]
    seconds: float = 0.0
    status: str = "not run"  # pass / fail / timeout / not run
    why: str = ""
    highlights: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return f"{self.name}.log"


# ---------------------------------------------------------------------------------------------------------------
# The steps and their time limits

# Seconds per step on the device. "rehearsal": measured by `bash bench/gpu_check.sh smoke` on the 2-core CPU machine
# (2026-12-07, docs/performance.md); "GPU adds": the work the device run does beyond the rehearsal, at H100-machine
# rates (16 cores; ~1 GB/s to disk, ~2 GB/s from page cache into torch, ~8 s per process for CUDA init + imports).
#   step        rehearsal  GPU adds                                                               limit
#   1-env          18      CUDA init, NF4 round trip on the GPU                            +10 ->    40
#   2-pytest       11      10 tests run (collecting alone: 11 s), CUDA init, bf16 layers   +40 ->    60
#   3-cli          39      2-layer true-width checkpoint: 4.7 GB written (~8 s), read by  +100 ->   150
#                          3 processes (~8 s each), experts quantized (~5 s each), 20
#                          steps + 16-puzzle eval + one generate at width 2816
#   4-throughput   13      2- and 4-layer checkpoints (12 GB written, ~15 s) loaded by 3   +85 ->   100
#                          methods, 1 + 3 steps each
#   5-memory       13      one 2-layer load and measured step                              +30 ->    45
# Sum 395 s, plus ~10 s unpacking the bundle and ~10 s for the environment probe: 415 s <= 7 minutes (the default
# --budget-s), so a failed first try leaves time for a second in the device's 15 minutes.
STEP_LIMITS = {"1-env": 40, "2-pytest-gpu": 60, "3-cli": 150, "4-throughput": 100, "5-memory": 45}


def plan(mode: str, work: Path) -> list[Step]:
    smoke = mode == "smoke"
    ckpt, run = work / "ckpt-cli", work / "run-cli"
    pytest = [PY, "-m", "pytest", "-m", "gpu", "-p", "no:cacheprovider", "-q", "-rs", "tests"]
    # The real Sudoku recipe, shortened: 20 steps, a checkpoint every 10, 16 test puzzles. The eval settings go into
    # the recipe, so `ftkit eval RUN` is the run's own evaluation and writes eval.json.
    overrides = {
        "model.base": ckpt,
        "train.output_dir": run,
        "train.max_steps": 20,
        "train.warmup_steps": 2,
        "train.logging_steps": 5,
        "train.save_steps": 10,
        "task.train_size": 200,
        "task.test_size": 16,
        "eval.num_examples": 16,
    }
    denoise_steps: list[str] = []
    throughput = [
        PY,
        "bench/train_throughput.py",
        "--methods",
        "ftkit-4bit,peft-4bit,unsloth-4bit",
        "--grad-ckpt",
        "--loss-chunk",
        "128",
        "--workdir",
        str(work / "throughput"),
    ]
    memory = [PY, "bench/memory_budget.py", "--loss-chunk", "128", "--workdir", str(work / "memory")]
    if smoke:
        pytest.append("--collect-only")
        # bitsandbytes' 4-bit load needs CUDA (ftkit refuses it on the CPU); everything else is the recipe's.
        overrides |= {
            "model.dtype": "float32",
            "quant.mode": "none",
            "train.max_steps": 2,
            "train.save_steps": 1,
            "train.batch_size": 2,
            "task.train_size": 8,
            "task.test_size": 2,
            "eval.num_examples": 2,
            "eval.steps": 2,
        }
        denoise_steps = ["--steps", "2"]
        throughput += ["--tiny", "--layers", "1,2", "--steps", "1", "--warmup", "0"]
        memory += ["--skip-activations", "--budget-layers", "2"]
    else:
        throughput += ["--layers", "2,4", "--steps", "3", "--warmup", "1"]
        memory += ["--layers", "2"]
    build = [PY, "bench/gpu_check.py", "build-checkpoint", str(ckpt), "--layers", "2", *(["--tiny"] if smoke else [])]
    train = [PY, "-m", "ftkit", "train", "recipes/sudoku.yaml", *(f"{k}={v}" for k, v in overrides.items())]
    evaluate = [PY, "-m", "ftkit", "eval", str(run)]
    generate = [PY, "-m", "ftkit", "generate", str(run), "-i", first_test_puzzle(), *denoise_steps]
    env_check = [PY, "bench/gpu_env.py", "check", *([] if smoke else ["--device"])]
    steps = [
        Step("1-env", "bundle and image: versions, every runtime dependency through ftkit's code", 0, [env_check]),
        Step("2-pytest-gpu", "pytest -m gpu" + (" (collect only: no GPU)" if smoke else ""), 0, [pytest]),
        Step(
            "3-cli",
            "ftkit train / eval / generate on a 2-layer " + ("tiny" if smoke else "true-width") + " checkpoint",
            0,
            [build, train, evaluate, generate],
        ),
        Step("4-throughput", "bench/train_throughput.py: ftkit 4-bit vs PEFT 4-bit vs Unsloth", 0, [throughput]),
        Step("5-memory", "bench/memory_budget.py: measured peak vs prediction", 0, [memory]),
    ]
    for step in steps:
        step.limit_s = STEP_LIMITS[step.name]
    return steps


def first_test_puzzle() -> str:
    with (ROOT / "ftkit" / "data" / "sudoku_test.csv").open(newline="") as f:
        return next(csv.DictReader(f))["quizzes"]


# ---------------------------------------------------------------------------------------------------------------
# Running


def run_step(step: Step, out: Path, deadline: float, env: dict) -> None:
    """Run the step's commands in order, all output into its log; stop at the first failure or at its limit."""
    start = time.monotonic()
    step_deadline = min(start + step.limit_s, deadline)
    with (out / step.log).open("w", encoding="utf-8") as log:
        for cmd in step.commands:
            left = step_deadline - time.monotonic()
            if left <= 1:
                step.status, step.why = "timeout", f"no time left for `{short(cmd)}`"
                break
            log.write(f"$ {' '.join(cmd)}\n")
            log.flush()
            began = time.monotonic()
            rc, timed_out = run_command(cmd, log, left, env)
            log.write(f"== exit {rc} after {time.monotonic() - began:.1f}s{' (time limit)' if timed_out else ''}\n\n")
            log.flush()
            if timed_out:
                step.status, step.why = "timeout", f"`{short(cmd)}` passed the step's limit"
                break
            if rc != 0:
                step.status, step.why = "fail", f"`{short(cmd)}` exited with {rc}"
                break
        else:
            step.status = "pass"
    step.seconds = time.monotonic() - start
    cap_log(out / step.log)


def cap_log(path: Path, limit: int = LOG_LIMIT) -> None:
    """Cut the middle out of a log longer than `limit` bytes (the head shows what ran, the tail how it ended)."""
    size = path.stat().st_size
    if size <= limit:
        return
    with path.open("rb") as f:
        head = f.read(limit // 8)
        f.seek(size - (limit - limit // 8 - 200))
        tail = f.read()
    note = f"\n[... {size - len(head) - len(tail):,} bytes cut: the device returns files of at most 16 MiB ...]\n"
    path.write_bytes(head + note.encode() + tail)


def run_command(cmd: list[str], log, limit: float, env: dict) -> tuple[int, bool]:
    """(exit code, timed out). The command runs in its own process group, so a time-out also ends what it started
    (torchrun workers, dataloader processes)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        return proc.wait(timeout=limit), False
    except subprocess.TimeoutExpired:
        for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(proc.pid, sig)
                return proc.wait(timeout=grace), True
            except subprocess.TimeoutExpired:
                continue
            except ProcessLookupError:
                break
        return proc.wait(), True


def short(cmd: list[str]) -> str:
    words = [Path(w).name if w == PY else w for w in cmd]
    text = " ".join(words[:6])
    return text + (" ..." if len(words) > 6 else "")


# ---------------------------------------------------------------------------------------------------------------
# Checks and highlights read from each step's output


def read_log(out: Path, step: Step) -> str:
    path = out / step.log
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""


def check_pytest(step: Step, text: str, smoke: bool) -> None:
    summary = [
        line for line in text.splitlines() if re.search(r"\b(passed|failed|skipped|error|collected|selected)\b", line)
    ]
    step.highlights = summary[-6:]
    if step.status != "pass":
        return
    if smoke:
        found = re.search(r"(\d+)(?:/\d+)? tests? (?:collected|selected)", text)
        if not found or int(found.group(1)) == 0:
            step.status, step.why = "fail", "no GPU tests collected"
    elif re.search(r"\d+ skipped", text) or not re.search(r"\d+ passed", text):
        step.status, step.why = "fail", "GPU tests were skipped (is CUDA visible to torch?)"


def check_cli(step: Step, work: Path) -> None:
    """The run's own numbers: summary.json (training) and eval.json (its primary mode's metrics, all puzzles)."""
    run = work / "run-cli"
    summary, evaluation = run / "summary.json", run / "eval.json"
    if summary.exists():
        data = json.loads(summary.read_text())
        keys = ("loss_start", "loss_end", "canvas_tokens_per_second", "train_seconds", "trainable_parameters", "device")
        step.highlights.append("summary.json: " + ", ".join(f"{k}={data.get(k)}" for k in keys))
    if evaluation.exists():
        data = json.loads(evaluation.read_text())
        metrics = {k: v.get("all") if isinstance(v, dict) else v for k, v in data.get("metrics", {}).items()}
        step.highlights.append(
            f"eval.json ({data.get('primary')}, {data.get('num_examples')} puzzles): "
            + ", ".join(f"{k}={v}" for k, v in metrics.items())
        )
    missing = [p.name for p in (summary, evaluation) if not p.exists()]
    if missing and step.status == "pass":
        step.status, step.why = "fail", f"the run wrote no {', '.join(missing)}"


def tables_after(text: str, marker: str) -> list[str]:
    """The markdown tables printed from the last `marker` line on, each with the line printed just before it."""
    at = text.rfind(marker)
    if at < 0:
        return []
    lines = text[at:].splitlines()
    keep: list[str] = []
    for i, line in enumerate(lines):
        if not line.startswith("|"):
            continue
        if i == 0 or not lines[i - 1].startswith("|"):  # a new table: a blank line, then its caption
            keep += ["", lines[i - 1].strip()] if i > 0 and lines[i - 1].strip() else [""]
        keep.append(line)
    return keep


def missing_packages(text: str, hidden: dict[str, str]) -> list[str]:
    """A line per package a step could not import (`No module named 'x'`) or whose metadata it could not find (as
    transformers' version checks ask), with what to add to the bundle."""
    lines = []
    hidden_dists = set(hidden.values())
    modules = [m.split(".")[0] for m in re.findall(r"No module named '([\w.]+)'", text)]
    dists = [gpu_env.canonical(d) for d in re.findall(r"No package metadata was found for ([\w.-]+)", text)]
    for kind, name in dict.fromkeys([("module", m) for m in modules] + [("dist", d) for d in dists]):
        dist = hidden.get(name) if kind == "module" else (name if name in hidden_dists else None)
        what = f"`{name}`" + (f" (distribution {dist})" if kind == "module" and dist else "")
        if dist:
            lines.append(
                f"MISSING on the device: {what}, installed here but neither on the GPU image nor in "
                f"bench/gpu_bundle.txt: add {dist}==VERSION to the bundle"
            )
        else:
            lines.append(
                f"MISSING: {what} could not be found (add its distribution to bench/gpu_bundle.txt if ftkit needs it)"
            )
    return lines


def highlights(steps: list[Step], out: Path, work: Path, smoke: bool, hidden: dict[str, str] | None = None) -> None:
    for step in steps:
        if step.status == "not run":
            continue
        text = read_log(out, step)
        if step.name.endswith("env"):
            step.highlights = [
                line
                for line in text.splitlines()
                if line.startswith(("FAIL", "warn", "note", "bundle:", "  task", "  verifiers", "  bits"))
            ]
        elif step.name.endswith("pytest-gpu"):
            check_pytest(step, text, smoke)
        elif step.name.endswith("cli"):
            check_cli(step, work)
        elif step.name.endswith("throughput"):
            step.highlights = tables_after(text, "Measured (canvas_tok_s")
        elif step.name.endswith("memory"):
            step.highlights = tables_after(text, "4. Budget at") or tables_after(text, "2. LoRA and optimizer")
        if step.status != "pass":
            step.highlights = missing_packages(text, hidden or {}) + step.highlights


# ---------------------------------------------------------------------------------------------------------------
# Report


def environment(mode: str, env: dict, hidden: dict[str, str]) -> list[str]:
    lines = [f"- date: {time.strftime('%Y-%m-%d %H:%M:%S %Z')}", f"- mode: {mode}", f"- host: {platform.node()}"]
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        lines.append(f"- nvidia-smi: {smi.stdout.strip() or smi.stderr.strip()}")
    except (OSError, subprocess.TimeoutExpired) as e:
        lines.append(f"- nvidia-smi: not available ({e.__class__.__name__})")
    probe = (
        "import torch, transformers, peft, bitsandbytes\n"
        "print('- python', __import__('sys').version.split()[0])\n"
        "for m in (torch, transformers, peft, bitsandbytes): print(f'- {m.__name__} {m.__version__} ({m.__file__})')\n"
        "print('- cuda', torch.cuda.is_available(), torch.version.cuda,"
        " torch.cuda.get_device_name() if torch.cuda.is_available() else '',"
        " torch.cuda.get_device_capability() if torch.cuda.is_available() else '')\n"
    )
    if hidden:
        lines.append(
            f"- rehearsal: {len(set(hidden.values()))} installed distributions hidden (neither on the GPU image "
            f"nor in the bundle): {', '.join(sorted(set(hidden.values())))}"
        )
    probe_run = subprocess.run([PY, "-c", probe], capture_output=True, text=True, cwd=ROOT, env=env, timeout=120)
    lines += probe_run.stdout.strip().splitlines()
    if probe_run.returncode != 0:
        lines.append("- import check FAILED:")
        lines += ["  " + line for line in missing_packages(probe_run.stderr, hidden)]
        lines += ["      " + line for line in probe_run.stderr.strip().splitlines()[-15:]]
    return lines


def write_report(out: Path, mode: str, env_lines: list[str], steps: list[Step], started: float) -> None:
    rows = ["| step | result | seconds | limit_s | log |", "|---|---|---|---|---|"]
    for s in steps:
        result = s.status + (f": {s.why}" if s.why else "")
        rows.append(f"| {s.name}: {s.title} | {result} | {s.seconds:.0f} | {s.limit_s} | {s.log} |")
    body = [
        f"# ftkit GPU check ({mode})",
        "",
        *env_lines,
        f"- wall time so far: {time.time() - started:.0f} s "
        "(from the start of bench/gpu_check.sh, bundle unpacking included)",
        "",
        *rows,
        "",
    ]
    for s in steps:
        if s.status == "not run":
            continue
        body += [f"## {s.name}: {s.title}", "", f"Commands (full output in `{s.log}`):", ""]
        body += [f"    {' '.join(c)}" for c in s.commands] + [""]
        if s.highlights:
            body += s.highlights + [""]
        tail = read_log(out, s).splitlines()[-TAIL_LINES:] if s.status != "pass" else []
        if tail:
            body += [f"Last {len(tail)} lines of `{s.log}`:", "", "```", *tail, "```", ""]
    tmp = out / f".{REPORT}.tmp"
    tmp.write_text("\n".join(body), encoding="utf-8")
    tmp.replace(out / REPORT)


# ---------------------------------------------------------------------------------------------------------------


def build_checkpoint(path: Path, layers: int, tiny: bool) -> None:
    """A random-init checkpoint with ftkit's character tokenizer saved beside it (the real tokenizer cannot be
    downloaded on the device). True width: the real widths with `layers` layers and the real vocabulary (262144;
    the tokenizer uses its first ~100 ids). Tiny: bench widths, Sudoku's canvas, a vocabulary of SMOKE_VOCAB."""
    sys.path.insert(0, str(ROOT / "bench"))
    import bench_common as bc

    from ftkit.model.char_tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    assert (tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id) == (bc.PAD, bc.EOS, bc.BOS)
    if tiny:
        from dataclasses import replace

        from transformers import DiffusionGemmaForBlockDiffusion

        from ftkit.model.load import tiny_config

        spec = replace(bc.tiny_spec(layers), canvas_length=96)
        shutil.rmtree(path, ignore_errors=True)
        DiffusionGemmaForBlockDiffusion(tiny_config(spec, SMOKE_VOCAB)).save_pretrained(path)
    else:
        bc.build_checkpoint(path, layers, tiny=False)
    tokenizer.save_pretrained(path)
    print(f"checkpoint with {layers} layers ({'tiny' if tiny else 'true width'}) and the char tokenizer in {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("mode", choices=["gpu", "smoke", "build-checkpoint"])
    parser.add_argument("path", nargs="?", help="build-checkpoint: where to write it")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--out", default=os.environ.get("OUT") or "/tmp/ftkit-gpu-check")
    parser.add_argument("--work", default="/tmp/ftkit-gpu-check-work", help="checkpoints and runs (deleted after)")
    parser.add_argument("--started", type=float, default=None, help="epoch seconds the device command started")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=420.0,
        help="wall-clock budget from --started: no step runs past it (7 minutes: a second try fits in the device's 15)",
    )
    parser.add_argument("--steps", default="", help="only these steps, by number (e.g. 1,3); default all")
    args = parser.parse_args(argv)
    if args.mode == "build-checkpoint":
        if not args.path:
            parser.error("build-checkpoint needs a path")
        build_checkpoint(Path(args.path), args.layers, args.tiny)
        return 0

    started = args.started or time.time()
    deadline = time.monotonic() + args.budget_s - (time.time() - started)
    out, work = Path(args.out), Path(args.work)
    out.mkdir(parents=True, exist_ok=True)
    smoke = args.mode == "smoke"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    hidden: dict[str, str] = {}
    if smoke:  # only what the device will have: the image's packages and the bundle's
        env, hidden = gpu_env.rehearsal_env(env)
    env_lines = environment(args.mode, env, hidden)
    steps = plan(args.mode, work)
    if args.steps:
        wanted = {int(n) for n in args.steps.split(",")}
        steps = [s for s in steps if int(s.name.split("-")[0]) in wanted]
    write_report(out, args.mode, env_lines, steps, started)
    if not smoke and not any(line.startswith("- cuda True") for line in env_lines):
        steps[0].status, steps[0].why = (
            "fail",
            "no CUDA GPU visible to torch (run `bash bench/gpu_check.sh smoke` on a CPU)",
        )
        write_report(out, args.mode, env_lines, steps, started)
        return 2
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        for step in steps:
            print(f"== {step.name} (limit {step.limit_s}s)", flush=True)
            run_step(step, out, deadline, env)
            highlights([step], out, work, smoke, hidden)
            print(f"== {step.name}: {step.status} {step.why} ({step.seconds:.0f}s)", flush=True)
            write_report(out, args.mode, env_lines, steps, started)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"report: {out / REPORT}")
    return 0 if all(s.status == "pass" for s in steps) else 1


if __name__ == "__main__":
    raise SystemExit(main())
