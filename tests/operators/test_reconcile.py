"""The reconciler, pure: phase transitions, idempotence, restarts, versions, the gate, failures, suspend."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from operators.api.v1alpha1 import (
    ConditionStatus,
    ConditionType,
    Phase,
    RankingModel,
    RankingModelStatus,
    RejectedModel,
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
    reconcile,
)
from tests.operators.conftest import as_model

T0 = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)

PASSING = {
    "task_auc": {"click": 0.71, "contribution": 0.69, "long_dwell": 0.73},
    "auc": 0.71,
    "gate": {
        "passed": True,
        "value": 0.71,
        "reference": 0.70,
        "reference_name": "baseline",
        "lift": 0.0143,
        "lift_ci95": [0.004, 0.025],
    },
}
FAILING = {
    "task_auc": {"click": 0.70},
    "auc": 0.70,
    "gate": {"passed": False, "value": 0.70, "reference": 0.71, "reference_name": "v1", "lift": -0.0141},
}


class FakeChildren:
    """What a backend would observe: changed only by applied plans and by the test playing KubeRay."""

    def __init__(self) -> None:
        self.jobs: dict[str, ObservedJob] = {}
        self.service: ObservedService | None = None
        self.created: list[str] = []
        self.ticks = 0

    def observe(self) -> Observed:
        self.ticks += 1
        return Observed(now=T0 + timedelta(seconds=self.ticks), jobs=dict(self.jobs), service=self.service)

    def apply(self, plan: Plan) -> None:
        for child in plan.create:
            assert child.name not in self.jobs, f"{child.name} created twice"
            self.created.append(child.name)
            if isinstance(child, StageJob):
                self.jobs[child.name] = ObservedJob(child.name, JobState.PENDING, suspend=child.suspend)
            else:
                assert self.service is None
                url = f"http://{child.name}-serve-svc.ranking.svc.cluster.local:8000/"
                self.service = ObservedService(child.name, child.digest, ready=False, endpoint=url)
        for child in plan.update:
            if isinstance(child, StageJob):
                state = JobState.SUSPENDED if child.suspend else JobState.PENDING
                self.jobs[child.name] = replace(self.jobs[child.name], suspend=child.suspend, state=state)
            else:
                assert self.service is not None
                self.service = replace(self.service, digest=child.digest, ready=False)
        for ref in plan.delete:
            if ref.kind == "RayJob":
                del self.jobs[ref.name]
            else:
                self.service = None

    # --- playing KubeRay ---
    def run(self, name: str) -> None:
        self.jobs[name] = replace(self.jobs[name], state=JobState.RUNNING)

    def succeed(self, name: str, summary: dict[str, Any] | None = None) -> None:
        self.jobs[name] = replace(self.jobs[name], state=JobState.SUCCEEDED, summary=summary)

    def fail(self, name: str, reason: str, message: str) -> None:
        self.jobs[name] = replace(self.jobs[name], state=JobState.FAILED, reason=reason, message=message)

    def serve(self) -> None:
        assert self.service is not None
        self.service = replace(self.service, ready=True)


def step(model: RankingModel, children: FakeChildren) -> tuple[RankingModel, Plan]:
    """One operator pass: observe, decide, apply; the returned model carries the recorded status."""
    plan = reconcile(model, children.observe())
    children.apply(plan)
    return model.model_copy(update={"status": plan.status}), plan


def condition(status: RankingModelStatus, kind: ConditionType) -> tuple[ConditionStatus, str, str]:
    found = status.condition(kind)
    assert found is not None, f"no {kind} condition"
    return found.status, found.reason, found.message


def serve_first_version(model: RankingModel, children: FakeChildren) -> RankingModel:
    """Walk generation 1 through every stage to Serving."""
    name = model.metadata.name
    model, _ = step(model, children)
    children.succeed(f"{name}-v1-preprocess")
    model, _ = step(model, children)
    children.succeed(f"{name}-v1-train")
    model, _ = step(model, children)
    children.succeed(f"{name}-v1-evaluate", PASSING)
    model, _ = step(model, children)
    children.serve()
    model, _ = step(model, children)
    assert model.status.phase is Phase.SERVING
    return model


def new_generation(model: RankingModel, manifest: dict[str, Any], generation: int) -> RankingModel:
    """The same object after a spec edit: the API server bumped metadata.generation, status carried over."""
    return as_model(manifest, generation=generation, status=model.status)


def test_a_new_model_records_child_names_and_creates_only_the_preprocess_job(
    manifest: dict[str, Any],
) -> None:
    model = as_model(manifest)
    plan = reconcile(model, Observed(now=T0))
    assert [(type(c).__name__, c.name) for c in plan.create] == [("StageJob", "feed-ligr-v1-preprocess")]
    assert not plan.update and not plan.delete
    status = plan.status
    assert status.phase is Phase.PREPROCESSING
    assert status.observed_generation == 1
    assert status.candidate_version is not None and status.candidate_version.name == "v1"
    assert status.candidate_version.artifact_uri == "pvc://rankray-artifacts/models/feed-ligr/v1"
    assert status.children.preprocess_job == "feed-ligr-v1-preprocess"
    assert status.children.train_job == "feed-ligr-v1-train"
    assert status.current_version is None
    assert condition(status, ConditionType.PROGRESSING)[:2] == (ConditionStatus.TRUE, "Preprocessing")
    assert condition(status, ConditionType.READY)[:2] == (ConditionStatus.FALSE, "NoVersionServing")
    assert {e.reason for e in plan.events} == {"Created", "PhaseChanged"}


def test_every_phase_in_order_until_the_first_version_serves(manifest: dict[str, Any]) -> None:
    children, model = FakeChildren(), as_model(manifest)
    phases = []
    model, _ = step(model, children)
    phases.append(model.status.phase)
    children.run("feed-ligr-v1-preprocess")
    model, plan = step(model, children)
    assert not plan.create and model.status.phase is Phase.PREPROCESSING
    children.succeed("feed-ligr-v1-preprocess")
    model, plan = step(model, children)
    phases.append(model.status.phase)
    assert [c.name for c in plan.create] == ["feed-ligr-v1-train"]
    children.succeed("feed-ligr-v1-train")
    model, plan = step(model, children)
    phases.append(model.status.phase)
    assert [c.name for c in plan.create] == ["feed-ligr-v1-evaluate"]
    children.succeed("feed-ligr-v1-evaluate", PASSING)
    model, plan = step(model, children)
    phases.append(model.status.phase)
    assert [(type(c).__name__, c.name) for c in plan.create] == [("ServingApp", "feed-ligr")]
    assert model.status.candidate_version is not None and model.status.candidate_version.gate is not None
    assert model.status.candidate_version.metrics is not None
    assert model.status.candidate_version.metrics.task_auc["long_dwell"] == 0.73
    children.serve()
    model, plan = step(model, children)
    phases.append(model.status.phase)
    assert phases == [Phase.PREPROCESSING, Phase.TRAINING, Phase.EVALUATING, Phase.DEPLOYING, Phase.SERVING]
    status = model.status
    assert status.current_version is not None and status.current_version.name == "v1"
    assert status.current_version.metrics is not None and status.current_version.metrics.auc == 0.71
    assert status.candidate_version is None
    assert status.endpoint == "http://feed-ligr-serve-svc.ranking.svc.cluster.local:8000/"
    assert condition(status, ConditionType.READY)[:2] == (ConditionStatus.TRUE, "Serving")
    assert condition(status, ConditionType.GATE_PASSED)[:2] == (ConditionStatus.TRUE, "GatePassed")
    assert status.current_version.gate is not None and status.current_version.gate.lift_interval == [
        0.004,
        0.025,
    ]
    assert "lift +1.43% (95% interval +0.40% to +2.50%)" in condition(status, ConditionType.GATE_PASSED)[2]
    assert condition(status, ConditionType.PROGRESSING)[:2] == (ConditionStatus.FALSE, "UpToDate")
    assert condition(status, ConditionType.FAILED)[0] is ConditionStatus.FALSE
    assert any(e.reason == "Promoted" for e in plan.events)
    assert children.created == [
        "feed-ligr-v1-preprocess",
        "feed-ligr-v1-train",
        "feed-ligr-v1-evaluate",
        "feed-ligr",
    ]


def test_reconciling_the_same_observation_twice_plans_the_same_and_a_settled_model_plans_nothing(
    manifest: dict[str, Any],
) -> None:
    children, model = FakeChildren(), as_model(manifest)
    observed = children.observe()
    assert reconcile(model, observed) == reconcile(model, observed)
    model, _ = step(model, children)
    model, plan = step(model, children)  # the job exists now: nothing to do until it changes
    assert not plan.touches_children and not plan.events and plan.status == model.status
    served_children = FakeChildren()
    served = serve_first_version(as_model(manifest), served_children)
    settled = reconcile(served, served_children.observe())
    assert not settled.touches_children and not settled.events and settled.status == served.status


def test_a_restarted_operator_continues_from_the_children_it_finds_without_duplicates(
    manifest: dict[str, Any],
) -> None:
    children, model = FakeChildren(), as_model(manifest)
    model, _ = step(model, children)
    children.succeed("feed-ligr-v1-preprocess")
    model, _ = step(model, children)
    children.run("feed-ligr-v1-train")
    # Restart with the recorded status: the running train job is found, nothing is created again.
    plan = reconcile(as_model(manifest, status=model.status), children.observe())
    assert not plan.create and plan.status.phase is Phase.TRAINING
    # Even a status that was lost entirely is rebuilt from the children: same names, no duplicates.
    plan = reconcile(as_model(manifest), children.observe())
    assert not plan.create and not plan.delete
    assert plan.status.phase is Phase.TRAINING
    assert plan.status.children.train_job == "feed-ligr-v1-train"


def test_a_new_generation_trains_a_candidate_while_the_old_version_keeps_serving(
    manifest: dict[str, Any],
) -> None:
    children = FakeChildren()
    model = serve_first_version(as_model(manifest), children)
    served_digest = children.service.digest if children.service else None
    manifest["spec"]["model"]["historyLength"] = 128
    model = new_generation(model, manifest, 2)
    model, plan = step(model, children)
    assert [c.name for c in plan.create] == ["feed-ligr-v2-preprocess"]
    assert not plan.update, "the RayService must not change before the gate passes"
    assert model.status.current_version is not None and model.status.current_version.name == "v1"
    assert model.status.candidate_version is not None and model.status.candidate_version.name == "v2"
    assert condition(model.status, ConditionType.READY)[0] is ConditionStatus.TRUE
    for stage in ("preprocess", "train"):
        children.succeed(f"feed-ligr-v2-{stage}")
        model, plan = step(model, children)
        assert children.service is not None and children.service.digest == served_digest
    evaluate = [c for c in plan.create if isinstance(c, StageJob)]
    assert evaluate and evaluate[0].reference is not None and evaluate[0].reference.name == "v1"
    children.succeed("feed-ligr-v2-evaluate", PASSING)
    model, plan = step(model, children)
    assert [type(c).__name__ for c in plan.update] == ["ServingApp"]
    update = plan.update[0]
    assert isinstance(update, ServingApp) and update.version.name == "v2"
    assert model.status.phase is Phase.DEPLOYING
    assert model.status.current_version is not None and model.status.current_version.name == "v1"
    model, plan = step(model, children)  # KubeRay has not rolled it out yet
    assert model.status.current_version is not None and model.status.current_version.name == "v1"
    children.serve()
    model, plan = step(model, children)
    assert model.status.current_version is not None and model.status.current_version.name == "v2"
    assert model.status.phase is Phase.SERVING
    assert {ref.name for ref in plan.delete} == {
        f"feed-ligr-v1-{s}" for s in ("preprocess", "train", "evaluate")
    }
    assert set(children.jobs) == {f"feed-ligr-v2-{s}" for s in ("preprocess", "train", "evaluate")}


def test_a_failing_gate_leaves_the_old_version_serving_and_says_why(manifest: dict[str, Any]) -> None:
    children = FakeChildren()
    model = serve_first_version(as_model(manifest), children)
    manifest["spec"]["model"]["size"] = "base"
    model = new_generation(model, manifest, 2)
    model, _ = step(model, children)
    for stage in ("preprocess", "train"):
        children.succeed(f"feed-ligr-v2-{stage}")
        model, _ = step(model, children)
    children.succeed("feed-ligr-v2-evaluate", FAILING)
    model, plan = step(model, children)
    assert not plan.create and not plan.update
    status = model.status
    assert status.phase is Phase.SERVING
    assert status.current_version is not None and status.current_version.name == "v1"
    assert status.candidate_version is not None and status.candidate_version.gate is not None
    gate_status, reason, message = condition(status, ConditionType.GATE_PASSED)
    assert (gate_status, reason) == (ConditionStatus.FALSE, "GateFailed")
    assert "v2 failed the gate" in message and "0.7000 vs v1 0.7100" in message and "-1.41%" in message
    assert condition(status, ConditionType.READY)[0] is ConditionStatus.TRUE
    assert condition(status, ConditionType.PROGRESSING)[1] == "GateFailed"
    assert any(e.type == "Warning" and e.reason == "GateFailed" for e in plan.events)
    _, plan = step(model, children)
    assert not plan.touches_children and not plan.events, "a rejected candidate is not retried"


def test_a_first_version_that_fails_the_gate_is_failed_and_never_deployed(manifest: dict[str, Any]) -> None:
    children, model = FakeChildren(), as_model(manifest)
    model, _ = step(model, children)
    for stage in ("preprocess", "train"):
        children.succeed(f"feed-ligr-v1-{stage}")
        model, _ = step(model, children)
    children.succeed("feed-ligr-v1-evaluate", FAILING)
    model, plan = step(model, children)
    assert children.service is None and not plan.create
    assert model.status.phase is Phase.FAILED
    assert condition(model.status, ConditionType.FAILED)[:2] == (ConditionStatus.TRUE, "GateFailed")


def test_a_failed_rayjob_is_a_failed_condition_with_its_reason_and_nothing_after_it_starts(
    manifest: dict[str, Any],
) -> None:
    children, model = FakeChildren(), as_model(manifest)
    model, _ = step(model, children)
    children.succeed("feed-ligr-v1-preprocess")
    model, _ = step(model, children)
    children.fail(
        "feed-ligr-v1-train", "DeadlineExceeded", "The RayJob has passed the activeDeadlineSeconds."
    )
    model, plan = step(model, children)
    assert not plan.create
    assert model.status.phase is Phase.FAILED
    status, reason, message = condition(model.status, ConditionType.FAILED)
    assert (status, reason) == (ConditionStatus.TRUE, "TrainFailed")
    assert message == (
        "RayJob feed-ligr-v1-train failed: DeadlineExceeded: The RayJob has passed the activeDeadlineSeconds."
    )
    assert [(e.type, e.reason) for e in plan.events if e.type == "Warning"] == [("Warning", "TrainFailed")]
    assert "feed-ligr-v1-train" in children.jobs, "the failed job stays for inspection"


def test_an_evaluation_whose_summary_is_missing_waits_and_one_whose_summary_is_lost_fails(
    manifest: dict[str, Any],
) -> None:
    children, model = FakeChildren(), as_model(manifest)
    model, _ = step(model, children)
    for stage in ("preprocess", "train"):
        children.succeed(f"feed-ligr-v1-{stage}")
        model, _ = step(model, children)
    children.succeed("feed-ligr-v1-evaluate", None)
    model, plan = step(model, children)
    assert model.status.phase is Phase.EVALUATING and not plan.create
    children.jobs["feed-ligr-v1-evaluate"] = replace(
        children.jobs["feed-ligr-v1-evaluate"], summary_error="gone"
    )
    model, _ = step(model, children)
    assert condition(model.status, ConditionType.FAILED)[1] == "EvaluationResultUnavailable"
    children.jobs["feed-ligr-v1-evaluate"] = replace(
        children.jobs["feed-ligr-v1-evaluate"], summary={"auc": 0.7}, summary_error=""
    )
    model, _ = step(model, children)
    failed = condition(model.status, ConditionType.FAILED)
    assert failed[1] == "EvaluationResultInvalid" and "gate" in failed[2]


def test_suspend_suspends_the_running_job_starts_nothing_and_resume_undoes_it(
    manifest: dict[str, Any],
) -> None:
    children, model = FakeChildren(), as_model(manifest)
    model, _ = step(model, children)
    children.run("feed-ligr-v1-preprocess")
    suspended = copy.deepcopy(manifest)
    suspended["spec"]["suspend"] = True
    model = new_generation(model, suspended, 2)  # suspend is not a pipeline change: still version v1
    model, plan = step(model, children)
    assert [(type(c).__name__, c.name, getattr(c, "suspend", None)) for c in plan.update] == [
        ("StageJob", "feed-ligr-v1-preprocess", True)
    ]
    assert model.status.phase is Phase.SUSPENDED
    assert condition(model.status, ConditionType.SUSPENDED)[0] is ConditionStatus.TRUE
    children.succeed("feed-ligr-v1-preprocess")  # it had finished before the suspension landed
    model, plan = step(model, children)
    assert not plan.create, "no stage starts while suspended"
    assert model.status.phase is Phase.SUSPENDED
    model = new_generation(model, manifest, 3)
    model, plan = step(model, children)
    assert [c.name for c in plan.create] == ["feed-ligr-v1-train"]
    assert model.status.phase is Phase.TRAINING
    assert condition(model.status, ConditionType.SUSPENDED)[0] is ConditionStatus.FALSE


def test_a_rejected_spec_gets_a_validation_condition_and_creates_nothing(manifest: dict[str, Any]) -> None:
    children = FakeChildren()
    served = serve_first_version(as_model(manifest), children)
    rejected = RejectedModel(
        metadata=served.metadata.model_copy(update={"generation": 2}),
        status=served.status,
        problems=["metadata.name: too long", "spec.training.nodePool.nodeSelector[x y]: not a label key"],
    )
    plan = reconcile(rejected, children.observe())
    assert not plan.touches_children, "nothing created, and what serves is left alone"
    assert plan.status.phase is Phase.FAILED
    status, reason, message = condition(plan.status, ConditionType.FAILED)
    assert (status, reason) == (ConditionStatus.TRUE, "ValidationFailed")
    assert "metadata.name: too long" in message and "spec.training.nodePool.nodeSelector[x y]" in message
    assert plan.status.current_version == served.status.current_version
    assert [(e.type, e.reason) for e in plan.events if e.type == "Warning"] == [
        ("Warning", "ValidationFailed")
    ]


def test_a_serving_only_change_rolls_out_to_the_served_version_without_retraining(
    manifest: dict[str, Any],
) -> None:
    children = FakeChildren()
    model = serve_first_version(as_model(manifest), children)
    manifest["spec"]["serving"]["replicas"] = 5
    model = new_generation(model, manifest, 2)
    model, plan = step(model, children)
    assert not plan.create and [c.name for c in plan.update] == ["feed-ligr"]
    update = plan.update[0]
    assert isinstance(update, ServingApp) and update.version.name == "v1" and update.serving.replicas == 5
    assert model.status.candidate_version is None and model.status.phase is Phase.DEPLOYING
    assert condition(model.status, ConditionType.READY)[0] is ConditionStatus.TRUE
    children.serve()
    model, _ = step(model, children)
    assert model.status.phase is Phase.SERVING and model.status.observed_generation == 2


def test_a_spec_change_mid_pipeline_abandons_the_old_candidate(manifest: dict[str, Any]) -> None:
    children, model = FakeChildren(), as_model(manifest)
    model, _ = step(model, children)
    children.succeed("feed-ligr-v1-preprocess")
    model, _ = step(model, children)
    manifest["spec"]["training"]["workers"] = 4
    model, plan = step(new_generation(model, manifest, 2), children)
    assert [c.name for c in plan.create] == ["feed-ligr-v2-preprocess"]
    assert {ref.name for ref in plan.delete} == {"feed-ligr-v1-preprocess", "feed-ligr-v1-train"}
    assert model.status.candidate_version is not None and model.status.candidate_version.name == "v2"


def test_the_recorded_auc_is_the_gate_tasks_when_the_gate_names_one(manifest: dict[str, Any]) -> None:
    manifest["spec"]["evaluation"]["task"] = "long_dwell"
    children, model = FakeChildren(), as_model(manifest)
    model = serve_first_version(model, children)
    assert model.status.current_version is not None and model.status.current_version.metrics is not None
    assert model.status.current_version.metrics.auc == 0.73
    assert model.status.current_version.gate is not None
    assert model.status.current_version.gate.metric == "auc[long_dwell]"


def test_a_brew_model_has_no_preprocess_stage(manifest: dict[str, Any]) -> None:
    manifest["spec"]["model"] = {"kind": "brew", "baseModel": "pvc://rankray-models/smollm2"}
    manifest["spec"]["serving"]["llm"] = {"enabled": True}
    children, model = FakeChildren(), as_model(manifest)
    model, plan = step(model, children)
    assert [c.name for c in plan.create] == ["feed-ligr-v1-train"]
    assert model.status.phase is Phase.TRAINING and model.status.children.preprocess_job is None
    children.succeed("feed-ligr-v1-train")
    model, plan = step(model, children)
    assert [c.name for c in plan.create] == ["feed-ligr-v1-evaluate"]
    children.succeed("feed-ligr-v1-evaluate", PASSING)
    model, plan = step(model, children)
    app = plan.create[0]
    assert isinstance(app, ServingApp) and app.version.artifact_uri.endswith("/feed-ligr/v1/artifact")


def test_a_deleted_model_deletes_every_child(manifest: dict[str, Any]) -> None:
    children = FakeChildren()
    model = serve_first_version(as_model(manifest), children)
    doomed = model.model_copy(
        update={"metadata": model.metadata.model_copy(update={"deletion_timestamp": "now"})}
    )
    plan = reconcile(doomed, children.observe())
    assert set(plan.delete) == {
        ChildRef("RayJob", "feed-ligr-v1-preprocess"),
        ChildRef("RayJob", "feed-ligr-v1-train"),
        ChildRef("RayJob", "feed-ligr-v1-evaluate"),
        ChildRef("RayService", "feed-ligr"),
    }
    assert not plan.create and not plan.update and plan.status == model.status


@pytest.mark.parametrize("flip", [False, True])
def test_last_transition_time_moves_only_when_a_condition_flips(manifest: dict[str, Any], flip: bool) -> None:
    children, model = FakeChildren(), as_model(manifest)
    model, _ = step(model, children)
    before = model.status.condition(ConditionType.PROGRESSING)
    assert before is not None
    if flip:
        children.fail("feed-ligr-v1-preprocess", "AppFailed", "boom")
    else:
        children.succeed("feed-ligr-v1-preprocess")  # Progressing stays True, its reason moves on
    model, _ = step(model, children)
    after = model.status.condition(ConditionType.PROGRESSING)
    assert after is not None
    assert (after.last_transition_time != before.last_transition_time) is flip
