"""`rankray run -f FILE`: the operator's loop on a laptop, from a manifest to a served endpoint.

The same `reconcile` the kopf handlers run drives the local backend (`operators.backends.local`) on an
embedded Ray head (or a cluster given with --ray-address): observe, reconcile, apply, every couple of
seconds, until the model serves or fails. Where Kubernetes would hold the object, a state file next to the
model's outputs holds its generation, spec and status, so running the command again continues where the
last run stopped, without starting a job twice (jobs are named deterministically, and finished ones are
remembered). A changed spec is a new generation, as `kubectl apply` makes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import socket
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

import httpx
import pyarrow.compute as pc
import pyarrow.parquet as pq
import requests
import yaml

from operators.api.v1alpha1 import ConditionType, ObjectMeta, Phase, RankingModel
from operators.backends.local import (
    ChildConflictError,
    JobRecord,
    LocalBackend,
    LocalStorage,
    StateFile,
    StorageError,
)
from operators.embedded_ray import EmbeddedRay, EmbeddedRayError, free_port
from operators.pipeline import SERVE_PORT, Stage
from operators.reconcile import JobState, Observed, Plan, reconcile
from operators.validate import admit, validate_manifest
from workloads.data.schema import data_root

STATE_FILE = "rankray-run.json"
CLUSTER_FILE = "ray-cluster.json"
SETTLED = (Phase.SERVING, Phase.FAILED, Phase.SUSPENDED)  # nothing more happens without a spec change
TRANSIENT_GRACE_SECONDS = 90.0  # how long the cluster may keep failing to answer before the run gives up
LOG_LINES_PER_POLL = 200
LOG_LINE_CHARS = 240
PROGRESS_EVERY_SECONDS = 10.0
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
# a progress bar redrawn as log lines, e.g. "Reading: 40%|####  | 2/5 [00:03<00:04, 1.2 file/s]"
_PROGRESS_BAR = re.compile(r"^(?P<label>[^:]*):.*\[\d+:\d\d(:\d\d)?(<|,)")


def default_mounts() -> dict[str, Path]:
    """The examples' storage on a laptop: their claims live under the data root, the image's /opt/rankray
    (the Dockerfile's WORKDIR, where the Feast repo is copied) is the current folder.

    `rankray data synth` writes <data root>/world, which the examples read as pvc://rankray-data/world.
    """
    root = data_root()
    return {
        "pvc://rankray-data": root,
        "pvc://rankray-artifacts": root / "artifacts",
        "/opt/rankray": Path.cwd(),
    }


class ManifestError(ValueError):
    """The manifest would be rejected by the cluster or the operator; the message names each field."""


class RunFailed(RuntimeError):
    """The run gave up: it timed out, the cluster stopped answering, or the endpoint answered an error."""


@dataclass
class RunOptions:
    manifest: Path
    ray_address: str | None = None  # a running cluster's dashboard URL; None starts an embedded head
    keep: bool = False
    timeout: float | None = None
    retry: bool = False
    mounts: dict[str, Path] = field(default_factory=default_mounts)
    num_cpus: int = 4  # logical: Serve's proxy and controller, the replicas and a stage's workers need slots
    object_store_bytes: int = 2 * 1024**3
    serve_port: int = SERVE_PORT
    poll_seconds: float = 2.0
    sample: bool = True
    delete: bool = False  # tear the model's jobs and Serve applications down instead, and forget its state


# --- The manifest and its state -----------------------------------------------------------------------------


def load_manifest(path: Path) -> RankingModel:
    """One RankingModel from a file, checked exactly as `rankray validate` checks it."""
    try:
        documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
    except yaml.YAMLError as err:
        raise ManifestError(f"{path}: not valid YAML: {err}") from err
    if len(documents) != 1:
        raise ManifestError(f"{path}: expected one RankingModel, found {len(documents)} documents")
    problems = validate_manifest(documents[0])
    if problems:
        raise ManifestError("\n".join(f"{path}: {problem}" for problem in problems))
    model = admit(documents[0])
    if not isinstance(model, RankingModel):  # validate_manifest covers what admit checks
        raise ManifestError("\n".join(f"{path}: {problem}" for problem in model.problems))
    return model


def check_local_paths(model: RankingModel, storage: LocalStorage) -> None:
    """Fail before any job starts when what the stages read does not exist on this machine."""
    spec = model.spec
    try:
        world = Path(storage.resolve(spec.data.source))
        repo = Path(storage.resolve(spec.feature_repo.path))
        storage.resolve(spec.artifact_root)
    except StorageError as err:
        raise ManifestError(str(err)) from err
    if not (world / "impressions.parquet").exists():
        raise ManifestError(
            f"spec.data.source: {spec.data.source} is {world} here, which has no impressions.parquet "
            "(run `rankray data synth`)"
        )
    if not (repo / "feature_store.yaml").exists():
        raise ManifestError(
            f"spec.featureRepo.path: {spec.feature_repo.path} is {repo} here, which has no feature_store.yaml"
        )


def state_dir(model: RankingModel, storage: LocalStorage) -> Path:
    """ARTIFACT_ROOT/MODEL: the state file sits next to the versions it describes."""
    return Path(storage.resolve(model.spec.artifact_root)) / model.metadata.name


def open_state(model: RankingModel, path: Path, retry: bool) -> StateFile:
    """The model's state file; a spec unlike the recorded one is the next generation, as in Kubernetes."""
    state = StateFile(path)
    spec = model.spec.model_dump(mode="json", by_alias=True)
    if state.state.spec != spec:
        if state.state.spec:
            state.state.generation += 1
        state.state.spec = spec
    if retry:  # as `kubectl delete rayjob`: the reconciler then runs the stage again
        for name in [n for n, job in state.state.jobs.items() if job.state is JobState.FAILED]:
            del state.state.jobs[name]
    state.save()
    return state


def as_model(model: RankingModel, state: StateFile, deleting: bool = False) -> RankingModel:
    """The object as the API server would hand it to the operator now (being deleted, with `deleting`)."""
    metadata = ObjectMeta(
        name=model.metadata.name,
        namespace=model.metadata.namespace,
        generation=state.state.generation,
        deletionTimestamp=datetime.now(UTC).isoformat() if deleting else None,
    )
    return RankingModel(metadata=metadata, spec=model.spec, status=state.state.status)


# --- Progress -----------------------------------------------------------------------------------------------


class Reporter:
    """Progress lines with the time since the run started; job log lines prefixed by their stage."""

    def __init__(self, out: TextIO = sys.stdout) -> None:
        self.out = out
        self.started = time.monotonic()
        self.printed: dict[str, int] = {}  # job name -> log lines already shown
        self.done: set[str] = set()
        self.bars: dict[str, float] = {}  # progress bar label -> when it was last shown
        self.deleted: set[tuple[str, str]] = set()

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def line(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    def progress(self, phase: Phase, text: str) -> None:
        self.line(f"[{self.elapsed:7.1f}s] {phase.value:<13} {text}")

    def plan(self, plan: Plan) -> None:
        for event in plan.events:
            self.progress(plan.status.phase, f"{event.reason}: {event.message}")
        for ref in plan.delete:  # a teardown has no events: say what goes, once
            if (ref.kind, ref.name) not in self.deleted:
                self.deleted.add((ref.kind, ref.name))
                self.progress(plan.status.phase, f"Deleting: {ref.kind} {ref.name}")

    def _bar_due(self, text: str) -> bool:
        """A progress bar is shown every PROGRESS_EVERY_SECONDS, and when it completes."""
        bar = _PROGRESS_BAR.match(text)
        if bar is None:
            return True
        now = time.monotonic()
        if (
            "100%" in text
            or now - self.bars.get(bar["label"], -PROGRESS_EVERY_SECONDS) >= PROGRESS_EVERY_SECONDS
        ):
            self.bars[bar["label"]] = now
            return True
        return False

    async def tail(self, backend: LocalBackend, observed: Observed) -> None:
        """Print what running jobs printed since the last poll; a finished job's last lines once."""
        for name, job in sorted(observed.jobs.items()):
            if name in self.done or (job.state.finished and name not in self.printed):
                continue
            try:
                logs = await backend.job_logs(name)
            except (RuntimeError, requests.RequestException):
                continue  # not started yet, or its cluster is gone
            lines = logs.splitlines()
            new = lines[self.printed.get(name, 0) :]
            self.printed[name] = len(lines)
            stage = backend.state.jobs[name].stage.value if name in backend.state.jobs else name
            readable = readable_lines(new)
            skipped = len(readable) - LOG_LINES_PER_POLL
            if skipped > 0:
                self.line(f"{stage:>10} | ... {skipped} lines (see the Ray dashboard)")
                readable = readable[skipped:]
            for text in readable:
                if not self._bar_due(text):
                    continue
                self.line(f"{stage:>10} | {text[:LOG_LINE_CHARS]}")
            if job.state.finished:
                self.done.add(name)


def readable_lines(lines: list[str]) -> list[str]:
    """Log lines without colour codes and blank lines, and only the latest state of each progress bar."""
    texts = [_ANSI.sub("", line.split("\r")[-1]).rstrip() for line in lines]
    texts = [text for text in texts if text]
    latest: dict[str, int] = {}
    for index, text in enumerate(texts):
        if (bar := _PROGRESS_BAR.match(text)) is not None:
            latest[bar["label"]] = index
    bars = set(latest.values())
    return [text for i, text in enumerate(texts) if i in bars or _PROGRESS_BAR.match(text) is None]


# --- The loop -----------------------------------------------------------------------------------------------


async def drive(
    manifest: RankingModel,
    backend: LocalBackend,
    reporter: Reporter,
    timeout: float | None = None,
    poll_seconds: float = 2.0,
    deleting: bool = False,
) -> RankingModel:
    """Observe, reconcile, apply until the model settles (Serving, Failed, Suspended), or with `deleting`
    until none of its children is left; returns the model then."""
    failing_since: float | None = None
    while True:
        model = as_model(manifest, backend.state_file, deleting)
        try:
            observed = await backend.observe(model)
            if deleting and observed.child_count == 0:
                return model
            plan = reconcile(model, observed)
            await backend.apply(model, plan)
        except (ChildConflictError, StorageError):
            raise
        except (httpx.HTTPError, requests.RequestException, RuntimeError) as err:
            failing_since = failing_since or time.monotonic()
            if time.monotonic() - failing_since > TRANSIENT_GRACE_SECONDS:
                raise RunFailed(f"the Ray cluster kept failing to answer: {err}") from err
            reporter.progress(model.status.phase, f"retrying: {type(err).__name__}: {err}")
        else:
            failing_since = None
            reporter.plan(plan)
            if plan.status.phase in SETTLED and not deleting:
                await reporter.tail(backend, observed)
                return as_model(manifest, backend.state_file)
            if not deleting:
                await reporter.tail(backend, observed)
        if timeout is not None and reporter.elapsed > timeout:
            phase = backend.state.status.phase.value
            raise RunFailed(f"timed out after {timeout:.0f} s in phase {phase}")
        await asyncio.sleep(poll_seconds)


def failure_of(model: RankingModel) -> str:
    condition = model.status.condition(ConditionType.FAILED)
    if condition is None:
        return "failed without a Failed condition"
    return f"{condition.reason}: {condition.message}"


# --- Asking the endpoint ------------------------------------------------------------------------------------


def sample_requests(world_dir: Path, surface: str = "feed", k: int = 5) -> list[dict[str, Any]]:
    """Two requests from the world's log: its most active member's last session, and a cold member's."""
    log = pq.read_table(
        world_dir / "impressions.parquet", columns=["member_id", "session_id", "item_id", "surface"]
    )
    log = log.filter(pc.equal(log["surface"], surface))
    counts = log.group_by("member_id").aggregate([("session_id", "count")]).sort_by("session_id_count")
    if counts.num_rows == 0:
        return []
    chosen = {
        "most active member": counts["member_id"][-1].as_py(),
        "least active member": counts["member_id"][0].as_py(),
    }
    requests_: list[dict[str, Any]] = []
    for member in chosen.values():
        rows = log.filter(pc.equal(log["member_id"], member))
        last_session = pc.max(rows["session_id"]).as_py()
        items = rows.filter(pc.equal(rows["session_id"], last_session))["item_id"].to_pylist()
        candidates = list(dict.fromkeys(items))
        requests_.append(
            {"member_id": member, "surface": surface, "candidates": candidates, "k": min(k, len(candidates))}
        )
    return requests_


def ask(endpoint: str, bodies: list[dict[str, Any]], timeout: float = 60.0) -> list[dict[str, Any]]:
    """POST each body to the endpoint's /v1/rank; the answers, in order (errors raise)."""
    answers = []
    with httpx.Client(timeout=timeout) as client:
        for body in bodies:
            response = client.post(endpoint.rstrip("/") + "/v1/rank", json=body)
            if response.is_error:
                raise RunFailed(
                    f"POST {endpoint}v1/rank answered {response.status_code}: {response.text[:500]}"
                )
            answers.append(response.json())
    return answers


def describe_answer(body: Mapping[str, Any], answer: Mapping[str, Any]) -> list[str]:
    """A request and its ranking, a line per ranked item."""
    cold = ", cold start" if answer.get("cold_start") else ""
    events = answer.get("history_len")
    took = (answer.get("timings") or {}).get("total_ms", 0.0)
    lines = [
        f"member {body['member_id']} ({events} history event{'' if events == 1 else 's'}{cold}), "
        f"{len(body['candidates'])} candidates -> top {len(answer.get('items', []))} "
        f"by {answer.get('model')} {answer.get('model_version')} in {took:.1f} ms:"
    ]
    for item in answer.get("items", []):
        probabilities = ", ".join(f"{task} {p:.3f}" for task, p in (item.get("probabilities") or {}).items())
        lines.append(
            f"  {item['rank']:>2}. item {item['item_id']:<8} score {item['score']:.4f}  ({probabilities})"
        )
    return lines


# --- The summary --------------------------------------------------------------------------------------------


def _scalars(summary: Mapping[str, Any], prefix: str = "", depth: int = 2) -> dict[str, Any]:
    """The numbers and names of a stage summary, two levels deep, as dotted keys."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if key in ("config", "window", "preprocess", "history", "path"):
            continue  # inputs echoed back, and per-split folders (the stage's folder is shown)
        if isinstance(value, Mapping) and depth > 1:
            out.update(_scalars(value, f"{prefix}{key}.", depth - 1))
        elif isinstance(value, str | int | float) and not isinstance(value, bool):
            out[f"{prefix}{key}"] = value
    return out


def stage_lines(jobs: Mapping[str, JobRecord], version: str) -> list[str]:
    """Per stage of a version: how long it ran and the headline numbers of its summary."""
    lines = []
    order = {stage: index for index, stage in enumerate(Stage)}
    for record in sorted((j for j in jobs.values() if j.version == version), key=lambda j: order[j.stage]):
        seconds = (
            f"{(record.ended_at - record.started_at).total_seconds():6.1f} s"
            if record.started_at and record.ended_at
            else "      ?"
        )
        facts = ", ".join(
            f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
            for k, v in list(_scalars(record.summary or {}).items())[:10]
        )
        lines.append(f"  {record.stage.value:<10} {seconds}  {record.state.value:<9} {facts}")
    return lines


# --- The command --------------------------------------------------------------------------------------------


def _serve_port(dashboard: str, wanted: int) -> int:
    """The port Serve already listens on in this cluster, else `wanted` if free (0: any), else a free one."""
    try:
        details = httpx.get(dashboard + "/api/serve/applications/", timeout=10).json()
    except (httpx.HTTPError, ValueError):
        details = {}
    if details.get("applications"):
        return int((details.get("http_options") or {}).get("port", wanted))
    if wanted == 0:
        return free_port()
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", wanted))
        except OSError:
            return free_port()
    return wanted


def _connect(options: RunOptions, record: Path, reporter: Reporter) -> tuple[str, EmbeddedRay | None]:
    """The dashboard to work through: --ray-address, the head a crashed run left, or a new head."""
    if options.ray_address:
        address = options.ray_address.rstrip("/")
        return (address if "://" in address else f"http://{address}"), None
    head = EmbeddedRay.reattach(record)
    if head is not None:
        reporter.line(f"rankray run: reattached to the Ray head a previous run left at {head.dashboard_url}")
        return head.dashboard_url, head
    reporter.line(f"rankray run: starting a Ray head with {options.num_cpus} logical CPUs ...")
    head = EmbeddedRay.start(
        num_cpus=options.num_cpus,
        object_store_bytes=options.object_store_bytes,
        cwd=Path.cwd(),
        env={"RANKRAY_DATA_DIR": str(data_root())},
        record=record,
    )
    return head.dashboard_url, head


def run(options: RunOptions, out: TextIO = sys.stdout) -> int:
    """The whole command; returns the exit code (0 serving, 1 failed or timed out, 2 bad manifest)."""
    reporter = Reporter(out)
    storage = LocalStorage(options.mounts)
    try:
        manifest = load_manifest(options.manifest)
        check_local_paths(manifest, storage)
    except ManifestError as err:
        reporter.line(f"rankray run: invalid manifest:\n{err}")
        return 2
    folder = state_dir(manifest, storage)
    try:
        state = open_state(manifest, folder / STATE_FILE, options.retry)
    except ValueError as err:  # not JSON, or not a state this version writes
        reporter.line(f"rankray run: {folder / STATE_FILE} is unreadable; delete it to start over:\n{err}")
        return 2
    record = folder / CLUSTER_FILE
    previous = signal.signal(signal.SIGTERM, _interrupt)  # `kill` and `timeout` clean up as Ctrl-C does
    head: EmbeddedRay | None = None
    try:
        dashboard, head = _connect(options, record, reporter)
        return _run_on(dashboard, head, manifest, state, storage, options, reporter)
    except EmbeddedRayError as err:
        reporter.line(f"rankray run: {err}")
        return 1
    except KeyboardInterrupt:
        reporter.line("rankray run: interrupted; run it again to continue where it stopped")
        return 130
    finally:
        if head is not None:
            reporter.line("rankray run: stopping the Ray head")
            head.stop(record)
        signal.signal(signal.SIGTERM, previous)


def _run_on(
    dashboard: str,
    head: EmbeddedRay | None,
    manifest: RankingModel,
    state: StateFile,
    storage: LocalStorage,
    options: RunOptions,
    reporter: Reporter,
) -> int:
    backend = LocalBackend(dashboard, state, storage, serve_port=_serve_port(dashboard, options.serve_port))
    name = manifest.metadata.name
    reporter.line(
        f"rankray run: {name} generation {state.state.generation}; Ray dashboard {dashboard} "
        f"(jobs, logs, Serve); state file {state.path}"
    )
    try:
        model = asyncio.run(_drive_and_close(manifest, backend, reporter, options))
        if options.delete:
            state.path.unlink(missing_ok=True)
            reporter.line(f"rankray run: deleted {name}: its jobs, its Serve app, its state")
            return 0
        code = report(model, state, storage, options.sample, reporter)
    except (RunFailed, ChildConflictError, StorageError) as err:
        reporter.line(f"rankray run: {err}")
        code = 1
    if options.keep and head is not None:
        reporter.line(f"rankray run: the Ray head stays up ({dashboard}); Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            while True:
                time.sleep(3600)
    return code


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


async def _drive_and_close(
    manifest: RankingModel, backend: LocalBackend, reporter: Reporter, options: RunOptions
) -> RankingModel:
    try:
        return await drive(
            manifest, backend, reporter, options.timeout, options.poll_seconds, deleting=options.delete
        )
    finally:
        await backend.close()


def report(
    model: RankingModel, state: StateFile, storage: LocalStorage, sample: bool, reporter: Reporter
) -> int:
    """The outcome: per-stage times and numbers, the artifact, the gate, and the endpoint's answers."""
    status, name = model.status, model.metadata.name
    version = status.current_version or status.candidate_version
    if version is not None:
        reporter.line(f"\n{name} {version.name}: stage      time    state     summary")
        for text in stage_lines(state.state.jobs, version.name):
            reporter.line(text)
        reporter.line(f"  artifact   {storage.resolve(version.artifact_uri)}")
        gate = status.condition(ConditionType.GATE_PASSED)
        if gate is not None:
            reporter.line(f"  gate       {gate.message}")
    if status.phase is Phase.FAILED:
        reporter.line(f"rankray run: {name} failed: {failure_of(model)}")
        return 1
    if status.phase is Phase.SUSPENDED:
        reporter.line(f"rankray run: {name} is suspended (spec.suspend): nothing runs")
        return 0
    serving = status.current_version.name if status.current_version else "?"
    reporter.line(f"\n{name} serves {serving} at {status.endpoint}")
    if sample and status.endpoint:
        world = Path(storage.resolve(model.spec.data.source))
        bodies = sample_requests(world, model.spec.data.surfaces[0].value)
        for body, answer in zip(bodies, ask(status.endpoint, bodies), strict=True):
            for text in describe_answer(body, answer):
                reporter.line(text)
    return 0
