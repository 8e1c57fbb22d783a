"""The ranking service under load, on loopback: latency, throughput, set-wise cost, amortized scoring.

One run builds a small world (Feast repo materialized into a temp folder), publishes a LiGR artifact
(the model of examples/feed-ligr.yaml, which `make demo` serves: its features and its two online
counters; freshly initialised unless ``--artifact`` names a trained one: the timings do not depend on
the weights), deploys the graph from its serve config exactly as ``python -m workloads.serve`` does, and
drives ``POST /v1/rank`` over HTTP from ``--concurrency`` concurrent clients:

(a) latency p50/p90/p99 and throughput at 50, 200 and 500 candidates, with and without the set-wise
    stage; the two are run in alternating rounds so load drifting on a shared machine hits both alike.
    The incremental cost of set-wise scoring is the difference of the p90s (paper: 10 ms p90), shown
    next to the server-side set-wise time the service reports per request;
(b) amortized single-pass scoring against per-candidate scoring through the full service: ranking N
    candidates as one request versus as N one-candidate requests (each re-reads and re-encodes the
    history), at the same concurrency, set-wise off. The ratio is the wall time of the N requests
    over the latency of the one.

Bounded: every cell stops after ``--requests`` requests or ``--seconds`` seconds, whichever is first.
Usage: ``python -m bench.serve [--members 300] [--concurrency 8] [--requests 96] [--seconds 60]``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parent.parent / "feature_repo"
SERVED_VIEWS = ["member_history", "member_profile", "item_features"]  # plus the model's counter views
DEMO_MANIFEST = Path(__file__).resolve().parent.parent / "examples" / "feed-ligr.yaml"
MAX_CANDIDATES = 512  # the largest --candidates scored in one pass
PORT = 8766


@dataclass
class Cell:
    """One load cell's client latencies (ms) and server-side timings."""

    latencies: list[float] = field(default_factory=list)
    setwise_ms: list[float] = field(default_factory=list)
    features_ms: list[float] = field(default_factory=list)
    pointwise_ms: list[float] = field(default_factory=list)
    wall_s: float = 0.0
    errors: int = 0

    def add(self, other: Cell) -> None:
        for name in ("latencies", "setwise_ms", "features_ms", "pointwise_ms"):
            getattr(self, name).extend(getattr(other, name))
        self.wall_s += other.wall_s
        self.errors += other.errors

    def summary(self) -> dict[str, float]:
        lat = np.asarray(self.latencies)

        def p(values: list[float], q: float) -> float:
            return round(float(np.percentile(values, q)), 1) if values else float("nan")

        return {
            "requests": len(lat),
            "errors": self.errors,
            "p50_ms": p(self.latencies, 50),
            "p90_ms": p(self.latencies, 90),
            "p99_ms": p(self.latencies, 99),
            "rps": round(len(lat) / self.wall_s, 2) if self.wall_s else float("nan"),
            "server_features_p50_ms": p(self.features_ms, 50),
            "server_pointwise_p50_ms": p(self.pointwise_ms, 50),
            "server_setwise_p50_ms": p(self.setwise_ms, 50),
            "server_setwise_p90_ms": p(self.setwise_ms, 90),
        }


def prepare(root: Path, members: int, artifact: Path | None) -> tuple[Path, Path, datetime, list[int], int]:
    """World, features, artifact, Feast apply + materialize: (repo, artifact, as_of, members, n_items).

    The default artifact is the model `make demo` serves (examples/feed-ligr.yaml: its token features and
    the two counters its candidates read online), so the timings include the counter reads.
    """
    from operators.pipeline import ligr_model_config
    from operators.run import load_manifest
    from workloads.data.features import (
        FeatureTablesConfig,
        apply,
        build_feature_tables,
        counter_reads,
        feature_store,
        offline_session,
    )
    from workloads.data.synth import WorldConfig, generate
    from workloads.models.config import LiGRConfig
    from workloads.models.registry import build_model
    from workloads.train.artifact import feature_spec, save_artifact

    world = root / "data" / "world"
    generate(WorldConfig(members=members, seed=0), world)
    repo = shutil.copytree(REPO, root / "feature_repo", ignore=shutil.ignore_patterns("__pycache__", "data"))
    os.environ["RANKRAY_DATA_DIR"] = str(root / "data")
    if artifact is None:
        demo = ligr_model_config(load_manifest(DEMO_MANIFEST).spec.model)
        cfg = LiGRConfig.model_validate({**demo, "max_candidates": MAX_CANDIDATES, "dropout": 0.0})
        artifact = save_artifact(
            root / "models" / "ligr" / "v1",
            build_model(cfg).state_dict(),
            cfg,
            name="ligr",
            version=1,
            feature_spec=feature_spec(cfg, str(world / "items.parquet"), None),
        )
    counters = json.loads((artifact / "feature_spec.json").read_text()).get("counter_features", [])
    views = SERVED_VIEWS + [group.view for group, _ in counter_reads(counters)]
    with offline_session():
        built = build_feature_tables(world, FeatureTablesConfig(history_len=64, counter_snapshots=1))
        apply(repo)
        end = datetime.fromisoformat(built["end"])
        feature_store(repo).materialize(
            start_date=datetime(2000, 1, 1, tzinfo=UTC),
            end_date=end + timedelta(seconds=1),
            feature_views=views,
        )
    histories = pd.read_parquet(world / "features" / "member_history.parquet")
    with_history = histories.loc[histories["history_len"] > 0, "member_id"].astype(int).tolist()
    n_items = len(pd.read_parquet(world / "items.parquet", columns=["item_id"]))
    return repo, artifact, end, with_history, n_items


async def run_cell(
    http: httpx.AsyncClient, bodies: list[dict[str, Any]], concurrency: int, seconds: float
) -> Cell:
    """Send ``bodies`` with ``concurrency`` clients until done or ``seconds`` pass."""
    cell = Cell()
    queue = iter(bodies)
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        for body in queue:
            if time.perf_counter() > deadline:
                return
            began = time.perf_counter()
            response = await http.post("/v1/rank", json=body)
            elapsed = (time.perf_counter() - began) * 1e3
            if response.status_code != 200:
                cell.errors += 1
                continue
            timings = response.json()["timings"]
            cell.latencies.append(elapsed)
            cell.features_ms.append(timings["features_ms"])
            cell.pointwise_ms.append(timings["pointwise_ms"])
            if body.get("setwise", True):
                cell.setwise_ms.append(timings["setwise_ms"])

    began = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    cell.wall_s = time.perf_counter() - began
    return cell


def bodies_for(
    rng: np.random.Generator, members: list[int], n_items: int, n: int, count: int, setwise: bool, as_of: str
) -> list[dict[str, Any]]:
    return [
        {
            "member_id": int(rng.choice(members)),
            "surface": "feed",
            "candidates": rng.choice(n_items, size=n, replace=False).tolist(),
            "setwise": setwise,
            "as_of": as_of,
        }
        for _ in range(count)
    ]


async def measure(base: str, members: list[int], n_items: int, as_of: str, args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    rounds = 4
    results: dict[str, Any] = {"latency": [], "amortized": []}
    async with httpx.AsyncClient(base_url=base, timeout=120) as http:
        await run_cell(
            http,
            bodies_for(rng, members, n_items, 50, 2 * args.concurrency, True, as_of),
            args.concurrency,
            60,
        )
        for n in args.candidates:
            cells = {True: Cell(), False: Cell()}
            for _ in range(rounds):  # alternate, so drifting machine load hits both sides alike
                for setwise in (True, False):
                    bodies = bodies_for(rng, members, n_items, n, args.requests // rounds, setwise, as_of)
                    cells[setwise].add(await run_cell(http, bodies, args.concurrency, args.seconds / rounds))
            on, off = cells[True].summary(), cells[False].summary()
            row = {"candidates": n, "setwise": on, "pointwise_only": off}
            row["setwise_incremental_p90_ms"] = round(on["p90_ms"] - off["p90_ms"], 1)
            row["setwise_incremental_p50_ms"] = round(on["p50_ms"] - off["p50_ms"], 1)
            results["latency"].append(row)
            print(json.dumps(row), flush=True)
        n = args.amortized_candidates
        single, per_candidate = [], []
        for _ in range(args.amortized_repeats):
            member = int(rng.choice(members))
            items = rng.choice(n_items, size=n, replace=False).tolist()
            one = {
                "member_id": member,
                "surface": "feed",
                "candidates": items,
                "setwise": False,
                "as_of": as_of,
            }
            cell = await run_cell(http, [one], 1, 120)
            single.append(cell.latencies[0])
            each = [{**one, "candidates": [item]} for item in items]
            cell = await run_cell(http, each, args.concurrency, 600)
            if cell.errors or len(cell.latencies) != n:
                raise RuntimeError(
                    f"per-candidate run incomplete: {len(cell.latencies)}/{n}, {cell.errors} errors"
                )
            per_candidate.append(cell.wall_s * 1e3)
        row = {
            "candidates": n,
            "single_pass_ms_median": round(statistics.median(single), 1),
            "per_candidate_ms_median": round(statistics.median(per_candidate), 1),
            "ratio": round(statistics.median(per_candidate) / statistics.median(single), 1),
            "repeats": args.amortized_repeats,
        }
        results["amortized"].append(row)
        print(json.dumps(row), flush=True)
    return results


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        f"Concurrency {args.concurrency}; per cell up to {args.requests} requests or {args.seconds:.0f} s.",
        "",
        "| candidates | set-wise | p50 ms | p90 ms | p99 ms | req/s | server set-wise p50/p90 ms |",
        "| ---: | :---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in results["latency"]:
        for label, key in (("on", "setwise"), ("off", "pointwise_only")):
            s = row[key]
            server = (
                f"{s['server_setwise_p50_ms']} / {s['server_setwise_p90_ms']}" if key == "setwise" else "-"
            )
            cells = [row["candidates"], label, s["p50_ms"], s["p90_ms"], s["p99_ms"], s["rps"], server]
            lines.append("| " + " | ".join(map(str, cells)) + " |")
    lines += ["", "| candidates | set-wise incremental p50 ms | p90 ms |", "| ---: | ---: | ---: |"]
    for row in results["latency"]:
        cells = [row["candidates"], row["setwise_incremental_p50_ms"], row["setwise_incremental_p90_ms"]]
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    for row in results["amortized"]:
        lines += [
            "",
            f"Amortized: {row['candidates']} candidates as one request {row['single_pass_ms_median']} ms, as "
            f"{row['candidates']} one-candidate requests {row['per_candidate_ms_median']} ms "
            f"(median of {row['repeats']}): ratio {row['ratio']}x.",
        ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--members", type=int, default=300, help="world size (items scale with it; >= 500 items)"
    )
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--requests", type=int, default=96, help="requests per cell (set-wise on or off)")
    parser.add_argument("--seconds", type=float, default=60.0, help="time limit per cell")
    parser.add_argument("--candidates", type=int, nargs="+", default=[50, 200, 500])
    parser.add_argument("--amortized-candidates", type=int, default=200)
    parser.add_argument("--amortized-repeats", type=int, default=3)
    parser.add_argument("--artifact", type=Path, help="a trained LiGR artifact (default: a fresh one)")
    parser.add_argument("--num-cpus", type=int, default=4, help="logical CPUs of the local Ray cluster")
    args = parser.parse_args(argv)
    if args.artifact is None and max(args.candidates) > MAX_CANDIDATES:
        parser.error(f"--candidates: at most {MAX_CANDIDATES} (the benchmark model's max_candidates)")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    import ray
    from ray import serve

    from workloads.serve.config import deploy, serve_config
    from workloads.serve.graph import GraphArgs

    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        began = time.perf_counter()
        repo, artifact, end, members, n_items = prepare(Path(tmp), args.members, args.artifact)
        if n_items < max(args.candidates):
            raise SystemExit(
                f"--members {args.members} gives {n_items} items, fewer than {max(args.candidates)}"
            )
        print(f"prepared world and features in {time.perf_counter() - began:.0f}s", flush=True)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, log_to_driver=False)
        try:
            graph = GraphArgs(artifact_uri=str(artifact), feature_repo=str(repo), max_batch_size=8)
            began = time.perf_counter()
            deploy(serve_config(graph, http_host="127.0.0.1", http_port=PORT), timeout_s=900)
            print(f"deployed in {time.perf_counter() - began:.0f}s", flush=True)
            results = asyncio.run(
                measure(f"http://127.0.0.1:{PORT}", members, n_items, end.isoformat(), args)
            )
        finally:
            serve.shutdown()
            ray.shutdown()
    print(markdown(results, args))
    print(json.dumps({"bench": "serve", "args": vars(args) | {"artifact": str(args.artifact)}, **results}))


if __name__ == "__main__":
    main()
