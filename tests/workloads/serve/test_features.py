"""The feature fetcher's reads against a real materialized SQLite online store (no Ray needed).

Outages are real too: the store's table is renamed away (a failing store) or the database file is held
under an exclusive lock by another connection (a store that hangs).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from tests.workloads.serve.conftest import HISTORY_LEN, ServeWorld
from tests.workloads.serve.offline import member_history
from workloads.data.counters import COUNTER_GROUPS, counters_at
from workloads.data.features import age_buckets
from workloads.data.schema import CONTENT_DIM, COUNTER_FEATURES
from workloads.models.config import DCNv2Config, HSTUConfig, LiGRConfig
from workloads.serve.errors import ServeError
from workloads.serve.features import FeatureReader, FetchRequest, RequestFeatures, model_counters
from workloads.serve.schemas import InlineItem

UNKNOWN_MEMBER = 10**9
UNKNOWN_ITEM = 10**6


def reader(world: ServeWorld, timeout_s: float = 2.0, attempts: int = 2) -> FeatureReader:
    return FeatureReader(world.repo, HISTORY_LEN, timeout_s=timeout_s, attempts=attempts)


def request(world: ServeWorld, member: int, candidates: list[int], inline: list[InlineItem] | None = None):
    as_of = int(pd.Timestamp(world.end).value // 1000)
    return FetchRequest(member, np.asarray(candidates, dtype=np.int64), inline or [], as_of)


def online_db(world: ServeWorld) -> Path:
    return world.root / "data" / "feast" / "online.db"


def members_with_history(world: ServeWorld) -> pd.DataFrame:
    return pd.read_parquet(world.world / "features" / "member_history.parquet")


def test_a_batch_reads_history_items_and_content_for_each_request(serve_world: ServeWorld) -> None:
    histories = members_with_history(serve_world)
    member = int(histories.loc[histories["history_len"].idxmax(), "member_id"])
    items = pd.read_parquet(serve_world.world / "items.parquet").set_index("item_id")
    candidates = [5, 17, 3, 400]
    got = asyncio.run(reader(serve_world).read([request(serve_world, member, candidates)]))[0]
    assert isinstance(got, RequestFeatures) and got.member_known
    expected = member_history(serve_world.world, member, HISTORY_LEN)
    for name, values in expected.items():
        np.testing.assert_array_equal(got.history[name], values)
    np.testing.assert_array_equal(got.candidates["cand_item_id"], candidates)
    np.testing.assert_array_equal(got.candidates["cand_actor_id"], items.loc[candidates, "actor_id"])
    np.testing.assert_array_equal(got.candidates["cand_post_type"], items.loc[candidates, "post_type"])
    created = items.loc[candidates, "created_at"].dt.as_unit("us").astype("int64").to_numpy()
    as_of = int(pd.Timestamp(serve_world.end).value // 1000)
    np.testing.assert_array_equal(got.candidates["cand_age_bucket"], age_buckets(as_of - created))
    np.testing.assert_array_equal(got.cand_content, np.stack(items.loc[candidates, "content_emb"]))
    np.testing.assert_array_equal(
        got.hist_content,
        np.stack(items.loc[expected["hist_item_id"], "content_emb"]).reshape(-1, CONTENT_DIM),
    )


def test_cold_start_members_get_an_empty_history(serve_world: ServeWorld) -> None:
    with_history = set(members_with_history(serve_world)["member_id"])
    profiles = pd.read_parquet(serve_world.world / "members.parquet")
    new_member = int(next(m for m in profiles["member_id"] if m not in with_history))
    got = asyncio.run(
        reader(serve_world).read(
            [request(serve_world, new_member, [1]), request(serve_world, UNKNOWN_MEMBER, [1])]
        )
    )
    assert all(isinstance(g, RequestFeatures) and g.history_len == 0 for g in got)
    assert [g.member_known for g in got] == [True, False]  # type: ignore[union-attr]


def test_unknown_items_fail_only_their_own_request_and_inline_features_fill_in(
    serve_world: ServeWorld,
) -> None:
    inline = InlineItem(
        item_id=UNKNOWN_ITEM,
        actor_id=7,
        post_type=2,
        topic=1,
        created_at=serve_world.end - pd.Timedelta(hours=5),
        content_emb=[0.25] * CONTENT_DIM,
    )
    bad = request(serve_world, 1, [1, UNKNOWN_ITEM, UNKNOWN_ITEM + 1])
    good = request(serve_world, 1, [1, UNKNOWN_ITEM], [inline])
    failed, served = asyncio.run(reader(serve_world).read([bad, good]))
    assert isinstance(failed, ServeError) and failed.status == 422
    assert failed.fields[0][0] == "candidates" and f"{UNKNOWN_ITEM}, {UNKNOWN_ITEM + 1}" in failed.message
    assert isinstance(served, RequestFeatures)
    assert served.candidates["cand_actor_id"][1] == 7 and served.candidates["cand_post_type"][1] == 2
    assert served.candidates["cand_age_bucket"][1] == age_buckets(np.array([5 * 3_600_000_000]))[0]
    np.testing.assert_array_equal(served.cand_content[1], [0.25] * CONTENT_DIM)


@contextmanager
def table_renamed(db: Path, table: str) -> Iterator[None]:
    with sqlite3.connect(db) as connection:
        connection.execute(f"ALTER TABLE {table} RENAME TO {table}_away")
    try:
        yield
    finally:
        with sqlite3.connect(db) as connection:
            connection.execute(f"ALTER TABLE {table}_away RENAME TO {table}")


@contextmanager
def exclusively_locked(db: Path) -> Iterator[None]:
    connection = sqlite3.connect(db, isolation_level=None)
    connection.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        connection.execute("ROLLBACK")
        connection.close()


def test_a_failing_store_is_a_503_with_its_reason(serve_world: ServeWorld) -> None:
    features = reader(serve_world)
    with table_renamed(online_db(serve_world), "rankray_item_features"), pytest.raises(ServeError) as caught:
        asyncio.run(features.read([request(serve_world, 1, [1])]))
    assert caught.value.status == 503 and "no such table" in caught.value.message
    assert isinstance(
        asyncio.run(features.read([request(serve_world, 1, [1])]))[0], RequestFeatures
    )  # recovers


def test_a_hanging_store_is_a_503_within_the_retry_bound(serve_world: ServeWorld) -> None:
    features = reader(serve_world, timeout_s=0.3, attempts=2)
    with exclusively_locked(online_db(serve_world)):
        began = time.perf_counter()
        with pytest.raises(ServeError) as caught:
            asyncio.run(features.read([request(serve_world, 1, [1])]))
        waited = time.perf_counter() - began
    assert caught.value.status == 503 and "no answer within 0.3s" in caught.value.message
    assert waited < 2 * (0.3 + 0.5) + 1.0  # attempts x (timeout + backoff), plus slack: not sqlite's 5 s wait


def test_counters_whose_views_were_never_materialized_refuse_to_start(serve_world: ServeWorld) -> None:
    """Served from an empty view, every candidate would read as never engaged with: a silent skew."""
    with pytest.raises(
        RuntimeError, match=r"feature view\(s\) \['member_counters'\] were never materialized"
    ):
        FeatureReader(serve_world.repo, HISTORY_LEN, ["ma_eng_30d", "member_eng_rate_30d"])
    FeatureReader(serve_world.repo, HISTORY_LEN, ["ma_eng_30d", "item_ctr_7d"])  # ligr_v2's: materialized
    # DCNv2 reads every counter view: the check names the three empty ones, not the two loaded ones
    with pytest.raises(
        RuntimeError,
        match=r"view\(s\) \['actor_counters', 'member_counters', 'member_topic_counters'\] were never",
    ):
        FeatureReader(serve_world.repo, HISTORY_LEN, model_counters(DCNv2Config()))
    with pytest.raises(TypeError, match="not the one string"):  # a name is not a list of one-letter names
        FeatureReader(serve_world.repo, HISTORY_LEN, "ma_eng_30d")


def test_model_counters_are_the_counters_each_model_reads() -> None:
    assert model_counters(DCNv2Config()) == COUNTER_FEATURES
    assert model_counters(LiGRConfig(candidate_counters=("item_ctr_7d", "ma_eng_30d"))) == [
        "item_ctr_7d",
        "ma_eng_30d",
    ]
    assert model_counters(HSTUConfig(candidate_counters=("mt_eng_7d",))) == ["mt_eng_7d"]
    assert model_counters(LiGRConfig()) == []


@contextmanager
def counter_refs_read(features: FeatureReader) -> Iterator[list[str]]:
    """The counter feature refs the reader asks the real online store for meanwhile."""
    views = {g.view for g in COUNTER_GROUPS}
    refs: list[str] = []
    read = features.online.store.get_online_features

    def spy(*args: Any, **kwargs: Any) -> Any:
        refs.extend(ref for ref in kwargs["features"] if ref.split(":")[0] in views)
        return read(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(features.online.store, "get_online_features", spy)
        yield refs


def counter_columns(features: RequestFeatures) -> set[str]:
    return {name for name in features.candidates if name.removeprefix("cand_") in COUNTER_FEATURES}


def test_the_fetcher_reads_only_the_counters_its_model_reads(serve_world: ServeWorld) -> None:
    """ligr_v2's LiGR reads two features of two views, not the 11 counters of all 5 counter views (3 of
    them never materialized here); a model without counters reads no counter view at all."""
    histories = members_with_history(serve_world)
    member = int(histories.loc[histories["history_len"].idxmax(), "member_id"])
    candidates = list(range(100, 140))
    ligr_v2 = FeatureReader(serve_world.repo, HISTORY_LEN, ["item_ctr_7d", "ma_eng_30d"])
    with counter_refs_read(ligr_v2) as refs:
        got = asyncio.run(ligr_v2.read([request(serve_world, member, candidates)]))[0]
    assert sorted(refs) == ["item_counters:item_ctr_7d", "member_actor_counters:ma_eng_30d"]
    assert isinstance(got, RequestFeatures)
    assert counter_columns(got) == {"cand_item_ctr_7d", "cand_ma_eng_30d"}
    items = pd.read_parquet(serve_world.world / "items.parquet").set_index("item_id").loc[candidates]
    queries = pd.DataFrame(
        {"member_id": member, "item_id": candidates, "actor_id": items["actor_id"].to_numpy()}
    ).assign(topic=items["topic"].to_numpy(), ts=int(pd.Timestamp(serve_world.end).value // 1000))
    expected = counters_at(pd.read_parquet(serve_world.world / "impressions.parquet"), queries)
    for name in ("item_ctr_7d", "ma_eng_30d"):
        np.testing.assert_allclose(got.candidates[f"cand_{name}"], expected[name], rtol=1e-6)
    assert (got.candidates["cand_ma_eng_30d"] > 0).any()  # not a comparison of empty values

    none = reader(serve_world)  # a LiGR without counters
    with counter_refs_read(none) as refs:
        got = asyncio.run(none.read([request(serve_world, member, candidates)]))[0]
    assert refs == [] and isinstance(got, RequestFeatures) and counter_columns(got) == set()
