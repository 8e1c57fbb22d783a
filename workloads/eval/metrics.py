"""Offline ranking metrics: AUC and normalized entropy per task, HR@K and NDCG@K for next-item retrieval.

AUC is what the LiGR paper reports for feed ranking (section 5.1; it correlates with online A/B
results); normalized entropy is the calibration-aware companion (log loss divided by the entropy of
the base rate, so 1.0 means "no better than predicting the click-through rate"). HR@K / NDCG@K are the
leave-one-out metrics of SASRec and HSTU on MovieLens.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from numpy.typing import ArrayLike
from sklearn.metrics import roc_auc_score

# History-length slices (inclusive bounds): slice "0" is member cold start.
HISTORY_SLICES: list[tuple[str, int, int]] = [
    ("0", 0, 0),
    ("1-4", 1, 4),
    ("5-16", 5, 16),
    ("17-64", 17, 64),
    ("65-256", 65, 256),
    ("257+", 257, 2**31 - 1),
]

_EPS = 1e-7


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Area under the ROC curve; NaN when only one class is present (AUC is undefined there)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.size == 0 or y.min() == y.max():
        return math.nan
    return float(roc_auc_score(y, s))


def auc_standard_error(value: float, positives: int, negatives: int) -> float:
    """Hanley & McNeil (1982) standard error of an AUC: how far apart two AUCs must be to mean anything."""
    if positives == 0 or negatives == 0 or math.isnan(value):
        return math.nan
    q1, q2 = value / (2 - value), 2 * value**2 / (1 + value)
    variance = (
        value * (1 - value) + (positives - 1) * (q1 - value**2) + (negatives - 1) * (q2 - value**2)
    ) / (positives * negatives)
    return math.sqrt(max(variance, 0.0))


def auc_within_groups(labels: ArrayLike, scores: ArrayLike, groups: ArrayLike) -> float:
    """AUC over the (positive, negative) pairs of the same group only, e.g. of the same member: how well
    the scores rank one member's candidates, blind to anything that shifts all of a member's scores
    together. Groups with one class have no pairs; NaN when no group has both.

    Per group, the Mann-Whitney count from within-group ranks (ties count half); the result is the
    total count over the total number of pairs, i.e. groups weigh by their pairs.
    """
    frame = pd.DataFrame(
        {"y": np.asarray(labels, dtype=np.float64).ravel(), "s": np.asarray(scores, dtype=np.float64).ravel()}
    )
    frame["g"] = np.asarray(groups).ravel()
    frame["rank"] = frame.groupby("g")["s"].rank(method="average")
    per = (
        frame.assign(pos_rank=frame["rank"] * frame["y"])
        .groupby("g")
        .agg(pos=("y", "sum"), n=("y", "size"), pos_rank=("pos_rank", "sum"))
    )
    pairs = per["pos"] * (per["n"] - per["pos"])
    if pairs.sum() == 0:
        return math.nan
    wins = per["pos_rank"] - per["pos"] * (per["pos"] + 1) / 2
    return float(wins[pairs > 0].sum() / pairs.sum())


def paired_auc_difference(
    labels: ArrayLike,
    scores: ArrayLike,
    reference_scores: ArrayLike,
    groups: ArrayLike,
    resamples: int = 1000,
    seed: int = 0,
    within_groups: bool = False,
) -> dict[str, float]:
    """AUC(scores) - AUC(reference_scores) on the same candidates, with a 95% interval from resampling
    whole groups (sessions) with replacement: candidates of one session share a member and a moment,
    so they are not independent draws. Both models see the same resamples, which is what makes a
    difference far smaller than either AUC's own standard error measurable. ``p_not_better`` is the
    share of resamples where the first model does not beat the reference. ``within_groups``: compare
    `auc_within_groups` instead (a group drawn twice counts as two groups)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    a = np.asarray(scores, dtype=np.float64).ravel()
    b = np.asarray(reference_scores, dtype=np.float64).ravel()
    g = np.asarray(groups).ravel()
    if within_groups:
        difference = auc_within_groups(y, a, g) - auc_within_groups(y, b, g)
    else:
        difference = auc(y, a) - auc(y, b)
    if math.isnan(difference):
        return {"difference": math.nan, "ci95_low": math.nan, "ci95_high": math.nan, "p_not_better": math.nan}
    order = np.argsort(g, kind="stable")
    _, starts, lengths = np.unique(g[order], return_index=True, return_counts=True)
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(resamples):
        chosen = rng.integers(0, len(starts), len(starts))
        # candidate positions of the chosen groups, concatenated: each group's start plus 0..length-1
        n = lengths[chosen]
        offsets = np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        pick = order[np.repeat(starts[chosen], n) + offsets]
        if within_groups:
            drawn = np.repeat(np.arange(len(chosen)), n)
            draws.append(
                auc_within_groups(y[pick], a[pick], drawn) - auc_within_groups(y[pick], b[pick], drawn)
            )
        else:
            draws.append(auc(y[pick], a[pick]) - auc(y[pick], b[pick]))
    finite = np.asarray([d for d in draws if not math.isnan(d)])
    if not finite.size:  # no resample had both classes (within groups: no group with both)
        return {
            "difference": float(difference),
            "ci95_low": math.nan,
            "ci95_high": math.nan,
            "p_not_better": math.nan,
        }
    low, high = np.percentile(finite, [2.5, 97.5])
    return {
        "difference": float(difference),
        "ci95_low": float(low),
        "ci95_high": float(high),
        "p_not_better": float(np.mean(finite <= 0)),
    }


def log_loss(labels: ArrayLike, probs: ArrayLike) -> float:
    """Mean binary cross-entropy of probabilities (clipped so a confident miss costs log(1/eps), not inf)."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    p = np.clip(np.asarray(probs, dtype=np.float64).ravel(), _EPS, 1 - _EPS)
    if y.size == 0:
        return math.nan
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def normalized_entropy(labels: ArrayLike, probs: ArrayLike) -> float:
    """Log loss divided by the entropy of the base rate; NaN when the base rate is 0 or 1."""
    y = np.asarray(labels, dtype=np.float64).ravel()
    if y.size == 0:
        return math.nan
    base = float(y.mean())
    if base <= 0.0 or base >= 1.0:
        return math.nan
    base_entropy = -(base * math.log(base) + (1 - base) * math.log(1 - base))
    return log_loss(y, probs) / base_entropy


def history_slice(history_len: int) -> str:
    """Name of the HISTORY_SLICES bucket a history length falls in."""
    for name, low, high in HISTORY_SLICES:
        if low <= history_len <= high:
            return name
    raise ValueError(f"history_len must be >= 0, got {history_len}")


def target_ranks(scores: np.ndarray, target: np.ndarray, exclude: np.ndarray | None = None) -> np.ndarray:
    """0-based rank of each row's target item among all items (full ranking, ties counted against it).

    scores: (N, I) one score per item; target: (N,) item index; exclude: (N, I) bool, items removed
    from the ranking (e.g. those already in the member's history; the target itself is never removed).
    """
    rows = np.arange(scores.shape[0])
    target_score = scores[rows, target][:, None]
    beats = scores >= target_score
    beats[rows, target] = False
    if exclude is not None:
        beats &= ~exclude
    return beats.sum(axis=1)


def seen_items(catalog: np.ndarray, item_ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """(N, len(catalog)) bool: which catalog items (sorted ids) each row's sequence already holds."""
    rows, cols = np.nonzero(mask)
    ids = item_ids[rows, cols]
    pos = np.searchsorted(catalog, ids).clip(max=max(len(catalog) - 1, 0))
    known = catalog[pos] == ids if len(catalog) else np.zeros(len(ids), dtype=bool)
    seen = np.zeros((item_ids.shape[0], len(catalog)), dtype=bool)
    seen[rows[known], pos[known]] = True
    return seen


def hit_rate_at_k(ranks: ArrayLike, k: int) -> float:
    """Share of rows whose target is in the top k."""
    r = np.asarray(ranks)
    return float(np.mean(r < k)) if r.size else math.nan


def ndcg_at_k(ranks: ArrayLike, k: int) -> float:
    """NDCG@k with one relevant item per row: 1/log2(rank + 2) when it is in the top k, else 0."""
    r = np.asarray(ranks, dtype=np.float64)
    if r.size == 0:
        return math.nan
    gains = np.where(r < k, 1.0 / np.log2(r + 2.0), 0.0)
    return float(gains.mean())
