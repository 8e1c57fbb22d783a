"""History building: the Ray Data pipeline against a single-process vectorized pandas reference.

One run generates a ~1M-impression world with `workloads.data.synth` and times, from the same
parquet file to examples in memory (last-256 histories plus candidates, no counters, no writing):

(a) the Ray Data pipeline of `workloads.data.preprocess` (read, repartition by member, vectorized
    `map_batches`, materialized in the object store): the code `preprocess.run` executes;
(b) a pandas reference written independently (groupby/cumcount, then one gather per column), in
    one process, producing the same examples;
(core) the pipeline's own per-block function on the whole log in one process, which shows what
    Ray itself costs;
(c) a per-member `groupby().map_groups()` with a Python loop, on a subsample of members, to show
    why the pipeline does not use it.

Each timed path runs once to warm up and then ``--repeats`` times, interleaved; the figures are
medians and the ratio compares medians of the same run. (a) and (b) must produce the same examples.
Usage: ``python -m bench.preprocess [--members 10700] [--repeats 3] [--partitions N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from workloads.data.preprocess import LOCAL_CLUSTER_SYSTEM_CONFIG, build_examples, example_dataset
from workloads.data.schema import N_AGE_BUCKETS, Action
from workloads.data.synth import WorldConfig, generate
from workloads.data.window import (
    EVENT_COLUMNS,
    PreprocessConfig,
    SplitWindow,
    resolve_window,
    validate_impressions,
)

MAX_HISTORY = 256
HISTORY_FIELDS = [
    "item_id",
    "actor_id",
    "post_type",
    "topic",
    "age_bucket",
    "session_id",
    "actions",
    "timestamp",
]
CANDIDATE_FIELDS = ["item_id", "actor_id", "post_type", "topic", "age_bucket", "position", "actions"]


# --- (b) the pandas reference --------------------------------------------------------------------------
def pandas_reference(path: Path, window: SplitWindow, surfaces: list[str]) -> dict[str, Any]:
    """The same examples from pandas groupby/cumcount and one gather per column, in one process.

    Returns plain arrays in session-id order: per-session columns, and for each history and
    candidate field the values of all sessions concatenated plus their ``*_len``.
    """
    log = pd.read_parquet(path, columns=EVENT_COLUMNS, filters=[("surface", "in", surfaces)])
    log["timestamp"] = log["timestamp"].astype("int64")
    age_hours = np.maximum(log["timestamp"] - log["item_created_at"].astype("int64"), 0) / 3.6e9
    log["age_bucket"] = np.minimum(np.log2(1.0 + age_hours) // 1, N_AGE_BUCKETS - 1).astype(np.int8)
    log["actions"] = sum(log[a.name.lower()].astype(np.int16) * (1 << int(a)) for a in Action)
    log = log.sort_values(["member_id", "timestamp", "session_id", "position"], ignore_index=True)

    # Index of each event in its member's timeline, and of the member's first event at that instant.
    log["k"] = log.groupby("member_id").cumcount()
    log["k_instant"] = log.groupby(["member_id", "timestamp"])["k"].transform("min")
    log["member_offset"] = log.index.to_numpy() - log["k"].to_numpy()
    sessions = log.groupby("session_id", sort=True).agg(
        member_id=("member_id", "first"),
        start=("timestamp", "min"),
        before=("k_instant", "first"),  # the member's events strictly before the session starts
        member_offset=("member_offset", "first"),
        n=("k", "size"),
    )
    sessions = sessions[(sessions["start"] >= window.train_start) & (sessions["start"] < window.eval_end)]

    hist_len = np.minimum(sessions["before"].to_numpy(), MAX_HISTORY)
    hist_begin = sessions["member_offset"].to_numpy() + sessions["before"].to_numpy() - hist_len
    hist_rows = np.repeat(hist_begin - (np.cumsum(hist_len) - hist_len), hist_len) + np.arange(hist_len.sum())
    shown = log[log["session_id"].isin(sessions.index)].sort_values(["session_id", "position"])
    out: dict[str, Any] = {
        "session_id": sessions.index.to_numpy(),
        "member_id": sessions["member_id"].to_numpy(),
        "session_start": sessions["start"].to_numpy(),
        "hist_len": hist_len,
        "cand_len": sessions["n"].to_numpy(),
    }
    for name in HISTORY_FIELDS:
        out[f"hist_{name}"] = log[name].to_numpy()[hist_rows]
    for name in CANDIDATE_FIELDS:
        out[f"cand_{name}"] = shown[name].to_numpy()
    return out


# --- (c) one Python call per member ----------------------------------------------------------------------
def per_member_examples(events: pd.DataFrame, window: SplitWindow) -> pd.DataFrame:
    """The obvious way: loop over the member's sessions in Python (what map_groups invites)."""
    events = events.sort_values(["timestamp", "session_id", "position"])
    ts = events["timestamp"].astype("int64").to_numpy()
    rows = []
    for session_id, shown in events.groupby("session_id", sort=False):
        start = int(shown["timestamp"].astype("int64").min())
        if not window.train_start <= start < window.eval_end:
            continue
        history = events[ts < start].tail(MAX_HISTORY)
        rows.append(
            {
                "member_id": int(shown["member_id"].iloc[0]),
                "session_id": int(session_id),
                "hist_item_id": history["item_id"].to_numpy(),
                "cand_item_id": shown.sort_values("position")["item_id"].to_numpy(),
            }
        )
    return pd.DataFrame(rows, columns=["member_id", "session_id", "hist_item_id", "cand_item_id"])


# --- (a) = (b): same examples ----------------------------------------------------------------------------
def assert_same_examples(table: pa.Table, reference: dict[str, Any]) -> None:
    """The pipeline's examples, in session order, equal the reference's value for value."""
    table = table.sort_by("session_id")
    for name in ("session_id", "member_id", "session_start"):
        np.testing.assert_array_equal(table.column(name).to_numpy(), reference[name], name)
    np.testing.assert_array_equal(table.column("history_len").to_numpy(), reference["hist_len"])
    n_cand = pc.list_value_length(table.column("cand_item_id")).to_numpy(zero_copy_only=False)
    np.testing.assert_array_equal(n_cand, reference["cand_len"])
    for prefix, names in (("hist", HISTORY_FIELDS), ("cand", CANDIDATE_FIELDS)):
        for name in names:
            flat = pc.list_flatten(table.column(f"{prefix}_{name}")).to_numpy()
            np.testing.assert_array_equal(flat, reference[f"{prefix}_{name}"], f"{prefix}_{name}")


# --- Timing ------------------------------------------------------------------------------------------------
def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    began = time.perf_counter()
    result = fn()
    return time.perf_counter() - began, result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--members", type=int, default=10_700, help="world size (~94 impressions per member)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each path after a warm-up")
    parser.add_argument("--partitions", type=int, default=None, help="member partitions (default: 2 per CPU)")
    parser.add_argument(
        "--map-groups-members", type=int, default=300, help="members in the map_groups sample"
    )
    args = parser.parse_args(argv)
    cpus = os.cpu_count() or 1
    partitions = args.partitions or 2 * cpus
    load_before = os.getloadavg()[0]  # other work on the machine skews every figure: record it

    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        world = Path(tmp) / "world"
        generated = generate(WorldConfig(members=args.members, seed=0), world)
        path = world / "impressions.parquet"
        events = generated["counts"]["impressions"]
        cfg = PreprocessConfig(world_dir=world, out_dir=Path(tmp) / "unused", max_history=MAX_HISTORY)
        window = resolve_window(cfg, validate_impressions(path, list(cfg.surfaces)))
        print(
            f"world: {events:,} impressions, {args.members:,} members ({generated['seconds']}s to generate)"
        )

        ray.init(
            address="local",
            num_cpus=cpus,
            object_store_memory=4 * 1024**3,
            include_dashboard=False,
            log_to_driver=False,
            _system_config=LOCAL_CLUSTER_SYSTEM_CONFIG,  # what preprocess.run starts a local cluster with
        )
        ray.data.DataContext.get_current().enable_progress_bars = False  # keep the figures readable

        def ray_pipeline() -> pa.Table:
            dataset = example_dataset(path, window, cfg, partitions).materialize()
            return pa.concat_tables(ray.get(ref) for ref in dataset.to_arrow_refs())

        def core_in_one_process() -> pa.Table:
            table = pq.read_table(path, columns=EVENT_COLUMNS, filters=[("surface", "in", cfg.surfaces)])
            return build_examples(table, window, MAX_HISTORY, cfg.min_candidates)

        paths: dict[str, Callable[[], Any]] = {
            "ray_data": lambda: example_dataset(path, window, cfg, partitions).materialize(),
            "pandas_reference": lambda: pandas_reference(path, window, list(cfg.surfaces)),
            "core_one_process": core_in_one_process,
        }
        seconds: dict[str, list[float]] = {name: [] for name in paths}
        for repeat in range(args.repeats + 1):  # the first round warms up (worker processes, page cache)
            for name, fn in paths.items():
                elapsed, _ = timed(fn)
                if repeat:
                    seconds[name].append(elapsed)
                print(f"  {'warm-up' if not repeat else f'run {repeat}'} {name}: {elapsed:.2f}s", flush=True)

        print("checking that (a) and (b) agree ...", flush=True)
        assert_same_examples(ray_pipeline(), pandas_reference(path, window, list(cfg.surfaces)))

        sample = np.random.default_rng(0).choice(args.members, args.map_groups_members, replace=False)
        in_sample = pc.field("member_id").isin(sample.tolist()) & pc.field("surface").isin(cfg.surfaces)
        subsample = ray.data.from_arrow(pq.read_table(path, columns=EVENT_COLUMNS, filters=in_sample))
        sample_events = subsample.count()
        map_groups_s, _ = timed(
            lambda: (
                subsample.groupby("member_id")
                .map_groups(lambda g: per_member_examples(g, window), batch_format="pandas")
                .materialize()
            )
        )
        ray.shutdown()

    median = {name: statistics.median(values) for name, values in seconds.items()}
    rate = {name: events / s for name, s in median.items()}
    result = {
        "events": events,
        "members": args.members,
        "cpus": cpus,
        "partitions": partitions,
        "max_history": MAX_HISTORY,
        "repeats": args.repeats,
        "median_seconds": {k: round(v, 3) for k, v in median.items()},
        "events_per_second": {k: round(v) for k, v in rate.items()},
        "ray_over_pandas": round(rate["ray_data"] / rate["pandas_reference"], 3),
        "ray_over_core_one_process": round(rate["ray_data"] / rate["core_one_process"], 3),
        "map_groups_sample": {
            "members": args.map_groups_members,
            "events": sample_events,
            "seconds": round(map_groups_s, 2),
            "events_per_second": round(sample_events / map_groups_s),
        },
        "outputs_equal": True,
        "load_average_1min": [round(load_before, 1), round(os.getloadavg()[0], 1)],
    }
    for name in paths:
        print(f"{name:>17}: {rate[name]:>12,.0f} events/s  (median {median[name]:.2f}s of {seconds[name]})")
    sample_rate = sample_events / map_groups_s
    print(f"{'map_groups':>17}: {sample_rate:>12,.0f} events/s  (sample of {sample_events:,} events)")
    print(f"Ray Data / pandas reference: {result['ray_over_pandas']:.2f}x (target >= 0.5x)")
    print(f"Ray Data / the same core in one process: {result['ray_over_core_one_process']:.2f}x")
    print(f"load average (1 min) before and after: {result['load_average_1min']} on {cpus} CPUs")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
