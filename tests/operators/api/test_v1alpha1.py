"""The API models: camelCase on the wire, what starts a new version, and status round trips."""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from operators.api.v1alpha1 import (
    Condition,
    ConditionStatus,
    ConditionType,
    ModelKind,
    ModelVersion,
    RankingModelSpec,
    RankingModelStatus,
)


def _spec(manifest: dict[str, Any]) -> RankingModelSpec:
    return RankingModelSpec.model_validate(manifest["spec"])


def test_the_spec_reads_camel_case_and_fills_defaults(manifest: dict[str, Any]) -> None:
    spec = _spec(manifest)
    assert spec.model.kind is ModelKind.LIGR and spec.model.history_length == 64
    assert spec.serving.setwise_top_k == 10 and spec.serving.candidates_limit == 500
    assert spec.training.max_failures == 3 and spec.training.sharding == "ddp"
    assert spec.model_dump(mode="json")["featureRepo"] == {"path": "/app/feature_repo"}


@pytest.mark.parametrize(
    ("path", "value", "retrains"),
    [
        ("serving.replicas", 7, False),
        ("serving.setwiseTopK", 5, False),
        ("image", "registry.local/rankray:dev", False),
        ("suspend", True, False),
        ("model.historyLength", 128, True),
        ("training.workers", 8, True),
        ("evaluation.minLift", 0.01, True),
        ("data.source", "pvc://other/world", True),
        ("featureRepo.path", "/srv/feature_repo", True),
        ("model.features", ["content"], True),
        ("model.counters", ["item_ctr_7d"], True),
        ("model.actorMatch", True, True),
    ],
)
def test_only_changes_to_what_is_trained_change_the_pipeline_fingerprint(
    manifest: dict[str, Any], path: str, value: Any, retrains: bool
) -> None:
    changed = copy.deepcopy(manifest)
    *parents, leaf = path.split(".")
    node = changed["spec"]
    for key in parents:
        node = node[key]
    node[leaf] = value
    assert (_spec(changed).pipeline_fingerprint() != _spec(manifest).pipeline_fingerprint()) is retrains


def test_status_round_trips_through_its_wire_form() -> None:
    status = RankingModelStatus(
        conditions=[
            Condition(
                type=ConditionType.READY,
                status=ConditionStatus.TRUE,
                reason="Serving",
                message="v1 serves",
                last_transition_time=datetime(2026, 11, 20, tzinfo=UTC),
            )
        ],
        current_version=ModelVersion(
            name="v1",
            generation=1,
            spec_hash="abc",
            kind=ModelKind.LIGR,
            artifact_uri="s3://b/m/v1/model",
            feature_repo="/app/feature_repo",
            data_source="s3://b/world",
        ),
    )
    wire = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    assert wire["currentVersion"]["artifactUri"] == "s3://b/m/v1/model"
    assert wire["conditions"][0]["lastTransitionTime"] == "2026-11-20T00:00:00Z"
    assert RankingModelStatus.model_validate(wire) == status


def test_an_operator_upgrade_that_adds_fields_does_not_retrain(manifest: dict[str, Any]) -> None:
    """The fixture's digest under the API before model.features and model.counters existed."""
    assert _spec(manifest).pipeline_fingerprint() == "fed0ed579b5c68ac"
