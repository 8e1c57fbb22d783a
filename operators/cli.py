"""The `rankray` command line: data preparation, the feature store, the CRD, validation, the operator.

Each command is a thin wrapper over a workload or operator function that is runnable and testable
on its own; heavy imports happen inside the commands so `rankray --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="rankray: train and serve LiGR and 360Brew ranking models on Ray.", no_args_is_help=True
)
data_app = typer.Typer(help="Generate the synthetic world and prepare public data.", no_args_is_help=True)
features_app = typer.Typer(
    help="The Feast feature repo: build feature tables, apply, materialize.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")


def _print_summary(summary: object) -> None:
    typer.echo(json.dumps(summary, indent=2, default=str))


def _parse_overrides(pairs: list[str], option: str = "--set") -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint=option)
        out[key.strip()] = value.strip()
    return out


@data_app.command("synth")
def data_synth(
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: $RANKRAY_DATA_DIR/world).")
    ] = None,
    members: Annotated[
        int, typer.Option(min=10, help="Number of members; impressions scale with it.")
    ] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same world.")] = 0,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a WorldConfig field, e.g. --set setwise_effect=0 (repeatable)."),
    ] = None,
) -> None:
    """Generate the LinkedIn-like interaction world (members, items, sessions, impressions)."""
    from pydantic import ValidationError

    from workloads.data.schema import data_root
    from workloads.data.synth import WorldConfig, generate
    from workloads.stage import describe_validation_error

    fields = {"members": members, "seed": seed, **_parse_overrides(overrides or [])}
    try:
        cfg = WorldConfig.model_validate(fields)
    except ValidationError as err:
        raise typer.BadParameter(describe_validation_error(err), param_hint="--members/--seed/--set") from err
    _print_summary(generate(cfg, out or data_root() / "world"))


@data_app.command("movielens")
def data_movielens(
    out: Annotated[
        Path | None, typer.Option(help="Output folder (default: $RANKRAY_DATA_DIR/movielens).")
    ] = None,
) -> None:
    """Prepare MovieLens-100K (from the recbole wheel) as an event log with a leave-one-out split."""
    from workloads.data.movielens import prepare
    from workloads.data.schema import data_root

    _print_summary(prepare(out or data_root() / "movielens"))


@features_app.command("build")
def features_build(
    world: Annotated[
        Path | None, typer.Option(help="World folder (default: $RANKRAY_DATA_DIR/world).")
    ] = None,
) -> None:
    """Compute the feature tables (histories, counters, profiles) the Feast repo serves."""
    from workloads.data.features import build_feature_tables
    from workloads.data.schema import data_root

    _print_summary(build_feature_tables(world or data_root() / "world"))


@features_app.command("apply")
def features_apply(
    repo: Annotated[Path, typer.Option(help="Feast repo folder.")] = Path("feature_repo"),
) -> None:
    """`feast apply` on the repo (registers entities, views and services)."""
    from workloads.data.features import apply

    _print_summary(apply(repo))


@features_app.command("materialize")
def features_materialize(
    repo: Annotated[Path, typer.Option(help="Feast repo folder.")] = Path("feature_repo"),
    services: Annotated[
        list[str] | None,
        typer.Option("--service", help="Only the views of this feature service (repeatable); default: all."),
    ] = None,
) -> None:
    """Materialize feature views up to the end of the world into the online store."""
    from workloads.data.features import materialize

    try:
        summary = materialize(repo, services)
    except ValueError as err:
        raise typer.BadParameter(str(err), param_hint="--service") from err
    except FileNotFoundError as err:
        typer.echo(f"Error: {err}", err=True)
        raise typer.Exit(1) from err
    _print_summary(summary)


@app.command("crd")
def crd(
    out: Annotated[Path | None, typer.Option(help="Write to this file instead of stdout.")] = None,
    reference: Annotated[
        bool, typer.Option("--reference", help="Print the Markdown field reference (docs/crd.md) instead.")
    ] = False,
) -> None:
    """Print the RankingModel CustomResourceDefinition, generated from the pydantic models."""
    from operators.api.crd import crd_yaml
    from operators.api.reference import reference_markdown

    text = reference_markdown() if reference else crd_yaml()
    if out is None:
        typer.echo(text, nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(text)
        tmp.replace(out)  # atomic: a reader never sees half a CRD


@app.command("validate")
def validate(
    files: Annotated[
        list[Path],
        typer.Option("--file", "-f", exists=True, dir_okay=False, help="Manifest file (repeatable)."),
    ],
) -> None:
    """Check RankingModel manifests offline as the API server and the operator would; exit 1 if any is bad."""
    import yaml

    from operators.validate import validate_manifest

    failed = False
    for path in files:
        try:
            documents = [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]
        except yaml.YAMLError as err:
            typer.echo(f"{path}: not valid YAML: {err}", err=True)
            failed = True
            continue
        if not documents:
            typer.echo(f"{path}: no manifest in the file", err=True)
            failed = True
        for index, document in enumerate(documents):
            name = (document.get("metadata") or {}).get("name", "?") if isinstance(document, dict) else "?"
            where = f"{path} (document {index + 1}, {name})" if len(documents) > 1 else f"{path} ({name})"
            problems = validate_manifest(document)
            if problems:
                failed = True
                for problem in problems:
                    typer.echo(f"{where}: {problem}", err=True)
            else:
                typer.echo(f"{where}: valid")
    raise typer.Exit(1 if failed else 0)


@app.command("operator")
def operator(
    namespaces: Annotated[
        list[str] | None,
        typer.Option("--namespace", "-n", help="Namespace to watch (repeatable); default: all namespaces."),
    ] = None,
    sync_interval: Annotated[
        float,
        typer.Option(
            min=1.0, envvar="RANKRAY_SYNC_INTERVAL_SECONDS", help="Seconds between resyncs of a model."
        ),
    ] = 15.0,
    liveness: Annotated[
        str | None, typer.Option(help="Liveness endpoint, e.g. http://0.0.0.0:8080/healthz.")
    ] = None,
    peering: Annotated[
        str | None, typer.Option(help="kopf peering name, for more than one replica (default: standalone).")
    ] = None,
    priority: Annotated[
        int | None,
        typer.Option(help="kopf peering priority: with peering, the highest-priority replica acts."),
    ] = None,
    verbose: Annotated[bool, typer.Option(help="Log every handler run.")] = False,
) -> None:
    """Run the RankingModel operator (kopf) against the cluster of the kubeconfig or the service account."""
    import os

    os.environ["RANKRAY_SYNC_INTERVAL_SECONDS"] = str(sync_interval)  # read when the handlers are imported
    import kopf

    import operators.handlers  # noqa: F401  (registers the handlers)

    kopf.configure(verbose=verbose)
    kopf.run(
        clusterwide=not namespaces,
        namespaces=namespaces or (),
        standalone=peering is None,
        peering_name=peering,
        priority=priority,
        liveness_endpoint=liveness,
    )


@app.command("run")
def run(
    file: Annotated[
        Path, typer.Option("--file", "-f", exists=True, dir_okay=False, help="RankingModel manifest.")
    ],
    ray_address: Annotated[
        str | None,
        typer.Option(help="Dashboard URL of a running Ray cluster (default: start a Ray head here)."),
    ] = None,
    keep: Annotated[bool, typer.Option(help="Keep the Ray head (and the endpoint) up until Ctrl-C.")] = False,
    timeout: Annotated[
        float | None, typer.Option(min=1.0, help="Give up after this many seconds (default: no limit).")
    ] = None,
    retry: Annotated[
        bool, typer.Option("--retry", help="Run failed stages again (forget their failed jobs).")
    ] = False,
    mounts: Annotated[
        list[str] | None,
        typer.Option(
            "--mount",
            help="URI_PREFIX=DIR: where a storage prefix of the spec lives here, e.g. "
            "pvc://rankray-data=./data (repeatable; adds to the defaults).",
        ),
    ] = None,
    num_cpus: Annotated[int, typer.Option(min=1, help="Logical CPUs of the Ray head.")] = 4,
    serve_port: Annotated[
        int, typer.Option(min=0, max=65535, help="HTTP port of the endpoint (0 or taken: a free one).")
    ] = 8000,
    sample: Annotated[bool, typer.Option(help="Send sample ranking requests once it serves.")] = True,
    delete: Annotated[
        bool,
        typer.Option("--delete", help="Tear the model down instead: stop its jobs, delete its Serve app."),
    ] = False,
) -> None:
    """Run a RankingModel on a local Ray cluster: the operator's reconcile loop, to a served endpoint."""
    from operators.run import RunOptions, default_mounts
    from operators.run import run as run_model

    table = default_mounts()
    for prefix, folder in _parse_overrides(mounts or [], "--mount").items():
        table[prefix] = Path(folder)
    options = RunOptions(
        manifest=file,
        ray_address=ray_address,
        keep=keep,
        timeout=timeout,
        retry=retry,
        mounts=table,
        num_cpus=num_cpus,
        serve_port=serve_port,
        sample=sample,
        delete=delete,
    )
    raise typer.Exit(run_model(options))


if __name__ == "__main__":
    app()
