"""The feature tables behind the Feast repo, and the Python side of feast apply, materialize and online reads.

`build_feature_tables` turns a world (workloads.data.synth) into the parquet tables that
feature_repo/feature_definitions.py declares as sources: profiles, items, last-N member histories as
arrays (Feast has no last-N aggregation, so a batch job builds them) and daily counter snapshots
(workloads.data.counters). `apply` and `materialize` drive Feast's Python API exactly as the feast CLI
would; `OnlineFeatures` is what serving reads, one online call per feature view per request batch
(for counters, only the views holding the counters the served model reads).

The feature store config is the repo's feature_store.yaml, or whatever FEAST_FS_YAML_FILE_PATH names
(Feast's own switch, honoured by the CLI and the Python API alike), e.g. feature_store.redis.yaml.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from workloads.data.atomic import MANIFEST, atomic_dir
from workloads.data.counters import (
    COUNTER_GROUPS,
    DAY_US,
    Counter,
    CounterGroup,
    counter_snapshots,
    empty_counters,
    to_epoch_us,
)
from workloads.data.schema import (
    ACTION_COLUMNS,
    CONTENT_DIM,
    COUNTER_FEATURES,
    N_AGE_BUCKETS,
    TS,
    WORLD_TABLES,
    data_root,
)
from workloads.stage import run_stage

HOUR_US = 3_600 * 1_000_000
HISTORY_ARRAYS: dict[str, pa.DataType] = {
    "hist_item_id": pa.int64(),
    "hist_actor_id": pa.int64(),
    "hist_post_type": pa.int32(),
    "hist_topic": pa.int32(),
    "hist_age_bucket": pa.int32(),
    "hist_session_id": pa.int64(),
    "hist_actions": pa.int32(),
    "hist_timestamp": pa.int64(),
}


class FeatureTablesConfig(BaseModel):
    """How much history and how many snapshots the feature tables hold."""

    model_config = ConfigDict(extra="forbid")

    history_len: int = Field(256, ge=1, le=8192, description="impressions kept per member history (last N)")
    # The same default as PreprocessConfig.surfaces: serving must show LiGR the history it trained on.
    history_surfaces: list[Literal["feed", "jobs"]] = Field(
        ["feed"], min_length=1, description="surfaces whose impressions make up the history"
    )
    history_snapshots: int = Field(
        1, ge=1, description="daily member_history snapshots ending at the world's end (1 = the end only)"
    )
    counter_snapshots: int = Field(7, ge=1, description="daily counter snapshots ending at the world's end")


# --- Building the tables ------------------------------------------------------------------------------


def _read_world(world_dir: Path) -> tuple[dict[str, pa.Table], int]:
    """The world's tables, checked against schema.WORLD_TABLES, and its end (us, exclusive)."""
    meta_path = world_dir / "world.json"
    if not meta_path.is_file():
        raise FileNotFoundError(f"{meta_path} not found: generate a world first (`rankray data synth`)")
    tables = {}
    for name, schema in WORLD_TABLES.items():
        path = world_dir / f"{name}.parquet"
        if not path.is_file():
            raise FileNotFoundError(f"world table {path} not found")
        table = pq.read_table(path)
        missing = [f.name for f in schema if f.name not in table.column_names]
        if missing:
            raise ValueError(f"world table {name!r} is missing column(s) {missing}; expected {schema.names}")
        tables[name] = table
    end = datetime.fromisoformat(json.loads(meta_path.read_text())["end"])
    return tables, int(end.timestamp()) * 1_000_000 + end.microsecond


def member_profile_table(members: pa.Table) -> pa.Table:
    return pa.table(
        {
            "member_id": members["member_id"],
            "title": members["title"],
            "skills": members["skills"],
            "industry": members["industry"],
            "location": members["location"],
            "seniority": members["seniority"].cast(pa.int32()),
            "join_date": members["join_date"].cast(TS),
            "event_timestamp": members["event_timestamp"].cast(TS),
        }
    )


def actor_profile_table(actors: pa.Table) -> pa.Table:
    columns = ["actor_id", "name", "kind", "industry"]
    return pa.table(
        {**{c: actors[c] for c in columns}, "event_timestamp": actors["event_timestamp"].cast(TS)}
    )


def item_features_table(items: pa.Table) -> pa.Table:
    """Items as Feast serves them (no int8/int16 or fixed-size lists); posts get -1 / [] in job fields."""
    return pa.table(
        {
            "item_id": items["item_id"],
            "item_kind": items["item_kind"],
            "actor_id": items["actor_id"],
            "post_type": items["post_type"].cast(pa.int32()),
            "topic": items["topic"].cast(pa.int32()),
            "created_at": items["created_at"].cast(TS),
            "content_emb": items["content_emb"].cast(pa.list_(pa.float32())),
            "text": items["text"],
            "job_title": items["job_title"],
            "company": items["company"],
            "location": items["location"],
            "required_skills": pc.fill_null(items["required_skills"], pa.scalar([], pa.list_(pa.string()))),
            "seniority": pc.fill_null(items["seniority"].cast(pa.int32()), -1),
            "event_timestamp": items["event_timestamp"].cast(TS),
        }
    )


def age_buckets(age_us: np.ndarray) -> np.ndarray:
    """Vectorized `schema.age_bucket_us`: log2 of (1 + age in hours), capped."""
    hours = np.maximum(age_us, 0) / HOUR_US
    return np.minimum(np.floor(np.log2(1.0 + hours)), N_AGE_BUCKETS - 1).astype(np.int32)


def member_history_table(
    impressions: pd.DataFrame, as_of: Sequence[int], length: int, surfaces: Sequence[str] = ("feed",)
) -> pa.Table:
    """Each member's last `length` impressions strictly before each snapshot time, as parallel arrays.

    Ordered like preprocessing's timelines (time, session, position). A snapshot holds the members
    with impressions since the previous snapshot (all of them in the first): the latest row at or
    before a snapshot time is then still the member's history at that time.
    """
    log = impressions[impressions["surface"].isin(list(surfaces))]
    log = log.sort_values(["member_id", "timestamp", "session_id", "position"], kind="stable")
    member = log["member_id"].to_numpy(dtype=np.int64)
    ts = to_epoch_us(log["timestamp"], "timestamp")
    actions = np.zeros(len(log), dtype=np.int32)
    for bit, column in enumerate(ACTION_COLUMNS):
        actions |= (log[column].to_numpy() > 0).astype(np.int32) << bit
    values = {
        "hist_item_id": log["item_id"].to_numpy(dtype=np.int64),
        "hist_actor_id": log["actor_id"].to_numpy(dtype=np.int64),
        "hist_post_type": log["post_type"].to_numpy(dtype=np.int32),
        "hist_topic": log["topic"].to_numpy(dtype=np.int32),
        "hist_age_bucket": age_buckets(ts - to_epoch_us(log["item_created_at"], "item_created_at")),
        "hist_session_id": log["session_id"].to_numpy(dtype=np.int64),
        "hist_actions": actions,
        "hist_timestamp": ts,
    }
    snapshots = np.sort(np.asarray(as_of, dtype=np.int64))
    parts = []
    for i, t in enumerate(snapshots):
        since = snapshots[i - 1] if i else np.iinfo(np.int64).min
        before = np.flatnonzero(ts < t)  # per member a prefix of its (time-sorted) rows
        changed = np.unique(member[before][ts[before] >= since])
        rows = before[np.isin(member[before], changed)]
        keep, members, sizes = _last_rows_per_group(member[rows], length)
        offsets = pa.array(np.r_[0, np.cumsum(sizes)], pa.int32())
        columns = {
            name: pa.ListArray.from_arrays(offsets, pa.array(values[name][rows[keep]], dtype))
            for name, dtype in HISTORY_ARRAYS.items()
        }
        parts.append(
            pa.table(
                {
                    "member_id": pa.array(members, pa.int64()),
                    "history_len": pa.array(sizes, pa.int32()),
                    **columns,
                    "event_timestamp": pa.array(np.full(len(members), t), pa.int64()).cast(TS),
                }
            )
        )
    return pa.concat_tables(parts)


def _last_rows_per_group(group: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Positions of each group's last `length` rows (groups are contiguous), the groups, and their sizes."""
    if len(group) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, empty
    starts = np.flatnonzero(np.r_[True, group[1:] != group[:-1]])
    sizes = np.diff(np.r_[starts, len(group)])
    from_end = np.repeat(starts + sizes, sizes) - np.arange(len(group)) - 1
    return np.flatnonzero(from_end < length), group[starts], np.minimum(sizes, length)


def _daily(end: int, count: int) -> list[int]:
    """`count` snapshot times one day apart, the last one at `end`."""
    return [end - k * DAY_US for k in reversed(range(count))]


def build_feature_tables(world_dir: Path, cfg: FeatureTablesConfig | None = None) -> dict[str, Any]:
    """Write world_dir/features/*.parquet (replaced atomically) and return a summary."""
    cfg = cfg or FeatureTablesConfig()
    began = time.perf_counter()
    world_dir = Path(world_dir)
    world, end = _read_world(world_dir)
    impressions = world["impressions"].to_pandas()
    if impressions.empty:
        raise ValueError(f"world table 'impressions' in {world_dir} is empty")
    history_as_of, counter_as_of = _daily(end, cfg.history_snapshots), _daily(end, cfg.counter_snapshots)
    tables = {
        "member_profile": member_profile_table(world["members"]),
        "actor_profile": actor_profile_table(world["actors"]),
        "item_features": item_features_table(world["items"]),
        "member_history": member_history_table(
            impressions, history_as_of, cfg.history_len, cfg.history_surfaces
        ),
        **counter_snapshots(impressions, counter_as_of),
    }
    manifest = {
        "world": str(world_dir),
        "end": _iso(end),
        "history_snapshots": [_iso(t) for t in history_as_of],
        "counter_snapshots": [_iso(t) for t in counter_as_of],
        "rows": {name: table.num_rows for name, table in tables.items()},
        "config": cfg.model_dump(),
    }
    with atomic_dir(world_dir / "features") as tmp:
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return {"out": str(world_dir / "features"), **manifest, "seconds": round(time.perf_counter() - began, 2)}


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=UTC).isoformat()


# --- Feast: apply, materialize ------------------------------------------------------------------------


def feature_store(repo: Path) -> Any:
    """The repo's FeatureStore (feature_store.yaml, or the file FEAST_FS_YAML_FILE_PATH names)."""
    from feast import FeatureStore

    repo = Path(repo).resolve()
    if not repo.is_dir():
        raise FileNotFoundError(f"Feast repo {repo} not found")
    return FeatureStore(repo_path=str(repo))


def _repo_contents(repo: Path) -> Any:
    """Import the repo's definition files as `feast apply` does (honouring .feastignore), afresh.

    Feast imports them as top-level modules; dropping them from sys.modules before and after means a
    second apply in this process (another repo copy, another RANKRAY_DATA_DIR) really re-reads them.
    """
    from feast.repo_operations import get_repo_files, parse_repo, py_path_to_module

    with contextlib.chdir(repo):
        modules = [py_path_to_module(path) for path in get_repo_files(repo)]
        for name in modules:
            sys.modules.pop(name, None)
        sys.path.insert(0, str(repo))
        try:
            return parse_repo(repo)
        finally:
            sys.path.remove(str(repo))
            for name in modules:
                sys.modules.pop(name, None)


def missing_tables(views: Sequence[Any]) -> dict[str, str]:
    """Feature views whose local parquet table does not exist: ``feast apply`` registers them anyway
    (with a warning), and reading them later fails on a bare path. Remote tables (``s3://``) are not
    checked."""
    paths = {view.name: view.batch_source.path for view in views}
    return {name: path for name, path in paths.items() if "://" not in path and not Path(path).exists()}


def apply(repo: Path) -> dict[str, Any]:
    """`feast apply` from Python: register the repo's entities, views and services; drop removed ones."""
    from feast.repo_operations import extract_objects_for_apply_delete

    began = time.perf_counter()
    repo = Path(repo).resolve()
    store = feature_store(repo)
    contents = _repo_contents(repo)
    provider = store._get_provider()  # the CLI validates sources the same way before applying
    for view in contents.feature_views:
        provider.validate_data_source(store.config, view.batch_source)
    to_apply, to_delete, _, _ = extract_objects_for_apply_delete(store.project, store.registry, contents)
    store.apply(to_apply, objects_to_delete=to_delete, partial=False)
    return {
        "project": store.project,
        "registry": str((repo / store.config.registry.path).resolve()),  # relative paths are the repo's
        "entities": sorted(e.name for e in store.list_entities()),
        "feature_views": sorted(v.name for v in store.list_feature_views()),
        "feature_services": sorted(s.name for s in store.list_feature_services()),
        "deleted": sorted(o.name for o in to_delete),
        # registered all the same; `materialize` refuses them until `rankray features build` writes them
        "tables_missing": sorted(missing_tables(contents.feature_views)),
        "seconds": round(time.perf_counter() - began, 2),
    }


@contextlib.contextmanager
def offline_session() -> Iterator[None]:
    """Close the duckdb connection Feast's offline store opens (through ibis' default backend) when done.

    Left open, duckdb's bindings print dozens of "leaked instance" lines when the interpreter exits.
    A connection that existed before is left alone.
    """
    import ibis

    opened_here = ibis.options.default_backend is None
    try:
        yield
    finally:
        backend = ibis.options.default_backend
        if opened_here and backend is not None:
            backend.disconnect()
            ibis.options.default_backend = None


def materialize(repo: Path, services: list[str] | None = None) -> dict[str, Any]:
    """Load feature views' latest rows into the online store, over the whole span of their tables.

    With ``services``, only the views those feature services read: a serving deployment needs its own
    model's features online, and the daily counter snapshots are most of the materialization time.
    """
    began = time.perf_counter()
    store = feature_store(repo)
    views = store.list_feature_views()
    if not views:
        raise ValueError(f"no feature views registered for project {store.project!r}: run apply first")
    if services:
        known = {service.name: service for service in store.list_feature_services()}
        unknown = sorted(set(services) - set(known))
        if unknown:
            raise ValueError(
                f"feature service(s) {unknown} are not registered; expected some of {sorted(known)}"
            )
        wanted = {p.name for name in services for p in known[name].feature_view_projections}
        views = [view for view in views if view.name in wanted]
    missing = missing_tables(views)
    if missing:
        raise FileNotFoundError(
            f"feature view table(s) missing: {missing}; build them first "
            "(`rankray features build`, or set RANKRAY_DATA_DIR to the data root that holds them)"
        )
    spans = {}
    for view in views:
        stamps = pq.read_table(view.batch_source.path, columns=["event_timestamp"])["event_timestamp"]
        spans[view.name] = (pc.min(stamps).as_py(), pc.max(stamps).as_py())
    start = min(lo for lo, _ in spans.values())
    end = max(hi for _, hi in spans.values()) + timedelta(seconds=1)  # the range's end is exclusive
    with offline_session():
        store.materialize(start_date=start, end_date=end, feature_views=[v.name for v in views])
    return {
        "project": store.project,
        "online_store": store.config.online_store.type,
        "start": start.isoformat(),
        "end": end.isoformat(),
        "feature_views": sorted(spans),
        "seconds": round(time.perf_counter() - began, 2),
    }


# --- Online reads for serving -------------------------------------------------------------------------


def _int64_us(values: list[Any]) -> np.ndarray:
    return np.array([-1 if v is None else int(v.timestamp()) * 1_000_000 + v.microsecond for v in values])


def counter_reads(counters: Sequence[str]) -> list[tuple[CounterGroup, tuple[Counter, ...]]]:
    """The counter views holding ``counters``, each with the ones of its counters asked for; views with
    none asked for are left out, so no counters means no views. Unknown or repeated names are refused."""
    if isinstance(counters, str):
        raise TypeError(f"counters: a sequence of counter names, not the one string {counters!r}")
    names = list(counters)
    unknown = [c for c in names if c not in COUNTER_FEATURES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"counters: {names} must be distinct names of {COUNTER_FEATURES}")
    reads = [(g, tuple(c for c in g.counters if c.name in names)) for g in COUNTER_GROUPS]
    return [(group, wanted) for group, wanted in reads if wanted]


class OnlineFeatures:
    """Batched online reads for serving: one Feast call per feature view per request batch.

    Unknown keys come back as empty histories, ``found=False`` items, and `empty_counters` values,
    the same numbers `counters_at` gives a key with no impressions.
    """

    def __init__(self, repo: Path = Path("feature_repo")) -> None:
        self.store = feature_store(repo)
        self._fields = {v.name: [f.name for f in v.features] for v in self.store.list_feature_views()}

    def never_materialized(self, counters: Sequence[str]) -> list[str]:
        """The counter views holding ``counters`` that were never loaded into the online store: a model
        reading them would score every candidate as if nobody had ever engaged with anything. Views
        holding none of ``counters`` are not read (see `counters`), so they are not looked at."""
        views = {group.view for group, _ in counter_reads(counters)}
        return sorted(
            v.name
            for v in self.store.list_feature_views()
            if v.name in views and not v.materialization_intervals
        )

    def _read(
        self, view: str, entity_rows: dict[str, Sequence[Any]], fields: Sequence[str] | None = None
    ) -> dict[str, list[Any]]:
        """``fields`` of ``view`` (default: all of them) for the entity rows, as Feast's to_dict()."""
        refs = [f"{view}:{name}" for name in (self._fields[view] if fields is None else fields)]
        return self.store.get_online_features(features=refs, entity_rows=entity_rows).to_dict()

    def member_profile(self, member_ids: Sequence[int]) -> dict[str, list[Any]]:
        """Profile fields per member (lists; None where the member is unknown); join_date as int64 us."""
        out = self._read("member_profile", {"member_id": [int(m) for m in member_ids]})
        out["join_date"] = _int64_us(out["join_date"]).tolist()
        return out

    def member_history(self, member_ids: Sequence[int]) -> dict[str, Any]:
        """Each member's history arrays (numpy, time order) and length; unknown members get empty ones."""
        raw = self._read("member_history", {"member_id": [int(m) for m in member_ids]})
        out: dict[str, Any] = {"member_id": np.asarray(raw["member_id"], dtype=np.int64)}
        out["history_len"] = np.array([n or 0 for n in raw["history_len"]], dtype=np.int32)
        for name, dtype in HISTORY_ARRAYS.items():
            out[name] = [np.asarray(v or [], dtype=dtype.to_pandas_dtype()) for v in raw[name]]
        return out

    def item_features(self, item_ids: Sequence[int]) -> dict[str, Any]:
        """Item features as numpy arrays (``content_emb`` is (n, dim) float32) and a ``found`` mask."""
        raw = self._read("item_features", {"item_id": [int(i) for i in item_ids]})
        found = np.array([e is not None for e in raw["content_emb"]], dtype=bool)
        embeddings = [e for e in raw["content_emb"] if e is not None]
        dim = len(embeddings[0]) if embeddings else CONTENT_DIM
        out: dict[str, Any] = {"item_id": np.asarray(raw["item_id"], dtype=np.int64), "found": found}
        out["content_emb"] = np.zeros((len(found), dim), dtype=np.float32)  # zeros for unknown items
        if embeddings:
            out["content_emb"][found] = np.asarray(embeddings, dtype=np.float32)
        for name in ("actor_id", "post_type", "topic"):
            out[name] = np.array([-1 if v is None else v for v in raw[name]], dtype=np.int64)
        out["created_at"] = _int64_us(raw["created_at"])
        for name in ("item_kind", "text", "job_title", "company", "location", "required_skills", "seniority"):
            out[name] = raw[name]
        return out

    def counters(self, queries: pd.DataFrame, counters: Sequence[str]) -> pd.DataFrame:
        """`counters_at` values of ``counters`` for (member_id, item_id, actor_id, topic) rows, as of the
        last snapshot: one online read per view holding some of them, of those features only.

        The frame has exactly the ``counters`` columns, in that order (none: no read at all). Only the
        keys of the views read must be in ``queries``.
        """
        reads = counter_reads(counters)
        needed = [
            k for k in ("member_id", "item_id", "actor_id", "topic") if any(k in g.keys for g, _ in reads)
        ]
        missing = [k for k in needed if k not in queries.columns]
        if missing:
            raise ValueError(f"queries is missing column(s) {missing}")
        empty = empty_counters()
        columns: dict[str, np.ndarray] = {}
        for group, wanted in reads:
            keys = queries[list(group.keys)].drop_duplicates()
            raw = self._read(
                group.view,
                {k: keys[k].astype("int64").tolist() for k in group.keys},
                [c.name for c in wanted],
            )
            table = keys.assign(
                **{c.name: [empty[c.name] if v is None else v for v in raw[c.name]] for c in wanted}
            )
            joined = queries[list(group.keys)].merge(table, on=list(group.keys), how="left")
            columns.update({c.name: joined[c.name].to_numpy(dtype=np.float32) for c in wanted})
        return pd.DataFrame(columns, index=queries.index)[list(counters)]


# --- `python -m workloads.data.features`: build, apply, materialize ------------------------------------


class FeaturesStageConfig(FeatureTablesConfig):
    """Build the feature tables of a world, then apply and materialize the Feast repo."""

    world: Path | None = Field(None, description="world folder (default: data_root()/world)")
    repo: Path = Field(Path("feature_repo"), description="Feast repo folder")


def _run(cfg: FeaturesStageConfig) -> dict[str, Any]:
    tables_cfg = FeatureTablesConfig.model_validate(
        cfg.model_dump(include=set(FeatureTablesConfig.model_fields))
    )
    return {
        "build": build_feature_tables(cfg.world or data_root() / "world", tables_cfg),
        "apply": apply(cfg.repo),
        "materialize": materialize(cfg.repo),
    }


def main(argv: list[str] | None = None) -> None:
    run_stage(FeaturesStageConfig, _run, argv)


if __name__ == "__main__":
    main()
