"""The `RankingModel` API, version v1alpha1: the single source of the CRD, the operator's types and the docs.

Spec is what the user asks for; status is what the operator observed and decided. Every field carries the
description `kubectl explain` prints; bounds, enums and defaults live on the field; rules that tie several
fields together are CEL rules (`x-kubernetes-validations`) declared on the model that holds those fields,
so the API server rejects a bad manifest before the operator ever sees it.
"""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel
from pydantic.json_schema import JsonDict

GROUP = "rankray.io"
VERSION = "v1alpha1"
KIND = "RankingModel"
PLURAL = "rankingmodels"
SINGULAR = "rankingmodel"
SHORT_NAMES = ["rkm"]
API_VERSION = f"{GROUP}/{VERSION}"

# A Kubernetes resource quantity ("500m", "4", "16Gi"); KubeRay's CRDs use the same pattern.
QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
# Where artifacts and data live: a path on a PersistentVolumeClaim, an object-store URI, or an absolute path
# (inside the image, or on the local disk for `rankray run`).
STORAGE_URI_PATTERN = r"^(pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?|s3://[^/]+(/.*)?|/.*)$"

Quantity = Annotated[int | str, Field(json_schema_extra={"pattern": QUANTITY_PATTERN})]


def cel(rule: str, message: str, field_path: str | None = None) -> JsonDict:
    """One CEL rule as the CRD spells it; `field_path` (relative to the rule's object) names the bad field."""
    out: JsonDict = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


def cel_rules(*rules: JsonDict) -> ConfigDict:
    """Model config carrying CEL rules into the model's schema (`x-kubernetes-validations`)."""
    return ConfigDict(json_schema_extra={"x-kubernetes-validations": list(rules)})


class _Api(BaseModel):
    """camelCase on the wire (as every Kubernetes API), snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_name=True,
        validate_by_alias=True,
        serialize_by_alias=True,
        extra="forbid",
    )


# --- Enums --------------------------------------------------------------------------------------------------


class ModelKind(StrEnum):
    LIGR = "ligr"  # transformer ranking over interleaved item/action histories (LiGR paper)
    BREW = "brew"  # decoder-only LLM ranking from verbalized histories (360Brew paper)


class TokenFeature(StrEnum):
    """What a LiGR item token is built from (LiGR 3.2, Tables 2-3)."""

    ITEM_ID = "item_id"  # hashed, collision-based id table
    ACTOR_ID = "actor_id"
    POST_TYPE = "post_type"
    AGE_BUCKET = "age_bucket"
    CONTENT = "content"  # the projected content embedding


class Counter(StrEnum):
    """A hand-crafted counter of the Feast repo's counter views (the DCNv2 baseline reads them all)."""

    MA_IMP_7D = "ma_imp_7d"  # member x actor
    MA_ENG_7D = "ma_eng_7d"
    MA_ENG_30D = "ma_eng_30d"
    MT_IMP_7D = "mt_imp_7d"  # member x topic
    MT_ENG_7D = "mt_eng_7d"
    MT_ENG_30D = "mt_eng_30d"
    ITEM_IMP_1D = "item_imp_1d"
    ITEM_ENG_1D = "item_eng_1d"
    ITEM_CTR_7D = "item_ctr_7d"
    ACTOR_ENG_RATE_30D = "actor_eng_rate_30d"
    MEMBER_ENG_RATE_30D = "member_eng_rate_30d"


class ModelSize(StrEnum):
    TINY = "tiny"
    SMALL = "small"
    BASE = "base"
    LARGE = "large"


class Surface(StrEnum):
    FEED = "feed"
    JOBS = "jobs"


class Sharding(StrEnum):
    DDP = "ddp"
    FSDP = "fsdp"


class LlmBackend(StrEnum):
    VLLM = "vllm"  # vLLM's engine: prefix caching, LoRA; the CPU build when the replica has no GPU
    TRANSFORMERS = "transformers"  # plain PyTorch forward passes, for an image without vLLM


class LlmDtype(StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


class GateMetric(StrEnum):
    AUC = "auc"  # higher is better
    NORMALIZED_ENTROPY = "normalized_entropy"  # lower is better; lift is the relative reduction


class GateReference(StrEnum):
    BASELINE = "baseline"  # the classic ranker, fit and scored on the same data (workloads.eval.gate)
    SERVED = "served"  # the version serving now (falls back to the baseline when nothing serves yet)


class TolerationOperator(StrEnum):
    EXISTS = "Exists"
    EQUAL = "Equal"


class TaintEffect(StrEnum):
    NO_SCHEDULE = "NoSchedule"
    PREFER_NO_SCHEDULE = "PreferNoSchedule"
    NO_EXECUTE = "NoExecute"


class Phase(StrEnum):
    PENDING = "Pending"
    PREPROCESSING = "Preprocessing"
    TRAINING = "Training"
    EVALUATING = "Evaluating"
    DEPLOYING = "Deploying"
    SERVING = "Serving"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


class ConditionType(StrEnum):
    READY = "Ready"  # a version serves requests at status.endpoint
    PROGRESSING = "Progressing"  # a candidate version is going through the pipeline
    GATE_PASSED = "GatePassed"  # the latest evaluated candidate beat its reference by the required lift
    FAILED = "Failed"  # the spec was rejected or a stage of the latest candidate failed
    SUSPENDED = "Suspended"  # spec.suspend holds the pipeline


class ConditionStatus(StrEnum):
    TRUE = "True"
    FALSE = "False"
    UNKNOWN = "Unknown"


# --- Spec ---------------------------------------------------------------------------------------------------


class FeatureRepoSpec(_Api):
    """The Feast feature repo the pipeline and the serving graph read features from."""

    path: str = Field(
        min_length=1,
        description="Folder of the Feast repo (the one holding feature_store.yaml): a path inside the "
        "workload image, a pvc://CLAIM/PATH, or an absolute local path for `rankray run`.",
        json_schema_extra={"pattern": STORAGE_URI_PATTERN},
    )


class DataWindow(_Api):
    """The time split: train on [start, trainEnd), evaluate on [trainEnd, evalEnd)."""

    model_config = cel_rules(
        cel(
            "!has(self.start) || !has(self.trainEnd) || self.start < self.trainEnd",
            "data.window.start must be before data.window.trainEnd",
            ".start",
        ),
        cel(
            "!has(self.trainEnd) || !has(self.evalEnd) || self.trainEnd < self.evalEnd",
            "data.window.trainEnd must be before data.window.evalEnd",
            ".evalEnd",
        ),
    )

    start: datetime | None = Field(
        None, description="First event used for training (RFC 3339). Default: the start of the log."
    )
    train_end: datetime | None = Field(
        None,
        description="End of the training period and start of the evaluation period (RFC 3339). "
        "Default: the preprocess stage's own split.",
    )
    eval_end: datetime | None = Field(
        None, description="End of the evaluation period (RFC 3339). Default: the end of the log."
    )


class DataSpec(_Api):
    """Which interaction log the examples are built from, and over which time window."""

    source: str = Field(
        min_length=1,
        description="Folder holding the impression log and world tables "
        "(pvc://CLAIM/PATH, s3://BUCKET/PREFIX or an absolute path).",
        json_schema_extra={"pattern": STORAGE_URI_PATTERN},
    )
    window: DataWindow = Field(default_factory=DataWindow, description="The train/evaluation time split.")
    surfaces: list[Surface] = Field(
        default_factory=lambda: [Surface.FEED],
        min_length=1,
        description="Which surfaces' sessions are ranked and used as history (feed, jobs).",
    )


class ModelSpec(_Api):
    """Which ranking model to train."""

    model_config = cel_rules(
        cel(
            "self.kind != 'brew' || has(self.baseModel)",
            "model.baseModel is required when model.kind is brew (the LLM to fine-tune)",
            ".baseModel",
        ),
        cel(
            "self.kind == 'brew' || !has(self.baseModel)",
            "model.baseModel applies only to model.kind brew",
            ".baseModel",
        ),
        cel(
            "self.kind == 'ligr' || (!has(self.features) && !has(self.counters))",
            "model.features and model.counters apply only to model.kind ligr",
            ".features",
        ),
        cel(
            "!has(self.features) || self.features.all(f, self.features.exists_one(g, g == f))",
            "model.features must name each feature once",
            ".features",
        ),
        cel(
            "!has(self.counters) || self.counters.all(c, self.counters.exists_one(d, d == c))",
            "model.counters must name each counter once",
            ".counters",
        ),
        cel(
            "self.kind == 'ligr' || !has(self.actorMatch)",
            "model.actorMatch applies only to model.kind ligr",
            ".actorMatch",
        ),
        cel(
            "!has(self.actorMatch) || !self.actorMatch || !has(self.features)"
            " || self.features.exists(f, f == 'actor_id')",
            "model.actorMatch needs actor_id among model.features (it matches actor embeddings)",
            ".actorMatch",
        ),
        cel(
            "self.kind == 'brew' || !has(self.contextTokens)",
            "model.contextTokens applies only to model.kind brew (ligr reads model.historyLength events)",
            ".contextTokens",
        ),
        cel(
            "self.kind == 'ligr' || !has(self.setwiseActorMatch)",
            "model.setwiseActorMatch applies only to model.kind ligr",
            ".setwiseActorMatch",
        ),
        cel(
            "!has(self.setwiseActorMatch) || !self.setwiseActorMatch || (self.setwise"
            " && (!has(self.features) || self.features.exists(f, f == 'actor_id')))",
            "model.setwiseActorMatch needs setwise: true and actor_id among model.features",
            ".setwiseActorMatch",
        ),
    )

    kind: ModelKind = Field(
        description="ligr: transformer ranking over interleaved item/action histories; "
        "brew: a decoder-only LLM fine-tuned to rank from verbalized histories (360Brew)."
    )
    size: ModelSize = Field(
        ModelSize.SMALL, description="Width and depth preset of a ligr model (brew: set by baseModel)."
    )
    history_length: int = Field(
        256,
        ge=1,
        le=4096,
        description="ligr: how many recent member events the model reads per request (brew reads as many "
        "recent interactions as model.contextTokens holds).",
    )
    setwise: bool = Field(
        True,
        description="Train set-wise in-session attention so the top candidates are scored jointly (LiGR).",
    )
    base_model: str | None = Field(
        None,
        min_length=1,
        description="brew only: the Hugging Face checkpoint folder to fine-tune (path, pvc:// or s3:// URI).",
    )
    context_tokens: int | None = Field(
        None,
        ge=64,
        le=32768,
        description="brew only: the prompt budget in tokens; the history is cut most recent first to fit "
        "(the context-length knob of 360Brew 2.5). serving.llm.maxModelLen must exceed it. Default: 512.",
    )
    features: list[TokenFeature] | None = Field(
        None,
        min_length=1,
        max_length=len(TokenFeature),
        description="ligr only: what each item token is built from. Default: all five (item_id, actor_id, "
        "post_type, age_bucket, content). Where most candidates are new posts, an untrained item_id row is "
        "noise: leaving item_id out helps (docs/models.md, claim 1).",
    )
    counters: list[Counter] | None = Field(
        None,
        min_length=1,
        max_length=len(Counter),
        description="ligr only: counters the candidate tokens also read, the top features of the "
        "production model (LiGR 5.4); rates as log-odds against their prior, counts as log1p. Serving "
        "reads them from the online store: materialize a feature service that holds their views "
        "(ligr_v2 holds ma_eng_30d and item_ctr_7d). Default: none.",
    )
    actor_match: bool | None = Field(
        None,
        description="ligr only, beyond the paper: history attention also scores whether a past event has the "
        "candidate's actor, with a learned weight per head, so that at small data scale AUC keeps growing "
        "with historyLength (docs/models.md, claim 3). Needs actor_id among the features; training is slower "
        "(wider attention heads). Default: off, the paper's attention.",
    )
    setwise_actor_match: bool | None = Field(
        None,
        description="ligr only, beyond the paper: set-wise attention also scores whether another candidate "
        "within a few slots has the same actor, and may attend to nothing, so the top candidates learn "
        "rules like 'no two posts of one actor in a row' from the labels (docs/models.md, claim 2). Needs "
        "setwise and actor_id among the features. Default: off, the paper's set-wise attention.",
    )


class Toleration(_Api):
    """A toleration for the node pool's taints (same fields as a Pod's toleration)."""

    key: str | None = Field(
        None, description="Taint key to tolerate; empty with operator Exists matches all."
    )
    operator: TolerationOperator = Field(TolerationOperator.EQUAL, description="Exists or Equal.")
    value: str | None = Field(None, description="Taint value to match when operator is Equal.")
    effect: TaintEffect | None = Field(None, description="Taint effect to match; empty matches all effects.")


class NodePool(_Api):
    """Where pods land: the node labels to select and the taints to tolerate."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the pods require, e.g. rankray.io/pool: gpu."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, description="Taints of that node pool the pods tolerate."
    )


class WorkerResources(_Api):
    """CPU and memory of one Ray worker pod (GPUs are set separately)."""

    cpu: Quantity = Field(
        "4",
        description="CPU request and limit of one worker pod; its training worker computes on all but one.",
    )
    memory: Quantity = Field("16Gi", description="Memory request and limit of one worker pod.")


class ServingResources(_Api):
    """CPU and memory of one serving worker pod."""

    cpu: Quantity = Field("2", description="CPU request and limit of one serving pod.")
    memory: Quantity = Field("8Gi", description="Memory request and limit of one serving pod.")


class TrainingSpec(_Api):
    """How the training stage runs on Ray Train."""

    model_config = cel_rules(
        cel(
            "self.gpusPerWorker == 0 || (has(self.nodePool) && has(self.nodePool.nodeSelector) "
            "&& size(self.nodePool.nodeSelector) > 0)",
            "training.nodePool.nodeSelector must select the GPU node pool when gpusPerWorker > 0",
            ".nodePool",
        ),
    )

    workers: int = Field(2, ge=1, le=512, description="Ray Train workers (one pod each).")
    epochs: int = Field(3, ge=1, le=1000, description="Passes over the training examples (ligr).")
    gpus_per_worker: int = Field(
        0, ge=0, le=8, description="GPUs per worker (nvidia.com/gpu); 0 trains on CPU."
    )
    resources: WorkerResources = Field(
        default_factory=WorkerResources, description="CPU and memory per worker."
    )
    node_pool: NodePool = Field(
        default_factory=NodePool, description="Node pool the training workers are scheduled on."
    )
    sharding: Sharding = Field(
        Sharding.DDP, description="ddp replicates the model on every worker; fsdp shards parameters (FSDP2)."
    )
    max_failures: int = Field(
        3,
        ge=0,
        le=100,
        description="Worker failures Ray Train recovers from (resuming from the last checkpoint).",
    )
    deadline_seconds: int = Field(
        86400,
        ge=60,
        le=2592000,
        description="Wall-clock limit of each pipeline stage (the RayJob's activeDeadlineSeconds).",
    )


class EvaluationGate(_Api):
    """When a newly trained version may replace the one serving."""

    metric: GateMetric = Field(GateMetric.AUC, description="Metric compared on the evaluation period.")
    task: str | None = Field(
        None,
        min_length=1,
        description="Task the metric is read for (e.g. long_dwell); empty means the mean over all tasks.",
    )
    min_lift: float = Field(
        0.0,
        ge=-1.0,
        le=1.0,
        description="Required relative lift over the reference, e.g. 0.005 for +0.5% AUC. Negative values "
        "tolerate a bounded regression.",
    )
    against: GateReference = Field(
        GateReference.SERVED,
        description="baseline: the classic ranker fit on the same training window (LiGR: logistic "
        "regression over the hand-crafted counters; 360Brew: popularity); served: the version serving now "
        "(the baseline while nothing serves).",
    )


class Autoscaling(_Api):
    """Autoscaling bounds of the scorer replicas."""

    model_config = cel_rules(
        cel(
            "self.minReplicas <= self.maxReplicas",
            "serving.autoscaling.minReplicas must not exceed serving.autoscaling.maxReplicas",
            ".minReplicas",
        ),
    )

    min_replicas: int = Field(
        1, ge=0, le=1000, description="Fewest scorer replicas (0 allows scale to zero)."
    )
    max_replicas: int = Field(4, ge=1, le=1000, description="Most scorer replicas.")
    target_ongoing_requests: int = Field(
        8, ge=1, le=10000, description="Ongoing requests per replica the autoscaler aims for."
    )


class LlmDeployment(_Api):
    """The vLLM deployment that scores with the fine-tuned LLM: how a brew model is served."""

    enabled: bool = Field(
        False,
        description="Deploy the LLM scorer in the ranking graph: true exactly for model.kind brew. Its "
        "replicas follow serving.replicas or serving.autoscaling.",
    )
    gpus: int = Field(0, ge=0, le=8, description="GPUs per LLM replica; 0 runs vLLM's CPU build.")
    node_pool: NodePool = Field(default_factory=NodePool, description="Node pool the LLM replicas land on.")
    backend: LlmBackend = Field(
        LlmBackend.VLLM,
        description="vllm: vLLM's engine (its CPU build when gpus is 0); transformers: plain PyTorch forward "
        "passes on the replica's GPU if it has one, for images without vLLM. Never switched silently.",
    )
    dtype: LlmDtype = Field(
        LlmDtype.FLOAT32,
        description="Precision of the LLM's weights and activations. bfloat16 halves its memory and, on an "
        "H100, scores 2.5-3.5x the prompts/s of float32 (docs/benchmarks.md).",
    )
    max_model_len: int = Field(
        2048,
        ge=64,
        le=131072,
        description="Longest prompt in tokens the engine accepts (the trained context budget plus the "
        "question); it sizes vLLM's scheduler and KV cache.",
    )
    prefix_caching: bool = Field(
        True,
        description="vLLM automatic prefix caching: the candidates of one member reuse the encoded "
        "profile and history instead of encoding them once per candidate.",
    )


class ServingSpec(_Api):
    """How the Ray Serve ranking graph is deployed."""

    model_config = cel_rules(
        cel(
            "self.setwiseTopK <= self.candidatesLimit",
            "serving.setwiseTopK must not exceed serving.candidatesLimit",
            ".setwiseTopK",
        ),
        cel(
            "!(has(self.replicas) && has(self.autoscaling))",
            "set serving.replicas or serving.autoscaling, not both",
            ".autoscaling",
        ),
        cel(
            "!has(self.llm) || self.llm.gpus == 0 || size(self.llm.nodePool.nodeSelector) > 0",
            "serving.llm.nodePool.nodeSelector must select the GPU node pool when llm.gpus > 0",
            ".llm.nodePool",
        ),
    )

    replicas: int | None = Field(
        None,
        ge=1,
        le=1000,
        description="Fixed number of scorer replicas (default 1 when autoscaling is unset).",
    )
    autoscaling: Autoscaling | None = Field(None, description="Autoscale the scorer between bounds instead.")
    setwise_top_k: int = Field(
        10,
        ge=0,
        le=1000,
        description="How many top pointwise candidates are re-scored set-wise (0 disables).",
    )
    candidates_limit: int = Field(
        1000, ge=1, le=100000, description="Most candidates one ranking request may carry."
    )
    resources: ServingResources = Field(
        default_factory=ServingResources, description="CPU and memory of one serving worker pod."
    )
    llm: LlmDeployment = Field(default_factory=LlmDeployment, description="The LLM scorer deployment.")
    route_prefix: str = Field("/", pattern=r"^/", description="HTTP route prefix of the ranking application.")


class RankingModelSpec(_Api):
    """A ranking model: the data it learns from, how it is trained and gated, and how it is served."""

    model_config = cel_rules(
        cel(
            "self.serving.llm.enabled == (self.model.kind == 'brew')",
            "serving.llm.enabled must be true exactly when model.kind is brew (the LLM deployment is what "
            "serves a brew model)",
            ".serving.llm.enabled",
        ),
        cel(
            "!has(self.model.contextTokens) || self.serving.llm.maxModelLen > self.model.contextTokens",
            "serving.llm.maxModelLen must exceed model.contextTokens: the engine must accept the prompts "
            "the model was trained on",
            ".serving.llm.maxModelLen",
        ),
    )

    feature_repo: FeatureRepoSpec = Field(description="The Feast feature repo.")
    data: DataSpec = Field(description="The interaction log and the time window to learn from.")
    model: ModelSpec = Field(description="The model to train.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training resources and policy.")
    evaluation: EvaluationGate = Field(
        default_factory=EvaluationGate, description="The gate a new version must pass before it serves."
    )
    serving: ServingSpec = Field(default_factory=ServingSpec, description="The serving deployment.")
    artifact_root: str = Field(
        description="Where versions are stored, as ARTIFACT_ROOT/MODEL-NAME/vGENERATION/: pvc://CLAIM/PATH, "
        "s3://BUCKET/PREFIX or an absolute path.",
        json_schema_extra={"pattern": STORAGE_URI_PATTERN},
    )
    image: str | None = Field(
        None,
        min_length=1,
        description="Workload image for the Ray pods. Default: the operator's image setting.",
    )
    suspend: bool = Field(
        False,
        description="Hold the pipeline: running stage RayJobs are suspended and no new stage starts. "
        "The version serving keeps serving.",
    )

    def pipeline_fingerprint(self) -> str:
        """Digest of what a version is trained from; serving, image and suspend changes do not retrain."""
        # fields added after the API's first release count only when set: an operator upgrade that
        # adds a field must not retrain every model
        unset_new = {
            name
            for name in ("features", "counters", "actor_match", "setwise_actor_match", "context_tokens")
            if getattr(self.model, name) is None
        }
        trained = self.model_dump(
            mode="json",
            include={"feature_repo", "data", "model", "training", "evaluation", "artifact_root"},
            exclude={"model": unset_new},
        )
        return hashlib.sha256(json.dumps(trained, sort_keys=True).encode()).hexdigest()[:16]


# --- Status -------------------------------------------------------------------------------------------------


class _Status(_Api):
    """Status is written by the operator; tolerate fields a newer operator may have added."""

    model_config = ConfigDict(extra="ignore")


class Condition(_Status):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: ConditionType = Field(description="Ready, Progressing, GatePassed, Failed or Suspended.")
    status: ConditionStatus = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1, pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", description="CamelCase reason."
    )
    message: str = Field("", description="Human-readable detail, naming the field or child at fault.")
    last_transition_time: datetime = Field(description="When the status last changed.")
    observed_generation: int | None = Field(
        None, description="metadata.generation this condition was set for."
    )


class VersionMetrics(_Status):
    """What the evaluation stage measured on the evaluation period."""

    auc: float | None = Field(None, description="The gate's AUC (the gate task's, or the mean over tasks).")
    normalized_entropy: float | None = Field(
        None, description="The gate's normalized entropy, when reported."
    )
    task_auc: dict[str, float] = Field(default_factory=dict, description="AUC per task.")


class GateResult(_Status):
    """The evaluation gate's verdict on a candidate version."""

    passed: bool = Field(description="Whether the candidate may serve.")
    metric: str = Field(description="The metric compared.")
    value: float | None = Field(None, description="The candidate's value.")
    reference: float | None = Field(None, description="The reference's value.")
    reference_name: str = Field("", description="What the candidate was compared with (baseline or vN).")
    lift: float | None = Field(None, description="Relative lift of the candidate over the reference.")
    lift_interval: list[float] | None = Field(
        None,
        min_length=2,
        max_length=2,
        description="95% interval of the lift [low, high] (evaluation sessions resampled, both models on "
        "each resample), when the gate compares one task's AUC; a lift whose interval holds 0 is noise.",
    )
    required_lift: float = Field(0.0, description="spec.evaluation.minLift at the time of the evaluation.")


class ModelVersion(_Status):
    """One trained version of the model."""

    name: str = Field(description="vGENERATION, e.g. v3.")
    generation: int = Field(description="metadata.generation whose spec this version was trained from.")
    spec_hash: str = Field(description="Digest of the spec fields this version was trained from.")
    kind: ModelKind = Field(description="The model kind this version is (ligr or brew).")
    artifact_uri: str = Field(description="Folder of the trained model artifact (what serving loads).")
    feature_repo: str = Field(description="The feature repo this version was trained and is served with.")
    data_source: str = Field(description="The interaction log this version was trained on.")
    metrics: VersionMetrics | None = Field(None, description="Evaluation metrics, once evaluated.")
    gate: GateResult | None = Field(None, description="The evaluation gate's verdict, once evaluated.")


class ChildNames(_Status):
    """Names of the child objects of the candidate version and the serving deployment."""

    preprocess_job: str | None = Field(None, description="RayJob of the preprocess stage.")
    train_job: str | None = Field(None, description="RayJob of the train stage.")
    evaluate_job: str | None = Field(None, description="RayJob of the evaluate stage.")
    service: str | None = Field(None, description="RayService serving the current version.")


class RankingModelStatus(_Status):
    """What the operator observed and decided."""

    phase: Phase = Field(Phase.PENDING, description="Where the model is in its lifecycle.")
    conditions: list[Condition] = Field(
        default_factory=list, description="Ready, Progressing, GatePassed, Failed and Suspended."
    )
    observed_generation: int | None = Field(None, description="The metadata.generation last reconciled.")
    current_version: ModelVersion | None = Field(None, description="The version serving now.")
    candidate_version: ModelVersion | None = Field(
        None, description="The version going through the pipeline, or the last one the gate rejected."
    )
    children: ChildNames = Field(default_factory=ChildNames, description="Names of the child objects.")
    endpoint: str | None = Field(None, description="URL of the ranking service, once a version serves.")

    def condition(self, kind: ConditionType) -> Condition | None:
        return next((c for c in self.conditions if c.type == kind), None)


# --- The resource -------------------------------------------------------------------------------------------


class ObjectMeta(BaseModel):
    """The slice of metadata the operator reads; the rest is carried but unused."""

    model_config = ConfigDict(
        extra="allow", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    name: str
    namespace: str = "default"
    uid: str = ""
    generation: int = 1
    deletion_timestamp: str | None = Field(None, alias="deletionTimestamp")


class RankingModel(BaseModel):
    """A RankingModel as the operator handles it: metadata, a valid spec, and the status so far."""

    model_config = ConfigDict(
        extra="allow", validate_by_name=True, validate_by_alias=True, serialize_by_alias=True
    )

    api_version: str = Field(API_VERSION, alias="apiVersion")
    kind: str = KIND
    metadata: ObjectMeta
    spec: RankingModelSpec
    status: RankingModelStatus = Field(default_factory=RankingModelStatus)


class RejectedModel(BaseModel):
    """A RankingModel whose spec the operator refuses: what is wrong, field by field."""

    metadata: ObjectMeta
    status: RankingModelStatus = Field(default_factory=RankingModelStatus)
    problems: list[str] = Field(description="'field.path: what is wrong' for every problem found.")


# Printer columns of `kubectl get rankingmodels`.
PRINTER_COLUMNS: list[dict[str, Any]] = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase", "description": "Lifecycle phase."},
    {
        "name": "Model version",
        "type": "string",
        "jsonPath": ".status.currentVersion.name",
        "description": "The version serving now.",
    },
    {
        "name": "AUC",
        "type": "number",
        "jsonPath": ".status.currentVersion.metrics.auc",
        "description": "The serving version's gate AUC on its evaluation period.",
    },
    {
        "name": "Endpoint",
        "type": "string",
        "jsonPath": ".status.endpoint",
        "description": "Ranking service URL.",
    },
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]
