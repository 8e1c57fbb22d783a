"""`python -m workloads.eval.gate`: the operator's evaluate stage, a promotion verdict for one version.

The candidate is scored on the evaluation period together with a reference on the very same data: the
version serving now (``gate.reference_artifact_dir``) or, when nothing serves yet, the production-style
baseline. For LiGR that baseline is the classic ranker the paper replaces (section 3.1): a per-task
logistic regression over the hand-crafted counters, fit on the training split; for 360Brew it is the
popularity ranker `workloads.brew.evaluate` scores beside the LLM. The verdict is the relative lift of one
metric (AUC of a task, or the mean over tasks; for normalized entropy, lower wins) against
``gate.min_lift``. The last stdout line is the summary the operator reads (`operators.pipeline.
EvaluationSummary`); the full report is written atomically under ``out_dir``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from pydantic import BaseModel, ConfigDict, Field

from workloads.data.atomic import MANIFEST, atomic_dir
from workloads.data.schema import COUNTER_FEATURES, TASKS
from workloads.eval.evaluate import (
    ScoredCandidates,
    json_safe,
    paired_with,
    ranking_metrics,
    read_examples,
    score_examples,
)
from workloads.models.batch import task_labels
from workloads.stage import run_stage
from workloads.train.artifact import load_artifact

BASELINE_MAX_ROWS = 200_000  # candidates the counter baseline is fit on; 11 features need no more


class GateSpec(BaseModel):
    """What the manifest's `spec.evaluation` asks, with the reference resolved by the operator."""

    model_config = ConfigDict(extra="forbid")

    metric: Literal["auc", "normalized_entropy"] = "auc"
    task: str | None = Field(None, description="a task name; None: the mean over the model's tasks")
    min_lift: float = Field(0.0, description="required relative lift; negative tolerates a regression")
    reference_artifact_dir: Path | None = Field(None, description="the serving version; None: the baseline")
    reference_name: str = "baseline"


class GateStageConfig(BaseModel):
    """Exactly the keys `operators.pipeline.stage_config` emits for the evaluate stage."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["ligr", "brew"]
    artifact_dir: Path
    world_dir: Path
    out_dir: Path = Field(description="the report folder, replaced atomically")
    examples_dir: Path | None = Field(None, description="LiGR: the preprocessed examples of this version")
    surfaces: list[str] = ["feed"]
    train_start: str | float | None = None
    train_end: str | float | None = None
    eval_end: str | float | None = None
    gate: GateSpec = GateSpec()
    brew_examples_per_task: int = Field(400, ge=2, description="360Brew: examples scored per task")
    brew_scorer: Literal["vllm", "transformers"] = Field("vllm", description="360Brew: scoring backend")
    interval_resamples: int = Field(
        1000, ge=0, description="LiGR: session resamples for the lift's 95% interval (0: none)"
    )


# --- The counter baseline (LiGR section 3.1) -------------------------------------------------------------


def _counter_matrix(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    """Per candidate: log1p of every counter (N, F) and the task labels (N, T)."""
    columns = [
        np.concatenate(table.column(f"cand_{name}").to_numpy(zero_copy_only=False)).astype(np.float32)
        for name in COUNTER_FEATURES
    ]
    actions = np.concatenate(table.column("cand_actions").to_numpy(zero_copy_only=False))
    return np.log1p(np.maximum(np.stack(columns, axis=1), 0.0)), task_labels(actions)


def counter_baseline_scores(train: pa.Table, evaluation: pa.Table, seed: int = 0) -> ScoredCandidates:
    """Fit one logistic regression per task on the training counters; score the evaluation candidates."""
    x_train, y_train = _counter_matrix(train)
    if len(x_train) == 0:
        raise ValueError("the counter baseline needs training examples; the train split is empty")
    if len(x_train) > BASELINE_MAX_ROWS:
        keep = np.random.default_rng(seed).choice(len(x_train), BASELINE_MAX_ROWS, replace=False)
        x_train, y_train = x_train[keep], y_train[keep]
    mean, std = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    x = torch.from_numpy((x_train - mean) / std)
    y = torch.from_numpy(y_train.astype(np.float32))
    weights = torch.zeros(x.shape[1], y.shape[1], requires_grad=True)
    bias = torch.zeros(y.shape[1], requires_grad=True)
    optimizer = torch.optim.LBFGS([weights, bias], max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        optimizer.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ weights + bias, y)
        loss = loss + 1e-4 * weights.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    x_eval, y_eval = _counter_matrix(evaluation)
    with torch.no_grad():
        probs = torch.sigmoid(torch.from_numpy((x_eval - mean) / std) @ weights + bias).numpy()
    per_row = [len(ids) for ids in evaluation.column("cand_item_id").to_pylist()]
    history = np.repeat(evaluation.column("history_len").to_numpy(), per_row)
    session = np.repeat(np.arange(evaluation.num_rows), per_row)
    return ScoredCandidates(
        probs=probs, labels=y_eval, history_len=history, rows=evaluation.num_rows, session=session
    )


# --- The verdict ------------------------------------------------------------------------------------------


def _finite(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


def gate_value(per_task: dict[str, float | None], gate: GateSpec) -> float | None:
    """The compared number: one task's metric, or the mean over tasks when no task is named."""
    if gate.task is not None:
        if gate.task not in per_task:
            raise ValueError(
                f"gate.task {gate.task!r} is not a task of this model; expected one of {sorted(per_task)}"
            )
        return per_task[gate.task]
    values = [v for v in per_task.values() if v is not None]
    return float(np.mean(values)) if values else None


def verdict(value: float | None, reference: float | None, gate: GateSpec) -> dict[str, Any]:
    """Relative lift of the candidate over the reference (a reduction, for normalized entropy)."""
    name = gate.metric + (f"[{gate.task}]" if gate.task else "")
    base = {"value": value, "reference": reference, "reference_name": gate.reference_name}
    if value is None or reference is None or reference == 0:
        reason = f"{name} is undefined on the evaluation data (too few positives?)"
        return {**base, "passed": False, "lift": None, "reason": reason}
    gain = reference - value if gate.metric == "normalized_entropy" else value - reference
    lift = gain / abs(reference)
    passed = lift >= gate.min_lift
    reason = (
        f"{name} {value:.4f} vs {gate.reference_name} {reference:.4f}: lift {100 * lift:+.2f}% "
        f"{'>=' if passed else '<'} required {100 * gate.min_lift:+.2f}%"
    )
    return {**base, "passed": passed, "lift": lift, "reason": reason}


def with_interval(gate: dict[str, Any], paired: dict[str, float]) -> dict[str, Any]:
    """The verdict plus the 95% interval of its lift (sessions resampled, both models on each
    resample): a lift inside run-to-run noise reads as such. The decision stays on the lift itself."""
    reference = gate["reference"]
    low, high = paired["ci95_low"] / reference, paired["ci95_high"] / reference
    reason = f"{gate['reason']} (95% interval of the lift {100 * low:+.2f}% to {100 * high:+.2f}%)"
    return {**gate, "lift_ci95": [low, high], "reason": reason}


def _per_task(overall: dict[str, Any], metric: str) -> dict[str, float | None]:
    suffix = "auc" if metric == "auc" else "ne"
    return {task: _finite(overall.get(f"{task}_{suffix}")) for task in TASKS}


def evaluate_ligr(cfg: GateStageConfig) -> dict[str, Any]:
    """Candidate and reference on the same evaluation examples; returns the report."""
    if cfg.examples_dir is None:
        raise ValueError("examples_dir: a LiGR evaluation needs the preprocessed examples")
    evaluation = read_examples(cfg.examples_dir, "eval", cfg.surfaces)
    if evaluation.num_rows == 0:
        raise ValueError(f"examples_dir {cfg.examples_dir}: no eval sessions on surfaces {cfg.surfaces}")
    scored = score_examples(load_artifact(cfg.artifact_dir), evaluation, cfg.world_dir)
    if cfg.gate.reference_artifact_dir is not None:
        reference_artifact = load_artifact(cfg.gate.reference_artifact_dir)
        reference = score_examples(reference_artifact, evaluation, cfg.world_dir)
    else:
        train = read_examples(cfg.examples_dir, "train", cfg.surfaces)
        reference = counter_baseline_scores(train, evaluation)
    return {
        "candidate": ranking_metrics(scored),
        "reference": ranking_metrics(reference),
        # an AUC gate's difference with its 95% interval, for its task (or each task, for their mean)
        "paired": paired_with(
            scored,
            reference,
            [cfg.gate.task] if cfg.gate.task else TASKS,
            cfg.interval_resamples if cfg.gate.metric == "auc" else 0,
        ),
    }


def evaluate_brew(cfg: GateStageConfig) -> dict[str, Any]:
    """360Brew's own evaluation (AUC per task beside popularity), for the candidate and the reference."""
    from workloads.brew.data import TimeSplit
    from workloads.brew.evaluate import BrewEvalConfig, evaluate
    from workloads.brew.score import ScorerConfig

    if cfg.gate.metric != "auc":
        raise ValueError("gate.metric: 360Brew is evaluated by AUC only; expected 'auc'")
    split = TimeSplit.model_validate(
        {k: v for k, v in (("train_start", cfg.train_start), ("train_end", cfg.train_end),
                           ("eval_end", cfg.eval_end)) if v is not None}
    )  # fmt: skip

    def brew_auc(artifact_dir: Path, out_dir: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        evaluate(
            BrewEvalConfig(
                artifact_dir=artifact_dir,
                world_dir=cfg.world_dir,
                out_dir=out_dir,
                split=split,
                examples_per_task=cfg.brew_examples_per_task,
                context_sweep=[],  # the verdict needs AUC per task, not the context-length study
                scorer=ScorerConfig(backend=cfg.brew_scorer),
            )
        )
        tasks = json.loads((out_dir / "metrics.json").read_text())["tasks"]
        trained = {t: m for t, m in tasks.items() if not m["zero_shot"]}
        return (
            {f"{t}_auc": m["brew_auc"] for t, m in trained.items()},
            {f"{t}_auc": m["popularity_auc"] for t, m in trained.items()},
        )

    candidate, popularity = brew_auc(cfg.artifact_dir, cfg.out_dir.parent / f"{cfg.out_dir.name}-candidate")
    if cfg.gate.reference_artifact_dir is None:
        return {"candidate": candidate, "reference": popularity}
    served = cfg.out_dir.parent / f"{cfg.out_dir.name}-reference"
    return {"candidate": candidate, "reference": brew_auc(cfg.gate.reference_artifact_dir, served)[0]}


def run(cfg: GateStageConfig) -> dict[str, Any]:
    report = evaluate_ligr(cfg) if cfg.kind == "ligr" else evaluate_brew(cfg)
    candidate, reference = report["candidate"], report["reference"]
    if cfg.kind == "ligr":
        candidate, reference = candidate["overall"], reference["overall"]
    task_auc = {t.removesuffix("_auc"): _finite(v) for t, v in candidate.items() if t.endswith("_auc")}
    per_task = _per_task(candidate, cfg.gate.metric) if cfg.kind == "ligr" else task_auc
    reference_per_task = (
        _per_task(reference, cfg.gate.metric)
        if cfg.kind == "ligr"
        else {t.removesuffix("_auc"): _finite(v) for t, v in reference.items()}
    )
    gate = verdict(gate_value(per_task, cfg.gate), gate_value(reference_per_task, cfg.gate), cfg.gate)
    paired = (report.get("paired") or {}).get(cfg.gate.task or "")
    if cfg.gate.metric == "auc" and paired and gate["lift"] is not None:
        gate = with_interval(gate, paired)
    defined = [v for v in task_auc.values() if v is not None]
    ne = [v for v in _per_task(candidate, "normalized_entropy").values() if v is not None]
    summary = {
        "task_auc": {t: v for t, v in task_auc.items() if v is not None},
        "auc": float(np.mean(defined)) if defined else None,
        "normalized_entropy": float(np.mean(ne)) if ne and cfg.kind == "ligr" else None,
        "gate": gate,
    }
    with atomic_dir(cfg.out_dir) as tmp:
        (tmp / "report.json").write_text(json.dumps(json_safe({"summary": summary, **report}), indent=2))
        (tmp / MANIFEST).write_text(
            json.dumps({"kind": f"{cfg.kind}-evaluation", "artifact": str(cfg.artifact_dir)})
        )
    return summary


if __name__ == "__main__":
    run_stage(GateStageConfig, run)
