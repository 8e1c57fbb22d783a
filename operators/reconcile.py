"""The reconciler: one pure function from (the RankingModel, what exists now) to a Plan.

No I/O happens here. A backend observes the children (`Observed`), `reconcile` decides, the backend applies
the `Plan` (status first, so child names are recorded before anything is created; then creates, updates and
deletes; the caller posts the events). Decisions depend only on the spec, the status already recorded and
the observation, never on which event woke the operator, so running it again on the same observation plans
nothing new, and an operator that restarts picks up where the children are.

A version is identified by the spec's pipeline fingerprint: a change to what is trained starts a new candidate
version vGENERATION (serving-only changes roll out to the version serving). The candidate walks the stages
preprocess → train → evaluate, each a job named after (model, generation, stage); the evaluation gate decides
whether it replaces the version serving, which keeps serving until the candidate is deployed and ready.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import ValidationError

from operators.api.v1alpha1 import (
    ChildNames,
    Condition,
    ConditionStatus,
    ConditionType,
    GateMetric,
    GateResult,
    ModelVersion,
    Phase,
    RankingModel,
    RankingModelSpec,
    RankingModelStatus,
    RejectedModel,
    ServingSpec,
    VersionMetrics,
)
from operators.pipeline import (
    STAGE_PHASE,
    EvaluationSummary,
    Stage,
    job_name,
    new_version,
    service_name,
    stages,
)

# --- What the backend observed ------------------------------------------------------------------------------


class JobState(StrEnum):
    PENDING = "Pending"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"

    @property
    def finished(self) -> bool:
        return self in (JobState.SUCCEEDED, JobState.FAILED)


@dataclass(frozen=True)
class ObservedJob:
    """A stage job as the backend sees it (a RayJob, or a job on the embedded Ray cluster)."""

    name: str
    state: JobState
    reason: str = ""
    message: str = ""
    suspend: bool = False  # what the job's own spec asks for
    summary: Mapping[str, Any] | None = None  # last JSON line of its stdout, once it succeeded
    summary_error: str = ""  # set when the summary can no longer be read (e.g. its Ray cluster is gone)


@dataclass(frozen=True)
class ObservedService:
    """The serving deployment as the backend sees it."""

    name: str
    digest: str  # ServingApp.digest it was last applied with
    ready: bool  # serves what that digest describes
    failed: bool = False
    message: str = ""
    endpoint: str | None = None


@dataclass(frozen=True)
class Observed:
    """Every child of one RankingModel that exists now, and when that was seen."""

    now: datetime
    jobs: Mapping[str, ObservedJob] = field(default_factory=dict)  # by name, every generation
    service: ObservedService | None = None

    @property
    def child_count(self) -> int:
        return len(self.jobs) + (self.service is not None)


# --- What the backend should do -----------------------------------------------------------------------------


@dataclass(frozen=True)
class StageJob:
    """One pipeline stage to run for a version. The backend renders it (RayJob, Job Submission)."""

    name: str
    stage: Stage
    version: ModelVersion
    reference: ModelVersion | None  # evaluate: the version serving when the job was planned
    suspend: bool


@dataclass(frozen=True)
class ServingApp:
    """The serving deployment of one version with the spec's serving settings."""

    name: str
    version: ModelVersion
    serving: ServingSpec

    @property
    def digest(self) -> str:
        """Identifies what is deployed: the backend stamps it on the child and reports it back."""
        inputs = {
            "version": self.version.model_dump(mode="json"),
            "serving": self.serving.model_dump(mode="json"),
        }
        return hashlib.sha256(json.dumps(inputs, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class ChildRef:
    kind: Literal["RayJob", "RayService"]
    name: str


@dataclass(frozen=True)
class Event:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


@dataclass(frozen=True)
class Plan:
    """The decision of one reconcile: the status to record and the child changes that follow from it."""

    status: RankingModelStatus
    create: tuple[StageJob | ServingApp, ...] = ()
    update: tuple[StageJob | ServingApp, ...] = ()
    delete: tuple[ChildRef, ...] = ()
    events: tuple[Event, ...] = ()

    @property
    def touches_children(self) -> bool:
        return bool(self.create or self.update or self.delete)


# --- The decision -------------------------------------------------------------------------------------------


def reconcile(model: RankingModel | RejectedModel, observed: Observed) -> Plan:
    """One step toward the spec, decided only from the spec, the recorded status and what exists now."""
    if model.metadata.deletion_timestamp:
        return _teardown(model, observed)
    if isinstance(model, RejectedModel):
        return _reject(model, observed)
    return _Pipeline(model, observed).plan()


def _teardown(model: RankingModel | RejectedModel, observed: Observed) -> Plan:
    """Deleting: every child goes (owner references would do it too; this makes it orderly and visible)."""
    doomed = [ChildRef("RayJob", name) for name in sorted(observed.jobs)]
    if observed.service is not None:
        doomed.append(ChildRef("RayService", observed.service.name))
    return Plan(status=model.status, delete=tuple(doomed))


def _reject(model: RejectedModel, observed: Observed) -> Plan:
    """An invalid spec: say which fields are wrong, create nothing, leave what already runs alone."""
    status = model.status.model_copy(deep=True)
    status.observed_generation = model.metadata.generation
    status.phase = Phase.FAILED
    message = "; ".join(model.problems)
    now, generation = observed.now, model.metadata.generation
    _set(status, ConditionType.FAILED, True, "ValidationFailed", message, now, generation)
    _set(
        status,
        ConditionType.PROGRESSING,
        False,
        "ValidationFailed",
        "fix the spec to start a version",
        now,
        generation,
    )
    return Plan(status=status, events=_transition_events(model.status, status, (), ()))


@dataclass
class _Failure:
    reason: str
    message: str


class _Pipeline:
    """The decision for a valid spec, built in reading order: candidate stages, then serving, then status."""

    def __init__(self, model: RankingModel, observed: Observed) -> None:
        self.spec: RankingModelSpec = model.spec
        self.name = model.metadata.name
        self.generation = model.metadata.generation
        self.old = model.status
        self.status = model.status.model_copy(deep=True)  # never modify the object we were given
        self.observed = observed
        self.create: list[StageJob | ServingApp] = []
        self.update: list[StageJob | ServingApp] = []
        self.failure: _Failure | None = None
        self.stage_running: Stage | None = None
        self.stage_job: str | None = None
        self.deploying = False

    def plan(self) -> Plan:
        self._choose_candidate()
        self._run_stages()
        self._serve()
        self._record()
        keep = {
            job_name(self.name, version.generation, stage)
            for version in (self.status.current_version, self.status.candidate_version)
            if version is not None
            for stage in stages(version.kind)
        }  # finished jobs stay as a record of their version until it is superseded
        delete = tuple(ChildRef("RayJob", name) for name in sorted(set(self.observed.jobs) - keep))
        return Plan(
            status=self.status,
            create=tuple(self.create),
            update=tuple(self.update),
            delete=delete,
            events=_transition_events(self.old, self.status, self.create, self.update),
        )

    def _choose_candidate(self) -> None:
        current, candidate = self.status.current_version, self.status.candidate_version
        fingerprint = self.spec.pipeline_fingerprint()
        if current is not None and current.spec_hash == fingerprint:
            candidate = None  # the spec asks for what already serves: a serving-only change, or a revert
        elif candidate is None or candidate.spec_hash != fingerprint:
            candidate = new_version(self.spec, self.name, self.generation)
        self.status.candidate_version = candidate

    def _run_stages(self) -> None:
        """Walk the candidate's stages in order; stop at the first that is missing, running or failed."""
        candidate = self.status.candidate_version
        if candidate is None or candidate.gate is not None:
            return
        for stage in stages(candidate.kind):
            job = StageJob(
                name=job_name(self.name, candidate.generation, stage),
                stage=stage,
                version=candidate,
                reference=self.status.current_version if stage is Stage.EVALUATE else None,
                suspend=self.spec.suspend,
            )
            seen = self.observed.jobs.get(job.name)
            if seen is None:
                if not self.spec.suspend:
                    self.create.append(job)
                self.stage_running, self.stage_job = stage, job.name
                return
            if seen.suspend != self.spec.suspend and not seen.state.finished:
                self.update.append(job)
            if seen.state is JobState.FAILED:
                detail = ": ".join(part for part in (seen.reason, seen.message) if part) or "no reason given"
                self.failure = _Failure(
                    f"{stage.value.capitalize()}Failed", f"RayJob {job.name} failed: {detail}"
                )
                return
            if seen.state is not JobState.SUCCEEDED:
                self.stage_running, self.stage_job = stage, job.name
                return
        self._judge(candidate, self.observed.jobs[job_name(self.name, candidate.generation, Stage.EVALUATE)])

    def _judge(self, candidate: ModelVersion, evaluation: ObservedJob) -> None:
        """Read the evaluation summary into the candidate's metrics and gate verdict."""
        if evaluation.summary is None:
            if evaluation.summary_error:
                message = (
                    f"RayJob {evaluation.name} succeeded but its result is lost: {evaluation.summary_error}"
                )
                self.failure = _Failure("EvaluationResultUnavailable", message)
            else:  # the backend will read it on a later pass
                self.stage_running, self.stage_job = Stage.EVALUATE, evaluation.name
            return
        try:
            summary = EvaluationSummary.model_validate(evaluation.summary)
        except ValidationError as err:
            fields = ", ".join(".".join(str(p) for p in e["loc"]) + f" ({e['msg']})" for e in err.errors())
            self.failure = _Failure("EvaluationResultInvalid", f"RayJob {evaluation.name} summary: {fields}")
            return
        gate = self.spec.evaluation
        verdict = summary.gate
        if gate.task is not None and gate.task in summary.task_auc:
            auc: float | None = summary.task_auc[gate.task]  # the gate's task, as the printer column says
        elif summary.auc is not None:
            auc = summary.auc
        else:
            auc = verdict.value if gate.metric is GateMetric.AUC else None
        candidate.metrics = VersionMetrics(
            auc=auc, normalized_entropy=summary.normalized_entropy, task_auc=summary.task_auc
        )
        candidate.gate = GateResult(
            passed=verdict.passed,
            metric=gate.metric.value + (f"[{gate.task}]" if gate.task else ""),
            value=verdict.value,
            reference=verdict.reference,
            reference_name=verdict.reference_name,
            lift=verdict.lift,
            lift_interval=verdict.lift_ci95,
            required_lift=gate.min_lift,
        )

    def _serve(self) -> None:
        """Deploy the candidate once it passed the gate, else keep the current version; promote when ready."""
        current, candidate = self.status.current_version, self.status.candidate_version
        passed = candidate is not None and candidate.gate is not None and candidate.gate.passed
        to_serve = candidate if passed else current
        service = self.observed.service
        if to_serve is None:
            return
        app = ServingApp(name=service_name(self.name), version=to_serve, serving=self.spec.serving)
        if service is None:
            self.create.append(app)
            self.deploying = True
        elif service.digest != app.digest:
            self.update.append(app)
            self.deploying = True
        elif service.failed:
            self.failure = _Failure("DeployFailed", f"RayService {service.name}: {service.message}")
        elif not service.ready:
            self.deploying = True
        elif to_serve is candidate:
            self.status.current_version, self.status.candidate_version = candidate, None

    def _record(self) -> None:
        """Phase, conditions, child names and endpoint, all derived from the decisions above."""
        status, now, gen = self.status, self.observed.now, self.generation
        current, candidate = status.current_version, status.candidate_version
        service = self.observed.service
        status.observed_generation = gen
        planned = stages(candidate.kind) if candidate else ()

        def child(stage: Stage) -> str | None:
            return (
                job_name(self.name, candidate.generation, stage) if candidate and stage in planned else None
            )

        status.children = ChildNames(
            preprocess_job=child(Stage.PREPROCESS),
            train_job=child(Stage.TRAIN),
            evaluate_job=child(Stage.EVALUATE),
            service=service_name(self.name) if (current or candidate or service) else None,
        )
        serving = current is not None and service is not None
        status.endpoint = service.endpoint if serving and service else None

        rejected = candidate is not None and candidate.gate is not None and not candidate.gate.passed
        if self.failure is None and rejected and current is None and candidate is not None:
            self.failure = _Failure("GateFailed", _gate_message(candidate))
        if self.failure is not None:
            status.phase = Phase.FAILED
        elif self.spec.suspend:
            status.phase = Phase.SUSPENDED
        elif self.stage_running is not None:
            status.phase = STAGE_PHASE[self.stage_running]
        elif self.deploying:
            status.phase = Phase.DEPLOYING
        elif current is not None:
            status.phase = Phase.SERVING
        else:
            status.phase = Phase.PENDING

        if serving and current is not None:
            _set(
                status,
                ConditionType.READY,
                True,
                "Serving",
                f"{current.name} serves at {status.endpoint}",
                now,
                gen,
            )
        else:
            _set(
                status, ConditionType.READY, False, "NoVersionServing", "no version is deployed yet", now, gen
            )

        if self.failure is not None:
            _set(
                status, ConditionType.PROGRESSING, False, self.failure.reason, self.failure.message, now, gen
            )
            _set(status, ConditionType.FAILED, True, self.failure.reason, self.failure.message, now, gen)
        else:
            _set(status, ConditionType.FAILED, False, "NoFailure", "", now, gen)
            if self.spec.suspend:
                _set(
                    status,
                    ConditionType.PROGRESSING,
                    False,
                    "Suspended",
                    "spec.suspend holds the pipeline",
                    now,
                    gen,
                )
            elif self.stage_running is not None and candidate is not None:
                message = f"{candidate.name}: {self.stage_running.value} (RayJob {self.stage_job})"
                _set(status, ConditionType.PROGRESSING, True, status.phase.value, message, now, gen)
            elif self.deploying:
                version = candidate if candidate is not None and candidate.gate else current
                message = (
                    f"{version.name if version else '?'}: deploying (RayService {status.children.service})"
                )
                _set(status, ConditionType.PROGRESSING, True, "Deploying", message, now, gen)
            elif rejected and candidate is not None:
                _set(
                    status, ConditionType.PROGRESSING, False, "GateFailed", _gate_message(candidate), now, gen
                )
            elif current is not None:
                message = f"{current.name} serves the latest spec"
                _set(status, ConditionType.PROGRESSING, False, "UpToDate", message, now, gen)

        judged = candidate if candidate is not None and candidate.gate is not None else current
        if judged is not None and judged.gate is not None:
            passed, reason = judged.gate.passed, "GatePassed" if judged.gate.passed else "GateFailed"
            _set(status, ConditionType.GATE_PASSED, passed, reason, _gate_message(judged), now, gen)

        if self.spec.suspend:
            _set(status, ConditionType.SUSPENDED, True, "SuspendRequested", "spec.suspend is true", now, gen)
        else:
            _set(status, ConditionType.SUSPENDED, False, "NotSuspended", "", now, gen)


# --- Conditions and events ----------------------------------------------------------------------------------


def _set(
    status: RankingModelStatus,
    kind: ConditionType,
    value: bool,
    reason: str,
    message: str,
    now: datetime,
    generation: int,
) -> None:
    """Set a condition in place; lastTransitionTime moves only when its status flips (as in apimachinery)."""
    new_status = ConditionStatus.TRUE if value else ConditionStatus.FALSE
    existing = status.condition(kind)
    if existing is None:
        status.conditions.append(
            Condition(
                type=kind,
                status=new_status,
                reason=reason,
                message=message,
                last_transition_time=now,
                observed_generation=generation,
            )
        )
        return
    if existing.status != new_status:
        existing.last_transition_time = now
    existing.status, existing.reason, existing.message = new_status, reason, message
    existing.observed_generation = generation


def _gate_message(version: ModelVersion) -> str:
    gate = version.gate
    if gate is None:
        return f"{version.name} has not been evaluated"
    verdict = "passed" if gate.passed else "failed"

    def number(x: float | None) -> str:
        return "n/a" if x is None else f"{x:.4f}"

    lift = "n/a" if gate.lift is None else f"{gate.lift:+.2%}"
    if gate.lift_interval is not None:
        low, high = gate.lift_interval
        lift += f" (95% interval {low:+.2%} to {high:+.2%})"
    return (
        f"{version.name} {verdict} the gate: {gate.metric} {number(gate.value)} vs "
        f"{gate.reference_name or 'reference'} {number(gate.reference)}, lift {lift} "
        f"(required {gate.required_lift:+.2%})"
    )


def _describe(child: StageJob | ServingApp) -> str:
    if isinstance(child, StageJob):
        return f"RayJob {child.name} ({child.version.name} {child.stage.value})"
    return f"RayService {child.name} ({child.version.name})"


def _transition_events(
    old: RankingModelStatus,
    new: RankingModelStatus,
    created: Sequence[StageJob | ServingApp],
    updated: Sequence[StageJob | ServingApp],
) -> tuple[Event, ...]:
    """Events for what changed between two statuses: nothing changed, nothing said (a re-run is silent)."""
    events = [Event("Normal", "Created", f"created {_describe(child)}") for child in created]
    events += [Event("Normal", "Updated", f"updated {_describe(child)}") for child in updated]
    old_current = old.current_version.name if old.current_version else None
    if new.current_version is not None and new.current_version.name != old_current:
        events.append(
            Event("Normal", "Promoted", f"{new.current_version.name} now serves (was {old_current})")
        )
    for kind in ConditionType:
        before, after = old.condition(kind), new.condition(kind)
        if after is None or (
            before is not None
            and (before.status, before.reason, before.message) == (after.status, after.reason, after.message)
        ):
            continue
        if kind is ConditionType.FAILED and after.status is ConditionStatus.TRUE:
            events.append(Event("Warning", after.reason, after.message))
        elif kind is ConditionType.GATE_PASSED and after.status is not ConditionStatus.UNKNOWN:
            events.append(
                Event(
                    "Normal" if after.status is ConditionStatus.TRUE else "Warning",
                    after.reason,
                    after.message,
                )
            )
    if new.phase != old.phase:
        events.append(Event("Normal", "PhaseChanged", f"phase {old.phase.value} -> {new.phase.value}"))
    return tuple(events)
