"""Split scoring arithmetic (LiGR 4.0.2): the top k re-sorted by final score, items k+1.. untouched."""

from __future__ import annotations

import numpy as np
import pytest

from workloads.data.schema import TASKS
from workloads.serve.ranking import pointwise_order, ranking_score, sigmoid, split_rerank, task_weight_vector


def test_ranking_score_is_the_weighted_sum_of_probabilities() -> None:
    weights = task_weight_vector({"click": 1.0, "long_dwell": 0.5})  # contribution missing: weight 0
    assert weights.tolist() == [{"click": 1.0, "long_dwell": 0.5}.get(task, 0.0) for task in TASKS]
    logit_of = {"click": 0.0, "contribution": 3.0, "long_dwell": np.log(3.0)}  # p = 0.5, 0.95, 0.75
    logits = np.array([[logit_of[task] for task in TASKS]])
    assert ranking_score(logits, weights)[0] == pytest.approx(1.0 * 0.5 + 0.5 * 0.75)


def test_pointwise_order_is_descending_and_stable_on_ties() -> None:
    weights = np.ones(len(TASKS))
    logits = np.array([[0.0] * len(TASKS), [1.0] * len(TASKS), [0.0] * len(TASKS), [2.0] * len(TASKS)])
    assert pointwise_order(logits, weights).tolist() == [3, 1, 0, 2]


def test_split_rerank_reorders_only_the_top_k_and_adds_the_correction() -> None:
    rng = np.random.default_rng(0)
    weights = np.array([1.0, 2.0, 1.0])
    logits = rng.normal(size=(30, 3)).astype(np.float32)
    order = pointwise_order(logits, weights)
    top = order[:10]
    correction = rng.normal(scale=2.0, size=(10, 3)).astype(np.float32)
    ranking = split_rerank(logits, order, weights, top, correction)

    assert set(ranking.order[:10].tolist()) == set(top.tolist())  # nothing from below is promoted
    np.testing.assert_array_equal(ranking.order[10:], order[10:])  # 11..end keep the pointwise order
    final = ranking_score(ranking.final_logits, weights)
    assert np.all(np.diff(final[ranking.order[:10]]) <= 0)  # the top k follow their final scores
    np.testing.assert_allclose(ranking.final_logits[top], logits[top] + correction)
    np.testing.assert_array_equal(ranking.final_logits[order[10:]], logits[order[10:]])
    assert ranking.setwise.sum() == 10 and ranking.setwise[top].all()
    assert not np.array_equal(ranking.order[:10], top)  # this correction does reorder (seeded)


def test_without_a_correction_the_ranking_is_pointwise() -> None:
    logits = np.array([[0.1, 0.2, 0.3], [1.0, 1.0, 1.0]], dtype=np.float32)
    order = pointwise_order(logits, np.ones(3))
    ranking = split_rerank(logits, order, np.ones(3))
    assert ranking.order.tolist() == [1, 0] and not ranking.setwise.any()
    np.testing.assert_array_equal(ranking.final_logits, logits)


def test_split_rerank_rejects_a_top_k_that_is_not_the_pointwise_head() -> None:
    logits = np.zeros((4, 3), dtype=np.float32)
    order = np.array([0, 1, 2, 3])
    with pytest.raises(ValueError, match="top_idx"):
        split_rerank(logits, order, np.ones(3), np.array([1, 0]), np.zeros((2, 3), np.float32))
    with pytest.raises(ValueError, match="correction"):
        split_rerank(logits, order, np.ones(3), np.array([0, 1]), np.zeros((3, 3), np.float32))


def test_sigmoid_matches_the_definition() -> None:
    x = np.array([-2.0, 0.0, 5.0])
    np.testing.assert_allclose(sigmoid(x), 1 / (1 + np.exp(-x)))
