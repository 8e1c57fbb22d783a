"""The model artifact: save -> load gives the same scores; versions are whole, immutable and verified."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.workloads.models.synthetic import random_batch
from workloads.models.config import DCNv2Config, LiGRConfig, SASRecConfig
from workloads.models.registry import build_model, build_retrieval_model
from workloads.train.artifact import (
    MANIFEST,
    feature_spec,
    latest_version,
    load_artifact,
    save_artifact,
)
from workloads.train.loop import state_digest

TINY = LiGRConfig(d_model=16, n_layers=1, n_heads=2, id_dim=8, max_history=16, max_candidates=8)


def publish(root: Path, version: int = 1, cfg: LiGRConfig = TINY) -> tuple[torch.nn.Module, Path]:
    torch.manual_seed(version)
    model = build_model(cfg).eval()
    path = save_artifact(
        root / "ligr" / f"v{version}",
        model.state_dict(),
        cfg,
        name="ligr",
        version=version,
        train_config={"epochs": 1},
        feature_spec=feature_spec(cfg, "/world/items.parquet", None),
        metrics={"final": {"eval_long_dwell_auc": 0.7}},
        data_window={"window": {"train_end": "2024-02-23T00:00:00+00:00"}},
    )
    return model, path


def test_round_trip_gives_identical_scores(tmp_path: Path) -> None:
    model, path = publish(tmp_path)
    loaded = load_artifact(path)
    batch = random_batch(seed=0, n_rows=6)
    with torch.no_grad():
        expected, got = model(batch), loaded.model(batch)
    assert torch.equal(expected.logits, got.logits)
    assert not loaded.model.training
    assert next(loaded.model.parameters()).device.type == "cpu"
    assert state_digest(loaded.model.state_dict()) == state_digest(model.state_dict())
    assert (loaded.name, loaded.version) == ("ligr", 1)
    assert loaded.metrics["final"]["eval_long_dwell_auc"] == 0.7
    assert loaded.data_window["window"]["train_end"].startswith("2024-02-23")
    assert loaded.config["model"]["kind"] == "ligr" and loaded.config["train"] == {"epochs": 1}


def test_retrieval_models_round_trip(tmp_path: Path) -> None:
    cfg = SASRecConfig(d_model=16, n_heads=1, n_layers=1, max_len=8, item_hash_size=101)
    model = build_retrieval_model(cfg)
    path = save_artifact(tmp_path / "sasrec" / "v1", model.state_dict(), cfg, name="sasrec", version=1)
    loaded = load_artifact(path)
    ids = torch.arange(1, 11)
    assert torch.equal(loaded.model.item_embedding(ids), model.eval().item_embedding(ids))  # type: ignore[operator]


def test_layout_and_manifest(tmp_path: Path) -> None:
    _, path = publish(tmp_path)
    files = {p.name for p in path.iterdir()}
    assert files == {
        "model.safetensors",
        "config.json",
        "feature_spec.json",
        "metrics.json",
        "data_window.json",
        MANIFEST,
    }
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["version"] == 1 and manifest["model_kind"] == "ligr" and manifest["created"]
    assert set(manifest["files"]) == files - {MANIFEST}
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".")]  # no temp folder left


def test_published_versions_are_immutable(tmp_path: Path) -> None:
    publish(tmp_path, version=1)
    with pytest.raises(FileExistsError, match="immutable"):
        publish(tmp_path, version=1)
    publish(tmp_path, version=2)
    assert latest_version(tmp_path, "ligr") == tmp_path / "ligr" / "v2"


def test_a_failed_write_publishes_nothing(tmp_path: Path) -> None:
    model = build_model(TINY)
    unserializable: dict = {("not", "a", "json", "key"): 1.0}  # fails after the weights are written
    with pytest.raises(TypeError):
        save_artifact(
            tmp_path / "ligr" / "v1", model.state_dict(), TINY, name="ligr", version=1, metrics=unserializable
        )
    assert list((tmp_path / "ligr").iterdir()) == []


def test_a_corrupted_artifact_is_refused(tmp_path: Path) -> None:
    _, path = publish(tmp_path)
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_artifact(path)


def test_not_an_artifact_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a model artifact"):
        load_artifact(tmp_path)


def test_feature_spec_counts_what_each_model_reads() -> None:
    ligr = feature_spec(TINY, "/w/items.parquet", None)
    assert ligr["candidate_features"] == ["actor_id", "age_bucket", "content", "item_id", "post_type"]
    assert ligr["counter_features"] == [] and ligr["n_features"] <= 7  # the paper's "at most 7"
    assert ligr["max_history"] == 16 and ligr["item_content_source"] == "/w/items.parquet"
    lean = feature_spec(
        TINY.model_copy(update={"use_features": frozenset({"item_id", "actor_id"})}), None, None
    )
    assert lean["candidate_features"] == ["actor_id", "item_id"]
    # a counter LiGR's candidates read is listed, so serving fetches it, and counted as a feature
    with_ctr = feature_spec(TINY.model_copy(update={"candidate_counters": ("item_ctr_7d",)}), None, None)
    assert with_ctr["counter_features"] == ["item_ctr_7d"]
    assert with_ctr["n_features"] == ligr["n_features"] + 1
    dcn = feature_spec(DCNv2Config(), None, None)
    assert len(dcn["counter_features"]) == 11 and dcn["n_features"] > 7
