"""Example rows and batches for model tests: the schema's columns, tiny sizes, optional planted signals."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch

from workloads.data.schema import CONTENT_DIM, COUNTER_FEATURES, EXAMPLES, Action
from workloads.models.batch import ItemContentTable, RankingBatch, collate


def object_column(lists: list[np.ndarray]) -> np.ndarray:
    """What Ray Data's numpy batches hold for a list column: a 1-D object array of arrays."""
    out = np.empty(len(lists), dtype=object)
    for i, values in enumerate(lists):
        out[i] = values
    return out


def example_rows(
    rng: np.random.Generator,
    n_rows: int,
    hist_len: tuple[int, int] = (0, 12),
    cand_len: tuple[int, int] = (1, 6),
    n_items: int = 100,
) -> dict[str, np.ndarray]:
    """Random rows with every ``schema.EXAMPLES`` column and the schema's dtypes."""
    hist_lens = rng.integers(hist_len[0], hist_len[1] + 1, n_rows)
    cand_lens = rng.integers(cand_len[0], cand_len[1] + 1, n_rows)
    rows: dict[str, np.ndarray] = {
        "member_id": np.arange(n_rows, dtype=np.int64),
        "session_id": np.arange(n_rows, dtype=np.int64) + 10_000,
        "surface": np.array(["feed"] * n_rows, dtype=object),
        "session_start": np.full(n_rows, 1_000_000, dtype=np.int64),
        "split": np.array(["train"] * n_rows, dtype=object),
        "history_len": hist_lens.astype(np.int32),
    }
    for field in EXAMPLES:
        name = field.name
        if name in rows:
            continue
        lens = hist_lens if name.startswith("hist_") else cand_lens
        dtype = field.type.value_type.to_pandas_dtype()
        if name == "hist_session_id":
            values = [np.sort(rng.integers(0, 4, n)) + 500 for n in lens]
        elif name in ("hist_timestamp", "cand_position"):
            values = [np.arange(n) for n in lens]
        elif name.endswith("_actions"):
            values = [rng.integers(0, 1 << len(Action), n) for n in lens]
        elif name.endswith("post_type"):
            values = [rng.integers(0, 5, n) for n in lens]
        elif name.endswith("age_bucket") or name.endswith("topic"):
            values = [rng.integers(0, 16, n) for n in lens]
        elif name in (f"cand_{c}" for c in COUNTER_FEATURES):
            values = [rng.random(n) * 20 for n in lens]
        else:  # item and actor ids
            values = [rng.integers(0, n_items, n) for n in lens]
        rows[name] = object_column([np.asarray(v).astype(dtype) for v in values])
    return rows


def content_table(rng: np.random.Generator, n_items: int = 100) -> ItemContentTable:
    return ItemContentTable(rng.normal(size=(n_items, CONTENT_DIM)).astype(np.float32))


def random_batch(
    seed: int = 0, n_rows: int = 4, hist_len: tuple[int, int] = (0, 12), cand_len: tuple[int, int] = (1, 6)
) -> RankingBatch:
    rng = np.random.default_rng(seed)
    return collate(example_rows(rng, n_rows, hist_len, cand_len), content_table(rng))


def _rows_from_matrices(
    rng: np.random.Generator,
    hist_actor: np.ndarray,
    hist_actions: np.ndarray,
    cand_actor: np.ndarray,
    cand_actions: np.ndarray,
    events_per_session: int = 3,
) -> RankingBatch:
    """A batch whose rows all have the same history and slate lengths; only actors and actions vary."""
    n_rows, hist_len = hist_actor.shape
    n_cand = cand_actor.shape[1]

    def col(matrix: np.ndarray, dtype: type) -> np.ndarray:
        return object_column([row.astype(dtype) for row in matrix])

    zeros_h, zeros_c = np.zeros((n_rows, hist_len)), np.zeros((n_rows, n_cand))
    rows = {
        "hist_item_id": col(rng.integers(0, 1000, (n_rows, hist_len)), np.int64),
        "hist_actor_id": col(hist_actor, np.int64),
        "hist_post_type": col(zeros_h, np.int8),
        "hist_age_bucket": col(zeros_h, np.int8),
        "hist_session_id": col(np.tile(np.arange(hist_len) // events_per_session, (n_rows, 1)), np.int64),
        "hist_actions": col(hist_actions, np.int16),
        "cand_item_id": col(rng.integers(0, 1000, (n_rows, n_cand)), np.int64),
        "cand_actor_id": col(cand_actor, np.int64),
        "cand_post_type": col(zeros_c, np.int8),
        "cand_age_bucket": col(zeros_c, np.int8),
        "cand_position": col(np.tile(np.arange(n_cand), (n_rows, 1)), np.int16),
        "cand_actions": col(cand_actions, np.int16),
        **{f"cand_{c}": col(zeros_c, np.float32) for c in COUNTER_FEATURES},
    }
    return collate(rows, ItemContentTable.zeros(1000, CONTENT_DIM))


ENGAGED = (1 << Action.CLICK) | (1 << Action.LIKE) | (1 << Action.LONG_DWELL)


def planted_batch(rng: np.random.Generator, n_rows: int, hist_len: int = 12, n_cand: int = 8) -> RankingBatch:
    """Each member has a favourite actor, visible only through which history posts they acted on.

    A candidate's labels are 1 exactly when its actor is the favourite, so a model scores well only
    if candidates read the history's action tokens.
    """
    n_actors = 8
    favourite = rng.integers(0, n_actors, n_rows)
    hist_actor = rng.integers(0, n_actors, (n_rows, hist_len))
    cand_actor = rng.integers(0, n_actors, (n_rows, n_cand))
    hist_actions = np.where(hist_actor == favourite[:, None], ENGAGED, 0)
    cand_actions = np.where(cand_actor == favourite[:, None], ENGAGED, 0)
    return _rows_from_matrices(rng, hist_actor, hist_actions, cand_actor, cand_actions)


def planted_slate_batch(rng: np.random.Generator, n_rows: int, n_cand: int = 8) -> RankingBatch:
    """A post right below another post of the same actor is skipped; every other post is engaged with.

    No candidate's own features or the history say which is which: only the slate order does, so
    pointwise scoring is at chance and the set-wise part has to read the slot above.
    """
    cand_actor = rng.integers(0, 3, (n_rows, n_cand))
    repeated = np.zeros_like(cand_actor, dtype=bool)
    repeated[:, 1:] = cand_actor[:, 1:] == cand_actor[:, :-1]
    hist_actor = rng.integers(0, 3, (n_rows, 2))
    return _rows_from_matrices(
        rng, hist_actor, np.zeros_like(hist_actor), cand_actor, np.where(repeated, 0, ENGAGED)
    )


def candidate_slice(batch: RankingBatch, index: torch.Tensor | slice) -> RankingBatch:
    """The same requests with only some of their candidates."""
    return dataclasses.replace(
        batch,
        **{
            f.name: getattr(batch, f.name)[:, index]
            for f in dataclasses.fields(batch)
            if (f.name.startswith("cand_") or f.name == "labels") and getattr(batch, f.name) is not None
        },
    )
