"""The BrewScorer deployment on a real Ray Serve app, answering HTTP on loopback with vLLM underneath."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from workloads.brew.artifact import load_artifact
from workloads.brew.data import EntityText, World, member_history
from workloads.brew.model import load_tokenizer
from workloads.brew.prompts import HistoryEvent, Templates, Verbalizer
from workloads.brew.score import ScorerConfig, TransformersScorer

APP, ROUTE = "brew-test", "/brew-test"


@pytest.fixture(scope="module")
def base_url(lora_training: Any, tiny_world: Path) -> Iterator[str]:
    from ray import serve
    from ray.serve.context import _get_global_client

    from workloads.brew.serve import BrewScorer

    # A non-default port; if another test already started Serve, its proxy's port is the one to call.
    serve.start(http_options={"host": "127.0.0.1", "port": 8123})
    client = _get_global_client()
    assert client is not None
    serve.run(
        BrewScorer.bind(  # type: ignore[attr-defined]  # added by @serve.deployment
            lora_training[1]["artifact"], str(tiny_world), {"backend": "vllm"}
        ),
        name=APP,
        route_prefix=ROUTE,
    )
    yield f"http://127.0.0.1:{client.http_config.port}{ROUTE}"
    serve.delete(APP)


def test_an_engine_shorter_than_the_trained_prompts_is_refused_before_it_starts() -> None:
    from workloads.brew.serve import check_engine_fits

    with pytest.raises(ValueError, match=r"max_model_len=256 must exceed .* max_context_tokens=256"):
        check_engine_fits(256, ScorerConfig(max_model_len=256))
    check_engine_fits(255, ScorerConfig(max_model_len=256))
    check_engine_fits(4096, ScorerConfig(backend="transformers", max_model_len=256))  # no engine to size


@pytest.mark.slow
def test_brew_scorer_answers_over_http_with_the_offline_scores(
    base_url: str, lora_training: Any, world: World, templates: Templates
) -> None:
    member, candidates = 3, [10, 11, 12, 13, 14]
    r = httpx.post(
        f"{base_url}/v1/score",
        json={"member_id": member, "task": "feed_like", "candidate_ids": candidates},
        timeout=300,
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["candidate_ids"] == candidates and len(body["scores"]) == 5
    assert body["model_version"] == "test-lora"

    # The same prompts scored offline by the transformers backend from the same artifact.
    artifact = load_artifact(Path(lora_training[1]["artifact"]))
    text = EntityText(world, templates)
    task = templates.task("feed_like")
    items, actions, _ = member_history(world, member, np.iinfo(np.int64).max, task)
    history = [HistoryEvent(text.item(int(i)), int(a)) for i, a in zip(items, actions, strict=True)]
    tokenizer = load_tokenizer(artifact.adapter_dir or artifact.model_dir)
    verbalizer = Verbalizer(templates, tokenizer, artifact.max_context_tokens)
    prompts = verbalizer.verbalize(
        "feed_like", text.member(member), history, [text.item(c) for c in candidates]
    )
    assert body["history_used"] == prompts.history_used
    offline = TransformersScorer(artifact, ScorerConfig(backend="transformers")).score(prompts.token_ids)
    np.testing.assert_allclose(body["scores"], offline, atol=1e-2)


@pytest.mark.slow
def test_brew_scorer_rejects_bad_requests_with_a_named_field(base_url: str) -> None:
    cases = [
        ({"member_id": 3, "task": "nope", "candidate_ids": [1]}, 422, "task 'nope'"),
        ({"member_id": 3, "task": "follow_actor", "candidate_ids": [10**9]}, 422, "candidate_ids"),
        ({"member_id": 10**9, "task": "feed_like", "candidate_ids": [1]}, 404, "member_id"),
        ({"member_id": 3, "candidate_ids": []}, 422, "candidate_ids"),
    ]
    for payload, status, needle in cases:
        r = httpx.post(f"{base_url}/v1/score", json=payload, timeout=60)
        assert r.status_code == status and needle in r.text, (payload, r.status_code, r.text)
    health = httpx.get(f"{base_url}/healthz", timeout=30).json()
    assert health == {"status": "ok", "model_version": "test-lora", "backend": "vllm"}
