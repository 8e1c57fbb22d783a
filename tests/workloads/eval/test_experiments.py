from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from workloads.eval.experiments import ExperimentConfig, epoch_curve, markdown_table, previous_slot_repeats


def test_setwise_effects_come_comma_separated_from_the_command_line() -> None:
    assert ExperimentConfig.model_validate({"setwise_effects": "3,0.8,0"}).setwise_effects == (3.0, 0.8, 0.0)
    assert ExperimentConfig().setwise_effects == (0.8, 0.0)  # the world's default effect, and none


def test_a_negative_setwise_effect_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="setwise_effects"):
        ExperimentConfig.model_validate({"setwise_effects": "3,-1"})


def test_previous_slot_repeats_compare_each_candidate_with_the_slot_shown_right_before_it() -> None:
    examples = pa.table(
        {
            # shown out of storage order, with slot 4 missing: slot 5 has no slot before it
            "cand_position": [[1, 0, 2, 3, 5], [0, 1]],
            "cand_actor_id": [[7, 7, 8, 7, 7], [3, 3]],
            "cand_topic": [[1, 2, 2, 2, 1], [4, 5]],
        }
    )
    same_actor, same_topic = previous_slot_repeats(examples, max_candidates=4)
    # session 1 keeps its first 4 stored candidates (slots 1, 0, 2, 3), session 2 both
    assert same_actor.tolist() == [True, False, False, False, False, True]
    assert same_topic.tolist() == [False, False, False, True, False, False]
    same_actor, same_topic = previous_slot_repeats(examples.slice(0, 1), max_candidates=5)
    assert same_actor.tolist() == [True, False, False, False, False]
    assert same_topic.tolist() == [False, False, False, True, False]


def test_epoch_curve_reads_each_epochs_eval_aucs_against_the_training_seconds_spent_so_far() -> None:
    def epoch(n: int, seconds: float, auc: float) -> dict[str, float]:
        aucs = {f"eval_{task}_auc": auc for task in ("long_dwell", "contribution", "click")}
        return {"epoch": n, "train_seconds": seconds, "train_loss": 1.0, **aucs}

    metrics = {
        "final": epoch(3, 30.0, 0.7),
        "epochs": [epoch(1, 10.0, 0.6), epoch(2, 20.0, 0.65), epoch(3, 30.0, 0.7)],
    }
    curve = epoch_curve(metrics)
    assert [p["train_seconds"] for p in curve] == [10.0, 30.0, 60.0]
    assert [p["epoch"] for p in curve] == [1, 2, 3]
    assert [p["click_auc"] for p in curve] == [0.6, 0.65, 0.7]
    assert "train_loss" not in curve[0]


def test_markdown_table_writes_floats_and_intervals_to_four_places_and_leaves_missing_cells_empty() -> None:
    rows = [{"model": "a", "auc": 0.71234}, {"model": "a - b", "auc_ci95": [-0.001234, 0.0056789]}]
    assert markdown_table(rows).splitlines() == [
        "| model | auc | auc_ci95 |",
        "| --- | --- | --- |",
        "| a | 0.7123 |  |",
        "| a - b |  | [-0.0012, 0.0057] |",
    ]
