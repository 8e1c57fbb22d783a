"""MovieLens-100K from the recbole wheel: counts, event-log contract, leave-one-out split shape."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from workloads.data import movielens
from workloads.data.window import validate_impressions
from workloads.data.schema import IMPRESSIONS, data_root


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    # The wheel is cached under the data root, so only the first run on a machine downloads it.
    try:
        return movielens.prepare(tmp_path_factory.mktemp("ml") / "movielens", data_root() / "cache")
    except movielens.MovieLensUnavailable as err:
        pytest.skip(f"MovieLens-100K needs the recbole wheel from PyPI, which is unreachable here: {err}")


@pytest.fixture(scope="module")
def ratings(prepared: dict[str, Any]) -> pd.DataFrame:
    frame = pq.read_table(prepared["files"]["impressions"]).to_pandas()
    frame["ts"] = frame["timestamp"].astype("int64")
    return frame


@pytest.fixture(scope="module")
def split(prepared: dict[str, Any]) -> pd.DataFrame:
    return pq.read_table(prepared["files"]["split"]).to_pandas()


def test_counts_are_those_of_movielens_100k(prepared: dict[str, Any], ratings: pd.DataFrame) -> None:
    assert prepared["counts"]["users"] == ratings["member_id"].nunique() == 943
    assert prepared["counts"]["items"] == 1682
    assert len(ratings) == prepared["counts"]["ratings"] == 100_000
    assert pq.read_table(prepared["files"]["users"]).num_rows == 943
    items = pq.read_table(prepared["files"]["items"]).to_pandas()
    assert items["item_id"].is_unique and len(items) == 1682
    assert items.loc[items["item_id"] == 1, "title"].item() == "Toy Story"


def test_event_log_follows_the_impression_contract(prepared: dict[str, Any], ratings: pd.DataFrame) -> None:
    table = pq.read_table(prepared["files"]["impressions"])
    assert table.schema.remove(table.schema.get_field_index("rating")) == IMPRESSIONS
    validate_impressions(Path(prepared["files"]["impressions"]), ["feed"])  # what preprocessing accepts
    assert (ratings["click"] == 1).all()
    np.testing.assert_array_equal(ratings["like"], (ratings["rating"] >= 4).astype(np.int8))
    assert ratings["rating"].between(1, 5).all()
    assert ratings["topic"].between(0, len(movielens.GENRES) - 1).all()
    assert ratings["session_id"].is_unique
    assert (ratings["item_created_at"] <= ratings["timestamp"]).mean() > 0.99  # released before rated


def test_leave_one_out_targets_are_each_users_latest_ratings(
    split: pd.DataFrame, ratings: pd.DataFrame
) -> None:
    assert len(split) == 943 and split["member_id"].is_unique
    assert split["valid_item_id"].notna().all() and split["test_item_id"].notna().all()
    ordered = ratings.sort_values(["member_id", "ts", "item_id"])
    sequences = {m: g for m, g in ordered.groupby("member_id")}
    for row in split.itertuples():
        history = sequences[row.member_id]
        assert len(row.train_item_ids) == len(history) - 2
        assert row.test_item_id == history["item_id"].iloc[-1]
        assert row.valid_item_id == history["item_id"].iloc[-2]
        assert row.test_timestamp == history["ts"].max()
        assert row.test_timestamp >= row.valid_timestamp >= max(row.train_timestamps)
        assert row.test_item_id not in row.train_item_ids and row.valid_item_id not in row.train_item_ids
        np.testing.assert_array_equal(row.train_item_ids, history["item_id"].iloc[:-2])
        assert (np.diff(row.train_timestamps) >= 0).all()
    assert split["train_item_ids"].map(len).sum() + 2 * len(split) == len(ratings)


def test_users_with_fewer_than_three_ratings_have_no_targets() -> None:
    ratings = pd.DataFrame(
        {
            "member_id": [1, 1, 2, 2, 2],
            "item_id": [10, 11, 20, 21, 22],
            "ts_us": [1, 2, 1, 2, 3],
            "rating": [5, 2, 3, 4, 1],
        }
    )
    split = movielens.leave_one_out(ratings).to_pandas()
    short, full = split.iloc[0], split.iloc[1]
    assert list(short["train_item_ids"]) == [10, 11] and pd.isna(short["test_item_id"])
    assert list(full["train_item_ids"]) == [20] and (full["valid_item_id"], full["test_item_id"]) == (21, 22)
    # action bitmasks: every rating a click (bit 0), 4+ also a like (bit 1)
    assert list(short["train_actions"]) == [3, 1] and pd.isna(short["valid_actions"])
    assert list(full["train_actions"]) == [1] and full["valid_actions"] == 3


def test_cached_wheel_is_reused_without_pip(
    prepared: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_network(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip must not run when the wheel is cached")

    monkeypatch.setattr(subprocess, "run", no_network)
    again = movielens.prepare(tmp_path / "ml", data_root() / "cache")
    assert again["counts"] == prepared["counts"]


def test_failed_download_is_reported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def pip_fails(cmd: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(
            cmd, 1, "", "ERROR: No matching distribution found for recbole==1.2.1"
        )

    monkeypatch.setattr(subprocess, "run", pip_fails)
    monkeypatch.setattr(movielens._pip_download.retry, "sleep", lambda _: None)  # type: ignore[attr-defined]
    with pytest.raises(movielens.MovieLensUnavailable, match=r"recbole==1\.2\.1.*No matching distribution"):
        movielens.prepare(tmp_path / "ml", tmp_path / "empty-cache")
    assert not (tmp_path / "ml").exists()
