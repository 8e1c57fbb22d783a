"""The offline metrics against values worked out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from workloads.eval.metrics import (
    auc,
    auc_standard_error,
    auc_within_groups,
    history_slice,
    hit_rate_at_k,
    log_loss,
    ndcg_at_k,
    normalized_entropy,
    paired_auc_difference,
    seen_items,
    target_ranks,
)


def test_auc_counts_correctly_ordered_pairs() -> None:
    # positives 0.35, 0.8 vs negatives 0.1, 0.4: 3 of the 4 pairs are ordered right
    assert auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)
    assert auc([0, 1], [0.9, 0.1]) == pytest.approx(0.0)
    assert math.isnan(auc([1, 1, 1], [0.2, 0.5, 0.9]))  # one class: undefined, not 0.5


def test_normalized_entropy_is_one_for_the_base_rate() -> None:
    labels = [1, 0, 0, 0]
    assert normalized_entropy(labels, [0.25] * 4) == pytest.approx(1.0)
    # log loss of a coin flip, ln 2, over the base-rate entropy -(.25 ln .25 + .75 ln .75)
    base = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert normalized_entropy(labels, [0.5] * 4) == pytest.approx(math.log(2) / base)
    assert normalized_entropy(labels, [0.9, 0.1, 0.1, 0.1]) < 1.0  # better than the base rate
    assert math.isnan(normalized_entropy([0, 0], [0.1, 0.2]))


def test_log_loss_survives_confident_misses() -> None:
    assert math.isfinite(log_loss([1, 0], [0.0, 1.0]))
    assert log_loss([1], [0.5]) == pytest.approx(math.log(2))


def test_hit_rate_and_ndcg() -> None:
    ranks = [0, 3, 12]
    assert hit_rate_at_k(ranks, 10) == pytest.approx(2 / 3)
    assert hit_rate_at_k(ranks, 1) == pytest.approx(1 / 3)
    assert ndcg_at_k(ranks, 10) == pytest.approx((1.0 + 1.0 / math.log2(5)) / 3)
    assert ndcg_at_k([0], 10) == 1.0


def test_target_ranks_full_ranking_with_exclusions_and_ties() -> None:
    scores = np.array([[0.1, 0.9, 0.5, 0.7]])
    assert target_ranks(scores, np.array([2])).tolist() == [2]  # 0.9 and 0.7 beat 0.5
    exclude = np.array([[False, True, False, False]])  # item 1 was already seen
    assert target_ranks(scores, np.array([2]), exclude).tolist() == [1]
    assert target_ranks(np.array([[0.5, 0.5]]), np.array([0])).tolist() == [1]  # a tie counts against


def test_seen_items_per_row() -> None:
    catalog = np.array([3, 5, 9])
    item_ids = np.array([[5, 7, 0], [9, 3, 3]])
    mask = np.array([[True, True, False], [True, True, False]])
    assert seen_items(catalog, item_ids, mask).tolist() == [[False, True, False], [True, False, True]]


@pytest.mark.parametrize(
    ("length", "name"), [(0, "0"), (1, "1-4"), (4, "1-4"), (5, "5-16"), (256, "65-256"), (900, "257+")]
)
def test_history_slices(length: int, name: str) -> None:
    assert history_slice(length) == name


def test_auc_standard_error_shrinks_with_data() -> None:
    # A = 0.8, Q1 = A / (2 - A) = 2/3, Q2 = 2 A^2 / (1 + A) = 0.7111, 50 positives and 50 negatives:
    # (0.16 + 49 (Q1 - 0.64) + 49 (Q2 - 0.64)) / 2500 = 0.0019804 -> SE 0.0445
    assert auc_standard_error(0.8, 50, 50) == pytest.approx(0.0445, abs=1e-4)
    assert auc_standard_error(0.8, 500, 500) < auc_standard_error(0.8, 50, 50)
    assert math.isnan(auc_standard_error(0.8, 0, 10))


def test_a_model_against_itself_differs_by_nothing() -> None:
    rng = np.random.default_rng(0)
    y, s = rng.random(400) < 0.3, rng.random(400)
    got = paired_auc_difference(y, s, s, np.arange(400) // 4, resamples=50)
    assert got == {"difference": 0.0, "ci95_low": 0.0, "ci95_high": 0.0, "p_not_better": 1.0}


def test_a_clearly_better_model_has_an_interval_above_zero() -> None:
    rng = np.random.default_rng(1)
    signal = rng.normal(size=4000)
    y = rng.random(4000) < 1 / (1 + np.exp(-2 * signal))
    better, worse = signal + rng.normal(0, 0.5, 4000), signal + rng.normal(0, 2.0, 4000)
    got = paired_auc_difference(y, better, worse, np.arange(4000) // 8, resamples=200)
    assert 0 < got["ci95_low"] < got["difference"] < got["ci95_high"]
    assert got["p_not_better"] == 0.0
    flipped = paired_auc_difference(y, worse, better, np.arange(4000) // 8, resamples=200)
    assert flipped["difference"] == pytest.approx(-got["difference"]) and flipped["p_not_better"] == 1.0


def test_whole_sessions_are_resampled_not_single_candidates() -> None:
    """Copying every candidate 5 times inside its own session adds no information: same interval."""
    rng = np.random.default_rng(2)
    y, a, b = rng.random(600) < 0.4, rng.random(600), rng.random(600)
    a = a + 0.3 * y
    single = paired_auc_difference(y, a, b, np.arange(600), resamples=100)
    copies = paired_auc_difference(
        np.repeat(y, 5), np.repeat(a, 5), np.repeat(b, 5), np.repeat(np.arange(600), 5), resamples=100
    )
    assert copies == pytest.approx(single)


def test_auc_within_groups_counts_only_pairs_of_the_same_group() -> None:
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(40), 5)
    y, s = rng.random(200) < 0.4, rng.normal(size=200)
    s = s + y
    wins = pairs = 0.0
    for g in range(40):  # brute force over (positive, negative) pairs of one group
        pos, neg = s[(groups == g) & y], s[(groups == g) & ~y]
        wins += (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
        pairs += len(pos) * len(neg)
    assert auc_within_groups(y, s, groups) == pytest.approx(wins / pairs)
    # a shift shared by all of a group's scores changes the AUC over everything, not the one within groups
    shifted = s + 10 * rng.normal(size=40)[groups]
    assert auc_within_groups(y, shifted, groups) == pytest.approx(wins / pairs)
    assert abs(auc(y, shifted) - wins / pairs) > 0.1
    assert math.isnan(auc_within_groups([1, 0], [0.3, 0.2], [0, 1]))  # no group holds both classes


def test_the_within_group_interval_sees_what_the_overall_one_misses() -> None:
    """A model ranking each member's candidates well, under member-wide offsets, against a weak reference."""
    rng = np.random.default_rng(4)
    groups = np.repeat(np.arange(300), 2)
    y = np.tile([True, False], 300)
    ranks_well = y + 0.5 * rng.normal(size=600) + 5 * rng.normal(size=300)[groups]
    weak = y * 0.2 + rng.normal(size=600)
    within = paired_auc_difference(y, ranks_well, weak, groups, resamples=200, within_groups=True)
    overall = paired_auc_difference(y, ranks_well, weak, groups, resamples=200)
    assert within["ci95_low"] > 0.1 and within["p_not_better"] == 0.0
    assert overall["ci95_low"] < 0 < overall["ci95_high"]
