"""A Feast repo materialized from the tiny world and a tiny LiGR artifact, shared by the serving tests.

Everything lives under a private root (a copy of feature_repo/, its own data dir), so the real repo's
registry and online store are never touched. Only the views serving reads are materialized.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import torch

from workloads.data.features import (
    FeatureTablesConfig,
    apply,
    build_feature_tables,
    feature_store,
    offline_session,
)
from workloads.models.config import LiGRConfig
from workloads.models.registry import build_model
from workloads.train.artifact import feature_spec, save_artifact

REPO = Path(__file__).resolve().parents[3] / "feature_repo"
# what serving reads: the histories, profiles and items, plus the two counter views of ligr_v2 (the
# other counter views stay empty, so their counters are read as unseen)
SERVED_VIEWS = ["member_history", "member_profile", "item_features", "member_actor_counters", "item_counters"]
HISTORY_LEN = 64


@dataclass
class ServeWorld:
    root: Path
    world: Path  # the world's tables (items.parquet) and features/ (the tables Feast serves)
    repo: Path  # the Feast repo copy, applied and materialized
    artifacts: Path  # <artifact_root>/ligr/v<N>
    end: datetime  # the world's end: the time tests score at


def tiny_ligr_artifact(path: Path, world: Path, version: int, seed: int, **model: Any) -> Path:
    """A freshly initialised tiny LiGR, published with the training stage's own `save_artifact`.

    ``max_candidates`` is small so that requests with more candidates exercise the scorer's row split.
    The set-wise head starts at zero (a trained one is not), so it is re-drawn: a zero correction would
    let the set-wise tests pass without the set-wise path doing anything.
    """
    cfg = LiGRConfig(
        d_model=32,
        n_layers=1,
        n_heads=2,
        max_history=HISTORY_LEN,
        max_candidates=32,
        dropout=0.0,
        item_hash_size=1009,
        actor_hash_size=101,
        **model,
    )
    torch.manual_seed(seed)
    model = build_model(cfg)
    for parameter in model.setwise_head.parameters():
        torch.nn.init.normal_(parameter, std=0.3)
    return save_artifact(
        path,
        model.state_dict(),
        cfg,
        name="ligr",
        version=version,
        feature_spec=feature_spec(cfg, str(world / "items.parquet"), None),
        metrics={"auc": 0.5},
        data_window={"train": {"start": "2024-01-01", "end": "2024-02-20"}},
    )


@pytest.fixture(scope="session")
def serve_world(tiny_world: Path, tmp_path_factory: pytest.TempPathFactory) -> ServeWorld:
    root = tmp_path_factory.mktemp("serve")
    world = root / "data" / "world"
    shutil.copytree(tiny_world, world, ignore=shutil.ignore_patterns("features"))
    repo = shutil.copytree(REPO, root / "feature_repo", ignore=shutil.ignore_patterns("__pycache__", "data"))
    with pytest.MonkeyPatch.context() as env, offline_session():
        env.setenv("RANKRAY_DATA_DIR", str(root / "data"))
        env.delenv("FEAST_FS_YAML_FILE_PATH", raising=False)
        built = build_feature_tables(world, FeatureTablesConfig(history_len=HISTORY_LEN, counter_snapshots=1))
        apply(repo)
        feature_store(repo).materialize(
            start_date=datetime(2000, 1, 1, tzinfo=UTC),
            end_date=datetime.fromisoformat(built["end"]) + timedelta(seconds=1),  # the end is exclusive
            feature_views=SERVED_VIEWS,
        )
    artifacts = root / "models" / "ligr"
    tiny_ligr_artifact(artifacts / "v1", world, version=1, seed=0)
    return ServeWorld(root, world, repo, artifacts, datetime.fromisoformat(built["end"]))
