"""Shared builders for the operator tests: a valid manifest, and the model the operator would see for it."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from operators.api.v1alpha1 import RankingModel, RankingModelStatus
from operators.validate import admit

VALID_MANIFEST: dict[str, Any] = {
    "apiVersion": "rankray.io/v1alpha1",
    "kind": "RankingModel",
    "metadata": {"name": "feed-ligr", "namespace": "ranking"},
    "spec": {
        "featureRepo": {"path": "/app/feature_repo"},
        "data": {"source": "pvc://rankray-data/world"},
        "model": {"kind": "ligr", "historyLength": 64},
        "training": {"workers": 2},
        "evaluation": {"metric": "auc", "minLift": 0.005, "against": "served"},
        "serving": {"replicas": 2, "setwiseTopK": 10, "candidatesLimit": 500},
        "artifactRoot": "pvc://rankray-artifacts/models",
    },
}


@pytest.fixture
def manifest() -> dict[str, Any]:
    """A fresh copy of a valid RankingModel manifest, for a test to break or change."""
    return copy.deepcopy(VALID_MANIFEST)


def as_model(
    manifest: dict[str, Any],
    generation: int = 1,
    status: RankingModelStatus | None = None,
    uid: str = "uid-1",
) -> RankingModel:
    """The object as the operator receives it from the API server (uid and generation set) and admits it."""
    body = copy.deepcopy(manifest)
    body["metadata"].update(uid=uid, generation=generation)
    if status is not None:
        body["status"] = status.model_dump(mode="json", by_alias=True, exclude_none=True)
    model = admit(body)
    assert isinstance(model, RankingModel), model
    return model
