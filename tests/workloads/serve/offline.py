"""Offline reference scores: what the service must answer, computed without it.

Features come from the parquet tables the Feast repo was materialized from (not from the online
store), content from the world's items table, tensors from training's `collate`, and scores from the
model's public interface: `score_pointwise` with one candidate per row (the definition of pointwise)
and `score_setwise` on the pointwise top k. Nothing here imports workloads.serve except the ranking
arithmetic, which tests/workloads/serve/test_ranking.py checks on its own.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import torch

from workloads.data.counters import counters_at
from workloads.data.features import age_buckets
from workloads.data.schema import COUNTER_FEATURES
from workloads.models.batch import ItemContentTable, collate
from workloads.serve.ranking import pointwise_order, split_rerank, task_weight_vector
from workloads.train.artifact import load_artifact

HISTORY = [
    "hist_item_id",
    "hist_actor_id",
    "hist_post_type",
    "hist_age_bucket",
    "hist_session_id",
    "hist_actions",
]


@dataclass
class Expected:
    pointwise_logits: np.ndarray  # (S, T) in candidate order
    final_logits: np.ndarray  # (S, T) with the set-wise correction on the top k
    order: np.ndarray  # (S,) the ranking, best first
    setwise: np.ndarray  # (S,) bool
    history_len: int


def member_history(world: Path, member_id: int, max_history: int) -> dict[str, np.ndarray]:
    table = pq.read_table(world / "features" / "member_history.parquet").to_pandas()
    rows = table[table["member_id"] == member_id].sort_values("event_timestamp")
    if rows.empty:
        return {name: np.zeros(0, dtype=np.int64) for name in HISTORY}
    last = rows.iloc[-1]
    return {name: np.asarray(last[name], dtype=np.int64)[-max_history:] for name in HISTORY}


def expected_scores(
    artifact_dir: Path,
    world: Path,
    member_id: int,
    candidates: list[int],
    as_of: datetime,
    task_weights: dict[str, float],
    setwise_top_k: int,
    inline: dict[int, dict] | None = None,
) -> Expected:
    model = load_artifact(artifact_dir).model
    cfg = model.cfg
    items = pd.read_parquet(world / "items.parquet").set_index("item_id")
    content = ItemContentTable.from_parquet(world / "items.parquet")
    inline = inline or {}
    if inline:  # items the store has never seen: their content comes with the request
        embeddings = np.zeros((max(max(inline), len(content.embeddings) - 1) + 1, content.dim), np.float32)
        embeddings[: len(content.embeddings)] = content.embeddings
        for item_id, features in inline.items():
            embeddings[item_id] = features["content_emb"]
        content = ItemContentTable(embeddings)

    def item(item_id: int, field: str) -> int:
        if item_id in inline:
            value = inline[item_id][field]
            return int(pd.Timestamp(value).value // 1000) if field == "created_at" else int(value)
        value = items.loc[item_id, field]
        return int(pd.Timestamp(value).value // 1000) if field == "created_at" else int(value)

    history = member_history(world, member_id, cfg.max_history)
    as_of_us = int(pd.Timestamp(as_of).value // 1000)
    created = np.array([item(c, "created_at") for c in candidates], dtype=np.int64)
    cand = {
        "cand_item_id": np.asarray(candidates, dtype=np.int64),
        "cand_actor_id": np.array([item(c, "actor_id") for c in candidates], dtype=np.int64),
        "cand_post_type": np.array([item(c, "post_type") for c in candidates], dtype=np.int64),
        "cand_age_bucket": age_buckets(as_of_us - created).astype(np.int64),
        "cand_position": np.arange(len(candidates), dtype=np.int64),
        **{f"cand_{c}": np.zeros(len(candidates), dtype=np.float32) for c in COUNTER_FEATURES},
    }
    if cfg.candidate_counters:  # point-in-time counters from the log itself, not from the store
        impressions = pd.read_parquet(world / "impressions.parquet")
        queries = pd.DataFrame(
            {
                "member_id": member_id,
                "item_id": cand["cand_item_id"],
                "actor_id": cand["cand_actor_id"],
                "topic": [item(c, "topic") for c in candidates],
                "ts": as_of_us,
            }
        )
        for name, values in counters_at(impressions, queries).items():
            cand[f"cand_{name}"] = values.to_numpy(dtype=np.float32)

    def rows_for(indexes: list[list[int]]) -> dict[str, list[np.ndarray]]:
        rows: dict[str, list[np.ndarray]] = {name: [history[name]] * len(indexes) for name in HISTORY}
        for name, values in cand.items():
            rows[name] = [values[idx] for idx in indexes]
        return rows

    with torch.inference_mode():
        one_each = collate(
            rows_for([[i] for i in range(len(candidates))]), content, max_history=cfg.max_history
        )
        pointwise = model.score_pointwise(one_each)[:, 0].numpy()  # (S, T)
        weights = task_weight_vector(task_weights)
        order = pointwise_order(pointwise, weights)
        top = order[:setwise_top_k]
        correction = None
        if len(top):
            top_batch = collate(rows_for([top.tolist()]), content, max_history=cfg.max_history)
            correction = model.score_setwise(top_batch, torch.arange(len(top))[None])[0].numpy()
    ranking = split_rerank(pointwise, order, weights, top if correction is not None else None, correction)
    return Expected(
        pointwise, ranking.final_logits, ranking.order, ranking.setwise, len(history["hist_item_id"])
    )
