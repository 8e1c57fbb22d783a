"""The scorer and the set-wise reranker outside Serve: their numbers equal the offline reference.

Single-pass scoring must equal scoring each candidate alone (historical attention keeps candidates
apart), whatever the row split and whoever shares the batch; the set-wise correction must equal
``score_setwise`` on the pointwise top k.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests.workloads.serve.conftest import HISTORY_LEN, ServeWorld, tiny_ligr_artifact
from tests.workloads.serve.offline import expected_scores
from workloads.serve.features import FeatureReader, FetchRequest, RequestFeatures
from workloads.serve.graph import DEFAULT_TASK_WEIGHTS
from workloads.serve.ranking import split_rerank, task_weight_vector
from workloads.serve.scorer import PointwiseModel
from workloads.serve.setwise import SetwiseModel

TOP_K = 10


def fetch(
    world: ServeWorld, requests: list[tuple[int, list[int]]], counters: tuple[str, ...] = ()
) -> list[RequestFeatures]:
    as_of = int(pd.Timestamp(world.end).value // 1000)
    reader = FeatureReader(world.repo, HISTORY_LEN, counters)
    got = asyncio.run(reader.read([FetchRequest(m, np.asarray(c), [], as_of) for m, c in requests]))
    assert all(isinstance(g, RequestFeatures) for g in got)
    return got  # type: ignore[return-value]


def busiest_member(world: ServeWorld) -> int:
    histories = pd.read_parquet(world.world / "features" / "member_history.parquet")
    return int(histories.loc[histories["history_len"].idxmax(), "member_id"])


def test_single_pass_equals_one_candidate_at_a_time_across_row_splits_and_batch_mates(
    serve_world: ServeWorld,
) -> None:
    artifact = serve_world.artifacts / "v1"
    member = busiest_member(serve_world)
    long_list = list(range(100, 170))  # 70 candidates: three rows of at most max_candidates=32
    short_list = [3, 1, 2]
    scorer = PointwiseModel(artifact, DEFAULT_TASK_WEIGHTS, TOP_K)
    together = scorer.score(fetch(serve_world, [(member, long_list), (10**9, short_list)]))
    alone = scorer.score(fetch(serve_world, [(member, long_list)]))[0]
    for scored, (who, candidates) in zip(together, [(member, long_list), (10**9, short_list)], strict=True):
        expected = expected_scores(
            artifact, serve_world.world, who, candidates, serve_world.end, DEFAULT_TASK_WEIGHTS, TOP_K
        )
        np.testing.assert_allclose(scored.logits, expected.pointwise_logits, atol=1e-4)
        assert scored.history_len == expected.history_len
        np.testing.assert_array_equal(scored.top_idx, scored.order[: min(TOP_K, len(candidates))])
    np.testing.assert_allclose(together[0].logits, alone.logits, atol=1e-5)
    assert together[0].top_states is not None and together[0].top_states.shape == (TOP_K, 32)


def test_a_model_that_reads_counters_scores_with_the_counters_of_the_log(
    serve_world: ServeWorld, tmp_path: Path
) -> None:
    """`model.counters` at serving: the online counters of ligr_v2's views are the log's point-in-time
    counters at the store's last snapshot, read on the model's scale, as training read them."""
    counters = ("ma_eng_30d", "item_ctr_7d")
    artifact = tiny_ligr_artifact(
        tmp_path / "v1", serve_world.world, 1, seed=3, candidate_counters=counters, counter_scale="log_odds"
    )
    member = busiest_member(serve_world)
    candidates = list(range(100, 140))
    fetched = fetch(serve_world, [(member, candidates)], counters)
    assert (fetched[0].candidates["cand_ma_eng_30d"] > 0).any(), "the member engaged with none of the actors"
    served = PointwiseModel(artifact, DEFAULT_TASK_WEIGHTS, TOP_K).score(fetched)[0]
    expected = expected_scores(
        artifact, serve_world.world, member, candidates, serve_world.end, DEFAULT_TASK_WEIGHTS, TOP_K
    )
    np.testing.assert_allclose(served.logits, expected.pointwise_logits, atol=1e-4)
    # a fetcher that did not read them (deployed for another model) is an error, not zeros
    scorer = PointwiseModel(artifact, DEFAULT_TASK_WEIGHTS, TOP_K)
    with pytest.raises(
        RuntimeError, match=r"reads counters \['ma_eng_30d', 'item_ctr_7d'\] that the feature fetcher did not"
    ):
        scorer.score(fetch(serve_world, [(member, candidates)]))
    for name in counters:
        fetched[0].candidates[f"cand_{name}"] = np.zeros(len(candidates), dtype=np.float32)
    zeros = scorer.score(fetched)
    assert np.abs(zeros[0].logits - served.logits).max() > 1e-2, "the counters do not move the scores"


@pytest.mark.parametrize("setwise_actor_match", [False, True])
def test_setwise_correction_equals_score_setwise_on_the_pointwise_top_k(
    serve_world: ServeWorld, setwise_actor_match: bool, tmp_path: Path
) -> None:
    """The reranker sees only the top k's states and actors, and corrects them as the model does."""
    artifact = serve_world.artifacts / "v1"
    if setwise_actor_match:
        artifact = tiny_ligr_artifact(tmp_path / "v1", serve_world.world, 1, seed=5, setwise_actor_match=True)
    member = busiest_member(serve_world)
    requests = [(member, list(range(200, 245))), (member, [7, 8, 9, 10])]  # k=10 and k=4 in one batch
    scored = PointwiseModel(artifact, DEFAULT_TASK_WEIGHTS, TOP_K).score(fetch(serve_world, requests))
    corrections = SetwiseModel(str(artifact)).correct(scored)
    for (who, candidates), pointwise, correction in zip(requests, scored, corrections, strict=True):
        expected = expected_scores(
            artifact, serve_world.world, who, candidates, serve_world.end, DEFAULT_TASK_WEIGHTS, TOP_K
        )
        assert correction.logits.shape == (min(TOP_K, len(candidates)), 3)
        assert np.abs(correction.logits).max() > 0.05  # the correction is not a no-op
        weights = task_weight_vector(DEFAULT_TASK_WEIGHTS)
        served = split_rerank(
            pointwise.logits, pointwise.order, weights, pointwise.top_idx, correction.logits
        )
        np.testing.assert_allclose(served.final_logits, expected.final_logits, atol=1e-4)
        np.testing.assert_array_equal(served.order, expected.order)


def test_a_model_without_setwise_layers_is_refused_by_the_reranker(tmp_path: Path) -> None:
    from workloads.models.config import LiGRConfig
    from workloads.models.registry import build_model
    from workloads.train.artifact import save_artifact

    cfg = LiGRConfig(d_model=16, n_layers=1, n_heads=2, max_history=8, max_candidates=8, setwise=False)
    path = save_artifact(tmp_path / "v1", build_model(cfg).state_dict(), cfg, name="ligr", version=1)
    with pytest.raises(ValueError, match="no set-wise layers"):
        SetwiseModel(str(path))
    assert PointwiseModel(path, DEFAULT_TASK_WEIGHTS, TOP_K).setwise_top_k == 0
