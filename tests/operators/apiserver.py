"""An API server for the end-to-end operator tests: kmock's emulator plus the bookkeeping kopf relies on.

kmock stores objects, serves watches and honours finalizers, but does not assign what a real API server
does on write. Added here, as the API server does it: `metadata.uid`, `creationTimestamp`, a name for
`generateName` (kopf's events use it), a `resourceVersion` that changes on every write (kopf's JSON patches
test it), and `metadata.generation`, which starts at 1 and grows by one on every change to `spec` (not on
status or metadata writes); a JSON patch whose `test` fails is refused with 422. kmock's docs invite
exactly this kind of subclass.
"""

from __future__ import annotations

import copy
import itertools
import secrets
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any

import aiohttp.web
import jsonpointer
import kmock

VERBS = {"get", "list", "watch", "create", "update", "patch", "delete"}


def _merged(base: Any, patch: Any) -> Any:
    """RFC 7386 merge of `patch` into `base` (what a merge patch would make of it)."""
    if not isinstance(patch, Mapping) or not isinstance(base, Mapping):
        return copy.deepcopy(patch)
    out = dict(base)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = _merged(base.get(key), value)
    return out


class ApiServer(kmock.KubernetesEmulator):
    _writes = itertools.count(1)

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        if request.resource is not None and request.action in (kmock.action.CREATE, kmock.action.UPDATE):
            version = str(next(self._writes))
            if isinstance(request.data, list):  # a JSON patch: its tests first, then one more operation
                self._check_tests(request)
                request.data.append({"op": "add", "path": "/metadata/resourceVersion", "value": version})
            elif isinstance(request.data, dict):
                if request.action == kmock.action.CREATE:
                    self._on_create(request.data)
                elif request.subresource is None:
                    self._on_update(request)
                request.data.setdefault("metadata", {})["resourceVersion"] = version
        return await super()._handle(request)

    def _current(self, request: kmock.Request) -> dict[str, Any] | None:
        """The stored object a write addresses, if it exists."""
        if request.resource is None or request.name is None:
            return None
        key = (request.resource, request.namespace, request.name)
        if key not in self.objects or self.objects[key].deleted:
            return None
        return self.objects[key].raw

    def _check_tests(self, request: kmock.Request) -> None:
        """A failed `test` operation is 422 Unprocessable Entity (kmock says 500; kopf retries on 422)."""
        current = self._current(request) or {}
        for op in request.data:
            if (
                op.get("op") == "test"
                and jsonpointer.resolve_pointer(current, op["path"], None) != op["value"]
            ):
                raise kmock.KubernetesError(
                    status=422, reason="Invalid", message=f"test of {op['path']} failed"
                )

    @staticmethod
    def _on_create(body: dict[str, Any]) -> None:
        meta = body.setdefault("metadata", {})
        if "name" not in meta and "generateName" in meta:
            meta["name"] = meta["generateName"] + secrets.token_hex(3)
        meta.setdefault("uid", str(uuid.uuid4()))
        meta.setdefault("creationTimestamp", datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        meta["generation"] = 1

    def _on_update(self, request: kmock.Request) -> None:
        current = self._current(request)
        if current is None or "spec" not in request.data:
            return
        if _merged(current.get("spec"), request.data["spec"]) != current.get("spec"):
            generation = (current.get("metadata") or {}).get("generation", 1)
            request.data.setdefault("metadata", {})["generation"] = generation + 1


def declare_resources(server: ApiServer) -> None:
    """Discovery: Kubernetes' built-ins, our CRD and KubeRay's, each with its status subresource."""
    server.resources.load_bundled()
    for path, kind, singular, shortnames in [
        ("rankray.io/v1alpha1/rankingmodels", "RankingModel", "rankingmodel", {"rkm"}),
        ("ray.io/v1/rayjobs", "RayJob", "rayjob", set()),
        ("ray.io/v1/rayservices", "RayService", "rayservice", set()),
    ]:
        server.resources[path] = kmock.ResourceInfo(
            kind=kind,
            singular=singular,
            namespaced=True,
            verbs=VERBS,
            shortnames=shortnames,
            subresources={"status"},
        )
