"""End to end: the real kopf handlers against kmock's Kubernetes API emulator, with the test playing KubeRay.

The operator runs exactly as `rankray operator` runs it (kopf.operator, kubeconfig login, the KubeRay backend
with the `kubernetes` client); only the cluster is emulated. The test patches RayJob and RayService statuses
the way KubeRay would, and serves the evaluate job's logs the way its Ray dashboard would.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import threading
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import kmock
import kubernetes_validate
import pytest
import pytest_asyncio
import yaml

os.environ["RANKRAY_SYNC_INTERVAL_SECONDS"] = "0.5"  # read when operators.handlers is imported, just below
import kopf

from operators import handlers
from tests.conftest import Telemetry
from tests.operators.apiserver import ApiServer, declare_resources
from tests.operators.conftest import VALID_MANIFEST

pytestmark = [pytest.mark.slow, pytest.mark.asyncio, pytest.mark.timeout(120)]

NS = "ranking"
RKM = "rankray.io/v1alpha1/rankingmodels"
RAYJOBS = "ray.io/v1/rayjobs"
RAYSERVICES = "ray.io/v1/rayservices"
EVENTS = "v1/events"
PATHS = {
    RKM: f"/apis/rankray.io/v1alpha1/namespaces/{NS}/rankingmodels",
    RAYJOBS: f"/apis/ray.io/v1/namespaces/{NS}/rayjobs",
    RAYSERVICES: f"/apis/ray.io/v1/namespaces/{NS}/rayservices",
}
MERGE = {"Content-Type": "application/merge-patch+json"}
PASSING = {
    "task_auc": {"click": 0.712, "contribution": 0.689, "long_dwell": 0.731},
    "auc": 0.712,
    "gate": {
        "passed": True,
        "value": 0.731,
        "reference": 0.702,
        "reference_name": "baseline",
        "lift": 0.0413,
    },
}


@pytest_asyncio.fixture
async def cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[ApiServer]:
    """An emulated API server, and a kubeconfig pointing at it for kopf and for the kubernetes client."""
    assert handlers.SYNC_INTERVAL_SECONDS <= 1, (
        "operators.handlers was imported before this module set its interval"
    )
    async with ApiServer() as server, kmock.Server(server):
        declare_resources(server)
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "kmock", "cluster": {"server": str(server.url).rstrip("/")}}],
            "users": [{"name": "test", "user": {}}],
            "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "test", "namespace": NS}}],
            "current-context": "kmock",
        }
        (tmp_path / "kubeconfig").write_text(yaml.safe_dump(kubeconfig))
        monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
        monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
        yield server


@pytest_asyncio.fixture
async def api(cluster: ApiServer) -> AsyncIterator[httpx.AsyncClient]:
    """What `kubectl` and KubeRay would do, as plain HTTP against the same API server."""
    async with httpx.AsyncClient(base_url=str(cluster.url).rstrip("/")) as client:
        yield client


@contextlib.asynccontextmanager
async def operator_running() -> AsyncIterator[None]:
    """`rankray operator` in a thread with its own event loop (as in a pod, kopf owns every task of it)."""
    stop, ready = threading.Event(), threading.Event()
    settings = kopf.OperatorSettings()
    settings.scanning.disabled = True  # kmock 0.8 answers 500 to GET /api/v1/namespaces; we watch one anyway
    failure: list[BaseException] = []

    def run() -> None:
        try:
            asyncio.run(
                kopf.operator(
                    namespaces=[NS], standalone=True, settings=settings, stop_flag=stop, ready_flag=ready
                )
            )
        except BaseException as err:
            failure.append(err)

    thread = threading.Thread(target=run, name="operator", daemon=True)
    thread.start()
    assert await asyncio.to_thread(ready.wait, 30), f"the operator did not start: {failure}"
    try:
        yield
    finally:
        stop.set()
        await asyncio.to_thread(thread.join, 30)
        assert not thread.is_alive(), "the operator did not stop"
        assert not failure, f"the operator crashed: {failure[0]!r}"


# --- Looking at the emulated cluster ------------------------------------------------------------------------


def live(cluster: ApiServer, resource: str) -> dict[str, dict[str, Any]]:
    wanted = kmock.resource(resource)
    return {
        name: obj.raw for (res, _, name), obj in cluster.objects.items() if res == wanted and not obj.deleted
    }


def model(cluster: ApiServer, name: str = "feed-ligr") -> dict[str, Any]:
    return live(cluster, RKM).get(name, {})


def condition(body: dict[str, Any], kind: str) -> dict[str, Any]:
    return next((c for c in (body.get("status") or {}).get("conditions", []) if c["type"] == kind), {})


def creations(cluster: ApiServer, resource: str) -> list[str]:
    wanted = kmock.resource(resource)
    return [
        r.data["metadata"]["name"]
        for r in cluster
        if r.action == kmock.action.CREATE and r.resource == wanted
    ]


async def eventually(check: Callable[[], Any], what: str, timeout: float = 20) -> Any:
    """Poll until `check()` is truthy; fail naming what never happened."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not (result := check()):
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.1)
    return result


# --- Playing the user and KubeRay ---------------------------------------------------------------------------


async def apply(api: httpx.AsyncClient, manifest: dict[str, Any]) -> None:
    response = await api.post(PATHS[RKM], json=manifest)
    assert response.status_code < 300, response.text


async def edit_spec(api: httpx.AsyncClient, name: str, spec: dict[str, Any]) -> None:
    response = await api.patch(f"{PATHS[RKM]}/{name}", json={"spec": spec}, headers=MERGE)
    assert response.status_code < 300, response.text


async def set_status(api: httpx.AsyncClient, resource: str, name: str, status: dict[str, Any]) -> None:
    response = await api.patch(f"{PATHS[resource]}/{name}/status", json={"status": status}, headers=MERGE)
    assert response.status_code < 300, response.text


async def finish_job(
    api: httpx.AsyncClient, cluster: ApiServer, name: str, summary: dict[str, Any] | None = None
) -> None:
    """KubeRay's terminal success; for an evaluate job also its dashboard serving the job's logs."""
    status: dict[str, Any] = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    if summary is not None:
        job_id = f"{name}-x7k2p"
        cluster[f"get /dashboard/api/jobs/{job_id}/logs"] << {"logs": f"scoring...\n{json.dumps(summary)}\n"}
        status.update(jobId=job_id, dashboardURL=f"{str(cluster.url).rstrip('/')}/dashboard")
    await set_status(api, RAYJOBS, name, status)


async def serve_ready(api: httpx.AsyncClient, cluster: ApiServer, name: str) -> None:
    """KubeRay has reconciled the RayService's current spec and the ranking app runs."""
    generation = live(cluster, RAYSERVICES)[name]["metadata"]["generation"]
    await set_status(
        api,
        RAYSERVICES,
        name,
        {
            "observedGeneration": generation,
            "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "UpgradeInProgress", "status": "False"},
            ],
            "activeServiceStatus": {"applicationStatuses": {"ranking": {"status": "RUNNING"}}},
        },
    )


async def drive_to_serving(api: httpx.AsyncClient, cluster: ApiServer, version: str) -> None:
    """Take one version through its three stages and the rollout, checking the phase at each step."""
    for stage, phase in [("preprocess", "Preprocessing"), ("train", "Training"), ("evaluate", "Evaluating")]:
        job = f"feed-ligr-{version}-{stage}"
        await eventually(lambda: job in live(cluster, RAYJOBS), f"RayJob {job}")  # noqa: B023 (awaited at once)
        await eventually(lambda: model(cluster)["status"]["phase"] == phase, phase)  # noqa: B023
        await finish_job(api, cluster, job, PASSING if stage == "evaluate" else None)
    await eventually(
        lambda: (
            (live(cluster, RAYSERVICES).get("feed-ligr", {}).get("metadata", {}).get("labels") or {}).get(
                "rankray.io/version"
            )
            == version
        ),
        f"RayService serving {version}",
    )
    await serve_ready(api, cluster, "feed-ligr")
    await eventually(
        lambda: (model(cluster)["status"].get("currentVersion") or {}).get("name") == version,
        f"{version} promoted",
    )


# --- The scenarios ------------------------------------------------------------------------------------------


async def test_a_model_goes_from_manifest_to_serving_and_is_deleted_cleanly(
    cluster: ApiServer, api: httpx.AsyncClient, telemetry: Telemetry
) -> None:
    telemetry.exporter.clear()
    async with operator_running():
        await apply(api, VALID_MANIFEST | {"metadata": {"name": "feed-ligr", "namespace": NS}})
        job = await eventually(
            lambda: live(cluster, RAYJOBS).get("feed-ligr-v1-preprocess"), "preprocess RayJob"
        )
        body = model(cluster)
        owner = job["metadata"]["ownerReferences"][0]
        assert (owner["kind"], owner["name"], owner["uid"]) == (
            "RankingModel",
            "feed-ligr",
            body["metadata"]["uid"],
        )
        assert handlers.FINALIZER in body["metadata"]["finalizers"]
        assert body["status"]["children"]["preprocessJob"] == "feed-ligr-v1-preprocess"
        assert condition(body, "Progressing")["reason"] == "Preprocessing"

        await drive_to_serving(api, cluster, "v1")
        body = model(cluster)
        status = body["status"]
        assert status["phase"] == "Serving" and status["observedGeneration"] == 1
        assert status["currentVersion"]["metrics"]["auc"] == 0.712
        assert status["currentVersion"]["metrics"]["taskAuc"]["long_dwell"] == 0.731
        assert status["endpoint"] == "http://feed-ligr-serve-svc.ranking.svc.cluster.local:8000/"
        assert condition(body, "Ready")["status"] == "True"
        assert condition(body, "GatePassed")["status"] == "True"
        assert "candidateVersion" not in status
        assert creations(cluster, RAYJOBS) == [
            f"feed-ligr-v1-{s}" for s in ("preprocess", "train", "evaluate")
        ]
        assert creations(cluster, RAYSERVICES) == ["feed-ligr"]

        events = await eventually(
            lambda: (
                [e for e in live(cluster, EVENTS).values() if e.get("reason") == "Promoted"]
                and live(cluster, EVENTS)
            ),
            "a Promoted event",
        )
        reasons = {e["reason"] for e in events.values() if e["involvedObject"]["name"] == "feed-ligr"}
        assert {"Created", "PhaseChanged", "GatePassed", "Promoted"} <= reasons
        for event in events.values():
            kubernetes_validate.validate({"apiVersion": "v1", "kind": "Event", **event}, "1.32", strict=True)

        response = await api.delete(f"{PATHS[RKM]}/feed-ligr")
        assert response.status_code < 300, response.text
        await eventually(
            lambda: not model(cluster), "the RankingModel to be gone once its finalizer is released"
        )
        assert live(cluster, RAYJOBS) == {} and live(cluster, RAYSERVICES) == {}

    # every sync was a span naming the model, with the phase it reached and what it changed
    syncs = [
        s.attributes for s in telemetry.spans("reconcile") if s.attributes["rankray.model"] == "feed-ligr"
    ]
    assert {"Preprocessing", "Training", "Evaluating", "Serving"} <= {a["rankray.phase"] for a in syncs}
    assert sum(a["rankray.children.create"] for a in syncs) == 4  # three stage RayJobs and the RayService
    assert all(a["k8s.namespace.name"] == NS for a in syncs)


async def test_a_restarted_operator_continues_without_duplicating_children(
    cluster: ApiServer, api: httpx.AsyncClient
) -> None:
    async with operator_running():
        await apply(api, VALID_MANIFEST | {"metadata": {"name": "feed-ligr", "namespace": NS}})
        await eventually(lambda: "feed-ligr-v1-preprocess" in live(cluster, RAYJOBS), "preprocess RayJob")
    await finish_job(
        api, cluster, "feed-ligr-v1-preprocess"
    )  # KubeRay keeps going while the operator is down
    async with operator_running():
        await eventually(
            lambda: "feed-ligr-v1-train" in live(cluster, RAYJOBS), "train RayJob after the restart"
        )
        await eventually(lambda: model(cluster)["status"]["phase"] == "Training", "phase Training")
        await asyncio.sleep(4 * handlers.SYNC_INTERVAL_SECONDS)  # several resyncs of the same state
    assert creations(cluster, RAYJOBS) == ["feed-ligr-v1-preprocess", "feed-ligr-v1-train"]
    assert set(live(cluster, RAYJOBS)) == {"feed-ligr-v1-preprocess", "feed-ligr-v1-train"}


async def test_a_spec_change_trains_a_new_version_while_the_old_one_keeps_serving(
    cluster: ApiServer, api: httpx.AsyncClient
) -> None:
    async with operator_running():
        await apply(api, VALID_MANIFEST | {"metadata": {"name": "feed-ligr", "namespace": NS}})
        await drive_to_serving(api, cluster, "v1")
        await edit_spec(api, "feed-ligr", {"model": {"historyLength": 128}})
        await eventually(lambda: "feed-ligr-v2-preprocess" in live(cluster, RAYJOBS), "v2 preprocess RayJob")
        body = model(cluster)
        assert body["metadata"]["generation"] == 2 and body["status"]["candidateVersion"]["name"] == "v2"
        assert (
            body["status"]["currentVersion"]["name"] == "v1" and condition(body, "Ready")["status"] == "True"
        )
        service = live(cluster, RAYSERVICES)["feed-ligr"]
        assert service["metadata"]["labels"]["rankray.io/version"] == "v1"
        assert (
            "artifact_uri: /mnt/pvc/rankray-artifacts/models/feed-ligr/v1\n"
            in service["spec"]["serveConfigV2"]
        )

        await drive_to_serving(api, cluster, "v2")
        body = model(cluster)
        assert body["status"]["phase"] == "Serving" and body["status"]["observedGeneration"] == 2
        config = yaml.safe_load(live(cluster, RAYSERVICES)["feed-ligr"]["spec"]["serveConfigV2"])
        assert config["applications"][0]["args"]["artifact_uri"].endswith("/feed-ligr/v2")
        await eventually(
            lambda: (
                set(live(cluster, RAYJOBS))
                == {f"feed-ligr-v2-{s}" for s in ("preprocess", "train", "evaluate")}
            ),
            "v1's RayJobs to be cleaned up",
        )
        assert creations(cluster, RAYSERVICES) == ["feed-ligr"], (
            "an upgrade patches the RayService, never recreates"
        )


async def test_a_failed_rayjob_surfaces_as_a_failed_condition_with_its_reason(
    cluster: ApiServer, api: httpx.AsyncClient
) -> None:
    async with operator_running():
        await apply(api, VALID_MANIFEST | {"metadata": {"name": "feed-ligr", "namespace": NS}})
        await eventually(lambda: "feed-ligr-v1-preprocess" in live(cluster, RAYJOBS), "preprocess RayJob")
        await set_status(
            api,
            RAYJOBS,
            "feed-ligr-v1-preprocess",
            {
                "jobDeploymentStatus": "Failed",
                "jobStatus": "FAILED",
                "reason": "AppFailed",
                "message": "Job entrypoint command failed with exit code 2",
            },
        )
        body = await eventually(
            lambda: model(cluster)["status"]["phase"] == "Failed" and model(cluster), "Failed"
        )
        failed = condition(body, "Failed")
        assert (failed["status"], failed["reason"]) == ("True", "PreprocessFailed")
        assert failed["message"] == (
            "RayJob feed-ligr-v1-preprocess failed: AppFailed: Job entrypoint command failed with exit code 2"
        )
        warnings = await eventually(
            lambda: [e for e in live(cluster, EVENTS).values() if e.get("reason") == "PreprocessFailed"],
            "a PreprocessFailed event",
        )
        assert warnings[0]["type"] == "Warning"
        await asyncio.sleep(4 * handlers.SYNC_INTERVAL_SECONDS)
        assert set(live(cluster, RAYJOBS)) == {"feed-ligr-v1-preprocess"}, "no stage after a failed one"


async def test_suspend_suspends_the_running_rayjob_and_resume_releases_it(
    cluster: ApiServer, api: httpx.AsyncClient
) -> None:
    async with operator_running():
        await apply(api, VALID_MANIFEST | {"metadata": {"name": "feed-ligr", "namespace": NS}})
        await eventually(lambda: "feed-ligr-v1-preprocess" in live(cluster, RAYJOBS), "preprocess RayJob")
        await set_status(api, RAYJOBS, "feed-ligr-v1-preprocess", {"jobDeploymentStatus": "Running"})
        await edit_spec(api, "feed-ligr", {"suspend": True})
        await eventually(
            lambda: live(cluster, RAYJOBS)["feed-ligr-v1-preprocess"]["spec"]["suspend"] is True,
            "RayJob suspended",
        )
        await eventually(lambda: model(cluster)["status"]["phase"] == "Suspended", "phase Suspended")
        assert condition(model(cluster), "Suspended")["status"] == "True"
        await set_status(api, RAYJOBS, "feed-ligr-v1-preprocess", {"jobDeploymentStatus": "Suspended"})
        await edit_spec(api, "feed-ligr", {"suspend": False})
        await eventually(
            lambda: live(cluster, RAYJOBS)["feed-ligr-v1-preprocess"]["spec"]["suspend"] is False,
            "RayJob resumed",
        )
        await eventually(lambda: model(cluster)["status"]["phase"] == "Preprocessing", "phase Preprocessing")
    assert creations(cluster, RAYJOBS) == ["feed-ligr-v1-preprocess"], "suspending is not a new version"


async def test_a_manifest_the_operator_rejects_gets_a_condition_naming_the_field_and_no_children(
    cluster: ApiServer, api: httpx.AsyncClient
) -> None:
    """kmock skips admission (no schema, no CEL), as would a cluster whose CRD is out of date: the operator's
    own check still refuses the manifest field by field."""
    manifest = VALID_MANIFEST | {"metadata": {"name": "feed-ligr", "namespace": NS}}
    manifest["spec"] = {**manifest["spec"], "serving": {"setwiseTopK": 50, "candidatesLimit": 20}}
    async with operator_running():
        await apply(api, manifest)
        body = await eventually(
            lambda: model(cluster).get("status", {}).get("phase") == "Failed" and model(cluster), "Failed"
        )
        failed = condition(body, "Failed")
        assert failed["reason"] == "ValidationFailed"
        assert failed["message"].startswith("spec.serving.setwiseTopK: ")
        await asyncio.sleep(4 * handlers.SYNC_INTERVAL_SECONDS)
    assert live(cluster, RAYJOBS) == {} and live(cluster, RAYSERVICES) == {}
