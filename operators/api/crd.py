"""Generate the RankingModel CustomResourceDefinition from the pydantic models.

Pydantic emits JSON Schema (draft 2020-12); a CRD needs a *structural* OpenAPI v3 schema. The differences
handled here: `$ref`s are inlined, `Optional[X]` becomes "X, not required", `int | str` becomes
`x-kubernetes-int-or-string`, `additionalProperties: false` and titles are dropped (structural schemas forbid
the first; the second only clutters `kubectl explain`), and defaults built by `default_factory` are written
out so the API server fills in whole sub-objects.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml
from pydantic.json_schema import GenerateJsonSchema, NoDefault
from pydantic_core import core_schema

from operators.api.v1alpha1 import (
    GROUP,
    KIND,
    PLURAL,
    PRINTER_COLUMNS,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    RankingModelSpec,
    RankingModelStatus,
)

Schema = dict[str, Any]

_DROPPED_KEYS = {"title", "additionalProperties", "$defs"}


class _FactoryDefaults(GenerateJsonSchema):
    """Also write the defaults that `default_factory` builds, so nested defaults reach the CRD."""

    def get_default_value(self, schema: core_schema.WithDefaultSchema) -> Any:
        factory = schema.get("default_factory")
        if factory is not None and not schema.get("default_factory_takes_data"):
            return factory()  # type: ignore[call-arg]
        return schema.get("default", NoDefault)


def _strip_nones(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_nones(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_strip_nones(v) for v in value]
    return value


def _structural(node: Schema, defs: dict[str, Schema]) -> Schema:
    """One JSON Schema node → one structural OpenAPI v3 node (recursively)."""
    node = dict(node)
    if "$ref" in node:
        target = defs[node.pop("$ref").rsplit("/", 1)[-1]]
        node = {**target, **node}  # the field's own description and default win over the type's
    if "anyOf" in node:
        branches = [b for b in node.pop("anyOf") if b.get("type") != "null"]
        if sorted(b.get("type", "") for b in branches) == ["integer", "string"]:
            node["x-kubernetes-int-or-string"] = True
        elif len(branches) == 1:
            node = {**branches[0], **node}
            if "$ref" in node:
                return _structural(node, defs)
        else:
            raise ValueError(f"cannot express a union of {branches} in a structural schema")
    out: Schema = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS or (key == "default" and value is None):
            continue
        if key == "properties":
            out[key] = {name: _structural(prop, defs) for name, prop in value.items()}
        elif key == "items":
            out[key] = _structural(value, defs)
        elif key == "default":
            out[key] = _strip_nones(value)
        else:
            out[key] = value
    if node.get("type") == "object" and isinstance(node.get("additionalProperties"), dict):
        out["additionalProperties"] = _structural(node["additionalProperties"], defs)
    return out


def openapi_schema(model: type[Any]) -> Schema:
    """The structural schema of one pydantic model."""
    raw = model.model_json_schema(by_alias=True, schema_generator=_FactoryDefaults)
    return _structural(raw, raw.get("$defs", {}))


def crd() -> dict[str, Any]:
    """The whole CustomResourceDefinition, ready for `kubectl apply`."""
    spec_schema = openapi_schema(RankingModelSpec)
    status_schema = openapi_schema(RankingModelStatus)
    status_schema["properties"]["conditions"].update(
        {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}
    )
    root: Schema = {
        "type": "object",
        "description": "A ranking model the rankray operator trains on Ray, gates on evaluation and serves "
        "with Ray Serve.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "rankray.io/v1alpha1"},
            "kind": {"type": "string", "description": "RankingModel"},
            "metadata": {"type": "object"},
            "spec": spec_schema,
            "status": status_schema,
        },
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": f"{PLURAL}.{GROUP}",
            "labels": {"app.kubernetes.io/name": "rankray", "app.kubernetes.io/component": "crd"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
                "categories": ["rankray"],
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": copy.deepcopy(PRINTER_COLUMNS),
                    "schema": {"openAPIV3Schema": root},
                }
            ],
        },
    }


class _NoAliases(yaml.SafeDumper):
    """Write repeated values (enum lists) out in full: anchors and aliases confuse readers of a CRD."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def crd_yaml() -> str:
    header = "# Generated by `rankray crd` from operators/api/v1alpha1.py. Do not edit by hand.\n"
    return header + yaml.dump(crd(), Dumper=_NoAliases, sort_keys=True, width=110)


def version_schema(definition: dict[str, Any], version: str) -> Schema:
    """The openAPIV3Schema of one served version of any CRD (ours or KubeRay's)."""
    for entry in definition["spec"]["versions"]:
        if entry["name"] == version:
            return entry["schema"]["openAPIV3Schema"]
    raise KeyError(f"{definition['metadata']['name']} has no version {version!r}")
