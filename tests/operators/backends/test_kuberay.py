"""The KubeRay backend's pure half: every RayJob and RayService it builds validates against KubeRay's own
CRDs, passes the KubeRay controller's checks, lands on the right nodes and runs the right command; KubeRay's
statuses are read back correctly; a finished evaluate job's summary is read from its dashboard."""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import kubernetes_validate
import pytest
import yaml
from pydantic import ValidationError

from operators.api.crd import version_schema
from operators.api.v1alpha1 import RankingModel
from operators.backends.kuberay import (
    DIGEST_ANNOTATION,
    SHM_VOLUME,
    KubeRayBackend,
    KubeRaySettings,
    observe_rayjob,
    observe_rayservice,
    rayjob,
    rayservice,
    resolve_storage,
    train_worker_cpus,
)
from operators.pipeline import Stage, job_name, new_version, stage_config, stages
from operators.reconcile import JobState, ObservedJob, ServingApp, StageJob
from operators.validate import cel_problems, schema_problems
from tests.operators.conftest import as_model

ROOT = Path(__file__).resolve().parents[3]
# KubeRay v1.7.0's CRDs, unmodified (see SOURCE.md there); KUBERAY_CRDS_DIR points elsewhere if needed.
KUBERAY_CRDS = Path(os.environ.get("KUBERAY_CRDS_DIR", ROOT.parent / "shared" / "kuberay-crds"))
EXAMPLES = ROOT / "examples"
SETTINGS = KubeRaySettings()
POD_ENV = [
    {"name": "OTEL_EXPORTER_OTLP_ENDPOINT", "value": "http://otel-collector.rankray-system.svc:4317"},
    {"name": "REDIS_PASSWORD", "valueFrom": {"secretKeyRef": {"name": "feast-redis", "key": "password"}}},
    {
        "name": "RANKRAY_REDIS",
        "value": "feast-redis.rankray-system.svc.cluster.local:6379,password=$(REDIS_PASSWORD)",
    },
]
# what the prod values render: the Ray pods get the collector and Redis (feed-fixed is rendered with these)
PROD_SETTINGS = KubeRaySettings.from_env({"RANKRAY_POD_ENV": json.dumps(POD_ENV)})


def _kuberay_schema(kind: str) -> dict[str, Any]:
    path = KUBERAY_CRDS / f"ray.io_{kind}.yaml"
    if not path.exists():
        pytest.fail(f"KubeRay CRD {path} is missing: copy ray-project/kuberay v1.7.0 helm-chart CRDs there")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are 1 MB each: libyaml is 10x faster
    return version_schema(yaml.load(path.read_text(), Loader=loader), "v1")


@pytest.fixture(scope="module")
def rayjob_schema() -> dict[str, Any]:
    return _kuberay_schema("rayjobs")


@pytest.fixture(scope="module")
def rayservice_schema() -> dict[str, Any]:
    return _kuberay_schema("rayservices")


def _example(name: str, generation: int = 1) -> RankingModel:
    return as_model(yaml.safe_load((EXAMPLES / name).read_text()), generation=generation)


def _models() -> dict[str, RankingModel]:
    autoscaled = yaml.safe_load((EXAMPLES / "feed-ligr.yaml").read_text())
    autoscaled["metadata"]["name"] = "feed-autoscaled"
    fixed = copy.deepcopy(autoscaled)
    fixed["metadata"]["name"] = "feed-fixed"
    fixed["spec"]["serving"] = {"replicas": 3}
    fixed["spec"]["artifactRoot"] = "s3://rankray-models/prod"
    gpu = copy.deepcopy(autoscaled)
    gpu["metadata"]["name"] = "feed-gpu"
    gpu["spec"]["training"].update(
        workers=4,
        gpusPerWorker=1,
        nodePool={
            "nodeSelector": {"rankray.io/pool": "gpu"},
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    )
    return {
        "feed-ligr": _example("feed-ligr.yaml"),
        "jobs-brew": _example("jobs-brew.yaml", generation=12),
        "feed-fixed": as_model(fixed),
        "feed-gpu": as_model(gpu),
    }


MODELS = _models()


def _stage_job(model: RankingModel, stage: Stage, suspend: bool = False) -> StageJob:
    version = new_version(model.spec, model.metadata.name, model.metadata.generation)
    return StageJob(
        job_name(model.metadata.name, model.metadata.generation, stage), stage, version, None, suspend
    )


def _serving_app(model: RankingModel) -> ServingApp:
    version = new_version(model.spec, model.metadata.name, model.metadata.generation)
    return ServingApp(model.metadata.name, version, model.spec.serving)


def _all_children() -> list[tuple[str, dict[str, Any]]]:
    out = []
    for label, model in MODELS.items():
        settings = PROD_SETTINGS if label == "feed-fixed" else SETTINGS
        for stage in stages(model.spec.model.kind):
            for suspend in (False, True):
                out.append(
                    (
                        f"{label}-{stage.value}-{suspend}",
                        rayjob(model, _stage_job(model, stage, suspend), settings),
                    )
                )
        out.append((f"{label}-service", rayservice(model, _serving_app(model), settings)))
    return out


CHILDREN = _all_children()


@pytest.mark.parametrize(("label", "child"), CHILDREN, ids=[label for label, _ in CHILDREN])
def test_every_child_validates_against_the_kuberay_crd(
    label: str, child: dict[str, Any], rayjob_schema: dict[str, Any], rayservice_schema: dict[str, Any]
) -> None:
    schema = rayjob_schema if child["kind"] == "RayJob" else rayservice_schema
    assert child["apiVersion"] == "ray.io/v1"
    assert schema_problems(child, schema) == []
    assert cel_problems(child, schema) == []


def test_the_kuberay_schema_check_catches_a_broken_rayjob(rayjob_schema: dict[str, Any]) -> None:
    """The check above is not vacuous: a wrong type and a misspelt field deep in a pod template are found."""
    child = copy.deepcopy(CHILDREN[0][1])
    child["spec"]["backoffLimit"] = "three"
    container = child["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    container["resources"]["limit"] = {"cpu": "1"}
    fields = {p.field for p in schema_problems(child, rayjob_schema)}
    assert "spec.backoffLimit" in fields
    assert "spec.rayClusterSpec.workerGroupSpecs[0].template.spec.containers[0].resources.limit" in fields


@pytest.mark.parametrize(("label", "child"), CHILDREN, ids=[label for label, _ in CHILDREN])
def test_every_pod_template_is_a_valid_core_pod_template(label: str, child: dict[str, Any]) -> None:
    cluster = child["spec"].get("rayClusterSpec") or child["spec"]["rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        template = {
            "apiVersion": "v1",
            "kind": "PodTemplate",
            "metadata": {"name": "t"},
            "template": group["template"],
        }
        kubernetes_validate.validate(template, "1.32", strict=True)


@pytest.mark.parametrize(("label", "child"), CHILDREN, ids=[label for label, _ in CHILDREN])
def test_every_child_passes_the_kuberay_controllers_own_checks(label: str, child: dict[str, Any]) -> None:
    """ray-operator/controllers/ray/utils/validation.go: what KubeRay rejects after admission."""
    name, spec = child["metadata"]["name"], child["spec"]
    assert len(name) <= 47 and re.fullmatch(r"[a-z]([-a-z0-9]*[a-z0-9])?", name), name
    owner = child["metadata"]["ownerReferences"][0]
    assert owner["kind"] == "RankingModel" and owner["uid"] == "uid-1" and owner["controller"] is True
    cluster = spec.get("rayClusterSpec") or spec.get("rayClusterConfig")
    assert cluster["headGroupSpec"]["template"]["spec"]["containers"]
    assert all(group["template"]["spec"]["containers"] for group in cluster["workerGroupSpecs"])
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    if child["kind"] == "RayJob":
        assert spec["shutdownAfterJobFinishes"] is True, "a suspendable RayJob must shut down after finishing"
        assert spec["ttlSecondsAfterFinished"] >= 0 and spec["backoffLimit"] >= 0
        assert spec["activeDeadlineSeconds"] > 0
        assert isinstance(yaml.safe_load(spec["runtimeEnvYAML"]), dict)
    else:
        assert spec["upgradeStrategy"] == {"type": "NewCluster"}
        assert "headService" not in cluster["headGroupSpec"]


def _containers(child: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = child["spec"]["rayClusterSpec" if child["kind"] == "RayJob" else "rayClusterConfig"]
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    return [c for group in groups for c in group["template"]["spec"]["containers"]]


def test_pod_env_reaches_every_ray_container_and_nothing_else_gets_it() -> None:
    for label, child in CHILDREN:
        for container in _containers(child):
            assert container.get("env", []) == (POD_ENV if label.startswith("feed-fixed") else []), label


def test_pod_env_that_is_not_a_json_object_is_refused_naming_the_setting() -> None:
    bad_values = {
        "OTEL=1": "not a JSON list",
        '{"A": "1"}': "pod_env",
        '[{"name": "A", "value": 1}]': "pod_env.0.value",
        '[{"name": "A"}]': "A: give exactly one of value and valueFrom",
        '[{"name": "A", "value": "1", "valueFrom": {}}]': "A: give exactly one of value and valueFrom",
    }
    for bad, message in bad_values.items():
        with pytest.raises(ValidationError, match=message):
            KubeRaySettings.from_env({"RANKRAY_POD_ENV": bad})
    assert KubeRaySettings.from_env({"RANKRAY_POD_ENV": ""}).pod_env == []


def test_stage_entrypoints_run_the_workload_modules_with_the_pipelines_config() -> None:
    for label, modules in [
        ("feed-ligr", ["workloads.data.preprocess", "workloads.train", "workloads.eval.gate"]),
        ("jobs-brew", ["workloads.brew.train", "workloads.eval.gate"]),
    ]:
        model = MODELS[label]
        planned = stages(model.spec.model.kind)
        for stage, module in zip(planned, modules, strict=True):
            job = _stage_job(model, stage)
            command = shlex.split(rayjob(model, job, SETTINGS)["spec"]["entrypoint"])
            assert command[:4] == ["python", "-m", module, "--config-json"] and len(command) == 5
            cpus = train_worker_cpus(model.spec.training.resources.cpu)
            expected = stage_config(model.spec, label, stage, job.version, None, resolve_storage, cpus)
            assert json.loads(command[4]) == expected


def test_training_workers_compute_on_their_pods_cpus_but_one() -> None:
    # Ray pins a worker's torch threads to the CPUs it reserves; one CPU per pod stays for Ray Data
    assert [train_worker_cpus(q) for q in ("8", 4, "2", "1", "500m", "7500m")] == [7, 3, 1, 1, 1, 6]
    for label, pod_cpus in [("feed-ligr", 4), ("jobs-brew", 8)]:
        model = MODELS[label]
        job = _stage_job(model, Stage.TRAIN)
        config = json.loads(shlex.split(rayjob(model, job, SETTINGS)["spec"]["entrypoint"])[4])
        assert config["cpus_per_worker"] == pod_cpus - 1
        (workers,) = rayjob(model, job, SETTINGS)["spec"]["rayClusterSpec"]["workerGroupSpecs"]
        assert workers["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"] == str(pod_cpus)


def test_gpu_stages_land_on_the_gpu_node_pool_and_preprocessing_does_not() -> None:
    model = MODELS["feed-gpu"]
    for stage, expect_gpu in [(Stage.PREPROCESS, False), (Stage.TRAIN, True), (Stage.EVALUATE, True)]:
        spec = rayjob(model, _stage_job(model, stage), SETTINGS)["spec"]["rayClusterSpec"]
        (workers,) = spec["workerGroupSpecs"]
        pod = workers["template"]["spec"]
        limits = pod["containers"][0]["resources"]["limits"]
        assert ("nvidia.com/gpu" in limits) is expect_gpu
        assert ("nodeSelector" in pod) is expect_gpu
        if expect_gpu:
            assert limits["nvidia.com/gpu"] == 1
            assert pod["nodeSelector"] == {"rankray.io/pool": "gpu"}
            assert pod["tolerations"] == [
                {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
            ]
        assert workers["replicas"] == (1 if stage is Stage.EVALUATE else 4)
        head = spec["headGroupSpec"]["template"]["spec"]
        assert (
            "nodeSelector" not in head
            and "nvidia.com/gpu" not in head["containers"][0]["resources"]["limits"]
        )


def test_pvc_storage_is_mounted_where_the_configs_point() -> None:
    model = MODELS["feed-ligr"]
    pod = rayjob(model, _stage_job(model, Stage.TRAIN), SETTINGS)["spec"]["rayClusterSpec"][
        "workerGroupSpecs"
    ][0]
    pod_spec = pod["template"]["spec"]
    claims = {
        v["persistentVolumeClaim"]["claimName"]: v["name"] for v in pod_spec["volumes"] if v["name"] != "dshm"
    }
    assert set(claims) == {"rankray-data", "rankray-artifacts"}
    mounts = {m["name"]: m["mountPath"] for m in pod_spec["containers"][0]["volumeMounts"]}
    assert mounts[claims["rankray-artifacts"]] == "/mnt/pvc/rankray-artifacts"
    assert resolve_storage("pvc://rankray-artifacts/models/x") == "/mnt/pvc/rankray-artifacts/models/x"
    assert resolve_storage("s3://bucket/p") == "s3://bucket/p"
    s3 = MODELS["feed-fixed"]
    service_pod = rayservice(s3, _serving_app(s3), SETTINGS)["spec"]["rayClusterConfig"]["headGroupSpec"][
        "template"
    ]
    assert service_pod["spec"]["volumes"] == [SHM_VOLUME], "an s3:// artifact root needs no volume"


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_ray_pod_gets_a_memory_backed_dev_shm(name: str) -> None:
    """Ray's object store and vLLM's queues live in /dev/shm, 64 MiB in a container without this."""
    model = MODELS[name]
    clusters = [rayservice(model, _serving_app(model), SETTINGS)["spec"]["rayClusterConfig"]]
    for stage in stages(model.spec.model.kind):
        clusters.append(rayjob(model, _stage_job(model, stage), SETTINGS)["spec"]["rayClusterSpec"])
    for cluster in clusters:
        for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
            pod = group["template"]["spec"]
            assert SHM_VOLUME in pod["volumes"]
            assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]


def test_the_rayservice_carries_the_serve_config_of_its_version() -> None:
    model = MODELS["feed-ligr"]
    app = _serving_app(model)
    service = rayservice(model, app, SETTINGS)
    assert service["metadata"]["annotations"][DIGEST_ANNOTATION] == app.digest
    assert service["metadata"]["labels"]["rankray.io/version"] == "v1"
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    (application,) = config["applications"]
    assert application["import_path"] == "workloads.serve.graph:build_app"
    assert application["route_prefix"] == "/"
    assert application["args"] == {
        "artifact_uri": "/mnt/pvc/rankray-artifacts/models/feed-ligr/v1",
        "feature_repo": "/opt/rankray/feature_repo",
        "model_name": "feed-ligr",
        "model_version": "v1",
        "model_kind": "ligr",
        "setwise_top_k": 10,
        "candidates_limit": 1000,
        "llm_enabled": False,
    }
    (scorer,) = application["deployments"]
    assert scorer["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 16,
    }
    cluster = service["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert [(g["groupName"], g["minReplicas"], g["maxReplicas"]) for g in cluster["workerGroupSpecs"]] == [
        ("serve", 1, 4)
    ]


def test_a_brew_model_is_served_by_llm_replicas_on_the_gpu_node_pool() -> None:
    model = MODELS["jobs-brew"]
    service = rayservice(model, _serving_app(model), SETTINGS)
    application = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    (scorer,) = application["deployments"]
    assert (scorer["name"], scorer["num_replicas"]) == ("BrewScorer", 2)
    assert scorer["ray_actor_options"] == {"num_cpus": 1, "num_gpus": 1}
    assert application["args"]["world_dir"] == "/mnt/pvc/rankray-data/world"
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    assert (groups["llm"]["replicas"], groups["serve"]["replicas"]) == (2, 1)
    llm_pod = groups["llm"]["template"]["spec"]
    assert llm_pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert llm_pod["nodeSelector"] == {"rankray.io/pool": "gpu"}
    assert "nodeSelector" not in groups["serve"]["template"]["spec"]


def test_the_version_not_the_spec_decides_what_is_deployed() -> None:
    """A LiGR version still serving while a switch to brew trains keeps its own graph."""
    brew = MODELS["jobs-brew"]
    ligr_version = new_version(MODELS["feed-ligr"].spec, "jobs-brew", 3)
    service = rayservice(brew, ServingApp("jobs-brew", ligr_version, brew.spec.serving), SETTINGS)
    application = yaml.safe_load(service["spec"]["serveConfigV2"])["applications"][0]
    assert [d["name"] for d in application["deployments"]] == ["PointwiseScorer"]
    assert application["args"]["llm_enabled"] is False and "world_dir" not in application["args"]
    assert [g["groupName"] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]] == ["serve"]


def _rayjob_with_status(**status: Any) -> dict[str, Any]:
    return {"metadata": {"name": "m-v1-train"}, "spec": {"suspend": False}, "status": status}


@pytest.mark.parametrize(
    ("status", "state", "reason"),
    [
        ({}, JobState.PENDING, ""),
        ({"jobDeploymentStatus": "Initializing"}, JobState.PENDING, ""),
        ({"jobDeploymentStatus": "Running", "jobStatus": "RUNNING"}, JobState.RUNNING, ""),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}, JobState.SUCCEEDED, ""),
        (
            {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed"},
            JobState.FAILED,
            "AppFailed",
        ),
        (
            {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"},
            JobState.FAILED,
            "DeadlineExceeded",
        ),
        (
            {"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed"},
            JobState.FAILED,
            "ValidationFailed",
        ),
        ({"jobDeploymentStatus": "Complete", "jobStatus": "STOPPED"}, JobState.FAILED, "STOPPED"),
        ({"jobDeploymentStatus": "Suspended"}, JobState.SUSPENDED, ""),
        ({"jobDeploymentStatus": "Retrying"}, JobState.PENDING, ""),
    ],
)
def test_kuberay_job_statuses_fold_into_one_state(
    status: dict[str, Any], state: JobState, reason: str
) -> None:
    seen = observe_rayjob(_rayjob_with_status(**status, message="details"))
    assert (seen.state, seen.reason) == (state, reason)
    assert seen.message == "details"


def _rayservice_object(
    generation: int, observed: int, ready: str, app: str, message: str = ""
) -> dict[str, Any]:
    model = MODELS["feed-ligr"]
    obj = rayservice(model, _serving_app(model), SETTINGS)
    obj["metadata"]["generation"] = generation
    obj["status"] = {
        "observedGeneration": observed,
        "conditions": [{"type": "Ready", "status": ready}, {"type": "UpgradeInProgress", "status": "False"}],
        "activeServiceStatus": {"applicationStatuses": {"ranking": {"status": app, "message": message}}},
    }
    return obj


def test_a_rayservice_is_ready_only_once_kuberay_has_rolled_out_its_current_spec() -> None:
    assert observe_rayservice(_rayservice_object(2, 2, "True", "RUNNING")).ready
    assert not observe_rayservice(_rayservice_object(3, 2, "True", "RUNNING")).ready, "new spec not seen yet"
    assert not observe_rayservice(_rayservice_object(2, 2, "False", "DEPLOYING")).ready
    failed = observe_rayservice(_rayservice_object(2, 2, "False", "DEPLOY_FAILED", "ImportError: no module"))
    assert failed.failed and failed.message == "ImportError: no module"
    seen = observe_rayservice(_rayservice_object(2, 2, "True", "RUNNING"))
    assert seen.endpoint == "http://feed-ligr-serve-svc.default.svc.cluster.local:8000/"
    assert seen.digest == _serving_app(MODELS["feed-ligr"]).digest


def _evaluate_object(end: datetime) -> dict[str, Any]:
    return {
        "metadata": {"name": "m-v1-evaluate"},
        "spec": {},
        "status": {
            "jobDeploymentStatus": "Complete",
            "jobStatus": "SUCCEEDED",
            "dashboardURL": "m-v1-evaluate-raycluster-head-svc.ns.svc.cluster.local:8265",
            "jobId": "m-v1-evaluate-abc12",
            "endTime": end.isoformat().replace("+00:00", "Z"),
        },
    }


async def _summary(handler: Any, end: datetime) -> ObservedJob:
    http = httpx.AsyncClient(transport=httpx.MockTransport(handler))
    backend = KubeRayBackend(SETTINGS, api_client=object(), http=http)  # type: ignore[arg-type]
    seen = ObservedJob("m-v1-evaluate", JobState.SUCCEEDED)
    try:
        return await backend._read_summary(_evaluate_object(end), seen, datetime.now(UTC))
    finally:
        await http.aclose()


@pytest.mark.asyncio
async def test_the_evaluate_summary_is_the_last_json_line_of_the_job_logs() -> None:
    def dashboard(request: httpx.Request) -> httpx.Response:
        assert request.url == httpx.URL(
            "http://m-v1-evaluate-raycluster-head-svc.ns.svc.cluster.local:8265/api/jobs/m-v1-evaluate-abc12/logs"
        )
        logs = 'loading\n{"progress": 0.5}\n{"auc": 0.7, "gate": {"passed": true}}\nbye\n'
        return httpx.Response(200, json={"logs": logs})

    seen = await _summary(dashboard, datetime.now(UTC))
    assert seen.summary == {"auc": 0.7, "gate": {"passed": True}} and not seen.summary_error


@pytest.mark.asyncio
async def test_an_unreachable_dashboard_is_retried_until_the_cluster_ttl_has_passed() -> None:
    def down(request: httpx.Request) -> httpx.Response:
        raise httpx.ConnectError("connection refused", request=request)

    recent = await _summary(down, datetime.now(UTC))
    assert recent.summary is None and not recent.summary_error
    gone = await _summary(
        down, datetime.now(UTC) - timedelta(seconds=SETTINGS.ttl_seconds_after_finished + 60)
    )
    assert gone.summary is None and "shut down" in gone.summary_error


@pytest.mark.asyncio
async def test_logs_without_a_summary_line_are_an_error() -> None:
    seen = await _summary(
        lambda request: httpx.Response(200, json={"logs": "Traceback...\n"}), datetime.now(UTC)
    )
    assert seen.summary is None and "no JSON summary" in seen.summary_error
