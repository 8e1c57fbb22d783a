"""The synthetic world: table contracts, determinism, atomic writes, and every planted effect in the data.

The effect tests read only the written tables (never the hidden taste vectors), the way a model
would: if a refactor of the generator loses an effect, the log stops showing it and a test fails.
Worlds of 400 members (~37k impressions) give every comparison here a margin of several standard
errors; each is generated once per module and shared.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from workloads.data import synth
from workloads.data.schema import (
    FEED_ACTIONS,
    JOB_ACTIONS,
    WORLD_TABLES,
    Action,
    PostType,
)
from workloads.data.synth import WorldConfig, generate

MEMBERS = 400
SEED = 3
FEED = [a.name.lower() for a in FEED_ACTIONS]
JOBS = [a.name.lower() for a in JOB_ACTIONS]
EXPOSURE = ["impression_id", "member_id", "item_id", "session_id", "position", "timestamp", "surface"]
EFFECT_KNOBS = [
    "actor_affinity",
    "topic_affinity",
    "post_type_preference",
    "member_style",
    "item_age_decay",
    "position_bias",
    "setwise_effect",
    "drift",
    "job_fit",
]


def read_world(path: Path) -> dict[str, pd.DataFrame]:
    return {name: pq.read_table(path / f"{name}.parquet").to_pandas() for name in WORLD_TABLES}


def feed_log(world: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Feed impressions with any-engagement and the previous slot's actor/topic (rows in session order)."""
    feed = world["impressions"].query("surface == 'feed'").sort_values(["session_id", "position"]).copy()
    feed["engaged"] = feed[FEED].max(axis=1)
    previous = feed.shift(1)
    same_session = previous["session_id"] == feed["session_id"]
    feed["after_same_actor"] = same_session & (previous["actor_id"] == feed["actor_id"])
    feed["after_same_topic"] = same_session & (previous["topic"] == feed["topic"])
    follows = world["follows"]
    followed = pd.MultiIndex.from_frame(follows[["member_id", "actor_id"]])
    feed["followed"] = pd.MultiIndex.from_frame(feed[["member_id", "actor_id"]]).isin(followed)
    return feed


def job_log(world: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """Job impressions with the member's share of required skills and location match."""
    jobs = world["impressions"].query("surface == 'jobs'")
    items = world["items"][["item_id", "required_skills", "location", "seniority"]]
    members = world["members"][["member_id", "skills", "location", "seniority"]]
    jobs = jobs.merge(items, on="item_id").merge(members, on="member_id", suffixes=("_job", "_member"))
    jobs["skill_overlap"] = [
        len(set(required) & set(has)) / len(required)
        for required, has in zip(jobs["required_skills"], jobs["skills"], strict=True)
    ]
    jobs["same_location"] = jobs["location_job"] == jobs["location_member"]
    jobs["positive"] = jobs[["view", "apply"]].max(axis=1)
    return jobs


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., dict[str, pd.DataFrame]]:
    """world(**knobs): the 400-member world with those knobs, generated once per module."""
    cache: dict[tuple[tuple[str, Any], ...], dict[str, pd.DataFrame]] = {}

    def make(**knobs: Any) -> dict[str, pd.DataFrame]:
        key = tuple(sorted(knobs.items()))
        if key not in cache:
            out = tmp_path_factory.mktemp("world")
            generate(WorldConfig(members=MEMBERS, seed=SEED, **knobs), out)
            cache[key] = read_world(out)
        return cache[key]

    return make


# --- Contracts ----------------------------------------------------------------------------------------
def test_tables_have_exactly_the_schema_contract(tiny_world: Path) -> None:
    for name, schema in WORLD_TABLES.items():
        written = pq.read_schema(tiny_world / f"{name}.parquet")
        assert written.equals(schema, check_metadata=False), f"{name}: {written} != {schema}"
    meta = json.loads((tiny_world / "world.json").read_text())
    assert meta["seed"] == 7 and meta["config"]["members"] == 150
    for name in WORLD_TABLES:
        assert meta["counts"][name] == pq.read_metadata(tiny_world / f"{name}.parquet").num_rows


def test_ids_sessions_and_timestamps_are_well_formed(tiny_world: Path) -> None:
    w = read_world(tiny_world)
    meta = json.loads((tiny_world / "world.json").read_text())
    members, actors, items, follows, imp = (
        w[n] for n in ("members", "actors", "items", "follows", "impressions")
    )
    for table, column in ((members, "member_id"), (actors, "actor_id"), (items, "item_id")):
        assert (table[column].to_numpy() == np.arange(len(table))).all(), f"{column} is not dense"
    assert (imp["impression_id"].to_numpy() == np.arange(len(imp))).all()
    assert not follows.duplicated(["member_id", "actor_id"]).any()

    # Denormalized item attributes agree with the items table.
    joined = imp.merge(items, on="item_id", suffixes=("", "_item"))
    for column in ("actor_id", "post_type", "topic"):
        assert (joined[column] == joined[f"{column}_item"]).all(), column
    assert (joined["item_created_at"] == joined["created_at"]).all()
    assert (joined["item_kind"] == np.where(joined["surface"] == "jobs", "job", "post")).all()
    assert ((joined["post_type"] == PostType.JOB) == (joined["surface"] == "jobs")).all()

    # One member and one surface per session, positions 0..k-1, time moves forward, no item twice.
    sessions = imp.groupby("session_id").agg(
        members=("member_id", "nunique"), surfaces=("surface", "nunique"), n=("position", "size"),
        last=("position", "max"), distinct_items=("item_id", "nunique"),
    )  # fmt: skip
    assert (sessions["members"] == 1).all() and (sessions["surfaces"] == 1).all()
    assert (sessions["last"] + 1 == sessions["n"]).all() and (
        sessions["distinct_items"] == sessions["n"]
    ).all()
    assert not imp.duplicated(["session_id", "position"]).any()
    ordered = imp.sort_values(["session_id", "position"])
    step = ordered.groupby("session_id")["timestamp"].diff().dropna()
    assert (step > pd.Timedelta(0)).all()
    assert (imp["item_created_at"] < imp["timestamp"]).all()
    assert imp["timestamp"].min() >= pd.Timestamp(meta["start"]) and imp["timestamp"].max() < pd.Timestamp(
        meta["end"]
    )

    # A member's sessions do not overlap, and all follows exist before the member's first session.
    spans = imp.groupby("session_id").agg(
        member=("member_id", "first"), begin=("timestamp", "min"), end=("timestamp", "max")
    )
    spans = spans.sort_values(["member", "begin"])
    next_begin = spans.groupby("member")["begin"].shift(-1)
    assert (next_begin.dropna() > spans.loc[next_begin.notna(), "end"]).all()
    first_seen = imp.groupby("member_id")["timestamp"].min()
    follow_after = follows.join(first_seen.rename("first_seen"), on="member_id").dropna()
    assert (follow_after["created_at"] < follow_after["first_seen"]).all()

    # Feed rows carry only feed actions, job rows only job actions.
    feed = imp["surface"] == "feed"
    assert (imp.loc[feed, JOBS] == 0).all().all() and (imp.loc[~feed, FEED] == 0).all().all()
    assert set(imp["surface"]) == {"feed", "jobs"}


def test_every_task_has_positives_even_in_the_tiny_world(tiny_world: Path) -> None:
    imp = read_world(tiny_world)["impressions"]
    for action in Action:
        assert imp[action.name.lower()].sum() >= 10, f"{action.name} has almost no positives"


def test_same_seed_gives_byte_identical_tables(tiny_world: Path, tmp_path: Path) -> None:
    generate(WorldConfig(members=150, seed=7), tmp_path / "again")  # the tiny_world config
    for name in WORLD_TABLES:
        assert (tmp_path / "again" / f"{name}.parquet").read_bytes() == (
            tiny_world / f"{name}.parquet"
        ).read_bytes()
    generate(WorldConfig(members=150, seed=8), tmp_path / "other")
    other = pq.read_table(tmp_path / "other" / "impressions.parquet")
    assert not other.equals(pq.read_table(tiny_world / "impressions.parquet"))


# --- Realism of the log -------------------------------------------------------------------------------
def test_engagement_rates_are_realistic_and_actions_correlated(world: Callable[..., dict]) -> None:
    feed = feed_log(world())
    contribution = feed[["like", "comment", "share"]].max(axis=1)
    assert 0.05 <= feed["click"].mean() <= 0.15
    assert 0.02 <= contribution.mean() <= 0.06
    assert 0.04 <= feed["long_dwell"].mean() <= 0.11
    assert feed.loc[contribution == 1, "click"].mean() > 0.7  # contributions mostly come with a click
    dwell_click = feed.groupby("click")["long_dwell"].mean()
    assert dwell_click[1] > 4 * dwell_click[0]
    jobs = job_log(world())
    assert 0.1 <= jobs["view"].mean() <= 0.3 and 0.01 <= jobs["apply"].mean() <= 0.08
    assert (jobs.loc[jobs["apply"] == 1, "view"] == 1).all() and not (jobs["view"] & jobs["dismiss"]).any()


def test_activity_is_heavy_tailed_with_many_cold_start_members(world: Callable[..., dict]) -> None:
    w = world()
    per_member = w["impressions"].groupby("member_id").size().reindex(w["members"]["member_id"], fill_value=0)
    engaged = (
        feed_log(w).groupby("member_id")["engaged"].sum().reindex(w["members"]["member_id"], fill_value=0)
    )
    assert (per_member < 5).mean() > 0.08
    assert (engaged < 5).mean() > 0.3
    top_decile = np.sort(per_member.to_numpy())[::-1][: MEMBERS // 10].sum()
    assert top_decile > 0.35 * per_member.sum()
    start = w["impressions"]["timestamp"].min().floor("D")
    joined_in_window = (w["members"]["join_date"] >= start).mean()
    assert abs(joined_in_window - WorldConfig().cold_start_fraction) < 0.08


# --- Planted effects ----------------------------------------------------------------------------------
@pytest.mark.parametrize("knob", EFFECT_KNOBS)
def test_an_effect_knob_changes_only_the_actions(world: Callable[..., dict], knob: str) -> None:
    """Ablation worlds show the same items at the same slots; only outcomes move (docs/data.md)."""
    base, ablated = world()["impressions"], world(**{knob: 0.0})["impressions"]
    pd.testing.assert_frame_equal(base[EXPOSURE], ablated[EXPOSURE])
    assert (base[FEED + JOBS] != ablated[FEED + JOBS]).any(axis=1).mean() > 0.002


def test_actor_affinity_is_the_strongest_signal(world: Callable[..., dict]) -> None:
    """Switching actor affinity off flips more outcomes than switching off any other feed effect."""
    base = world()["impressions"]

    def flipped(knob: str) -> float:
        return float((base[FEED] != world(**{knob: 0.0})["impressions"][FEED]).any(axis=1).mean())

    actor = flipped("actor_affinity")
    for knob in (
        "topic_affinity",
        "post_type_preference",
        "item_age_decay",
        "position_bias",
        "setwise_effect",
    ):
        assert actor > 1.3 * flipped(knob), knob


def test_followed_and_previously_engaged_actors_engage_more(world: Callable[..., dict]) -> None:
    feed = feed_log(world())
    by_follow = feed.groupby("followed")["engaged"].mean()
    assert by_follow[True] > 1.8 * by_follow[False]
    # Affinity is latent and persistent: engaging with an actor in the first half predicts the second.
    middle = feed["timestamp"].min() + (feed["timestamp"].max() - feed["timestamp"].min()) / 2
    early = (
        feed[feed["timestamp"] < middle].groupby(["member_id", "actor_id"])["engaged"].max().rename("before")
    )
    late = (
        feed[feed["timestamp"] >= middle].join(early, on=["member_id", "actor_id"]).dropna(subset=["before"])
    )
    by_history = late.groupby("before")["engaged"].mean()
    assert by_history[1] > 1.8 * by_history[0]

    off = feed_log(world(actor_affinity=0.0)).groupby("followed")["engaged"].mean()
    assert off[True] / off[False] < 0.6 * by_follow[True] / by_follow[False]


def test_same_actor_back_to_back_lowers_engagement_only_when_setwise_is_on(
    world: Callable[..., dict],
) -> None:
    def rates(feed: pd.DataFrame) -> tuple[float, float]:
        later = feed[feed["position"] > 0]
        repeat = later[later["after_same_actor"]]["engaged"]
        assert len(repeat) > 500  # enough back-to-back pairs to measure
        fresh = later[~later["after_same_actor"] & ~later["after_same_topic"]]["engaged"]
        return float(repeat.mean()), float(fresh.mean())

    repeat_on, fresh_on = rates(feed_log(world()))
    assert repeat_on < 0.75 * fresh_on
    repeat_off, fresh_off = rates(feed_log(world(setwise_effect=0.0)))
    assert repeat_off > 0.9 * fresh_off
    # Paired worlds share every random draw: only slots after the same actor or topic change.
    on, off = feed_log(world()), feed_log(world(setwise_effect=0.0))
    untouched = ~(on["after_same_actor"] | on["after_same_topic"])
    pd.testing.assert_frame_equal(on.loc[untouched, FEED], off.loc[untouched, FEED])
    assert on.loc[~untouched, "engaged"].sum() < 0.75 * off.loc[~untouched, "engaged"].sum()


def test_burst_rate_sets_how_often_a_slot_shows_the_previous_slots_actor_again(
    world: Callable[..., dict],
) -> None:
    share = {rate: float(feed_log(world(burst_rate=rate))["after_same_actor"].mean()) for rate in (0.0, 0.6)}
    default = float(feed_log(world())["after_same_actor"].mean())
    assert share[0.0] < 0.5 * default < default < 0.5 * share[0.6]


def test_position_bias(world: Callable[..., dict]) -> None:
    """Top slots engage more. Out-of-network only: followed actors' posts run out deeper in a session (a
    session never repeats a post), which by itself makes deep slots engage a little less."""

    def top_over_deep(feed: pd.DataFrame) -> float:
        feed = feed[~feed["followed"]]
        return float(
            feed.loc[feed["position"] <= 1, "engaged"].mean()
            / feed.loc[feed["position"] >= 8, "engaged"].mean()
        )

    assert top_over_deep(feed_log(world())) > 1.5
    assert 0.85 < top_over_deep(feed_log(world(position_bias=0.0, setwise_effect=0.0))) < 1.25


def test_item_age_decay(world: Callable[..., dict]) -> None:
    """Fresh posts engage more. Out-of-network only: followed actors' posts are older on average and engage
    more for the actor's sake, which would hide the age effect."""

    def fresh_over_old(feed: pd.DataFrame) -> float:
        feed = feed[~feed["followed"]]
        age = feed["timestamp"] - feed["item_created_at"]
        fresh, old = age < pd.Timedelta(hours=6), age > pd.Timedelta(days=2)
        assert fresh.sum() > 1000 and old.sum() > 1000
        return float(feed.loc[fresh, "engaged"].mean() / feed.loc[old, "engaged"].mean())

    assert fresh_over_old(feed_log(world())) > 1.6
    assert fresh_over_old(feed_log(world(item_age_decay=0.0))) < 1.3


def test_affinities_drift_over_time(world: Callable[..., dict]) -> None:
    """Early engagement with an actor predicts late engagement less when tastes drift.

    Within each member (so members' overall activity cancels): late engagement rate on actors the member
    engaged with in the first third minus on actors they saw but ignored then, averaged over members.
    """

    def persistence(feed: pd.DataFrame) -> float:
        first, last = feed["timestamp"].min(), feed["timestamp"].max()
        third = (last - first) / 3
        early = feed[feed["timestamp"] < first + third].groupby(["member_id", "actor_id"])["engaged"].max()
        late = feed[feed["timestamp"] >= last - third].join(
            early.rename("early"), on=["member_id", "actor_id"]
        )
        per_member = late.groupby(["member_id", "early"])["engaged"].mean().unstack().dropna()
        assert len(per_member) > 50
        return float((per_member[1] - per_member[0]).mean())

    assert persistence(feed_log(world(drift=0.0))) > 1.15 * persistence(feed_log(world(drift=2.0)))


def test_job_actions_follow_skill_and_location_fit(world: Callable[..., dict]) -> None:
    jobs = job_log(world())
    strong, weak = jobs["skill_overlap"] >= 0.5, jobs["skill_overlap"] < 0.2
    assert strong.sum() > 250 and weak.sum() > 250
    assert jobs.loc[strong, "apply"].mean() > 3 * jobs.loc[weak, "apply"].mean()
    assert jobs.loc[strong, "dismiss"].mean() < 0.6 * jobs.loc[weak, "dismiss"].mean()
    by_location = jobs.groupby("same_location")["positive"].mean()
    assert by_location[True] > 1.3 * by_location[False]

    off = job_log(world(job_fit=0.0))
    ratio = off.loc[strong, "positive"].mean() / off.loc[weak, "positive"].mean()
    assert 0.7 < ratio < 1.4  # no fit effect left, up to sampling noise


def test_jobs_surface_can_be_switched_off(tmp_path: Path) -> None:
    generate(WorldConfig(members=60, seed=1, job_sessions=0), tmp_path / "w")
    w = read_world(tmp_path / "w")
    assert set(w["impressions"]["surface"]) == {"feed"} and set(w["items"]["item_kind"]) == {"post"}


# --- Config validation ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("knobs", "field"),
    [
        ({"setwise_effect": -1}, "setwise_effect"),
        ({"members": 5}, "members"),
        ({"drift": "fast"}, "drift"),
        ({"cold_start_fraction": 1.5}, "cold_start_fraction"),
        ({"job_sessions": 1.0}, "job_sessions"),
        ({"setwise": 0}, "setwise"),  # a misspelt knob is an error, not silently ignored
    ],
)
def test_bad_config_is_rejected_naming_the_field(knobs: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        WorldConfig.model_validate(knobs)


def test_config_accepts_command_line_strings() -> None:
    cfg = WorldConfig.model_validate({"members": "300", "setwise_effect": "0", "start": "2024-03-01"})
    assert cfg.members == 300 and cfg.setwise_effect == 0.0 and cfg.start.month == 3


def test_stage_entrypoint_writes_the_world_and_prints_a_summary(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    synth.main(["--set", "members=40", "--set", "seed=2", "--set", f"out={tmp_path / 'w'}"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["counts"]["members"] == 40 and summary["seed"] == 2
    assert "out" not in json.loads((tmp_path / "w" / "world.json").read_text())["config"]
    with pytest.raises(SystemExit) as exit_info:
        synth.main(["--set", "drift=-1", "--set", f"out={tmp_path / 'bad'}"])
    assert exit_info.value.code == 2 and "drift" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


# --- Atomic writes ----------------------------------------------------------------------------------------
def _fail_on_impressions(monkeypatch: pytest.MonkeyPatch) -> None:
    real_write = pq.write_table

    def write_then_crash(table: Any, where: Any, *args: Any, **kwargs: Any) -> None:
        if Path(where).name == "impressions.parquet":
            raise OSError("disk full")
        real_write(table, where, *args, **kwargs)

    monkeypatch.setattr(synth.pq, "write_table", write_then_crash)


def test_a_crash_mid_write_leaves_no_half_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fail_on_impressions(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        generate(WorldConfig(members=30, seed=1), tmp_path / "world")
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp folder is left behind


def test_a_crash_mid_write_keeps_the_previous_world(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "world"
    generate(WorldConfig(members=30, seed=1), out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    _fail_on_impressions(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        generate(WorldConfig(members=30, seed=2), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["world"]


def test_a_new_world_replaces_the_old_one_but_never_a_foreign_folder(tmp_path: Path) -> None:
    out = tmp_path / "world"
    generate(WorldConfig(members=30, seed=1), out)
    generate(WorldConfig(members=30, seed=2), out)
    assert json.loads((out / "world.json").read_text())["seed"] == 2
    assert [p.name for p in tmp_path.iterdir()] == ["world"]

    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match=r"holds no world\.json"):
        generate(WorldConfig(members=30, seed=1), foreign)
    assert [p.name for p in foreign.iterdir()] == ["notes.txt"]
