"""The hand-crafted counter features of a classic production ranker, defined once.

Training (preprocessing calls `counters_at` for every candidate at its session start) and serving
(Feast serves the tables `counter_snapshots` writes) share `_window_counts`, so the baseline trains
on exactly the numbers it is served. Every counter is point-in-time: it counts feed impressions with
``ts - window <= timestamp < ts``; an impression at or after ``ts`` never counts.

An impression *engages* when it carries any feed action (click, like, comment, share, long dwell).
Only feed-surface impressions are counted: job impressions have no feed actions and would only
dilute the rates. Rates are smoothed towards a prior so that a key seen twice does not claim a rate
of 0 or 1: ``rate = (engagements + RATE_PRIOR * RATE_PRIOR_WEIGHT) / (impressions + RATE_PRIOR_WEIGHT)``.
A key with no impressions therefore has counts 0 and rates ``RATE_PRIOR`` (see `empty_counters`).

Method: per key (member×actor, member×topic, item, actor, member), impressions are sorted by
``key * stride + time_rank`` and engagements prefix-summed; each window is two `np.searchsorted`
calls, so the cost is a sort plus O(log n) per query, with no per-row Python.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pandas as pd
import pyarrow as pa

from workloads.data.schema import COUNTER_FEATURES, FEED_ACTIONS, TS

DAY_US = 86_400 * 1_000_000
RATE_PRIOR = 0.1  # prior engagement rate of a feed impression
RATE_PRIOR_WEIGHT = 10.0  # how many impressions the prior is worth

KEY_COLUMNS = ["member_id", "item_id", "actor_id", "topic"]
QUERY_COLUMNS = [*KEY_COLUMNS, "ts"]
IMPRESSION_COLUMNS = [
    *KEY_COLUMNS,
    "timestamp",
    "surface",
    *[a.name.lower() for a in FEED_ACTIONS],
]


@dataclass(frozen=True)
class Counter:
    name: str
    stat: Literal["impressions", "engagements", "rate"]
    days: int


@dataclass(frozen=True)
class CounterGroup:
    """Counters that share one key; each group is one snapshot table and one Feast feature view."""

    view: str
    keys: tuple[str, ...]
    counters: tuple[Counter, ...]

    @property
    def max_days(self) -> int:
        return max(c.days for c in self.counters)


COUNTER_GROUPS: tuple[CounterGroup, ...] = (
    CounterGroup(
        "member_actor_counters",
        ("member_id", "actor_id"),
        (
            Counter("ma_imp_7d", "impressions", 7),
            Counter("ma_eng_7d", "engagements", 7),
            Counter("ma_eng_30d", "engagements", 30),
        ),
    ),
    CounterGroup(
        "member_topic_counters",
        ("member_id", "topic"),
        (
            Counter("mt_imp_7d", "impressions", 7),
            Counter("mt_eng_7d", "engagements", 7),
            Counter("mt_eng_30d", "engagements", 30),
        ),
    ),
    CounterGroup(
        "item_counters",
        ("item_id",),
        (
            Counter("item_imp_1d", "impressions", 1),
            Counter("item_eng_1d", "engagements", 1),
            Counter("item_ctr_7d", "rate", 7),
        ),
    ),
    CounterGroup("actor_counters", ("actor_id",), (Counter("actor_eng_rate_30d", "rate", 30),)),
    CounterGroup("member_counters", ("member_id",), (Counter("member_eng_rate_30d", "rate", 30),)),
)
if [c.name for g in COUNTER_GROUPS for c in g.counters] != COUNTER_FEATURES:
    raise AssertionError("COUNTER_GROUPS must define exactly schema.COUNTER_FEATURES, in order")
ALL_WINDOWS = {c.days for g in COUNTER_GROUPS for c in g.counters}


def smoothed_rate(engagements: np.ndarray, impressions: np.ndarray) -> np.ndarray:
    return (engagements + RATE_PRIOR * RATE_PRIOR_WEIGHT) / (impressions + RATE_PRIOR_WEIGHT)


def empty_counters() -> dict[str, float]:
    """The value of every counter for a key with no impressions (what serving fills in for unknown keys)."""
    zero = np.zeros(1)
    return {
        c.name: float(np.float32(smoothed_rate(zero, zero)[0] if c.stat == "rate" else 0.0))
        for g in COUNTER_GROUPS
        for c in g.counters
    }


def to_epoch_us(values: pd.Series, column: str) -> np.ndarray:
    """int64 microseconds since the epoch from a datetime column (any unit, naive = UTC) or int64 us."""
    if pd.api.types.is_datetime64_any_dtype(values):
        if getattr(values.dt, "tz", None) is None:
            values = values.dt.tz_localize("UTC")
        return values.dt.as_unit("us").astype("int64").to_numpy()
    if pd.api.types.is_integer_dtype(values):
        return values.to_numpy(dtype=np.int64)
    raise TypeError(f"column {column!r} must be a timestamp or int64 microseconds, got dtype {values.dtype}")


def _require(frame: pd.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(f"{what} is missing column(s) {missing}; expected columns {list(columns)}")


@dataclass(frozen=True)
class _FeedLog:
    """The feed impressions as plain arrays: keys, time (us), whether each engaged, and a time index."""

    keys: dict[str, np.ndarray]
    ts: np.ndarray
    engaged: np.ndarray
    sorted_ts: np.ndarray
    time_rank: np.ndarray  # rows_before(ts) of each row: equal timestamps share a rank

    def rows_before(self, ts: np.ndarray) -> np.ndarray:
        """How many log rows are strictly before each ``ts`` (searching sorted needles is cache-friendly)."""
        order = np.argsort(ts, kind="stable")
        out = np.empty(len(ts), dtype=np.int64)
        out[order] = np.searchsorted(self.sorted_ts, ts[order], side="left")
        return out


def _feed_log(impressions: pd.DataFrame) -> _FeedLog:
    _require(impressions, IMPRESSION_COLUMNS, "impressions")
    feed = (impressions["surface"] == "feed").to_numpy()
    engaged = np.zeros(len(impressions), dtype=bool)
    for action in FEED_ACTIONS:
        engaged |= impressions[action.name.lower()].to_numpy() > 0
    ts = to_epoch_us(impressions["timestamp"], "timestamp")[feed]
    sorted_ts = np.sort(ts)
    return _FeedLog(
        keys={k: impressions[k].to_numpy(dtype=np.int64)[feed] for k in KEY_COLUMNS},
        ts=ts,
        engaged=engaged[feed],
        sorted_ts=sorted_ts,
        time_rank=np.searchsorted(sorted_ts, ts, side="left"),
    )


def _joint_codes(log_keys: list[np.ndarray], query_keys: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Dense int64 codes of (possibly compound) keys, shared by the log and the queries."""
    n_log = len(log_keys[0])
    code = np.zeros(n_log + len(query_keys[0]), dtype=np.int64)
    for log_col, query_col in zip(log_keys, query_keys, strict=True):
        col_code, uniques = pd.factorize(np.concatenate([log_col, query_col]))
        code, _ = pd.factorize(code * len(uniques) + col_code)  # stays < n^2: no int64 overflow
    return code[:n_log], code[n_log:]


def _window_starts(log: _FeedLog, query_ts: np.ndarray, days: set[int]) -> dict[int, np.ndarray]:
    """``rows_before`` of each query's window start ``ts - days``; 0 days is the query time itself."""
    return {d: log.rows_before(query_ts - d * DAY_US) for d in {0, *days}}


def _window_counts(
    log: _FeedLog, keys: tuple[str, ...], query_keys: list[np.ndarray], window_starts: dict[int, np.ndarray]
) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """(impressions, engagements) of each query's key over ``[ts - days, ts)``, for each window length.

    Log rows are sorted by ``key * stride + time rank``; the number of rows before a query's
    ``key * stride + rows_before(ts)`` is every row of a smaller key plus the rows of its own key
    strictly before ``ts``, so the difference between two such positions counts a window.
    """
    log_code, query_code = _joint_codes([log.keys[k] for k in keys], query_keys)
    stride = len(log.ts) + 1  # a time rank ranges over 0..len(log)
    sort_key = log_code * stride + log.time_rank
    order = np.argsort(sort_key, kind="stable")
    sort_key = sort_key[order]
    engaged_before = np.concatenate([[0], np.cumsum(log.engaged[order], dtype=np.int64)])
    query_order = np.lexsort((window_starts[0], query_code))  # sorted needles make searchsorted fast

    def position(rows_before: np.ndarray) -> np.ndarray:
        out = np.empty(len(rows_before), dtype=np.int64)
        out[query_order] = np.searchsorted(sort_key, (query_code * stride + rows_before)[query_order])
        return out

    end = position(window_starts[0])
    out = {}
    for d, rows_before in window_starts.items():
        if d == 0:
            continue
        start = position(rows_before)
        out[d] = (end - start, engaged_before[end] - engaged_before[start])
    return out


def _group_values(
    log: _FeedLog, group: CounterGroup, query_keys: list[np.ndarray], window_starts: dict[int, np.ndarray]
) -> dict[str, np.ndarray]:
    counts = _window_counts(log, group.keys, query_keys, window_starts)
    values = {}
    for c in group.counters:
        impressions, engagements = counts[c.days]
        if c.stat == "rate":
            value = smoothed_rate(engagements, impressions)
        else:
            value = impressions if c.stat == "impressions" else engagements
        values[c.name] = value.astype(np.float32)
    return values


def counters_at(impressions: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame:
    """Every counter in `COUNTER_FEATURES` for each query row, from impressions strictly before its ``ts``.

    ``queries`` has columns member_id, item_id, actor_id, topic and ts (timestamp or int64 us); the
    result is row-aligned with it (same index), one float32 column per counter.
    """
    _require(queries, QUERY_COLUMNS, "queries")
    log = _feed_log(impressions)
    window_starts = _window_starts(log, to_epoch_us(queries["ts"], "ts"), ALL_WINDOWS)
    columns: dict[str, np.ndarray] = {}
    for group in COUNTER_GROUPS:
        query_keys = [queries[k].to_numpy(dtype=np.int64) for k in group.keys]
        columns.update(_group_values(log, group, query_keys, window_starts))
    return pd.DataFrame(columns, index=queries.index)[COUNTER_FEATURES]


def counter_snapshots(impressions: pd.DataFrame, as_of: Sequence[int]) -> dict[str, pa.Table]:
    """One table per `CounterGroup`: the group's counters for its keys at each snapshot time (int64 us).

    A snapshot holds every key that is non-zero at that time or was non-zero at the previous one, so
    a key that goes quiet gets an explicit zero row: the latest row at or before any snapshot time
    (what Feast's point-in-time join and online store return) then equals `counters_at` at that time.
    Keys never seen have no row; serving fills them with `empty_counters`.
    """
    snapshots = np.sort(np.asarray(as_of, dtype=np.int64))
    if len(snapshots) == 0:
        raise ValueError("as_of must hold at least one snapshot time")
    log = _feed_log(impressions)
    tables = {}
    for group in COUNTER_GROUPS:
        span = group.max_days * DAY_US
        key_frames = []
        for i, t in enumerate(snapshots):
            since = (snapshots[i - 1] if i else t) - span
            recent = (log.ts >= since) & (log.ts < t)
            active = pd.DataFrame({k: log.keys[k][recent] for k in group.keys}).drop_duplicates()
            key_frames.append(active.assign(event_timestamp=t))
        rows = pd.concat(key_frames, ignore_index=True)
        query_ts = rows["event_timestamp"].to_numpy(dtype=np.int64)
        window_starts = _window_starts(log, query_ts, {c.days for c in group.counters})
        values = _group_values(
            log, group, [rows[k].to_numpy(dtype=np.int64) for k in group.keys], window_starts
        )
        tables[group.view] = pa.table(
            {
                **{k: pa.array(rows[k].to_numpy(dtype=np.int64)) for k in group.keys},
                **{name: pa.array(v) for name, v in values.items()},
                "event_timestamp": pa.array(query_ts, pa.int64()).cast(TS),
            }
        )
    return tables
