"""Can a set-wise layer learn a penalty on repeated actors from the labels alone? A planted world in memory.

``python -m workloads.eval.repeat_probe --set penalty=0.8 --set burst_rate=0.05``

Slates of ``slate`` candidates drawn from ``actors`` actors, a share ``pool_rate`` of them from three
actors of the session's own (the actors a member follows: repeats that are not punished); with
probability ``burst_rate`` a slot repeats the actor of the slot above (the synthetic world's bursts).
A candidate is engaged with probability ``sigmoid(base + appeal - penalty * repeated)``: its actor's
own appeal, which pointwise scoring can learn, and the set-level effect, which only the slate reveals.
The history is noise. Each variant (plain set-wise attention, ``setwise_actor_match``, and that one's
self-only control) is trained on the same stream of batches and, every ``every`` steps, scored on one
held-out set: AUC of the final and of the pointwise scores, and the *response*, the set-wise click
logit on repeated candidates minus on the others (the truth is ``-penalty``). It isolates the question
claim 2 of the LiGR issue turns on (docs/models.md): the world's AUCs cannot say whether the layer
learned the rule, the response can.
"""

from __future__ import annotations

import sys
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveInt
from sklearn.metrics import roc_auc_score

from workloads.data.schema import CONTENT_DIM, COUNTER_FEATURES, Action
from workloads.models.batch import ItemContentTable, RankingBatch, collate
from workloads.models.config import LiGRConfig
from workloads.models.ligr import LiGRForRanking
from workloads.stage import run_stage

Variant = Literal["plain", "actor_match", "self_only"]
ENGAGED = (1 << Action.CLICK) | (1 << Action.LIKE) | (1 << Action.LONG_DWELL)
HISTORY = 4  # events of noise: the history says nothing here


class RepeatProbeConfig(BaseModel):
    """The planted world and the training budget (the defaults: claim 2's default world, roughly)."""

    model_config = ConfigDict(extra="forbid")

    variants: list[Variant] = ["plain", "actor_match", "self_only"]
    penalty: float = Field(0.8, ge=0, description="logits a repeat of the slot above costs")
    burst_rate: float = Field(0.05, ge=0, le=1, description="how often a slot repeats the actor above")
    pool_rate: float = Field(
        0.15,
        ge=0,
        le=1,
        description="how often a slot shows one of the session's 3 own actors (followed ones): repeats "
        "farther apart than the slot above, which the rule does not punish",
    )
    base: float = Field(-2.5, description="engagement logit of an average actor")
    actors: PositiveInt = 300
    slate: PositiveInt = 16
    batch_size: PositiveInt = 64
    steps: PositiveInt = 3000
    every: PositiveInt = 250
    test_sessions: PositiveInt = 2000
    d_model: PositiveInt = 32
    seed: int = 0


def planted_slates(
    cfg: RepeatProbeConfig, rng: np.random.Generator, n: int
) -> tuple[RankingBatch, np.ndarray]:
    """n slates and, per candidate, whether the slot above shows the same actor."""
    appeal = np.random.default_rng(cfg.seed + 99).normal(0.0, 1.0, cfg.actors)  # fixed across batches
    actor = rng.integers(0, cfg.actors, (n, cfg.slate))
    pooled = rng.random(actor.shape) < cfg.pool_rate
    actor[pooled] = rng.integers(0, cfg.actors, (n, 3))[
        np.nonzero(pooled)[0], rng.integers(0, 3, pooled.sum())
    ]
    for slot in range(1, cfg.slate):
        burst = rng.random(n) < cfg.burst_rate
        actor[burst, slot] = actor[burst, slot - 1]
    repeated = np.zeros_like(actor, dtype=bool)
    repeated[:, 1:] = actor[:, 1:] == actor[:, :-1]
    logit = cfg.base + appeal[actor] - cfg.penalty * repeated
    engaged = rng.random(actor.shape) < 1 / (1 + np.exp(-logit))

    def column(matrix: np.ndarray, dtype: Any) -> np.ndarray:
        out = np.empty(len(matrix), dtype=object)
        out[:] = [row.astype(dtype) for row in matrix]
        return out

    zeros_h, zeros_c = np.zeros((n, HISTORY)), np.zeros((n, cfg.slate))
    rows = {
        "hist_item_id": column(rng.integers(0, 1000, (n, HISTORY)), np.int64),
        "hist_actor_id": column(rng.integers(0, cfg.actors, (n, HISTORY)), np.int64),
        "hist_post_type": column(zeros_h, np.int8),
        "hist_age_bucket": column(zeros_h, np.int8),
        "hist_session_id": column(np.tile(np.arange(HISTORY), (n, 1)), np.int64),
        "hist_actions": column(zeros_h, np.int16),
        "cand_item_id": column(rng.integers(0, 1000, (n, cfg.slate)), np.int64),
        "cand_actor_id": column(actor, np.int64),
        "cand_post_type": column(zeros_c, np.int8),
        "cand_age_bucket": column(zeros_c, np.int8),
        "cand_position": column(np.tile(np.arange(cfg.slate), (n, 1)), np.int16),
        "cand_actions": column(np.where(engaged, ENGAGED, 0), np.int16),
        **{f"cand_{c}": column(zeros_c, np.float32) for c in COUNTER_FEATURES},
    }
    return collate(rows, ItemContentTable.zeros(1000, CONTENT_DIM)), repeated


def variant_config(cfg: RepeatProbeConfig, variant: Variant) -> LiGRConfig:
    return LiGRConfig(
        d_model=cfg.d_model,
        n_layers=1,
        n_heads=2,
        id_dim=cfg.d_model // 2,
        max_history=HISTORY,
        max_candidates=cfg.slate,
        dropout=0.0,
        item_hash_size=1009,
        actor_hash_size=1009,
        use_features=frozenset({"actor_id"}),
        setwise_actor_match=variant != "plain",
        setwise_context="self" if variant == "self_only" else "session",
    )


def run(cfg: RepeatProbeConfig) -> list[dict[str, Any]]:
    """One row per variant and checkpoint: step, AUCs, response (printed as they come)."""
    test, repeated = planted_slates(cfg, np.random.default_rng(cfg.seed + 7), cfg.test_sessions)
    assert test.labels is not None
    labels, repeated = test.labels[..., 0].flatten().numpy(), repeated.flatten()
    rows = []
    for variant in cfg.variants:
        torch.manual_seed(cfg.seed)
        model = LiGRForRanking(variant_config(cfg, variant))
        optimizer = torch.optim.AdamW(model.param_groups())
        stream = np.random.default_rng(cfg.seed + 1)  # the same batches for every variant
        for step in range(1, cfg.steps + 1):
            out = model.train()(planted_slates(cfg, stream, cfg.batch_size)[0])
            assert out.loss is not None
            optimizer.zero_grad()
            out.loss.backward()
            optimizer.step()
            if step % cfg.every:
                continue
            with torch.no_grad():
                scored = model.eval()(test)
            assert scored.setwise_logits is not None
            setwise = scored.setwise_logits[..., 0].flatten().numpy()
            pointwise = scored.pointwise_logits[..., 0].flatten().numpy()
            row = {
                "variant": variant,
                "step": step,
                "auc": float(roc_auc_score(labels, scored.logits[..., 0].flatten().numpy())),
                "pointwise_auc": float(roc_auc_score(labels, pointwise)),
                "response": float(setwise[repeated].mean() - setwise[~repeated].mean()),
            }
            print({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
            rows.append(row)
    return rows


if __name__ == "__main__":
    run_stage(RepeatProbeConfig, run, sys.argv[1:])
