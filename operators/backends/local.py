"""The local backend: the KubeRay backend's children on one Ray cluster, through Ray's own REST APIs.

A stage RayJob becomes a Ray job submitted with the Job Submission API (`JobSubmissionClient`), with the
same entrypoint and runtime env, and the RayJob's name as its submission id: a restarted `rankray run` asks
Ray for that id and finds the job instead of starting another. The RayService becomes the cluster's Serve
applications, deployed with the same serve config through the dashboard's Serve REST API
(`PUT /api/serve/applications/`), which is what KubeRay calls to deploy a RayService's serveConfigV2.
Like a RayService owns its Ray cluster, this backend owns the Serve applications of its cluster.

What Kubernetes would keep in etcd is kept in a state file (`LocalState`): the model's status, and a record
per submitted job. A finished job's record (state, message, summary) answers for it even after its Ray
cluster is gone, as a RayJob object outlives its cluster; an unfinished job that its cluster no longer
knows is reported as absent, so the reconciler submits it again under the same name.

Storage URIs resolve through mounts (`LocalStorage`), the laptop's counterpart of the pods' volume mounts.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
from pydantic import BaseModel, Field
from ray.job_submission import JobDetails, JobStatus, JobSubmissionClient

from operators.api.v1alpha1 import RankingModel, RankingModelStatus, RejectedModel
from operators.pipeline import (
    SERVE_APP_NAME,
    Stage,
    entrypoint,
    last_json_line,
    runtime_env,
    serve_config,
    service_name,
    stage_config,
)
from operators.reconcile import (
    ChildRef,
    JobState,
    Observed,
    ObservedJob,
    ObservedService,
    Plan,
    ServingApp,
    StageJob,
)

# Ray job metadata: the labels the KubeRay backend puts on a RayJob.
MODEL_KEY = "rankray.io/model"
VERSION_KEY = "rankray.io/version"
STAGE_KEY = "rankray.io/stage"
SERVE_PATH = "/api/serve/applications/"
MAX_MESSAGE_CHARS = 1000  # a condition message quotes the end of a failure, not a 20,000-character log
_ERROR_LINE = re.compile(r"\b(\w*Error|\w*Exception|errors?|invalid)\b")


class ChildConflictError(RuntimeError):
    """A child's name is taken on the Ray cluster by something this RankingModel did not create."""


class StorageError(ValueError):
    """A storage URI of the spec has no folder on this machine."""


# --- Storage ------------------------------------------------------------------------------------------------


class LocalStorage:
    """Maps spec storage URIs to local paths: the mounted prefixes, else absolute paths as they are."""

    def __init__(self, mounts: Mapping[str, str | Path] | None = None) -> None:
        # longest prefix first, so pvc://data/world wins over pvc://data
        self.mounts = dict(
            sorted(((k.rstrip("/"), Path(v)) for k, v in (mounts or {}).items()), reverse=True)
        )

    def resolve(self, uri: str) -> str:
        if uri.startswith("file://"):
            uri = uri.removeprefix("file://")
        for prefix, folder in self.mounts.items():
            if uri == prefix or uri.startswith(prefix + "/"):
                return str((folder / uri[len(prefix) :].lstrip("/")).resolve())
        if uri.startswith("pvc://"):
            claim = uri.removeprefix("pvc://").split("/", 1)[0]
            raise StorageError(
                f"{uri}: no local folder is mounted for PersistentVolumeClaim {claim!r}; "
                f"pass --mount pvc://{claim}=DIR"
            )
        return uri  # an absolute path, or an object-store URI the workloads read directly


# --- What the backend keeps between runs ----------------------------------------------------------------


class JobRecord(BaseModel):
    """A submitted stage job as the backend remembers it: the counterpart of a RayJob object."""

    name: str
    stage: Stage
    version: str
    state: JobState = JobState.PENDING
    suspended: bool = False  # stopped for spec.suspend; resubmitted when it is lifted
    reason: str = ""
    message: str = ""
    summary: dict[str, Any] | None = None
    summary_error: str = ""
    started_at: datetime | None = None
    ended_at: datetime | None = None

    def observed(self) -> ObservedJob:
        state = JobState.SUSPENDED if self.suspended and not self.state.finished else self.state
        return ObservedJob(
            self.name,
            state,
            self.reason,
            self.message,
            suspend=self.suspended,
            summary=self.summary,
            summary_error=self.summary_error,
        )


class ServiceRecord(BaseModel):
    """The serving app as last deployed: the digest it stands for and the app config that was sent."""

    name: str
    digest: str
    version: str
    application: dict[str, Any]


class LocalState(BaseModel):
    """The state file of one model: what a cluster's API server would hold for it."""

    generation: int = Field(1, ge=1, description="bumped whenever the manifest's spec changes")
    spec: dict[str, Any] = Field(default_factory=dict, description="the spec of that generation")
    status: RankingModelStatus = Field(default_factory=RankingModelStatus)
    jobs: dict[str, JobRecord] = Field(default_factory=dict)
    service: ServiceRecord | None = None


class StateFile:
    """A `LocalState` in memory, written atomically to its file after every change."""

    def __init__(self, path: Path, state: LocalState | None = None) -> None:
        self.path = path
        self.state = state if state is not None else self.load(path) or LocalState()

    @staticmethod
    def load(path: Path) -> LocalState | None:
        if not path.exists():
            return None
        return LocalState.model_validate_json(path.read_text())

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(self.state.model_dump_json(indent=2, by_alias=True) + "\n")
        tmp.replace(self.path)  # a crash leaves the previous state, never half of one


# --- Reading Ray's answers ----------------------------------------------------------------------------------


def _time(ms: int | None) -> datetime | None:
    return None if ms is None else datetime.fromtimestamp(ms / 1000, tz=UTC)


def _shorten(text: str) -> str:
    """The end of a long message (where a traceback says what went wrong), on one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    joined = " | ".join(lines)
    return joined if len(joined) <= MAX_MESSAGE_CHARS else "..." + joined[-MAX_MESSAGE_CHARS:]


def failure_message(message: str) -> str:
    """Ray's failure message, with the log it quotes cut to the error: from the last line that names one
    (a traceback's exception, pydantic's "N validation errors for Config") to the end."""
    headline, _, logs = (message or "").partition("last available logs")
    headline = headline.strip().rstrip(",:").strip()
    lines = [line.strip() for line in logs.splitlines()[1:] if line.strip()]
    lines = [line for line in lines if not line.startswith("For further information visit")]
    named = [index for index, line in enumerate(lines) if _ERROR_LINE.search(line)]
    tail = lines[named[-1] :] if named else lines[-3:]
    text = ": ".join(part for part in (headline, " | ".join(tail)) if part)
    return text if len(text) <= MAX_MESSAGE_CHARS else text[:MAX_MESSAGE_CHARS] + "..."


def _normalized(value: Any) -> Any:
    """JSON as Serve echoes it back: numbers as floats (1 and 1.0 are the same setting)."""
    if isinstance(value, dict):
        return {key: _normalized(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_normalized(item) for item in value]
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    return value


def _endpoint(http_options: Mapping[str, Any], route_prefix: str) -> str:
    host = http_options.get("host") or "127.0.0.1"
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host
    return f"http://{host}:{http_options.get('port', 8000)}{route_prefix}"


# --- The backend --------------------------------------------------------------------------------------------


class LocalBackend:
    """Observes and applies through one Ray cluster's dashboard; see `operators.backends.Backend`."""

    def __init__(
        self,
        dashboard_url: str,
        state: StateFile,
        storage: LocalStorage | None = None,
        serve_host: str = "127.0.0.1",
        serve_port: int = 8000,
        http: httpx.AsyncClient | None = None,
    ) -> None:
        self.dashboard_url = dashboard_url.rstrip("/")
        self.state_file = state
        self.storage = storage or LocalStorage()
        self.http_options = {"host": serve_host, "port": serve_port}
        self.http = http or httpx.AsyncClient(base_url=self.dashboard_url, timeout=60.0)
        self._client: JobSubmissionClient | None = None

    @property
    def state(self) -> LocalState:
        return self.state_file.state

    async def _jobs(self, method: Callable[[JobSubmissionClient], Any]) -> Any:
        """One Job Submission API call (the SDK blocks: run it in a thread)."""

        def call() -> Any:
            if self._client is None:
                self._client = JobSubmissionClient(self.dashboard_url)
            return method(self._client)

        return await asyncio.to_thread(call)

    # --- observe ---

    async def observe(self, model: RankingModel | RejectedModel) -> Observed:
        name, now = model.metadata.name, datetime.now(UTC)
        listed: list[JobDetails] = await self._jobs(lambda client: client.list_jobs())
        on_ray = {
            job.submission_id: job
            for job in listed
            if job.submission_id and (job.metadata or {}).get(MODEL_KEY) == name
        }
        changed = False
        for job_id, details in on_ray.items():
            if job_id not in self.state.jobs:  # the state file was lost, the cluster was not: adopt it
                meta = details.metadata or {}
                self.state.jobs[job_id] = JobRecord(
                    name=job_id, stage=Stage(meta[STAGE_KEY]), version=meta[VERSION_KEY]
                )
                changed = True
        jobs: dict[str, ObservedJob] = {}
        for job_id, record in list(self.state.jobs.items()):
            if not record.state.finished:
                seen = on_ray.get(job_id)
                if seen is None:  # submitted to a Ray cluster that is gone: as if never submitted
                    del self.state.jobs[job_id]
                    changed = True
                    continue
                changed |= await self._refresh(record, seen)
            jobs[job_id] = record.observed()
        service = await self._observe_service(model)
        if changed:
            self.state_file.save()
        return Observed(now=now, jobs=jobs, service=service)

    async def _refresh(self, record: JobRecord, details: JobDetails) -> bool:
        """Fold Ray's view of a running job into its record; read the summary once it succeeded."""
        before = record.model_copy()
        status = JobStatus(details.status)
        record.started_at = _time(details.start_time)
        record.ended_at = _time(details.end_time)
        if status is JobStatus.SUCCEEDED:
            record.state, record.reason, record.message = JobState.SUCCEEDED, "", details.message or ""
            logs = await self.job_logs(record.name)
            record.summary = last_json_line(logs)
            record.summary_error = "" if record.summary else "its output has no JSON summary line"
        elif status is JobStatus.FAILED:
            record.state = JobState.FAILED
            record.reason = str(details.error_type or "Failed")
            record.message = failure_message(details.message or "")
        elif status is JobStatus.STOPPED and not record.suspended:
            record.state, record.reason = JobState.FAILED, "Stopped"
            record.message = _shorten(details.message or "the job was stopped")
        elif status is JobStatus.RUNNING:
            record.state = JobState.RUNNING
        elif status is JobStatus.PENDING:
            record.state = JobState.PENDING
        return record != before

    async def _observe_service(self, model: RankingModel | RejectedModel) -> ObservedService | None:
        details = await self._serve_details()
        application = (details.get("applications") or {}).get(SERVE_APP_NAME)
        if application is None:
            return None
        deployed = application.get("deployed_app_config") or {}
        owner = (deployed.get("args") or {}).get("model_name")
        if owner != model.metadata.name:
            raise ChildConflictError(
                f"Serve application {SERVE_APP_NAME!r} on {self.dashboard_url} serves "
                f"{owner or 'something else'}, not RankingModel {model.metadata.name}"
            )
        record = self.state.service
        same = record is not None and _normalized(record.application) == _normalized(deployed)
        status = application.get("status")
        return ObservedService(
            name=service_name(model.metadata.name),
            digest=record.digest if record is not None and same else "",
            ready=status == "RUNNING",
            failed=status == "DEPLOY_FAILED",
            message=_shorten(application.get("message") or ""),
            endpoint=_endpoint(details.get("http_options") or {}, application.get("route_prefix") or "/"),
        )

    async def _serve_details(self) -> dict[str, Any]:
        response = await self.http.get(SERVE_PATH)
        response.raise_for_status()
        details: dict[str, Any] = response.json()
        return details

    async def job_logs(self, name: str) -> str:
        """Everything the job printed so far (the driver streams its tail; the summary is its last line)."""
        logs: str = await self._jobs(lambda client: client.get_job_logs(name))
        return logs

    # --- apply ---

    async def apply(self, model: RankingModel | RejectedModel, plan: Plan) -> None:
        if plan.status != self.state.status:
            self.state.status = plan.status.model_copy(deep=True)
            self.state_file.save()
        if isinstance(model, RankingModel):
            for child in plan.create:
                await (
                    self._submit(model, child) if isinstance(child, StageJob) else self._deploy(model, child)
                )
            for child in plan.update:
                await (
                    self._suspend(model, child) if isinstance(child, StageJob) else self._deploy(model, child)
                )
        for ref in plan.delete:
            await self._delete(ref)

    async def _submit(self, model: RankingModel, job: StageJob) -> None:
        """Record the job, then submit it; a job already there under its name is the one we submitted."""
        self.state.jobs[job.name] = JobRecord(name=job.name, stage=job.stage, version=job.version.name)
        self.state_file.save()
        name = model.metadata.name
        config = stage_config(model.spec, name, job.stage, job.version, job.reference, self.storage.resolve)
        metadata = {MODEL_KEY: name, VERSION_KEY: job.version.name, STAGE_KEY: job.stage.value}
        try:
            await self._jobs(
                lambda client: client.submit_job(
                    entrypoint=entrypoint(job.version.kind, job.stage, config),
                    submission_id=job.name,
                    runtime_env=runtime_env(name, job.version, job.stage),
                    metadata=metadata,
                )
            )
        except RuntimeError as err:
            if "already exists" not in str(err):
                raise
            existing: JobDetails = await self._jobs(lambda client: client.get_job_info(job.name))
            if (existing.metadata or {}).get(MODEL_KEY) != name:
                raise ChildConflictError(
                    f"Ray job {job.name} exists on {self.dashboard_url} and was not submitted for "
                    f"RankingModel {name}"
                ) from err

    async def _suspend(self, model: RankingModel, job: StageJob) -> None:
        """Ray jobs cannot pause: suspending stops the job, resuming submits it again under its name."""
        record = self.state.jobs.get(job.name)
        if record is None or record.state.finished:
            return
        if job.suspend and not record.suspended:
            record.suspended = True
            self.state_file.save()
            await self._jobs(lambda client: client.stop_job(job.name))
        elif not job.suspend and record.suspended:
            details: JobDetails = await self._jobs(lambda client: client.get_job_info(job.name))
            if not JobStatus(details.status).is_terminal():
                return  # still stopping: resubmit on a later pass
            await self._jobs(lambda client: client.delete_job(job.name))
            await self._submit(model, job)

    async def _deploy(self, model: RankingModel, app: ServingApp) -> None:
        """PUT the serve config the RayService would carry; only where this machine listens differs."""
        config = serve_config(model.metadata.name, app.version, app.serving, self.storage.resolve)
        config["http_options"] = dict(self.http_options)
        (application,) = config["applications"]
        self.state.service = ServiceRecord(
            name=app.name, digest=app.digest, version=app.version.name, application=application
        )
        self.state_file.save()
        response = await self.http.put(SERVE_PATH, json=config)
        _raise_for_status(response, f"deploying {app.name} ({app.version.name})")

    async def _delete(self, ref: ChildRef) -> None:
        if ref.kind == "RayService":
            self.state.service = None
            self.state_file.save()
            serve = await self._serve_details()
            if SERVE_APP_NAME in (serve.get("applications") or {}):
                response = await self.http.delete(SERVE_PATH)
                _raise_for_status(response, f"deleting {ref.name}")
            return
        if self.state.jobs.pop(ref.name, None) is not None:
            self.state_file.save()
        try:
            details: JobDetails = await self._jobs(lambda client: client.get_job_info(ref.name))
        except RuntimeError as err:
            if "404" in str(err):  # its cluster is gone: nothing left to remove
                return
            raise
        if JobStatus(details.status).is_terminal():
            await self._jobs(lambda client: client.delete_job(ref.name))
        else:  # stopping takes a moment: the next pass sees it stopped and deletes it
            await self._jobs(lambda client: client.stop_job(ref.name))

    async def close(self) -> None:
        await self.http.aclose()


def _raise_for_status(response: httpx.Response, doing: str) -> None:
    if response.is_error:
        raise RuntimeError(
            f"{doing}: Serve REST API answered {response.status_code}: {_shorten(response.text)}"
        )
