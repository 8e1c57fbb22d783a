"""Feast round trip on the tiny world: build the tables, apply, materialize, and read back online and offline.

Everything runs against a copy of feature_repo/ and a private data root, so the real repo's registry
and online store are never touched.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from workloads.data.counters import COUNTER_GROUPS, DAY_US, counters_at, empty_counters
from workloads.data.features import (
    HISTORY_ARRAYS,
    FeatureTablesConfig,
    OnlineFeatures,
    age_buckets,
    apply,
    build_feature_tables,
    counter_reads,
    materialize,
    offline_session,
)
from workloads.data.schema import ACTION_COLUMNS, COUNTER_FEATURES

REPO = Path(__file__).resolve().parents[3] / "feature_repo"
HISTORY_LEN = 64  # shorter than the default so that some tiny-world members hit the cap


@dataclass
class FeastWorld:
    repo: Path
    world: Path
    build: dict
    applied: dict
    materialized: dict
    online: OnlineFeatures
    impressions: pd.DataFrame
    end_us: int


def copy_repo(dest: Path) -> Path:
    shutil.copytree(REPO, dest, ignore=shutil.ignore_patterns("__pycache__", "data"))
    return dest


@pytest.fixture(scope="module")
def feast_world(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FeastWorld]:
    root = tmp_path_factory.mktemp("feast")
    world = root / "data" / "world"
    shutil.copytree(tiny_world, world, ignore=shutil.ignore_patterns("features"))
    repo = copy_repo(root / "feature_repo")
    with pytest.MonkeyPatch.context() as env, offline_session():
        env.setenv("RANKRAY_DATA_DIR", str(root / "data"))
        env.delenv("FEAST_FS_YAML_FILE_PATH", raising=False)
        build = build_feature_tables(world, FeatureTablesConfig(history_len=HISTORY_LEN, counter_snapshots=3))
        applied = apply(repo)
        materialized = materialize(repo)
        end_us = int(pd.Timestamp(build["end"]).value // 1000)
        yield FeastWorld(
            repo=repo,
            world=world,
            build=build,
            applied=applied,
            materialized=materialized,
            online=OnlineFeatures(repo),
            impressions=pq.read_table(world / "impressions.parquet").to_pandas(),
            end_us=end_us,
        )


def test_apply_registers_every_declaration_under_the_data_root(feast_world: FeastWorld) -> None:
    applied = feast_world.applied
    assert applied["project"] == "rankray"
    assert applied["entities"] == ["actor", "item", "member", "topic"]
    views = {
        "member_profile",
        "actor_profile",
        "item_features",
        "member_history",
        *(g.view for g in COUNTER_GROUPS),
    }
    assert set(applied["feature_views"]) == views
    assert applied["feature_services"] == ["brew_v1", "dcnv2_v1", "ligr_v1", "ligr_v2"]
    assert applied["tables_missing"] == []
    data_root = feast_world.world.parent
    assert Path(applied["registry"]) == data_root / "feast" / "registry.db"
    assert (data_root / "feast" / "online.db").is_file()
    assert set(feast_world.materialized["feature_views"]) == views
    # every table the repo declares was built, with Feast-friendly timestamps
    features = feast_world.world / "features"
    for view in views:
        assert (
            str(pq.read_schema(features / f"{view}.parquet").field("event_timestamp").type)
            == "timestamp[us, tz=UTC]"
        )


def naive_history(impressions: pd.DataFrame, member: int, before_us: int, length: int) -> pd.DataFrame:
    """The member's last `length` feed impressions before `before_us` (feed: the default surfaces)."""
    rows = impressions[(impressions["member_id"] == member) & (impressions["surface"] == "feed")]
    rows = rows[rows["timestamp"].dt.as_unit("us").astype("int64") < before_us]
    return rows.sort_values(["timestamp", "session_id", "position"]).tail(length)


def test_online_history_equals_offline_table_and_the_log(feast_world: FeastWorld) -> None:
    offline = pq.read_table(feast_world.world / "features" / "member_history.parquet").to_pandas()
    offline = offline.set_index("member_id")
    assert (offline["history_len"] <= HISTORY_LEN).all() and (offline["history_len"] == HISTORY_LEN).any()
    capped = int(offline.index[offline["history_len"] == HISTORY_LEN][0])
    short = int(offline.index[offline["history_len"] < 10][0])
    members = [capped, short, 10**9]  # the last one never existed
    got = feast_world.online.member_history(members)
    assert got["history_len"].tolist() == [HISTORY_LEN, offline.loc[short, "history_len"], 0]
    for name, dtype in HISTORY_ARRAYS.items():
        for i, member in enumerate(members[:2]):
            np.testing.assert_array_equal(
                got[name][i], np.asarray(offline.loc[member, name], dtype=dtype.to_pandas_dtype())
            )
        assert got[name][2].size == 0
    # and the table is what the log says: the last N impressions strictly before the world's end
    for i, member in enumerate(members[:2]):
        rows = naive_history(feast_world.impressions, member, feast_world.end_us, HISTORY_LEN)
        np.testing.assert_array_equal(got["hist_item_id"][i], rows["item_id"].to_numpy())
        np.testing.assert_array_equal(
            got["hist_timestamp"][i], rows["timestamp"].dt.as_unit("us").astype("int64")
        )
        bits = sum(rows[c].to_numpy().astype(np.int32) << b for b, c in enumerate(ACTION_COLUMNS))
        np.testing.assert_array_equal(got["hist_actions"][i], bits)
        assert np.all(np.diff(got["hist_timestamp"][i]) >= 0)


def test_online_items_and_profiles_equal_the_world(feast_world: FeastWorld) -> None:
    items = pq.read_table(feast_world.world / "items.parquet").to_pandas().set_index("item_id")
    post = int(items.index[items["item_kind"] == "post"][0])
    job = int(items.index[items["item_kind"] == "job"][0])
    got = feast_world.online.item_features([post, job, 10**9])
    assert got["found"].tolist() == [True, True, False]
    assert got["content_emb"].shape == (3, 32) and got["content_emb"].dtype == np.float32
    np.testing.assert_array_equal(
        got["content_emb"][:2], np.stack(items.loc[[post, job], "content_emb"].to_numpy())
    )
    np.testing.assert_array_equal(got["content_emb"][2], 0.0)
    np.testing.assert_array_equal(got["actor_id"][:2], items.loc[[post, job], "actor_id"])
    np.testing.assert_array_equal(got["post_type"][:2], items.loc[[post, job], "post_type"])
    np.testing.assert_array_equal(got["topic"][:2], items.loc[[post, job], "topic"])
    np.testing.assert_array_equal(
        got["created_at"][:2], items.loc[[post, job], "created_at"].dt.as_unit("us").astype("int64")
    )
    assert got["required_skills"][0] == [] and got["required_skills"][1] == list(
        items.loc[job, "required_skills"]
    )
    assert got["seniority"][:2] == [-1, items.loc[job, "seniority"]]

    members = pq.read_table(feast_world.world / "members.parquet").to_pandas().set_index("member_id")
    profile = feast_world.online.member_profile([3, 4])
    assert profile["title"] == members.loc[[3, 4], "title"].tolist()
    assert profile["skills"] == [list(s) for s in members.loc[[3, 4], "skills"]]
    assert profile["join_date"] == members.loc[[3, 4], "join_date"].dt.as_unit("us").astype("int64").tolist()


def candidate_queries(impressions: pd.DataFrame, n: int) -> pd.DataFrame:
    """Distinct keys that occur in the log, plus one row of keys that never do."""
    rows = impressions.sample(n, random_state=0)[
        ["member_id", "item_id", "actor_id", "topic"]
    ].drop_duplicates()
    unseen = pd.DataFrame({"member_id": [10**9], "item_id": [10**9], "actor_id": [10**9], "topic": [999]})
    return pd.concat([rows, unseen], ignore_index=True).astype("int64")


def test_online_counters_equal_counters_at_the_worlds_end(feast_world: FeastWorld) -> None:
    queries = candidate_queries(feast_world.impressions, 300)
    got = feast_world.online.counters(queries, COUNTER_FEATURES)
    expected = counters_at(feast_world.impressions, queries.assign(ts=feast_world.end_us))
    pd.testing.assert_frame_equal(got, expected)
    assert got.iloc[-1].to_dict() == pytest.approx(empty_counters())
    assert (got["mt_eng_30d"] > 0).sum() > 10  # the comparison is not between empty rows


def test_point_in_time_join_returns_the_snapshot_before_each_row(feast_world: FeastWorld) -> None:
    """A duckdb point-in-time join at snapshot + 1h returns counters_at of the snapshot, not of the row."""
    store = feast_world.online.store
    snapshot = feast_world.end_us - DAY_US  # the middle of the three daily snapshots
    queries = candidate_queries(feast_world.impressions, 200)
    entity_df = queries.assign(event_timestamp=pd.Timestamp(snapshot + 3_600_000_000, unit="us", tz="UTC"))
    refs = [f"{g.view}:{c.name}" for g in COUNTER_GROUPS for c in g.counters]
    joined = store.get_historical_features(entity_df=entity_df, features=refs).to_df()
    joined = queries.merge(joined, on=["member_id", "item_id", "actor_id", "topic"], how="left")
    assert len(joined) == len(queries)
    got = joined[COUNTER_FEATURES].astype(np.float32)
    # keys with no snapshot row come back null; serving and training fill them with the empty value
    got = got.fillna({name: np.float32(v) for name, v in empty_counters().items()})
    expected = counters_at(feast_world.impressions, queries.assign(ts=snapshot))
    pd.testing.assert_frame_equal(got, expected, check_dtype=False)
    later = counters_at(feast_world.impressions, queries.assign(ts=snapshot + 3_600_000_000))
    assert not later.equals(expected)  # the hour after the snapshot did change some counters


def test_item_features_join_before_creation_is_null(feast_world: FeastWorld) -> None:
    items = pq.read_table(feast_world.world / "items.parquet").to_pandas()
    item = items.iloc[-1]
    created = item["created_at"]
    entity_df = pd.DataFrame(
        {
            "item_id": [int(item["item_id"])] * 2,
            "event_timestamp": [created - pd.Timedelta(seconds=1), created],
        }
    )
    joined = feast_world.online.store.get_historical_features(
        entity_df=entity_df, features=["item_features:content_emb", "item_features:topic"]
    ).to_df()
    joined = joined.sort_values("event_timestamp")
    assert pd.isna(joined["topic"].iloc[0])
    assert joined["topic"].iloc[1] == item["topic"]
    np.testing.assert_allclose(
        np.asarray(joined["content_emb"].iloc[1], dtype=np.float32), item["content_emb"]
    )


def test_age_buckets_match_the_scalar_definition() -> None:
    from workloads.data.schema import age_bucket_us

    ages = np.array([-5, 0, 1, 3_599_999_999, 3_600_000_000, 7 * 3_600_000_000, 10**15], dtype=np.int64)
    assert age_buckets(ages).tolist() == [age_bucket_us(int(a)) for a in ages]


def test_bad_world_input_names_what_is_wrong(tmp_path: Path, tiny_world: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"world\.json"):
        build_feature_tables(tmp_path)
    broken = tmp_path / "world"
    shutil.copytree(tiny_world, broken, ignore=shutil.ignore_patterns("features"))
    items = pq.read_table(broken / "items.parquet").drop_columns(["content_emb"])
    pq.write_table(items, broken / "items.parquet")
    with pytest.raises(ValueError, match=r"'items' is missing column\(s\) \['content_emb'\]"):
        build_feature_tables(broken)
    assert not (broken / "features").exists()  # nothing half-written


def test_online_counters_reject_missing_columns(feast_world: FeastWorld) -> None:
    with pytest.raises(ValueError, match=r"missing column\(s\) \['topic'\]"):
        feast_world.online.counters(
            pd.DataFrame({"member_id": [1], "item_id": [1], "actor_id": [1]}), COUNTER_FEATURES
        )
    # only the keys of the views read are needed: item_ctr_7d is keyed by item alone
    got = feast_world.online.counters(pd.DataFrame({"item_id": [10**9]}), ["item_ctr_7d"])
    assert got["item_ctr_7d"].tolist() == pytest.approx([empty_counters()["item_ctr_7d"]])
    for bad in (["item_ctr_7d", "nope"], ["item_ctr_7d", "item_ctr_7d"]):
        with pytest.raises(ValueError, match=r"must be distinct names of"):
            feast_world.online.counters(pd.DataFrame({"item_id": [1]}), bad)
    with pytest.raises(TypeError, match=r"not the one string 'item_ctr_7d'"):
        feast_world.online.counters(pd.DataFrame({"item_id": [1]}), "item_ctr_7d")


@contextlib.contextmanager
def online_reads(online: OnlineFeatures) -> Iterator[list[list[str]]]:
    """The feature refs of each ``get_online_features`` call the real store gets meanwhile."""
    calls: list[list[str]] = []
    read = online.store.get_online_features

    def spy(*args: Any, **kwargs: Any) -> Any:
        calls.append(list(kwargs["features"]))
        return read(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(online.store, "get_online_features", spy)
        yield calls


def test_online_counters_read_only_the_views_and_features_asked_for(feast_world: FeastWorld) -> None:
    """Each counter view costs the online store a round trip per batch: ligr_v2's two counters are two
    reads of one feature each, a model without counters reads none, DCNv2 reads all 11 of 5 views."""
    queries = candidate_queries(feast_world.impressions, 200)
    expected = counters_at(feast_world.impressions, queries.assign(ts=feast_world.end_us))
    ligr_v2 = ["item_ctr_7d", "ma_eng_30d"]
    with online_reads(feast_world.online) as calls:
        got = feast_world.online.counters(queries, ligr_v2)
    assert calls == [["member_actor_counters:ma_eng_30d"], ["item_counters:item_ctr_7d"]]
    assert list(got.columns) == ligr_v2  # the model's columns, in its order, and no others
    pd.testing.assert_frame_equal(got, expected[ligr_v2])

    with online_reads(feast_world.online) as calls:
        got = feast_world.online.counters(queries, [])
    assert calls == [] and got.shape == (len(queries), 0) and got.index.equals(queries.index)

    with online_reads(feast_world.online) as calls:
        got = feast_world.online.counters(queries, COUNTER_FEATURES)
    assert [sorted({ref.split(":")[0] for ref in refs}) for refs in calls] == [
        [g.view] for g in COUNTER_GROUPS
    ]
    assert [ref.split(":")[1] for refs in calls for ref in refs] == COUNTER_FEATURES
    pd.testing.assert_frame_equal(got, expected)


def test_counter_reads_group_the_asked_counters_by_view() -> None:
    assert counter_reads([]) == []
    reads = counter_reads(["member_eng_rate_30d", "ma_imp_7d", "ma_eng_30d"])
    assert [(g.view, [c.name for c in wanted]) for g, wanted in reads] == [
        ("member_actor_counters", ["ma_imp_7d", "ma_eng_30d"]),
        ("member_counters", ["member_eng_rate_30d"]),
    ]


def assert_same_histories(got: OnlineFeatures, want: OnlineFeatures, members: list[int]) -> None:
    """Two online stores hold the same history arrays for these members."""
    got_rows, want_rows = got.member_history(members), want.member_history(members)
    for name in HISTORY_ARRAYS:
        for mine, theirs in zip(got_rows[name], want_rows[name], strict=True):
            np.testing.assert_array_equal(mine, theirs)


def fresh_store(feast_world: FeastWorld, root: Path) -> tuple[Path, dict[str, str]]:
    """Another repo copy and data root holding the already built tables: its own registry and online store."""
    repo = copy_repo(root / "feature_repo")
    shutil.copytree(feast_world.world / "features", root / "data" / "world" / "features")
    env = {k: v for k, v in os.environ.items() if k != "FEAST_FS_YAML_FILE_PATH"}
    return repo, {**env, "RANKRAY_DATA_DIR": str(root / "data")}


@pytest.mark.slow
def test_feast_cli_applies_and_materializes_the_repo(feast_world: FeastWorld, tmp_path: Path) -> None:
    """`cd feature_repo && feast apply && feast materialize-incremental END`, as a person would run it."""
    repo, env = fresh_store(feast_world, tmp_path)
    end = feast_world.build["end"].replace("+00:00", "")
    # Both commands in one interpreter (importing feast is most of the cost), via the CLI's entry point.
    script = (
        "from feast.cli.cli import cli\n"
        "cli.main(['apply'], standalone_mode=False)\n"
        f"cli.main(['materialize-incremental', '{end}'], standalone_mode=False)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=repo, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Created feature view member_history" in done.stdout
    assert (tmp_path / "data" / "feast" / "registry.db").is_file()
    with pytest.MonkeyPatch.context() as menv:
        menv.setenv("RANKRAY_DATA_DIR", env["RANKRAY_DATA_DIR"])
        queries = candidate_queries(feast_world.impressions, 50)
        pd.testing.assert_frame_equal(
            OnlineFeatures(repo).counters(queries, COUNTER_FEATURES),
            feast_world.online.counters(queries, COUNTER_FEATURES),
        )


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    """A throwaway redis-server on a free port (the test is skipped where none is installed)."""
    import redis

    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)]
    server = subprocess.Popen(args, stdout=subprocess.DEVNULL)
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            with contextlib.suppress(redis.ConnectionError):
                if client.ping():
                    break
            time.sleep(0.05)
        yield f"127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow
def test_redis_online_store_serves_the_same_values(
    feast_world: FeastWorld, tmp_path: Path, redis_url: str
) -> None:
    repo, env = fresh_store(feast_world, tmp_path)
    with pytest.MonkeyPatch.context() as menv, offline_session():
        menv.setenv("RANKRAY_DATA_DIR", env["RANKRAY_DATA_DIR"])
        menv.setenv("FEAST_FS_YAML_FILE_PATH", str(repo / "feature_store.redis.yaml"))
        menv.setenv("RANKRAY_REDIS", redis_url)
        apply(repo)
        assert materialize(repo)["online_store"] == "redis"
        online = OnlineFeatures(repo)
        queries = candidate_queries(feast_world.impressions, 100)
        pd.testing.assert_frame_equal(
            online.counters(queries, COUNTER_FEATURES), feast_world.online.counters(queries, COUNTER_FEATURES)
        )
        members = feast_world.impressions["member_id"].unique()[:5].tolist()
        assert_same_histories(online, feast_world.online, members)
        items = [0, 1, 2]
        np.testing.assert_array_equal(
            online.item_features(items)["content_emb"], feast_world.online.item_features(items)["content_emb"]
        )


def test_materializing_one_feature_service_loads_only_its_views(
    feast_world: FeastWorld, tmp_path: Path
) -> None:
    """What a serving deployment needs online, without the counter snapshots it does not read."""
    repo, env = fresh_store(feast_world, tmp_path)
    with pytest.MonkeyPatch.context() as menv, offline_session():
        menv.setenv("RANKRAY_DATA_DIR", env["RANKRAY_DATA_DIR"])
        apply(repo)
        with pytest.raises(ValueError, match=r"\['nope_v1'\] are not registered; expected some of"):
            materialize(repo, ["nope_v1"])
        assert materialize(repo, ["ligr_v1"])["feature_views"] == ["item_features", "member_history"]
        members = feast_world.impressions["member_id"].unique()[:3].tolist()
        online = OnlineFeatures(repo)
        assert_same_histories(online, feast_world.online, members)
        # ligr_v2 adds the two counter views its candidates read; their counters are then served
        assert materialize(repo, ["ligr_v2"])["feature_views"] == [
            "item_counters",
            "item_features",
            "member_actor_counters",
            "member_history",
        ]
        queries = candidate_queries(feast_world.impressions, 100)
        read = ["ma_eng_30d", "item_ctr_7d"]
        pd.testing.assert_frame_equal(
            online.counters(queries, read), feast_world.online.counters(queries, read)
        )
        # the start-up check looks at the views a model reads, and at nothing else
        assert online.never_materialized(read) == [] and online.never_materialized([]) == []
        assert online.never_materialized(COUNTER_FEATURES) == [
            "actor_counters",
            "member_counters",
            "member_topic_counters",
        ]


def test_materializing_views_whose_tables_were_never_built_names_them(tmp_path: Path) -> None:
    """`apply` registers views before their tables exist; materialize says which tables are missing."""
    repo = copy_repo(tmp_path / "feature_repo")
    (tmp_path / "data" / "feast").mkdir(parents=True)  # the registry's folder, but no world/features
    with pytest.MonkeyPatch.context() as menv, offline_session():
        menv.setenv("RANKRAY_DATA_DIR", str(tmp_path / "data"))
        menv.delenv("FEAST_FS_YAML_FILE_PATH", raising=False)
        assert len(apply(repo)["tables_missing"]) == 9  # registered all the same, as `feast apply` does
        with pytest.raises(FileNotFoundError, match="rankray features build") as missing:
            materialize(repo, ["ligr_v1"])
    message = str(missing.value)
    assert "'member_history'" in message and "'item_features'" in message
    assert "counters" not in message.split(";")[0]  # only the service's views are checked
    assert str(tmp_path / "data" / "world" / "features" / "member_history.parquet") in message
