"""Deploy the ranking graph's serve config locally, or render one from graph args.

    python -m workloads.serve --render args.yaml [--set setwise_top_k=0] [--port 8765] > serve.yaml
    python -m workloads.serve --config serve.yaml [--address auto] [--detach]

``--config`` deploys the same YAML a RayService carries in ``serveConfigV2`` (see
``workloads.serve.config``). Without ``--address`` it starts a Ray cluster in this process and blocks
until Ctrl-C (the cluster ends with the process); with ``--address`` it joins a running cluster, and
``--detach`` returns once the applications run. The last stdout line is a JSON summary.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from workloads.stage import describe_validation_error, raw_config


def _render(args_file: Path, overrides: list[str], host: str, port: int) -> str:
    from workloads.serve.config import serve_config, to_yaml
    from workloads.serve.graph import GraphArgs

    raw = raw_config(args_file, overrides=overrides, option="--render")  # --set task_weights.click=2
    for key in ("artifact_uri", "feature_repo", "llm_artifact_uri", "world_dir"):
        if isinstance(raw.get(key), str) and raw[key]:  # replicas do not share this shell's working directory
            raw[key] = str(Path(raw[key]).resolve())
    graph_args = GraphArgs.model_validate(raw)
    return to_yaml(serve_config(graph_args, http_host=host, http_port=port))


def _deploy(config: dict[str, Any], address: str | None, detach: bool, num_cpus: int) -> None:
    import ray

    from workloads.serve.config import deploy

    if address is None:
        ray.init(num_cpus=num_cpus, include_dashboard=False)
    else:
        ray.init(address=address)
    deploy(config)
    http = config.get("http_options", {})
    host = http.get("host", "0.0.0.0")
    url = f"http://{'127.0.0.1' if host == '0.0.0.0' else host}:{http.get('port', 8000)}"
    apps = [{"name": a["name"], "url": url + a.get("route_prefix", "/")} for a in config["applications"]]
    sys.stdout.write(json.dumps({"deployed": apps}) + "\n")
    sys.stdout.flush()
    if not detach:
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            pass


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--config", type=Path, help="serve config YAML to deploy")
    mode.add_argument(
        "--render", type=Path, metavar="ARGS_YAML", help="print the serve config for these GraphArgs"
    )
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a graph arg"
    )
    parser.add_argument("--host", default="127.0.0.1", help="HTTP host of a rendered config")
    parser.add_argument("--port", type=int, default=8000, help="HTTP port of a rendered config")
    parser.add_argument("--address", help="Ray cluster to deploy on (default: start one here)")
    parser.add_argument("--detach", action="store_true", help="return once deployed (needs --address)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of a cluster started here")
    args = parser.parse_args(argv)
    if args.detach and args.address is None:
        parser.error("--detach needs --address: a cluster started here ends with this process")
    from workloads.serve.config import validate_config

    try:  # a bad file or value is a usage error naming the option or field, not a traceback
        if args.render is not None:
            sys.stdout.write(_render(args.render, args.set, args.host, args.port))
            return
        config = validate_config(raw_config(args.config))
    except ValidationError as err:
        parser.exit(2, f"{parser.prog}: invalid {err.title}:\n{describe_validation_error(err)}\n")
    except ValueError as err:
        parser.error(str(err))
    _deploy(config, args.address, args.detach, args.num_cpus)


if __name__ == "__main__":
    main()
