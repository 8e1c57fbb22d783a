"""What the pipeline runs, independent of where it runs: stage names, child names, artifact layout, the
workload entrypoints with their config JSON, the runtime env, the Ray Serve config, and the shape of the
evaluation stage's summary.

Every backend (KubeRay on a cluster, Ray Job Submission on a laptop) renders these same commands and the same
serve config; a backend only decides how storage URIs appear inside its pods (`resolve`).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Callable
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from operators.api.v1alpha1 import (
    GateReference,
    LlmDeployment,
    ModelKind,
    ModelSize,
    ModelSpec,
    ModelVersion,
    Phase,
    RankingModelSpec,
    ServingSpec,
    Sharding,
)

Resolve = Callable[[str], str]
"""Maps a storage URI of the spec (pvc://, s3://, /abs/path) to what the workload sees in its pod."""


class Stage(StrEnum):
    PREPROCESS = "preprocess"
    TRAIN = "train"
    EVALUATE = "evaluate"


STAGES: tuple[Stage, ...] = (Stage.PREPROCESS, Stage.TRAIN, Stage.EVALUATE)
STAGE_PHASE = {
    Stage.PREPROCESS: Phase.PREPROCESSING,
    Stage.TRAIN: Phase.TRAINING,
    Stage.EVALUATE: Phase.EVALUATING,
}

# The module each stage runs (`python -m MODULE --config-json '<json>'`). 360Brew fine-tunes with its own
# trainer, from the interaction log directly; evaluation (and its gate) is shared.
STAGE_MODULES: dict[tuple[ModelKind, Stage], str] = {
    (ModelKind.LIGR, Stage.PREPROCESS): "workloads.data.preprocess",
    (ModelKind.LIGR, Stage.TRAIN): "workloads.train",
    (ModelKind.LIGR, Stage.EVALUATE): "workloads.eval.gate",
    (ModelKind.BREW, Stage.TRAIN): "workloads.brew.train",
    (ModelKind.BREW, Stage.EVALUATE): "workloads.eval.gate",
}

SERVE_APP_NAME = "ranking"
SERVE_IMPORT_PATH = "workloads.serve.graph:build_app"
SCORER_DEPLOYMENT = "PointwiseScorer"  # the deployment whose replicas serving.replicas / autoscaling control
LLM_DEPLOYMENT = "BrewScorer"  # the vLLM deployment (serving.llm)
SERVE_PORT = 8000


# --- Names and layout ---------------------------------------------------------------------------------------


def stages(kind: ModelKind) -> tuple[Stage, ...]:
    """360Brew verbalizes histories straight from the interaction log, so it has no preprocess stage."""
    return STAGES if kind is ModelKind.LIGR else (Stage.TRAIN, Stage.EVALUATE)


def version_name(generation: int) -> str:
    return f"v{generation}"


def job_name(model_name: str, generation: int, stage: Stage) -> str:
    """Deterministic, so an operator restart finds the job it already created instead of creating another."""
    return f"{model_name}-v{generation}-{stage.value}"


def service_name(model_name: str) -> str:
    """One serving deployment per model; versions roll through it."""
    return model_name


def version_dir(artifact_root: str, model_name: str, generation: int) -> str:
    """ARTIFACT_ROOT/MODEL/vGENERATION: the version's published artifact (written once, never overwritten)."""
    return f"{artifact_root.rstrip('/')}/{model_name}/{version_name(generation)}"


def work_dir(artifact_root: str, model_name: str, generation: int) -> str:
    """ARTIFACT_ROOT/MODEL/work/vGENERATION: what stages pass along (examples, checkpoints, evaluation)."""
    return f"{artifact_root.rstrip('/')}/{model_name}/work/{version_name(generation)}"


def new_version(spec: RankingModelSpec, model_name: str, generation: int) -> ModelVersion:
    """The candidate a spec with a new pipeline fingerprint starts."""
    published = version_dir(spec.artifact_root, model_name, generation)
    return ModelVersion(
        name=version_name(generation),
        generation=generation,
        spec_hash=spec.pipeline_fingerprint(),
        kind=spec.model.kind,
        # workloads.train publishes into the version folder; workloads.brew.train into its artifact/ child
        artifact_uri=published if spec.model.kind is ModelKind.LIGR else f"{published}/artifact",
        feature_repo=spec.feature_repo.path,
        data_source=spec.data.source,
    )


# --- Stage commands -----------------------------------------------------------------------------------------

# ligr size presets: (d_model, n_layers, n_heads) of workloads.models.config.LiGRConfig (small: default).
LIGR_SIZES: dict[ModelSize, tuple[int, int, int]] = {
    ModelSize.TINY: (32, 1, 2),
    ModelSize.SMALL: (64, 2, 2),
    ModelSize.BASE: (128, 4, 4),
    ModelSize.LARGE: (256, 8, 8),
}
MAX_CANDIDATES = 64  # candidates of one session scored in one pass (LiGRConfig's default)


def ligr_model_config(model: ModelSpec) -> dict[str, Any]:
    """The `model` of workloads.train's TrainConfig: size preset, history length, set-wise attention,
    token features and candidate counters."""
    d_model, n_layers, n_heads = LIGR_SIZES[model.size]
    return {
        "kind": "ligr",
        "d_model": d_model,
        "n_layers": n_layers,
        "n_heads": n_heads,
        "max_history": model.history_length,
        "max_candidates": MAX_CANDIDATES,
        # each history event is an item and an action token, then the candidates
        "max_tokens": max(1024, 2 * model.history_length + MAX_CANDIDATES),
        "setwise": model.setwise,
        **({"use_features": [f.value for f in model.features]} if model.features else {}),
        **({"candidate_counters": [c.value for c in model.counters]} if model.counters else {}),
        # rates as log-odds: on log1p a rate's spread is a twentieth of an embedding's (docs/models.md)
        **({"counter_scale": "log_odds"} if model.counters else {}),
        **({"actor_match": True} if model.actor_match else {}),
        **({"setwise_actor_match": True} if model.setwise_actor_match else {}),
    }


def stage_config(
    spec: RankingModelSpec,
    model_name: str,
    stage: Stage,
    version: ModelVersion,
    reference: ModelVersion | None,
    resolve: Resolve,
    cpus_per_worker: int = 1,
) -> dict[str, Any]:
    """The config JSON a stage is launched with; each workload parses it with its own pydantic config
    (extra fields forbidden), so the keys here are exactly theirs. ``cpus_per_worker`` is what each
    training worker reserves (and computes with): the backend knows how large its workers are."""
    work = work_dir(spec.artifact_root, model_name, version.generation)
    world = resolve(spec.data.source)
    surfaces = [surface.value for surface in spec.data.surfaces]
    window = spec.data.window
    split = {
        key: value.isoformat()
        for key, value in (
            ("train_start", window.start),
            ("train_end", window.train_end),
            ("eval_end", window.eval_end),
        )
        if value is not None
    }  # unset boundaries keep the workloads' own default split
    sharding = "fsdp2" if spec.training.sharding is Sharding.FSDP else "ddp"
    if stage is Stage.PREPROCESS:  # workloads.data.preprocess.PreprocessConfig
        return {
            "world_dir": world,
            "out_dir": resolve(f"{work}/examples"),
            "max_history": spec.model.history_length,
            "surfaces": surfaces,
            # join the cluster the job runs on (RAY_ADDRESS); its own default starts a private one
            "ray_address": "auto",
            **split,
        }
    if stage is Stage.TRAIN and spec.model.kind is ModelKind.LIGR:  # workloads.train.config.TrainConfig
        return {
            "model": ligr_model_config(spec.model),
            "examples_dir": resolve(f"{work}/examples"),
            "world_dir": world,
            "surfaces": surfaces,
            "epochs": spec.training.epochs,
            "num_workers": spec.training.workers,
            "cpus_per_worker": cpus_per_worker,
            "use_gpu": spec.training.gpus_per_worker > 0,
            "strategy": sharding,
            "max_failures": spec.training.max_failures,
            "storage_path": resolve(f"{work}/ray"),
            "artifact_root": resolve(spec.artifact_root.rstrip("/")),
            "name": model_name,
            "version": version.generation,
        }
    if stage is Stage.TRAIN:  # workloads.brew.train.BrewTrainConfig
        return {
            "world_dir": world,
            "out_dir": resolve(version_dir(spec.artifact_root, model_name, version.generation)),
            "name": f"{model_name}-{version.name}",
            "base": {"kind": "path", "path": resolve(spec.model.base_model or "")},
            "surfaces": surfaces,  # the templates' trained tasks on these surfaces
            **({"max_context_tokens": spec.model.context_tokens} if spec.model.context_tokens else {}),
            "split": split,
            "num_workers": spec.training.workers,
            "cpus_per_worker": cpus_per_worker,
            "use_gpu": spec.training.gpus_per_worker > 0,
            "sharding": sharding,
            "max_failures": spec.training.max_failures,
        }
    gate = spec.evaluation
    compared = reference if gate.against is GateReference.SERVED else None
    config: dict[str, Any] = {
        "kind": version.kind.value,
        "artifact_dir": resolve(version.artifact_uri),
        "world_dir": world,
        "out_dir": resolve(f"{work}/eval"),
        "surfaces": surfaces,
        **split,
        "gate": {
            "metric": gate.metric.value,
            "task": gate.task,
            "min_lift": gate.min_lift,
            "reference_artifact_dir": resolve(compared.artifact_uri) if compared else None,
            "reference_name": compared.name if compared else "baseline",
        },
    }
    if version.kind is ModelKind.LIGR:
        config["examples_dir"] = resolve(f"{work}/examples")
    return config


def entrypoint(kind: ModelKind, stage: Stage, config: dict[str, Any]) -> str:
    """`python -m workloads.<stage> --config-json '<json>'`, quoted for the shell that runs it."""
    module = STAGE_MODULES[(kind, stage)]
    payload = json.dumps(config, sort_keys=True, separators=(",", ":"))
    return f"python -m {module} --config-json {shlex.quote(payload)}"


def runtime_env(model_name: str, version: ModelVersion, stage: Stage | None = None) -> dict[str, Any]:
    """Ray runtime env of every stage: the code is in the image, so only identity travels (logs, traces)."""
    env = {"RANKRAY_MODEL": model_name, "RANKRAY_MODEL_VERSION": version.name}
    if stage is not None:
        env["RANKRAY_STAGE"] = stage.value
    return {"env_vars": env}


# --- Serving ------------------------------------------------------------------------------------------------


def _replicas(serving: ServingSpec) -> dict[str, Any]:
    if serving.autoscaling is None:
        return {"num_replicas": serving.replicas or 1}
    return {
        "autoscaling_config": {
            "min_replicas": serving.autoscaling.min_replicas,
            "max_replicas": serving.autoscaling.max_replicas,
            "target_ongoing_requests": serving.autoscaling.target_ongoing_requests,
        }
    }


def scorer_deployment(version: ModelVersion, serving: ServingSpec) -> dict[str, Any]:
    """The deployment that does the scoring, and which serving.replicas / autoscaling size: LiGR's
    pointwise scorer, or for 360Brew the LLM scorer (the graph has no pointwise scorer then)."""
    if version.kind is ModelKind.LIGR:
        # max_ongoing_requests above the scorer's @serve.batch size, so batches can fill
        return {
            "name": SCORER_DEPLOYMENT,
            **_replicas(serving),
            "max_ongoing_requests": 64,
            "ray_actor_options": {"num_cpus": 1},
        }
    actor = {"num_cpus": 1, "num_gpus": serving.llm.gpus} if serving.llm.gpus else {"num_cpus": 1}
    return {
        "name": LLM_DEPLOYMENT,
        **_replicas(serving),
        "max_ongoing_requests": 16,
        "ray_actor_options": actor,
    }


def llm_scorer_config(llm: LlmDeployment) -> dict[str, Any]:
    """serving.llm as the LLM deployment's workloads.brew.score.ScorerConfig."""
    return {
        "backend": llm.backend.value,
        "dtype": llm.dtype.value,
        "device": "cuda" if llm.gpus else "cpu",
        "max_model_len": llm.max_model_len,
        "enable_prefix_caching": llm.prefix_caching,
    }


def serve_config(
    model_name: str, version: ModelVersion, serving: ServingSpec, resolve: Resolve
) -> dict[str, Any]:
    """The Ray Serve config (the shape of KubeRay's serveConfigV2 and of `serve deploy`). Its `args` are
    workloads.serve.graph.GraphArgs; the other deployments of the graph keep their own defaults."""
    brew = version.kind is ModelKind.BREW
    args: dict[str, Any] = {
        "artifact_uri": resolve(version.artifact_uri),
        "feature_repo": resolve(version.feature_repo),
        "model_name": model_name,
        "model_version": version.name,
        "model_kind": version.kind.value,
        "setwise_top_k": serving.setwise_top_k,
        "candidates_limit": serving.candidates_limit,
        "llm_enabled": brew,
    }
    if brew:  # 360Brew verbalizes members and items from the world's tables
        args["world_dir"] = resolve(version.data_source)
        args["llm_scorer"] = llm_scorer_config(serving.llm)
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [
            {
                "name": SERVE_APP_NAME,
                "route_prefix": serving.route_prefix,
                "import_path": SERVE_IMPORT_PATH,
                "runtime_env": runtime_env(model_name, version),
                "args": args,
                "deployments": [scorer_deployment(version, serving)],
            }
        ],
    }


# --- What the evaluation stage reports ----------------------------------------------------------------------


class GateVerdict(BaseModel):
    """The gate part of the evaluation summary."""

    model_config = ConfigDict(extra="ignore")

    passed: bool
    value: float | None = None
    reference: float | None = None
    reference_name: str = ""
    lift: float | None = None
    lift_ci95: list[float] | None = None


class EvaluationSummary(BaseModel):
    """The last stdout line of `python -m workloads.eval.gate` (a JSON object); the operator reads it."""

    model_config = ConfigDict(extra="ignore")

    task_auc: dict[str, float] = Field(default_factory=dict)
    auc: float | None = None
    normalized_entropy: float | None = None
    gate: GateVerdict


def last_json_line(logs: str) -> dict[str, Any] | None:
    """The stage's summary: the last line of its output that parses as a JSON object."""
    for line in reversed(logs.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None
