"""`ftkit eval`, `ftkit generate` / `solve`: denoise, check, score and report.

- `request`: what `ftkit eval RUN` asks for (`EvalRequest`), checked before anything loads.
- `evaluate`: `evaluate_run(request)`: a run directory evaluated and its result file written.
- `core`: examples in memory laid out, denoised in batches, decoded and scored (`evaluate_examples`, `best_of_n`).
- `verify`: the task's checker as the verifier of verifier-guided sampling (`flagged_tokens`, `rows_verifier`).
- `result_files`: which file a result goes into, which weights it measured, whether it is the run's own.
- `report`: `EvalReport` and how results print (`render_table`, `render_sweep`, `describe_file`).
- `generate`: one raw input denoised and shown (`ftkit generate` / `solve`); `trajectory`: its steps replayed
  live or written as a PNG contact sheet / GIF.
"""

from ftkit.evaluation.core import best_of_n, evaluate_examples, score_outputs
from ftkit.evaluation.evaluate import evaluate_run
from ftkit.evaluation.report import EvalReport, describe_file, render_sweep, render_table
from ftkit.evaluation.request import EvalRequest, check_answer_budget
from ftkit.evaluation.result_files import CANONICAL, canonical_problems, file_sha256, result_name
from ftkit.evaluation.verify import MAX_RENOISE_ROUNDS, flagged_tokens, make_verifier, rows_verifier

__all__ = [
    "CANONICAL",
    "MAX_RENOISE_ROUNDS",
    "EvalReport",
    "EvalRequest",
    "best_of_n",
    "canonical_problems",
    "check_answer_budget",
    "describe_file",
    "evaluate_examples",
    "evaluate_run",
    "file_sha256",
    "flagged_tokens",
    "make_verifier",
    "render_sweep",
    "render_table",
    "result_name",
    "rows_verifier",
    "score_outputs",
]
