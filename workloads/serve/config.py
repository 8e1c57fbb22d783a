"""The serve config of the ranking graph: rendered from `GraphArgs`, deployed locally or by KubeRay.

``serve_config(args)`` returns the dict Ray calls a ``ServeDeploySchema``: the shape of KubeRay's
RayService ``serveConfigV2`` and of ``serve deploy``/``serve run CONFIG``::

    applications:
    - name: ranking
      route_prefix: /
      import_path: workloads.serve.graph:build_app
      args: {artifact_uri: ..., feature_repo: ..., setwise_top_k: 10, ...}   # GraphArgs
      deployments:                                                          # per-deployment options
      - {name: PointwiseScorer, num_replicas: 1, max_ongoing_requests: 64, ray_actor_options: {num_cpus: 1}}
      - ...

``deploy(config)`` puts that same dict on the local Ray cluster the way ``serve run CONFIG`` does
(Serve's controller builds the app from ``import_path`` and ``args`` and applies the deployment
options), so a local run and the cluster run cannot drift apart.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, PositiveInt, model_validator
from ray import serve
from ray.serve.schema import ServeDeploySchema

from workloads.serve.graph import GraphArgs, deployment_names

APP_NAME = "ranking"
IMPORT_PATH = "workloads.serve.graph:build_app"


class DeploymentOptions(BaseModel):
    """Options of one deployment in the config (Ray's ``DeploymentSchema``, the fields rankray sets)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: PositiveInt | None = 1
    autoscaling_config: dict[str, Any] | None = Field(
        None, description="min_replicas, max_replicas, target_ongoing_requests, ... (instead of num_replicas)"
    )
    max_ongoing_requests: PositiveInt = 64
    ray_actor_options: dict[str, Any] = Field(default_factory=lambda: {"num_cpus": 1})

    @model_validator(mode="after")
    def _replicas_or_autoscaling(self) -> DeploymentOptions:
        if self.autoscaling_config is not None:
            self.num_replicas = None  # Ray rejects both; autoscaling wins
        return self


def default_options(deployment: str) -> DeploymentOptions:
    """A deployment's options as its ``@serve.deployment`` decorator sets them (the one place they live).

    The decorators carry them so that a config which lists only some deployments (the operator's lists
    just the scorer) still gets sensible values for the rest: the scorer holds a CPU, the ingress and the
    fetcher mostly wait on I/O, the set-wise pass is tiny (1.75 CPUs in all without the LLM, which fits a
    2-core laptop), and max_ongoing_requests is above the batch sizes so @serve.batch can fill.
    """
    from workloads.serve.features import FeatureFetcher
    from workloads.serve.ingress import RankIngress
    from workloads.serve.scorer import PointwiseScorer
    from workloads.serve.setwise import SetwiseReranker

    known: dict[str, Any] = {
        "RankIngress": RankIngress,
        "FeatureFetcher": FeatureFetcher,
        "PointwiseScorer": PointwiseScorer,
        "SetwiseReranker": SetwiseReranker,
    }
    if deployment == "BrewScorer":
        from workloads.serve.graph import brew_deployment

        known[deployment] = brew_deployment()
    d = known[deployment]
    return DeploymentOptions(
        num_replicas=d.num_replicas,
        max_ongoing_requests=d.max_ongoing_requests,
        ray_actor_options=d.ray_actor_options,
    )


def serve_config(
    args: GraphArgs,
    *,
    name: str = APP_NAME,
    route_prefix: str = "/",
    deployments: Mapping[str, DeploymentOptions | Mapping[str, Any]] | None = None,
    http_host: str = "0.0.0.0",
    http_port: int = 8000,
    request_timeout_s: float | None = 30.0,
    runtime_env: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The serve config dict for ``args``; ``deployments`` overrides the defaults per deployment name.

    Only deployments the graph has are listed (Ray rejects options for one it does not have), so the
    set-wise reranker and the LLM scorer appear only when ``args`` enable them.
    """
    names = deployment_names(args)
    overrides = dict(deployments or {})
    unknown = sorted(set(overrides) - set(names))
    if unknown:
        raise ValueError(f"deployments: {unknown} are not in this graph; it has {names}")
    listed = []
    for deployment in names:
        given = overrides.get(deployment)
        options = default_options(deployment) if given is None else DeploymentOptions.model_validate(given)
        listed.append({"name": deployment, **options.model_dump(exclude_none=True)})
    http_options: dict[str, Any] = {"host": http_host, "port": http_port}
    if request_timeout_s is not None:
        http_options["request_timeout_s"] = request_timeout_s
    config = {
        "proxy_location": "EveryNode",
        "http_options": http_options,
        "applications": [
            {
                "name": name,
                "route_prefix": route_prefix,
                "import_path": IMPORT_PATH,
                "runtime_env": dict(runtime_env or {}),
                "args": args.model_dump(mode="json", exclude_none=True),
                "deployments": listed,
            }
        ],
    }
    ServeDeploySchema.model_validate(config)  # a malformed config fails here, not on the cluster
    return config


def to_yaml(config: Mapping[str, Any]) -> str:
    """YAML for ``python -m workloads.serve --config`` or a RayService's ``serveConfigV2``."""
    return yaml.safe_dump(dict(config), sort_keys=False)


def load_config(path: str | Path) -> dict[str, Any]:
    """Read a YAML (or JSON) serve config and check its shape and every ranking application's args."""
    raw = yaml.safe_load(Path(path).read_text())
    return validate_config(raw)


def validate_config(raw: Any) -> dict[str, Any]:
    schema = ServeDeploySchema.model_validate(raw)
    for app in schema.applications:
        if app.import_path == IMPORT_PATH:
            GraphArgs.model_validate(app.args)  # the builder would reject them on the cluster anyway
    return dict(raw)


def deploy(config: Mapping[str, Any], timeout_s: float = 300.0) -> None:
    """Deploy a serve config on the connected Ray cluster and wait until its applications run.

    This is what ``serve run CONFIG`` does (ray.serve.scripts): start Serve with the config's HTTP
    options, hand the whole config to the Serve controller, which builds every application from its
    ``import_path`` and ``args`` and applies the per-deployment options. Deploying again with a
    changed config (a new ``artifact_uri``) updates the running applications in place. Ray has no
    public Python call for this step (``serve deploy`` goes through the dashboard's REST API), so the
    controller client is reached the way the CLI reaches it.
    """
    schema = ServeDeploySchema.model_validate(validate_config(config))
    serve.start(proxy_location=schema.proxy_location, http_options=schema.http_options.model_dump())
    from ray.serve.context import _get_global_client

    client = _get_global_client()
    assert client is not None  # serve.start above started the controller or found it
    submitted = time.time()
    client.deploy_apps(schema)
    _wait_running([app.name for app in schema.applications], submitted, timeout_s)
    client.wait_for_proxies_serving(wait_for_applications_running=True)


def _wait_running(names: list[str], submitted: float, timeout_s: float) -> None:
    """Poll ``serve.status()`` until every named application runs a deploy no older than ``submitted``."""
    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        pending = []
        for name in names:
            app = apps.get(name)
            if (
                app is not None
                and app.status == "DEPLOY_FAILED"
                and app.last_deployed_time_s >= submitted - 1
            ):
                raise RuntimeError(f"serve application {name!r} failed to deploy: {app.message}")
            if app is None or app.status != "RUNNING" or app.last_deployed_time_s < submitted - 1:
                pending.append(name)
        if not pending:
            return
        if time.monotonic() > deadline:
            states = {n: (apps[n].status, apps[n].message) if n in apps else "absent" for n in pending}
            raise TimeoutError(f"serve applications not running after {timeout_s:.0f}s: {states}")
        time.sleep(0.5)
