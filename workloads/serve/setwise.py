"""The set-wise reranker: the pointwise top k of each request attend to each other (LiGR split scoring).

Split scoring (section 4.0.2): only the top k (10) candidates after pointwise scoring are scored as a
set, and their set-wise logits are added to the pointwise ones. The reranker reads the top k's
candidate states from the pointwise scorer, so it runs only the in-session attention layers and the
set-wise heads (``GenerativeRanker.setwise_correction``, what ``score_setwise`` runs after gathering)
over k tokens per request: that is its whole incremental cost. Requests that arrive together are
padded into one (B, k, D) batch; padding is masked, so a request's correction does not depend on its
batch mates.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

import numpy as np
import torch
from ray import serve

from workloads.models.ligr import GenerativeRanker
from workloads.serve.batching import configure_batching
from workloads.serve.scorer import PointwiseScores, has_setwise, load_ranking_artifact


@dataclass
class SetwiseCorrection:
    logits: np.ndarray  # (k, T) to add to the pointwise logits of PointwiseScores.top_idx
    setwise_ms: float  # the batch's forward pass


class SetwiseModel:
    """The set-wise part of a ranking artifact; usable without Ray Serve."""

    def __init__(self, artifact_uri: str) -> None:
        artifact = load_ranking_artifact(artifact_uri)
        if not has_setwise(artifact.model):  # type: ignore[arg-type]
            raise ValueError(f"artifact_uri: {artifact_uri} has no set-wise layers (model.setwise is off)")
        self.model: GenerativeRanker = artifact.model  # type: ignore[assignment]

    @torch.inference_mode()
    def correct(self, scored: list[PointwiseScores]) -> list[SetwiseCorrection]:
        began = time.perf_counter()
        if any(s.top_states is None or s.top_actor_ids is None for s in scored):
            raise ValueError("top_states: the pointwise scorer sent no candidate states")
        k = max(len(s.top_idx) for s in scored)
        dim = self.model.cfg.d_model
        padded = torch.zeros(len(scored), k, dim)
        actors = torch.zeros(len(scored), k, dtype=torch.long)
        mask = torch.zeros(len(scored), k, dtype=torch.bool)
        for row, request in enumerate(scored):
            n = len(request.top_idx)
            padded[row, :n] = torch.from_numpy(request.top_states)
            actors[row, :n] = torch.from_numpy(request.top_actor_ids.astype(np.int64))  # type: ignore[union-attr]
            mask[row, :n] = True
        correction = self.model.setwise_correction(padded, mask, actor_ids=actors)  # (B, k, T)
        setwise_ms = (time.perf_counter() - began) * 1e3
        return [
            SetwiseCorrection(correction[row, : int(mask[row].sum())].numpy(), setwise_ms)
            for row in range(len(scored))
        ]


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class SetwiseReranker:
    """Scores each request's pointwise top k as one set and returns the correction to add."""

    def __init__(self, artifact_uri: str, max_batch_size: int, batch_wait_timeout_s: float) -> None:
        self.runner = SetwiseModel(artifact_uri)
        configure_batching(self.rerank, max_batch_size, batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.001)
    async def rerank(self, scored: list[PointwiseScores]) -> list[SetwiseCorrection]:
        return await asyncio.to_thread(self.runner.correct, scored)
