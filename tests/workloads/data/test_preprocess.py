"""Ray Data preprocessing: point-in-time histories, candidates, split, counters, bad input, atomic output."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from workloads.data import preprocess
from workloads.data.counters import counters_at
from workloads.data.preprocess import build_examples, run
from workloads.data.window import (
    ImpressionLogError,
    PreprocessConfig,
    SplitWindow,
    resolve_window,
    validate_impressions,
)
from workloads.data.schema import COUNTER_FEATURES, EXAMPLES, IMPRESSIONS, TS, Action, age_bucket_us

MAX_HISTORY = 8  # small, so the tiny world's active members are truncated
HOUR_US = 3_600 * 1_000_000
DAY_US = 24 * HOUR_US


# --- A hand-made log: every rule of the history on a few rows --------------------------------------------
def event_log(rows: list[dict[str, Any]]) -> pa.Table:
    """An impression log in the contract's schema; unspecified fields get harmless defaults."""
    defaults: dict[str, Any] = {
        "surface": "feed",
        "actor_id": 7,
        "post_type": 0,
        "topic": 1,
        "created": 0,
        "actions": 0,
    }
    full = [defaults | r for r in rows]
    columns: dict[str, Any] = {
        "impression_id": list(range(len(full))),
        "member_id": [r["member"] for r in full],
        "item_id": [r["item"] for r in full],
        "session_id": [r["session"] for r in full],
        "position": [r["position"] for r in full],
        "timestamp": pa.array([r["ts"] for r in full], pa.int64()).cast(TS),
        "surface": [r["surface"] for r in full],
        "actor_id": [r["actor_id"] for r in full],
        "post_type": [r["post_type"] for r in full],
        "topic": [r["topic"] for r in full],
        "item_created_at": pa.array([r["created"] for r in full], pa.int64()).cast(TS),
    }
    for action in Action:
        columns[action.name.lower()] = [(r["actions"] >> action) & 1 for r in full]
    return pa.table(columns, schema=IMPRESSIONS)


T = 100 * DAY_US
HAND_LOG = [
    # member 1, session 10: two events at T
    {"member": 1, "item": 100, "session": 10, "position": 0, "ts": T, "actions": 0b1},
    {"member": 1, "item": 101, "session": 10, "position": 1, "ts": T + 5},
    # member 1, session 11 starts at T + 1h; its own later slots must not be in its history
    {"member": 1, "item": 102, "session": 11, "position": 1, "ts": T + HOUR_US + 9},
    {"member": 1, "item": 103, "session": 11, "position": 0, "ts": T + HOUR_US, "actions": 0b10010},
    # member 1, sessions 12 and 13 start at the same instant: a tie is not "before"
    {"member": 1, "item": 104, "session": 12, "position": 0, "ts": T + 2 * HOUR_US},
    {"member": 1, "item": 105, "session": 13, "position": 0, "ts": T + 2 * HOUR_US},
    # member 2 never leaks into member 1's history
    {"member": 2, "item": 200, "session": 20, "position": 0, "ts": T + 30},
    {
        "member": 2,
        "item": 201,
        "session": 21,
        "position": 0,
        "ts": T + 3 * HOUR_US,
        "created": T - 5 * HOUR_US,
    },
]
EVERYTHING = SplitWindow(
    world_start=0, world_end=T + DAY_US, train_start=0, train_end=T + DAY_US, eval_end=T + DAY_US
)


def by_session(table: pa.Table) -> dict[int, dict[str, Any]]:
    return {row["session_id"]: row for row in table.to_pylist()}


def test_history_holds_only_earlier_sessions_in_time_order() -> None:
    rows = by_session(build_examples(event_log(HAND_LOG), EVERYTHING, max_history=10, min_candidates=1))
    assert rows[10]["hist_item_id"] == []  # the member's first session: cold start
    assert rows[11]["hist_item_id"] == [100, 101]  # not 103/102: same session, even the earlier slot
    assert rows[11]["hist_actions"] == [0b1, 0]
    assert rows[11]["hist_session_id"] == [10, 10]
    assert rows[11]["session_start"] == T + HOUR_US  # a session starts at its earliest event, not slot 0's
    # Sessions 12 and 13 start at the same instant: neither sees the other.
    assert rows[12]["hist_item_id"] == rows[13]["hist_item_id"] == [100, 101, 103, 102]
    assert rows[21]["hist_item_id"] == [200] and rows[21]["hist_timestamp"] == [T + 30]
    assert rows[21]["cand_age_bucket"] == [age_bucket_us(3 * HOUR_US + 5 * HOUR_US)]
    for row in rows.values():
        assert row["history_len"] == len(row["hist_item_id"])
        assert all(t < row["session_start"] for t in row["hist_timestamp"])


def test_history_keeps_the_most_recent_events() -> None:
    rows = by_session(build_examples(event_log(HAND_LOG), EVERYTHING, max_history=3, min_candidates=1))
    assert rows[12]["hist_item_id"] == [101, 103, 102]
    assert rows[12]["history_len"] == 3


def test_candidates_are_in_slot_order_with_their_labels() -> None:
    rows = by_session(build_examples(event_log(HAND_LOG), EVERYTHING, max_history=10, min_candidates=1))
    assert rows[11]["cand_item_id"] == [103, 102]
    assert rows[11]["cand_position"] == [0, 1]
    assert rows[11]["cand_actions"] == [0b10010, 0]


def test_min_candidates_and_window_pick_the_targets() -> None:
    log = event_log(HAND_LOG)
    two_or_more = build_examples(log, EVERYTHING, max_history=10, min_candidates=2)
    assert sorted(two_or_more.column("session_id").to_pylist()) == [10, 11]
    window = SplitWindow(
        0, T + DAY_US, train_start=T + 1, train_end=T + 2 * HOUR_US, eval_end=T + 3 * HOUR_US
    )
    rows = by_session(build_examples(log, window, max_history=10, min_candidates=1))
    assert {s: r["split"] for s, r in rows.items()} == {11: "train", 20: "train", 12: "eval", 13: "eval"}
    assert rows[12]["hist_item_id"] == [100, 101, 103, 102]  # sessions before the window are still history


# --- Bad input fails before any Ray work, naming the column -------------------------------------------------
@pytest.fixture
def good_log() -> pa.Table:
    return event_log(HAND_LOG)


def write_world(tmp_path: Path, table: pa.Table) -> Path:
    pq.write_table(table, tmp_path / "impressions.parquet")
    return tmp_path


def preprocess_unreachable_cluster(world: Path, tmp_path: Path) -> None:
    # A cluster address that cannot be reached: an error about the log proves validation came first.
    run(PreprocessConfig(world_dir=world, out_dir=tmp_path / "out", ray_address="ray://127.0.0.1:9"))


def test_missing_column_is_named(tmp_path: Path, good_log: pa.Table) -> None:
    world = write_world(tmp_path, good_log.drop_columns(["session_id"]))
    with pytest.raises(ImpressionLogError, match=r"missing column 'session_id' \(expected int64\)"):
        preprocess_unreachable_cluster(world, tmp_path)


def test_wrong_dtype_is_named(tmp_path: Path, good_log: pa.Table) -> None:
    table = good_log.set_column(1, "member_id", pc.cast(good_log.column("member_id"), pa.string()))
    with pytest.raises(ImpressionLogError, match=r"column 'member_id' has type string, expected int64"):
        preprocess_unreachable_cluster(write_world(tmp_path, table), tmp_path)


def test_nanosecond_timestamps_are_rejected(tmp_path: Path, good_log: pa.Table) -> None:
    index = good_log.schema.get_field_index("timestamp")
    table = good_log.set_column(
        index, "timestamp", good_log.column("timestamp").cast(pa.timestamp("ns", "UTC"))
    )
    pq.write_table(table, tmp_path / "impressions.parquet", coerce_timestamps=None, version="2.6")
    with pytest.raises(ImpressionLogError, match=r"'timestamp' has type timestamp\[ns, tz=UTC\]"):
        preprocess_unreachable_cluster(tmp_path, tmp_path)


def test_nulls_are_named(tmp_path: Path, good_log: pa.Table) -> None:
    items = pa.array([None, *good_log.column("item_id").to_pylist()[1:]], pa.int64())
    table = good_log.set_column(good_log.schema.get_field_index("item_id"), "item_id", items)
    with pytest.raises(ImpressionLogError, match=r"column 'item_id' has 1 nulls"):
        preprocess_unreachable_cluster(write_world(tmp_path, table), tmp_path)


def test_empty_log_is_rejected(tmp_path: Path, good_log: pa.Table) -> None:
    with pytest.raises(ImpressionLogError, match="is empty"):
        preprocess_unreachable_cluster(write_world(tmp_path, good_log.slice(0, 0)), tmp_path)


def test_log_without_the_requested_surface_is_rejected(tmp_path: Path, good_log: pa.Table) -> None:
    with pytest.raises(ImpressionLogError, match=r"'surface' has no rows in \['jobs'\]"):
        validate_impressions(write_world(tmp_path, good_log) / "impressions.parquet", ["jobs"])


def test_missing_log_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"impressions\.parquet"):
        preprocess_unreachable_cluster(tmp_path, tmp_path)


def test_day_offsets_count_from_the_world_start_or_end(tmp_path: Path, good_log: pa.Table) -> None:
    log = validate_impressions(write_world(tmp_path, good_log) / "impressions.parquet", ["feed"])
    last = T + 3 * HOUR_US  # no world.json: the window is the log's own span
    window = resolve_window(PreprocessConfig(world_dir=tmp_path, train_start=0.0, train_end=-1 / 24), log)
    assert (window.world_start, window.world_end) == (T, last + 1)
    assert (window.train_start, window.train_end, window.eval_end) == (T, last + 1 - HOUR_US, last + 1)
    (tmp_path / "world.json").write_text(
        json.dumps({"start": "2024-01-01T00:00:00+00:00", "end": "2024-03-01"})
    )
    window = resolve_window(
        PreprocessConfig(world_dir=tmp_path, train_start=1, train_end="2024-02-01T00:00:00Z", eval_end=-1),
        log,
    )
    assert window.iso()["train_start"] == "2024-01-02T00:00:00+00:00"
    assert window.iso()["train_end"] == "2024-02-01T00:00:00+00:00"
    assert window.iso()["eval_end"] == "2024-02-29T00:00:00+00:00"
    with pytest.raises(ValueError, match="train_start < train_end"):
        resolve_window(PreprocessConfig(world_dir=tmp_path, train_start=-1, train_end=-2), log)


# --- End to end on the tiny world ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def preprocessed(
    tiny_world: Path, ray_session: None, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("examples") / "examples"
    cfg = PreprocessConfig(world_dir=tiny_world, out_dir=out, max_history=MAX_HISTORY, num_partitions=3)
    return run(cfg)


@pytest.fixture(scope="module")
def examples(preprocessed: dict[str, Any]) -> pd.DataFrame:
    out = Path(preprocessed["out_dir"])
    return pd.concat(
        [pq.read_table(out / split).to_pandas() for split in ("train", "eval")], ignore_index=True
    )


@pytest.fixture(scope="module")
def log(tiny_world: Path) -> pd.DataFrame:
    frame = pq.read_table(tiny_world / "impressions.parquet").to_pandas()
    for column in ("timestamp", "item_created_at"):
        frame[column] = frame[column].astype("int64")  # us since the epoch (schema.TS)
    bits = np.zeros(len(frame), np.int16)
    for action in Action:
        bits |= frame[action.name.lower()].to_numpy().astype(np.int16) << np.int16(action)
    return frame.assign(actions=bits)


def test_no_history_event_at_or_after_its_session(examples: pd.DataFrame) -> None:
    assert len(examples) > 100
    for row in examples.itertuples():
        assert (row.hist_timestamp < row.session_start).all()
        assert not (row.hist_session_id == row.session_id).any()
        assert (np.diff(row.hist_timestamp) >= 0).all()  # time order


def test_histories_equal_a_naive_per_session_reference(examples: pd.DataFrame, log: pd.DataFrame) -> None:
    feed = log[log["surface"] == "feed"].sort_values(["member_id", "timestamp", "session_id", "position"])
    feed = feed.assign(age_bucket=[age_bucket_us(a) for a in feed["timestamp"] - feed["item_created_at"]])
    fields = ["item_id", "actor_id", "post_type", "topic", "age_bucket", "session_id", "actions", "timestamp"]
    timelines = {member: {f: g[f].to_numpy() for f in fields} for member, g in feed.groupby("member_id")}
    truncated = 0
    for row in examples.itertuples():
        timeline = timelines[row.member_id]
        before = int((timeline["timestamp"] < row.session_start).sum())
        keep = slice(max(0, before - MAX_HISTORY), before)
        truncated += before > MAX_HISTORY
        assert row.history_len == keep.stop - keep.start
        for field in fields:
            np.testing.assert_array_equal(getattr(row, f"hist_{field}"), timeline[field][keep], field)
    assert truncated > 0, "the tiny world should exercise truncation at MAX_HISTORY"


def test_every_target_session_appears_once_with_its_impressions(
    examples: pd.DataFrame, log: pd.DataFrame, preprocessed: dict[str, Any]
) -> None:
    train_start = pd.Timestamp(preprocessed["window"]["train_start"]).value // 1000
    feed = log[log["surface"] == "feed"]
    starts = feed.groupby("session_id")["timestamp"].min()
    targets = starts[starts >= train_start].index
    assert examples["session_id"].is_unique
    assert set(examples["session_id"]) == set(targets)
    sessions = dict(tuple(feed.sort_values("position").groupby("session_id")))
    for row in examples.itertuples():
        shown = sessions[row.session_id]
        assert row.session_start == starts[row.session_id]
        np.testing.assert_array_equal(row.cand_item_id, shown["item_id"])
        np.testing.assert_array_equal(row.cand_position, shown["position"])
        np.testing.assert_array_equal(row.cand_actor_id, shown["actor_id"])
        np.testing.assert_array_equal(row.cand_actions, shown["actions"])
        assert (shown["member_id"] == row.member_id).all()


def test_split_follows_the_time_window(examples: pd.DataFrame, preprocessed: dict[str, Any]) -> None:
    window = {k: pd.Timestamp(v).value // 1000 for k, v in preprocessed["window"].items()}
    assert window["world_end"] - window["train_end"] == 7 * DAY_US  # default: the last 7 days evaluate
    train = examples[examples["split"] == "train"]
    evaluation = examples[examples["split"] == "eval"]
    assert len(train) and len(evaluation)
    assert train["session_start"].between(window["train_start"], window["train_end"] - 1).all()
    assert evaluation["session_start"].between(window["train_end"], window["eval_end"] - 1).all()
    for split, frame in (("train", train), ("eval", evaluation)):
        counts = preprocessed["splits"][split]
        assert counts["rows"] == len(frame)
        assert sum(counts["history_slices"].values()) == len(frame)
        assert counts["history_slices"]["0"] == int((frame["history_len"] == 0).sum())


def test_counters_are_those_at_the_session_start(examples: pd.DataFrame, log: pd.DataFrame) -> None:
    # Item and actor counters span all members, so a block that only saw its own members would differ.
    sample = examples.sample(40, random_state=0)
    queries = pd.DataFrame(
        {
            "member_id": np.repeat(sample["member_id"].to_numpy(), sample["cand_item_id"].map(len)),
            "item_id": np.concatenate(sample["cand_item_id"].to_list()),
            "actor_id": np.concatenate(sample["cand_actor_id"].to_list()),
            "topic": np.concatenate(sample["cand_topic"].to_list()),
            "ts": np.repeat(sample["session_start"].to_numpy(), sample["cand_item_id"].map(len)),
        }
    )
    expected = counters_at(log, queries)
    for name in COUNTER_FEATURES:
        np.testing.assert_array_equal(np.concatenate(sample[f"cand_{name}"].to_list()), expected[name], name)
    assert (expected["item_imp_1d"] > 0).any() and (expected["ma_eng_30d"] > 0).any()  # not all zeros


def test_output_is_readable_by_ray_data_with_the_examples_schema(
    preprocessed: dict[str, Any], ray_session: None
) -> None:
    import ray

    out = Path(preprocessed["out_dir"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["splits"]["eval"]["rows"] == preprocessed["splits"]["eval"]["rows"]
    assert manifest["config"]["max_history"] == MAX_HISTORY
    assert set(manifest["window"]) == {"world_start", "world_end", "train_start", "train_end", "eval_end"}
    for split in ("train", "eval"):
        dataset = ray.data.read_parquet(str(out / split))
        assert dataset.count() == manifest["splits"][split]["rows"]
        schema = dataset.schema()
        assert list(schema.names) == EXAMPLES.names
        assert list(schema.types) == EXAMPLES.types
    assert not list(out.parent.glob(".examples.tmp-*"))


def test_a_crash_while_writing_keeps_the_old_output(
    preprocessed: dict[str, Any], tiny_world: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import ray.data

    out = Path(preprocessed["out_dir"])
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def crash_halfway(self: ray.data.Dataset, path: str, **_: Any) -> None:
        (Path(path) / "train").mkdir()
        (Path(path) / "train" / "part-0.parquet").write_bytes(b"PAR1 half a file")
        raise RuntimeError("simulated crash while writing")

    monkeypatch.setattr(ray.data.Dataset, "write_parquet", crash_halfway)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run(PreprocessConfig(world_dir=tiny_world, out_dir=out, max_history=MAX_HISTORY))
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert not list(out.parent.glob(".examples.tmp-*"))


def test_stage_command_with_one_partition_gives_the_same_examples(
    preprocessed: dict[str, Any],
    examples: pd.DataFrame,
    tiny_world: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = {"world_dir": str(tiny_world), "out_dir": str(tmp_path / "again"), "max_history": MAX_HISTORY}
    preprocess.main(["--config-json", json.dumps(cfg), "--set", "num_partitions=1"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["partitions"] == 1
    again = pd.concat([pq.read_table(tmp_path / "again" / s).to_pandas() for s in ("train", "eval")])
    key = ["member_id", "session_id"]
    left = examples.sort_values(key).reset_index(drop=True).map(_hashable)
    right = again.sort_values(key).reset_index(drop=True).map(_hashable)
    pd.testing.assert_frame_equal(left, right)
    for split in ("train", "eval"):
        assert summary["splits"][split]["rows"] == preprocessed["splits"][split]["rows"]
        assert summary["splits"][split]["history_slices"] == preprocessed["splits"][split]["history_slices"]


def _hashable(value: Any) -> Any:
    return tuple(value.tolist()) if isinstance(value, np.ndarray) else value


@pytest.fixture
def remote_cluster() -> Iterator[str]:
    """A Ray head started as its own process (as a KubeRay head would be): its address, then stopped."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # A short folder: Ray's socket paths are length-limited.
    temp_dir = Path(tempfile.mkdtemp(prefix="rr-", dir="/tmp"))
    log = temp_dir / "head.log"
    with log.open("w") as sink:
        head = subprocess.Popen(
            [str(Path(sys.executable).parent / "ray"), "start", "--head", f"--port={port}", "--num-cpus=2",
             "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}", "--block"],
            env={**os.environ, "RAY_AUTH_MODE": "disabled", "PYTHONUNBUFFERED": "1"},
            stdout=sink,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: the head and everything it started
        )  # fmt: skip
    try:
        deadline = time.monotonic() + 180
        while "Ray runtime started" not in log.read_text():
            if head.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"the Ray head did not start:\n{log.read_text()[-2000:]}")
            time.sleep(1)
        yield f"127.0.0.1:{port}"
    finally:
        # a throwaway cluster: SIGTERM to the whole group, then SIGKILL. A graceful stop waits ~30 s
        # for the detached actors Ray Data leaves behind (_StatsActor, _AutoscalingCoordinatorActor)
        os.killpg(head.pid, signal.SIGTERM)
        try:
            head.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=20)
        shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.mark.slow
def test_runs_unchanged_on_a_remote_cluster(tiny_world: Path, tmp_path: Path, remote_cluster: str) -> None:
    cfg = {"world_dir": str(tiny_world), "out_dir": str(tmp_path / "remote"), "ray_address": remote_cluster}
    # A separate driver process: this test process is already attached to the local test cluster.
    done = subprocess.run(
        [sys.executable, "-m", "workloads.data.preprocess", "--config-json", json.dumps(cfg)],
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["partitions"] == 4  # two per CPU of the remote cluster, not of this process's
    manifest = json.loads((tmp_path / "remote" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows"] > 0
    assert manifest["config"]["ray_address"] == remote_cluster
