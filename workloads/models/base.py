"""What every model promises the trainer, the evaluator and the server, and the losses they share.

A ranking model maps a ``RankingBatch`` to a ``RankingOutput`` (per-candidate, per-task logits and,
with labels, its loss). Serving follows LiGR section 4.0.2: pointwise scores for every candidate,
then a set-wise correction for the top few only; ``score_pointwise`` and ``score_setwise`` are those
two halves. A next-item model (retrieval) maps a ``SequenceBatch`` to user embeddings that are scored
against item embeddings by dot product.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from workloads.data.counters import COUNTER_GROUPS, RATE_PRIOR
from workloads.data.schema import TASKS
from workloads.models.batch import RankingBatch, SequenceBatch
from workloads.models.config import CounterScale

RATE_COUNTERS = frozenset(c.name for g in COUNTER_GROUPS for c in g.counters if c.stat == "rate")


@dataclass
class RankingOutput:
    logits: Tensor  # (B, S, T) final scores: pointwise + set-wise correction where the model has one
    pointwise_logits: Tensor  # (B, S, T) what each candidate scores on its own
    setwise_logits: Tensor | None = None  # (B, S, T) additive in-session correction; None if pointwise only
    loss: Tensor | None = None  # scalar, when the batch carries labels


def counter_inputs(counters: Tensor, names: Sequence[str], scale: CounterScale) -> Tensor:
    """The counters (..., C) named ``names`` on the scale a model reads them.

    ``log1p`` takes log1p of every counter. Counts are heavy-tailed, so that suits them, but a smoothed
    rate stays in (0, 1) and log1p barely moves it: item_ctr_7d spans 0.06-0.19 (p10-p90), a spread of
    0.05, twenty times smaller than an embedding's, so one epoch hardly learns from it. ``log_odds``
    keeps log1p for counts and turns rates into log-odds relative to the prior, ``logit(rate) -
    logit(RATE_PRIOR)``: spread ~0.5, and a key with no impressions (rate = prior) reads 0.
    """
    counters = counters.clamp(min=0.0)
    if scale == "log1p":
        return torch.log1p(counters)
    is_rate = torch.tensor([n in RATE_COUNTERS for n in names], device=counters.device)
    log_odds = torch.logit(counters, eps=1e-4) - math.log(RATE_PRIOR / (1.0 - RATE_PRIOR))
    return torch.where(is_rate, log_odds, torch.log1p(counters))


# --- Losses -----------------------------------------------------------------------------------------


def bce_per_task(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Binary cross-entropy of each task averaged over real positions, summed over tasks.

    logits, labels: (..., T); mask: (...) True where a real candidate (or history event) is.
    """
    per_item = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (..., T)
    weight = mask.unsqueeze(-1).to(per_item.dtype)
    return (per_item * weight).sum() / weight.sum().clamp(min=1.0)


def attention_rank_loss(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Listwise Attention Rank loss (Ai et al. 2018), aggregated per session and task.

    Within a session the labels become an attention distribution, psi(y) / sum psi(y) with
    psi(y) = exp(y) for y > 0 and 0 otherwise, and the loss is its cross-entropy with the softmax of
    the scores over the session's real candidates. Sessions without a positive for a task carry no
    ranking signal for it and are skipped. logits, labels: (B, S, T); mask: (B, S). A batch row is
    one session (the candidates of one request).
    """
    valid = mask.unsqueeze(-1)  # (B, S, 1)
    psi = torch.where(valid & (labels > 0), labels.exp(), torch.zeros_like(labels))
    has_positive = psi.sum(dim=1) > 0  # (B, T)
    target = psi / psi.sum(dim=1, keepdim=True).clamp(min=1e-12)
    # a finite floor rather than -inf: a row with no real candidate must not turn gradients into NaN
    log_p = torch.log_softmax(logits.masked_fill(~valid, torch.finfo(logits.dtype).min), dim=1)
    cross_entropy = -(target * log_p).sum(dim=1)  # (B, T)
    if not has_positive.any():
        return logits.sum() * 0.0  # keeps the graph (DDP expects every step to backprop)
    return cross_entropy[has_positive].mean()


def ranking_loss(logits: Tensor, labels: Tensor, mask: Tensor, attention_rank_weight: float) -> Tensor:
    """BCE per task plus the weighted listwise Attention Rank loss (LiGR section 3.2)."""
    loss = bce_per_task(logits, labels, mask)
    if attention_rank_weight > 0:
        loss = loss + attention_rank_weight * attention_rank_loss(logits, labels, mask)
    return loss


def next_item_softmax_loss(
    states: Tensor,
    targets: Tensor,
    item_embedding: Callable[[Tensor], Tensor],
    candidate_ids: Tensor | None = None,
) -> Tensor:
    """Softmax cross-entropy of each state's next item against a candidate set.

    states: (N, D) user states; targets: (N,) the item each should retrieve. ``candidate_ids`` is the
    set to rank against (the whole catalog for MovieLens); None means in-batch negatives: the distinct
    targets of this batch.
    """
    pool = torch.unique(targets if candidate_ids is None else candidate_ids)  # sorted
    index = torch.searchsorted(pool, targets).clamp(max=len(pool) - 1)
    if not torch.equal(pool[index], targets):
        raise ValueError("candidate_ids: every target item must be among the candidates")
    scores = states @ item_embedding(pool).T  # (N, |pool|)
    return F.cross_entropy(scores, index)


# --- Parameter groups -------------------------------------------------------------------------------


def embedding_param_groups(model: nn.Module, cfg: Any) -> list[dict[str, Any]]:
    """Embedding tables at ``cfg.lr_embedding``, everything else at ``cfg.lr_dense`` (LiGR appendix A.1).

    "Embedding table" means every ``nn.Embedding`` weight: the sparse id tables, and also the small
    categorical and position tables, which are looked up row by row just the same.
    """
    embedding_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    embeddings = [p for p in model.parameters() if id(p) in embedding_ids]
    dense = [p for p in model.parameters() if id(p) not in embedding_ids]
    return [
        {"name": "embedding", "params": embeddings, "lr": cfg.lr_embedding, "weight_decay": 0.0},
        {"name": "dense", "params": dense, "lr": cfg.lr_dense, "weight_decay": cfg.weight_decay},
    ]


# --- Model interfaces -------------------------------------------------------------------------------


class RankingModel(nn.Module):
    """A multi-task ranker over the candidates of one session; the trainer and server see only this."""

    cfg: Any
    tasks: list[str] = TASKS

    def forward(self, batch: RankingBatch) -> RankingOutput:
        raise NotImplementedError

    def score_pointwise(self, batch: RankingBatch) -> Tensor:
        """(B, S, T) logits of each candidate on its own: independent of the other candidates."""
        raise NotImplementedError

    def score_setwise(self, batch: RankingBatch, top_k_idx: Tensor) -> Tensor:
        """(B, k, T) set-wise correction for the chosen candidates ``top_k_idx`` (B, k) as one set.

        A model without a set-wise part corrects nothing: zeros.
        """
        return torch.zeros(
            (*top_k_idx.shape, len(self.tasks)), dtype=torch.float32, device=batch.cand_item_id.device
        )

    def param_groups(self, cfg: Any = None) -> list[dict[str, Any]]:
        """Optimizer parameter groups (embedding tables vs dense layers) from ``cfg`` or the model's own."""
        return embedding_param_groups(self, cfg if cfg is not None else self.cfg)


class NextItemModel(nn.Module):
    """A two-tower next-item retriever: user states from a sequence, item embeddings by id, dot product."""

    cfg: Any

    def user_embedding(self, batch: SequenceBatch) -> Tensor:
        """(B, D): the user after the last real event of each sequence."""
        raise NotImplementedError

    def item_embedding(self, item_ids: Tensor) -> Tensor:
        """(*item_ids.shape, D)."""
        raise NotImplementedError

    def loss(self, batch: SequenceBatch, candidate_ids: Tensor | None = None) -> Tensor:
        """Next-item loss over every position of every sequence (see ``next_item_softmax_loss``)."""
        raise NotImplementedError

    def param_groups(self, cfg: Any = None) -> list[dict[str, Any]]:
        return embedding_param_groups(self, cfg if cfg is not None else self.cfg)
