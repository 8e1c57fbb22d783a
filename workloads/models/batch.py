"""The tensors every ranking model consumes: a member's history plus the candidates of one session.

Training (from preprocessed example rows), evaluation and serving (from Feast online features) all
build a ``RankingBatch``; models never see parquet rows or HTTP requests. ``collate`` is the one
place that turns example rows (``schema.EXAMPLES``, as Ray Data's ``iter_batches(batch_format="numpy")``
yields them) into padded tensors, so training and evaluation cannot disagree about padding or labels.
Shapes: B requests, H history events (right-padded), S candidates (right-padded), E content dims,
A actions, T tasks, L semantic-id levels.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import torch
from torch import Tensor

from workloads.data.schema import COUNTER_FEATURES, N_AGE_BUCKETS, TASKS, Action, PostType


@dataclass
class RankingBatch:
    # history, in time order, strictly before the target session
    hist_item_id: Tensor  # (B, H) int64 raw item ids; models hash them into their tables
    hist_actor_id: Tensor  # (B, H) int64
    hist_post_type: Tensor  # (B, H) int64
    hist_age_bucket: Tensor  # (B, H) int64
    hist_content: Tensor  # (B, H, E) float32 content embeddings
    hist_actions: Tensor  # (B, H, A) float32 multi-hot outcome of each history event
    hist_session: Tensor  # (B, H) int64 session ordinal within the row (for historical attention)
    hist_mask: Tensor  # (B, H) bool, True where a real event is
    # candidates of the target session
    cand_item_id: Tensor  # (B, S) int64
    cand_actor_id: Tensor  # (B, S) int64
    cand_post_type: Tensor  # (B, S) int64
    cand_age_bucket: Tensor  # (B, S) int64
    cand_content: Tensor  # (B, S, E) float32
    cand_mask: Tensor  # (B, S) bool
    cand_position: Tensor  # (B, S) int64 slot shown in (training data only; serving passes arange)
    cand_counters: Tensor  # (B, S, C) float32 hand-crafted counters (the DCNv2 baseline only)
    labels: Tensor | None = None  # (B, S, T) float32 per-task labels (TASKS order), None at serving
    # semantic ids from the RQ-VAE (LiGR section 3.3); None unless the model uses them
    hist_semantic_ids: Tensor | None = None  # (B, H, L) int64, -1 where the item has none
    cand_semantic_ids: Tensor | None = None  # (B, S, L) int64

    def to(self, device: torch.device | str) -> RankingBatch:
        return RankingBatch(
            **{
                f.name: (v.to(device) if isinstance(v, Tensor) else v)
                for f in fields(self)
                for v in [getattr(self, f.name)]
            }
        )

    @property
    def batch_size(self) -> int:
        return int(self.cand_item_id.shape[0])


@dataclass
class SequenceBatch:
    """Item sequences for next-item retrieval (MovieLens leave-one-out): no sessions, no candidates."""

    item_id: Tensor  # (B, L) int64, time order, right-padded
    mask: Tensor  # (B, L) bool
    actions: Tensor | None = None  # (B, L, A) float32 multi-hot outcome of each event

    def to(self, device: torch.device | str) -> SequenceBatch:
        actions = None if self.actions is None else self.actions.to(device)
        return SequenceBatch(self.item_id.to(device), self.mask.to(device), actions)


# --- Item side tables, indexed by dense item id -------------------------------------------------------


class ItemContentTable:
    """Content embeddings by dense item id; ids the table does not know map to zeros (cold items)."""

    def __init__(self, embeddings: np.ndarray) -> None:
        if embeddings.ndim != 2:
            raise ValueError(f"ItemContentTable.embeddings: expected (n_items, dim), got {embeddings.shape}")
        self.embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)

    @classmethod
    def zeros(cls, n_items: int, dim: int) -> ItemContentTable:
        """A table for worlds without content (MovieLens): every item embeds to zeros."""
        return cls(np.zeros((n_items, dim), dtype=np.float32))

    @classmethod
    def from_parquet(cls, items_parquet_path: str | Path) -> ItemContentTable:
        """Read ``item_id`` and ``content_emb`` from the items table (a file or a folder of parquet)."""
        table = pq.read_table(items_parquet_path, columns=["item_id", "content_emb"])
        ids = table.column("item_id").to_numpy()
        if len(ids) and ids.min() < 0:
            raise ValueError(f"items.item_id: expected dense ids >= 0, found {int(ids.min())}")
        emb_col = table.column("content_emb").combine_chunks()
        dim = emb_col.type.list_size
        values = emb_col.values.to_numpy(zero_copy_only=False).reshape(len(ids), dim)
        values = np.nan_to_num(values.astype(np.float32))  # null rows' child slots read as NaN
        values[emb_col.is_null().to_numpy(zero_copy_only=False)] = 0.0
        embeddings = np.zeros((int(ids.max()) + 1 if len(ids) else 0, dim), dtype=np.float32)
        embeddings[ids] = values
        return cls(embeddings)

    @property
    def dim(self) -> int:
        return int(self.embeddings.shape[1])

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        """(*ids.shape, dim) content embeddings; unknown or negative ids give zeros."""
        ids = np.asarray(ids, dtype=np.int64)
        known = (ids >= 0) & (ids < len(self.embeddings))
        out = np.zeros((*ids.shape, self.dim), dtype=np.float32)
        out[known] = self.embeddings[ids[known]]
        return out


class SemanticIdTable:
    """Semantic ids (one code per RQ-VAE level) by dense item id; unknown items get -1 at every level."""

    def __init__(self, codes: np.ndarray, codebook_size: int) -> None:
        if codes.ndim != 2:
            raise ValueError(f"SemanticIdTable.codes: expected (n_items, levels), got {codes.shape}")
        if codes.size and (codes.min() < 0 or codes.max() >= codebook_size):
            raise ValueError(f"SemanticIdTable.codes: expected values in [0, {codebook_size})")
        self.codes = np.ascontiguousarray(codes, dtype=np.int64)
        self.codebook_size = codebook_size

    @classmethod
    def from_parquet(cls, path: str | Path, codebook_size: int) -> SemanticIdTable:
        """Read ``item_id`` and ``semantic_ids`` as written by ``python -m workloads.models.rqvae``."""
        table = pq.read_table(path, columns=["item_id", "semantic_ids"])
        ids = table.column("item_id").to_numpy()
        col = table.column("semantic_ids").combine_chunks()
        values = col.values.to_numpy(zero_copy_only=False).reshape(len(ids), col.type.list_size)
        codes = np.zeros((int(ids.max()) + 1 if len(ids) else 0, col.type.list_size), dtype=np.int64)
        codes[ids] = values
        return cls(codes, codebook_size)

    @property
    def levels(self) -> int:
        return int(self.codes.shape[1])

    def lookup(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        known = (ids >= 0) & (ids < len(self.codes))
        out = np.full((*ids.shape, self.levels), -1, dtype=np.int64)
        out[known] = self.codes[ids[known]]
        return out


# --- Actions and labels -----------------------------------------------------------------------------

N_ACTIONS = len(Action)

# How each ranking task reads an impression's action bitmask (LiGR section 3.1: contribution is any
# of like / comment / share). Indexed by TASKS below, so adding a task without a rule fails at import.
_TASK_RULES: dict[str, Callable[[Any], Any]] = {  # numpy arrays or torch tensors of int bitmasks
    "click": lambda bits: (bits >> Action.CLICK) & 1,
    "contribution": lambda bits: (
        ((bits >> Action.LIKE) | (bits >> Action.COMMENT) | (bits >> Action.SHARE)) & 1
    ),
    "long_dwell": lambda bits: (bits >> Action.LONG_DWELL) & 1,
}
_TASK_LABELS = [_TASK_RULES[task] for task in TASKS]


def actions_multi_hot(bits: np.ndarray) -> np.ndarray:
    """(..., A) float32 multi-hot of int bitmasks (``Action`` bit positions)."""
    bits = np.asarray(bits, dtype=np.int64)
    return ((bits[..., None] >> np.arange(N_ACTIONS)) & 1).astype(np.float32)


def task_labels(bits: np.ndarray) -> np.ndarray:
    """(..., T) float32 labels in TASKS order; the vectorized twin of ``schema.task_labels``."""
    bits = np.asarray(bits, dtype=np.int64)
    return np.stack([rule(bits) for rule in _TASK_LABELS], axis=-1).astype(np.float32)


def task_labels_from_multi_hot(actions: Tensor) -> Tensor:
    """(..., T) labels of (..., A) multi-hot actions (history events), by the rules of ``task_labels``."""
    bits = (actions.round().long() << torch.arange(N_ACTIONS, device=actions.device)).sum(dim=-1)
    return torch.stack([rule(bits) for rule in _TASK_LABELS], dim=-1).to(actions.dtype)


# --- Padding ragged columns ---------------------------------------------------------------------------


def _ragged(column: np.ndarray | Sequence, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(flat values, per-row lengths) of a list column: an object array of arrays, a list, or 2-D."""
    if isinstance(column, np.ndarray) and column.dtype != object:
        if column.ndim != 2:
            raise ValueError(f"column {name!r}: expected one list per row, got shape {column.shape}")
        return column.reshape(-1), np.full(len(column), column.shape[1], dtype=np.int64)
    lengths = np.fromiter((len(row) for row in column), dtype=np.int64, count=len(column))
    if lengths.sum() == 0:
        return np.zeros(0, dtype=np.int64), lengths
    return np.concatenate([np.asarray(row) for row in column]), lengths


@dataclass
class _Layout:
    """Where each kept list element lands in the padded (B, width) array."""

    src: np.ndarray  # index into the flat values
    row: np.ndarray
    col: np.ndarray
    width: int
    batch: int

    @classmethod
    def build(
        cls, lengths: np.ndarray, limit: int | None, keep_last: bool, pad_to_limit: bool = False
    ) -> _Layout:
        kept = lengths if limit is None else np.minimum(lengths, limit)
        width = max(int(kept.max()) if len(kept) else 0, 1)  # never zero-width: attention needs a key
        if pad_to_limit and limit is not None:
            width = limit
        row = np.repeat(np.arange(len(kept)), kept)
        col = np.arange(int(kept.sum())) - np.repeat(np.cumsum(kept) - kept, kept)
        first = np.cumsum(lengths) - lengths + (lengths - kept if keep_last else 0)
        return cls(src=np.repeat(first, kept) + col, row=row, col=col, width=width, batch=len(kept))

    def pad(self, flat: np.ndarray, dtype: np.dtype | type, fill: float = 0) -> np.ndarray:
        out = np.full((self.batch, self.width), fill, dtype=dtype)
        out[self.row, self.col] = flat[self.src]
        return out

    @property
    def mask(self) -> np.ndarray:
        out = np.zeros((self.batch, self.width), dtype=bool)
        out[self.row, self.col] = True
        return out


def _session_ordinals(session_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Dense ordinal of each event's session within its row, numbered by first appearance in time.

    Events of one session share an ordinal even if another session's events fall between them, so
    "earlier session" in the attention mask means what it says.
    """
    batch, width = session_ids.shape
    row, col = np.nonzero(mask)
    sid = session_ids[row, col]
    order = np.lexsort((col, sid, row))  # group by (row, session), earliest event first
    row_s, sid_s, col_s = row[order], sid[order], col[order]
    new_group = np.ones(len(order), dtype=bool)
    new_group[1:] = (row_s[1:] != row_s[:-1]) | (sid_s[1:] != sid_s[:-1])
    group = np.cumsum(new_group) - 1
    group_row, group_first = row_s[new_group], col_s[new_group]
    # rank the groups of each row by first appearance
    by_time = np.lexsort((group_first, group_row))
    rank = np.empty(len(by_time), dtype=np.int64)
    row_start = np.searchsorted(group_row[by_time], group_row[by_time], side="left")
    rank[by_time] = np.arange(len(by_time)) - row_start
    out = np.zeros((batch, width), dtype=np.int64)
    out[row_s, col_s] = rank[group]
    return out


_HIST_REQUIRED = [
    "hist_item_id",
    "hist_actor_id",
    "hist_post_type",
    "hist_age_bucket",
    "hist_session_id",
    "hist_actions",
]
_CAND_REQUIRED = [
    "cand_item_id",
    "cand_actor_id",
    "cand_post_type",
    "cand_age_bucket",
    "cand_position",
    *[f"cand_{c}" for c in COUNTER_FEATURES],
]


# categorical columns the models embed with small fixed tables
_VOCABULARIES = {
    "hist_post_type": len(PostType),
    "cand_post_type": len(PostType),
    "hist_age_bucket": N_AGE_BUCKETS,
    "cand_age_bucket": N_AGE_BUCKETS,
}


def _check_lengths(lengths: dict[str, np.ndarray], reference: str) -> None:
    for name, lens in lengths.items():
        bad = np.nonzero(lens != lengths[reference])[0]
        if len(bad):
            raise ValueError(
                f"column {name!r}: row {int(bad[0])} has {int(lens[bad[0]])} elements but "
                f"{reference!r} has {int(lengths[reference][bad[0]])}"
            )


def collate(
    rows: Mapping[str, np.ndarray | list],
    content: ItemContentTable,
    max_history: int | None = None,
    max_candidates: int | None = None,
    semantic_ids: SemanticIdTable | None = None,
    pad_to_limits: bool = False,
) -> RankingBatch:
    """Pad a batch of example rows into a ``RankingBatch``.

    History keeps the most recent ``max_history`` events (the tail of the time-ordered list);
    candidates keep the first ``max_candidates`` slots. Padding goes to the longest row, or with
    ``pad_to_limits`` to the limits themselves (fixed shapes, for compiled kernels). ``labels`` come
    from ``cand_actions`` when the rows have it (training and evaluation) and are None otherwise
    (serving).
    """
    missing = [c for c in (*_HIST_REQUIRED, *_CAND_REQUIRED) if c not in rows]
    if missing:
        raise ValueError(f"collate: missing columns {missing}")

    hist = {c: _ragged(rows[c], c) for c in _HIST_REQUIRED}
    _check_lengths({c: lens for c, (_, lens) in hist.items()}, "hist_item_id")
    cand_cols = [*_CAND_REQUIRED, *(["cand_actions"] if "cand_actions" in rows else [])]
    cand = {c: _ragged(rows[c], c) for c in cand_cols}
    _check_lengths({c: lens for c, (_, lens) in cand.items()}, "cand_item_id")

    h = _Layout.build(hist["hist_item_id"][1], max_history, keep_last=True, pad_to_limit=pad_to_limits)
    s = _Layout.build(cand["cand_item_id"][1], max_candidates, keep_last=False, pad_to_limit=pad_to_limits)
    for name, high in _VOCABULARIES.items():
        values = (hist if name.startswith("hist_") else cand)[name][0]
        if len(values) and (values.min() < 0 or values.max() >= high):
            raise ValueError(
                f"column {name!r}: expected values in [0, {high}), found {values.min()}..{values.max()}"
            )
    hist_mask, cand_mask = h.mask, s.mask

    def hist_ids(name: str) -> np.ndarray:
        return h.pad(hist[name][0], np.int64)

    def cand_ids(name: str) -> np.ndarray:
        return s.pad(cand[name][0], np.int64)

    hist_item, cand_item = hist_ids("hist_item_id"), cand_ids("cand_item_id")
    hist_content = np.zeros((h.batch, h.width, content.dim), dtype=np.float32)
    hist_content[hist_mask] = content.lookup(hist_item[hist_mask])
    cand_content = np.zeros((s.batch, s.width, content.dim), dtype=np.float32)
    cand_content[cand_mask] = content.lookup(cand_item[cand_mask])
    counters = np.stack([s.pad(cand[f"cand_{c}"][0], np.float32) for c in COUNTER_FEATURES], axis=-1)
    labels = None
    if "cand_actions" in cand:
        labels = torch.from_numpy(task_labels(cand_ids("cand_actions")) * cand_mask[..., None])

    hist_sid = cand_sid = None
    if semantic_ids is not None:
        hist_sid = torch.from_numpy(np.where(hist_mask[..., None], semantic_ids.lookup(hist_item), -1))
        cand_sid = torch.from_numpy(np.where(cand_mask[..., None], semantic_ids.lookup(cand_item), -1))

    t = torch.from_numpy
    return RankingBatch(
        hist_item_id=t(hist_item),
        hist_actor_id=t(hist_ids("hist_actor_id")),
        hist_post_type=t(hist_ids("hist_post_type")),
        hist_age_bucket=t(hist_ids("hist_age_bucket")),
        hist_content=t(hist_content),
        hist_actions=t(actions_multi_hot(hist_ids("hist_actions")) * hist_mask[..., None]),
        hist_session=t(_session_ordinals(hist_ids("hist_session_id"), hist_mask)),
        hist_mask=t(hist_mask),
        cand_item_id=t(cand_item),
        cand_actor_id=t(cand_ids("cand_actor_id")),
        cand_post_type=t(cand_ids("cand_post_type")),
        cand_age_bucket=t(cand_ids("cand_age_bucket")),
        cand_content=t(cand_content),
        cand_mask=t(cand_mask),
        cand_position=t(cand_ids("cand_position")),
        cand_counters=t(counters),
        labels=labels,
        hist_semantic_ids=hist_sid,
        cand_semantic_ids=cand_sid,
    )


def collate_sequences(
    item_ids: np.ndarray | Sequence,
    max_len: int | None = None,
    actions: np.ndarray | Sequence | None = None,
) -> SequenceBatch:
    """Pad per-user item sequences (and optional action bitmasks), keeping the most recent ``max_len``."""
    flat, lengths = _ragged(item_ids, "item_ids")
    layout = _Layout.build(lengths, max_len, keep_last=True)
    multi_hot = None
    if actions is not None:
        action_flat, action_lengths = _ragged(actions, "actions")
        _check_lengths({"item_ids": lengths, "actions": action_lengths}, "item_ids")
        multi_hot = torch.from_numpy(
            actions_multi_hot(layout.pad(action_flat, np.int64)) * layout.mask[..., None]
        )
    return SequenceBatch(
        item_id=torch.from_numpy(layout.pad(flat, np.int64)),
        mask=torch.from_numpy(layout.mask),
        actions=multi_hot,
    )
