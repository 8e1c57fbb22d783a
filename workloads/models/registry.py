"""Model configs by ``kind`` and the one function that builds a model from them.

A training, evaluation or serving config holds ``model: ModelConfig``; pydantic picks the config class
from ``kind`` and validates it before any worker starts, and ``build_model`` turns it into the module.
Ranking models (``RankingBatch`` -> ``RankingOutput``) and next-item retrievers (``SequenceBatch`` ->
embeddings) are separate unions because they train on different data.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, TypeAdapter
from torch import nn

from workloads.models.base import NextItemModel, RankingModel, RankingOutput
from workloads.models.config import (
    DCNv2Config,
    HSTUConfig,
    LiGRConfig,
    LiGRRetrievalConfig,
    RQVAEConfig,
    SASRecConfig,
)
from workloads.models.dcnv2 import DCNv2ForRanking
from workloads.models.hstu import HSTUForRanking
from workloads.models.ligr import LiGRForRanking, LiGRRetrieval
from workloads.models.sasrec import SASRec

ModelConfig = Annotated[LiGRConfig | HSTUConfig | DCNv2Config, Field(discriminator="kind")]
RetrievalConfig = Annotated[LiGRRetrievalConfig | SASRecConfig, Field(discriminator="kind")]

_MODEL_CONFIG: TypeAdapter[Any] = TypeAdapter(ModelConfig)
_RETRIEVAL_CONFIG: TypeAdapter[Any] = TypeAdapter(RetrievalConfig)

__all__ = [
    "DCNv2Config",
    "HSTUConfig",
    "LiGRConfig",
    "LiGRRetrievalConfig",
    "ModelConfig",
    "NextItemModel",
    "RQVAEConfig",
    "RankingModel",
    "RankingOutput",
    "RetrievalConfig",
    "SASRecConfig",
    "build_model",
    "build_retrieval_model",
    "parse_model_config",
    "parse_retrieval_config",
]


def parse_model_config(raw: dict[str, Any]) -> LiGRConfig | HSTUConfig | DCNv2Config:
    """A ranking model config from plain data (e.g. a checkpoint's ``config.json``)."""
    return _MODEL_CONFIG.validate_python(raw)


def parse_retrieval_config(raw: dict[str, Any]) -> LiGRRetrievalConfig | SASRecConfig:
    return _RETRIEVAL_CONFIG.validate_python(raw)


def build_model(cfg: LiGRConfig | HSTUConfig | DCNv2Config) -> RankingModel:
    match cfg:
        case LiGRConfig():
            return LiGRForRanking(cfg)
        case HSTUConfig():
            return HSTUForRanking(cfg)
        case DCNv2Config():
            return DCNv2ForRanking(cfg)
    raise TypeError(f"build_model: not a ranking model config: {type(cfg).__name__}")


def build_retrieval_model(cfg: LiGRRetrievalConfig | SASRecConfig) -> NextItemModel:
    match cfg:
        case LiGRRetrievalConfig():
            return LiGRRetrieval(cfg)
        case SASRecConfig():
            return SASRec(cfg)
    raise TypeError(f"build_retrieval_model: not a retrieval config: {type(cfg).__name__}")


def dense_params(model: nn.Module) -> int:
    """Parameters outside embedding tables (what the paper's compute axis counts)."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    return sum(p.numel() for p in model.parameters() if id(p) not in embeddings)


def equal_size_hstu(ligr: LiGRConfig) -> HSTUConfig:
    """The HSTU variant (same width, tokens and heads) whose dense parameter count is closest to LiGR's.

    At the same history length this is also equal training compute (the paper's FLOPs axis is dense
    parameters times sequence length): an HSTU layer has about 5 d^2 weights, a gated LiGR block 14 d^2.
    """
    shared = ligr.model_dump(exclude={"kind", "ffn_mult", "actor_match", "setwise_actor_match"})
    target = dense_params(build_model(ligr))
    options = [HSTUConfig(**{**shared, "n_layers": n}) for n in range(1, 8 * ligr.n_layers + 1)]
    return min(options, key=lambda cfg: abs(dense_params(build_model(cfg)) - target))
