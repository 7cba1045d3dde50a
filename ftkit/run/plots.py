"""Plots as PNG (matplotlib, Agg backend: no display needed), written atomically: metric vs denoising steps,
the training loss curve, loss vs noise level, and the RL reward curve."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ftkit.run.rundir import atomic_write


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    plt = _pyplot()
    try:
        return atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight"))
    finally:
        plt.close(fig)


def plot_metrics_vs_steps(points: list[dict], path: Path, title: str = "", metrics: list[str] | None = None) -> Path:
    """One line per metric (overall values, no strata) against the number of denoising steps.

    `points`: [{"steps": int, "metrics": {name: value}}, ...]. `metrics` defaults to every stratum-free metric
    except counts.
    """
    plt = _pyplot()
    points = sorted(points, key=lambda p: p["steps"])
    if metrics is None:
        names = [k for k in points[0]["metrics"] if "/" not in k and not k.startswith("count")] if points else []
    else:
        names = metrics
    xs = [p["steps"] for p in points]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=100)
    for name in names:
        ax.plot(xs, [p["metrics"].get(name, float("nan")) for p in points], marker="o", label=name)
    ax.set_xlabel("denoising steps")
    ax.set_ylabel("metric")
    ax.set_ylim(-0.02, 1.02)
    ax.set_xticks(xs)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title)
    if names:
        ax.legend(fontsize="small", loc="best")
    fig.tight_layout()

    return _save(fig, path)


# Training plots (written by `ftkit train`)


def _finish(fig, ax, path: Path, xlabel: str, ylabel: str, title: str) -> None:
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_loss_curve(rows: list[dict[str, Any]], path: Path) -> bool:
    plt = _pyplot()
    rows = [r for r in rows if "loss" in r]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [r["step"] for r in rows]
    for key, label in (("loss", "total"), ("diffusion_loss", "canvas (diffusion)"), ("encoder_loss", "encoder AR")):
        if all(key in r for r in rows):
            ax.plot(steps, [r[key] for r in rows], label=label, marker="." if len(rows) < 40 else None)
    _finish(fig, ax, path, "optimizer step", "cross-entropy (nats)", "ftkit training loss")
    return True


def plot_noise_vs_loss(rows: list[dict[str, Any]], path: Path, bins: int = 10) -> bool:
    """Mean canvas loss per noise-level bin, early vs late in training: where the model learned."""
    plt = _pyplot()
    if len(rows) < 2 * bins:
        return False
    steps = sorted({r["step"] for r in rows})
    cut_lo, cut_hi = steps[len(steps) // 4], steps[(3 * len(steps)) // 4]
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for label, keep in (("first quarter of steps", lambda s: s <= cut_lo), ("last quarter", lambda s: s >= cut_hi)):
        sums, counts = [0.0] * bins, [0] * bins
        for r in rows:
            if keep(r["step"]):
                b = min(bins - 1, int(r["t"] * bins))
                sums[b] += r["loss"]
                counts[b] += 1
        xs = [(b + 0.5) / bins for b in range(bins) if counts[b]]
        ys = [sums[b] / counts[b] for b in range(bins) if counts[b]]
        ax.plot(xs, ys, marker="o", label=label)
    _finish(
        fig, ax, path, "noise level t (fraction of canvas corrupted)", "canvas cross-entropy", "loss vs noise level"
    )
    return True


def plot_reward_curve(rows: list[dict[str, Any]], path: Path) -> bool:
    """`ftkit rl`: the rounds' mean reward, constraint fraction and success rate per optimizer step; the KL to the
    reference on a second axis."""
    plt = _pyplot()
    rows = [r for r in rows if "reward" in r]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    steps = [r["step"] for r in rows]
    marker = "." if len(rows) < 40 else None
    for key, label in (("reward", "reward"), ("satisfied", "constraints satisfied"), ("success", "success rate")):
        ax.plot(steps, [r.get(key, float("nan")) for r in rows], label=label, marker=marker)
    if any("kl" in r for r in rows):
        kl_ax = ax.twinx()
        kl_ax.plot(
            steps, [r.get("kl", float("nan")) for r in rows], color="gray", linestyle="--", label="KL to reference"
        )
        kl_ax.set_ylabel("KL (k2, per token)")
        kl_ax.legend(loc="lower right", fontsize="small")
    _finish(fig, ax, path, "optimizer step", "mean over the round's samples", "ftkit rl: verifier reward")
    return True


def plot_learning_curve(
    points: list[dict[str, Any]], path: Path, metrics: list[str], chance: dict[str, float | None] | None = None
) -> Path:
    """Metrics against optimizer steps (left) and training seconds (right), a dashed line at each known chance
    level. `points`: [{"step", "seconds", "metrics": {name: value}}, ...] (bench/learning_curve.py)."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0), sharey=True)
    timed = [p for p in points if p.get("seconds") is not None]
    for ax, key, pts, xlabel in (
        (axes[0], "step", points, "optimizer step"),
        (axes[1], "seconds", timed, "training seconds"),
    ):
        for i, name in enumerate(metrics):
            color = f"C{i}"
            ax.plot(
                [p[key] for p in pts],
                [p["metrics"].get(name, float("nan")) for p in pts],
                marker="o",
                color=color,
                label=name,
            )
            level = (chance or {}).get(name)
            if level is not None:
                ax.axhline(level, color=color, linestyle="--", linewidth=0.8, alpha=0.7)
        ax.set_xlabel(xlabel)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("metric (dashed: chance)")
    axes[0].legend(fontsize="small", loc="upper left")
    fig.suptitle("learning curve (held-out examples)")
    fig.tight_layout()
    return _save(fig, path)
