"""Ray Train end to end on the tiny world: two gloo workers, real checkpoints, a real worker crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import torch
from ray.train import Result

from workloads.models.batch import ItemContentTable, collate
from workloads.train.artifact import build_any_model, load_artifact
from workloads.train.checkpoints import checkpoint_dir_name, write_manifest
from workloads.train.config import TrainConfig
from workloads.train.loop import CHECKPOINT_FILE, state_digest
from workloads.train.trainer import epoch_history, fit, read_examples, train_and_publish

TINY_LIGR = {
    "kind": "ligr",
    "d_model": 16,
    "n_heads": 2,
    "n_layers": 1,
    "id_dim": 8,
    "max_history": 16,
    "max_candidates": 32,
    "item_hash_size": 2003,  # above embedding_shard_min_rows, so shard_embeddings splits it
    "actor_hash_size": 211,
}

pytestmark = pytest.mark.slow


def train_config(tmp_path: Path, world: Path, examples: Path, **overrides: Any) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "model": TINY_LIGR,
            "examples_dir": str(examples),
            "world_dir": str(world),
            "storage_path": str(tmp_path / "runs"),
            "artifact_root": str(tmp_path / "models"),
            "batch_size": 32,
            "num_workers": 2,
            **overrides,
        }
    )


def checkpoint_weights(result: Result, epoch: int) -> dict[str, torch.Tensor]:
    for checkpoint, metrics in result.best_checkpoints or []:
        if metrics["epoch"] == epoch:
            with checkpoint.as_directory() as folder:
                state = torch.load(Path(folder) / CHECKPOINT_FILE, weights_only=True)
            weights: dict[str, torch.Tensor] = state["model"]
            return weights
    raise AssertionError(f"no checkpoint of epoch {epoch}")


def test_training_lowers_the_loss_and_publishes_a_loadable_artifact(
    tmp_path: Path, tiny_world: Path, tiny_examples: Path, ray_session: None
) -> None:
    # max_failures: a worker-group restart (Ray on an overloaded box) must not fail this test; it resumes
    cfg = train_config(tmp_path, tiny_world, tiny_examples, epochs=2, name="tiny", version=1, max_failures=1)
    summary = train_and_publish(cfg)

    artifact = load_artifact(summary["artifact"])
    history = artifact.metrics["epochs"]
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert history[-1]["eval_loss"] < history[0]["eval_loss"]
    assert 0.0 <= history[-1]["eval_long_dwell_auc"] <= 1.0
    assert artifact.data_window["window"]["train_end"] < artifact.data_window["window"]["eval_end"]
    assert artifact.feature_spec["max_history"] == 16

    # the published weights are the last checkpoint's, and score eval rows exactly like it
    last = max(Path(summary["run"]).glob(f"*/{CHECKPOINT_FILE}"), key=lambda p: p.stat().st_mtime)
    reference = build_any_model(cfg.model).eval()
    reference.load_state_dict(torch.load(last, weights_only=True)["model"])
    rows = pq.read_table(tiny_examples / "eval").slice(0, 8).to_pandas()
    batch = collate(
        {c: rows[c].to_numpy() for c in rows.columns},
        ItemContentTable.from_parquet(tiny_world / "items.parquet"),
        max_history=16,
        max_candidates=32,
    )
    with torch.no_grad():
        assert torch.equal(artifact.model(batch).logits, reference(batch).logits)
    assert summary["epochs"] == 2


def test_a_worker_crash_resumes_from_the_last_checkpoint(
    tmp_path: Path, tiny_world: Path, tiny_examples: Path, ray_session: None
) -> None:
    # one worker of two CPUs: Ray pins an actor's OMP_NUM_THREADS to its reservation, so without
    # cpus_per_worker a worker of a 16-core pod would train on one core
    cfg = train_config(
        tmp_path, tiny_world, tiny_examples, epochs=2, crash_at_epoch=2, max_failures=1,
        num_workers=1, cpus_per_worker=2,
    )  # fmt: skip
    result = fit(cfg)

    history = epoch_history(result)
    assert [m["epoch"] for m in history] == [1, 2]  # nothing lost, nothing done twice
    assert [m["resumed_from_epoch"] for m in history] == [0, 1]  # the restart began after epoch 1
    assert (cfg.storage_path / cfg.run_name / ".crash-injected-epoch-2").exists()
    epoch_1 = state_digest(checkpoint_weights(result, 1))
    assert history[1]["restored_weights_sha256"] == epoch_1  # the restarted workers hold epoch 1's weights
    assert [m["threads_per_worker"] for m in history] == [2, 2]  # before and after the restart


def test_a_complete_checkpoint_ray_never_registered_is_resumed_from_and_registered(
    tmp_path: Path, tiny_world: Path, tiny_examples: Path, ray_session: None
) -> None:
    """A worker killed within Ray's 2 s result poll of reporting leaves such a checkpoint in storage."""
    first = fit(train_config(tmp_path, tiny_world, tiny_examples, epochs=1))
    assert first.checkpoint is not None
    registered = Path(first.checkpoint.path)
    orphan = registered.parent / checkpoint_dir_name(2)  # as epoch 2's report would have written it
    orphan.mkdir()
    state = torch.load(registered / CHECKPOINT_FILE, weights_only=True)
    state["epoch"] = 2
    torch.save(state, orphan / CHECKPOINT_FILE)
    orphan_metrics = {**epoch_history(first)[0], "epoch": 2}
    write_manifest(orphan, 2, orphan_metrics)

    second = fit(train_config(tmp_path, tiny_world, tiny_examples, epochs=2))

    assert second.checkpoint is not None and Path(second.checkpoint.path) == orphan  # registered in place
    assert epoch_history(second) == [epoch_history(first)[0], orphan_metrics]  # epoch 2 was not retrained


def test_a_new_job_with_the_same_name_continues_sharded(
    tmp_path: Path, tiny_world: Path, tiny_examples: Path, ray_session: None
) -> None:
    sharded = {"strategy": "fsdp2", "shard_embeddings": True, "max_failures": 1}
    first = fit(train_config(tmp_path, tiny_world, tiny_examples, epochs=1, **sharded))
    second = fit(train_config(tmp_path, tiny_world, tiny_examples, epochs=2, **sharded))

    history = epoch_history(second)
    assert [m["epoch"] for m in history] == [1, 2]
    assert history[1]["resumed_from_epoch"] == 1
    assert history[1]["restored_weights_sha256"] == state_digest(checkpoint_weights(first, 1))
    # the sharded run's checkpoint holds the full tables, loadable into an unsharded model
    unsharded = build_any_model(train_config(tmp_path, tiny_world, tiny_examples).model)
    unsharded.load_state_dict(checkpoint_weights(second, 2))


def test_both_of_ray_datas_parquet_readers_give_the_same_training_rows(
    tmp_path: Path, tiny_world: Path, tiny_examples: Path, ray_session: None
) -> None:
    """The suite reads through the V1 reader (tests/conftest.py); Ray's default, V2, must agree."""
    cfg = train_config(tmp_path, tiny_world, tiny_examples)
    context = ray.data.DataContext.get_current()
    default = context.use_datasource_v2
    rows = {}
    try:
        for v2 in (False, True):
            context.use_datasource_v2 = v2
            table = pa.concat_tables(ray.get(read_examples(cfg, "train").to_arrow_refs()))
            rows[v2] = table.sort_by([("member_id", "ascending"), ("session_id", "ascending")]).to_pylist()
    finally:
        context.use_datasource_v2 = default
    assert len(rows[True]) > 0 and rows[True] == rows[False]
