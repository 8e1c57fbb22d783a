"""The request contract: each client mistake is rejected with the field it is in (no Ray needed)."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import ValidationError

from workloads.data.schema import CONTENT_DIM
from workloads.serve.ingress import field_problems
from workloads.serve.schemas import RankRequest

INLINE = {
    "item_id": 9001,
    "actor_id": 3,
    "post_type": 1,
    "topic": 2,
    "created_at": "2024-02-29T12:00:00Z",
    "content_emb": [0.1] * CONTENT_DIM,
}


def problems(body: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(ValidationError) as caught:
        RankRequest.model_validate(body)
    return field_problems(caught.value.errors())


def test_a_minimal_request_gets_the_documented_defaults() -> None:
    request = RankRequest.model_validate({"member_id": 1, "surface": "feed", "candidates": [3, 1, 2]})
    assert request.k is None and request.model is None and request.setwise and request.as_of is None
    assert request.item_features == []


@pytest.mark.parametrize(
    ("body", "field", "says"),
    [
        ({"surface": "feed", "candidates": [1]}, "member_id", "required"),
        ({"member_id": "7", "surface": "feed", "candidates": [1]}, "member_id", "integer"),
        ({"member_id": 2**63, "surface": "feed", "candidates": [1]}, "member_id", "less than or equal"),
        ({"member_id": -1, "surface": "feed", "candidates": [1]}, "member_id", "greater than or equal"),
        ({"member_id": 1, "surface": "news", "candidates": [1]}, "surface", "'feed' or 'jobs'"),
        ({"member_id": 1, "surface": "feed", "candidates": []}, "candidates", "at least 1"),
        ({"member_id": 1, "surface": "feed", "candidates": [4, 5, 4]}, "candidates[2]", "appears twice"),
        ({"member_id": 1, "surface": "feed", "candidates": [1, 2.5]}, "candidates[1]", "integer"),
        ({"member_id": 1, "surface": "feed", "candidates": [1], "k": 0}, "k", "greater than or equal"),
        ({"member_id": 1, "surface": "feed", "candidates": [1], "model": "gpt"}, "model", "'ligr' or 'brew'"),
        (
            {"member_id": 1, "surface": "feed", "candidates": [1], "as_of": "2024-03-01T00:00:00"},
            "as_of",
            "timezone",
        ),
        ({"member_id": 1, "surface": "feed", "candidates": [1], "extra": 1}, "extra", "not permitted"),
        (
            {"member_id": 1, "surface": "feed", "candidates": [1], "item_features": [INLINE]},
            "item_features[0].item_id",
            "not a candidate",
        ),
        (
            {"member_id": 1, "surface": "feed", "candidates": [9001], "item_features": [INLINE, INLINE]},
            "item_features[1].item_id",
            "given twice",
        ),
        (
            {
                "member_id": 1,
                "surface": "feed",
                "candidates": [9001],
                "item_features": [{**INLINE, "content_emb": [0.1] * (CONTENT_DIM - 1)}],
            },
            "item_features[0].content_emb",
            f"at least {CONTENT_DIM}",
        ),
        (
            {
                "member_id": 1,
                "surface": "feed",
                "candidates": [9001],
                "item_features": [{**INLINE, "content_emb": [float("nan")] * CONTENT_DIM}],
            },
            "item_features[0].content_emb[0]",
            "finite",
        ),
        (
            {
                "member_id": 1,
                "surface": "feed",
                "candidates": [9001],
                "item_features": [{**INLINE, "post_type": 9}],
            },
            "item_features[0].post_type",
            "less than or equal",
        ),
    ],
)
def test_each_mistake_names_its_field(body: dict[str, Any], field: str, says: str) -> None:
    found = problems(body)
    assert any(f == field and says in p for f, p in found), found


def test_json_syntax_errors_are_reported_on_the_body() -> None:
    error = {
        "type": "json_invalid",
        "loc": ("body", 12),
        "msg": "JSON decode error",
        "ctx": {"error": "Expecting value"},
    }
    assert field_problems([error]) == [("body", "not valid JSON at character 12: Expecting value")]
