"""`BrewScorer`: the 360Brew LLM deployment of the ranking graph, built on vLLM's async engine.

One request is one member and their candidates for one task. The member's prompt prefix
(instruction, profile, grouped history) is verbalized once and every candidate becomes one prompt
that shares it token for token, so vLLM's prefix cache encodes the history once per member and each
further candidate costs only its question suffix. The answer is P(yes) per candidate.

The graph's ingress calls ``score`` through a `DeploymentHandle` (history from the Feast online store
in the request); the same deployment also answers ``POST /v1/score`` over HTTP, reading the history
from the world's impression log when the request carries none. Entity text (profiles, jobs, posts,
authors) comes from the world's tables, written exactly as in training.
"""

from __future__ import annotations

import asyncio
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
from fastapi import FastAPI, HTTPException
from pydantic import BaseModel, ConfigDict, Field
from ray import serve

from workloads.brew.artifact import load_artifact
from workloads.brew.data import EntityText, load_world, member_history
from workloads.brew.model import load_tokenizer
from workloads.brew.prompts import HistoryEvent, TaskTemplate, Verbalizer
from workloads.brew.score import ScorerConfig, TransformersScorer, VLLMEngine

MAX_CANDIDATES = 1000


class HistoryItem(BaseModel):
    model_config = ConfigDict(extra="forbid")

    item_id: int
    actions: int = Field(
        ge=0, lt=1 << 16, description="Action bitmask (workloads.data.schema.Action); 0: shown, not acted on"
    )


class BrewScoreRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    member_id: int
    task: str = Field("feed_like", description="a task of the artifact's templates, T1 or zero-shot T2")
    candidate_ids: list[int] = Field(
        min_length=1, max_length=MAX_CANDIDATES, description="items (actors for T2)"
    )
    history: list[HistoryItem] | None = Field(
        None, description="the task surface's impressions, oldest first; None: read from the world's log"
    )
    as_of: datetime | None = Field(
        None, description="history cut-off when read from the log; None: all of it"
    )


class BrewScoreResponse(BaseModel):
    model_version: str
    task: str
    candidate_ids: list[int]
    scores: list[float]  # P(yes), in request order
    history_used: int  # history events that fit in the prompt (most recent first)
    history_available: int
    prompt_tokens: int  # the longest candidate prompt


app = FastAPI(title="rankray 360Brew scorer")


def check_engine_fits(prompt_budget: int, config: ScorerConfig) -> None:
    """Refuse at deploy time a vLLM engine shorter than the prompts: it would fail every long request."""
    if config.backend == "vllm" and prompt_budget >= config.max_model_len:  # + the one answer token
        raise ValueError(
            f"scorer.max_model_len={config.max_model_len} must exceed the prompt budget "
            f"max_context_tokens={prompt_budget} the model was trained with"
        )


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress(app)
class BrewScorer:
    """Scores one member's candidates for one task with a 360Brew artifact.

    Args:
        artifact_dir: folder written by ``python -m workloads.brew.train``.
        world_dir: the world's tables (entity text; histories when a request has none).
        scorer: a `ScorerConfig` as a dict; backend ``vllm`` (default) or, explicitly, ``transformers``.
        max_context_tokens: prompt budget; None keeps the one the model was trained with.
    """

    async def __init__(  # type: ignore[misc]  # Ray Serve awaits an async constructor
        self,
        artifact_dir: str,
        world_dir: str,
        scorer: dict[str, Any] | None = None,
        max_context_tokens: int | None = None,
    ) -> None:
        self.artifact = load_artifact(Path(artifact_dir))
        self.templates = self.artifact.templates()
        self.world = load_world(Path(world_dir))
        self.text = EntityText(self.world, self.templates)
        tokenizer = load_tokenizer(self.artifact.adapter_dir or self.artifact.model_dir)
        budget = max_context_tokens or self.artifact.max_context_tokens
        self.verbalizer = Verbalizer(self.templates, tokenizer, budget)
        self.config = ScorerConfig.model_validate(scorer or {})
        check_engine_fits(budget, self.config)
        if self.config.backend == "vllm":
            self.engine: VLLMEngine | None = VLLMEngine(self.artifact, self.config)
            self.reference: TransformersScorer | None = None
        else:
            self.engine, self.reference = None, TransformersScorer(self.artifact, self.config)

    def __del__(self) -> None:
        """Serve calls this when the replica stops: vLLM's engine-core process must be shut down, or
        the shared memory of its message queues (400 MiB of /dev/shm here) outlives the replica."""
        engine, self.engine = getattr(self, "engine", None), None
        if engine is not None:
            engine.close()

    def _history(self, request: BrewScoreRequest, task: TaskTemplate) -> list[HistoryEvent]:
        try:
            if request.history is not None:
                return [HistoryEvent(self.text.item(h.item_id), h.actions) for h in request.history]
            at = np.iinfo(np.int64).max if request.as_of is None else int(request.as_of.timestamp() * 1e6)
            items, actions, _ = member_history(self.world, request.member_id, at, task)
        except KeyError as missing:
            raise HTTPException(422, f"history item_id {missing} is not in the world's items") from None
        return [HistoryEvent(self.text.item(int(i)), int(a)) for i, a in zip(items, actions, strict=True)]

    async def score(self, request: BrewScoreRequest) -> BrewScoreResponse:
        """P(yes) per candidate; the method the ranking graph calls through a handle."""
        if request.task not in self.templates.tasks:
            raise HTTPException(422, f"task {request.task!r} is not one of {sorted(self.templates.tasks)}")
        task = self.templates.task(request.task)
        if request.member_id not in self.world.members.index:
            raise HTTPException(404, f"member_id {request.member_id} is not in the world")
        try:
            questions = [self.text.question(task, c) for c in request.candidate_ids]
        except KeyError as missing:
            kind = "actor" if task.question_entity == "actor" else "item"
            raise HTTPException(422, f"candidate_ids: {kind} {missing} is not in the world") from None
        history = self._history(request, task)
        prompts = self.verbalizer.verbalize(
            request.task, self.text.member(request.member_id), history, questions
        )
        if self.engine is not None:
            scores = await self.engine.score(prompts.token_ids)
        else:
            assert self.reference is not None
            scores = await asyncio.to_thread(self.reference.score, prompts.token_ids)
        return BrewScoreResponse(
            model_version=self.artifact.version,
            task=request.task,
            candidate_ids=request.candidate_ids,
            scores=[float(s) for s in scores],
            history_used=prompts.history_used,
            history_available=prompts.history_available,
            prompt_tokens=max(len(ids) for ids in prompts.token_ids),
        )

    @app.post("/v1/score")
    async def score_http(self, request: BrewScoreRequest) -> BrewScoreResponse:
        return await self.score(request)

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok", "model_version": self.artifact.version, "backend": self.config.backend}
