"""The HTTP contract of the ranking service: request, response and error bodies.

These pydantic models are the OpenAPI schema FastAPI publishes at ``/openapi.json``, so every
constraint a client can break is declared here (types, bounds, lengths, uniqueness) and a broken one
is a 422 naming the field. Limits that come from the deployment (the candidate limit) are checked by
the ingress with the same error body. Ids are strict int64 (a Feast entity key), so a string, a float
or an out-of-range number is a client error and never reaches the feature store.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationInfo, field_validator

from workloads.data.schema import CONTENT_DIM, SURFACES, PostType

INT64_MAX = 2**63 - 1
DEFAULT_CANDIDATES_LIMIT = 1000

EntityId = Annotated[int, Field(strict=True, ge=0, le=INT64_MAX)]
Surface = Literal["feed", "jobs"]
ModelName = Literal["ligr", "brew"]
assert sorted(SURFACES) == sorted(Surface.__args__)  # type: ignore[attr-defined]  # one list of surfaces


class InlineItem(BaseModel):
    """Features of an item the feature store has not seen yet (a post created a second ago)."""

    model_config = ConfigDict(extra="forbid")

    item_id: EntityId
    actor_id: EntityId = Field(description="the post's author or the job's hiring company")
    post_type: Annotated[int, Field(strict=True, ge=0, le=max(PostType))] = Field(
        description=f"PostType: {', '.join(f'{p.value} {p.name.lower()}' for p in PostType)}"
    )
    topic: Annotated[int, Field(strict=True, ge=0, le=2**31 - 1)] = Field(0, description="post topic id")
    created_at: AwareDatetime = Field(description="when the item was created (its age is a model input)")
    content_emb: list[Annotated[float, Field(allow_inf_nan=False)]] = Field(
        min_length=CONTENT_DIM,
        max_length=CONTENT_DIM,
        description=f"the item's content embedding ({CONTENT_DIM} floats)",
    )


class RankRequest(BaseModel):
    """Rank one member's candidates for one surface."""

    model_config = ConfigDict(extra="forbid")

    member_id: EntityId = Field(description="an unknown member is ranked cold: empty history")
    surface: Surface
    candidates: list[EntityId] = Field(
        min_length=1,
        description=f"distinct item ids; at most the deployment's limit (default {DEFAULT_CANDIDATES_LIMIT})",
    )
    item_features: list[InlineItem] = Field(
        default_factory=list,
        description="features of candidates the feature store has not seen; the store wins for known items",
    )
    k: Annotated[int, Field(strict=True, ge=1)] | None = Field(
        None, description="return the top k items (default: all candidates)"
    )
    model: ModelName | None = Field(None, description="which scorer ranks (default: the deployment's model)")
    setwise: bool = Field(True, description="re-score the pointwise top items jointly (LiGR split scoring)")
    as_of: AwareDatetime | None = Field(
        None,
        description="the time items' ages are measured at (default: now); for replaying a logged session",
    )

    @field_validator("candidates")
    @classmethod
    def _distinct(cls, candidates: list[int]) -> list[int]:
        first: dict[int, int] = {}
        for index, item in enumerate(candidates):
            if item in first:
                raise ValueError(f"[{index}]: item {item} appears twice (first at [{first[item]}])")
            first[item] = index
        return candidates

    @field_validator("item_features")
    @classmethod
    def _inline_items_are_candidates(cls, items: list[InlineItem], info: ValidationInfo) -> list[InlineItem]:
        candidates = set(info.data.get("candidates") or [])  # empty when candidates itself was invalid
        seen: set[int] = set()
        for index, item in enumerate(items):
            if candidates and item.item_id not in candidates:
                raise ValueError(f"[{index}].item_id: item {item.item_id} is not a candidate")
            if item.item_id in seen:
                raise ValueError(f"[{index}].item_id: item {item.item_id} is given twice")
            seen.add(item.item_id)
        return items


class RankedItem(BaseModel):
    item_id: int
    rank: int = Field(description="1-based position in the ranking")
    score: float = Field(description="the ranking score: task weights times final probabilities, summed")
    pointwise_score: float = Field(description="the same score from the pointwise probabilities alone")
    probabilities: dict[str, float] = Field(description="final per-task probabilities")
    setwise: bool = Field(description="whether set-wise scoring re-scored this item")


class Timings(BaseModel):
    """Server-side milliseconds; the set-wise figure is its incremental cost (LiGR section 4.0.2)."""

    features_ms: float
    pointwise_ms: float
    setwise_ms: float
    total_ms: float


class RankResponse(BaseModel):
    request_id: str
    member_id: int
    surface: Surface
    model: ModelName
    model_version: str
    cold_start: bool = Field(description="the member has no history in the store (unknown or new)")
    member_known: bool = Field(description="the member has a profile in the store")
    history_len: int = Field(description="history events the model read")
    setwise_applied: bool
    items: list[RankedItem]
    timings: Timings


class FieldProblem(BaseModel):
    field: str = Field(
        description="dotted path into the request body, e.g. candidates or item_features[0].topic"
    )
    problem: str


class ErrorBody(BaseModel):
    """Every 4xx and 503 answer: what went wrong and, for client mistakes, which field."""

    error: str = Field(description="invalid_request | unknown_items | model_not_deployed | unavailable | ...")
    message: str
    fields: list[FieldProblem] = Field(default_factory=list)
    request_id: str


class ModelInfo(BaseModel):
    model: ModelName
    name: str
    architecture: str = Field(description="ligr | hstu | dcnv2 for a ranking artifact, brew for the LLM")
    version: str
    artifact_uri: str
    deployed_as: str | None = Field(None, description="the version label the serve config gave, if any")
    data_window: dict[str, object]
    metrics: dict[str, object]
    setwise_top_k: int = Field(description="how many top items set-wise scoring re-scores (0: none)")
    task_weights: dict[str, float]
    default: bool = Field(description="requests without a model field go here")


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class Health(BaseModel):
    status: Literal["ok"]
