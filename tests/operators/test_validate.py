"""Offline validation: the CRD schema, its CEL rules (cel-python) and the operator's own rules, by field."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from operators.api.v1alpha1 import RankingModel, RejectedModel
from operators.validate import (
    Problem,
    admit,
    apply_defaults,
    cel_problems,
    ranking_model_schema,
    validate_manifest,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

Edit = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Edit:
    def edit(manifest: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = manifest
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value

    return edit


def _drop(path: str) -> Edit:
    def edit(manifest: dict[str, Any]) -> None:
        *parents, leaf = path.split(".")
        node = manifest
        for key in parents:
            node = node[key]
        del node[leaf]

    return edit


def _edits(*edits: Edit) -> Edit:
    def edit(manifest: dict[str, Any]) -> None:
        for each in edits:
            each(manifest)

    return edit


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_the_examples_are_valid(path: Path) -> None:
    assert validate_manifest(yaml.safe_load(path.read_text())) == []


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("*.yaml")), ids=lambda p: p.name)
def test_the_examples_read_the_feast_repo_where_the_image_has_it(path: Path) -> None:
    """The Dockerfile copies feature_repo/ into its WORKDIR: that is the only place a pod finds it."""
    dockerfile = (EXAMPLES.parent / "Dockerfile").read_text().splitlines()
    workdir = [line.split()[1] for line in dockerfile if line.startswith("WORKDIR ")][-1]
    assert "COPY feature_repo ./feature_repo" in dockerfile
    manifest = yaml.safe_load(path.read_text())
    assert manifest["spec"]["featureRepo"]["path"] == f"{workdir}/feature_repo"


def test_the_valid_manifest_has_no_problems(manifest: dict[str, Any]) -> None:
    assert validate_manifest(manifest) == []


# (edit, the field the problem must name, the layer that catches it, words the message must contain)
BAD: dict[str, tuple[Edit, str, str, str]] = {
    "wrong enum": (_set("spec.training.sharding", "zero3"), "spec.training.sharding", "schema", "'zero3'"),
    "negative workers": (
        _set("spec.training.workers", -1),
        "spec.training.workers",
        "schema",
        "minimum of 1",
    ),
    "unknown model kind": (_set("spec.model.kind", "gbdt"), "spec.model.kind", "schema", "'ligr', 'brew'"),
    "missing feature repo": (_drop("spec.featureRepo"), "spec.featureRepo", "schema", "required"),
    "unknown field": (_set("spec.training.gpus", 2), "spec.training.gpus", "schema", "unknown field"),
    "bad quantity": (
        _set("spec.training.resources.memory", "lots"),
        "spec.training.resources.memory",
        "schema",
        "",
    ),
    "bad artifact root": (
        _set("spec.artifactRoot", "ftp://x"),
        "spec.artifactRoot",
        "schema",
        "does not match",
    ),
    "setwise top-k over the candidates limit": (
        _set("spec.serving.setwiseTopK", 600),
        "spec.serving.setwiseTopK",
        "cel",
        "must not exceed serving.candidatesLimit",
    ),
    "autoscaling min over max": (
        _set("spec.serving", {"autoscaling": {"minReplicas": 5, "maxReplicas": 2}}),
        "spec.serving.autoscaling.minReplicas",
        "cel",
        "must not exceed",
    ),
    "replicas and autoscaling": (
        _set("spec.serving.autoscaling", {"maxReplicas": 3}),
        "spec.serving.autoscaling",
        "cel",
        "not both",
    ),
    "brew without a base model": (_set("spec.model.kind", "brew"), "spec.model.baseModel", "cel", "required"),
    "base model on ligr": (_set("spec.model.baseModel", "/models/x"), "spec.model.baseModel", "cel", "only"),
    "features on a brew model": (
        _set("spec.model", {"kind": "brew", "baseModel": "/models/llm", "features": ["content"]}),
        "spec.model.features",
        "cel",
        "only to model.kind ligr",
    ),
    "a feature named twice": (
        _set("spec.model.features", ["content", "actor_id", "content"]),
        "spec.model.features",
        "cel",
        "each feature once",
    ),
    "a counter named twice": (
        _set("spec.model.counters", ["item_ctr_7d", "item_ctr_7d"]),
        "spec.model.counters",
        "cel",
        "each counter once",
    ),
    "actor match on a brew model": (
        _set("spec.model", {"kind": "brew", "baseModel": "/models/llm", "actorMatch": True}),
        "spec.model.actorMatch",
        "cel",
        "only to model.kind ligr",
    ),
    "actor match without the actor feature": (
        _set("spec.model", {"kind": "ligr", "features": ["content", "post_type"], "actorMatch": True}),
        "spec.model.actorMatch",
        "cel",
        "needs actor_id among model.features",
    ),
    "set-wise actor match on a brew model": (
        _set("spec.model", {"kind": "brew", "baseModel": "/models/llm", "setwiseActorMatch": True}),
        "spec.model.setwiseActorMatch",
        "cel",
        "only to model.kind ligr",
    ),
    "set-wise actor match without the set-wise layer": (
        _set("spec.model", {"kind": "ligr", "setwise": False, "setwiseActorMatch": True}),
        "spec.model.setwiseActorMatch",
        "cel",
        "needs setwise: true and actor_id",
    ),
    "set-wise actor match without the actor feature": (
        _set("spec.model", {"kind": "ligr", "features": ["content"], "setwiseActorMatch": True}),
        "spec.model.setwiseActorMatch",
        "cel",
        "needs setwise: true and actor_id",
    ),
    "a prompt budget on a ligr model": (
        _set("spec.model.contextTokens", 1024),
        "spec.model.contextTokens",
        "cel",
        "only to model.kind brew",
    ),
    "an LLM context shorter than the trained prompts": (
        _edits(
            _set("spec.model", {"kind": "brew", "baseModel": "/models/llm", "contextTokens": 4096}),
            _set("spec.serving.llm", {"enabled": True, "maxModelLen": 4096}),
        ),
        "spec.serving.llm.maxModelLen",
        "cel",
        "must exceed model.contextTokens",
    ),
    "unknown counter": (
        _set("spec.model.counters", ["ctr"]),
        "spec.model.counters[0]",
        "schema",
        "'ma_imp_7d'",
    ),
    "no features": (_set("spec.model.features", []), "spec.model.features", "schema", ""),
    "GPUs without a GPU node pool": (
        _set("spec.training.gpusPerWorker", 1),
        "spec.training.nodePool",
        "cel",
        "GPU node pool",
    ),
    "LLM deployment on a ligr model": (
        _set("spec.serving.llm", {"enabled": True}),
        "spec.serving.llm.enabled",
        "cel",
        "exactly when model.kind is brew",
    ),
    "brew without the LLM deployment": (
        _set("spec.model", {"kind": "brew", "baseModel": "/models/llm"}),
        "spec.serving.llm.enabled",
        "cel",
        "exactly when model.kind is brew",
    ),
    "an LLM dtype vLLM and the scorer do not take": (
        _set("spec.serving.llm.dtype", "float16"),
        "spec.serving.llm.dtype",
        "schema",
        "'bfloat16'",
    ),
    "an LLM context too short for any prompt": (
        _set("spec.serving.llm.maxModelLen", 32),
        "spec.serving.llm.maxModelLen",
        "schema",
        "",
    ),
    "window out of order": (
        _set("spec.data.window", {"start": "2026-03-01T00:00:00Z", "trainEnd": "2026-02-01T00:00:00Z"}),
        "spec.data.window.start",
        "cel",
        "before",
    ),
    "name too long for KubeRay": (
        _set("metadata.name", "a-ranking-model-name-longer-than-fits"),
        "metadata.name",
        "operator",
        "KubeRay allows 47",
    ),
    "name not a DNS-1035 label": (_set("metadata.name", "9lives"), "metadata.name", "operator", "DNS-1035"),
    "bad node selector key": (
        _set("spec.training.nodePool", {"nodeSelector": {"gpu pool!": "a"}}),
        "spec.training.nodePool.nodeSelector[gpu pool!]",
        "operator",
        "label key",
    ),
    "Exists toleration with a value": (
        _set(
            "spec.training.nodePool",
            {"tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "value": "x"}]},
        ),
        "spec.training.nodePool.tolerations[0].value",
        "operator",
        "must be empty",
    ),
}


@pytest.mark.parametrize("case", list(BAD), ids=list(BAD))
def test_a_bad_manifest_is_rejected_naming_the_field(manifest: dict[str, Any], case: str) -> None:
    edit, field, layer, words = BAD[case]
    edit(manifest)
    problems = validate_manifest(manifest)
    assert any(p.field == field and p.layer == layer and words in p.message for p in problems), problems


def test_schema_defaults_are_applied_before_the_rules_as_the_api_server_does(
    manifest: dict[str, Any],
) -> None:
    manifest["spec"]["serving"] = {"candidatesLimit": 5}  # setwiseTopK defaults to 10 > 5
    problems = validate_manifest(manifest)
    assert [(p.field, p.layer) for p in problems] == [("spec.serving.setwiseTopK", "cel")]
    defaulted = apply_defaults(manifest, ranking_model_schema())
    assert defaulted["spec"]["training"]["resources"] == {"cpu": "4", "memory": "16Gi"}
    assert defaulted["spec"]["serving"]["resources"] == {"cpu": "2", "memory": "8Gi"}
    assert "resources" not in manifest["spec"]["training"], "defaulting must not touch its input"


def test_date_time_fields_are_cel_timestamps_not_strings(manifest: dict[str, Any]) -> None:
    """'2026-10-01' > '2026-9-30' as strings but not as times: the rule must compare times."""
    manifest["spec"]["data"]["window"] = {
        "start": "2026-09-30T00:00:00+02:00",
        "trainEnd": "2026-09-29T23:30:00Z",
    }
    schema = ranking_model_schema()
    problems = cel_problems(apply_defaults(manifest, schema), schema)
    assert [p.field for p in problems] == [], "22:00Z on the 29th is before 23:30Z"
    manifest["spec"]["data"]["window"]["trainEnd"] = "2026-09-29T21:00:00Z"
    problems = cel_problems(apply_defaults(manifest, schema), schema)
    assert [p.field for p in problems] == ["spec.data.window.start"]


def test_a_badly_typed_field_is_reported_once_by_the_schema_not_again_by_the_rules(
    manifest: dict[str, Any],
) -> None:
    manifest["spec"]["data"]["window"] = {"start": "yesterday"}
    problems = validate_manifest(manifest)
    assert [(p.field, p.layer) for p in problems] == [("spec.data.window.start", "schema")]


def test_every_problem_prints_as_field_colon_message() -> None:
    assert str(Problem("spec.model.kind", "bad", "schema")) == "spec.model.kind: bad"


def test_apiversion_kind_and_name_are_checked(manifest: dict[str, Any]) -> None:
    manifest["apiVersion"] = "rankray.io/v1"
    manifest["kind"] = "RankModel"
    del manifest["metadata"]["name"]
    fields = {p.field for p in validate_manifest(manifest)}
    assert {"apiVersion", "kind", "metadata.name"} <= fields


def test_admit_gives_the_operator_a_model_or_the_reasons_field_by_field(manifest: dict[str, Any]) -> None:
    assert isinstance(admit(manifest), RankingModel)
    manifest["spec"]["serving"]["setwiseTopK"] = 900
    manifest["spec"]["training"]["workers"] = 0
    rejected = admit(manifest)
    assert isinstance(rejected, RejectedModel)
    assert any(p.startswith("spec.training.workers:") for p in rejected.problems), rejected.problems
    manifest["spec"]["training"]["workers"] = 2
    rejected = admit(manifest)
    assert isinstance(rejected, RejectedModel)
    assert rejected.problems == [
        "spec.serving.setwiseTopK: serving.setwiseTopK must not exceed serving.candidatesLimit"
    ]
    manifest["spec"]["serving"]["setwiseTopK"] = 10
    manifest["metadata"]["name"] = "x" * 40
    rejected = admit(manifest)
    assert isinstance(rejected, RejectedModel) and rejected.problems[0].startswith("metadata.name: too long")


def test_the_name_rule_follows_the_generation(manifest: dict[str, Any]) -> None:
    """'NAME-vGEN-preprocess' grows with the generation: a name that fits at v9 can stop fitting at v10."""
    manifest["metadata"]["name"] = "n" * (47 - len("-v9-preprocess"))
    manifest["metadata"]["generation"] = 9
    assert isinstance(admit(manifest), RankingModel)
    manifest["metadata"]["generation"] = 10
    assert isinstance(admit(manifest), RejectedModel)
