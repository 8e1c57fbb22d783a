"""The generated CRD: committed copy and reference not stale, structural, readable by `kubectl explain`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celpy
import kubernetes_validate
import pytest
import yaml
from openapi_schema_validator import OAS30Validator

from operators.api.crd import crd, crd_yaml
from operators.api.reference import reference_markdown

ROOT = Path(__file__).resolve().parents[3]
COMMITTED_CRD = ROOT / "charts/rankray/crds/rankingmodels.rankray.io.yaml"
COMMITTED_REFERENCE = ROOT / "docs/crd.md"


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, prop in node.get("properties", {}).items():
        yield from _nodes(prop, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_the_committed_crd_is_what_rankray_crd_generates() -> None:
    assert COMMITTED_CRD.read_text() == crd_yaml(), (
        "stale: run `rankray crd --out " + str(COMMITTED_CRD) + "`"
    )


def test_the_committed_reference_is_what_rankray_crd_reference_generates() -> None:
    assert COMMITTED_REFERENCE.read_text() == reference_markdown(), "stale: run `rankray crd --reference`"


def test_the_crd_is_a_valid_kubernetes_object() -> None:
    kubernetes_validate.validate(yaml.safe_load(crd_yaml()), "1.32", strict=True)


def test_names_scope_status_subresource_and_printer_columns() -> None:
    spec = crd()["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == (
        "rankray.io",
        "Namespaced",
        "RankingModel",
    )
    assert spec["names"]["shortNames"] == ["rkm"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert list(columns) == ["Phase", "Model version", "AUC", "Endpoint", "Age"]


def test_printer_columns_point_at_fields_the_schema_has(schema: dict[str, Any]) -> None:
    paths = {path for path, _ in _nodes(schema)}
    for column in crd()["spec"]["versions"][0]["additionalPrinterColumns"]:
        if column["jsonPath"].startswith(".metadata"):
            continue
        assert column["jsonPath"] in paths, column


def test_the_schema_is_structural(schema: dict[str, Any]) -> None:
    """What the API server demands of a CRD schema: every node typed, no refs, no free unions."""
    for path, node in _nodes(schema):
        assert not {"$ref", "$defs", "anyOf", "oneOf", "allOf", "title"} & set(node), path
        assert node.get("additionalProperties") is not False, path
        assert "type" in node or node.get("x-kubernetes-int-or-string"), f"{path} has no type"
        assert not ("properties" in node and "additionalProperties" in node), path


def test_every_spec_and_status_field_has_a_description_for_kubectl_explain(schema: dict[str, Any]) -> None:
    for part in ("spec", "status"):
        for path, node in _nodes(schema["properties"][part], part):
            if path.endswith("{}") or (path.endswith("[]") and node.get("type") != "object"):
                continue  # map values and list items of scalars are described by their map or list
            assert node.get("description", "").strip(), f"{path} has no description"


def test_every_default_satisfies_its_own_schema(schema: dict[str, Any]) -> None:
    """The API server refuses a CRD whose defaults would not validate."""
    checked = 0
    for path, node in _nodes(schema):
        if "default" in node:
            errors = list(OAS30Validator(node).iter_errors(node["default"]))
            assert not errors, f"{path}: {errors[0].message}"
            checked += 1
    assert checked > 20


def test_cross_field_rules_compile_and_carry_a_message(schema: dict[str, Any]) -> None:
    env = celpy.Environment()
    rules = [rule for _, node in _nodes(schema) for rule in node.get("x-kubernetes-validations", [])]
    assert len(rules) >= 8
    for rule in rules:
        env.compile(rule["rule"])
        assert rule["message"]
