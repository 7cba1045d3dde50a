"""Runs `ftkit.sft.run.train` in a child process for the fault tests, slowed down where the parent wants to kill it.

usage: train_driver.py OUTPUT_DIR [--step-sleep S] [--slow-save-step N] [--gate FILE --gate-step K] [--soak]
                                  [--max-steps N] [--save-steps N] [--resume]

--slow-save-step N   every torch.save into the staging checkpoint of step N prints SAVING and sleeps 60 s, so the
                     parent can kill -9 the process in the middle of a checkpoint write
--gate FILE          after step K (--gate-step), wait until FILE exists: the run holds its lock until released
--slow-rank-save R   under torchrun, the process of rank R waits a second before writing its RNG state into a
                     checkpoint (the last part of a checkpoint to be written, and the one a rank writes itself)
--soak               markers on stdout for each phase the soak test kills in, each phase slowed a little:
                     "STEP n" when step n starts, "SAVING" inside every torch.save of a checkpoint (after writing,
                     before the rename), "LOGGING" halfway through writing a train_log.jsonl row
"""

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_train import tiny_recipe  # noqa: E402

from ftkit.run.log_callbacks import JsonlLogCallback  # noqa: E402
from ftkit.sft.run import train  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--step-sleep", type=float, default=0.0)
parser.add_argument("--slow-save-step", type=int)
parser.add_argument("--gate")
parser.add_argument("--gate-step", type=int, default=1)
parser.add_argument("--slow-rank-save", type=int)
parser.add_argument("--soak", action="store_true")
parser.add_argument("--max-steps", type=int, default=12)
parser.add_argument("--save-steps", type=int, default=3)
parser.add_argument("--resume", action="store_true")
opts = parser.parse_args()
torch.set_num_threads(1)  # the same float reductions in every process the soak test compares


class Pace(TrainerCallback):
    def on_step_begin(self, args, state, control, **kw):
        if opts.soak:
            print(f"STEP {state.global_step + 1}", flush=True)

    def on_step_end(self, args, state, control, **kw):
        time.sleep(opts.step_sleep)
        if opts.gate and state.global_step == opts.gate_step:
            print("GATED", flush=True)
            while not Path(opts.gate).exists():
                time.sleep(0.05)


real_save = torch.save


def slow_save(obj, f, *a, **kw):
    if opts.slow_rank_save is not None and os.environ.get("RANK") == str(opts.slow_rank_save) and "rng_state" in str(f):
        time.sleep(1.0)
    real_save(obj, f, *a, **kw)
    if ".staging" not in str(f):
        return
    if opts.slow_save_step is not None and f"checkpoint-{opts.slow_save_step}" in str(f):
        print("SAVING", flush=True)
        time.sleep(60)
    elif opts.soak:
        print("SAVING", flush=True)
        time.sleep(0.1)


torch.save = slow_save


class SlowPath:
    """Stands in for the log callback's path: the row is written in two halves with a pause between them."""

    def __init__(self, path: Path):
        self.path = path

    def open(self, *args, **kwargs):
        real = self.path.open(*args, **kwargs)

        class Writer:
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                real.close()

            def write(self, text):
                half = len(text) // 2
                real.write(text[:half])
                real.flush()
                print("LOGGING", flush=True)
                time.sleep(0.1)
                real.write(text[half:])

        return Writer()


if opts.soak:
    real_on_log = JsonlLogCallback.on_log

    def slow_on_log(self, *args, **kwargs):
        path, self.path = self.path, SlowPath(self.path)
        try:
            return real_on_log(self, *args, **kwargs)
        finally:
            self.path = path

    JsonlLogCallback.on_log = slow_on_log

recipe = tiny_recipe(opts.out, max_steps=opts.max_steps, save_steps=opts.save_steps)
train(recipe, resume=opts.resume, progress=False, extra_callbacks=[Pace()])
print("DONE", flush=True)
