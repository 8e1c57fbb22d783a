"""`python -m workloads.eval --config-json '<EvalConfig>'`: evaluate artifacts; the last stdout line is
a JSON summary with ``gate_passed`` and ``reason``."""

from workloads.eval.evaluate import EvalConfig, run
from workloads.stage import run_stage

if __name__ == "__main__":
    run_stage(EvalConfig, run)
