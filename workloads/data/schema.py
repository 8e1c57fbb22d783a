"""The table contracts every stage agrees on: the world's tables, the event log, the training examples.

Generator, Feast repo, Ray Data preprocessing, training, evaluation and serving all import these
names instead of spelling column names themselves, so a rename breaks loudly in one place.
Timestamps are ``timestamp[us, tz=UTC]`` in parquet (duckdb 2 cannot materialize nanosecond tz
timestamps) and int64 microseconds since the epoch inside numpy code (tz-aware numpy arrays
degrade to object arrays).
"""

from __future__ import annotations

import os
from enum import IntEnum
from pathlib import Path

import pyarrow as pa

TS = pa.timestamp("us", tz="UTC")


def data_root() -> Path:
    """Where generated data lives (never committed); ``RANKRAY_DATA_DIR`` overrides ``./data``."""
    return Path(os.environ.get("RANKRAY_DATA_DIR", "data")).resolve()


class Action(IntEnum):
    """Bit positions of the multi-hot action vector stored as one int16 bitmask per impression."""

    CLICK = 0
    LIKE = 1
    COMMENT = 2
    SHARE = 3
    LONG_DWELL = 4
    APPLY = 5  # jobs surface
    VIEW = 6  # jobs surface
    DISMISS = 7  # jobs surface


ACTION_COLUMNS: list[str] = [a.name.lower() for a in Action]
FEED_ACTIONS: list[Action] = [Action.CLICK, Action.LIKE, Action.COMMENT, Action.SHARE, Action.LONG_DWELL]
JOB_ACTIONS: list[Action] = [Action.APPLY, Action.VIEW, Action.DISMISS]

# The ranking tasks of the LiGR paper (section 3.1): "contribution" is 1 if any of like/comment/share.
TASKS: list[str] = ["click", "contribution", "long_dwell"]
CONTRIBUTION_MASK = (1 << Action.LIKE) | (1 << Action.COMMENT) | (1 << Action.SHARE)


def task_labels(actions_bitmask: int) -> tuple[int, int, int]:
    """(click, contribution, long_dwell) labels of one impression's action bitmask."""
    return (
        (actions_bitmask >> Action.CLICK) & 1,
        int(actions_bitmask & CONTRIBUTION_MASK != 0),
        (actions_bitmask >> Action.LONG_DWELL) & 1,
    )


class PostType(IntEnum):
    TEXT = 0
    PHOTO = 1
    VIDEO = 2
    ARTICLE = 3
    JOB = 4  # job postings share the item id space with posts


SURFACES: list[str] = ["feed", "jobs"]
CONTENT_DIM = 32  # the items' content embedding width
N_AGE_BUCKETS = 16


# --- The world's tables (written by `rankray data synth`, read by Feast and preprocessing) -------------

MEMBERS = pa.schema(
    [
        ("member_id", pa.int64()),
        ("title", pa.string()),
        ("skills", pa.list_(pa.string())),
        ("industry", pa.string()),
        ("location", pa.string()),
        ("seniority", pa.int8()),  # 0 intern .. 5 executive
        ("join_date", TS),
        ("activity_level", pa.float32()),  # expected sessions per day; heavy-tailed
        ("event_timestamp", TS),  # Feast: when this profile row became valid
    ]
)

ACTORS = pa.schema(
    [
        ("actor_id", pa.int64()),
        ("name", pa.string()),
        ("kind", pa.string()),  # "member" | "company"
        ("industry", pa.string()),
        ("event_timestamp", TS),
    ]
)

ITEMS = pa.schema(
    [
        ("item_id", pa.int64()),
        ("item_kind", pa.string()),  # "post" | "job"
        ("actor_id", pa.int64()),  # post author or hiring company
        ("post_type", pa.int8()),  # PostType
        ("topic", pa.int16()),
        ("created_at", TS),
        ("text", pa.string()),  # templated post text or job description
        ("content_emb", pa.list_(pa.float32(), CONTENT_DIM)),
        # jobs only (null for posts)
        ("job_title", pa.string()),
        ("company", pa.string()),
        ("location", pa.string()),
        ("required_skills", pa.list_(pa.string())),
        ("seniority", pa.int8()),
        ("event_timestamp", TS),
    ]
)

FOLLOWS = pa.schema(
    [
        ("member_id", pa.int64()),
        ("actor_id", pa.int64()),
        ("created_at", TS),
    ]
)

# The impression log: one row per (member, item) shown in a session, with its multi-hot outcome.
# Item attributes are denormalized the way a tracking event carries them.
IMPRESSIONS = pa.schema(
    [
        ("impression_id", pa.int64()),
        ("member_id", pa.int64()),
        ("item_id", pa.int64()),
        ("session_id", pa.int64()),  # globally unique
        ("position", pa.int16()),  # 0-based slot in the session
        ("timestamp", TS),
        ("surface", pa.string()),  # SURFACES
        ("actor_id", pa.int64()),
        ("post_type", pa.int8()),
        ("topic", pa.int16()),
        ("item_created_at", TS),
        *[(c, pa.int8()) for c in ACTION_COLUMNS],
    ]
)

WORLD_TABLES: dict[str, pa.Schema] = {
    "members": MEMBERS,
    "actors": ACTORS,
    "items": ITEMS,
    "follows": FOLLOWS,
    "impressions": IMPRESSIONS,
}

# --- Hand-crafted counters of the classic production ranker (LiGR section 3.1 baseline) -------------
# Point-in-time as of the session start; defined once in workloads.data.counters and used by both
# the Feast repo (serving) and preprocessing (training), so the baseline trains on what it serves.
COUNTER_FEATURES: list[str] = [
    "ma_imp_7d",  # member x actor impressions, last 7 days
    "ma_eng_7d",  # member x actor engagements (any feed action), last 7 days
    "ma_eng_30d",
    "mt_imp_7d",  # member x topic
    "mt_eng_7d",
    "mt_eng_30d",
    "item_imp_1d",  # item popularity
    "item_eng_1d",
    "item_ctr_7d",
    "actor_eng_rate_30d",  # actor engagement rate over all members
    "member_eng_rate_30d",  # member activity
]

# --- Training examples (written by `python -m workloads.data.preprocess`) ------------------------------
# One row per (member, target session). Lists are variable length; collate pads. History lists are in
# time order and hold only events strictly before session_start (point-in-time correctness).
HISTORY_COLUMNS: list[str] = [
    "hist_item_id",
    "hist_actor_id",
    "hist_post_type",
    "hist_topic",
    "hist_age_bucket",
    "hist_session_id",
    "hist_actions",  # int16 bitmask (Action)
    "hist_timestamp",  # int64 us
]
CANDIDATE_COLUMNS: list[str] = [
    "cand_item_id",
    "cand_actor_id",
    "cand_post_type",
    "cand_topic",
    "cand_age_bucket",
    "cand_position",
    "cand_actions",  # int16 bitmask: the labels
    *[f"cand_{c}" for c in COUNTER_FEATURES],  # float32 counters, point-in-time
]

EXAMPLES = pa.schema(
    [
        ("member_id", pa.int64()),
        ("session_id", pa.int64()),
        ("surface", pa.string()),
        ("session_start", pa.int64()),  # us since epoch
        ("split", pa.string()),  # "train" | "eval"
        ("history_len", pa.int32()),
        ("hist_item_id", pa.list_(pa.int64())),
        ("hist_actor_id", pa.list_(pa.int64())),
        ("hist_post_type", pa.list_(pa.int8())),
        ("hist_topic", pa.list_(pa.int16())),
        ("hist_age_bucket", pa.list_(pa.int8())),
        ("hist_session_id", pa.list_(pa.int64())),
        ("hist_actions", pa.list_(pa.int16())),
        ("hist_timestamp", pa.list_(pa.int64())),
        ("cand_item_id", pa.list_(pa.int64())),
        ("cand_actor_id", pa.list_(pa.int64())),
        ("cand_post_type", pa.list_(pa.int8())),
        ("cand_topic", pa.list_(pa.int16())),
        ("cand_age_bucket", pa.list_(pa.int8())),
        ("cand_position", pa.list_(pa.int16())),
        ("cand_actions", pa.list_(pa.int16())),
        *[(f"cand_{c}", pa.list_(pa.float32())) for c in COUNTER_FEATURES],
    ]
)


def age_bucket_us(age_us: int | float) -> int:
    """Log2 bucket of an item's age in hours at impression time (LiGR 'update age' feature)."""
    import math

    hours = max(float(age_us), 0.0) / 3.6e9
    return min(int(math.log2(1.0 + hours)), N_AGE_BUCKETS - 1)
