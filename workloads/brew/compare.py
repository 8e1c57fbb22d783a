"""`python -m workloads.brew.compare`: 360Brew against the ranking models (LiGR, DCNv2) on the same pairs.

`workloads.brew.evaluate` samples a few hundred (member, item) impressions per task from the
evaluation period and writes their scores to ``scores.parquet``. Here each pair of a task with a
ranking head (``heads``: feed_like -> contribution, which is like | comment | share in the LiGR
paper) is looked up among the candidates of its session in the preprocessed examples (same member,
session start and item), every ranking artifact scores that whole session as it would when serving,
and the head's probability for the pair's candidate is its score. Every column's AUC is then taken
on the pairs all models scored. Pairs that cannot be found are counted by reason, never dropped
silently; a task without a head is reported n/a (job_apply: the ranking heads are click,
contribution and long dwell, and a job impression carries none of those actions).

Refused before anything is scored, with the offending field named: 360Brew evaluations of other
pairs, worlds or periods than the first; examples whose eval split is another period or world; an
artifact trained on another world or on sessions of the evaluation period.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, field_validator, model_validator

from workloads.data.atomic import MANIFEST, atomic_dir
from workloads.data.schema import TASKS, Action, data_root
from workloads.eval.evaluate import score_examples
from workloads.eval.metrics import auc, auc_standard_error
from workloads.stage import run_stage
from workloads.train.artifact import LoadedArtifact, load_artifact

PAIR = ["task", "member_id", "question_id", "at", "label"]
POPULARITY = "popularity"
NO_SESSION = "session not in the examples' eval split"
NO_ITEM = "item not among the session's candidates"
PAST_CAP = "candidate slot beyond the artifact's max_candidates"


class CompareConfig(BaseModel):
    """`python -m workloads.brew.compare`: AUC of 360Brew runs and ranking artifacts on the same pairs."""

    model_config = ConfigDict(extra="forbid")

    brew_evals: dict[str, Path] = Field(
        min_length=1, description="column name -> a `workloads.brew.evaluate` out_dir (all on the same pairs)"
    )
    ranking_artifacts: dict[str, Path] = Field(
        default_factory=dict, description="column name -> ranking artifact (LiGR, DCNv2, ...)"
    )
    ranking_examples: Path = Field(description="preprocessed examples whose eval split is the 360Brew period")
    heads: dict[str, str] = Field(
        default_factory=lambda: {"feed_like": "contribution", "feed_long_dwell": "long_dwell"},
        description="360Brew task -> the ranking head it is compared with; other tasks are n/a",
    )
    out_dir: Path = Field(
        default_factory=lambda: data_root() / "brew" / "compare", description="replaced atomically"
    )
    batch_size: PositiveInt = 256

    @field_validator("heads")
    @classmethod
    def _known_heads(cls, heads: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(heads.values()) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown ranking heads {unknown}; the ranking models predict {TASKS}")
        return heads

    @model_validator(mode="after")
    def _distinct_columns(self) -> CompareConfig:
        names = [*self.brew_evals, *self.ranking_artifacts, POPULARITY]
        if len(set(names)) < len(names):
            raise ValueError(f"brew_evals and ranking_artifacts: column names must be distinct, got {names}")
        return self


def _world(world_dir: Path, field: str) -> dict[str, Any]:
    """The world's ``world.json`` (config and counts): equal ones mean the same generated world."""
    path = Path(world_dir) / "world.json"
    if not path.is_file():
        raise FileNotFoundError(f"{field}: {path} not found, so its world cannot be checked")
    meta: dict[str, Any] = json.loads(path.read_text())
    return meta


def _time(iso: str) -> datetime:
    return datetime.fromisoformat(iso)


def load_brew_evals(evals: dict[str, Path]) -> tuple[pd.DataFrame, dict[str, Any]]:
    """The shared pairs with one score column per run (and popularity), and the first run's metrics."""
    pairs, first_name = pd.DataFrame(), ""
    first: dict[str, Any] = {}
    for name, folder in evals.items():
        field = f"brew_evals.{name}"
        scores_path = Path(folder) / "scores.parquet"
        if not scores_path.is_file():
            raise FileNotFoundError(f"{field}: {scores_path} not found (workloads.brew.evaluate writes it)")
        metrics = json.loads((Path(folder) / "metrics.json").read_text())
        scores = pd.read_parquet(scores_path)
        if not first:
            pairs, first, first_name = scores[[*PAIR, "history_len", POPULARITY]].copy(), metrics, name
        elif metrics["eval_period"] != first["eval_period"] or _world(metrics["world_dir"], field) != _world(
            first["world_dir"], f"brew_evals.{first_name}"
        ):
            raise ValueError(f"{field}: another world or evaluation period than brew_evals.{first_name}")
        elif not scores[PAIR].equals(pairs[PAIR]):
            raise ValueError(
                f"{field}: other (task, member, item, time, label) pairs than brew_evals.{first_name}; "
                "evaluate with the same tasks (in the same order), seed and examples_per_task"
            )
        pairs[name] = scores["brew"].to_numpy()
    return pairs, first


def check_examples(examples_dir: Path, brew: dict[str, Any]) -> None:
    """The examples' eval split must be the 360Brew evaluation period of the same world."""
    manifest = json.loads((Path(examples_dir) / MANIFEST).read_text())
    window, period = manifest["window"], brew["eval_period"]
    if (_time(window["train_end"]), _time(window["eval_end"])) != (
        _time(period["eval_start"]),
        _time(period["eval_end"]),
    ):
        raise ValueError(
            f"ranking_examples: the eval split covers {window['train_end']} to {window['eval_end']}, the "
            f"360Brew evaluation {period['eval_start']} to {period['eval_end']}"
        )
    if _world(manifest["config"]["world_dir"], "ranking_examples") != _world(brew["world_dir"], "brew_evals"):
        raise ValueError(
            f"ranking_examples: built from {manifest['config']['world_dir']}, another world than the "
            f"360Brew evaluation's {brew['world_dir']}"
        )


def check_artifact(name: str, artifact: LoadedArtifact, brew: dict[str, Any]) -> None:
    """An artifact must come from the same world and never have trained on the evaluation period."""
    field = f"ranking_artifacts.{name}"
    window, preprocess = artifact.data_window.get("window"), artifact.data_window.get("preprocess", {})
    if not window or "world_dir" not in preprocess:
        raise ValueError(f"{field}: {artifact.path} records no data window; what it trained on is unknown")
    if _time(window["train_end"]) > _time(brew["eval_period"]["eval_start"]):
        raise ValueError(
            f"{field}: trained on sessions up to {window['train_end']}, after the 360Brew evaluation "
            f"period starts ({brew['eval_period']['eval_start']})"
        )
    if _world(preprocess["world_dir"], field) != _world(brew["world_dir"], "brew_evals"):
        raise ValueError(
            f"{field}: trained on {preprocess['world_dir']}, another world than the 360Brew "
            f"evaluation's {brew['world_dir']}"
        )


def locate(
    pairs: pd.DataFrame, examples: pa.Table, label_actions: dict[str, str]
) -> tuple[np.ndarray, np.ndarray]:
    """(row, slot) of each pair's candidate in ``examples``: row -1 if its session is absent, slot -1 if
    its item is not a candidate. A found candidate whose action disagrees with the pair's label means
    the two were not built from the same impressions, which is an error."""
    members, starts = examples.column("member_id").to_pylist(), examples.column("session_start").to_pylist()
    sessions = {(m, s): r for r, (m, s) in enumerate(zip(members, starts, strict=True))}
    items, actions = examples.column("cand_item_id").to_pylist(), examples.column("cand_actions").to_pylist()
    rows, slots = np.full(len(pairs), -1), np.full(len(pairs), -1)
    for k, (task, member, item, at, label) in enumerate(pairs[PAIR].itertuples(index=False)):
        rows[k] = row = sessions.get((member, at), -1)
        if row < 0 or item not in items[row]:
            continue
        slots[k] = slot = items[row].index(item)
        if (actions[row][slot] >> Action[label_actions[task].upper()]) & 1 != label:
            raise ValueError(
                f"ranking_examples: member {member}'s item {item} at {at} has actions {actions[row][slot]}, "
                f"but the 360Brew pair's {task} label is {label}: not the same impressions"
            )
    return rows, slots


def head_scores(
    artifact: LoadedArtifact,
    examples: pa.Table,
    rows: np.ndarray,
    slots: np.ndarray,
    heads: list[str | None],
    world_dir: Path,
    batch_size: int,
) -> tuple[np.ndarray, list[str | None]]:
    """Each pair's probability from its head (NaN if not scored), and why a pair was not scored."""
    cap = int(artifact.feature_spec["max_candidates"])
    why: list[str | None] = [
        None if head is None  # the task is n/a, its pairs are not "unscored"
        else NO_SESSION if row < 0 else NO_ITEM if slot < 0 else PAST_CAP if slot >= cap else None
        for head, row, slot in zip(heads, rows, slots, strict=True)
    ]  # fmt: skip
    ok = np.array([h is not None and w is None for h, w in zip(heads, why, strict=True)], dtype=bool)
    out = np.full(len(rows), np.nan)
    if not ok.any():
        return out, why
    needed = np.unique(rows[ok])
    scored = score_examples(artifact, examples.take(needed), world_dir, batch_size)
    # score_examples flattens each session's first `cap` candidates, sessions in order.
    kept = np.minimum(pc.list_value_length(examples.column("cand_item_id")).to_numpy()[needed], cap)
    flat = np.r_[0, np.cumsum(kept)[:-1]][np.searchsorted(needed, rows[ok])] + slots[ok]
    columns = [TASKS.index(h) for h, keep in zip(heads, ok, strict=True) if keep and h is not None]
    out[ok] = scored.probs[flat, columns]
    return out, why


def _cell(labels: np.ndarray, scores: np.ndarray) -> dict[str, Any]:
    value, positives = auc(labels, scores), int(labels.sum())
    se = auc_standard_error(value, positives, len(labels) - positives)
    return {
        "auc": None if math.isnan(value) else round(value, 4),
        "se": None if math.isnan(se) else round(se, 4),
        "n": len(labels),
        "positives": positives,
    }


def _markdown(report: dict[str, Any], columns: list[str]) -> str:
    lines = [
        f"| task | head | pairs (positives) | compared | {' | '.join(columns)} |",
        "| --- " * (4 + len(columns)) + "|",
    ]
    for task, r in report["tasks"].items():
        cells = [
            "n/a" if r["models"][c] is None or r["models"][c]["auc"] is None
            else f"{r['models'][c]['auc']:.3f} ± {r['models'][c]['se']:.3f}"
            for c in columns
        ]  # fmt: skip
        counts = f"{r['pairs']} ({r['positives']}) | {r['compared']}"
        lines.append(f"| {task} | {r['head'] or 'n/a'} | {counts} | {' | '.join(cells)} |")
    notes = [
        f"- {task}, {name}: {n} pairs not scored ({reason})"
        for task, r in report["tasks"].items()
        for name, reasons in r["unscored"].items()
        for reason, n in reasons.items()
    ] + [f"- {task}: no ranking head in `heads`" for task, r in report["tasks"].items() if not r["head"]]
    return "\n".join([*lines, "", *notes]) + "\n"


def compare(cfg: CompareConfig) -> dict[str, Any]:
    """Check the inputs agree, score the pairs, write the table; returns each task's AUC per column."""
    pairs, brew = load_brew_evals(cfg.brew_evals)
    check_examples(cfg.ranking_examples, brew)
    artifacts = {name: load_artifact(path) for name, path in cfg.ranking_artifacts.items()}
    for name, artifact in artifacts.items():
        check_artifact(name, artifact, brew)

    heads = [cfg.heads.get(task) for task in pairs["task"]]
    located = pairs[[h is not None for h in heads]]
    examples = pq.read_table(
        Path(cfg.ranking_examples) / "eval", filters=pc.field("member_id").isin(located["member_id"].unique())
    )
    label_actions = {task: m["label_action"] for task, m in brew["tasks"].items()}
    for task in located["task"].unique():
        if label_actions[task] is None:
            raise ValueError(f"heads.{task}: not labelled by an impression, so no ranking candidate holds it")
    rows, slots = np.full(len(pairs), -1), np.full(len(pairs), -1)
    rows[located.index], slots[located.index] = locate(located, examples, label_actions)
    unscored: dict[str, list[str | None]] = {}
    for name, artifact in artifacts.items():
        pairs[name], unscored[name] = head_scores(
            artifact, examples, rows, slots, heads, Path(brew["world_dir"]), cfg.batch_size
        )

    columns = [*cfg.brew_evals, *artifacts, POPULARITY]
    report: dict[str, Any] = {"eval_period": brew["eval_period"], "world_dir": brew["world_dir"], "tasks": {}}
    for task, group in pairs.groupby("task", sort=False):
        head = cfg.heads.get(str(task))
        compared = group.dropna(subset=list(artifacts)) if head else group
        labels = compared["label"].to_numpy()
        report["tasks"][task] = {
            "head": head,
            "pairs": len(group),
            "positives": int(group["label"].sum()),
            "compared": len(compared),
            "models": {
                c: None if c in artifacts and head is None else _cell(labels, compared[c].to_numpy())
                for c in columns
            },
            "unscored": {
                name: dict(Counter(why[k] for k in group.index if why[k] is not None))
                for name, why in unscored.items()
            },
        }
    with atomic_dir(cfg.out_dir) as tmp:
        (tmp / "comparison.json").write_text(json.dumps(report, indent=2))
        (tmp / "comparison.md").write_text(_markdown(report, columns))
        pairs.to_parquet(tmp / "pairs.parquet", index=False)
        (tmp / MANIFEST).write_text(json.dumps({"kind": "brew-compare", "columns": columns}))
    return {
        "out": str(cfg.out_dir),
        **{t: {c: m and m["auc"] for c, m in r["models"].items()} for t, r in report["tasks"].items()},
    }


def main(argv: list[str] | None = None) -> None:
    run_stage(CompareConfig, compare, argv)


if __name__ == "__main__":
    main()
