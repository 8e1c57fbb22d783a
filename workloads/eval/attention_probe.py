"""Where a trained LiGR's candidates look: the attention they give to history events of their own actor.

The counting reader (`history_reader`) finds member-actor evidence in events older than 64 that
LiGR's AUC does not reflect (claim 3). This probe asks whether LiGR's attention reaches that evidence.
For every eval candidate and every layer (heads averaged, and per head) it measures the share of the
candidate's attention to the history that lands on tokens (item and action) of the candidate's own
actor, against those tokens' share of the history: the ratio of the two (the *lift*) is 1 when
attention ignores the actor, and large when the candidate picks out its actor's past events, as the
reader's counts do. It also reports how much of that attention goes to events older than
``old_after``. Averages are over the candidates with at least one event of their actor in the
history the model reads.

    python -m workloads.eval.attention_probe --set artifact=/path/to/models/ligr/v1 \
        --set examples_dir=/path/to/examples --set min_history=200
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import torch
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from torch import Tensor

from workloads.eval.evaluate import item_content, numpy_rows, read_examples, write_json_atomic
from workloads.models.batch import RankingBatch, collate
from workloads.models.ligr import LiGRForRanking, MultiHeadAttention
from workloads.stage import run_stage
from workloads.train.artifact import load_artifact


class AttentionProbeConfig(BaseModel):
    """`python -m workloads.eval.attention_probe`: a LiGR artifact's attention to its candidates' actors."""

    model_config = ConfigDict(extra="forbid")

    artifact: Path = Field(description="a published LiGR artifact (models/<name>/v<n>)")
    examples_dir: Path = Field(description="prepared examples with an eval/ split")
    world_dir: Path | None = Field(None, description="world whose items.parquet holds the content vectors")
    min_history: NonNegativeInt = Field(
        0, description="only eval sessions with at least this many past events"
    )
    max_sessions: PositiveInt = Field(400, description="the first this many such sessions")
    old_after: PositiveInt = Field(64, description="events further back than this count as old")
    batch_size: PositiveInt = 50
    output: Path | None = Field(None, description="JSON with one row per layer (default: print only)")


class _Sums:
    """Per-layer running sums over candidates that have at least one event of their actor."""

    def __init__(self, n_heads: int) -> None:
        self.candidates = 0
        self.all_candidates = 0
        self.history_mass = 0.0
        self.share = np.zeros(n_heads)  # attention share on the actor's tokens, per head
        self.old_share = np.zeros(n_heads)  # of it, on events older than old_after
        self.token_share = 0.0  # the actor's tokens' share of the history
        self.old_tokens = 0.0  # the part of the actor's tokens that is old

    def row(self, layer: int) -> dict[str, Any]:
        n = max(self.candidates, 1)
        share, token_share = self.share / n, self.token_share / n
        return {
            "layer": layer,
            "candidates": self.candidates,
            "candidates_with_own_actor": round(self.candidates / max(self.all_candidates, 1), 4),
            "history_mass": round(self.history_mass / max(self.all_candidates, 1), 4),
            "own_actor_attention": round(float(share.mean()), 4),
            "own_actor_tokens": round(token_share, 4),
            "lift": round(float(share.mean()) / token_share, 3) if token_share else float("nan"),
            "lift_by_head": [round(float(s) / token_share, 3) for s in share] if token_share else [],
            "own_actor_attention_old": round(float(self.old_share.mean()) / n, 4),
            "own_actor_tokens_old": round(self.old_tokens / n, 4),
        }


def add_batch(sums: list[_Sums], weights: list[Tensor], batch: RankingBatch, old_after: int) -> None:
    """Fold one batch's attention weights ((B, nh, L, L) per layer) into the per-layer sums."""
    H = batch.hist_item_id.shape[1]
    hist_actor = batch.hist_actor_id.repeat_interleave(2, dim=1)  # item and action token of each event
    hist_valid = batch.hist_mask.repeat_interleave(2, dim=1)
    recency = batch.hist_mask.sum(1, keepdim=True) - torch.arange(H)  # 1 = the latest event
    old = (recency > old_after).repeat_interleave(2, dim=1)
    own = (batch.cand_actor_id[:, :, None] == hist_actor[:, None, :]) & hist_valid[:, None, :]  # (B, S, 2H)
    n_own = own.sum(-1)
    token_share = n_own / hist_valid.sum(-1, keepdim=True).clamp(min=1)
    counted = batch.cand_mask & (n_own > 0)
    for layer, w in zip(sums, weights, strict=True):
        to_history = w[:, :, 2 * H :, : 2 * H]  # candidates reading the history: (B, nh, S, 2H)
        mass = to_history.sum(-1).clamp(min=1e-12)
        share = (to_history * own[:, None]).sum(-1) / mass  # (B, nh, S)
        old_share = (to_history * (own & old[:, None, :])[:, None]).sum(-1) / mass
        layer.all_candidates += int(batch.cand_mask.sum())
        layer.history_mass += float(to_history.sum(-1).mean(1)[batch.cand_mask].sum())
        layer.candidates += int(counted.sum())
        layer.share += share.permute(0, 2, 1)[counted].sum(0).numpy()
        layer.old_share += old_share.permute(0, 2, 1)[counted].sum(0).numpy()
        layer.token_share += float(token_share[counted].sum())
        layer.old_tokens += float(((own & old[:, None, :]).sum(-1) / n_own.clamp(min=1))[counted].sum())


@torch.no_grad()
def run(cfg: AttentionProbeConfig) -> list[dict[str, Any]]:
    artifact = load_artifact(cfg.artifact)
    model, spec = artifact.model, artifact.feature_spec
    if not isinstance(model, LiGRForRanking) or spec.get("semantic_ids_source"):
        raise ValueError(f"artifact: {cfg.artifact} is not a LiGR ranker on token features (no semantic ids)")
    content = item_content(artifact, cfg.world_dir)
    examples = read_examples(cfg.examples_dir, "eval", ["feed"])
    examples = examples.filter(pc.greater_equal(examples.column("history_len"), cfg.min_history))
    examples = examples.slice(0, cfg.max_sessions)
    layers = [m for m in model.backbone.modules() if isinstance(m, MultiHeadAttention)]
    captured: list[Tensor] = []
    hooks = [
        layer.register_forward_hook(lambda module, args, _: captured.append(module.weights(*args)))
        for layer in layers
    ]
    sums = [_Sums(layer.n_heads) for layer in layers]
    try:
        for start in range(0, examples.num_rows, cfg.batch_size):
            batch = collate(
                numpy_rows(examples.slice(start, cfg.batch_size)),
                content,
                spec["max_history"],
                spec["max_candidates"],
            )
            captured.clear()
            model.backbone(batch)
            add_batch(sums, captured, batch, cfg.old_after)
    finally:
        for hook in hooks:
            hook.remove()
    rows = [{"sessions": examples.num_rows, **layer.row(i)} for i, layer in enumerate(sums)]
    for row in rows:
        print(json.dumps(row), flush=True)
    if cfg.output is not None:
        write_json_atomic(cfg.output, rows)
    return rows


if __name__ == "__main__":
    run_stage(AttentionProbeConfig, run, sys.argv[1:])
