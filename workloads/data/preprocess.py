"""Ray Data preprocessing: LiGR training examples from the impression log, one per (member, target session).

Each example holds the member's last ``max_history`` events strictly before the session starts
(item, actor, post type, topic, item-age bucket, session id, action bitmask and time, in time
order, ready to interleave with their actions as in LiGR section 3.2), the session's candidates
in slot order with their action bitmasks as labels, and the hand-crafted counters of every
candidate as of the session start (`workloads.data.counters`; only the DCNv2 baseline reads them).
Sessions starting in ``[train_start, train_end)`` are training targets and those in
``[train_end, eval_end)`` evaluation targets: the paper trains on a window and evaluates on the
period right after it. Earlier sessions still serve as history.

Pipeline: read parquet -> hash-repartition by member (all of a member's events land in one block)
-> ``map_batches(batch_size=None)`` that builds every example of a block at once with numpy (one
sort, then contiguous ranges of the member's timeline; no Python loop per member or session) ->
counters -> parquet under ``out_dir/{train,eval}/``, published atomically with a manifest. A
per-member ``map_groups`` with a Python loop ran about 200x slower (docs/benchmarks.md), which is
why it is not used. The same code runs on a local cluster (``ray_address: null``) or on a remote
one; there the world and output folders must be on storage every node sees (a shared volume).

Counters need the whole log (item and actor popularity span all members), so every block reads one
shared copy of it from the object store: fine for this world, not for a log larger than a node.
"""

from __future__ import annotations

import json
import os
import time
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray
from ray.data.expressions import col

from workloads.data.atomic import MANIFEST, atomic_dir
from workloads.data.counters import IMPRESSION_COLUMNS as COUNTER_LOG_COLUMNS
from workloads.data.counters import counters_at
from workloads.data.schema import (
    COUNTER_FEATURES,
    EXAMPLES,
    N_AGE_BUCKETS,
    Action,
)
from workloads.data.window import (
    EVENT_COLUMNS,
    PreprocessConfig,
    SplitWindow,
    impressions_path,
    resolve_window,
    validate_impressions,
)
from workloads.stage import run_stage

SPLITS = ("train", "eval")
# Examples before counters are attached: what `build_examples` returns and what the benchmark times.
BASE_EXAMPLES = pa.schema([f for f in EXAMPLES if f.name not in {f"cand_{c}" for c in COUNTER_FEATURES}])
# History-length slices [lo, hi) reported per split: the first ones are the cold-start members.
HISTORY_SLICES = {"0": (0, 1), "1-4": (1, 5), "5-19": (5, 20), "20-99": (20, 100), "100+": (100, 2**31)}
# Partition folder of each row; pyarrow's directory partitioning drops it from the files, `split` stays.
_FOLDER = "_split_folder"

# The shuffle's map tasks run in their own runtime env, so with the default pool (one idle worker per
# CPU) every repartition killed and restarted worker processes: 15-20 s per run on 2 cores instead of
# 0.3 s. Room for two workers per CPU keeps both kinds alive between runs.
LOCAL_CLUSTER_SYSTEM_CONFIG = {"num_workers_soft_limit": 2 * (os.cpu_count() or 1)}


# --- The vectorized core: every example of one block of members at once ------------------------------------
def _column(table: pa.Table, name: str) -> np.ndarray:
    column = table.column(name)
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.int64())  # tz-aware timestamps would become object arrays
    return column.to_numpy()


def _age_bucket(age_us: np.ndarray) -> np.ndarray:
    """`schema.age_bucket_us` over an array."""
    hours = np.maximum(age_us, 0) / 3.6e9
    return np.minimum(np.floor(np.log2(1.0 + hours)), N_AGE_BUCKETS - 1).astype(np.int8)


def _action_bitmask(table: pa.Table) -> np.ndarray:
    bits = np.zeros(table.num_rows, np.int16)
    for action in Action:
        bits |= (_column(table, action.name.lower()) != 0).astype(np.int16) << np.int16(action)
    return bits


def _ranges(begin: np.ndarray, length: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(b, b + n)`` for each (b, n), as one cumulative sum instead of a loop."""
    out = np.ones(int(length.sum()), np.int64)
    begin, length = begin[length > 0], length[length > 0]
    if len(begin):
        starts = np.cumsum(length) - length
        out[0] = begin[0]
        out[starts[1:]] = begin[1:] - (begin[:-1] + length[:-1] - 1)  # jump from the previous range's end
    return np.cumsum(out, out=out)


def _offsets(length: np.ndarray) -> pa.Array:
    offsets = np.zeros(len(length) + 1, np.int64)
    np.cumsum(length, out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise OverflowError("a block's examples exceed 2^31 list entries; raise num_partitions")
    return pa.array(offsets.astype(np.int32), pa.int32())


def _lists(offsets: pa.Array, values: np.ndarray, kind: pa.DataType) -> pa.Array:
    return pa.ListArray.from_arrays(offsets, pa.array(values, type=kind))


def build_examples(events: pa.Table, window: SplitWindow, max_history: int, min_candidates: int) -> pa.Table:
    """Examples (schema `BASE_EXAMPLES`) of every target session in ``events``.

    ``events`` must hold *all* events of each of its members (what the repartition by member
    guarantees). Sorting once by (member, time, session, position) makes each member's timeline
    contiguous, so a session's history is the slice of its member's timeline that ends at the first
    event with the session's start time: strictly earlier events only, never the session itself.
    """
    if events.num_rows == 0:
        return BASE_EXAMPLES.empty_table()
    member, ts = _column(events, "member_id"), _column(events, "timestamp")
    session, position = _column(events, "session_id"), _column(events, "position")
    timeline = np.lexsort((position, session, ts, member))
    member, ts, session, position = member[timeline], ts[timeline], session[timeline], position[timeline]

    row = np.arange(len(timeline))
    new_member = np.r_[True, member[1:] != member[:-1]]
    new_instant = new_member | np.r_[True, ts[1:] != ts[:-1]]
    member_begin = np.maximum.accumulate(np.where(new_member, row, 0))  # first row of the row's member
    instant_begin = np.maximum.accumulate(np.where(new_instant, row, 0))  # first row at the row's time

    # A session's first timeline row is its start; np.unique orders sessions by id.
    session_ids, first_row, n_impressions = np.unique(session, return_index=True, return_counts=True)
    start = ts[first_row]
    is_target = (start >= window.train_start) & (start < window.eval_end) & (n_impressions >= min_candidates)
    first_row, start = first_row[is_target], start[is_target]
    hist_end = instant_begin[first_row]  # rows before it are the member's events strictly before `start`
    hist_begin = np.maximum(member_begin[first_row], hist_end - max_history)
    hist_len = hist_end - hist_begin
    hist_rows = _ranges(hist_begin, hist_len)
    hist_offsets = _offsets(hist_len)

    # Candidates: timeline rows regrouped by session (ascending id, like session_ids) and slot.
    by_slot = np.lexsort((position, session))
    cand_rows = by_slot[np.repeat(is_target, n_impressions)]
    cand_offsets = _offsets(n_impressions[is_target])

    # Per-event features in timeline order, so each history is a contiguous slice (sequential reads).
    features = {
        name: _column(events, name)[timeline] for name in ("item_id", "actor_id", "post_type", "topic")
    }
    features["age_bucket"] = _age_bucket(ts - _column(events, "item_created_at")[timeline])
    features["actions"] = _action_bitmask(events)[timeline]
    features |= {"session_id": session, "timestamp": ts, "position": position}

    surface = events.column("surface").take(pa.array(timeline[first_row]))
    columns: dict[str, pa.Array | pa.ChunkedArray] = {
        "member_id": pa.array(member[first_row], pa.int64()),
        "session_id": pa.array(session_ids[is_target], pa.int64()),
        "surface": surface,
        "session_start": pa.array(start, pa.int64()),
        "split": pa.array(np.where(start < window.train_end, "train", "eval"), pa.string()),
        "history_len": pa.array(hist_len.astype(np.int32), pa.int32()),
    }
    for field in BASE_EXAMPLES:
        prefix, _, name = field.name.partition("_")
        if prefix == "hist":
            columns[field.name] = _lists(hist_offsets, features[name][hist_rows], field.type.value_type)
        elif prefix == "cand":
            columns[field.name] = _lists(cand_offsets, features[name][cand_rows], field.type.value_type)
    return pa.table(columns, schema=BASE_EXAMPLES)


def attach_counters(examples: pa.Table, counter_log: pd.DataFrame | ray.ObjectRef) -> pa.Table:
    """Add the `COUNTER_FEATURES` of every candidate as of its session start (schema `EXAMPLES`).

    Item and actor counters count every member's impressions, so ``counter_log`` is the whole log,
    not just this block's members; every block reads the same copy from the object store.
    """
    if isinstance(counter_log, ray.ObjectRef):
        counter_log = ray.get(counter_log)
    n_cand = pc.list_value_length(examples.column("cand_item_id")).to_numpy(zero_copy_only=False)
    queries = pd.DataFrame(
        {
            "member_id": np.repeat(examples.column("member_id").to_numpy(), n_cand),
            "item_id": pc.list_flatten(examples.column("cand_item_id")).to_numpy(),
            "actor_id": pc.list_flatten(examples.column("cand_actor_id")).to_numpy(),
            "topic": pc.list_flatten(examples.column("cand_topic")).to_numpy(),
            "ts": np.repeat(examples.column("session_start").to_numpy(), n_cand),
        }
    )
    counters = counters_at(counter_log, queries)
    offsets = _offsets(n_cand)
    for name in COUNTER_FEATURES:
        values = counters[name].to_numpy(dtype=np.float32)
        examples = examples.append_column(f"cand_{name}", _lists(offsets, values, pa.float32()))
    return examples.select(EXAMPLES.names).cast(EXAMPLES)


def _with_split_folder(examples: pa.Table) -> pa.Table:
    return examples.append_column(_FOLDER, examples.column("split"))


# --- The Ray Data pipeline -------------------------------------------------------------------------------
def example_dataset(
    path: Path, window: SplitWindow, cfg: PreprocessConfig, num_partitions: int
) -> ray.data.Dataset:
    """Examples without counters as a lazy Dataset (what `run` writes and the benchmark times)."""
    context = ray.data.DataContext.get_current()
    default_reader, context.use_datasource_v2 = context.use_datasource_v2, False
    try:
        # Ray 2.60's default (V2) parquet reader starts footer-reader actors on every read, which
        # took 10-35 s per read on 2 busy cores against 0.2 s for the classic reader.
        events = ray.data.read_parquet(str(path), columns=EVENT_COLUMNS)
    finally:
        context.use_datasource_v2 = default_reader
    events = events.filter(expr=col("surface").is_in(list(cfg.surfaces)))
    # Every event of a member in one block: a history never straddles two blocks.
    by_member = events.repartition(num_partitions, keys=["member_id"])
    build = partial(
        build_examples, window=window, max_history=cfg.max_history, min_candidates=cfg.min_candidates
    )
    # batch_size=None: one call per whole block, since the core needs all of each member's events.
    return by_member.map_batches(build, batch_size=None, batch_format="pyarrow")


def _read_counter_log(path: str) -> pd.DataFrame:
    # Surface as a categorical: a string column of a million Python objects would not share zero-copy.
    return pq.read_table(path, columns=COUNTER_LOG_COLUMNS, read_dictionary=["surface"]).to_pandas()


def _history_stats(history_len: np.ndarray) -> dict[str, Any]:
    empty = len(history_len) == 0
    p10, p50, p90 = (0.0, 0.0, 0.0) if empty else np.percentile(history_len, [10, 50, 90]).tolist()
    return {
        "history_len": {
            "mean": 0.0 if empty else round(float(history_len.mean()), 2),
            "p10": p10,
            "p50": p50,
            "p90": p90,
            "max": 0 if empty else int(history_len.max()),
        },
        "history_slices": {
            name: int(((history_len >= lo) & (history_len < hi)).sum())
            for name, (lo, hi) in HISTORY_SLICES.items()
        },
    }


def _split_summary(folder: str) -> dict[str, Any]:
    """Row, member and history-length counts of one written split (runs where the files are)."""
    if not any(Path(folder).glob("*.parquet")):
        return {"rows": 0, "members": 0, **_history_stats(np.zeros(0, np.int64))}
    table = pq.read_table(folder, columns=["member_id", "history_len"])
    return {
        "rows": table.num_rows,
        "members": len(pc.unique(table.column("member_id"))),
        **_history_stats(table.column("history_len").to_numpy()),
    }


def _connect(address: str | None) -> bool:
    """Join ``address`` (or start a local cluster); True if this call started Ray and should stop it."""
    if ray.is_initialized():
        return False
    runtime_env = {"env_vars": {"RAY_AUTH_MODE": "disabled"}}
    if address is None:  # "local", not None: never attach by accident to another cluster on this host
        ray.init(
            address="local",
            include_dashboard=False,
            runtime_env=runtime_env,
            log_to_driver=False,
            _system_config=LOCAL_CLUSTER_SYSTEM_CONFIG,
        )
    else:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
    return True


def run(cfg: PreprocessConfig) -> dict[str, Any]:
    """Build, write and publish the examples; return the summary that is also the manifest."""
    began = time.perf_counter()
    path = impressions_path(cfg.world_dir)
    log = validate_impressions(path, list(cfg.surfaces))
    window = resolve_window(cfg, log)
    started_ray = _connect(cfg.ray_address)
    try:
        partitions = cfg.num_partitions or 2 * max(1, int(ray.cluster_resources().get("CPU", 1)))
        examples = example_dataset(path, window, cfg, partitions)
        counter_log = ray.remote(_read_counter_log).remote(str(path))
        examples = examples.map_batches(
            partial(attach_counters, counter_log=counter_log), batch_size=None, batch_format="pyarrow"
        ).map_batches(_with_split_folder, batch_size=None, batch_format="pyarrow")
        out_dir = Path(cfg.out_dir).resolve()
        with atomic_dir(out_dir) as tmp:
            examples.write_parquet(str(tmp), partition_cols=[_FOLDER], partitioning_flavor=None)
            for split in SPLITS:
                (tmp / split).mkdir(exist_ok=True)  # an empty split still gets its folder
            summarize = ray.remote(_split_summary)
            counts = ray.get([summarize.remote(str(tmp / split)) for split in SPLITS])
            splits = {s: {"path": str(out_dir / s), **c} for s, c in zip(SPLITS, counts, strict=True)}
            summary = {
                "out_dir": str(out_dir),
                "splits": splits,
                "window": window.iso(),
                "partitions": partitions,
                "config": cfg.model_dump(mode="json"),
                "seconds": round(time.perf_counter() - began, 2),
            }
            (tmp / MANIFEST).write_text(json.dumps(summary, indent=2) + "\n")
        return summary
    finally:
        if started_ray:
            ray.shutdown()


def main(argv: list[str] | None = None) -> None:
    run_stage(PreprocessConfig, run, argv)


if __name__ == "__main__":
    main()
