"""The training driver: Ray Data reads the example shards, a Ray Train ``TorchTrainer`` runs the worker
loop, and the final checkpoint is published as a versioned model artifact.

Fault tolerance comes from Ray Train: ``FailureConfig(max_failures)`` restarts the worker group from the
latest reported checkpoint, and a new job with the same ``RunConfig(name, storage_path)`` finds the run's
checkpoint snapshot in storage and continues from it (Ray Train V2's replacement for ``Trainer.restore``).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import ray
import ray.data
import torch
from ray.data.expressions import col
from ray.train import CheckpointConfig, FailureConfig, Result, RunConfig
from ray.train.torch import TorchConfig, TorchTrainer

from workloads.train.artifact import feature_spec, save_artifact
from workloads.train.config import TrainConfig, check_inputs
from workloads.train.loop import CHECKPOINT_FILE, train_loop_per_worker
from workloads.train.sharding import connect, worker_scaling

logger = logging.getLogger(__name__)


def read_examples(cfg: TrainConfig, split: str) -> ray.data.Dataset:
    """One split: preprocessed examples of the configured surfaces, or (retrieval) the MovieLens users
    with a held-out item; training reads their training sequences, evaluation also their next item."""
    if cfg.is_retrieval:
        users = ray.data.read_parquet(str((cfg.examples_dir / "split.parquet").resolve()))
        return users.filter(expr=col("valid_item_id").is_not_null())
    examples = ray.data.read_parquet(str((cfg.examples_dir / split).resolve()))
    return examples.filter(expr=col("surface").is_in(list(cfg.surfaces)))


def make_trainer(cfg: TrainConfig) -> TorchTrainer:
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"train": cfg.model_dump(mode="json")},
        torch_config=TorchConfig(backend=cfg.backend),
        scaling_config=worker_scaling(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker),
        run_config=RunConfig(
            name=cfg.run_name,
            storage_path=str(cfg.storage_path.resolve()),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.keep_checkpoints),
        ),
        datasets={"train": read_examples(cfg, "train"), "eval": read_examples(cfg, "eval")},
    )


def epoch_history(result: Result) -> list[dict[str, Any]]:
    """Every checkpointed epoch's metrics, across restarts, in epoch order (from the run's storage)."""
    reported = [metrics for _, metrics in (result.best_checkpoints or [])]
    return sorted(reported, key=lambda m: m["epoch"])


def load_checkpoint_state(result: Result) -> dict[str, Any]:
    if result.checkpoint is None:
        raise RuntimeError(f"training run {result.path} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        state: dict[str, Any] = torch.load(
            Path(folder) / CHECKPOINT_FILE, map_location="cpu", weights_only=True
        )
    return state


def data_window(examples_dir: Path) -> dict[str, Any]:
    """The examples manifest's description of what was trained and evaluated on (empty if none)."""
    manifest = examples_dir / "manifest.json"
    if not manifest.is_file():
        return {}
    raw = json.loads(manifest.read_text())
    if "splits" not in raw:  # MovieLens: leave-one-out, no time window
        keys = ("source", "counts", "time_span")
        return {
            "examples_dir": str(examples_dir.resolve()),
            "split": "leave-one-out",
            **{k: raw.get(k) for k in keys},
        }
    return {
        "examples_dir": str(examples_dir.resolve()),
        "window": raw.get("window", {}),  # world_start, train_start, train_end (= eval start), eval_end
        "rows": {split: info.get("rows") for split, info in raw.get("splits", {}).items()},
        "members": {split: info.get("members") for split, info in raw.get("splits", {}).items()},
        "preprocess": raw.get("config", {}),
    }


def fit(cfg: TrainConfig) -> Result:
    """Run (or resume) the Ray Train job; raises ``ray.train.TrainingFailedError`` when out of retries."""
    connect(cfg.ray_address, cfg.num_workers, cfg.cpus_per_worker)
    return make_trainer(cfg).fit()


def train_and_publish(cfg: TrainConfig) -> dict[str, Any]:
    """The stage: check inputs, train, publish ``<artifact_root>/<name>/v<version>``; returns a summary."""
    check_inputs(cfg)
    result = fit(cfg)
    history = epoch_history(result)
    state = load_checkpoint_state(result)
    final = history[-1] if history else {}
    spec = feature_spec(
        cfg.model,
        item_content_source=str((cfg.world_dir / "items.parquet").resolve()) if cfg.world_dir else None,
        semantic_ids=str(cfg.semantic_ids_path.resolve()) if cfg.semantic_ids_path else None,
    )
    if not cfg.is_retrieval:
        spec["surfaces"] = list(cfg.surfaces)
    path = save_artifact(
        cfg.artifact_dir,
        state["model"],
        cfg.model,
        name=cfg.name,
        version=cfg.version,
        train_config=cfg.model_dump(mode="json"),
        feature_spec=spec,
        metrics={"final": final, "epochs": history},
        data_window=data_window(cfg.examples_dir),
    )
    logger.info("published %s", path)
    return {
        "artifact": str(path),
        "name": cfg.name,
        "version": cfg.version,
        "epochs": int(state["epoch"]),
        "run": str(result.path),
        "metrics": {k: v for k, v in final.items() if k.startswith(("eval_", "train_loss"))},
    }
