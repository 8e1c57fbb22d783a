"""SASRec (Kang & McAuley 2018, "Self-Attentive Sequential Recommendation"): the next-item reference.

Item embeddings (scaled by sqrt(d)) plus learned positions, causal self-attention blocks, and the
state at step t scored against item embeddings by dot product to retrieve item t+1; the input and
output item embeddings are shared. Two departures, both to compare with LiGR retrieval on equal terms:
blocks are the standard pre-norm residual form, and the loss is the same softmax over candidate
items as LiGR's (not the paper's one-negative BCE; softmax is known to help SASRec, so this is the
stronger reference). Positions count back from the latest event, like SASRec's left padding.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workloads.models.base import NextItemModel, next_item_softmax_loss
from workloads.models.batch import SequenceBatch
from workloads.models.config import SASRecConfig
from workloads.models.ligr import (
    AttentionMask,
    HashedEmbedding,
    MultiHeadAttention,
    TokenLayout,
    init_weights,
)


class SASRecBlock(nn.Module):
    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.attn_norm = nn.LayerNorm(cfg.d_model)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attn_impl)
        self.ffn_norm = nn.LayerNorm(cfg.d_model)
        self.ffn = nn.Sequential(  # SASRec's point-wise feed-forward: two d x d layers
            nn.Linear(cfg.d_model, cfg.d_model),
            nn.ReLU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.d_model, cfg.d_model),
        )
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: Tensor, mask: AttentionMask) -> Tensor:
        x = x + self.dropout(self.attn(self.attn_norm(x), mask))
        return x + self.dropout(self.ffn(self.ffn_norm(x)))


class SASRec(NextItemModel):
    cfg: SASRecConfig

    def __init__(self, cfg: SASRecConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_id = HashedEmbedding(cfg.item_hash_size, cfg.d_model, salt=1)
        self.position = nn.Embedding(cfg.max_len + 1, cfg.d_model)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(SASRecBlock(cfg) for _ in range(cfg.n_layers))
        self.norm = nn.LayerNorm(cfg.d_model)
        self.apply(init_weights)

    def item_embedding(self, item_ids: Tensor) -> Tensor:
        return self.item_id(item_ids)

    def states(self, batch: SequenceBatch) -> Tensor:
        """(B, L, D): the user after each event, from that event and earlier ones only."""
        B, L = batch.item_id.shape
        if self.cfg.max_len < L:
            raise ValueError(f"sequence length {L} exceeds max_len={self.cfg.max_len}")
        recency = (batch.mask.sum(dim=1, keepdim=True) - torch.arange(L, device=batch.mask.device)).clamp(
            min=0
        )
        x = self.item_embedding(batch.item_id) * self.cfg.d_model**0.5 + self.position(recency)
        x = self.dropout(x) * batch.mask.unsqueeze(-1)
        # every event is its own "session": attending to earlier sessions is plain causal attention
        layout = TokenLayout(
            session=torch.arange(L, device=x.device).expand(B, L),
            kind=torch.zeros_like(batch.item_id),
            valid=batch.mask,
            position=recency,
        )
        mask = AttentionMask(layout.historical(), layout)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x)

    def user_embedding(self, batch: SequenceBatch) -> Tensor:
        states = self.states(batch)
        last = (batch.mask.sum(dim=1) - 1).clamp(min=0)
        return states[torch.arange(len(last), device=last.device), last]  # (B, D)

    def loss(self, batch: SequenceBatch, candidate_ids: Tensor | None = None) -> Tensor:
        states = self.states(batch)
        pairs = batch.mask[:, :-1] & batch.mask[:, 1:]
        if not pairs.any():
            raise ValueError("next-item loss needs sequences with at least two events")
        return next_item_softmax_loss(
            states[:, :-1][pairs], batch.item_id[:, 1:][pairs], self.item_embedding, candidate_ids
        )
