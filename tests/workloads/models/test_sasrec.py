from __future__ import annotations

import numpy as np
import torch

from workloads.models.batch import collate_sequences
from workloads.models.config import SASRecConfig
from workloads.models.sasrec import SASRec


def sasrec() -> SASRec:
    torch.manual_seed(0)
    return SASRec(SASRecConfig(d_model=32, n_heads=2, max_len=12, dropout=0.0, item_hash_size=1009))


def test_states_are_causal_and_padding_does_not_matter() -> None:
    net = sasrec().eval()
    seqs = [np.array([3, 9, 4, 7, 1]), np.array([5, 2])]
    with torch.no_grad():
        states = net.states(collate_sequences(seqs))
        changed = net.states(collate_sequences([np.array([3, 9, 40, 70, 10]), seqs[1]]))
        alone = net.user_embedding(collate_sequences([seqs[1]]))
        both = net.user_embedding(collate_sequences(seqs))
    torch.testing.assert_close(changed[0, :2], states[0, :2])
    assert not torch.allclose(changed[0, 2], states[0, 2])
    torch.testing.assert_close(alone[0], both[1], atol=1e-5, rtol=1e-5)  # padding to 5 changes nothing
    torch.testing.assert_close(both[0], states[0, 4])


def test_learns_next_item() -> None:
    rng = np.random.default_rng(0)
    net = sasrec()
    optimizer = torch.optim.AdamW(net.param_groups())
    catalog = torch.arange(40)

    def walks(n: int) -> list[np.ndarray]:
        return [(rng.integers(0, 40) + 2 * np.arange(10)) % 40 for _ in range(n)]

    for _ in range(120):
        loss = net.loss(collate_sequences(walks(32)), candidate_ids=catalog)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = walks(50)
    with torch.no_grad():
        scores = (
            net.eval().user_embedding(collate_sequences([s[:-1] for s in test]))
            @ net.item_embedding(catalog).T
        )
    hits = (scores.topk(10, dim=1).indices == torch.tensor([s[-1] for s in test])[:, None]).any(dim=1)
    assert hits.float().mean() > 0.8
