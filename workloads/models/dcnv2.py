"""The "production" baseline (LiGR 3.1): a pointwise multi-task ranker with two DCNv2 towers.

DCN V2 (Wang et al. 2021): a cross network whose layer ``x_{l+1} = x_0 * (W_l x_l + b_l) + x_l`` learns
explicit bounded-degree feature crosses, beside a deep MLP (the parallel structure), concatenated
into the head. As in LinkedIn's Feed model, two towers share the input: the click tower predicts
click and long dwell, the contribution tower predicts contribution. The input is what that model
reads and LiGR mostly does without: the hand-crafted counters (``COUNTER_FEATURES``, log1p), sparse id
embeddings (item, actor, post type, age bucket), the projected content embedding, and optionally the
mean embedding of the actors the member engaged with. Each candidate is scored alone.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from workloads.data.schema import COUNTER_FEATURES, FEED_ACTIONS, N_AGE_BUCKETS, TASKS, PostType
from workloads.models.base import RankingModel, RankingOutput, counter_inputs, ranking_loss
from workloads.models.batch import RankingBatch
from workloads.models.config import DCNv2Config
from workloads.models.ligr import HashedEmbedding, init_weights

TOWER_TASKS: dict[str, list[str]] = {"click": ["click", "long_dwell"], "contribution": ["contribution"]}
_FEED_ACTIONS = [int(a) for a in FEED_ACTIONS]


class CrossNetV2(nn.Module):
    def __init__(self, dim: int, n_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(nn.Linear(dim, dim) for _ in range(n_layers))

    def forward(self, x0: Tensor) -> Tensor:
        x = x0
        for layer in self.layers:
            x = x0 * layer(x) + x  # x_{l+1} = x_0 * (W_l x_l + b_l) + x_l
        return x


class Tower(nn.Module):
    """Cross network and deep MLP side by side, concatenated into one logit per task."""

    def __init__(self, in_dim: int, cfg: DCNv2Config, n_tasks: int) -> None:
        super().__init__()
        self.cross = CrossNetV2(in_dim, cfg.n_cross_layers)
        layers: list[nn.Module] = []
        width = in_dim
        for out in cfg.mlp_dims:
            layers += [nn.Linear(width, out), nn.ReLU(), nn.Dropout(cfg.dropout)]
            width = out
        self.deep = nn.Sequential(*layers)
        self.head = nn.Linear(in_dim + width, n_tasks)

    def forward(self, x0: Tensor) -> Tensor:
        return self.head(torch.cat([self.cross(x0), self.deep(x0)], dim=-1))


class DCNv2ForRanking(RankingModel):
    cfg: DCNv2Config
    task_order: Tensor

    def __init__(self, cfg: DCNv2Config) -> None:
        super().__init__()
        self.cfg = cfg
        self.item_id = HashedEmbedding(cfg.item_hash_size, cfg.id_dim, salt=1)
        self.actor_id = HashedEmbedding(cfg.actor_hash_size, cfg.id_dim, salt=2)
        self.post_type = nn.Embedding(len(PostType), cfg.id_dim)
        self.age_bucket = nn.Embedding(N_AGE_BUCKETS, cfg.id_dim)
        self.content = nn.Linear(cfg.content_dim, cfg.id_dim) if cfg.use_content else None
        n_sparse = 4 + int(cfg.use_content) + int(cfg.use_history_summary)
        in_dim = len(COUNTER_FEATURES) + n_sparse * cfg.id_dim
        self.input_norm = nn.LayerNorm(in_dim)
        self.towers = nn.ModuleDict(
            {name: Tower(in_dim, cfg, len(tasks)) for name, tasks in TOWER_TASKS.items()}
        )
        # tower outputs, concatenated, reordered into TASKS order
        tower_order = [t for tasks in TOWER_TASKS.values() for t in tasks]
        self.register_buffer(
            "task_order", torch.tensor([tower_order.index(t) for t in TASKS]), persistent=False
        )
        self.apply(init_weights)
        if cfg.hashed_id_init == "dlrm":
            self.item_id.init_near_zero()
            self.actor_id.init_near_zero()

    def engaged_actors(self, batch: RankingBatch) -> Tensor:
        """(B, id_dim) mean embedding of the actors whose posts the member acted on in the history."""
        engaged = batch.hist_actions[..., _FEED_ACTIONS].amax(dim=-1) * batch.hist_mask  # (B, H)
        actors = self.actor_id(batch.hist_actor_id)  # (B, H, id_dim)
        return (engaged.unsqueeze(-1) * actors).sum(dim=1) / engaged.sum(dim=1, keepdim=True).clamp(min=1.0)

    def features(self, batch: RankingBatch) -> Tensor:  # -> (B, S, F)
        counters = counter_inputs(batch.cand_counters, COUNTER_FEATURES, self.cfg.counter_scale)  # (B, S, C)
        parts = [
            counters,
            self.item_id(batch.cand_item_id),
            self.actor_id(batch.cand_actor_id),
            self.post_type(batch.cand_post_type),
            self.age_bucket(batch.cand_age_bucket),
        ]
        if self.content is not None:
            parts.append(self.content(batch.cand_content))
        if self.cfg.use_history_summary:
            parts.append(self.engaged_actors(batch).unsqueeze(1).expand(-1, counters.shape[1], -1))
        return self.input_norm(torch.cat(parts, dim=-1))

    def score_pointwise(self, batch: RankingBatch) -> Tensor:
        x0 = self.features(batch)
        logits = torch.cat([tower(x0) for tower in self.towers.values()], dim=-1)
        return logits[..., self.task_order]  # (B, S, T)

    def forward(self, batch: RankingBatch) -> RankingOutput:
        logits = self.score_pointwise(batch)
        loss = None
        if batch.labels is not None:
            loss = ranking_loss(logits, batch.labels, batch.cand_mask, self.cfg.attention_rank_loss_weight)
        return RankingOutput(logits=logits, pointwise_logits=logits, setwise_logits=None, loss=loss)
