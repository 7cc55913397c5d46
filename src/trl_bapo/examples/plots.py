"""PNG plots of a BAPO run: training reward, batch composition, accuracy bins and migration (paper figs. 7, 8, 15)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

COLOURS = {"x1": "#4C72B0", "x2": "#DD8452", "x3": "#55A868"}


def _save(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def plot_reward(
    curves: dict[str, Sequence[float]], path: Path, title: str = "Training reward", window: int = 10
) -> Path:
    """One line per run: mean reward of the fresh rollouts, as a `window`-step moving average (single steps of
    16 prompts are too noisy to compare by eye)."""
    figure, axis = plt.subplots(figsize=(6, 3.5))
    for label, values in curves.items():
        width = min(window, len(values))
        averaged = [sum(values[i : i + width]) / width for i in range(len(values) - width + 1)]
        axis.plot(range(width, len(values) + 1), averaged, label=label)
    axis.set(
        xlabel="optimizer step",
        ylabel=f"fresh-rollout reward ({window}-step average)" if window > 1 else "fresh-rollout reward",
        title=title,
    )
    axis.legend()
    axis.grid(alpha=0.3)
    return _save(figure, path)


def plot_curves(curves: dict[str, Sequence[Sequence[float]]], path: Path) -> Path:
    """Held-out accuracy against optimizer steps and against completions generated, one line per method; each
    point is `[step, completions, accuracy]`."""
    figure, (by_steps, by_completions) = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for label, points in curves.items():
        style = "-" if label in {"grpo", "dapo", "bapo"} else ":"
        by_steps.plot([p[0] for p in points], [p[2] for p in points], style, label=label)
        by_completions.plot([p[1] for p in points], [p[2] for p in points], style, label=label)
    by_steps.set(xlabel="optimizer step", ylabel="held-out mean@8 (median over seeds)", title="At equal steps")
    by_completions.set(xlabel="completions generated", title="At equal completions")
    for axis in (by_steps, by_completions):
        axis.grid(alpha=0.3)
    by_completions.legend(fontsize=8)
    return _save(figure, path)


def plot_composition(logs: Sequence[dict], batch_groups: int, path: Path) -> Path:
    """X1/X2/X3 groups per rollout step (one log entry each), stacked, against the configured batch (fig. 8)."""
    steps = range(1, len(logs) + 1)
    figure, axis = plt.subplots(figsize=(7, 3.5))
    bottom = [0.0] * len(logs)
    for part, label in (("x1", "X1 fresh, filtered"), ("x2", "X2 re-evaluated difficult"), ("x3", "X3 replayed")):
        values = [log[f"bapo/{part}"] for log in logs]
        axis.bar(steps, values, bottom=bottom, color=COLOURS[part], label=label, width=0.9)
        bottom = [b + v for b, v in zip(bottom, values)]
    axis.axhline(batch_groups, color="black", linestyle="--", linewidth=1, label=f"configured batch ({batch_groups})")
    axis.set(xlabel="rollout step", ylabel="groups in the training batch", title="Batch composition")
    axis.legend(loc="upper left", fontsize=8, ncols=2)
    return _save(figure, path)


def plot_accuracy_bins(before: Sequence[int], after: Sequence[int], path: Path) -> Path:
    """Prompts per accuracy bin before and after training (fig. 7)."""
    num_samples = len(before) - 1
    labels = [f"{i}/{num_samples}" for i in range(num_samples + 1)]
    positions = range(len(labels))
    figure, axis = plt.subplots(figsize=(7, 3.5))
    axis.bar([p - 0.2 for p in positions], before, width=0.4, label="before training", color="#8C8C8C")
    axis.bar([p + 0.2 for p in positions], after, width=0.4, label="after training", color="#4C72B0")
    axis.set_xticks(list(positions), labels)
    axis.set(xlabel="per-prompt accuracy bin", ylabel="prompts", title="Accuracy bins on training prompts")
    axis.legend()
    return _save(figure, path)


def plot_migration(matrix: Sequence[Sequence[int]], path: Path) -> Path:
    """Heat map of prompts moving between accuracy bins (fig. 15): rows before, columns after."""
    num_samples = len(matrix) - 1
    labels = [f"{i}/{num_samples}" for i in range(num_samples + 1)]
    figure, axis = plt.subplots(figsize=(5.5, 4.5))
    image = axis.imshow(matrix, cmap="Blues")
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            if count:
                axis.text(j, i, str(count), ha="center", va="center", fontsize=7)
    axis.set_xticks(range(len(labels)), labels, fontsize=7)
    axis.set_yticks(range(len(labels)), labels, fontsize=7)
    axis.set(xlabel="accuracy after training", ylabel="accuracy before training", title="Accuracy migration")
    figure.colorbar(image, ax=axis, shrink=0.8)
    return _save(figure, path)
