from __future__ import annotations

import dataclasses

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from tests.workloads.models.synthetic import candidate_slice, random_batch
from workloads.data.schema import COUNTER_FEATURES, TASKS
from workloads.models.batch import RankingBatch
from workloads.models.config import DCNv2Config
from workloads.models.dcnv2 import CrossNetV2, DCNv2ForRanking


def dcn(**overrides: object) -> DCNv2ForRanking:
    torch.manual_seed(0)
    base: dict[str, object] = dict(mlp_dims=(32, 16), item_hash_size=1009, actor_hash_size=101, dropout=0.0)
    return DCNv2ForRanking(DCNv2Config(**{**base, **overrides}))


def test_cross_layer_is_x0_times_linear_plus_residual() -> None:
    torch.manual_seed(0)
    cross = CrossNetV2(dim=4, n_layers=2)
    x0 = torch.randn(3, 4)
    x1 = x0 * cross.layers[0](x0) + x0
    torch.testing.assert_close(cross(x0), x0 * cross.layers[1](x1) + x1)


def test_two_towers_each_own_their_tasks() -> None:
    net = dcn()
    out = net(random_batch(seed=0))
    assert out.setwise_logits is None and out.logits.shape[-1] == len(TASKS)
    click_tower = set(net.towers["click"].parameters())
    for task, expect_click_tower in [("click", True), ("long_dwell", True), ("contribution", False)]:
        net.zero_grad()
        net(random_batch(seed=0)).logits[..., TASKS.index(task)].sum().backward()
        touched = {p for p in net.parameters() if p.grad is not None and p.grad.abs().sum() > 0}
        assert bool(touched & click_tower) == expect_click_tower, task
        contribution_tower = set(net.towers["contribution"].parameters())
        assert bool(touched & contribution_tower) != expect_click_tower, task


def test_each_candidate_is_scored_alone() -> None:
    batch = random_batch(seed=1, n_rows=3, cand_len=(5, 5))
    net = dcn(use_history_summary=True).eval()
    with torch.no_grad():
        together = net.score_pointwise(batch)
        alone = net.score_pointwise(candidate_slice(batch, slice(2, 3)))
        assert not net.score_setwise(batch, torch.zeros((3, 2), dtype=torch.long)).any()
    torch.testing.assert_close(alone[:, 0], together[:, 2])


def with_counter_signal(batch: RankingBatch, rng: np.random.Generator) -> RankingBatch:
    """Labels follow the member x actor engagement counter, as a production ranker's best feature does."""
    counters = torch.from_numpy(rng.exponential(3.0, batch.cand_counters.shape).astype(np.float32))
    affinity = counters[..., COUNTER_FEATURES.index("ma_eng_7d")]
    labels = (affinity > 3.0).float().unsqueeze(-1).expand(-1, -1, len(TASKS)) * batch.cand_mask.unsqueeze(-1)
    return dataclasses.replace(batch, cand_counters=counters, labels=labels.contiguous())


def test_learns_from_the_counters() -> None:
    rng = np.random.default_rng(2)
    net = dcn()
    optimizer = torch.optim.AdamW(net.param_groups())
    for step in range(80):
        batch = with_counter_signal(random_batch(seed=step, n_rows=32, cand_len=(8, 8)), rng)
        out = net(batch)
        assert out.loss is not None
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    test = with_counter_signal(random_batch(seed=999, n_rows=64, cand_len=(8, 8)), rng)
    with torch.no_grad():
        scores = net.eval().score_pointwise(test)
    assert test.labels is not None
    assert roc_auc_score(test.labels[..., 1].flatten().numpy(), scores[..., 1].flatten().numpy()) > 0.95
