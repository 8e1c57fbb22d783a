"""`python -m workloads.train --config-json '<TrainConfig>'`: train with Ray Train, publish the artifact."""

from workloads.stage import run_stage
from workloads.train.config import TrainConfig
from workloads.train.trainer import train_and_publish

if __name__ == "__main__":
    run_stage(TrainConfig, train_and_publish)
