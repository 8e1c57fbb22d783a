"""The pointwise scorer: LiGR single-pass scoring of every candidate of a request, batched across requests.

One forward pass per batch (LiGR section 4.0.2): each request's history is encoded once and all of its
candidates are scored with it, since under historical attention candidates never see each other and a
candidate scores the same alone or with any others. ``@serve.batch`` stacks the requests that arrive
together as rows of one ``RankingBatch`` (padded by ``collate``, the same function training uses).
A request with more candidates than the model was built for (``max_candidates``) becomes several rows
that share its history, the paper's "all items passed using the batch size dimension".

Besides the pointwise logits the scorer returns the candidate states of the pointwise top k, which is
all the set-wise reranker needs: the history is not encoded a second time.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray import serve

from workloads.data.schema import COUNTER_FEATURES
from workloads.models.base import RankingModel
from workloads.models.batch import ItemContentTable, RankingBatch, SemanticIdTable, collate
from workloads.models.ligr import GenerativeRanker
from workloads.serve.batching import configure_batching
from workloads.serve.errors import ServeError
from workloads.serve.features import HISTORY_COLUMNS, RequestFeatures, model_counters
from workloads.serve.ranking import pointwise_order, task_weight_vector
from workloads.train.artifact import LoadedArtifact, load_artifact


@dataclass
class PointwiseScores:
    logits: np.ndarray  # (S, T) float32, in the request's candidate order
    order: np.ndarray  # (S,) candidate indexes by descending pointwise ranking score
    top_idx: np.ndarray  # (k,) the first k of ``order``: what set-wise scoring re-scores
    top_states: np.ndarray | None  # (k, D) their candidate states; None when the model has no set-wise part
    top_actor_ids: np.ndarray | None  # (k,) their actors, for set-wise actor match; None with top_states
    member_known: bool
    history_len: int
    features_ms: float
    pointwise_ms: float  # the batch's forward pass
    model_version: str  # the artifact version that scored (``v<N>``)


def has_setwise(model: RankingModel) -> bool:
    return isinstance(model, GenerativeRanker) and bool(model.cfg.setwise)


def model_info(
    artifact: LoadedArtifact, setwise_top_k: int, task_weights: dict[str, float]
) -> dict[str, Any]:
    """What ``GET /v1/models`` says about a loaded ranking artifact."""
    model: RankingModel = artifact.model  # type: ignore[assignment]
    return {
        "model": "ligr",
        "name": artifact.name,
        "architecture": model.cfg.kind,
        "version": f"v{artifact.version}",
        "artifact_uri": str(artifact.path),
        "data_window": artifact.data_window,
        "metrics": {k: v for k, v in artifact.metrics.items() if not isinstance(v, list | dict)},
        "setwise_top_k": setwise_top_k if has_setwise(model) else 0,
        "task_weights": task_weights,
    }


def load_ranking_artifact(artifact_uri: str | Path) -> LoadedArtifact:
    artifact = load_artifact(artifact_uri)
    if not isinstance(artifact.model, RankingModel):
        raise ValueError(
            f"artifact_uri: {artifact_uri} holds a {type(artifact.model).__name__}, not a ranking model"
        )
    return artifact


class PointwiseModel:
    """A loaded ranking artifact that scores batches of ``RequestFeatures``; usable without Ray Serve."""

    def __init__(self, artifact_uri: str | Path, task_weights: dict[str, float], setwise_top_k: int) -> None:
        self.artifact = load_ranking_artifact(artifact_uri)
        self.model: RankingModel = self.artifact.model  # type: ignore[assignment]
        self.cfg = self.model.cfg
        self.weights = task_weight_vector(task_weights)
        self.setwise_top_k = setwise_top_k if has_setwise(self.model) else 0
        self.content_dim = int(self.cfg.content_dim)
        self.counters = model_counters(self.cfg)  # what the fetcher must have read
        self.version = f"v{self.artifact.version}"
        self.semantic_ids = None
        if getattr(self.cfg, "use_semantic_ids", False):
            source = self.artifact.feature_spec.get("semantic_ids_source")
            if not source:
                raise ValueError(
                    f"{artifact_uri}: the model uses semantic ids but feature_spec names no source"
                )
            self.semantic_ids = SemanticIdTable.from_parquet(source, self.cfg.sid_codebook_size)

    def batch(self, requests: list[RequestFeatures]) -> tuple[RankingBatch, list[tuple[int, int, int]]]:
        """One ``RankingBatch`` for the requests and, per row, (request, first candidate, end candidate)."""
        chunk = int(self.cfg.max_candidates)
        spans = [
            (r, start, min(start + chunk, len(f.candidates["cand_item_id"])))
            for r, f in enumerate(requests)
            for start in range(0, len(f.candidates["cand_item_id"]), chunk)
        ]
        rows: dict[str, list[np.ndarray]] = {}
        for r, start, end in spans:
            features = requests[r]
            for name in HISTORY_COLUMNS:
                rows.setdefault(name, []).append(features.history[name])
            n = len(features.candidates["cand_item_id"])
            unread = [c for c in self.counters if f"cand_{c}" not in features.candidates]
            if unread:  # zeros would look like a real value: a fetcher deployed for another model
                raise RuntimeError(f"the model reads counters {unread} that the feature fetcher did not read")
            for name in (
                "cand_item_id",
                "cand_actor_id",
                "cand_post_type",
                "cand_age_bucket",
                "cand_position",
            ):
                rows.setdefault(name, []).append(features.candidates[name][start:end])
            for counter in COUNTER_FEATURES:  # zeros for the ones the model does not read
                values = features.candidates.get(f"cand_{counter}", np.zeros(n, dtype=np.float32))
                rows.setdefault(f"cand_{counter}", []).append(values[start:end])
        no_content = ItemContentTable.zeros(0, self.content_dim)  # content comes from the store, below
        batch = collate(rows, no_content, max_history=self.cfg.max_history, semantic_ids=self.semantic_ids)
        for row, (r, start, end) in enumerate(spans):
            kept = int(batch.hist_mask[row].sum())
            if kept:
                batch.hist_content[row, :kept] = torch.from_numpy(requests[r].hist_content[-kept:])
            batch.cand_content[row, : end - start] = torch.from_numpy(requests[r].cand_content[start:end])
        return batch, spans

    @torch.inference_mode()
    def score(self, requests: list[RequestFeatures]) -> list[PointwiseScores]:
        began = time.perf_counter()
        batch, spans = self.batch(requests)
        states = None
        if isinstance(self.model, GenerativeRanker):
            states = self.model.encode(batch)  # (rows, S, D): the history encoded once per row
            logits = self.model.score_pointwise(batch, cand_states=states)
        else:
            logits = self.model.score_pointwise(batch)
        pointwise_ms = (time.perf_counter() - began) * 1e3
        out = []
        for r, features in enumerate(requests):
            mine = [(row, start, end) for row, (req, start, end) in enumerate(spans) if req == r]
            request_logits = torch.cat([logits[row, : end - start] for row, start, end in mine]).numpy()
            order = pointwise_order(request_logits, self.weights)
            top_idx = order[: self.setwise_top_k]
            top_states = top_actor_ids = None
            if states is not None and self.setwise_top_k:
                request_states = torch.cat([states[row, : end - start] for row, start, end in mine])
                top_states = request_states[torch.from_numpy(top_idx)].numpy()
                top_actor_ids = np.asarray(features.candidates["cand_actor_id"])[top_idx]
            out.append(
                PointwiseScores(
                    logits=request_logits,
                    order=order,
                    top_idx=top_idx,
                    top_states=top_states,
                    top_actor_ids=top_actor_ids,
                    member_known=features.member_known,
                    history_len=min(features.history_len, int(self.cfg.max_history)),
                    features_ms=features.read_ms,
                    pointwise_ms=pointwise_ms,
                    model_version=self.version,
                )
            )
        return out


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 1})
class PointwiseScorer:
    """Scores the candidates of the requests that arrive together in one forward pass."""

    def __init__(
        self,
        artifact_uri: str,
        task_weights: dict[str, float],
        setwise_top_k: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        self.runner = PointwiseModel(artifact_uri, task_weights, setwise_top_k)
        self.info = model_info(self.runner.artifact, setwise_top_k, task_weights)
        configure_batching(self.score, max_batch_size, batch_wait_timeout_s)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.002)
    async def score(self, requests: list[RequestFeatures | ServeError]) -> list[PointwiseScores | ServeError]:
        """Scores per request; a fetcher's error for a request passes through in its place."""
        valid = [r for r in requests if isinstance(r, RequestFeatures)]
        # off the event loop, so the replica keeps collecting the next batch while this one runs
        scored = iter(await asyncio.to_thread(self.runner.score, valid) if valid else [])
        return [r if isinstance(r, ServeError) else next(scored) for r in requests]

    def describe(self) -> dict[str, Any]:
        return self.info
