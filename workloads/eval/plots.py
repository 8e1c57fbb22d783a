"""Figures for the experiment results (matplotlib, written as PNG for docs/img/)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a training node

import matplotlib.pyplot as plt
from matplotlib.figure import Figure

TASK_LABELS = {
    "long_dwell_auc": "long dwell AUC",
    "contribution_auc": "contribution AUC",
    "click_auc": "click AUC",
}


def scaling_plot(
    by_history: Sequence[dict[str, float]],
    by_size: Sequence[dict[str, float]],
    path: Path,
    metrics: Sequence[str] = ("long_dwell_auc", "contribution_auc"),
    title: str = "",
    reference: Mapping[str, float] | None = None,
    reference_label: str = "baseline",
    reader: Sequence[dict[str, float]] = (),
    plain: Sequence[dict[str, float]] = (),
) -> Path:
    """Two panels: AUC against history length, and AUC against dense parameters (log scale).

    Each point is a dict with ``history`` or ``dense_params`` and the metric values; ``reference``
    (a baseline's metrics) is drawn as a dashed line per metric in the same colour, ``reader`` (the
    counting reader's AUC per history length, ``workloads.eval.history_reader``) as a dotted one, and
    ``plain`` (the same LiGR without ``actor_match``, per history length) as a dash-dotted one.
    """
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for metric in metrics:
        label = TASK_LABELS.get(metric, metric)
        line = left.plot(
            [p["history"] for p in by_history], [p[metric] for p in by_history], "o-", label=label
        )
        right.plot([p["dense_params"] for p in by_size], [p[metric] for p in by_size], "o-", label=label)
        for curve, style, name in ((plain, "^-.", "without actor_match"), (reader, "s:", "counting reader")):
            if curve:
                left.plot(
                    [p["history"] for p in curve],
                    [p[metric] for p in curve],
                    style,
                    color=line[0].get_color(),
                    label=f"{label}, {name}",
                )
        if reference is not None:
            for axis in (left, right):
                axis.axhline(
                    reference[metric], ls="--", color=line[0].get_color(), label=f"{label}, {reference_label}"
                )
    left.set_xscale("log", base=2)
    left.set_xlabel("history length (events)")
    left.set_ylabel("eval AUC")
    right.set_xscale("log")
    right.set_xlabel("dense parameters")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8, loc="lower right")
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def comparison_plot(
    rows: Sequence[dict[str, float | str]], metrics: Sequence[str], path: Path, title: str
) -> Path:
    """Grouped bars: one group per metric, one bar per model (``rows`` carry ``model`` and the metrics)."""
    fig, axis = plt.subplots(figsize=(2 + 1.8 * len(metrics), 4 + 0.25 * len(rows)))
    width = 0.8 / max(len(rows), 1)
    for i, row in enumerate(rows):
        positions = [m + i * width for m in range(len(metrics))]
        axis.bar(positions, [float(row[m]) for m in metrics], width, label=str(row["model"]))
    axis.set_xticks([m + width * (len(rows) - 1) / 2 for m in range(len(metrics))])
    axis.set_xticklabels([TASK_LABELS.get(m, m) for m in metrics])
    values = [float(row[m]) for row in rows for m in metrics]
    axis.set_ylim(min(values) - 0.02, max(values) + 0.02)
    axis.set_title(title)
    axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=2)  # below the bars
    axis.grid(axis="y", alpha=0.3)
    return _save(fig, path)


def epoch_plot(
    curves: Mapping[str, Sequence[dict[str, float]]], metrics: Sequence[str], path: Path, title: str
) -> Path:
    """Training curves: one panel per metric, eval AUC after each epoch against the training seconds
    spent so far (markers labelled by epoch), one line per model; equal compute reads across."""
    fig, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3.8), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        for name, curve in curves.items():
            seconds = [p["train_seconds"] for p in curve]
            values = [p[metric] for p in curve]
            axis.plot(seconds, values, "o-", label=name)
            for point, x, y in zip(curve, seconds, values, strict=True):
                axis.annotate(f"{int(point['epoch'])}", (x, y), textcoords="offset points", xytext=(4, 4))
        axis.set_xlim(left=0)
        axis.set_xlabel("training seconds (labels: epoch)")
        axis.set_ylabel(f"eval {TASK_LABELS.get(metric, metric)}")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def _save(fig: Figure, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
