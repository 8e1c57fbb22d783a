"""The training stage's config: what to train, on which data, how to spread it, where results go.

Everything that can be checked without touching a cluster is checked here, so a bad value fails on
the driver (or in the operator) with the field's name, before any Ray worker starts: the model's own
validators (negative sizes, ``n_heads`` not dividing ``d_model``, a history that does not fit in
``max_tokens``) run as part of parsing ``model``; the rules that tie the model to the cluster shape
run below. ``check_inputs`` adds the filesystem checks the driver can make before it starts Ray.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    field_validator,
    model_validator,
)

from workloads.data.schema import SURFACES, data_root
from workloads.models.config import DCNv2Config, HSTUConfig, LiGRConfig, LiGRRetrievalConfig, SASRecConfig

# Ranking models train on preprocessed examples; next-item retrievers on a MovieLens folder.
AnyModelConfig = Annotated[
    LiGRConfig | HSTUConfig | DCNv2Config | LiGRRetrievalConfig | SASRecConfig, Field(discriminator="kind")
]
RETRIEVAL_KINDS = frozenset({"ligr_retrieval", "sasrec"})
NAME_PATTERN = r"^[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?$"  # a DNS label: it becomes a Kubernetes name too


def _default_storage() -> Path:
    return data_root() / "ray_results"


def _default_artifacts() -> Path:
    return data_root() / "models"


class TrainConfig(BaseModel):
    """`python -m workloads.train`: train a ranking model with Ray Train and publish a versioned artifact."""

    model_config = ConfigDict(extra="forbid")

    # what and on which data
    model: AnyModelConfig = Field(
        description="kind: ligr | hstu | dcnv2 | ligr_retrieval | sasrec, and sizes"
    )
    examples_dir: Path = Field(
        description="ranking: preprocessed train/ and eval/ parquet; retrieval: a MovieLens folder"
    )
    world_dir: Path | None = Field(
        None, description="ranking models: the world folder, whose items.parquet gives content embeddings"
    )
    semantic_ids_path: Path | None = Field(None, description="RQ-VAE semantic ids parquet (use_semantic_ids)")
    surfaces: list[Literal["feed", "jobs"]] = Field(
        ["feed"], min_length=1, description=f"which of {SURFACES} to train on"
    )
    # how long
    epochs: PositiveInt = 3
    batch_size: PositiveInt = Field(64, description="rows (sessions) per worker per step")
    eval_batch_size: PositiveInt = 256
    grad_clip: PositiveFloat | None = Field(1.0, description="max gradient norm; None disables clipping")
    progress_seconds: PositiveFloat = Field(30.0, description="rank 0 logs step, loss, events/s this often")
    seed: int = 0
    # how it is spread
    num_workers: PositiveInt = 2
    cpus_per_worker: PositiveInt = Field(1, description="CPUs a worker reserves; torch uses as many threads")
    use_gpu: bool = False
    strategy: Literal["ddp", "fsdp2"] = "ddp"
    shard_embeddings: bool = Field(
        False, description="split large id tables column-wise over workers (DTensor)"
    )
    embedding_shard_min_rows: PositiveInt = Field(1024, description="only tables this large are sharded")
    mixed_precision: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    # fault tolerance and outputs
    max_failures: NonNegativeInt = Field(0, description="worker-group restarts from the latest checkpoint")
    keep_checkpoints: PositiveInt | None = Field(None, description="checkpoints kept (None: every epoch's)")
    storage_path: Path = Field(default_factory=_default_storage, description="Ray Train run storage")
    artifact_root: Path = Field(default_factory=_default_artifacts)
    name: str = Field(
        "ligr", pattern=NAME_PATTERN, description="model name: <artifact_root>/<name>/v<version>"
    )
    version: PositiveInt = Field(1, description="artifact version; published versions are never overwritten")
    ray_address: str | None = Field(
        None,
        description="Ray cluster to join ('auto': the one on this host); None: $RAY_ADDRESS, else a new one",
    )
    # fault injection for tests and chaos drills: rank 0 dies (os._exit) after the first step of this
    # epoch, once per run (a marker under the run's storage folder remembers that it already did)
    crash_at_epoch: PositiveInt | None = None

    @property
    def is_retrieval(self) -> bool:
        return self.model.kind in RETRIEVAL_KINDS

    @property
    def backend(self) -> Literal["nccl", "gloo"]:
        return "nccl" if self.use_gpu else "gloo"

    @property
    def autocast_bf16(self) -> bool:
        return self.use_gpu and self.mixed_precision

    @property
    def run_name(self) -> str:
        """The Ray Train run name: a restarted job with the same name resumes from its checkpoints."""
        return f"{self.name}-v{self.version}"

    @property
    def artifact_dir(self) -> Path:
        return self.artifact_root / self.name / f"v{self.version}"

    @field_validator("examples_dir", "world_dir", "semantic_ids_path", "storage_path", "artifact_root")
    @classmethod
    def _absolute(cls, path: Path | None) -> Path | None:
        """Ray workers run in a folder of their own: a path relative to where the driver started is
        made absolute where the config is parsed, on the driver."""
        return None if path is None else Path(os.path.abspath(path))

    @model_validator(mode="after")
    def _consistent(self) -> TrainConfig:
        if not self.is_retrieval and self.world_dir is None:
            raise ValueError(f"world_dir: required for ranking models (model.kind={self.model.kind!r})")
        if self.shard_embeddings:
            if self.num_workers < 2:
                raise ValueError("shard_embeddings: column-wise sharding needs num_workers >= 2")
            width_field = "d_model" if self.is_retrieval else "id_dim"
            width = getattr(self.model, width_field)
            if width % self.num_workers:
                raise ValueError(
                    f"shard_embeddings: model.{width_field}={width} must be divisible by "
                    f"num_workers={self.num_workers} (each worker holds 1/num_workers of the columns)"
                )
        if getattr(self.model, "use_semantic_ids", False) and self.semantic_ids_path is None:
            raise ValueError("semantic_ids_path: required when model.use_semantic_ids is true")
        if self.crash_at_epoch is not None and self.crash_at_epoch > self.epochs:
            raise ValueError(f"crash_at_epoch={self.crash_at_epoch} is after the last epoch ({self.epochs})")
        return self


def check_inputs(cfg: TrainConfig) -> None:
    """Fail on the driver, before Ray starts, when inputs are missing or the artifact version is taken."""
    if cfg.is_retrieval:
        for name in ("split.parquet", "items.parquet"):
            if not (cfg.examples_dir / name).exists():
                raise FileNotFoundError(
                    f"examples_dir: {cfg.examples_dir / name} not found (run workloads.data.movielens)"
                )
    else:
        assert cfg.world_dir is not None
        for split in ("train", "eval"):
            folder = cfg.examples_dir / split
            if not folder.is_dir() or not any(folder.glob("*.parquet")):
                raise FileNotFoundError(
                    f"examples_dir: no parquet files in {folder} (run workloads.data.preprocess)"
                )
        items = cfg.world_dir / "items.parquet"
        if not items.exists():
            raise FileNotFoundError(
                f"world_dir: {items} not found (the item content embeddings come from it)"
            )
    if cfg.semantic_ids_path is not None and not cfg.semantic_ids_path.exists():
        raise FileNotFoundError(f"semantic_ids_path: {cfg.semantic_ids_path} not found")
    if cfg.artifact_dir.exists():
        raise FileExistsError(
            f"version: {cfg.artifact_dir} is already published; artifacts are immutable, pick version > "
            f"{cfg.version}"
        )
