"""The ranking graph, wired in one place: ``build_app(args) -> Application`` (Ray Serve app builder).

::

    HTTP ─► RankIngress ─► FeatureFetcher ─► PointwiseScorer ─► SetwiseReranker   (model: ligr)
                      └──► FeatureFetcher (history) ─► BrewScorer                   (model: brew)

The serve config's ``args`` are a `GraphArgs`, validated before any replica starts; KubeRay's
RayService (``serveConfigV2``) and the local deploy (``workloads.serve.config.deploy``) use the same
config, whose ``import_path`` is ``workloads.serve.graph:build_app``. A new model version is a new
``artifact_uri`` in that config: redeploying it rolls the scorer replicas, no code changes.
"""

# No `from __future__ import annotations` here: Serve reads build_app's parameter annotation as a class
# to validate the config's args into a GraphArgs, and a string annotation would hand build_app a dict.
import json
from pathlib import Path
from typing import Any, Literal, Self, cast

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    PositiveFloat,
    ValidationError,
    field_validator,
    model_validator,
)
from ray.serve import Application, Deployment

from workloads.data.schema import TASKS
from workloads.models.registry import parse_model_config
from workloads.serve.features import FeatureFetcher, model_counters
from workloads.serve.ingress import RankIngress
from workloads.serve.schemas import DEFAULT_CANDIDATES_LIMIT, Surface
from workloads.serve.scorer import PointwiseScorer
from workloads.serve.setwise import SetwiseReranker

# The ranking score is sum_t w_t * P(task t). Contributions (like/comment/share) are the rarest and most
# valuable signal on the feed, so they weigh most; a click and a long dwell weigh the same.
DEFAULT_TASK_WEIGHTS = {"click": 1.0, "contribution": 2.0, "long_dwell": 1.0}
DEFAULT_BREW_TASKS: dict[Surface, str] = {"feed": "feed_like", "jobs": "job_apply"}
BREW_MAX_HISTORY = 8192  # all the store keeps (FeatureTablesConfig.history_len is at most this)


class GraphArgs(BaseModel):
    """The ``args`` of the ranking application in a serve config (what the operator emits)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    artifact_uri: str = Field(
        description="the model artifact folder (<artifact_root>/<name>/v<N>); for model_kind brew, the "
        "360Brew artifact"
    )
    feature_repo: str = Field(
        description="the Feast repo folder (its feature_store.yaml picks the online store)"
    )
    model_name: str | None = Field(None, description="the RankingModel's name (a label)")
    model_version: str | None = Field(None, description="the version label the operator deployed, e.g. v3")
    model_kind: Literal["ligr", "brew"] = Field(
        "ligr", description="which scorer answers requests by default"
    )
    setwise_top_k: int = Field(
        10, ge=0, le=1000, description="top pointwise items re-scored set-wise; 0: off"
    )
    candidates_limit: int = Field(DEFAULT_CANDIDATES_LIMIT, ge=1, le=100_000)
    task_weights: dict[str, NonNegativeFloat] = Field(
        default_factory=lambda: dict(DEFAULT_TASK_WEIGHTS),
        description=f"ranking score = sum of weight * probability over the tasks {TASKS}",
    )
    # the 360Brew LLM deployment (workloads.brew.serve.BrewScorer)
    llm_enabled: bool = Field(False, description="deploy BrewScorer and route model: brew requests to it")
    llm_artifact_uri: str | None = Field(None, description="the 360Brew artifact when model_kind is ligr")
    world_dir: str | None = Field(None, description="the world's tables: the entity text 360Brew verbalizes")
    llm_scorer: dict[str, Any] = Field(
        default_factory=dict,
        description="the LLM deployment's workloads.brew.score.ScorerConfig: backend, dtype, device, ...",
    )
    brew_tasks: dict[Surface, str] = Field(
        default_factory=lambda: dict(DEFAULT_BREW_TASKS),
        description="the 360Brew task each surface is ranked for",
    )
    # the feature store and batching
    feature_timeout_s: PositiveFloat = Field(1.0, le=30, description="one online read's time limit")
    feature_attempts: int = Field(3, ge=1, le=10, description="online read attempts before answering 503")
    max_batch_size: int = Field(8, ge=1, le=256, description="requests per @serve.batch call")
    batch_wait_timeout_s: float = Field(0.002, ge=0, le=1, description="how long a batch waits to fill")

    @field_validator("task_weights")
    @classmethod
    def _known_tasks(cls, weights: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(weights) - set(TASKS))
        if unknown:
            raise ValueError(f"unknown task(s) {unknown}; the tasks are {TASKS}")
        if not any(w > 0 for w in weights.values()):
            raise ValueError("at least one task weight must be positive")
        return weights

    @model_validator(mode="after")
    def _llm_consistent(self) -> Self:
        if self.model_kind == "brew" and not self.llm_enabled:
            raise ValueError("model_kind brew needs llm_enabled: true (brew is served by the LLM deployment)")
        if self.llm_enabled and self.world_dir is None:
            raise ValueError(
                "llm_enabled needs world_dir (360Brew verbalizes entities from the world's tables)"
            )
        if self.llm_enabled and self.model_kind == "ligr" and self.llm_artifact_uri is None:
            raise ValueError("llm_enabled with model_kind ligr needs llm_artifact_uri (the 360Brew artifact)")
        if self.setwise_top_k > self.candidates_limit:
            raise ValueError(
                f"setwise_top_k={self.setwise_top_k} exceeds candidates_limit={self.candidates_limit}"
            )
        if self.llm_enabled:  # checked here, before any replica starts; imported only where it is used
            from workloads.brew.score import ScorerConfig

            try:
                ScorerConfig.model_validate(self.llm_scorer)
            except ValidationError as err:
                raise ValueError(f"llm_scorer: {err}") from None
        return self

    @property
    def brew_artifact_uri(self) -> str | None:
        if not self.llm_enabled:
            return None
        return self.artifact_uri if self.model_kind == "brew" else self.llm_artifact_uri


def _deployment(cls: object) -> Deployment:
    """A ``@serve.deployment`` class as what it is at runtime (mypy sees the undecorated class)."""
    return cast(Deployment, cls)


def brew_deployment() -> Deployment:
    """The 360Brew deployment, imported only when enabled (it pulls in transformers and vLLM)."""
    from workloads.brew.serve import BrewScorer

    return _deployment(BrewScorer)


def ranking_model_config(artifact_uri: str) -> Any:
    """The model config a ranking artifact was trained with (its config.json), checked before deploying."""
    path = Path(artifact_uri) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"artifact_uri: {artifact_uri} is not a model artifact (no config.json)")
    return parse_model_config(json.loads(path.read_text())["model"])


def deployment_names(args: GraphArgs) -> list[str]:
    """The deployments ``build_app(args)`` creates: what a serve config may list options for."""
    names = ["RankIngress", "FeatureFetcher"]
    if args.model_kind == "ligr":
        names.append("PointwiseScorer")
        if args.setwise_top_k > 0 and ranking_model_config(args.artifact_uri).model_dump().get("setwise"):
            names.append("SetwiseReranker")
    if args.llm_enabled:
        names.append("BrewScorer")
    return names


def build_app(args: GraphArgs) -> Application:
    """Bind the graph for ``args``; Serve hands the bound deployments to the ingress as handles."""
    names = deployment_names(args)
    scorer = setwise = brew = None
    if args.model_kind == "ligr":
        model = ranking_model_config(args.artifact_uri)
        counters = model_counters(model)  # the fetcher reads only these (DCNv2: all; LiGR: its own)
        max_history = model.max_history
        scorer = _deployment(PointwiseScorer).bind(
            args.artifact_uri,
            args.task_weights,
            args.setwise_top_k,
            args.max_batch_size,
            args.batch_wait_timeout_s,
        )
        if "SetwiseReranker" in names:
            setwise = _deployment(SetwiseReranker).bind(
                args.artifact_uri, args.max_batch_size, args.batch_wait_timeout_s
            )
    else:  # 360Brew reads as much history as the store keeps and cuts it to its prompt budget itself
        max_history, counters = BREW_MAX_HISTORY, []
    fetcher = _deployment(FeatureFetcher).bind(
        args.feature_repo,
        max_history,
        counters,
        args.feature_timeout_s,
        args.feature_attempts,
        args.max_batch_size,
        args.batch_wait_timeout_s,
    )
    if args.llm_enabled:
        brew = brew_deployment().bind(args.brew_artifact_uri, args.world_dir, args.llm_scorer)
    return _deployment(RankIngress).bind(args, fetcher, scorer, setwise, brew)
