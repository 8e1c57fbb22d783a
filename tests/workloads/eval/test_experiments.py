from __future__ import annotations

import pyarrow as pa
import pytest
from pydantic import ValidationError

from workloads.eval.experiments import ExperimentConfig, previous_slot_repeats


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
