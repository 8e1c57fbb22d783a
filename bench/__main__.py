"""Run every benchmark in bench/ one after another: `python -m bench [name ...]`.

A benchmark is any module `bench/<name>.py` with a top-level `main()`; new ones are picked up
without being listed here. Each runs in its own process (a fresh Ray cluster, no memory left over
from the previous one) and a failure does not stop the others; the exit status says whether all
of them passed.
"""

from __future__ import annotations

import argparse
import ast
import subprocess
import sys
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent


def discover() -> list[str]:
    """Modules in bench/ defining a top-level `main` (found by parsing: importing pulls in Ray, torch)."""
    names = []
    for path in sorted(BENCH_DIR.glob("*.py")):
        if path.name.startswith("_"):
            continue
        tree = ast.parse(path.read_text(), filename=str(path))
        if any(isinstance(node, ast.FunctionDef) and node.name == "main" for node in tree.body):
            names.append(path.stem)
    return names


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the benchmarks in bench/ one after another.")
    parser.add_argument("names", nargs="*", help="benchmarks to run (default: all of them)")
    args = parser.parse_args(argv)
    available = discover()
    unknown = sorted(set(args.names) - set(available))
    if unknown:
        parser.error(f"unknown benchmark(s) {unknown}; available: {available}")
    failed = []
    for name in args.names or available:
        print(f"=== bench.{name} ===", flush=True)
        began = time.perf_counter()
        call = f"import bench.{name} as b; b.main()"
        code = subprocess.call([sys.executable, "-c", call], cwd=BENCH_DIR.parent)
        status = "ok" if code == 0 else f"FAILED (exit {code})"
        print(f"=== bench.{name}: {status} after {time.perf_counter() - began:.0f}s ===", flush=True)
        if code != 0:
            failed.append(name)
    if failed:
        print(f"failed benchmarks: {failed}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
