from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F

from tests.workloads.models.synthetic import candidate_slice, random_batch
from workloads.models.config import HSTUConfig
from workloads.models.hstu import HSTUForRanking, HSTULayer
from workloads.models.ligr import AttentionMask, RelativeBucketBias, TokenLayout, relative_buckets


def hstu(**overrides: object) -> HSTUForRanking:
    torch.manual_seed(0)
    base: dict[str, object] = dict(
        d_model=16, n_heads=2, id_dim=8, max_history=16, max_candidates=8, dropout=0.0, item_hash_size=1009
    )
    return HSTUForRanking(HSTUConfig(**{**base, **overrides}))


def test_layer_computes_the_hstu_equations() -> None:
    torch.manual_seed(0)
    layer = HSTULayer(d_model=8, n_heads=2, dropout=0.0, bias=RelativeBucketBias(2, 4), attn_len=9).eval()
    torch.nn.init.normal_(layer.rel_bias.bias)  # type: ignore[union-attr]
    h = torch.randn(1, 3, 8)
    layout = TokenLayout(
        session=torch.tensor([[0, 1, 2]]),
        kind=torch.zeros(1, 3, dtype=torch.long),
        valid=torch.ones(1, 3, dtype=torch.bool),
        position=torch.tensor([[3, 2, 1]]),  # recency
    )
    mask = AttentionMask(layout.historical(), layout)  # causal here: one event per session
    u, v, q, k = F.silu(layer.uvqk_proj(layer.input_norm(h))).chunk(4, dim=-1)
    head_outputs = []
    for head in range(2):
        cols = slice(4 * head, 4 * head + 4)
        scores = q[0, :, cols] @ k[0, :, cols].T
        events_back = torch.tensor([[0, -1, -2], [1, 0, -1], [2, 1, 0]])
        scores = scores + layer.rel_bias.bias[head, relative_buckets(events_back, 4)]  # type: ignore[union-attr]
        weights = F.silu(scores) * torch.tril(torch.ones(3, 3)) / 9  # SiLU, no softmax, fixed n
        head_outputs.append(weights @ v[0, :, cols])
    expected = h + layer.o_proj(layer.attn_norm(torch.cat(head_outputs, dim=-1)) * u)
    torch.testing.assert_close(layer(h, mask), expected)


def test_forward_backward_and_loss_decreases() -> None:
    net = hstu()
    batch = random_batch(seed=1, n_rows=8)
    optimizer = torch.optim.AdamW(net.param_groups())
    losses = []
    for _ in range(30):
        out = net(batch)
        assert out.loss is not None and out.logits.shape == (8, batch.cand_item_id.shape[1], 3)
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert all(p.grad is not None for p in net.backbone.blocks.parameters())


def test_shares_ligr_masks_single_pass_equals_per_candidate() -> None:
    batch = random_batch(seed=2, n_rows=3, cand_len=(4, 4))
    net = hstu().eval()
    with torch.no_grad():
        together = net.score_pointwise(batch)
        for j in range(4):
            alone = net.score_pointwise(candidate_slice(batch, slice(j, j + 1)))
            torch.testing.assert_close(alone[:, 0], together[:, j], atol=1e-5, rtol=1e-5)


def test_history_item_does_not_see_its_own_outcome() -> None:
    batch = random_batch(seed=3, n_rows=2, hist_len=(10, 10))
    net = hstu().eval()
    changed = dataclasses.replace(batch, hist_actions=batch.hist_actions.clone())
    last = 9
    changed.hist_actions[:, last] = 1 - batch.hist_actions[:, last]
    with torch.no_grad():
        before, cand_before = net.backbone(batch)
        after, cand_after = net.backbone(changed)
    torch.testing.assert_close(after[:, last], before[:, last])
    assert not torch.allclose(cand_after, cand_before)  # candidates do read it
