"""Offline evaluation of published artifacts on the period right after training, with a promotion gate.

Ranking models: per-task AUC and normalized entropy over every candidate of every eval session,
overall and by the member's history length (slice "0" is member cold start). Next-item retrievers:
HR@K and NDCG@K of the leave-one-out test item, ranked against the whole catalog minus the items the
user already rated. With a baseline artifact, the gate compares one metric: it passes when the first
artifact's lift over the baseline is at least ``min_lift`` (relative or absolute; for NE, lower wins).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, model_validator

from workloads.data.schema import TASKS, data_root
from workloads.eval.metrics import (
    HISTORY_SLICES,
    auc,
    hit_rate_at_k,
    ndcg_at_k,
    normalized_entropy,
    paired_auc_difference,
    seen_items,
    target_ranks,
)
from workloads.models.batch import ItemContentTable, SemanticIdTable, collate, collate_sequences
from workloads.train.artifact import LoadedArtifact, load_artifact

RETRIEVAL_KS = (1, 5, 10, 20)
METRIC_PATTERN = r"^((click|contribution|long_dwell)_(auc|ne)|(hr|ndcg)@\d+)$"


class Gate(BaseModel):
    """Promote the first artifact only if it beats the baseline on ``metric`` by ``min_lift``."""

    model_config = ConfigDict(extra="forbid")

    metric: str = Field("long_dwell_auc", pattern=METRIC_PATTERN, description="e.g. long_dwell_auc, hr@10")
    min_lift: float = Field(0.0, description="required improvement; negative tolerates a small loss")
    lift: Literal["relative", "absolute"] = "relative"

    @property
    def lower_is_better(self) -> bool:
        return self.metric.endswith("_ne")


class EvalConfig(BaseModel):
    """`python -m workloads.eval`: score artifacts on held-out data, compare with a baseline, gate."""

    model_config = ConfigDict(extra="forbid")

    artifacts: list[Path] = Field(min_length=1, description="artifact folders; the first is the candidate")
    examples_dir: Path = Field(
        description="preprocessed examples (ranking) or a MovieLens folder (retrieval)"
    )
    baseline: Path | None = Field(None, description="artifact the gate compares the candidate with")
    gate: Gate | None = None
    world_dir: Path | None = Field(None, description="item content source; default: the artifact's own")
    split: Literal["eval", "train"] = Field("eval", description="ranking: which example split to score")
    batch_size: PositiveInt = 256
    interval_resamples: NonNegativeInt = Field(
        1000, description="session resamples for the paired intervals vs the baseline (0: none)"
    )
    output: Path = Field(default_factory=lambda: data_root() / "eval" / "metrics.json")

    @model_validator(mode="after")
    def _gate_needs_baseline(self) -> EvalConfig:
        if self.gate is not None and self.baseline is None:
            raise ValueError("gate: a gate compares against a baseline; set baseline")
        return self


# --- Scoring ----------------------------------------------------------------------------------------


@dataclass
class ScoredCandidates:
    """Every scored candidate of a split: probabilities, labels, and the member's history length."""

    probs: np.ndarray  # (N, T)
    labels: np.ndarray  # (N, T)
    history_len: np.ndarray  # (N,) events before the session (the full history, not the truncated one)
    rows: int  # sessions
    session: np.ndarray  # (N,) which session (row of the examples) each candidate belongs to
    setwise_logits: np.ndarray | None = None  # (N, T) the set-wise part of the logit, for models with one


def numpy_rows(table: pa.Table) -> dict[str, np.ndarray]:
    """The column layout Ray Data's ``iter_batches(batch_format="numpy")`` gives ``collate``."""
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def read_examples(examples_dir: Path, split: str, surfaces: list[str]) -> pa.Table:
    table = pq.read_table(examples_dir / split)
    return table.filter(pc.is_in(table.column("surface"), pa.array(surfaces)))


def item_content(artifact: LoadedArtifact, world_dir: Path | None) -> ItemContentTable:
    source = world_dir / "items.parquet" if world_dir else artifact.feature_spec.get("item_content_source")
    if not source:
        raise ValueError(f"{artifact.path}: feature_spec has no item_content_source; set world_dir")
    return ItemContentTable.from_parquet(source)


@torch.no_grad()
def score_examples(
    artifact: LoadedArtifact, examples: pa.Table, world_dir: Path | None = None, batch_size: int = 256
) -> ScoredCandidates:
    """Score every session of ``examples`` in one pass per batch (history encoded once per session)."""
    spec = artifact.feature_spec
    content = item_content(artifact, world_dir)
    sids = None
    if spec.get("semantic_ids_source"):
        codebook = artifact.config["model"]["sid_codebook_size"]
        sids = SemanticIdTable.from_parquet(spec["semantic_ids_source"], codebook)
    probs, labels, history, session, setwise = [], [], [], [], []
    for start in range(0, examples.num_rows, batch_size):
        rows = numpy_rows(examples.slice(start, batch_size))
        batch = collate(rows, content, spec["max_history"], spec["max_candidates"], sids)
        output = artifact.model(batch)
        mask = batch.cand_mask
        assert batch.labels is not None
        probs.append(torch.sigmoid(output.logits.float())[mask].numpy())
        labels.append(batch.labels[mask].numpy())
        per_candidate = np.broadcast_to(rows["history_len"][:, None], mask.shape)
        history.append(per_candidate[mask.numpy()])
        row_index = np.arange(start, start + len(rows["history_len"]))
        session.append(np.broadcast_to(row_index[:, None], mask.shape)[mask.numpy()])
        if output.setwise_logits is not None:
            setwise.append(output.setwise_logits.float()[mask].numpy())
    empty = np.zeros((0, len(TASKS)))
    return ScoredCandidates(
        probs=np.concatenate(probs or [empty]),
        labels=np.concatenate(labels or [empty]),
        history_len=np.concatenate(history or [np.zeros(0, dtype=np.int64)]),
        rows=examples.num_rows,
        session=np.concatenate(session or [np.zeros(0, dtype=np.int64)]),
        setwise_logits=np.concatenate(setwise) if setwise else None,
    )


def ranking_metrics(scored: ScoredCandidates) -> dict[str, Any]:
    """Per-task AUC / NE (and base rates) overall and per history-length slice."""

    def block(keep: np.ndarray) -> dict[str, Any]:
        out: dict[str, Any] = {"candidates": int(keep.sum())}
        for t, task in enumerate(TASKS):
            y, p = scored.labels[keep, t], scored.probs[keep, t]
            out[f"{task}_auc"] = auc(y, p)
            out[f"{task}_ne"] = normalized_entropy(y, p)
            out[f"{task}_positives"] = int(y.sum())
        return out

    everything = np.ones(len(scored.labels), dtype=bool)
    slices = {
        name: block((scored.history_len >= low) & (scored.history_len <= high))
        for name, low, high in HISTORY_SLICES
    }
    return {"overall": {**block(everything), "sessions": scored.rows}, "slices": slices}


# --- Next-item retrieval (MovieLens leave-one-out) ------------------------------------------------------


def read_catalog(movielens_dir: Path) -> np.ndarray:
    """Every item id of a MovieLens folder (``items.parquet``), sorted."""
    return np.sort(pq.read_table(movielens_dir / "items.parquet", columns=["item_id"]).column(0).to_numpy())


def _test_sequences(split: pa.Table) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """(history, its action bitmasks, target) per user: the training sequence plus the validation item,
    then the test item."""
    columns = ("train_item_ids", "train_actions", "valid_item_id", "valid_actions", "test_item_id")
    missing = [c for c in columns if c not in split.column_names]
    if missing:
        raise ValueError(f"split.parquet: missing columns {missing} (re-run workloads.data.movielens)")
    train, train_actions, valid, valid_actions, test = (split.column(c).to_pylist() for c in columns)
    for items, actions, v, v_actions, t in zip(train, train_actions, valid, valid_actions, test, strict=True):
        if v is not None and t is not None:
            yield (
                np.asarray([*items, v], dtype=np.int64),
                np.asarray([*actions, v_actions], dtype=np.int64),
                int(t),
            )


@torch.no_grad()
def retrieval_ranks(artifact: LoadedArtifact, movielens_dir: Path, batch_size: int = 256) -> np.ndarray:
    """0-based rank of every user's test item over the catalog minus the items they already rated."""
    catalog = read_catalog(movielens_dir)
    users = list(_test_sequences(pq.read_table(movielens_dir / "split.parquet")))
    max_len = artifact.config["model"]["max_len"]
    model = artifact.model
    item_vectors = model.item_embedding(torch.from_numpy(catalog))  # type: ignore[operator]
    ranks = []
    for start in range(0, len(users), batch_size):
        chunk = users[start : start + batch_size]
        sequences = collate_sequences(
            [history for history, _, _ in chunk], max_len, actions=[actions for _, actions, _ in chunk]
        )
        scores = (model.user_embedding(sequences) @ item_vectors.T).numpy()  # type: ignore[operator]
        targets = np.searchsorted(catalog, [target for _, _, target in chunk])
        seen = seen_items(catalog, sequences.item_id.numpy(), sequences.mask.numpy())
        ranks.append(target_ranks(scores, targets, exclude=seen))
    return np.concatenate(ranks) if ranks else np.zeros(0, dtype=np.int64)


def retrieval_metrics(ranks: np.ndarray) -> dict[str, Any]:
    metrics: dict[str, Any] = {"users": len(ranks)}
    for k in RETRIEVAL_KS:
        metrics[f"hr@{k}"] = hit_rate_at_k(ranks, k)
        metrics[f"ndcg@{k}"] = ndcg_at_k(ranks, k)
    return {"overall": metrics}


# --- The gate -----------------------------------------------------------------------------------------


def apply_gate(gate: Gate, candidate: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    """Compare one metric of two overall-metric dicts; says whether and why the candidate passes."""
    value, base = candidate.get(gate.metric), baseline.get(gate.metric)
    result: dict[str, Any] = {**gate.model_dump(), "value": value, "baseline_value": base}
    if value is None or base is None or math.isnan(value) or math.isnan(base):
        return {**result, "lift_value": None, "passed": False, "reason": f"{gate.metric} is undefined"}
    gain = base - value if gate.lower_is_better else value - base
    lift = gain / abs(base) if gate.lift == "relative" and base != 0 else gain
    passed = lift >= gate.min_lift
    unit = "%" if gate.lift == "relative" else ""
    scale = 100 if gate.lift == "relative" else 1
    reason = (
        f"{gate.metric} {value:.4f} vs baseline {base:.4f}: {gate.lift} lift {scale * lift:+.3f}{unit} "
        f"{'>=' if passed else '<'} required {scale * gate.min_lift:+.3f}{unit}"
    )
    return {**result, "lift_value": lift, "passed": passed, "reason": reason}


# --- The stage ----------------------------------------------------------------------------------------


def _label(artifact: LoadedArtifact) -> str:
    return f"{artifact.name}/v{artifact.version}"


def evaluate_artifact(
    artifact: LoadedArtifact, cfg: EvalConfig
) -> tuple[dict[str, Any], ScoredCandidates | None]:
    """The artifact's metrics, and (ranking models) its scored candidates for paired comparisons."""
    kind = artifact.config["model"]["kind"]
    info = {"path": str(artifact.path), "kind": kind, "n_features": artifact.feature_spec.get("n_features")}
    if kind in ("ligr_retrieval", "sasrec"):
        ranks = retrieval_ranks(artifact, cfg.examples_dir, cfg.batch_size)
        return {**info, **retrieval_metrics(ranks)}, None
    surfaces = artifact.feature_spec.get("surfaces", ["feed"])
    examples = read_examples(cfg.examples_dir, cfg.split, surfaces)
    scored = score_examples(artifact, examples, cfg.world_dir, cfg.batch_size)
    return {**info, **ranking_metrics(scored)}, scored


def paired_with(
    scored: ScoredCandidates, reference: ScoredCandidates, tasks: Sequence[str] = TASKS, resamples: int = 1000
) -> dict[str, Any] | None:
    """Per task, AUC difference to the reference on the same candidates with its 95% interval (sessions
    resampled); None when the two were not scored on the same candidates (other surfaces), or when no
    resamples are asked for (each costs two AUCs over every candidate)."""
    if resamples == 0:
        return None
    if scored.labels.shape != reference.labels.shape or not np.array_equal(scored.labels, reference.labels):
        return None
    return {
        task: paired_auc_difference(
            scored.labels[:, t], scored.probs[:, t], reference.probs[:, t], scored.session, resamples
        )
        for t, task in enumerate(TASKS)
        if task in tasks
    }


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_safe(v) for v in value]
    return value


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write to a temp file beside ``path`` and rename it over: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def run(cfg: EvalConfig) -> dict[str, Any]:
    """Evaluate every artifact (and the baseline), apply the gate, write ``output``; returns a summary."""
    artifacts = [load_artifact(path) for path in cfg.artifacts]
    baseline = load_artifact(cfg.baseline) if cfg.baseline else None
    evaluated = {
        _label(a): evaluate_artifact(a, cfg) for a in [*artifacts, *([baseline] if baseline else [])]
    }
    results = {label: metrics for label, (metrics, _) in evaluated.items()}
    if baseline is not None and (reference := evaluated[_label(baseline)][1]) is not None:
        for label, (metrics, scored) in evaluated.items():
            if scored is not None and label != _label(baseline):
                metrics["vs_baseline"] = paired_with(scored, reference, resamples=cfg.interval_resamples)
    report: dict[str, Any] = {
        "split": cfg.split,
        "examples_dir": str(cfg.examples_dir),
        "models": results,
        "baseline": _label(baseline) if baseline else None,
        "gate": None,
    }
    if baseline is not None and cfg.gate is not None:
        candidate = results[_label(artifacts[0])]["overall"]
        report["gate"] = {
            "candidate": _label(artifacts[0]),
            **apply_gate(cfg.gate, candidate, results[_label(baseline)]["overall"]),
        }
    report = json_safe(report)
    write_json_atomic(cfg.output, report)
    gate = report["gate"]
    return {
        "output": str(cfg.output),
        "gate_passed": gate["passed"] if gate else None,
        "reason": gate["reason"] if gate else "no gate configured",
        "models": {label: result["overall"] for label, result in report["models"].items()},
    }
