from __future__ import annotations

import pytest
from pydantic import ValidationError

from workloads.eval.experiments import ExperimentConfig


def test_setwise_effects_come_comma_separated_from_the_command_line() -> None:
    assert ExperimentConfig.model_validate({"setwise_effects": "3,0.8,0"}).setwise_effects == (3.0, 0.8, 0.0)
    assert ExperimentConfig().setwise_effects == (0.8, 0.0)  # the world's default effect, and none


def test_a_negative_setwise_effect_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match="setwise_effects"):
        ExperimentConfig.model_validate({"setwise_effects": "3,-1"})
