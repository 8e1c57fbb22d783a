"""How much a longer history is worth in a world, measured without LiGR: a counting reader.

LiGR's AUC stopped growing past 64 events (claim 3). That can be the world (nothing older is
informative) or the model (it does not use it). The reader separates the two: for each candidate it
counts, over the member's last ``n`` feed events, the events and their clicks / contributions / long
dwells in total, for the candidate's actor and for its topic (plus the days since that actor's and
topic's newest event), and gradient-boosted trees fit those counts plus post type and age bucket on
the training split. No embeddings are learned, so the reader needs little data; if its eval AUC still
grows from n = 64 to 256, the older events carry signal a ranker could have used.

    python -m workloads.eval.history_reader --set examples_dir=/path/to/examples --set 'lengths=[16,64,256]'
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from sklearn.ensemble import HistGradientBoostingClassifier

from workloads.data.schema import CONTRIBUTION_MASK, TASKS, Action
from workloads.eval.evaluate import read_examples, write_json_atomic
from workloads.eval.metrics import auc
from workloads.models.batch import task_labels
from workloads.stage import run_stage

US_PER_DAY = 86_400e6
NONE_YET = 999.0  # "days since the newest such event" when there is none in the window
OUTCOMES = (1 << Action.CLICK, CONTRIBUTION_MASK, 1 << Action.LONG_DWELL)  # what each count counts


class HistoryReaderConfig(BaseModel):
    """`python -m workloads.eval.history_reader`: reader AUC per history length on prepared examples."""

    model_config = ConfigDict(extra="forbid")

    examples_dir: Path = Field(description="examples (train/, eval/) built with max_history >= the lengths")
    lengths: list[PositiveInt] = Field([16, 64, 256], min_length=1, description="history lengths (events)")
    max_train_sessions: PositiveInt | None = Field(None, description="subsample training sessions")
    seed: int = 0
    output: Path | None = Field(None, description="JSON with one row per length (default: print only)")


def _padded(column: pa.ChunkedArray, width: int, keep_last: bool, fill: int = -1) -> np.ndarray:
    """A list column as a (rows, width) matrix: the last ``width`` entries right-aligned (history, newest
    last) or the first ``width`` left-aligned (candidates in slot order)."""
    rows = column.to_pylist()
    out = np.full((len(rows), width), fill, dtype=np.int64)
    for i, values in enumerate(rows):
        if keep_last:
            values = values[-width:]
            out[i, width - len(values) :] = values
        else:
            values = values[:width]
            out[i, : len(values)] = values
    return out


class Sessions:
    """One split's sessions as padded matrices: history (newest event last) and candidates."""

    def __init__(self, table: pa.Table, max_history: int) -> None:
        self.actor = _padded(table.column("hist_actor_id"), max_history, keep_last=True)
        self.topic = _padded(table.column("hist_topic"), max_history, keep_last=True)
        self.actions = _padded(table.column("hist_actions"), max_history, keep_last=True, fill=0)
        start = np.asarray(table.column("session_start").to_numpy(), dtype=np.int64)
        stamps = _padded(table.column("hist_timestamp"), max_history, keep_last=True, fill=0)
        self.days_ago = (start[:, None] - stamps) / US_PER_DAY
        width = max(1, max((len(v) for v in table.column("cand_actor_id").to_pylist()), default=1))
        self.cand = {
            name: _padded(table.column(f"cand_{name}"), width, keep_last=False)
            for name in ("actor_id", "topic", "post_type", "age_bucket", "actions")
        }


def history_counts(sessions: Sessions, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(candidates, 16) features from each member's last ``n`` events, and (candidates, T) labels."""
    actor, topic, actions = sessions.actor[:, -n:], sessions.topic[:, -n:], sessions.actions[:, -n:]
    days_ago = sessions.days_ago[:, -n:]
    valid = actor >= 0
    width = sessions.cand["actor_id"].shape[1]

    def per_candidate(member_level: np.ndarray) -> np.ndarray:  # (S,) -> (S, C)
        return np.repeat(member_level[:, None], width, axis=1)

    columns = [per_candidate((((actions & o) != 0) & valid).sum(1)) for o in OUTCOMES]
    columns.append(per_candidate(valid.sum(1)))
    for history_key, candidate_key in ((actor, sessions.cand["actor_id"]), (topic, sessions.cand["topic"])):
        same = (history_key[:, None, :] == candidate_key[:, :, None]) & valid[:, None, :]  # (S, C, n)
        columns.append(same.sum(2))
        columns += [(same & ((actions[:, None, :] & o) != 0)).sum(2) for o in OUTCOMES]
        newest = np.where(same, days_ago[:, None, :], np.inf).min(2)
        columns.append(np.where(np.isfinite(newest), newest, NONE_YET))
    columns += [sessions.cand["post_type"], sessions.cand["age_bucket"]]
    shown = (sessions.cand["actor_id"] >= 0).reshape(-1)
    features = np.stack(columns, axis=-1).reshape(-1, len(columns)).astype(np.float32)[shown]
    labels = task_labels(sessions.cand["actions"].reshape(-1)[shown])
    return features, labels


def read_at(train: Sessions, evaluation: Sessions, n: int, seed: int = 0) -> dict[str, Any]:
    """Fit one reader per task on the training split's counts; AUC on the eval split."""
    x_train, y_train = history_counts(train, n)
    x_eval, y_eval = history_counts(evaluation, n)
    row: dict[str, Any] = {"history": n}
    for t, task in enumerate(TASKS):
        if y_train[:, t].min() == y_train[:, t].max():  # one class: nothing to fit, AUC undefined
            row[f"{task}_auc"] = math.nan
            continue
        reader = HistGradientBoostingClassifier(max_iter=200, early_stopping=True, random_state=seed)
        reader.fit(x_train, y_train[:, t])
        row[f"{task}_auc"] = auc(y_eval[:, t], reader.predict_proba(x_eval)[:, 1])
    row["train_candidates"], row["eval_candidates"] = len(y_train), len(y_eval)
    return row


def run(cfg: HistoryReaderConfig) -> list[dict[str, Any]]:
    longest = max(cfg.lengths)
    train_table = read_examples(cfg.examples_dir, "train", ["feed"])
    if cfg.max_train_sessions is not None and train_table.num_rows > cfg.max_train_sessions:
        rng = np.random.default_rng(cfg.seed)
        keep = rng.choice(train_table.num_rows, cfg.max_train_sessions, replace=False)
        train_table = train_table.take(np.sort(keep))
    train = Sessions(train_table, longest)
    evaluation = Sessions(read_examples(cfg.examples_dir, "eval", ["feed"]), longest)
    rows = []
    for n in sorted(cfg.lengths):
        began = time.perf_counter()
        row = read_at(train, evaluation, n, cfg.seed)
        rows.append({**row, "seconds": round(time.perf_counter() - began, 1)})
        print(json.dumps(rows[-1]), flush=True)
    if cfg.output is not None:
        write_json_atomic(cfg.output, rows)
    return rows


if __name__ == "__main__":
    run_stage(HistoryReaderConfig, run, sys.argv[1:])
