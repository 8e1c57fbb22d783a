"""The kopf handlers: every trigger runs the same `sync` (observe → reconcile → apply); none decides anything.

kopf's create/update/delete handlers are edge-triggered, and a child's status changing (a RayJob
finishing) does not fire the parent's handlers at all. So a timer re-runs the same sync every
RANKRAY_SYNC_INTERVAL_SECONDS (read once, when this module is imported), and what to do depends only on
what exists now.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from typing import Any

import httpx
import kopf
from kubernetes.client.exceptions import ApiException
from opentelemetry import metrics, trace

from operators.api.v1alpha1 import GROUP, PLURAL, VERSION
from operators.backends.kuberay import ChildConflictError, KubeRayBackend, KubeRaySettings
from operators.reconcile import reconcile
from operators.validate import admit, compile_rules
from workloads import telemetry

SYNC_INTERVAL_SECONDS = float(os.environ.get("RANKRAY_SYNC_INTERVAL_SECONDS", "15"))
RETRY_DELAY_SECONDS = max(1.0, SYNC_INTERVAL_SECONDS / 3)
FINALIZER = "rankray.io/finalizer"

tracer = trace.get_tracer(__name__)
_meter = metrics.get_meter(__name__)
sync_seconds = _meter.create_histogram(
    "rankray.reconcile.duration", unit="s", description="One sync: observe, reconcile, apply"
)
child_changes = _meter.create_counter(
    "rankray.reconcile.child_changes", description="RayJobs and RayServices created, updated or deleted"
)


@kopf.on.startup()
async def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    """kopf's bookkeeping goes to rankray.io annotations (the status schema has no room for it)."""
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="rankray.io")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix="rankray.io")
    settings.posting.level = logging.WARNING  # our own events say what happened; handler chatter does not
    await asyncio.to_thread(compile_rules)  # not in the first sync: building the CEL parser blocks ~2 s
    telemetry.configure("rankray-operator")  # exports only where OTEL_EXPORTER_OTLP_ENDPOINT is set
    if "backend" not in memo:
        memo.backend = KubeRayBackend(KubeRaySettings.from_env())


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The pod's service account in a cluster, else $KUBECONFIG as it is now (the backend does the same)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
async def close(memo: kopf.Memo, **_: Any) -> None:
    backend = memo.get("backend")
    if isinstance(backend, KubeRayBackend):
        await backend.close()


@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL)
@kopf.timer(GROUP, VERSION, PLURAL, interval=SYNC_INTERVAL_SECONDS)
async def sync(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Fires on create, spec change, operator start and every interval: one step toward the spec."""
    await _sync(body, memo, logger)


@kopf.on.delete(GROUP, VERSION, PLURAL)
async def delete(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger, **_: Any) -> None:
    """Fires when the RankingModel is deleted, while the finalizer holds it: remove every child, let go."""
    remaining = await _sync(body, memo, logger)
    if remaining:
        raise kopf.TemporaryError(
            f"waiting for {remaining} children to be deleted", delay=RETRY_DELAY_SECONDS
        )


async def _sync(body: kopf.Body, memo: kopf.Memo, logger: kopf.Logger) -> int:
    """Observe, reconcile, apply, post the plan's events. Returns how many children were observed."""
    lock: asyncio.Lock = memo.setdefault("sync_lock", asyncio.Lock())  # a timer and an update may overlap
    async with lock:
        model = admit(body)
        backend = memo.backend
        identity = {
            "k8s.namespace.name": model.metadata.namespace or "",
            "rankray.model": model.metadata.name,
        }
        began, outcome = time.perf_counter(), "error"
        with tracer.start_as_current_span("reconcile", attributes=identity) as span:
            try:
                observed = await backend.observe(model)
                plan = reconcile(model, observed)
                await backend.apply(model, plan)
                outcome = "ok"
            except (ApiException, httpx.HTTPError, ChildConflictError) as err:
                outcome = "retry"
                raise kopf.TemporaryError(f"{type(err).__name__}: {err}", delay=RETRY_DELAY_SECONDS) from err
            finally:
                sync_seconds.record(time.perf_counter() - began, {"outcome": outcome})
            changes = {"create": len(plan.create), "update": len(plan.update), "delete": len(plan.delete)}
            span.set_attributes(
                {
                    "rankray.phase": plan.status.phase.value,
                    "rankray.observed_children": observed.child_count,
                    **{f"rankray.children.{verb}": n for verb, n in changes.items()},
                }
            )
            for verb, n in changes.items():
                if n:
                    child_changes.add(n, {"operation": verb})
        if plan.touches_children:
            logger.info(
                "created %s, updated %s, deleted %s",
                [child.name for child in plan.create],
                [child.name for child in plan.update],
                [ref.name for ref in plan.delete],
            )
        for event in plan.events:
            kopf.event(body, type=event.type, reason=event.reason, message=event.message)
        return observed.child_count
