"""The evaluation stage: gate logic, scoring published artifacts, and the MovieLens full ranking."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from pydantic import ValidationError

from workloads.eval.evaluate import (
    EvalConfig,
    Gate,
    apply_gate,
    read_examples,
    retrieval_ranks,
    run,
    score_examples,
)
from workloads.eval.experiments import setwise_probe
from workloads.eval.metrics import auc
from workloads.models.batch import collate_sequences
from workloads.models.config import DCNv2Config, LiGRConfig, LiGRRetrievalConfig, SASRecConfig
from workloads.models.registry import build_model, build_retrieval_model
from workloads.train.artifact import feature_spec, load_artifact, save_artifact

# --- The gate ---------------------------------------------------------------------------------------


def test_relative_lift_passes_and_fails_on_the_threshold() -> None:
    gate = Gate(metric="long_dwell_auc", min_lift=0.02, lift="relative")
    passed = apply_gate(gate, {"long_dwell_auc": 0.72}, {"long_dwell_auc": 0.70})
    assert passed["passed"] and passed["lift_value"] == pytest.approx(0.02 / 0.70)
    assert "+2.857%" in passed["reason"]
    failed = apply_gate(gate, {"long_dwell_auc": 0.71}, {"long_dwell_auc": 0.70})
    assert not failed["passed"] and "<" in failed["reason"]


def test_absolute_lift_and_tolerated_loss() -> None:
    gate = Gate(metric="contribution_auc", min_lift=-0.005, lift="absolute")
    assert apply_gate(gate, {"contribution_auc": 0.698}, {"contribution_auc": 0.70})["passed"]
    assert not apply_gate(gate, {"contribution_auc": 0.69}, {"contribution_auc": 0.70})["passed"]


def test_normalized_entropy_lower_is_better() -> None:
    gate = Gate(metric="click_ne", min_lift=0.0)
    assert apply_gate(gate, {"click_ne": 0.90}, {"click_ne": 0.95})["passed"]
    assert not apply_gate(gate, {"click_ne": 0.97}, {"click_ne": 0.95})["passed"]


def test_undefined_metric_never_passes() -> None:
    result = apply_gate(Gate(), {"long_dwell_auc": math.nan}, {"long_dwell_auc": 0.7})
    assert not result["passed"] and "undefined" in result["reason"]


def test_gate_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="set baseline"):
        EvalConfig(artifacts=[tmp_path], examples_dir=tmp_path, gate=Gate())
    with pytest.raises(ValidationError, match="metric"):
        Gate(metric="dwell_accuracy")
    with pytest.raises(ValidationError, match="artifacts"):
        EvalConfig(artifacts=[], examples_dir=tmp_path)


# --- Ranking artifacts on the tiny world ------------------------------------------------------------


def publish(root: Path, name: str, cfg: Any, world: Path) -> Path:
    torch.manual_seed(0)
    model = build_model(cfg)
    spec = {**feature_spec(cfg, str(world / "items.parquet"), None), "surfaces": ["feed"]}
    return save_artifact(root / name / "v1", model.state_dict(), cfg, name=name, version=1, feature_spec=spec)


def test_evaluation_scores_every_eval_candidate_and_gates(
    tmp_path: Path, tiny_world: Path, tiny_examples: Path
) -> None:
    ligr = publish(tmp_path, "ligr", LiGRConfig(d_model=16, n_heads=2, n_layers=1, id_dim=8), tiny_world)
    dcn = publish(tmp_path, "dcn", DCNv2Config(id_dim=8, mlp_dims=(16,)), tiny_world)
    cfg = EvalConfig(
        artifacts=[ligr],
        baseline=dcn,
        examples_dir=tiny_examples,
        gate=Gate(metric="long_dwell_auc", min_lift=-1.0),  # any finite AUC passes this one
        output=tmp_path / "eval" / "metrics.json",
    )
    summary = run(cfg)

    report = json.loads(cfg.output.read_text())
    examples = pq.read_table(tiny_examples / "eval").filter(
        pa.compute.equal(pa.compute.field("surface"), "feed")
    )
    n_candidates = sum(len(c) for c in examples.column("cand_item_id").to_pylist())
    ligr_result = report["models"]["ligr/v1"]
    assert ligr_result["overall"]["candidates"] == n_candidates
    assert ligr_result["overall"]["sessions"] == len(examples)
    assert sum(s["candidates"] for s in ligr_result["slices"].values()) == n_candidates
    assert ligr_result["n_features"] <= 7 < report["models"]["dcn/v1"]["n_features"]
    assert report["gate"]["candidate"] == "ligr/v1" and report["baseline"] == "dcn/v1"
    assert summary["gate_passed"] is True and "long_dwell_auc" in summary["reason"]
    assert summary["models"]["ligr/v1"]["long_dwell_auc"] == ligr_result["overall"]["long_dwell_auc"]
    # paired with the baseline on the same candidates: the difference of the two AUCs, inside its interval
    paired = ligr_result["vs_baseline"]["long_dwell"]
    difference = (
        ligr_result["overall"]["long_dwell_auc"] - report["models"]["dcn/v1"]["overall"]["long_dwell_auc"]
    )
    assert paired["difference"] == pytest.approx(difference)
    assert (
        paired["ci95_low"] <= paired["difference"] <= paired["ci95_high"] and 0 <= paired["p_not_better"] <= 1
    )
    assert "vs_baseline" not in report["models"]["dcn/v1"]
    assert not [p for p in cfg.output.parent.iterdir() if p.name.startswith(".")]  # no temp file left

    # the reported AUC is the AUC of the model's own scores on those candidates
    artifact = load_artifact(ligr)

    scored = score_examples(artifact, read_examples(tiny_examples, "eval", ["feed"]))
    assert ligr_result["overall"]["long_dwell_auc"] == pytest.approx(
        auc(scored.labels[:, 2], scored.probs[:, 2])
    )
    # LiGR's set-wise part comes along (the set-wise experiment reads it); DCNv2 has none
    assert scored.setwise_logits is not None and scored.setwise_logits.shape == scored.probs.shape
    assert scored.setwise_logits.std() > 0
    rows = read_examples(tiny_examples, "eval", ["feed"]).column("cand_item_id").to_pylist()
    np.testing.assert_array_equal(scored.session, np.repeat(np.arange(len(rows)), [len(r) for r in rows]))
    dcn_scored = score_examples(load_artifact(dcn), read_examples(tiny_examples, "eval", ["feed"]))
    assert dcn_scored.setwise_logits is None

    # the set-wise experiment's probe on the same artifact: with no set effect the "ceiling" adds nothing
    probe = setwise_probe(0.0, {"on, self only": ligr, "off": dcn}, tiny_examples)
    assert [row["setwise_attention"] for row in probe] == ["on, self only", "self only + true set term"]
    assert {"response_same_actor", "response_same_topic"} <= probe[0].keys()
    assert probe[1]["long_dwell_auc"] == pytest.approx(ligr_result["overall"]["long_dwell_auc"])


# --- MovieLens-style retrieval ---------------------------------------------------------------------


def fake_movielens(folder: Path) -> Path:
    folder.mkdir()
    pq.write_table(pa.table({"item_id": pa.array(np.arange(1, 21), pa.int64())}), folder / "items.parquet")
    pq.write_table(
        pa.table(
            {
                "member_id": pa.array([1, 2, 3], pa.int64()),
                "train_item_ids": pa.array([[1, 2, 3], [4, 5], [6]], pa.list_(pa.int64())),
                "train_timestamps": pa.array([[1, 2, 3], [1, 2], [1]], pa.list_(pa.int64())),
                "train_actions": pa.array([[1, 3, 1], [3, 3], [1]], pa.list_(pa.int16())),
                "valid_item_id": pa.array([7, 8, 9], pa.int64()),
                "valid_timestamp": pa.array([4, 3, 2], pa.int64()),
                "valid_actions": pa.array([3, 1, 1], pa.int16()),
                "test_item_id": pa.array([10, 11, 12], pa.int64()),
                "test_timestamp": pa.array([5, 4, 3], pa.int64()),
            }
        ),
        folder / "split.parquet",
    )
    return folder


def rank_fake_movielens(cfg: Any, tmp_path: Path) -> tuple[Any, np.ndarray]:
    """A seeded, untrained retriever published as an artifact, and the evaluation's test-item ranks."""
    movielens = fake_movielens(tmp_path / "ml")
    torch.manual_seed(0)
    model = build_retrieval_model(cfg).eval()
    path = save_artifact(tmp_path / cfg.kind / "v1", model.state_dict(), cfg, name=cfg.kind, version=1)
    return model, retrieval_ranks(load_artifact(path), movielens)


def test_retrieval_ranks_the_test_item_against_unseen_items(tmp_path: Path) -> None:
    cfg = SASRecConfig(d_model=8, n_heads=1, n_layers=1, max_len=8, item_hash_size=101, dropout=0.0)
    model, ranks = rank_fake_movielens(cfg, tmp_path)

    # brute force: user 0 has seen 1, 2, 3 and 7 (train + valid); rank item 10 among the other 16
    with torch.no_grad():
        user = model.user_embedding(collate_sequences([np.array([1, 2, 3, 7])], 8))[0]
        scores = model.item_embedding(torch.arange(1, 21)) @ user
    unseen = [i for i in range(1, 21) if i not in (1, 2, 3, 7, 10)]
    expected = sum(float(scores[i - 1]) >= float(scores[10 - 1]) for i in unseen)
    assert ranks[0] == expected
    assert len(ranks) == 3 and (ranks < 20 - 2).all()


def test_ligr_retrieval_reads_the_history_outcomes(tmp_path: Path) -> None:
    """LiGR retrieval interleaves action tokens: the user state must come from the split's real outcomes
    (train + validation events), and a different outcome changes it."""
    cfg = LiGRRetrievalConfig(d_model=8, n_heads=2, n_layers=1, max_len=8, item_hash_size=101, dropout=0.0)
    model, ranks = rank_fake_movielens(cfg, tmp_path)

    def scores(actions: list[int]) -> torch.Tensor:
        history = collate_sequences([np.array([1, 2, 3, 7])], 8, actions=[np.array(actions)])
        with torch.no_grad():
            return model.item_embedding(torch.arange(1, 21)) @ model.user_embedding(history)[0]

    real = scores([1, 3, 1, 3])  # user 0's click / click+like bitmasks, validation event last
    assert not torch.allclose(real, scores([1, 1, 1, 1]))
    unseen = [i for i in range(1, 21) if i not in (1, 2, 3, 7, 10)]
    assert ranks[0] == sum(float(real[i - 1]) >= float(real[10 - 1]) for i in unseen)
