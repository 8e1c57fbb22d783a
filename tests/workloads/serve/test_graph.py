"""The ranking graph as a real service: Ray Serve on the shared local cluster, real HTTP on loopback.

One app is deployed for the module from the same serve config a RayService would carry (rendered by
`serve_config`, deployed by `deploy`), over the Feast repo materialized from the tiny world and a tiny
LiGR artifact. Expected scores come from `offline.expected_scores`, which never touches the service.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np
import pandas as pd
import pytest

from tests.workloads.serve.conftest import ServeWorld, tiny_ligr_artifact
from tests.workloads.serve.offline import Expected, expected_scores
from workloads.data.schema import CONTENT_DIM, TASKS
from workloads.serve.config import deploy, serve_config
from workloads.serve.graph import DEFAULT_TASK_WEIGHTS, GraphArgs
from workloads.serve.ranking import sigmoid, task_weight_vector

pytestmark = pytest.mark.slow

PORT = 8765  # not Serve's default 8000, nor 8123 (other tests)
LIMIT = 60
TOP_K = 10


@dataclass
class Service:
    http: httpx.Client
    world: ServeWorld
    graph: GraphArgs

    def rank(self, **body: Any) -> httpx.Response:
        body.setdefault("surface", "feed")
        body.setdefault("as_of", self.world.end.isoformat())
        return self.http.post("/v1/rank", json=body)

    def expected(self, member: int, candidates: list[int], version: int = 1, **kwargs: Any) -> Expected:
        artifact = self.world.artifacts / f"v{version}"
        weights = self.graph.task_weights
        return expected_scores(
            artifact, self.world.world, member, candidates, self.world.end, weights, TOP_K, **kwargs
        )


def graph_args(world: ServeWorld, version: int) -> GraphArgs:
    return GraphArgs(
        artifact_uri=str(world.artifacts / f"v{version}"),
        feature_repo=str(world.repo),
        model_version=f"v{version}",
        candidates_limit=LIMIT,
        setwise_top_k=TOP_K,
        feature_timeout_s=0.5,
        feature_attempts=2,
        max_batch_size=4,
    )


@pytest.fixture(scope="module")
def service(ray_session: None, serve_world: ServeWorld) -> Iterator[Service]:
    from ray import serve
    from ray.serve.context import _get_global_client

    graph = graph_args(serve_world, version=1)
    deploy(serve_config(graph, http_host="127.0.0.1", http_port=PORT), timeout_s=600)
    port = _get_global_client().http_config.port  # Serve keeps the port of whoever started it first
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        yield Service(http, serve_world, graph)
    serve.shutdown()


def member_with_history(world: ServeWorld) -> int:
    histories = pd.read_parquet(world.world / "features" / "member_history.parquet")
    return int(histories.loc[histories["history_len"].idxmax(), "member_id"])


def assert_served_equals(items: list[dict], expected: Expected, candidates: list[int]) -> None:
    weights = task_weight_vector(DEFAULT_TASK_WEIGHTS)
    assert [item["item_id"] for item in items] == [candidates[i] for i in expected.order[: len(items)]]
    for item in items:
        i = candidates.index(item["item_id"])
        final_p = sigmoid(expected.final_logits[i])
        assert [item["probabilities"][task] for task in TASKS] == pytest.approx(final_p, abs=1e-4)
        assert item["score"] == pytest.approx(float(final_p @ weights), abs=1e-4)
        assert item["pointwise_score"] == pytest.approx(
            float(sigmoid(expected.pointwise_logits[i]) @ weights), abs=1e-4
        )
        assert item["setwise"] == bool(expected.setwise[i])


def test_health_and_the_loaded_model(service: Service) -> None:
    assert service.http.get("/healthz").json() == {"status": "ok"}
    (model,) = service.http.get("/v1/models").json()["models"]
    assert model["model"] == "ligr" and model["version"] == "v1" and model["deployed_as"] == "v1"
    assert model["data_window"] == {"train": {"start": "2024-01-01", "end": "2024-02-20"}}
    assert (
        model["setwise_top_k"] == TOP_K and model["default"] and model["task_weights"] == DEFAULT_TASK_WEIGHTS
    )


def test_ranking_follows_the_scores_with_split_scoring(service: Service) -> None:
    member = member_with_history(service.world)
    candidates = list(range(300, 345))  # 45: more than the model's 32 per row
    response = service.rank(member_id=member, candidates=candidates)
    assert response.status_code == 200, response.text
    body = response.json()
    items = body["items"]
    assert sorted(i["item_id"] for i in items) == sorted(candidates) and [i["rank"] for i in items] == list(
        range(1, 46)
    )
    assert body["setwise_applied"] and body["model_version"] == "v1" and body["history_len"] == 64
    assert not body["cold_start"] and body["member_known"]
    head, tail = items[:TOP_K], items[TOP_K:]
    assert all(i["setwise"] for i in head) and not any(i["setwise"] for i in tail)
    # the top 10 follow their final scores; 11..end keep the pointwise order (paper 4.0.2)
    assert [i["score"] for i in head] == sorted((i["score"] for i in head), reverse=True)
    assert [i["pointwise_score"] for i in tail] == sorted((i["pointwise_score"] for i in tail), reverse=True)
    assert [i["score"] for i in tail] == [i["pointwise_score"] for i in tail]
    # the head is the pointwise top 10, in a different order (the set-wise part did something)
    assert min(i["pointwise_score"] for i in head) >= max(i["pointwise_score"] for i in tail)
    assert [i["pointwise_score"] for i in head] != sorted((i["pointwise_score"] for i in head), reverse=True)
    assert response.headers.get("content-type", "").startswith("application/json")


def test_served_scores_equal_offline_scores_of_the_same_artifact(service: Service) -> None:
    member = member_with_history(service.world)
    candidates = [17, 5, 250, 42, 611, 99, 120, 3, 77, 400, 8, 560, 31]
    response = service.rank(member_id=member, candidates=candidates, k=12)
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert len(items) == 12
    assert_served_equals(items, service.expected(member, candidates), candidates)


def test_without_setwise_the_ranking_is_pointwise(service: Service) -> None:
    member = member_with_history(service.world)
    candidates = list(range(50, 80))
    items = service.rank(member_id=member, candidates=candidates, setwise=False).json()["items"]
    assert not any(i["setwise"] for i in items)
    assert [i["score"] for i in items] == [i["pointwise_score"] for i in items]
    assert [i["score"] for i in items] == sorted((i["score"] for i in items), reverse=True)


@pytest.mark.parametrize("who", ["unknown member", "member without history"])
def test_cold_start_members_are_ranked_from_item_features(service: Service, who: str) -> None:
    with_history = set(
        pd.read_parquet(service.world.world / "features" / "member_history.parquet")["member_id"]
    )
    members = pd.read_parquet(service.world.world / "members.parquet")["member_id"]
    member = 10**9 if who == "unknown member" else int(next(m for m in members if m not in with_history))
    candidates = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    response = service.rank(member_id=member, candidates=candidates)
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["cold_start"] and body["history_len"] == 0
    assert body["member_known"] == (who == "member without history")
    assert_served_equals(body["items"], service.expected(member, candidates), candidates)


def test_items_the_store_has_not_seen_are_scored_from_inline_features(service: Service) -> None:
    member = member_with_history(service.world)
    new_item = 700  # the tiny world's items are 0..619
    inline = {
        "item_id": new_item,
        "actor_id": 5,
        "post_type": 2,
        "topic": 3,
        "created_at": (service.world.end - pd.Timedelta(hours=2)).isoformat(),
        "content_emb": np.linspace(-1, 1, CONTENT_DIM).round(4).tolist(),
    }
    candidates = [new_item, 10, 20, 30]
    response = service.rank(member_id=member, candidates=candidates, item_features=[inline])
    assert response.status_code == 200, response.text
    expected = service.expected(member, candidates, inline={new_item: inline})
    assert_served_equals(response.json()["items"], expected, candidates)


UNKNOWN = 10**6


@pytest.mark.parametrize(
    ("body", "status", "error", "field"),
    [
        ({"surface": "feed", "candidates": [1]}, 422, "invalid_request", "member_id"),
        ({"member_id": 1, "surface": "feed", "candidates": []}, 422, "invalid_request", "candidates"),
        (
            {"member_id": 1, "surface": "feed", "candidates": list(range(LIMIT + 1))},
            422,
            "invalid_request",
            "candidates",
        ),
        (
            {"member_id": 1, "surface": "feed", "candidates": [1, 2, 1]},
            422,
            "invalid_request",
            "candidates[2]",
        ),
        ({"member_id": 1, "surface": "feed", "candidates": [1, UNKNOWN]}, 422, "unknown_items", "candidates"),
        ({"member_id": "one", "surface": "feed", "candidates": [1]}, 422, "invalid_request", "member_id"),
        ({"member_id": 1, "surface": "feed", "candidates": "1,2"}, 422, "invalid_request", "candidates"),
        ({"member_id": 1, "surface": "feed", "candidates": [1], "k": "all"}, 422, "invalid_request", "k"),
        (
            {"member_id": 1, "surface": "feed", "candidates": [1], "model": "brew"},
            422,
            "model_not_deployed",
            "model",
        ),
        ({"member_id": 1, "surface": "mail", "candidates": [1]}, 422, "invalid_request", "surface"),
    ],
)
def test_each_bad_input_is_a_4xx_naming_its_field(
    service: Service, body: dict, status: int, error: str, field: str
) -> None:
    response = service.http.post("/v1/rank", json=body)
    assert response.status_code == status, response.text
    answer = response.json()
    assert answer["error"] == error and field in [f["field"] for f in answer["fields"]], answer
    assert answer["request_id"] and answer["message"]


def test_malformed_json_and_unknown_routes_are_4xx_in_the_same_body(service: Service) -> None:
    response = service.http.post(
        "/v1/rank", content=b'{"member_id": 1,', headers={"content-type": "application/json"}
    )
    assert response.status_code == 422 and response.json()["fields"][0]["field"] == "body"
    assert service.http.get("/v1/nothing").json()["error"] == "http_error"
    assert service.http.get("/v1/rank").status_code == 405


def test_a_feature_store_outage_answers_503_with_a_reason_not_a_hang(service: Service) -> None:
    db = service.world.root / "data" / "feast" / "online.db"
    member = member_with_history(service.world)
    lock = sqlite3.connect(db, isolation_level=None)
    lock.execute("BEGIN EXCLUSIVE")  # readers now wait on the lock: a store that hangs
    try:
        began = time.perf_counter()
        response = service.rank(member_id=member, candidates=[1, 2, 3])
        waited = time.perf_counter() - began
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    assert response.status_code == 503, response.text
    assert response.json()["error"] == "unavailable" and "feature store" in response.json()["message"]
    assert waited < 10  # 2 attempts of 0.5 s plus backoff and the hops; sqlite alone would wait 5 s per read
    deadline = time.monotonic() + 30  # reads stuck behind the lock drain within sqlite's 5 s busy timeout
    while service.rank(member_id=member, candidates=[1, 2, 3]).status_code != 200:
        assert time.monotonic() < deadline, "the service did not recover after the store came back"
        time.sleep(0.5)


def test_a_schema_driven_fuzzer_finds_no_server_errors(service: Service) -> None:
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings
    from schemathesis.checks import not_a_server_error
    from schemathesis.specs.openapi.checks import (
        content_type_conformance,
        response_schema_conformance,
        status_code_conformance,
    )

    base = str(service.http.base_url)
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    checks = [
        not_a_server_error,
        status_code_conformance,
        content_type_conformance,
        response_schema_conformance,
    ]
    positive, negative = schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE
    plan = [  # GET routes take no input, so there is nothing to make invalid
        ("POST", "/v1/rank", positive, 25),
        ("POST", "/v1/rank", negative, 25),
        ("GET", "/v1/models", positive, 2),
        ("GET", "/healthz", positive, 2),
    ]
    for method, path, mode, examples in plan:

        @settings(
            max_examples=examples,
            deadline=None,
            phases=[Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=schema[path][method].as_strategy(generation_mode=mode))
        def fuzz(case: Any) -> None:
            case.call_and_validate(base_url=base, checks=checks)

        fuzz()


def test_a_new_version_is_served_after_redeploying_the_config(service: Service) -> None:
    """Last in the module: it swaps the deployed artifact. No code changes, only the config's args."""
    tiny_ligr_artifact(service.world.artifacts / "v2", service.world.world, version=2, seed=1)
    graph = graph_args(service.world, version=2)
    deploy(serve_config(graph, http_host="127.0.0.1", http_port=PORT), timeout_s=600)
    service.graph = graph
    (model,) = service.http.get("/v1/models").json()["models"]
    assert model["version"] == "v2" and model["deployed_as"] == "v2"
    member = member_with_history(service.world)
    candidates = [17, 5, 250, 42, 611, 99, 120, 3, 77, 400, 8, 560]
    body = service.rank(member_id=member, candidates=candidates).json()
    assert body["model_version"] == "v2"
    assert_served_equals(body["items"], service.expected(member, candidates, version=2), candidates)
    served = {i["item_id"]: i["pointwise_score"] for i in body["items"]}
    weights = task_weight_vector(graph.task_weights)
    v1 = sigmoid(service.expected(member, candidates, version=1).pointwise_logits) @ weights
    assert not np.allclose([served[c] for c in candidates], v1, atol=1e-3)  # really another model
