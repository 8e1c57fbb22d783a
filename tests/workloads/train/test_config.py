"""Nonsense in a training config fails on the driver, naming the field, before any Ray worker starts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from workloads.stage import parse_config
from workloads.train import trainer
from workloads.train.config import TrainConfig, check_inputs

TINY_LIGR = {"kind": "ligr", "d_model": 16, "n_heads": 2, "n_layers": 1, "id_dim": 8}


def config(tmp_path: Path, model: dict[str, Any] | None = None, **overrides: Any) -> dict[str, Any]:
    return {
        "examples_dir": str(tmp_path / "examples"),
        "world_dir": str(tmp_path / "world"),
        "storage_path": str(tmp_path / "runs"),
        "artifact_root": str(tmp_path / "models"),
        "model": model or TINY_LIGR,
        **overrides,
    }


@pytest.mark.parametrize(
    ("model", "overrides", "message"),
    [
        ({**TINY_LIGR, "d_model": -8}, {}, "d_model"),
        ({**TINY_LIGR, "n_heads": 3}, {}, "n_heads=3 must divide d_model=16"),
        ({**TINY_LIGR, "max_history": 600, "max_tokens": 1024}, {}, "exceeds max_tokens=1024"),
        ({**TINY_LIGR, "kind": "gpt"}, {}, "kind"),
        ({**TINY_LIGR, "dropout": 1.5}, {}, "dropout"),
        (TINY_LIGR, {"epochs": 0}, "epochs"),
        (TINY_LIGR, {"batch_size": -1}, "batch_size"),
        (TINY_LIGR, {"strategy": "zero3"}, "strategy"),
        (TINY_LIGR, {"shard_embeddings": True, "num_workers": 1}, "needs num_workers >= 2"),
        (
            TINY_LIGR,
            {"shard_embeddings": True, "num_workers": 3},
            "id_dim=8 must be divisible by num_workers=3",
        ),
        (TINY_LIGR, {"crash_at_epoch": 5, "epochs": 3}, "after the last epoch"),
        ({**TINY_LIGR, "use_semantic_ids": True}, {}, "semantic_ids_path"),
        (TINY_LIGR, {"name": "My Model"}, "name"),
        (TINY_LIGR, {"world_dir": None}, "world_dir: required for ranking models"),
        (TINY_LIGR, {"surfaces": []}, "surfaces"),
        (TINY_LIGR, {"learning_rate": 0.1}, "learning_rate"),
    ],
)
def test_nonsense_is_rejected_naming_the_field(
    tmp_path: Path, model: dict[str, Any], overrides: dict[str, Any], message: str
) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainConfig.model_validate(config(tmp_path, model, **overrides))


def test_defaults_pick_backend_and_names(tmp_path: Path) -> None:
    cfg = TrainConfig.model_validate(config(tmp_path, name="feed-ranker", version=3))
    assert cfg.backend == "gloo" and not cfg.autocast_bf16
    assert cfg.run_name == "feed-ranker-v3"
    assert cfg.artifact_dir == tmp_path / "models" / "feed-ranker" / "v3"
    gpu = TrainConfig.model_validate(config(tmp_path, use_gpu=True))
    assert gpu.backend == "nccl" and gpu.autocast_bf16


def test_relative_paths_are_made_absolute_on_the_driver(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A Ray worker's working directory is not the driver's: it would read data/world from its own."""
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig.model_validate(
        {
            "examples_dir": "data/examples",
            "world_dir": "./data/world",
            "model": TINY_LIGR,
            "storage_path": "runs",
        }
    )
    assert (cfg.examples_dir, cfg.world_dir, cfg.storage_path) == (
        tmp_path / "data/examples",
        tmp_path / "data/world",
        tmp_path / "runs",
    )
    assert TrainConfig.model_validate(cfg.model_dump(mode="json")) == cfg  # what the workers parse again


def test_retrieval_models_need_no_world(tmp_path: Path) -> None:
    cfg = TrainConfig.model_validate(config(tmp_path, {"kind": "sasrec"}, world_dir=None))
    assert cfg.is_retrieval


def test_command_line_exits_with_the_field_path(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = config(tmp_path, {**TINY_LIGR, "n_heads": 3})
    with pytest.raises(SystemExit) as exit_info:
        parse_config(TrainConfig, ["--config-json", json.dumps(bad)])
    assert exit_info.value.code == 2
    assert "model.ligr.n_heads" in capsys.readouterr().err


def test_missing_inputs_fail_before_ray_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*_: Any) -> None:
        raise AssertionError("training must not start")

    monkeypatch.setattr(trainer, "fit", no_training)
    cfg = TrainConfig.model_validate(config(tmp_path))
    with pytest.raises(FileNotFoundError, match="examples_dir: no parquet files"):
        trainer.train_and_publish(cfg)


def test_a_published_version_is_never_retrained(tmp_path: Path) -> None:
    for split in ("train", "eval"):
        (tmp_path / "examples" / split).mkdir(parents=True)
        (tmp_path / "examples" / split / "part-0.parquet").touch()
    (tmp_path / "world").mkdir()
    (tmp_path / "world" / "items.parquet").touch()
    cfg = TrainConfig.model_validate(config(tmp_path, version=2))
    check_inputs(cfg)  # everything in place
    cfg.artifact_dir.mkdir(parents=True)
    with pytest.raises(FileExistsError, match="pick version > 2"):
        check_inputs(cfg)
