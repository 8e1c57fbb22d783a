"""How scores become a ranking: the weighted ranking score and LiGR's split scoring (section 4.0.2).

Pure numpy, shared by the scorer (which picks the pointwise top k), the ingress (which combines) and
the tests (which recompute both offline). The ranking score of an item is ``sum_t w_t * p_t``: the
task weights (``GraphArgs.task_weights``) times its per-task probabilities. Split scoring:

1. every candidate gets pointwise logits; sort by the pointwise ranking score;
2. the top k (10 in the paper) are scored again as one set, and the set-wise logits are *added* to their
   pointwise logits (score combination);
3. the top k are re-sorted among themselves by the final score; items k+1..end keep their pointwise
   order. The top k still fill the first k slots, so the set-wise part reorders within them and never
   promotes an item from further down (the paper's "preserving the order for items 11-end").
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from workloads.data.schema import TASKS


def task_weight_vector(weights: dict[str, float]) -> np.ndarray:
    """(T,) float64 weights in TASKS order; a task missing from ``weights`` weighs 0."""
    return np.array([weights.get(task, 0.0) for task in TASKS], dtype=np.float64)


def sigmoid(logits: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-logits.astype(np.float64)))


def ranking_score(logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(...,) ranking scores of (..., T) logits: weighted sum of the per-task probabilities."""
    return sigmoid(logits) @ weights


def pointwise_order(logits: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """(S,) candidate indexes by descending pointwise ranking score; ties keep the request's order."""
    return np.argsort(-ranking_score(logits, weights), kind="stable")


@dataclass
class Ranking:
    order: np.ndarray  # (S,) candidate indexes, best first
    final_logits: np.ndarray  # (S, T) pointwise logits plus the set-wise correction where applied
    setwise: np.ndarray  # (S,) bool, True for the candidates set-wise scoring re-scored


def split_rerank(
    pointwise_logits: np.ndarray,
    order: np.ndarray,
    weights: np.ndarray,
    top_idx: np.ndarray | None = None,
    correction: np.ndarray | None = None,
) -> Ranking:
    """Add the set-wise ``correction`` (k, T) to the candidates ``top_idx`` (k,), reorder those k.

    ``top_idx`` must be the first k entries of ``order``; without a correction the ranking is the
    pointwise one.
    """
    final = pointwise_logits.astype(np.float32, copy=True)
    touched = np.zeros(len(order), dtype=bool)
    if top_idx is None or correction is None or len(top_idx) == 0:
        return Ranking(order=order, final_logits=final, setwise=touched)
    k = len(top_idx)
    if not np.array_equal(order[:k], top_idx):
        raise ValueError("top_idx: expected the first k candidates of the pointwise order")
    if correction.shape != (k, pointwise_logits.shape[1]):
        raise ValueError(
            f"correction: expected shape {(k, pointwise_logits.shape[1])}, got {correction.shape}"
        )
    final[top_idx] += correction
    touched[top_idx] = True
    reordered = top_idx[np.argsort(-ranking_score(final[top_idx], weights), kind="stable")]
    return Ranking(order=np.concatenate([reordered, order[k:]]), final_logits=final, setwise=touched)
