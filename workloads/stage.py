"""One way for every workload to read its pydantic config from the command line.

The operator launches each stage as ``python -m workloads.<stage> --config-json '<json>'`` (KubeRay
RayJob entrypoint or Ray Job Submission); a person runs ``--config file.yaml`` with ``--set key=value``
overrides. Either way the config is validated before any Ray work starts, and a bad value fails with
the field's dotted path.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from opentelemetry import metrics, trace
from pydantic import BaseModel, ValidationError

from workloads import telemetry

C = TypeVar("C", bound=BaseModel)

tracer = trace.get_tracer(__name__)
stage_seconds = metrics.get_meter(__name__).create_histogram(
    "rankray.stage.duration", unit="s", description="Wall time of a workload stage, by config and outcome"
)


def describe_validation_error(err: ValidationError) -> str:
    """One line per bad field, ``dotted.path: what was expected (got value)``, for a person to read."""
    lines = []
    for error in err.errors(include_url=False):
        where = ".".join(str(part) for part in error["loc"]) or "(the whole config)"
        got = error.get("input")
        shown = "" if error["type"] == "missing" or isinstance(got, dict | list) else f" (got {got!r:.60})"
        lines.append(f"{where}: {error['msg']}{shown}")
    return "\n".join(lines)


def _yaml_problem(err: yaml.YAMLError) -> str:
    if isinstance(err, yaml.MarkedYAMLError) and err.problem_mark is not None:
        mark = err.problem_mark
        return f"{err.problem} at line {mark.line + 1}, column {mark.column + 1}"
    return " ".join(str(err).split())


def _as_mapping(loaded: Any, source: str) -> dict[str, Any]:
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        kind = type(loaded).__name__
        raise ValueError(f"{source} must hold a mapping of field names to values, got a {kind}")
    return loaded


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for depth, key in enumerate(parents):
        target = target.setdefault(key, {})
        if not isinstance(target, dict):
            section = ".".join(parents[: depth + 1])
            raise ValueError(f"--set {dotted}: {section} is {target!r}, not a section with fields")
    target[leaf] = value


def raw_config(
    config: Path | None,
    config_json: str | None = None,
    overrides: Sequence[str] = (),
    option: str = "--config",
) -> dict[str, Any]:
    """The config as plain data, not yet validated: the file, then the JSON, then ``a.b=value`` overrides.

    A ValueError names the option that could not be read and why (``option`` is the file's flag).
    """
    raw: dict[str, Any] = {}
    if config is not None:
        try:
            text = config.read_text()
        except OSError as err:
            raise ValueError(f"{option} {config}: cannot read it ({err.strerror or err})") from err
        try:
            raw.update(_as_mapping(yaml.safe_load(text), f"{option} {config}"))
        except yaml.YAMLError as err:
            raise ValueError(f"{option} {config}: not valid YAML: {_yaml_problem(err)}") from err
    if config_json:
        try:
            raw.update(_as_mapping(json.loads(config_json), "--config-json"))
        except json.JSONDecodeError as err:
            raise ValueError(f"--config-json: not valid JSON: {err}") from err
    for pair in overrides:
        key, sep, value = pair.partition("=")
        if not sep or not all(key.split(".")):
            raise ValueError(f"--set expects KEY=VALUE with KEY a (dotted) field name, got {pair!r}")
        try:
            parsed = yaml.safe_load(value)
        except yaml.YAMLError as err:
            problem = _yaml_problem(err)
            raise ValueError(f"--set {key}: {value!r} is not a valid YAML value: {problem}") from err
        _set_dotted(raw, key, parsed)
    return raw


def parse_config(model: type[C], argv: Sequence[str] | None = None, description: str | None = None) -> C:
    """Build ``model`` from ``--config FILE``, ``--config-json STR``, then ``--set a.b=value`` overrides.

    Any bad input exits with status 2 and a message naming the option or field, never a traceback:
    the operator shows that message to the user as the stage's failure.
    """
    parser = argparse.ArgumentParser(description=description or model.__doc__)
    parser.add_argument("--config", type=Path, help="YAML or JSON file with the stage config")
    parser.add_argument("--config-json", help="the stage config as a JSON string (what the operator passes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    try:
        raw = raw_config(args.config, args.config_json, args.set)
    except ValueError as err:
        parser.error(str(err))
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        parser.exit(2, f"{parser.prog}: invalid {model.__name__}:\n{describe_validation_error(err)}\n")


def run_stage(model: type[C], main: Callable[[C], object], argv: Sequence[str] | None = None) -> None:
    """Parse the config, run the stage, print its JSON summary on the last line (the operator reads it)."""
    cfg = parse_config(model, argv)
    telemetry.configure("rankray-stage")
    began, outcome = time.perf_counter(), "error"
    try:
        with tracer.start_as_current_span(
            f"stage {model.__name__}", attributes={"rankray.config": model.__name__}
        ):
            summary = main(cfg)
        outcome = "ok"
    finally:
        stage_seconds.record(
            time.perf_counter() - began, {"rankray.config": model.__name__, "outcome": outcome}
        )
        telemetry.flush()
    sys.stdout.write(json.dumps(summary, default=str) + "\n")
