"""Validation, three layers deep, offline: what the API server checks, then what only the operator can.

1. The CRD's openAPIV3Schema, after the API server's defaulting (types, enums, bounds, patterns, required
   fields), plus unknown fields as `kubectl apply`'s strict field validation reports them.
2. The CEL rules (`x-kubernetes-validations`), evaluated with cel-python on values typed as the API server
   types them (a `date-time` string is a CEL timestamp).
3. The operator's own rules: what depends on state Kubernetes does not have at admission (the generation in
   child names, KubeRay's name limits) or is only checked later, inside a Pod (label and toleration syntax).

`rankray validate` runs all three on a file; the operator runs 2 and 3 (and pydantic's parse, which mirrors 1)
on every object it reconciles, so a manifest that reached it some other way is still refused by field.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import celpy
from celpy import celtypes
from openapi_schema_validator import OAS30Validator
from pydantic import ValidationError

from operators.api.crd import crd, version_schema
from operators.api.v1alpha1 import (
    API_VERSION,
    KIND,
    VERSION,
    NodePool,
    ObjectMeta,
    RankingModel,
    RankingModelSpec,
    RankingModelStatus,
    RejectedModel,
    TolerationOperator,
)
from operators.pipeline import STAGES, job_name, service_name

Schema = Mapping[str, Any]

# KubeRay appends 6 characters to RayJob and RayService names for the RayCluster it creates, whose names are
# capped at 53 (ray-operator/controllers/ray/utils/constant.go), and requires DNS-1035 labels.
KUBERAY_MAX_NAME_LENGTH = 47
_DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
# Label keys: an optional DNS subdomain prefix, then a name of at most 63 characters (apimachinery).
_LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest, named by its field path."""

    field: str
    message: str
    layer: Literal["schema", "cel", "operator"]

    def __str__(self) -> str:
        return f"{self.field}: {self.message}"


@functools.cache
def ranking_model_schema() -> Schema:
    return version_schema(crd(), VERSION)


# --- 1. Schema ----------------------------------------------------------------------------------------------


def apply_defaults(obj: Any, schema: Schema) -> Any:
    """A copy of `obj` with the schema's defaults filled in, as the API server does before validating."""
    obj = copy.deepcopy(obj)
    _default_in_place(obj, schema)
    return obj


def _default_in_place(obj: Any, schema: Schema) -> None:
    if isinstance(obj, dict):
        for name, prop in schema.get("properties", {}).items():
            if name not in obj and "default" in prop:
                obj[name] = copy.deepcopy(prop["default"])
            if name in obj:
                _default_in_place(obj[name], prop)
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for value in obj.values():
                _default_in_place(value, extra)
    elif isinstance(obj, list) and "items" in schema:
        for item in obj:
            _default_in_place(item, schema["items"])


def _dotted(prefix: str, path: Iterator[Any] | list[Any]) -> str:
    out = prefix
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def schema_problems(obj: Any, schema: Schema, prefix: str = "") -> list[Problem]:
    """The openAPIV3Schema checks (OpenAPI 3.0 semantics, `nullable` included) and unknown fields."""
    validator = OAS30Validator(schema, format_checker=OAS30Validator.FORMAT_CHECKER)
    problems = []
    for error in validator.iter_errors(obj):
        field = _dotted(prefix, list(error.absolute_path))
        if error.validator == "required":
            missing = re.match(r"'(.+)' is a required property", error.message)
            field = _dotted(field, [missing.group(1)]) if missing else field
            problems.append(Problem(field, "required field is missing", "schema"))
        else:
            problems.append(Problem(field, error.message, "schema"))
    problems += _unknown_and_untyped(obj, schema, prefix)
    return sorted(set(problems), key=lambda p: (p.field, p.message))


def _unknown_and_untyped(obj: Any, schema: Schema, path: str) -> list[Problem]:
    """What OpenAPI validation misses: unknown fields (pruned, or rejected by kubectl) and int-or-string."""
    if schema.get("x-kubernetes-int-or-string") and not isinstance(obj, int | str):
        return [Problem(path, f"{obj!r} must be an integer or a string", "schema")]
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    problems: list[Problem] = []
    if isinstance(obj, dict):
        props = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            child = _dotted(path, [key])
            if props is not None and key in props:
                problems += _unknown_and_untyped(value, props[key], child)
            elif isinstance(extra, Mapping):
                problems += _unknown_and_untyped(value, extra, child)
            elif props is not None:
                problems.append(Problem(child, "unknown field", "schema"))
    elif isinstance(obj, list) and "items" in schema:
        for index, item in enumerate(obj):
            problems += _unknown_and_untyped(item, schema["items"], _dotted(path, [index]))
    return problems


# --- 2. CEL -------------------------------------------------------------------------------------------------


@functools.cache
def _cel_program(rule: str) -> celpy.Runner:
    env = celpy.Environment()
    return env.program(env.compile(rule))


def compile_rules(schema: Schema | None = None) -> int:
    """Compile every CEL rule of a schema ahead of use (the first compile builds the parser: ~2 s)."""
    stack, count = [schema if schema is not None else ranking_model_schema()], 0
    while stack:
        node = stack.pop()
        for rule in node.get("x-kubernetes-validations", []):
            _cel_program(rule["rule"])
            count += 1
        stack += list(node.get("properties", {}).values())
        stack += [
            node[key] for key in ("items", "additionalProperties") if isinstance(node.get(key), Mapping)
        ]
    return count


def to_cel(value: Any, schema: Schema) -> celtypes.Value:
    """A JSON value as the API server hands it to CEL: typed by its schema, not by its JSON spelling."""
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return celtypes.MapType(
            {
                celtypes.StringType(k): to_cel(v, props.get(k, extra if isinstance(extra, Mapping) else {}))
                for k, v in value.items()
            }
        )
    if isinstance(value, list):
        return celtypes.ListType([to_cel(v, schema.get("items", {})) for v in value])
    if isinstance(value, bool):
        return celtypes.BoolType(value)
    if isinstance(value, int) and schema.get("type") != "number":
        return celtypes.IntType(value)
    if isinstance(value, int | float):
        return celtypes.DoubleType(float(value))
    if isinstance(value, str) and schema.get("format") in ("date-time", "date"):
        try:
            return celtypes.TimestampType(value)
        except ValueError:  # the schema check reports the bad format; the rules then cannot evaluate
            return celtypes.StringType(value)
    if isinstance(value, str):
        return celtypes.StringType(value)
    raise TypeError(f"no CEL value for {value!r}")


def cel_problems(obj: Any, schema: Schema, path: str = "") -> list[Problem]:
    """Evaluate every `x-kubernetes-validations` rule on the part of `obj` it is declared on."""
    problems: list[Problem] = []
    for rule in schema.get("x-kubernetes-validations", []):
        try:
            result = _cel_program(rule["rule"]).evaluate({"self": to_cel(obj, schema)})
        except (celpy.CELEvalError, TypeError, ValueError) as err:
            problems.append(Problem(path, f"rule {rule['rule']!r} could not be evaluated: {err}", "cel"))
            continue
        if isinstance(result, celpy.CELEvalError) or not bool(result):
            field = path + rule.get("fieldPath", "") if path else rule.get("fieldPath", "").lstrip(".")
            problems.append(Problem(field, rule.get("message") or f"failed rule {rule['rule']}", "cel"))
    if isinstance(obj, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            child = props.get(key, extra if isinstance(extra, Mapping) else None)
            if child is not None:
                problems += cel_problems(value, child, _dotted(path, [key]))
    elif isinstance(obj, list) and "items" in schema:
        for index, item in enumerate(obj):
            problems += cel_problems(item, schema["items"], _dotted(path, [index]))
    return problems


# --- 3. The operator's own rules ----------------------------------------------------------------------------


def operator_problems(model: RankingModel) -> list[Problem]:
    """Rules the API server cannot apply at admission; each names the field to change."""
    problems: list[Problem] = []
    name, generation = model.metadata.name, model.metadata.generation
    children = [job_name(name, generation, stage) for stage in STAGES] + [service_name(name)]
    longest = max(children, key=len)
    if not _DNS1035.match(name):
        problems.append(
            Problem(
                "metadata.name",
                f"{name!r} must be a DNS-1035 label (lowercase letters, digits, '-'; a letter first): "
                "KubeRay requires it of the RayJobs and RayService named after it",
                "operator",
            )
        )
    elif len(longest) > KUBERAY_MAX_NAME_LENGTH:
        room = KUBERAY_MAX_NAME_LENGTH - (len(longest) - len(name))
        problems.append(
            Problem(
                "metadata.name",
                f"too long: its RayJob {longest!r} would have {len(longest)} characters, KubeRay allows "
                f"{KUBERAY_MAX_NAME_LENGTH}; use at most {room} characters at generation {generation}",
                "operator",
            )
        )
    spec = model.spec
    problems += _node_pool_problems(spec.training.node_pool, "spec.training.nodePool")
    problems += _node_pool_problems(spec.serving.llm.node_pool, "spec.serving.llm.nodePool")
    return problems


def _label_key_problem(key: str) -> str | None:
    prefix, _, label = key.rpartition("/")
    if prefix and (len(prefix) > 253 or not _DNS1123_SUBDOMAIN.match(prefix)):
        return f"prefix {prefix!r} of {key!r} must be a DNS subdomain"
    if not label or len(label) > 63 or not _LABEL_NAME.match(label):
        return f"{key!r} is not a label key (up to 63 alphanumerics, '-', '_', '.' after an optional prefix/)"
    return None


def _node_pool_problems(pool: NodePool, path: str) -> list[Problem]:
    """Pod scheduling fields the API server would only reject on the Pod, long after the RayJob exists."""
    problems = []
    for key, value in pool.node_selector.items():
        field = f"{path}.nodeSelector[{key}]"
        if (bad := _label_key_problem(key)) is not None:
            problems.append(Problem(field, bad, "operator"))
        if value and (len(value) > 63 or not _LABEL_NAME.match(value)):
            problems.append(Problem(field, f"{value!r} is not a valid label value", "operator"))
    for index, toleration in enumerate(pool.tolerations):
        field = f"{path}.tolerations[{index}]"
        if toleration.key and (bad := _label_key_problem(toleration.key)) is not None:
            problems.append(Problem(f"{field}.key", bad, "operator"))
        if toleration.operator is TolerationOperator.EXISTS and toleration.value:
            problems.append(Problem(f"{field}.value", "must be empty when operator is Exists", "operator"))
        if not toleration.key and toleration.operator is TolerationOperator.EQUAL:
            problems.append(Problem(f"{field}.key", "required when operator is Equal", "operator"))
    return problems


# --- Entry points -------------------------------------------------------------------------------------------


def _pydantic_problems(err: ValidationError, prefix: str) -> list[Problem]:
    return [Problem(_dotted(prefix, list(e["loc"])), e["msg"], "schema") for e in err.errors()]


def validate_manifest(manifest: Any) -> list[Problem]:
    """Everything `kubectl apply` and the operator would reject, offline. Empty means it would be accepted."""
    if not isinstance(manifest, dict):
        return [Problem("", "a RankingModel manifest must be a mapping", "schema")]
    problems: list[Problem] = []
    if manifest.get("apiVersion") != API_VERSION:
        problems.append(
            Problem("apiVersion", f"must be {API_VERSION}, got {manifest.get('apiVersion')!r}", "schema")
        )
    if manifest.get("kind") != KIND:
        problems.append(Problem("kind", f"must be {KIND}, got {manifest.get('kind')!r}", "schema"))
    if not (manifest.get("metadata") or {}).get("name"):
        problems.append(Problem("metadata.name", "required field is missing", "schema"))
    schema = ranking_model_schema()
    defaulted = apply_defaults(manifest, schema)
    problems += schema_problems(defaulted, schema)
    rule_problems = cel_problems(defaulted, schema)
    if problems:  # a rule over a badly typed field cannot evaluate; the schema problem already names it
        rule_problems = [p for p in rule_problems if "could not be evaluated" not in p.message]
    problems += rule_problems
    if problems:
        return problems
    try:
        model = RankingModel.model_validate(defaulted)
    except ValidationError as err:  # schema and models disagree: still say which field
        return _pydantic_problems(err, "")
    return operator_problems(model)


def admit(body: Mapping[str, Any]) -> RankingModel | RejectedModel:
    """The operator's view of an object: a valid RankingModel, or why it is rejected, field by field."""
    raw = dict(body)
    metadata = ObjectMeta.model_validate(raw.get("metadata") or {})
    try:
        status = RankingModelStatus.model_validate(raw.get("status") or {})
    except ValidationError:
        status = RankingModelStatus()  # a status we cannot read is rebuilt from what is observed
    spec_schema = ranking_model_schema()["properties"]["spec"]
    spec = apply_defaults(raw.get("spec") or {}, spec_schema)
    try:
        parsed = RankingModelSpec.model_validate(spec)
    except ValidationError as err:
        return RejectedModel(
            metadata=metadata, status=status, problems=[str(p) for p in _pydantic_problems(err, "spec")]
        )
    model = RankingModel(metadata=metadata, spec=parsed, status=status)
    problems = cel_problems(spec, spec_schema, "spec") + operator_problems(model)
    if problems:
        return RejectedModel(metadata=metadata, status=status, problems=[str(p) for p in problems])
    return model
