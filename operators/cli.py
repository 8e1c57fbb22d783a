"""The `rankray` command line: data preparation, the feature store, and (later) the operator.

Each command is a thin wrapper over a workload or operator function that is runnable and testable
on its own; heavy imports happen inside the commands so `rankray --help` stays fast.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="rankray: train and serve LiGR and 360Brew ranking models on Ray.", no_args_is_help=True)
data_app = typer.Typer(help="Generate the synthetic world and prepare public data.", no_args_is_help=True)
features_app = typer.Typer(help="The Feast feature repo: build feature tables, apply, materialize.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(features_app, name="features")


def _print_summary(summary: object) -> None:
    typer.echo(json.dumps(summary, indent=2, default=str))


def _parse_overrides(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise typer.BadParameter(f"expected KEY=VALUE, got {pair!r}", param_hint="--set")
        out[key.strip()] = value.strip()
    return out


@data_app.command("synth")
def data_synth(
    out: Annotated[Path | None, typer.Option(help="Output folder (default: $RANKRAY_DATA_DIR/world).")] = None,
    members: Annotated[int, typer.Option(min=10, help="Number of members; impressions scale with it.")] = 5000,
    seed: Annotated[int, typer.Option(help="Random seed; the same seed gives the same world.")] = 0,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a WorldConfig field, e.g. --set setwise_effect=0 (repeatable)."),
    ] = None,
) -> None:
    """Generate the LinkedIn-like interaction world (members, items, sessions, impressions)."""
    from workloads.data.schema import data_root
    from workloads.data.synth import WorldConfig, generate

    cfg = WorldConfig.model_validate({"members": members, "seed": seed, **_parse_overrides(overrides or [])})
    _print_summary(generate(cfg, out or data_root() / "world"))


@data_app.command("movielens")
def data_movielens(
    out: Annotated[Path | None, typer.Option(help="Output folder (default: $RANKRAY_DATA_DIR/movielens).")] = None,
) -> None:
    """Prepare MovieLens-100K (from the recbole wheel) as an event log with a leave-one-out split."""
    from workloads.data.movielens import prepare
    from workloads.data.schema import data_root

    _print_summary(prepare(out or data_root() / "movielens"))


@features_app.command("build")
def features_build(
    world: Annotated[Path | None, typer.Option(help="World folder (default: $RANKRAY_DATA_DIR/world).")] = None,
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
) -> None:
    """Materialize every feature view up to the end of the world into the online store."""
    from workloads.data.features import materialize

    _print_summary(materialize(repo))


if __name__ == "__main__":
    app()
