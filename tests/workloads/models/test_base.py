from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from workloads.data.counters import RATE_PRIOR
from workloads.models.base import (
    attention_rank_loss,
    bce_per_task,
    counter_inputs,
    next_item_softmax_loss,
    ranking_loss,
)


def test_attention_rank_loss_is_cross_entropy_against_the_label_distribution() -> None:
    logits = torch.tensor([[[0.0], [0.0], [2.0]]])  # one session, three candidates, one task
    labels = torch.tensor([[[1.0], [0.0], [1.0]]])
    mask = torch.ones(1, 3, dtype=torch.bool)
    log_p = torch.log_softmax(torch.tensor([0.0, 0.0, 2.0]), dim=0)
    expected = -(0.5 * log_p[0] + 0.5 * log_p[2])  # psi(1) = e for both positives: uniform over them
    torch.testing.assert_close(attention_rank_loss(logits, labels, mask), expected)


def test_attention_rank_loss_skips_sessions_without_positives_and_ignores_padding() -> None:
    logits = torch.tensor([[[1.0], [0.0], [50.0]], [[3.0], [-1.0], [0.0]]])
    labels = torch.tensor([[[1.0], [0.0], [1.0]], [[0.0], [0.0], [0.0]]])
    mask = torch.tensor([[True, True, False], [True, True, True]])  # the 50 and its label are padding
    expected = -torch.log_softmax(torch.tensor([1.0, 0.0]), dim=0)[0]
    torch.testing.assert_close(attention_rank_loss(logits, labels, mask), expected)
    # a batch with no positives at all gives zero but keeps the graph for backward
    zero = attention_rank_loss(logits.requires_grad_(), torch.zeros_like(labels), mask)
    zero.backward()
    assert zero.item() == 0.0 and logits.grad is not None


def test_attention_rank_loss_is_finite_for_a_session_with_no_real_candidate() -> None:
    logits = torch.randn(2, 3, 1, requires_grad=True)
    labels = torch.ones(2, 3, 1)
    mask = torch.tensor([[True, True, False], [False, False, False]])
    loss = attention_rank_loss(logits, labels, mask)
    loss.backward()
    assert torch.isfinite(loss) and logits.grad is not None and torch.isfinite(logits.grad).all()


def test_bce_per_task_averages_real_positions_and_sums_tasks() -> None:
    logits = torch.tensor([[[0.5, -1.0], [2.0, 0.0], [9.0, 9.0]]])
    labels = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [0.0, 0.0]]])
    mask = torch.tensor([[True, True, False]])
    per_task = [F.binary_cross_entropy_with_logits(logits[0, :2, t], labels[0, :2, t]) for t in range(2)]
    torch.testing.assert_close(bce_per_task(logits, labels, mask), per_task[0] + per_task[1])
    torch.testing.assert_close(
        ranking_loss(logits, labels, mask, 0.5),
        per_task[0] + per_task[1] + 0.5 * attention_rank_loss(logits, labels, mask),
    )


def test_next_item_loss_ranks_the_target_among_the_candidates() -> None:
    table = torch.nn.Embedding(10, 4)
    states = torch.randn(3, 4)
    targets = torch.tensor([7, 2, 7])
    loss = next_item_softmax_loss(states, targets, table, candidate_ids=torch.tensor([9, 2, 7, 0]))
    pool = torch.tensor([0, 2, 7, 9])
    expected = F.cross_entropy(states @ table(pool).T, torch.tensor([2, 1, 2]))
    torch.testing.assert_close(loss, expected)
    in_batch = next_item_softmax_loss(states, targets, table)  # negatives: the other targets
    torch.testing.assert_close(
        in_batch, F.cross_entropy(states @ table(torch.tensor([2, 7])).T, torch.tensor([1, 0, 1]))
    )
    with pytest.raises(ValueError, match="candidate_ids"):
        next_item_softmax_loss(states, targets, table, candidate_ids=torch.tensor([2, 3]))
    assert math.isfinite(loss.item())


def test_log_odds_reads_rates_relative_to_the_prior_and_counts_as_log1p() -> None:
    names = ["item_imp_1d", "item_ctr_7d", "actor_eng_rate_30d", "ma_eng_7d"]
    counters = torch.tensor([[3.0, RATE_PRIOR, 0.5, -1.0]])  # a negative count is a missing value: 0
    read = counter_inputs(counters, names, "log_odds")
    odds = 0.5 / 0.5 / (RATE_PRIOR / (1 - RATE_PRIOR))
    assert torch.allclose(read, torch.tensor([[math.log(4.0), 0.0, math.log(odds), 0.0]]))
    assert torch.allclose(counter_inputs(counters, names, "log1p"), torch.log1p(counters.clamp(min=0.0)))
    # the point of log-odds: item_ctr_7d from p10 (0.06) to p90 (0.19) spans ~10x more than under log1p
    spread = counter_inputs(torch.tensor([[0.06, 0.19]]), ["item_ctr_7d"] * 2, "log_odds").diff()
    assert spread.item() > 10 * torch.log1p(torch.tensor([0.06, 0.19])).diff().item()
