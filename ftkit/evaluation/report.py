"""An evaluation's report: what one sampling mode measured (`EvalReport`) and how results print.

`render_table` draws `evaluate_run`'s result (or one `EvalReport.to_dict()`) as a rich Table, `render_sweep` a
--sweep-steps result, `describe_file` the files `evaluate_run` wrote. Reading a report dict accepts one written by
an older ftkit (without the compute fields).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftkit.evaluation.result_files import CANONICAL


@dataclass
class EvalReport:
    metrics: dict[str, float]
    outputs: list[str]
    records: list[dict[str, Any]]  # per example: id, output, violated constraints, steps used
    steps: int  # the step budget of one denoising pass
    verifier_renoise: bool
    mean_steps_used: float  # = decoder forwards per example (one decoder pass per step of that example)
    tokens_per_forward: float
    forward_passes: int  # batched decoder calls
    renoised_cells: int
    seconds: float
    examples_per_second: float
    num_examples: int = 0
    max_renoise_rounds: int = 0  # verifier rounds allowed after the first pass (0 for plain sampling)
    samples: int = 1  # independent samples per example (best-of-n)
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def max_forwards_per_example(self) -> int:
        """The most decoder forwards one example may spend in this mode."""
        return self.steps * self.samples * (1 + (self.max_renoise_rounds if self.verifier_renoise else 0))

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["decoder_forwards_per_example"] = self.mean_steps_used
        out["max_decoder_forwards_per_example"] = self.max_forwards_per_example
        return out

    def label(self) -> str:
        """What the row ran, with its compute: a verifier row is not "16 steps" when it may spend 48."""
        if self.samples > 1:
            return f"plain sampling, best of {self.samples} (up to {self.steps} steps each)"
        if self.verifier_renoise:
            return (
                f"verifier-guided sampling (up to {self.steps} steps, then up to {self.max_renoise_rounds} "
                f"re-noising rounds of up to {self.steps})"
            )
        return f"plain sampling (up to {self.steps} steps)"


# ----------------------------------------------------------------------------------------------------------------
# Display


def _split_metric(key: str) -> tuple[str, str]:
    name, _, stratum = key.partition("/")
    return name, stratum or "all"


def _fmt(name: str, value: float) -> str:
    if name.startswith("count"):
        return str(int(value))
    return f"{100 * value:.1f}%"


def _mode_label(mode: dict[str, Any]) -> str:
    """EvalReport.label for a report dict (also one written by an older ftkit, without the compute fields)."""
    fields = {f.name for f in dataclasses.fields(EvalReport)}
    try:
        return EvalReport(**{k: v for k, v in mode.items() if k in fields}).label()
    except TypeError:
        return f"{'verifier-guided' if mode.get('verifier_renoise') else 'plain'} sampling"


def describe_file(report: dict[str, Any]) -> str:
    """A line per file `evaluate_run` wrote: the canonical result or a file named by how it differs, then the
    sweep's own files (--sweep-steps)."""
    run_dir = Path(report["run_dir"])
    path = run_dir / report["file"]
    weights = report.get("weights") or {}
    measured = f" of {weights['checkpoint']}" if weights.get("source") == "checkpoint" else ""
    if report.get("canonical"):
        lines = [f"wrote {path}: the run's own evaluation (published by `ftkit push`)"]
    else:
        lines = [
            f"wrote {path}{measured} ({', '.join(report.get('differs_from_recipe') or [])}); the run's own "
            f"result {CANONICAL} is not touched"
        ]
    sweep = report.get("sweep_files") or []
    if sweep:
        steps = ", ".join(str(p["steps"]) for p in report.get("sweep") or [])
        what = {".json": f"the metrics at each step count ({steps})", ".png": "their plot against steps"}
        lines += [
            f"wrote {run_dir / name}: {what.get(Path(name).suffix, 'the sweep')}, with the settings of {report['file']}"
            for name in sweep
        ]
    return "\n".join(lines)


def render_sweep(report: dict[str, Any]):
    """A rich Table of a --sweep-steps report: one row per step count, its overall metrics and compute."""
    from rich.table import Table
    from rich.text import Text

    points = report.get("sweep") or []
    names = [k for k in (points[0]["metrics"] if points else {}) if "/" not in k and not k.startswith("count")]
    table = Table(title=Text(f"Steps sweep ({report.get('primary', 'plain')} sampling, same examples and seeds)"))
    for col in ("steps", *names, "decoder forwards / example", "seconds"):
        table.add_column(col, justify="right")
    for p in points:
        table.add_row(
            str(p["steps"]),
            *[_fmt(n, p["metrics"][n]) for n in names],
            f"{p['mean_steps_used']:.1f}",
            f"{p['seconds']:.1f}",
        )
    return table


def render_table(report: dict[str, Any]):
    """A rich Table: metric rows, one column per stratum, a section per sampling mode, then speed rows.
    Accepts `evaluate_run`'s dict or a single `EvalReport.to_dict()`."""
    from rich.table import Table
    from rich.text import Text  # plain Text cells: metric names are not rich markup

    modes = report.get("modes") or {("verifier" if report.get("verifier_renoise") else "plain"): report}
    strata = _strata(modes.values())
    notes = report.get("notes") or []
    table = Table(title=Text(_title(report)), caption=Text("; ".join(notes)) if notes else None)
    table.add_column("metric")
    for s in strata:
        table.add_column(s, justify="right")
    for mode in modes.values():
        _add_mode_rows(table, mode, strata)
        table.add_section()
    return table


def _strata(modes) -> list[str]:
    """The metrics' strata over all modes, in order of appearance, "all" first."""
    strata: list[str] = []
    for mode in modes:
        for key in mode["metrics"]:
            s = _split_metric(key)[1]
            if s not in strata:
                strata.append(s)
    strata.sort(key=lambda s: s != "all")
    return strata


def _title(report: dict[str, Any]) -> str:
    title = "Evaluation"
    if "task" in report:
        what = (
            "base model"
            if not report.get("adapter", True)
            else "trained full model"
            if report.get("full_model")
            else "adapter"
        )
        title += f": {report['task']} ({report.get('split')}, {what})"
    return title


def _add_mode_rows(table, mode: dict[str, Any], strata: list[str]) -> None:
    """One mode's section: its label, a row per metric (a cell per stratum), then its compute and speed."""
    from rich.text import Text

    table.add_row(Text(_mode_label(mode), style="bold"), *[""] * len(strata))
    names: list[str] = []
    for key in mode["metrics"]:
        n = _split_metric(key)[0]
        if n not in names:
            names.append(n)
    for n in names:
        cells = []
        for s in strata:
            key = n if s == "all" else f"{n}/{s}"
            cells.append(_fmt(n, mode["metrics"][key]) if key in mode["metrics"] else "")
        table.add_row(Text(n), *cells)
    blank = [""] * (len(strata) - 1)
    table.add_row(Text("decoder forwards / example"), f"{mode['mean_steps_used']:.1f}", *blank)
    table.add_row(Text("batched decoder calls"), str(mode["forward_passes"]), *blank)
    table.add_row(Text("tokens per forward"), f"{mode['tokens_per_forward']:.2f}", *blank)
    table.add_row(Text("examples/s"), f"{mode['examples_per_second']:.2f}", *blank)
    table.add_row(Text("seconds"), f"{mode['seconds']:.1f}", *blank)
    if mode.get("verifier_renoise"):
        table.add_row(Text("re-noised cells"), str(mode["renoised_cells"]), *blank)
