"""rankray's features, declared: entities, parquet sources, feature views and per-model services.

`feast apply` diffs these declarations against the registry. The parquet tables are computed by
`rankray features build` (workloads/data/features.py) into <data root>/world/features/; the counter
views come from workloads.data.counters, the one definition training and serving share. Importing
this file only reads RANKRAY_DATA_DIR: no side effects (feast apply imports every .py file here).
"""

import os
from datetime import timedelta
from pathlib import Path

from feast import Entity, FeatureService, FeatureView, Field, FileSource, ValueType
from feast.types import Array, Float32, Int32, Int64, String, UnixTimestamp

from workloads.data.counters import COUNTER_GROUPS

# Same default as workloads.data.schema.data_root() run from the repository root.
DATA_ROOT = Path(os.environ.get("RANKRAY_DATA_DIR") or Path(__file__).resolve().parent.parent / "data")
FEATURES_DIR = DATA_ROOT / "world" / "features"
OWNER = {"owner": "rankray", "world": "synthetic"}
# Snapshots stay valid until the next one replaces them. Not timedelta(0) (= never expires): a first
# `feast materialize-incremental` looks back one ttl (52 weeks for 0), and the synthetic world is older.
NO_EXPIRY = timedelta(days=3650)


def parquet_source(table: str, description: str) -> FileSource:
    return FileSource(
        name=f"{table}_source",
        path=str(FEATURES_DIR / f"{table}.parquet"),
        timestamp_field="event_timestamp",
        description=description,
        tags=OWNER,
    )


# --- Entities ----------------------------------------------------------------------------------------

member = Entity(
    name="member", join_keys=["member_id"], value_type=ValueType.INT64, description="A LinkedIn-like member"
)
item = Entity(
    name="item", join_keys=["item_id"], value_type=ValueType.INT64, description="A feed post or job posting"
)
actor = Entity(
    name="actor",
    join_keys=["actor_id"],
    value_type=ValueType.INT64,
    description="A post author or hiring company",
)
topic = Entity(name="topic", join_keys=["topic"], value_type=ValueType.INT64, description="A feed post topic")

# --- Profiles and items ------------------------------------------------------------------------------

# Who the member is, as 360Brew verbalizes it (the generator's hidden activity level is not a feature).
member_profile = FeatureView(
    name="member_profile",
    entities=[member],
    ttl=NO_EXPIRY,
    schema=[
        Field(name="title", dtype=String),
        Field(name="skills", dtype=Array(String)),
        Field(name="industry", dtype=String),
        Field(name="location", dtype=String),
        Field(name="seniority", dtype=Int32, description="0 intern .. 5 executive"),
        Field(name="join_date", dtype=UnixTimestamp),
    ],
    source=parquet_source("member_profile", "members' profiles as of when each row became valid"),
    description="Member profile: title, skills, industry, location, seniority, join date",
    tags={**OWNER, "models": "brew"},
)

actor_profile = FeatureView(
    name="actor_profile",
    entities=[actor],
    ttl=NO_EXPIRY,
    schema=[
        Field(name="name", dtype=String),
        Field(name="kind", dtype=String, description="member | company"),
        Field(name="industry", dtype=String),
    ],
    source=parquet_source("actor_profile", "authors and companies"),
    description="Actor profile: display name, kind and industry",
    tags={**OWNER, "models": "brew"},
)

# What the ranker knows about a candidate: ids, type, topic, age and the content embedding.
item_features = FeatureView(
    name="item_features",
    entities=[item],
    ttl=NO_EXPIRY,
    schema=[
        Field(name="item_kind", dtype=String, description="post | job"),
        Field(name="actor_id", dtype=Int64, description="author or hiring company"),
        Field(name="post_type", dtype=Int32, description="workloads.data.schema.PostType"),
        Field(name="topic", dtype=Int32),
        Field(name="created_at", dtype=UnixTimestamp),
        Field(name="content_emb", dtype=Array(Float32), description="32-d content embedding"),
        Field(name="text", dtype=String, description="post text or job description"),
        Field(name="job_title", dtype=String, description="jobs only"),
        Field(name="company", dtype=String, description="jobs only"),
        Field(name="location", dtype=String, description="jobs only"),
        Field(name="required_skills", dtype=Array(String), description="jobs only"),
        Field(name="seniority", dtype=Int32, description="jobs only; -1 for posts"),
    ],
    source=parquet_source("item_features", "posts and jobs, valid from their creation"),
    description="Item features: author, post type, topic, creation time, content embedding, text",
    tags={**OWNER, "models": "ligr,dcnv2,brew"},
)

# The member's last N impressions in time order, as parallel arrays (LiGR's history tokens).
member_history = FeatureView(
    name="member_history",
    entities=[member],
    ttl=NO_EXPIRY,
    schema=[
        Field(name="history_len", dtype=Int32),
        Field(name="hist_item_id", dtype=Array(Int64)),
        Field(name="hist_actor_id", dtype=Array(Int64)),
        Field(name="hist_post_type", dtype=Array(Int32)),
        Field(name="hist_topic", dtype=Array(Int32)),
        Field(name="hist_age_bucket", dtype=Array(Int32), description="log2 item age in hours at impression"),
        Field(name="hist_session_id", dtype=Array(Int64)),
        Field(name="hist_actions", dtype=Array(Int32), description="Action bitmask per impression"),
        Field(name="hist_timestamp", dtype=Array(Int64), description="microseconds since the epoch"),
    ],
    source=parquet_source("member_history", "last-N impressions per member at each history snapshot"),
    description="Member history: last N impressions (item, actor, type, topic, age, session, actions, time)",
    tags={**OWNER, "models": "ligr,brew"},
)

# --- Counters: one view per key, generated from the single definition in workloads.data.counters ----

_KEY_ENTITIES = {"member_id": member, "actor_id": actor, "item_id": item, "topic": topic}
counter_views = {
    group.view: FeatureView(
        name=group.view,
        entities=[_KEY_ENTITIES[k] for k in group.keys],
        ttl=NO_EXPIRY,
        schema=[
            Field(
                name=c.name,
                dtype=Float32,
                description=f"{c.stat} over the last {c.days} day(s), point-in-time",
            )
            for c in group.counters
        ],
        source=parquet_source(group.view, f"daily snapshots of the {' x '.join(group.keys)} counters"),
        description=f"Feed engagement counters per {' x '.join(group.keys)} (workloads/data/counters.py)",
        tags={**OWNER, "models": "dcnv2"},
    )
    for group in COUNTER_GROUPS
}
member_actor_counters = counter_views["member_actor_counters"]
member_topic_counters = counter_views["member_topic_counters"]
item_counters = counter_views["item_counters"]
actor_counters = counter_views["actor_counters"]
member_counters = counter_views["member_counters"]

# --- Feature services: the feature list of one model version, for training and serving alike ----------

ligr_v1 = FeatureService(
    name="ligr_v1",
    features=[
        member_history,
        item_features[["actor_id", "post_type", "topic", "created_at", "content_emb"]],
    ],
    description="LiGR: the member's interleaved history plus a handful of item features",
    tags={**OWNER, "model": "ligr"},
)

ligr_v2 = FeatureService(
    name="ligr_v2",
    features=[
        member_history,
        item_features[["actor_id", "post_type", "topic", "created_at", "content_emb"]],
        # the production model's top counters on the candidate tokens (LiGR 5.4): what `make demo` trains
        member_actor_counters[["ma_eng_30d"]],
        item_counters[["item_ctr_7d"]],
    ],
    description="LiGR plus the two counters its candidates read (model.counters in the RankingModel)",
    tags={**OWNER, "model": "ligr"},
)

dcnv2_v1 = FeatureService(
    name="dcnv2_v1",
    features=[
        item_features[["actor_id", "post_type", "topic", "created_at"]],
        *counter_views.values(),
    ],
    description="DCNv2 production baseline: ids plus the hand-crafted counters",
    tags={**OWNER, "model": "dcnv2"},
)

brew_v1 = FeatureService(
    name="brew_v1",
    features=[
        member_profile,
        member_history,
        item_features[
            ["item_kind", "text", "job_title", "company", "location", "required_skills", "seniority"]
        ],
    ],
    description="360Brew: what the verbalizer turns into the prompt (profile, history, item text)",
    tags={**OWNER, "model": "brew"},
)
