"""Backends: where the children of a RankingModel live.

The reconciler (`operators.reconcile`) decides; a backend observes and applies. Two implement this
protocol: `kuberay` (RayJobs and a RayService on a Kubernetes cluster) and `local` (the same entrypoints
through Ray's Job Submission API and the same serve config on an embedded Ray cluster, for `rankray run`).

A backend must:

- name children exactly as the plan does (`StageJob.name`, `ServingApp.name`), so a restart finds them;
- report every child of the model in `observe`, with a job's summary (the last JSON line of its stdout)
  once an evaluate job succeeded, and a service's `digest` as last applied;
- in `apply`, record `plan.status` first (when it changed), then create, update and delete children; every
  step must be safe to repeat (a create that finds the child already there is not an error);
- render stage jobs with `operators.pipeline.entrypoint` / `stage_config` / `runtime_env` and the service
  with `operators.pipeline.serve_config`, mapping storage URIs to what its workloads see (`resolve`).

Events in `plan.events` are posted by the caller (Kubernetes events from the kopf handlers, progress lines
from `rankray run`).
"""

from __future__ import annotations

from typing import Protocol

from operators.api.v1alpha1 import RankingModel, RejectedModel
from operators.reconcile import Observed, Plan


class Backend(Protocol):
    async def observe(self, model: RankingModel | RejectedModel) -> Observed:
        """Every child of `model` that exists now (all generations), and the time of the observation."""
        ...

    async def apply(self, model: RankingModel | RejectedModel, plan: Plan) -> None:
        """Record the plan's status, then create, update and delete its children. Idempotent."""
        ...


__all__ = ["Backend"]
