"""The tensors every ranking model consumes: a member's history plus the candidates of one session.

Training (from preprocessed example rows), evaluation and serving (from Feast online features) all
build a ``RankingBatch``; models never see parquet rows or HTTP requests.
Shapes: B requests, H history events (right-padded), S candidates (right-padded), E content dims,
A actions, T tasks.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch
from torch import Tensor


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
