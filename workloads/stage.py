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
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

C = TypeVar("C", bound=BaseModel)


def _set_dotted(target: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, leaf = dotted.split(".")
    for key in parents:
        target = target.setdefault(key, {})
    target[leaf] = value


def parse_config(model: type[C], argv: Sequence[str] | None = None, description: str | None = None) -> C:
    """Build ``model`` from ``--config FILE``, ``--config-json STR``, then ``--set a.b=value`` overrides."""
    parser = argparse.ArgumentParser(description=description or model.__doc__)
    parser.add_argument("--config", type=Path, help="YAML or JSON file with the stage config")
    parser.add_argument("--config-json", help="the stage config as a JSON string (what the operator passes)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field")
    args = parser.parse_args(argv)
    raw: dict[str, Any] = {}
    if args.config is not None:
        raw = yaml.safe_load(args.config.read_text()) or {}
    if args.config_json:
        raw.update(json.loads(args.config_json))
    for pair in args.set:
        key, sep, value = pair.partition("=")
        if not sep:
            parser.error(f"--set expects KEY=VALUE, got {pair!r}")
        _set_dotted(raw, key, yaml.safe_load(value))
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        parser.exit(2, f"invalid {model.__name__}:\n{err}\n")


def run_stage(model: type[C], main: Callable[[C], object], argv: Sequence[str] | None = None) -> None:
    """Parse the config, run the stage, print its JSON summary on the last line (the operator reads it)."""
    cfg = parse_config(model, argv)
    summary = main(cfg)
    sys.stdout.write(json.dumps(summary, default=str) + "\n")
