"""Evaluation stage end to end on the trained tiny artifact: every section of the report, and the plots."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from workloads.brew.evaluate import BrewEvalConfig, evaluate
from workloads.brew.score import ScorerConfig
from workloads.eval.metrics import auc

LABELS = {"job_apply": "apply", "feed_like": "like"}


def eval_config(lora_training: Any, tiny_world: Path, tmp_path: Path, **settings: Any) -> BrewEvalConfig:
    """Evaluate the fixture's trained tiny artifact on the tiny world into ``tmp_path/eval``."""
    return BrewEvalConfig(
        artifact_dir=Path(lora_training[1]["artifact"]),
        world_dir=tiny_world,
        out_dir=tmp_path / "eval",
        **settings,
    )


@pytest.mark.slow
def test_evaluate_reports_tasks_slices_context_sweep_and_zero_shot(
    lora_training: Any, tiny_world: Path, tmp_path: Path
) -> None:
    evaluate(
        eval_config(
            lora_training, tiny_world, tmp_path, examples_per_task=24, context_sweep=[256, 512],
            sweep_examples_per_task=12, scorer=ScorerConfig(backend="transformers"),
        )
    )  # fmt: skip
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert set(metrics["tasks"]) == {"job_apply", "feed_like", "follow_actor"}  # the artifact's T1 + every T2
    assert metrics["tasks"]["follow_actor"]["zero_shot"] and not metrics["tasks"]["feed_like"]["zero_shot"]
    for task in metrics["tasks"].values():
        assert task["n"] == 24 and 0 < task["positives"] < 24
        assert 0.0 <= task["brew_auc"] <= 1.0 and 0.0 <= task["popularity_auc"] <= 1.0
        assert sum(s["n"] for s in task["by_history"].values()) <= task["n"]
    scores = pd.read_parquet(tmp_path / "eval" / "scores.parquet")  # what workloads.brew.compare reads
    for name, task in metrics["tasks"].items():
        rows = scores[scores["task"] == name]
        assert len(rows) == 24 and task["label_action"] == LABELS.get(name)  # follow_actor: None
        assert auc(rows["label"], rows["brew"]) == pytest.approx(task["brew_auc"], abs=1e-4)
        assert auc(rows["label"], rows["popularity"]) == pytest.approx(task["popularity_auc"], abs=1e-4)
        assert rows["history_in_prompt"].mean() == pytest.approx(task["mean_history_in_prompt"])
        assert set(task["vs_popularity"]) == {"difference", "ci95_low", "ci95_high", "p_not_better"}
        assert task["vs_popularity"]["difference"] == pytest.approx(
            task["brew_auc"] - task["popularity_auc"], abs=1e-4
        )
    # T2 comes as one followed and one other actor per member: the within-member AUC is the share of
    # members whose followed actor scores higher (ties half)
    follow = scores[scores["task"] == "follow_actor"].sort_values(["member_id", "label"])
    pos, neg = follow[follow["label"] == 1], follow[follow["label"] == 0]
    assert list(pos["member_id"]) == list(neg["member_id"])
    wins = (pos["brew"].to_numpy() > neg["brew"].to_numpy()) + 0.5 * (
        pos["brew"].to_numpy() == neg["brew"].to_numpy()
    )
    t2 = metrics["tasks"]["follow_actor"]
    assert t2["members_with_both_labels"] == len(pos)
    assert t2["member_auc"]["brew"] == pytest.approx(wins.mean(), abs=1e-4)
    assert set(t2["member_auc_vs_popularity"]) == set(t2["vs_popularity"])
    assert metrics["world_dir"] == str(tiny_world.resolve())
    sweep = metrics["context_sweep"]["feed_like"]
    assert set(sweep) == {"256", "512"}
    assert sweep["256"]["mean_history_in_prompt"] <= sweep["512"]["mean_history_in_prompt"]
    assert (tmp_path / "eval" / "auc_vs_context.png").stat().st_size > 0
    assert (tmp_path / "eval" / "gap_by_history.png").stat().st_size > 0


@pytest.mark.slow
def test_a_sweep_budget_too_small_for_a_prompt_fails_before_anything_is_scored(
    lora_training: Any, tiny_world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_scoring(*_: Any) -> None:
        raise AssertionError("a scorer was started before every prompt was known to fit")

    monkeypatch.setattr("workloads.brew.evaluate.make_scorer", no_scoring)
    cfg = eval_config(
        lora_training, tiny_world, tmp_path, examples_per_task=8, context_sweep=[64, 512],
        sweep_examples_per_task=4,
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"context_sweep: max_context_tokens=64 cannot hold the '\w+'"):
        evaluate(cfg)
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
def test_the_operator_evaluate_stage_gates_brew_against_popularity(
    lora_training: Any, tiny_world: Path, tmp_path: Path
) -> None:
    """`workloads.eval.gate` with kind brew: 360Brew's AUC per trained task against the popularity ranker."""
    from workloads.eval.gate import GateSpec, GateStageConfig, run

    config = GateStageConfig(
        kind="brew",
        artifact_dir=Path(lora_training[1]["artifact"]),
        world_dir=tiny_world,
        out_dir=tmp_path / "eval",
        gate=GateSpec(task="feed_like", min_lift=-1.0),
        brew_examples_per_task=24,
        brew_scorer="transformers",
    )
    summary = run(config)
    tasks = json.loads((tmp_path / "eval-candidate" / "metrics.json").read_text())["tasks"]
    assert set(summary["task_auc"]) <= {"job_apply", "feed_like"}  # trained tasks only, not the zero-shot one
    gate = summary["gate"]
    assert (
        gate["value"] == tasks["feed_like"]["brew_auc"]
        and gate["reference"] == tasks["feed_like"]["popularity_auc"]
    )
    assert gate["reference_name"] == "baseline" and gate["passed"] is True  # any finite lift passes -100%
    with pytest.raises(ValueError, match=r"gate\.metric"):
        run(config.model_copy(update={"gate": GateSpec(metric="normalized_entropy")}))
    assert not (tmp_path / "eval-candidate" / "auc_vs_context.png").exists()  # no sweep asked, none drawn
