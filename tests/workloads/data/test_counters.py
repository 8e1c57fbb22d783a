"""Counter features: point-in-time correctness, agreement with a naive reference, snapshot semantics."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from workloads.data.counters import (
    COUNTER_GROUPS,
    DAY_US,
    RATE_PRIOR,
    RATE_PRIOR_WEIGHT,
    counter_snapshots,
    counters_at,
    empty_counters,
)
from workloads.data.schema import ACTION_COLUMNS, COUNTER_FEATURES, FEED_ACTIONS

T0 = 1_700_000_000_000_000  # us


def impressions_frame(rows: list[dict]) -> pd.DataFrame:
    """An impression log with the columns counters read; unspecified actions are 0, surface feed."""
    frame = pd.DataFrame(rows)
    for column in ACTION_COLUMNS:
        frame[column] = frame.get(column, pd.Series(0, index=frame.index)).fillna(0).astype("int8")
    frame["surface"] = frame.get("surface", pd.Series("feed", index=frame.index)).fillna("feed")
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], unit="us", utc=True)
    return frame


def query(member: int, item: int, actor: int, topic: int, ts: int) -> pd.DataFrame:
    return pd.DataFrame(
        {"member_id": [member], "item_id": [item], "actor_id": [actor], "topic": [topic], "ts": [ts]}
    )


def rate(eng: float, imp: float) -> float:
    return float(np.float32((eng + RATE_PRIOR * RATE_PRIOR_WEIGHT) / (imp + RATE_PRIOR_WEIGHT)))


def test_hand_computed_example_is_point_in_time() -> None:
    ts = T0 + 40 * DAY_US
    log = impressions_frame(
        [
            # member 1, actor 10, topic 3, item 100
            {"member_id": 1, "item_id": 100, "actor_id": 10, "topic": 3, "timestamp": ts - 1, "click": 1},
            {"member_id": 1, "item_id": 101, "actor_id": 10, "topic": 3, "timestamp": ts - 2 * DAY_US},
            {
                "member_id": 1,
                "item_id": 102,
                "actor_id": 10,
                "topic": 4,
                "timestamp": ts - 7 * DAY_US,
                "like": 1,
            },
            {
                "member_id": 1,
                "item_id": 103,
                "actor_id": 10,
                "topic": 3,
                "timestamp": ts - 8 * DAY_US,
                "share": 1,
            },
            {
                "member_id": 1,
                "item_id": 104,
                "actor_id": 10,
                "topic": 3,
                "timestamp": ts - 31 * DAY_US,
                "click": 1,
            },
            # exactly at ts and after: must never count
            {"member_id": 1, "item_id": 100, "actor_id": 10, "topic": 3, "timestamp": ts, "click": 1},
            {"member_id": 1, "item_id": 100, "actor_id": 10, "topic": 3, "timestamp": ts + 5, "click": 1},
            # another member on item 100 and actor 10 (item and actor counters, not member ones)
            {"member_id": 2, "item_id": 100, "actor_id": 10, "topic": 3, "timestamp": ts - 3, "comment": 1},
            {
                "member_id": 2,
                "item_id": 100,
                "actor_id": 10,
                "topic": 3,
                "timestamp": ts - DAY_US - 1,
                "click": 1,
            },
            # a job impression is not a feed impression
            {
                "member_id": 1,
                "item_id": 100,
                "actor_id": 10,
                "topic": 3,
                "timestamp": ts - 4,
                "surface": "jobs",
            },
        ]
    )
    got = counters_at(log, query(1, 100, 10, 3, ts)).iloc[0]
    expected = {
        "ma_imp_7d": 3,  # ts-1, ts-2d, ts-7d (window start is inclusive)
        "ma_eng_7d": 2,  # click at ts-1, like at ts-7d
        "ma_eng_30d": 3,  # + share at ts-8d; ts-31d is outside
        "mt_imp_7d": 2,  # topic 3: ts-1, ts-2d
        "mt_eng_7d": 1,
        "mt_eng_30d": 2,  # + share at ts-8d
        "item_imp_1d": 2,  # member 1 at ts-1, member 2 at ts-3; ts-1d-1 is outside
        "item_eng_1d": 2,
        "item_ctr_7d": rate(3, 3),
        "actor_eng_rate_30d": rate(5, 6),
        "member_eng_rate_30d": rate(3, 4),
    }
    assert got.to_dict() == pytest.approx(expected)
    assert list(got.index) == COUNTER_FEATURES


def test_counters_ignore_impressions_at_or_after_ts() -> None:
    ts = T0 + 10 * DAY_US
    log = impressions_frame(
        [{"member_id": 1, "item_id": 5, "actor_id": 6, "topic": 7, "timestamp": ts, "click": 1}]
    )
    assert counters_at(log, query(1, 5, 6, 7, ts)).iloc[0].to_dict() == pytest.approx(empty_counters())
    later = counters_at(log, query(1, 5, 6, 7, ts + 1)).iloc[0]
    assert later["ma_imp_7d"] == 1 and later["item_eng_1d"] == 1


def random_log(rng: np.random.Generator, n: int) -> pd.DataFrame:
    frame = pd.DataFrame(
        {
            "member_id": rng.integers(0, 6, n),
            "item_id": rng.integers(0, 15, n),
            "actor_id": rng.integers(0, 5, n),
            "topic": rng.integers(0, 4, n).astype("int16"),
            # whole hours so that many impressions share a timestamp and windows end exactly on events
            "timestamp": T0 + rng.integers(0, 45 * 24, n) * 3_600_000_000,
            "surface": rng.choice(["feed", "feed", "feed", "jobs"], n),
        }
    )
    for column in ACTION_COLUMNS:
        frame[column] = (rng.random(n) < 0.15).astype("int8")
    frame["timestamp"] = pd.to_datetime(frame["timestamp"], unit="us", utc=True)
    return frame


def naive_counters(log: pd.DataFrame, queries: pd.DataFrame) -> pd.DataFrame:
    """One query at a time with boolean masks: slow and obviously right."""
    t = log["timestamp"].dt.as_unit("us").astype("int64").to_numpy()
    feed = (log["surface"] == "feed").to_numpy()
    engaged = (log[[a.name.lower() for a in FEED_ACTIONS]].sum(axis=1) > 0).to_numpy()
    keys = {k: log[k].to_numpy() for k in ("member_id", "item_id", "actor_id", "topic")}
    rows = []
    for _, q in queries.iterrows():
        ts, out = int(q["ts"]), {}
        for group in COUNTER_GROUPS:
            same_key = np.logical_and.reduce([keys[k] == q[k] for k in group.keys])
            for c in group.counters:
                in_window = feed & same_key & (t >= ts - c.days * DAY_US) & (t < ts)
                imp, eng = int(in_window.sum()), int((in_window & engaged).sum())
                out[c.name] = {"impressions": imp, "engagements": eng}.get(c.stat, rate(eng, imp))
        rows.append(out)
    return pd.DataFrame(rows, index=queries.index)


def test_counters_match_naive_reference_on_random_log() -> None:
    rng = np.random.default_rng(0)
    log = random_log(rng, 3000)
    n = 300
    queries = pd.DataFrame(
        {
            "member_id": rng.integers(0, 7, n),  # 6 is never in the log
            "item_id": rng.integers(0, 15, n),
            "actor_id": rng.integers(0, 5, n),
            "topic": rng.integers(0, 4, n),
            "ts": T0 + rng.integers(0, 50 * 24, n) * 3_600_000_000,
        },
        index=pd.RangeIndex(1000, 1000 + n),  # results keep the queries' index
    )
    got = counters_at(log, queries)
    assert got.index.equals(queries.index)
    assert (got.dtypes == np.float32).all()
    expected = naive_counters(log, queries)
    pd.testing.assert_frame_equal(got, expected[COUNTER_FEATURES].astype(np.float32))
    assert got["ma_imp_7d"].sum() > 0 and got["ma_eng_30d"].sum() > 0  # the comparison is not all zeros


def test_snapshots_latest_row_equals_counters_at() -> None:
    rng = np.random.default_rng(1)
    log = random_log(rng, 2000)
    as_of = [T0 + d * DAY_US for d in range(0, 90, 3)]  # the log ends at day 45: every key goes quiet
    tables = counter_snapshots(log, as_of)
    assert set(tables) == {g.view for g in COUNTER_GROUPS}
    assert str(tables["item_counters"].schema.field("event_timestamp").type) == "timestamp[us, tz=UTC]"
    for group in COUNTER_GROUPS:
        snap = tables[group.view].to_pandas()
        snap["event_timestamp"] = snap["event_timestamp"].dt.as_unit("us").astype("int64")
        for t in (as_of[5], as_of[-1]):
            # what a point-in-time join at t returns: each key's latest row at or before t
            latest = (
                snap[snap["event_timestamp"] <= t]
                .sort_values("event_timestamp")
                .groupby(list(group.keys))
                .last()
            )
            keys = latest.reset_index()[list(group.keys)]
            full = pd.DataFrame(
                {"member_id": 0, "item_id": 0, "actor_id": 0, "topic": 0, "ts": t}, index=keys.index
            )
            full[list(group.keys)] = keys
            names = [c.name for c in group.counters]
            expected = counters_at(log, full)[names]
            np.testing.assert_array_equal(latest[names].to_numpy(), expected.to_numpy())
        # every key went quiet: its latest row is an explicit empty one, no stale count survives
        empty = empty_counters()
        assert len(latest) > 0
        assert all((latest[name] == np.float32(empty[name])).all() for name in names)


def test_bad_input_names_the_column() -> None:
    log = impressions_frame([{"member_id": 1, "item_id": 5, "actor_id": 6, "topic": 7, "timestamp": T0}])
    with pytest.raises(ValueError, match=r"queries is missing column\(s\) \['topic'\]"):
        counters_at(log, query(1, 5, 6, 7, T0).drop(columns="topic"))
    with pytest.raises(ValueError, match=r"impressions is missing column\(s\) \['surface'\]"):
        counters_at(log.drop(columns="surface"), query(1, 5, 6, 7, T0))
    with pytest.raises(TypeError, match="column 'ts' must be a timestamp"):
        counters_at(log, query(1, 5, 6, 7, T0).astype({"ts": "float64"}))
    with pytest.raises(ValueError, match="as_of"):
        counter_snapshots(log, [])
