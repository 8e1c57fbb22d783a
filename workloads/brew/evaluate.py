"""`python -m workloads.brew.evaluate`: what the 360Brew paper claims, measured on our world.

On the evaluation period (right after training, the same boundaries as preprocessing):

- AUC per task (T1: the trained tasks), beside a popularity baseline scored on the same examples;
- AUC by history-length slice (the paper's cold-start figure 6: the margin over a baseline should be
  largest for members with few interactions);
- AUC against ``max_context_tokens`` (figure 4: more history in the prompt, better ranking);
- zero-shot AUC on the T2 tasks (templates with ``trained: false``) against popularity (figure 5).

AUC does not depend on the class balance, so rare positives (applies are ~2% of job impressions)
may be over-sampled with ``eval_positive_fraction`` to get a stable estimate from a few hundred
prompts. Writes ``metrics.json``, ``scores.parquet`` (every example's scores, so other models can be
compared on the same pairs: `workloads.brew.compare`) and plots into ``out_dir``, atomically.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, Field

from workloads.brew.artifact import BrewArtifact, load_artifact
from workloads.brew.data import (
    BrewExample,
    EntityText,
    Periods,
    TimeSplit,
    World,
    author_in_prompt_scores,
    follow_examples,
    history_events,
    impression_examples,
    load_world,
    popularity_scores,
    resolve_periods,
)
from workloads.brew.model import load_tokenizer
from workloads.brew.prompts import Templates, Verbalizer
from workloads.brew.score import ScorerConfig, make_scorer
from workloads.data.atomic import MANIFEST, atomic_dir
from workloads.data.schema import data_root
from workloads.eval.metrics import (
    HISTORY_SLICES,
    auc,
    auc_within_groups,
    history_slice,
    paired_auc_difference,
)
from workloads.stage import run_stage

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after use("Agg"): no display here

MIN_PLOTTED_SLICE = 20  # examples a history slice needs to appear in gap_by_history.png


class BrewEvalConfig(BaseModel):
    """`python -m workloads.brew.evaluate`: AUC per task, by history slice, vs context, zero-shot T2."""

    model_config = ConfigDict(extra="forbid")

    artifact_dir: Path = Field(default_factory=lambda: data_root() / "brew" / "artifact")
    world_dir: Path = Field(default_factory=lambda: data_root() / "world")
    out_dir: Path = Field(
        default_factory=lambda: data_root() / "brew" / "eval", description="replaced atomically"
    )
    split: TimeSplit = TimeSplit()
    tasks: list[str] | None = Field(
        None, description="default: the artifact's T1 tasks plus every T2 template"
    )
    examples_per_task: int = Field(400, ge=2)
    eval_positive_fraction: float | None = Field(0.25, gt=0, lt=1, description="None: natural label rate")
    context_sweep: list[int] = Field(
        [256, 512, 1024], description="max_context_tokens values to score at (each must hold every prompt)"
    )
    sweep_examples_per_task: int = Field(200, ge=2, description="examples per task in the context sweep")
    scorer: ScorerConfig = ScorerConfig()
    interval_resamples: int = Field(
        1000, ge=0, description="member resamples for the 95% intervals of 360Brew vs popularity (0: none)"
    )
    seed: int = 1


def _eval_tasks(cfg: BrewEvalConfig, artifact: BrewArtifact, templates: Templates) -> list[str]:
    if cfg.tasks is not None:
        for task in cfg.tasks:
            templates.task(task)  # unknown names fail here, with the known ones listed
        return cfg.tasks
    return artifact.tasks + [name for name, t in templates.tasks.items() if not t.trained]


def _examples(
    world: World,
    templates: Templates,
    task: str,
    periods: Periods,
    n: int,
    seed: int,
    positives: float | None,
) -> list[BrewExample]:
    if templates.task(task).label_action is None:  # T2: labelled from follows as of the period's start
        return follow_examples(world, templates, task, periods.eval_start, periods.eval_end, n, seed)
    return impression_examples(
        world, templates, task, periods.eval_start, periods.eval_end, n, seed, positives
    )


def _prompts(
    verbalizer: Verbalizer, text: EntityText, templates: Templates, examples: list[BrewExample]
) -> tuple[list[list[int]], np.ndarray]:
    """Each example's prompt (token ids), and how many interactions it kept after truncation."""
    prompts, used = [], []
    for ex in examples:
        task = templates.task(ex.task)
        p = verbalizer.verbalize(
            ex.task,
            text.member(ex.member_id),
            history_events(text, ex),
            [text.question(task, ex.question_id)],
        )
        prompts.append(p.token_ids[0])
        used.append(p.history_used)
    return prompts, np.array(used)


def _slices(labels: np.ndarray, brew: np.ndarray, pop: np.ndarray, lengths: np.ndarray) -> dict[str, Any]:
    names = np.array([history_slice(int(n)) for n in lengths])
    out = {}
    for name, _, _ in HISTORY_SLICES:
        rows = names == name
        if rows.sum() >= 2:
            out[name] = {
                "n": int(rows.sum()),
                "positives": int(labels[rows].sum()),
                "brew_auc": auc(labels[rows], brew[rows]),
                "popularity_auc": auc(labels[rows], pop[rows]),
            }
    return out


def _member_metrics(
    labels: np.ndarray, brew: np.ndarray, pop: np.ndarray, examples: list[BrewExample], resamples: int
) -> dict[str, Any]:
    """360Brew against popularity with members resampled (95% intervals), over all examples and within
    members: ``member_auc`` counts only (positive, negative) pairs of the same member, i.e. how well each
    member's candidates are ranked, which is what a recommender uses the scores for and what a shift of
    all of one member's scores (e.g. with how much history the prompt holds) leaves alone. The T2 follow
    examples come as one followed and one other actor per member, so there it is the share of members
    whose followed actor scores higher."""
    members = np.array([e.member_id for e in examples])
    out: dict[str, Any] = {
        "members_with_both_labels": int(pd.Series(labels).groupby(members).nunique().eq(2).sum()),
        "member_auc": {
            "brew": _finite(auc_within_groups(labels, brew, members)),
            "popularity": _finite(auc_within_groups(labels, pop, members)),
        },
    }
    if resamples:
        for key, within in (("vs_popularity", False), ("member_auc_vs_popularity", True)):
            diff = paired_auc_difference(labels, brew, pop, members, resamples, within_groups=within)
            out[key] = {k: _finite(v) for k, v in diff.items()}
    return out


def scores_frame(
    examples: list[BrewExample],
    brew: np.ndarray,
    popularity: np.ndarray,
    used: np.ndarray,
    author_in_prompt: np.ndarray,
) -> pd.DataFrame:
    """One row per example: the pair, its label and time, and each scorer's score (``scores.parquet``)."""
    return pd.DataFrame(
        {
            "task": [e.task for e in examples],
            "member_id": np.array([e.member_id for e in examples], dtype=np.int64),
            "question_id": np.array([e.question_id for e in examples], dtype=np.int64),  # item or actor id
            "at": np.array([e.at for e in examples], dtype=np.int64),  # us: session start (T2: period start)
            "label": np.array([e.label for e in examples], dtype=np.int64),
            "history_len": np.array([e.history_len for e in examples], dtype=np.int64),
            "history_in_prompt": used.astype(np.int64),
            "brew": brew.astype(np.float64),
            "popularity": popularity.astype(np.float64),
            "author_in_prompt": author_in_prompt.astype(np.float64),
        }
    )


def _finite(x: float) -> float | None:
    return None if math.isnan(x) else round(x, 4)


def _nan(x: float | None) -> float:
    return math.nan if x is None else x


def _plots(metrics: dict[str, Any], out: Path) -> None:
    if metrics["context_sweep"]:  # no sweep configured, no plot of it
        fig, ax = plt.subplots(figsize=(6, 4))
        for task, per in metrics["context_sweep"].items():
            budgets = sorted(int(b) for b in per)
            ax.plot(budgets, [per[str(b)]["auc"] for b in budgets], marker="o", label=task)
        ax.set(xscale="log", xlabel="max_context_tokens", ylabel="AUC", title="360Brew: AUC vs context")
        ax.set_xticks([int(b) for b in next(iter(metrics["context_sweep"].values()))])
        ax.get_xaxis().set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "auc_vs_context.png", dpi=110)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 4))
    order = [name for name, _, _ in HISTORY_SLICES]
    for task, per in metrics["tasks"].items():
        # a slice of a handful of examples has an AUC that is noise: left out of the plot, kept in metrics
        slices = [s for s in order if per["by_history"].get(s, {}).get("n", 0) >= MIN_PLOTTED_SLICE]
        gap = [
            _nan(per["by_history"][s]["brew_auc"]) - _nan(per["by_history"][s]["popularity_auc"])
            for s in slices
        ]
        ax.plot(slices, gap, marker="o", label=task)
    ax.axhline(0.0, color="grey", linewidth=0.8)
    ax.set(xlabel=f"interactions before the session (slices of at least {MIN_PLOTTED_SLICE} examples)",
           ylabel="AUC(360Brew) - AUC(popularity)",
           title="Gap over the popularity baseline by history length")  # fmt: skip
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "gap_by_history.png", dpi=110)
    plt.close(fig)


def evaluate(cfg: BrewEvalConfig) -> dict[str, Any]:
    artifact = load_artifact(cfg.artifact_dir)
    templates = artifact.templates()
    world = load_world(cfg.world_dir)
    periods = resolve_periods(cfg.world_dir, cfg.split)
    tokenizer = load_tokenizer(artifact.adapter_dir or artifact.model_dir)
    text = EntityText(world, templates)
    tasks = _eval_tasks(cfg, artifact, templates)
    # Every prompt is written before the first is scored: a budget too small for a task fails in
    # seconds, not after an hour of scoring.
    examples: dict[str, list[BrewExample]] = {}
    prompts: dict[str, tuple[list[list[int]], np.ndarray]] = {}
    sweep_prompts: dict[str, dict[int, tuple[list[list[int]], np.ndarray]]] = {}
    for k, task in enumerate(tasks):
        examples[task] = _examples(
            world, templates, task, periods, cfg.examples_per_task, cfg.seed + k, cfg.eval_positive_fraction
        )
        if not examples[task]:
            raise ValueError(f"no evaluation examples for task {task!r} in {periods.iso()}")
        verbalizer = Verbalizer(templates, tokenizer, artifact.max_context_tokens)
        prompts[task] = _prompts(verbalizer, text, templates, examples[task])
        if task in artifact.tasks and cfg.context_sweep:
            sub = examples[task][: cfg.sweep_examples_per_task]
            sweep_prompts[task] = {}
            for budget in sorted(cfg.context_sweep):
                try:
                    sweep_prompts[task][budget] = _prompts(
                        Verbalizer(templates, tokenizer, budget), text, templates, sub
                    )
                except ValueError as err:
                    raise ValueError(f"context_sweep: {err}; each budget must hold every prompt") from err

    scorer = make_scorer(artifact, cfg.scorer)
    try:
        per_task: dict[str, Any] = {}
        sweep: dict[str, Any] = {}
        frames: list[pd.DataFrame] = []  # scores.parquet
        for task in tasks:
            labels = np.array([e.label for e in examples[task]])
            brew, used = scorer.score(prompts[task][0]), prompts[task][1]
            pop = popularity_scores(world, templates, examples[task], periods.eval_start)
            lengths = np.array([e.history_len for e in examples[task]])
            in_prompt = author_in_prompt_scores(world, templates, examples[task], used)
            frames.append(scores_frame(examples[task], brew, pop, used, in_prompt))
            per_task[task] = {
                "zero_shot": task not in artifact.tasks,
                "label_action": templates.task(task).label_action,
                "n": len(examples[task]),
                "positives": int(labels.sum()),
                "brew_auc": _finite(auc(labels, brew)),
                "popularity_auc": _finite(auc(labels, pop)),
                "author_in_prompt_auc": _finite(auc(labels, in_prompt)),
                **_member_metrics(labels, brew, pop, examples[task], cfg.interval_resamples),
                "mean_history_in_prompt": float(used.mean()),
                "by_history": {
                    name: {k2: (_finite(v) if isinstance(v, float) else v) for k2, v in s.items()}
                    for name, s in _slices(labels, brew, pop, lengths).items()
                },
            }
            if task in sweep_prompts:
                sweep[task] = {}
                for budget, (budget_prompts, used_b) in sweep_prompts[task].items():
                    sub_labels = labels[: len(budget_prompts)]
                    scores = scorer.score(budget_prompts)
                    sweep[task][str(budget)] = {
                        "auc": _finite(auc(sub_labels, scores)),
                        "mean_history_in_prompt": float(used_b.mean()),
                    }
    finally:
        scorer.close()

    metrics = {
        "artifact": artifact.version,
        "max_context_tokens": artifact.max_context_tokens,
        "scorer": cfg.scorer.backend,
        "world_dir": str(Path(cfg.world_dir).resolve()),
        "eval_period": periods.iso(),
        "eval_positive_fraction": cfg.eval_positive_fraction,
        "tasks": per_task,
        "context_sweep": sweep,
    }
    with atomic_dir(cfg.out_dir) as tmp:
        (tmp / "metrics.json").write_text(json.dumps(metrics, indent=2))
        pd.concat(frames, ignore_index=True).to_parquet(tmp / "scores.parquet", index=False)
        _plots(metrics, tmp)
        (tmp / MANIFEST).write_text(json.dumps({"kind": "brew-eval", "artifact": artifact.version}))
    return {"out": str(cfg.out_dir), **{t: (m["brew_auc"], m["popularity_auc"]) for t, m in per_task.items()}}


def main(argv: list[str] | None = None) -> None:
    run_stage(BrewEvalConfig, evaluate, argv)


if __name__ == "__main__":
    main()
