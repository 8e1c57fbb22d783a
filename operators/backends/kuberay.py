"""The KubeRay backend: a RayJob per pipeline stage and one RayService per model.

The top half is pure: builders turn (RankingModel, StageJob | ServingApp) into RayJob / RayService dicts, and
readers turn those objects back into `ObservedJob` / `ObservedService`. The bottom half is the thin I/O: the
`kubernetes` client's CustomObjectsApi (run in threads: the client is synchronous) and one HTTP call to a
finished evaluate job's Ray dashboard for its summary line.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import yaml
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from kubernetes.client.exceptions import ApiException
from kubernetes.utils.quantity import parse_quantity
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from operators.api.v1alpha1 import (
    API_VERSION,
    GROUP,
    KIND,
    PLURAL,
    VERSION,
    ModelKind,
    NodePool,
    RankingModel,
    RankingModelSpec,
    RejectedModel,
)
from operators.pipeline import (
    SERVE_APP_NAME,
    SERVE_PORT,
    Stage,
    entrypoint,
    job_name,
    last_json_line,
    runtime_env,
    serve_config,
    stage_config,
)
from operators.reconcile import (
    JobState,
    Observed,
    ObservedJob,
    ObservedService,
    Plan,
    ServingApp,
    StageJob,
)

RAY_GROUP, RAY_VERSION = "ray.io", "v1"
MODEL_LABEL = "rankray.io/model"
VERSION_LABEL = "rankray.io/version"
STAGE_LABEL = "rankray.io/stage"
DIGEST_ANNOTATION = "rankray.io/serving-digest"
PVC_MOUNT_ROOT = "/mnt/pvc"


class PodEnvVar(BaseModel):
    """A container environment variable as Kubernetes spells it: a value, or valueFrom a Secret/ConfigMap."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(min_length=1)
    value: str | None = None
    value_from: dict[str, Any] | None = Field(None, alias="valueFrom")

    @model_validator(mode="after")
    def _one_source(self) -> PodEnvVar:
        if (self.value is None) == (self.value_from is None):
            raise ValueError(f"{self.name}: give exactly one of value and valueFrom")
        return self

    def manifest(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, exclude_none=True)


class KubeRaySettings(BaseModel):
    """Operator-wide settings of the KubeRay backend (the chart's ConfigMap sets them as RANKRAY_* vars)."""

    image: str = Field(
        "ghcr.io/rankray/rankray:0.1.0", description="Workload image when spec.image is unset."
    )
    ray_version: str = Field("2.60.0", description="Ray version in the image (KubeRay's rayVersion).")
    ttl_seconds_after_finished: int = Field(
        600, ge=0, description="How long a finished stage's Ray cluster lives, so its summary can be read."
    )
    backoff_limit: int = Field(
        1, ge=0, description="KubeRay retries of a failed stage RayJob (a new cluster each)."
    )
    service_account: str | None = Field(None, description="Service account of the Ray pods.")
    head_cpu: str = Field("2", description="CPU of each Ray head pod.")
    head_memory: str = Field("8Gi", description="Memory of each Ray head pod.")
    dashboard_timeout_seconds: float = Field(10.0, gt=0, description="Timeout reading a job's logs.")
    pod_env: list[PodEnvVar] = Field(
        default_factory=list,
        description="Environment of every Ray container (RANKRAY_POD_ENV: a JSON list of Kubernetes "
        "EnvVars), e.g. OTEL_EXPORTER_OTLP_ENDPOINT for traces, RANKRAY_REDIS with a Secret's password.",
    )

    @field_validator("pod_env", mode="before")
    @classmethod
    def _json_list(cls, value: Any) -> Any:
        """The ConfigMap can only hold strings, so the list arrives as JSON text."""
        if not isinstance(value, str):
            return value
        try:
            return json.loads(value) if value.strip() else []
        except json.JSONDecodeError as err:
            raise ValueError(f"not a JSON list of environment variables: {err}") from err

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KubeRaySettings:
        environ = os.environ if environ is None else environ
        values = {
            name: environ[f"RANKRAY_{name.upper()}"]
            for name in cls.model_fields
            if f"RANKRAY_{name.upper()}" in environ
        }
        return cls.model_validate(values)


# --- Storage: how spec URIs appear inside Ray pods ----------------------------------------------------------


def resolve_storage(uri: str) -> str:
    """pvc://CLAIM/PATH is mounted at /mnt/pvc/CLAIM, so it reads /mnt/pvc/CLAIM/PATH; others pass as is."""
    if uri.startswith("pvc://"):
        return f"{PVC_MOUNT_ROOT}/{uri.removeprefix('pvc://').strip('/')}"
    return uri


def _claims(uris: Iterable[str | None]) -> list[str]:
    return sorted(
        {uri.removeprefix("pvc://").split("/", 1)[0] for uri in uris if uri and uri.startswith("pvc://")}
    )


def _volume_name(claim: str) -> str:
    name = f"pvc-{claim}"
    return name if len(name) <= 63 else f"pvc-{hashlib.sha256(claim.encode()).hexdigest()[:12]}"


def _volumes(claims: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    volumes = [{"name": _volume_name(c), "persistentVolumeClaim": {"claimName": c}} for c in claims]
    mounts = [{"name": _volume_name(c), "mountPath": f"{PVC_MOUNT_ROOT}/{c}"} for c in claims]
    return volumes, mounts


# --- Builders -----------------------------------------------------------------------------------------------


def owner_reference(model: RankingModel) -> dict[str, Any]:
    """Makes Kubernetes garbage-collect the child with its RankingModel."""
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": model.metadata.name,
        "uid": model.metadata.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _metadata(
    model: RankingModel, name: str, labels: dict[str, str], annotations: dict[str, str]
) -> dict[str, Any]:
    meta: dict[str, Any] = {
        "name": name,
        "namespace": model.metadata.namespace,
        "labels": {
            "app.kubernetes.io/name": "rankray",
            "app.kubernetes.io/managed-by": "rankray-operator",
            MODEL_LABEL: model.metadata.name,
            **labels,
        },
        "ownerReferences": [owner_reference(model)],
    }
    if annotations:
        meta["annotations"] = annotations
    return meta


def _container(
    name: str,
    image: str,
    cpu: int | str,
    memory: int | str,
    gpus: int,
    mounts: list[dict[str, Any]],
    ports: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    resources: dict[str, dict[str, Any]] = {
        "requests": {"cpu": str(cpu), "memory": str(memory)},
        "limits": {"cpu": str(cpu), "memory": str(memory)},
    }
    if gpus:
        resources["limits"]["nvidia.com/gpu"] = gpus
    container: dict[str, Any] = {"name": name, "image": image, "resources": resources}
    if mounts:
        container["volumeMounts"] = mounts
    if ports:
        container["ports"] = ports
    return container


# Ray's object store and vLLM's message queues live in /dev/shm, of which a container gets 64 MiB by
# default; a memory-backed emptyDir gives them the pod's memory (what they use counts against its limit).
SHM_VOLUME = {"name": "dshm", "emptyDir": {"medium": "Memory"}}
SHM_MOUNT = {"name": "dshm", "mountPath": "/dev/shm"}


def _pod_template(
    container: dict[str, Any], volumes: list[dict[str, Any]], pool: NodePool, settings: KubeRaySettings
) -> dict[str, Any]:
    container = {**container, "volumeMounts": [*container.get("volumeMounts", []), SHM_MOUNT]}
    if settings.pod_env:
        container["env"] = [variable.manifest() for variable in settings.pod_env]
    spec: dict[str, Any] = {"containers": [container], "volumes": [*volumes, SHM_VOLUME]}
    if pool.node_selector:
        spec["nodeSelector"] = dict(pool.node_selector)
    if pool.tolerations:
        spec["tolerations"] = [t.model_dump(mode="json", exclude_none=True) for t in pool.tolerations]
    if settings.service_account:
        spec["serviceAccountName"] = settings.service_account
    return {"spec": spec}


_HEAD_PORTS = [
    {"containerPort": 6379, "name": "gcs-server"},
    {"containerPort": 8265, "name": "dashboard"},
    {"containerPort": 10001, "name": "client"},
]


def _head_group(
    image: str,
    mounts: list[dict[str, Any]],
    volumes: list[dict[str, Any]],
    settings: KubeRaySettings,
    serve: bool,
) -> dict[str, Any]:
    ports = _HEAD_PORTS + ([{"containerPort": SERVE_PORT, "name": "serve"}] if serve else [])
    container = _container("ray-head", image, settings.head_cpu, settings.head_memory, 0, mounts, ports)
    return {
        # num-cpus 0: the head runs the driver and the control plane, the work goes to the worker groups.
        "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
        "template": _pod_template(container, volumes, NodePool(), settings),
    }


def _worker_group(
    name: str,
    replicas: int,
    min_replicas: int,
    max_replicas: int,
    container: dict[str, Any],
    volumes: list[dict[str, Any]],
    pool: NodePool,
    settings: KubeRaySettings,
) -> dict[str, Any]:
    return {
        "groupName": name,
        "replicas": replicas,
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "rayStartParams": {},
        "template": _pod_template(container, volumes, pool, settings),
    }


def train_worker_cpus(pod_cpu: int | str) -> int:
    """CPUs one Ray Train worker reserves in its pod: every whole CPU but one, which stays free for
    Ray Data's read tasks (the head runs none: num-cpus 0)."""
    return max(1, math.floor(parse_quantity(pod_cpu)) - 1)


def rayjob(model: RankingModel, job: StageJob, settings: KubeRaySettings) -> dict[str, Any]:
    """The RayJob of one stage: its own Ray cluster, the workload entrypoint, shut down when done."""
    spec: RankingModelSpec = model.spec
    image = spec.image or settings.image
    gpus = (
        0 if job.stage is Stage.PREPROCESS else spec.training.gpus_per_worker
    )  # Ray Data preprocessing is CPU
    workers = 1 if job.stage is Stage.EVALUATE else spec.training.workers
    pool = spec.training.node_pool if gpus else NodePool()
    volumes, mounts = _volumes(
        _claims([spec.data.source, spec.artifact_root, spec.feature_repo.path, spec.model.base_model])
    )
    resources = spec.training.resources
    config = stage_config(
        spec,
        model.metadata.name,
        job.stage,
        job.version,
        job.reference,
        resolve_storage,
        cpus_per_worker=train_worker_cpus(resources.cpu),
    )
    worker = _container("ray-worker", image, resources.cpu, resources.memory, gpus, mounts)
    return {
        "apiVersion": f"{RAY_GROUP}/{RAY_VERSION}",
        "kind": "RayJob",
        "metadata": _metadata(
            model, job.name, {VERSION_LABEL: job.version.name, STAGE_LABEL: job.stage.value}, {}
        ),
        "spec": {
            "entrypoint": entrypoint(job.version.kind, job.stage, config),
            "runtimeEnvYAML": yaml.safe_dump(
                runtime_env(model.metadata.name, job.version, job.stage), sort_keys=True
            ),
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": settings.ttl_seconds_after_finished,
            "backoffLimit": settings.backoff_limit,
            "activeDeadlineSeconds": spec.training.deadline_seconds,
            "suspend": job.suspend,
            "rayClusterSpec": {
                "rayVersion": settings.ray_version,
                "headGroupSpec": _head_group(image, mounts, volumes, settings, serve=False),
                "workerGroupSpecs": [
                    _worker_group("workers", workers, workers, workers, worker, volumes, pool, settings)
                ],
            },
        },
    }


def rayservice(model: RankingModel, app: ServingApp, settings: KubeRaySettings) -> dict[str, Any]:
    """The model's RayService: serveConfigV2 names the version, so an upgrade is a serve config change."""
    spec, serving, version = model.spec, app.serving, app.version
    image = spec.image or settings.image
    storage = [version.artifact_uri, version.feature_repo]
    if version.kind is ModelKind.BREW:  # the LLM scorer verbalizes entities from the world's tables
        storage.append(version.data_source)
    volumes, mounts = _volumes(_claims(storage))
    config = serve_config(model.metadata.name, version, serving, resolve_storage)
    if serving.autoscaling is not None:
        low, high = serving.autoscaling.min_replicas, serving.autoscaling.max_replicas
    else:
        low = high = serving.replicas or 1
    cpu, memory = serving.resources.cpu, serving.resources.memory
    worker = _container("ray-worker", image, cpu, memory, 0, mounts)
    if version.kind is ModelKind.LIGR:  # one serve pod per scorer replica
        groups = [_worker_group("serve", low, low, high, worker, volumes, NodePool(), settings)]
    else:  # a CPU pod for the ingress and the feature fetcher; the LLM replicas on the (GPU) node pool
        llm = serving.llm
        llm_worker = _container("ray-worker", image, cpu, memory, llm.gpus, mounts)
        groups = [
            _worker_group("serve", 1, 1, 1, worker, volumes, NodePool(), settings),
            _worker_group("llm", low, low, high, llm_worker, volumes, llm.node_pool, settings),
        ]
    cluster: dict[str, Any] = {
        "rayVersion": settings.ray_version,
        "headGroupSpec": _head_group(image, mounts, volumes, settings, serve=True),
        "workerGroupSpecs": groups,
    }
    if serving.autoscaling is not None:
        cluster["enableInTreeAutoscaling"] = True
    return {
        "apiVersion": f"{RAY_GROUP}/{RAY_VERSION}",
        "kind": "RayService",
        "metadata": _metadata(
            model, app.name, {VERSION_LABEL: version.name}, {DIGEST_ANNOTATION: app.digest}
        ),
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            "serveConfigV2": yaml.safe_dump(config, sort_keys=False),
            "rayClusterConfig": cluster,
        },
    }


# --- Readers ------------------------------------------------------------------------------------------------


def observe_rayjob(obj: Mapping[str, Any]) -> ObservedJob:
    """KubeRay's two status fields folded into one state (IsJobDeploymentTerminal, JobStatus)."""
    status = obj.get("status") or {}
    deployment, job = status.get("jobDeploymentStatus", ""), status.get("jobStatus", "")
    name, suspend = obj["metadata"]["name"], bool((obj.get("spec") or {}).get("suspend"))
    reason, message = status.get("reason", ""), status.get("message", "")
    if deployment in ("Failed", "ValidationFailed") or (deployment == "Complete" and job != "SUCCEEDED"):
        return ObservedJob(name, JobState.FAILED, reason or job or deployment, message, suspend)
    if deployment == "Complete":
        return ObservedJob(name, JobState.SUCCEEDED, reason, message, suspend)
    if deployment in ("Suspending", "Suspended"):
        return ObservedJob(name, JobState.SUSPENDED, reason, message, suspend)
    if deployment == "Running" or job == "RUNNING":
        return ObservedJob(name, JobState.RUNNING, reason, message, suspend)
    return ObservedJob(name, JobState.PENDING, reason, message, suspend)


def observe_rayservice(obj: Mapping[str, Any]) -> ObservedService:
    """Ready means KubeRay has reconciled the current spec and the ranking application runs."""
    meta, status = obj["metadata"], obj.get("status") or {}
    name, namespace = meta["name"], meta.get("namespace", "default")
    conditions = {c.get("type"): c.get("status") for c in status.get("conditions") or []}
    applications = (status.get("activeServiceStatus") or {}).get("applicationStatuses") or {}
    application = applications.get(SERVE_APP_NAME) or {}
    current = meta.get("generation") is not None and status.get("observedGeneration") == meta.get(
        "generation"
    )
    ready = (
        current
        and conditions.get("Ready") == "True"
        and conditions.get("UpgradeInProgress") != "True"
        and application.get("status") == "RUNNING"
    )
    failed = current and application.get("status") == "DEPLOY_FAILED"
    message = application.get("message", "")
    if failed and not message:
        deployments = application.get("serveDeploymentStatuses") or {}
        message = "; ".join(
            f"{d}: {s.get('message', '')}" for d, s in deployments.items() if s.get("message")
        )
    serve = yaml.safe_load((obj.get("spec") or {}).get("serveConfigV2") or "{}") or {}
    route = next((a.get("route_prefix", "/") for a in serve.get("applications", [])), "/")
    return ObservedService(
        name=name,
        digest=(meta.get("annotations") or {}).get(DIGEST_ANNOTATION, ""),
        ready=bool(ready),
        failed=bool(failed),
        message=message,
        endpoint=f"http://{name}-serve-svc.{namespace}.svc.cluster.local:{SERVE_PORT}{route}",
    )


def owned_by(obj: Mapping[str, Any], model: RankingModel | RejectedModel) -> bool:
    meta = obj.get("metadata") or {}
    if (meta.get("labels") or {}).get(MODEL_LABEL) != model.metadata.name:
        return False
    uids = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
    return not model.metadata.uid or model.metadata.uid in uids


# --- I/O ----------------------------------------------------------------------------------------------------


class ChildConflictError(RuntimeError):
    """A child's name is taken by an object this RankingModel does not own."""


def default_api_client() -> k8s.ApiClient:
    """The pod's service account in a cluster, else $KUBECONFIG as it is now (kopf's login does the same)."""
    configuration = k8s.Configuration()
    try:
        k8s_config.load_incluster_config(client_configuration=configuration)
    except k8s_config.ConfigException:
        # The client library resolves $KUBECONFIG when imported; read it at call time instead.
        k8s_config.load_kube_config(
            config_file=os.environ.get("KUBECONFIG"), client_configuration=configuration
        )
    return k8s.ApiClient(configuration)


async def _call(method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """The kubernetes client blocks: run its calls in a thread so the operator's event loop keeps going."""
    return await asyncio.to_thread(method, *args, **kwargs)


class KubeRayBackend:
    """Observes and applies through the Kubernetes API; see `operators.backends.Backend`."""

    def __init__(
        self,
        settings: KubeRaySettings | None = None,
        api_client: k8s.ApiClient | None = None,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.settings = settings or KubeRaySettings()
        self.api = k8s.CustomObjectsApi(api_client or default_api_client())
        self.http = http or httpx.AsyncClient(timeout=self.settings.dashboard_timeout_seconds)

    async def observe(self, model: RankingModel | RejectedModel) -> Observed:
        namespace, name = model.metadata.namespace, model.metadata.name
        listing = await _call(
            self.api.list_namespaced_custom_object,
            RAY_GROUP,
            RAY_VERSION,
            namespace,
            "rayjobs",
            label_selector=f"{MODEL_LABEL}={name}",
        )
        now = datetime.now(UTC)
        jobs: dict[str, ObservedJob] = {}
        for obj in listing.get("items", []):
            # The selector narrows the list; ownership decides (and some API servers ignore selectors).
            if owned_by(obj, model):
                seen = observe_rayjob(obj)
                if self._wants_summary(model, seen):
                    seen = await self._read_summary(obj, seen, now)
                jobs[seen.name] = seen
        service = None
        try:
            found = await _call(
                self.api.get_namespaced_custom_object, RAY_GROUP, RAY_VERSION, namespace, "rayservices", name
            )
        except ApiException as err:
            if err.status != 404:
                raise
        else:
            if not owned_by(found, model):
                raise ChildConflictError(
                    f"RayService {namespace}/{name} exists and is not owned by RankingModel {name}"
                )
            service = observe_rayservice(found)
        return Observed(now=now, jobs=jobs, service=service)

    @staticmethod
    def _wants_summary(model: RankingModel | RejectedModel, seen: ObservedJob) -> bool:
        candidate = model.status.candidate_version
        return (
            seen.state is JobState.SUCCEEDED
            and candidate is not None
            and candidate.gate is None
            and seen.name == job_name(model.metadata.name, candidate.generation, Stage.EVALUATE)
        )

    async def _read_summary(self, obj: Mapping[str, Any], seen: ObservedJob, now: datetime) -> ObservedJob:
        """The evaluate job's last stdout line, from its Ray cluster's dashboard (Job Submission REST API)."""
        status = obj.get("status") or {}
        address, job_id = status.get("dashboardURL"), status.get("jobId")
        if not address or not job_id:
            return seen
        base = address if address.startswith("http") else f"http://{address}"
        try:
            response = await self.http.get(f"{base}/api/jobs/{job_id}/logs")
            response.raise_for_status()
            summary = last_json_line(response.json().get("logs", ""))
        except (httpx.HTTPError, ValueError) as err:
            ended = status.get("endTime")
            ttl = timedelta(seconds=self.settings.ttl_seconds_after_finished)
            if ended and datetime.fromisoformat(ended.replace("Z", "+00:00")) + ttl < now:
                return replace(
                    seen, summary_error=f"its Ray cluster was shut down before the summary was read ({err})"
                )
            return seen  # the cluster may still be starting its dashboard: try again on the next pass
        if summary is None:
            return replace(seen, summary_error="its output has no JSON summary line")
        return replace(seen, summary=summary)

    async def apply(self, model: RankingModel | RejectedModel, plan: Plan) -> None:
        namespace = model.metadata.namespace
        if not model.metadata.deletion_timestamp and plan.status != model.status:
            body = {"status": plan.status.model_dump(mode="json", by_alias=True)}  # nulls delete stale keys
            await _call(
                self.api.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                PLURAL,
                model.metadata.name,
                body,
            )
        if isinstance(model, RankingModel):
            for child in plan.create:
                await self._create(namespace, self._render(model, child))
            for child in plan.update:
                await self._patch(namespace, self._render(model, child), child)
        for ref in plan.delete:
            plural = "rayjobs" if ref.kind == "RayJob" else "rayservices"
            try:
                await _call(
                    self.api.delete_namespaced_custom_object,
                    RAY_GROUP,
                    RAY_VERSION,
                    namespace,
                    plural,
                    ref.name,
                )
            except ApiException as err:
                if err.status != 404:
                    raise

    def _render(self, model: RankingModel, child: StageJob | ServingApp) -> dict[str, Any]:
        if isinstance(child, StageJob):
            return rayjob(model, child, self.settings)
        return rayservice(model, child, self.settings)

    async def _create(self, namespace: str, body: dict[str, Any]) -> None:
        plural = "rayjobs" if body["kind"] == "RayJob" else "rayservices"
        try:
            await _call(
                self.api.create_namespaced_custom_object, RAY_GROUP, RAY_VERSION, namespace, plural, body
            )
        except ApiException as err:
            if err.status != 409:  # already there: created by an earlier pass whose status write was lost
                raise

    async def _patch(self, namespace: str, body: dict[str, Any], child: StageJob | ServingApp) -> None:
        if isinstance(child, StageJob):  # a RayJob's spec is fixed once submitted, except `suspend`
            plural, patch = "rayjobs", {"spec": {"suspend": child.suspend}}
        else:
            plural = "rayservices"
            patch = {
                "metadata": {
                    "labels": body["metadata"]["labels"],
                    "annotations": body["metadata"]["annotations"],
                }
            }
            patch["spec"] = body["spec"]
        await _call(
            self.api.patch_namespaced_custom_object,
            RAY_GROUP,
            RAY_VERSION,
            namespace,
            plural,
            body["metadata"]["name"],
            patch,
        )

    async def close(self) -> None:
        await self.http.aclose()
        await _call(self.api.api_client.close)
