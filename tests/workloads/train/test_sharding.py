"""DDP, FSDP2 and column-sharded embeddings on two real gloo processes, against one unsharded process.

Each strategy must train exactly like a single process on the union of both ranks' batches (the
mean of their losses), keep only its column slice of a sharded table, and round-trip its state:
full weights and optimizer state out, into a fresh sharded model, bit-identical next step.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import Tensor, nn

from workloads.train.loop import clip_grad_norm
from workloads.train.sharding import (
    connect,
    full_model_state,
    full_optimizer_state,
    load_full_state,
    parallelize,
)

WORLD = 2
COMBOS = [("ddp", False), ("ddp", True), ("fsdp2", False), ("fsdp2", True)]


class TinyRanker(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.item = nn.Embedding(2000, 8)  # large enough to be sharded (min_rows below)
        self.post_type = nn.Embedding(5, 8)  # too small: stays replicated
        self.layers = nn.ModuleList(nn.Linear(8, 8) for _ in range(2))
        self.head = nn.Linear(8, 1)

    def forward(self, ids: Tensor) -> Tensor:
        h = self.item(ids) + self.post_type(ids % 5)
        for layer in self.layers:
            h = torch.relu(layer(h))
        return self.head(h).squeeze(-1)


def rank_batch(rank: int, step: int) -> tuple[Tensor, Tensor]:
    g = torch.Generator().manual_seed(100 * rank + step)
    n_rows = 3 + rank  # ranks hold different batch sizes: the id gather must cope
    return torch.randint(0, 2000, (n_rows, 4), generator=g), torch.randn(n_rows, 4, generator=g)


def fresh(seed: int) -> TinyRanker:
    torch.manual_seed(seed)
    return TinyRanker()


def max_diff(a: dict[str, Tensor], b: dict[str, Tensor]) -> float:
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def run_combo(rank: int, strategy: str, shard: bool) -> dict[str, Any] | None:
    device = torch.device("cpu")
    reference = fresh(0)
    model = fresh(0)
    wrapped, sharded = parallelize(model, strategy, shard, device, embedding_min_rows=1000)  # type: ignore[arg-type]
    optimizer = torch.optim.Adam([p for _, p in model.named_parameters()], lr=0.01)
    ref_optimizer = torch.optim.Adam(reference.parameters(), lr=0.01)
    for step in range(3):
        ids, y = rank_batch(rank, step)
        optimizer.zero_grad()
        F.mse_loss(wrapped(ids), y).backward()
        norm = clip_grad_norm(model.parameters(), max_norm=1e9)  # measures only
        optimizer.step()
        ref_optimizer.zero_grad()
        ref_loss = torch.stack(
            [F.mse_loss(reference(i), t) for i, t in map(rank_batch, range(WORLD), [step] * WORLD)]
        )
        ref_loss.mean().backward()
        ref_norm = float(torch.cat([p.grad.flatten() for p in reference.parameters()]).norm())  # type: ignore[union-attr]
        ref_optimizer.step()

    trained = full_model_state(model)
    local_item_shape = list(model.item.weight.to_local().shape) if shard else None  # type: ignore[attr-defined]
    optimizer_state = full_optimizer_state(model, optimizer)
    box = [copy.deepcopy(trained), copy.deepcopy(optimizer_state)]  # only rank 0 holds the full state
    dist.broadcast_object_list(box, src=0)

    restored = fresh(1)
    restored_wrapped, _ = parallelize(restored, strategy, shard, device, embedding_min_rows=1000)  # type: ignore[arg-type]
    restored_optimizer = torch.optim.Adam([p for _, p in restored.named_parameters()], lr=0.01)
    load_full_state(restored, restored_optimizer, box[0], box[1])
    restored_state = full_model_state(restored)

    ids, y = rank_batch(rank, 99)
    for w, opt in ((wrapped, optimizer), (restored_wrapped, restored_optimizer)):
        opt.zero_grad()
        F.mse_loss(w(ids), y).backward()
        opt.step()
    after_original, after_restored = full_model_state(model), full_model_state(restored)
    if rank != 0:
        return None
    return {
        "sharded": sharded,
        "local_item_shape": local_item_shape,
        "vs_single_process": max_diff(trained, reference.state_dict()),
        "restored_equal": all(torch.equal(trained[k], restored_state[k]) for k in trained),
        "next_step_diff": max_diff(after_original, after_restored),
        "grad_norm": norm,
        "reference_grad_norm": ref_norm,
    }


def worker(rank: int, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        results = {f"{s}-{sh}": run_combo(rank, s, sh) for s, sh in COMBOS}
        if rank == 0:
            Path(out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("sharding")
    out = tmp / "results.json"
    mp.spawn(worker, args=(str(tmp / "store"), str(out)), nprocs=WORLD, join=True)
    results: dict[str, dict[str, Any]] = json.loads(out.read_text())
    return results


@pytest.mark.parametrize(("strategy", "shard"), COMBOS)
def test_two_ranks_train_like_one_process(
    results: dict[str, dict[str, Any]], strategy: str, shard: bool
) -> None:
    r = results[f"{strategy}-{shard}"]
    assert r["vs_single_process"] < 1e-5
    assert r["grad_norm"] == pytest.approx(r["reference_grad_norm"], rel=1e-4)


@pytest.mark.parametrize(("strategy", "shard"), COMBOS)
def test_state_round_trip_is_exact(results: dict[str, dict[str, Any]], strategy: str, shard: bool) -> None:
    r = results[f"{strategy}-{shard}"]
    assert r["restored_equal"]
    assert r["next_step_diff"] == 0.0  # same weights and optimizer moments -> the same next step


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_only_large_tables_are_split_by_columns(results: dict[str, dict[str, Any]], strategy: str) -> None:
    assert results[f"{strategy}-True"]["sharded"] == ["item"]
    assert results[f"{strategy}-True"]["local_item_shape"] == [2000, 8 // WORLD]
    assert results[f"{strategy}-False"]["sharded"] == []


@pytest.mark.parametrize(
    ("address", "env", "expected"),
    [
        (None, None, {"address": "local", "num_cpus": "workers + 1"}),
        (None, "ray://head:10001", {"address": None}),  # inside a Ray job: its cluster
        ("auto", None, {"address": "auto"}),
    ],
)
def test_a_cluster_started_for_training_leaves_ray_data_a_cpu(
    monkeypatch: pytest.MonkeyPatch, address: str | None, env: str | None, expected: dict[str, Any]
) -> None:
    """Two workers on a 2-core machine used to take both CPUs; Ray Data's reads then never ran."""
    import ray

    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    if env is None:
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
    else:
        monkeypatch.setenv("RAY_ADDRESS", env)
    connect(address, num_workers=2, cpus_per_worker=1)
    want = {**expected, "num_cpus": 3} if "num_cpus" in expected else expected
    assert calls == [want]
