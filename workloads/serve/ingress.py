"""The HTTP ingress of the ranking graph: FastAPI routes on a Ray Serve deployment.

``POST /v1/rank`` validates the request (pydantic, then the deployment's candidate limit), sends the
features read straight into the pointwise scorer without waiting on them here, re-scores the pointwise
top k set-wise, and combines the two (``workloads.serve.ranking``). Requests for ``model: brew`` go to
the 360Brew LLM deployment when the graph has one.

Every answer other than a ranking is an ``ErrorBody``: client mistakes are 4xx naming the field (pydantic's
errors are rewritten into that shape), a feature store outage is 503 with the reason. A 500 means a
bug in the service, never a bad request.
"""

from __future__ import annotations

import re
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from opentelemetry import metrics, trace
from opentelemetry.trace import Span, Status, StatusCode
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from workloads import telemetry
from workloads.data.schema import TASKS
from workloads.serve.errors import ServeError, client_error
from workloads.serve.features import FetchRequest
from workloads.serve.ranking import Ranking, ranking_score, sigmoid, split_rerank, task_weight_vector
from workloads.serve.schemas import (
    ErrorBody,
    FieldProblem,
    Health,
    ModelInfo,
    ModelName,
    ModelsResponse,
    RankedItem,
    RankRequest,
    RankResponse,
    Timings,
)

if TYPE_CHECKING:
    from workloads.serve.graph import GraphArgs
    from workloads.serve.scorer import PointwiseScores
    from workloads.serve.setwise import SetwiseCorrection

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "the body could not be read as text (e.g. not UTF-8)"},
    404: {"model": ErrorBody, "description": "model brew only: the LLM scorer does not know the member"},
    422: {"model": ErrorBody, "description": "a field of the request is invalid; `fields` names it"},
    503: {"model": ErrorBody, "description": "the feature store failed or timed out (after bounded retries)"},
}

tracer = trace.get_tracer(__name__)
_meter = metrics.get_meter(__name__)
rank_latency = _meter.create_histogram(
    "rankray.rank.duration", unit="ms", description="Ranking requests: total and per stage, by model"
)
rank_requests = _meter.create_counter(
    "rankray.rank.requests", description="Ranking requests by model and HTTP status"
)

app = FastAPI(
    title="rankray ranking service",
    version="1",
    description="LiGR pointwise scoring with set-wise re-scoring of the top items, over Feast features.",
)


def new_request_id() -> str:
    return uuid.uuid4().hex


def error_response(err: ServeError, request_id: str) -> JSONResponse:
    body = ErrorBody(
        error=err.error,
        message=err.message,
        fields=[FieldProblem(field=f, problem=p) for f, p in err.fields],
        request_id=request_id,
    )
    return JSONResponse(body.model_dump(), status_code=err.status, headers={"x-request-id": request_id})


# A validator message that starts with a sub-path ("[3]: ..." or "[0].item_id: ...") names a deeper field.
_SUB_PATH = re.compile(r"^(?:Value error, )?((?:\[\d+\])(?:\.\w+)*): (.*)$", re.DOTALL)


def field_problems(errors: list[Any]) -> list[tuple[str, str]]:
    """pydantic/FastAPI error dicts as (field path, problem): ("item_features[0].topic", "...")."""
    problems = []
    for error in errors:
        loc = [part for part in error.get("loc", ()) if part != "body"]
        message = str(error.get("msg", "invalid"))
        if error.get("type") == "json_invalid":
            detail = (error.get("ctx") or {}).get("error", "")
            problems.append(("body", f"not valid JSON at character {loc[0] if loc else 0}: {detail}"))
            continue
        path = ""
        for part in loc:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        sub = _SUB_PATH.match(message)
        if sub:
            path, message = path + sub.group(1), sub.group(2)
        problems.append((path or "body", message.removeprefix("Value error, ")))
    return problems


@app.exception_handler(RequestValidationError)
async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = field_problems(list(exc.errors()))
    message = "; ".join(f"{field}: {problem}" for field, problem in problems)
    return error_response(ServeError(422, "invalid_request", message, problems), new_request_id())


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    """404, 405 and the like, in the same body as every other error."""
    error = ServeError(exc.status_code, "http_error", str(exc.detail))
    return error_response(error, new_request_id())


def _epoch_us(moment: datetime) -> int:
    return (moment - EPOCH) // timedelta(microseconds=1)


def brew_model_info(artifact_uri: str) -> dict[str, Any]:
    """What ``GET /v1/models`` says about the 360Brew artifact (its manifest; no model is loaded here)."""
    from workloads.brew.artifact import load_artifact

    artifact = load_artifact(Path(artifact_uri))
    return {
        "model": "brew",
        "name": "360brew",
        "architecture": "brew",
        "version": artifact.version,
        "artifact_uri": artifact_uri,
        "data_window": dict(artifact.data_window),
        "metrics": {k: v for k, v in artifact.metrics.items() if not isinstance(v, list | dict)},
        "setwise_top_k": 0,
        "task_weights": {},
    }


def ranked_items(
    ranking: Ranking, pointwise_logits: np.ndarray, candidates: list[int], weights: np.ndarray, k: int
) -> list[RankedItem]:
    """The first ``k`` of the ranking, with final and pointwise scores and final probabilities."""
    final_p = sigmoid(ranking.final_logits)
    final_score = final_p @ weights
    pointwise_score = ranking_score(pointwise_logits, weights)
    return [
        RankedItem(
            item_id=candidates[i],
            rank=rank,
            score=float(final_score[i]),
            pointwise_score=float(pointwise_score[i]),
            probabilities={task: float(final_p[i, t]) for t, task in enumerate(TASKS)},
            setwise=bool(ranking.setwise[i]),
        )
        for rank, i in enumerate(ranking.order[:k].tolist(), start=1)
    ]


def observe_answer(span: Span, answer: RankResponse) -> None:
    """Put a served ranking on its span and into the latency histogram (one point per stage)."""
    model = {"model": answer.model}
    span.set_attributes(
        {
            "rankray.model": answer.model,
            "rankray.model_version": answer.model_version,
            "rankray.history_len": answer.history_len,
            "rankray.setwise_applied": answer.setwise_applied,
            "http.response.status_code": 200,
        }
    )
    for stage, ms in answer.timings.model_dump().items():
        rank_latency.record(ms, {**model, "stage": stage.removesuffix("_ms")})
    rank_requests.add(1, {**model, "status": 200})


def observe_error(span: Span, err: ServeError, model: str) -> None:
    """A refused request: 4xx is the client's (span status unset, per OTel's HTTP conventions), 5xx ours."""
    span.set_attributes({"http.response.status_code": err.status, "rankray.error": err.error})
    if err.status >= 500:
        span.set_status(Status(StatusCode.ERROR, err.message))
    rank_requests.add(1, {"model": model, "status": err.status})


@serve.deployment(max_ongoing_requests=256, ray_actor_options={"num_cpus": 0.25})
@serve.ingress(app)
class RankIngress:
    """Routes and composition; the deployments it is bound to do the reading and the scoring.

    ``scorer`` and ``setwise`` are None when the graph serves only 360Brew (or set-wise scoring is
    off); ``brew`` is None unless the LLM deployment is enabled.
    """

    def __init__(
        self,
        args: GraphArgs,
        fetcher: DeploymentHandle,
        scorer: DeploymentHandle | None,
        setwise: DeploymentHandle | None,
        brew: DeploymentHandle | None,
    ) -> None:
        self.args = args
        self.default_model: ModelName = args.model_kind
        self.weights = task_weight_vector(args.task_weights)
        self.fetcher, self.scorer, self.setwise, self.brew = fetcher, scorer, setwise, brew
        self._models: list[ModelInfo] | None = None
        telemetry.configure("rankray-serve")  # exports only where OTEL_EXPORTER_OTLP_ENDPOINT is set

    async def _model_infos(self) -> list[ModelInfo]:
        if self._models is None:
            infos = []
            if self.scorer is not None:
                infos.append(await self.scorer.describe.remote())
            if self.brew is not None and self.args.brew_artifact_uri is not None:
                infos.append(brew_model_info(self.args.brew_artifact_uri))
            self._models = [
                ModelInfo(
                    **info, deployed_as=self.args.model_version, default=info["model"] == self.default_model
                )
                for info in infos
            ]
        return self._models

    @app.get("/healthz", response_model=Health)
    async def healthz(self) -> Health:
        return Health(status="ok")

    @app.get("/v1/models", response_model=ModelsResponse)
    async def models(self) -> ModelsResponse:
        return ModelsResponse(models=await self._model_infos())

    @app.post("/v1/rank", response_model=RankResponse, responses=ERRORS)
    async def rank(self, body: RankRequest) -> RankResponse | JSONResponse:
        request_id = new_request_id()
        model = body.model or self.default_model
        attributes: dict[str, str | int] = {
            "rankray.request_id": request_id,
            "rankray.candidates": len(body.candidates),
        }
        with tracer.start_as_current_span("rank", attributes=attributes) as span:
            try:
                answer = await self._rank(body, request_id)
            except ServeError as err:  # raised here or re-raised from a deployment the request went through
                observe_error(span, err, model)
                return error_response(err, request_id)
            observe_answer(span, answer)
            return answer

    async def _rank(self, body: RankRequest, request_id: str) -> RankResponse:
        began = time.perf_counter()
        limit = self.args.candidates_limit
        if len(body.candidates) > limit:
            raise client_error(
                "invalid_request",
                "candidates",
                f"{len(body.candidates)} items; this deployment ranks at most {limit}",
            )
        model = body.model or self.default_model
        if model == "brew":
            return await self._rank_brew(body, request_id, began)
        if self.scorer is None:
            raise client_error("model_not_deployed", "model", "'ligr' is not deployed here (serving brew)")
        as_of = body.as_of or datetime.now(UTC)
        fetch = FetchRequest(
            member_id=body.member_id,
            candidates=np.asarray(body.candidates, dtype=np.int64),
            inline_items=body.item_features,
            as_of_us=_epoch_us(as_of),
        )
        # chained, not awaited: the features go from the fetcher to the scorer without passing through here
        features = self.fetcher.fetch.remote(fetch)
        pointwise: PointwiseScores | ServeError = await self.scorer.score.remote(features)
        if isinstance(pointwise, ServeError):
            raise pointwise
        pointwise_done = time.perf_counter()
        correction: SetwiseCorrection | None = None
        if body.setwise and self.setwise is not None and len(pointwise.top_idx):
            correction = await self.setwise.rerank.remote(pointwise)
        setwise_done = time.perf_counter()
        ranking = split_rerank(
            pointwise.logits,
            pointwise.order,
            self.weights,
            pointwise.top_idx if correction is not None else None,
            correction.logits if correction is not None else None,
        )
        k = min(body.k or len(body.candidates), len(body.candidates))
        return RankResponse(
            request_id=request_id,
            member_id=body.member_id,
            surface=body.surface,
            model="ligr",
            model_version=pointwise.model_version,
            cold_start=pointwise.history_len == 0,
            member_known=pointwise.member_known,
            history_len=pointwise.history_len,
            setwise_applied=correction is not None,
            items=ranked_items(ranking, pointwise.logits, body.candidates, self.weights, k),
            timings=Timings(
                features_ms=pointwise.features_ms,
                pointwise_ms=pointwise.pointwise_ms,
                setwise_ms=(setwise_done - pointwise_done) * 1e3,
                total_ms=(setwise_done - began) * 1e3,
            ),
        )

    async def _rank_brew(self, body: RankRequest, request_id: str, began: float) -> RankResponse:
        """360Brew: P(yes) of the surface's task per candidate, from the member's Feast history."""
        if self.brew is None:
            raise client_error(
                "model_not_deployed", "model", "'brew' is not deployed here (llm_enabled is false)"
            )
        from workloads.brew.serve import BrewScoreRequest, HistoryItem  # transformers: only when brew is on

        empty = np.zeros(0, dtype=np.int64)
        now = _epoch_us(datetime.now(UTC))
        features = await self.fetcher.fetch.remote(FetchRequest(body.member_id, empty, [], now))
        if isinstance(features, ServeError):
            raise features
        fetched = time.perf_counter()
        events = zip(features.history["hist_item_id"], features.history["hist_actions"], strict=True)
        history = [HistoryItem(item_id=int(item), actions=int(actions)) for item, actions in events]
        task = self.args.brew_tasks[body.surface]
        request = BrewScoreRequest(
            member_id=body.member_id, task=task, candidate_ids=body.candidates, history=history
        )
        try:
            scored = await self.brew.score.remote(request)
        except HTTPException as err:  # BrewScorer's own 4xx: an item or member the world does not know
            error = "not_found" if err.status_code == 404 else "invalid_request"
            raise ServeError(err.status_code, error, str(err.detail)) from None
        scores = np.asarray(scored.scores, dtype=np.float64)
        order = np.argsort(-scores, kind="stable")
        k = min(body.k or len(body.candidates), len(body.candidates))
        done = time.perf_counter()
        return RankResponse(
            request_id=request_id,
            member_id=body.member_id,
            surface=body.surface,
            model="brew",
            model_version=scored.model_version,
            cold_start=features.history_len == 0,
            member_known=features.member_known,
            history_len=scored.history_used,
            setwise_applied=False,
            items=[
                RankedItem(
                    item_id=body.candidates[i],
                    rank=rank,
                    score=float(scores[i]),
                    pointwise_score=float(scores[i]),
                    probabilities={task: float(scores[i])},
                    setwise=False,
                )
                for rank, i in enumerate(order[:k].tolist(), start=1)
            ],
            timings=Timings(
                features_ms=(fetched - began) * 1e3,
                pointwise_ms=(done - fetched) * 1e3,
                setwise_ms=0.0,
                total_ms=(done - began) * 1e3,
            ),
        )
