"""The Trainer callbacks both training commands log with: train_log.jsonl, and one plain line per log."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from transformers import TrainerCallback


class JsonlLogCallback(TrainerCallback):
    """Appends every log dict (with its step) to train_log.jsonl."""

    def __init__(self, path: Path):
        self.path = path

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        row = {"step": state.global_step, **{k: v for k, v in logs.items() if isinstance(v, (int, float))}}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


class LogLineCallback(TrainerCallback):
    """One plain line per log for output that is not a terminal (a file, a pipe, CI), e.g.
    `step 10/300  loss 3.091  diffusion_loss 2.874  learning_rate 0.0015`: the Trainer's own printer writes bare
    dicts without the step."""

    def __init__(self, stream=None):
        self.stream = stream

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        parts = [f"step {state.global_step}/{state.max_steps}"]
        for key, value in logs.items():
            if key == "total_flos" or not isinstance(value, (int, float)):
                continue
            parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
        print("  ".join(parts), file=self.stream or sys.stderr, flush=True)
