"""How a model is spread over the training workers: DDP, FSDP2, and column-wise sharded embedding tables.

- DDP (default): every worker holds the whole model; gradients are averaged after backward.
- FSDP2 (``torch.distributed.fsdp.fully_shard``): parameters are sharded by rows over the workers and
  gathered layer by layer for compute; one FSDP unit per layer of every ``nn.ModuleList`` plus the root.
- Column-wise embedding sharding (LiGR section 4.0.1): each large ``nn.Embedding`` table keeps only
  ``embedding_dim / world`` of its columns on each worker, as a DTensor ``Shard(1)``. A lookup never
  gathers the table, so tables larger than one device fit; it gathers the *ids* instead (all ranks
  look up every rank's ids in their column slice, then the slices are gathered). These tables are
  left out of DDP / FSDP2, whose gradient handling would not understand them.

Checkpoints hold full (unsharded) tensors keyed by parameter name, so a run can resume on a
different number of workers or strategy, and the artifact writer never needs a process group.

Each worker reserves ``cpus_per_worker`` CPUs and runs torch with that many threads: Ray pins an
actor's ``OMP_NUM_THREADS`` to its CPU reservation, so a worker that reserves the default one CPU
computes on one core however many cores its pod has.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

if TYPE_CHECKING:
    from ray.train import ScalingConfig

Strategy = Literal["ddp", "fsdp2"]

_FULL_ON_CPU = StateDictOptions(full_state_dict=True, cpu_offload=True)


def worker_scaling(num_workers: int, use_gpu: bool, cpus_per_worker: int) -> ScalingConfig:
    """Ray Train's worker group: ``num_workers`` actors of ``cpus_per_worker`` CPUs (and a GPU each)."""
    from ray.train import ScalingConfig  # only here: plain torch.distributed processes import this module

    resources = {"CPU": float(cpus_per_worker), **({"GPU": 1.0} if use_gpu else {})}
    return ScalingConfig(num_workers=num_workers, use_gpu=use_gpu, resources_per_worker=resources)


def connect(address: str | None, num_workers: int, cpus_per_worker: int) -> None:
    """Join ``address`` (or $RAY_ADDRESS, as inside a Ray job); with neither, start a local cluster with
    enough logical CPUs for the worker group plus one: Ray Data's read tasks need a CPU of their own,
    and on a machine with exactly as many cores as the workers reserve they would wait forever."""
    import ray  # only here: plain torch.distributed processes import this module

    if ray.is_initialized():
        return
    if address is None and "RAY_ADDRESS" not in os.environ:
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_workers * cpus_per_worker + 1))
    else:
        ray.init(address=address)


def use_reserved_cpus(cpus_per_worker: int, device: torch.device) -> None:
    """On CPU, run as many torch threads as the worker reserved CPUs: all of them, and no more."""
    if device.type == "cpu":
        torch.set_num_threads(cpus_per_worker)


def _gather_ids(ids: Tensor) -> tuple[Tensor, list[int]]:
    """Concatenate every rank's flattened ids (ranks may hold different counts); returns (ids, counts)."""
    flat = ids.reshape(-1)
    count = torch.tensor([flat.numel()], device=flat.device)
    counts = [torch.zeros_like(count) for _ in range(dist.get_world_size())]
    dist.all_gather(counts, count)
    sizes = [int(c.item()) for c in counts]
    padded = torch.zeros(max(sizes), dtype=flat.dtype, device=flat.device)
    padded[: flat.numel()] = flat
    gathered = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(gathered, padded)
    return torch.cat([g[:n] for g, n in zip(gathered, sizes, strict=True)]), sizes


class ColumnShardedEmbedding(nn.Module):
    """An ``nn.Embedding`` whose weight columns are split over the workers (a ``Shard(1)`` DTensor).

    Forward: gather all ranks' ids, look them up in the local column slice, all-gather the columns
    (DTensor ``Shard(1) -> Replicate``) and keep this rank's rows. Backward is the reverse: the
    gradient is marked ``Partial`` (each rank only has its own rows' gradient), so DTensor
    reduce-scatters it back into the column slices. Dividing by the world size matches DDP, which
    averages rather than sums the workers' gradients.
    """

    def __init__(self, table: nn.Embedding, mesh: DeviceMesh) -> None:
        super().__init__()
        if table.padding_idx is not None or table.max_norm is not None or table.sparse:
            raise ValueError("column sharding supports plain nn.Embedding tables only")
        self.mesh = mesh
        self.num_embeddings = table.num_embeddings
        self.embedding_dim = table.embedding_dim
        self.weight = nn.Parameter(distribute_tensor(table.weight.detach(), mesh, [Shard(1)]))

    def forward(self, ids: Tensor) -> Tensor:
        all_ids, counts = _gather_ids(ids)
        ids_dt = DTensor.from_local(all_ids, self.mesh, [Replicate()], run_check=False)
        columns: DTensor = F.embedding(ids_dt, self.weight)  # type: ignore[assignment]  # (N_all, D), Shard(1)
        rows = columns.redistribute(self.mesh, [Replicate()]).to_local(grad_placements=[Partial()])
        if rows.requires_grad:
            world = dist.get_world_size()
            rows.register_hook(lambda grad: grad / world)
        start = sum(counts[: dist.get_rank()])
        return rows[start : start + ids.numel()].reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, columns sharded over {self.mesh.size()} ranks"


def shard_embedding_tables(model: nn.Module, mesh: DeviceMesh, min_rows: int) -> list[str]:
    """Swap every ``nn.Embedding`` with at least ``min_rows`` rows (and columns divisible by the world
    size) for a ``ColumnShardedEmbedding`` in place; returns the swapped modules' names."""
    world = mesh.size()
    swapped = []
    for name, module in list(model.named_modules()):
        if (
            type(module) is nn.Embedding
            and module.num_embeddings >= min_rows
            and module.embedding_dim % world == 0
            and module.padding_idx is None
        ):
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name)
            setattr(parent, child, ColumnShardedEmbedding(module, mesh))
            swapped.append(name)
    return swapped


def _sharded_params(model: nn.Module) -> set[nn.Parameter]:
    return {m.weight for m in model.modules() if isinstance(m, ColumnShardedEmbedding)}


def parallelize(
    model: nn.Module,
    strategy: Strategy,
    shard_embeddings: bool,
    device: torch.device,
    embedding_min_rows: int = 1024,
    find_unused_parameters: bool = False,
) -> tuple[nn.Module, list[str]]:
    """Wrap ``model`` (already on ``device``) for data-parallel training; returns (module to call, the
    names of column-sharded tables). FSDP2 shards in place, DDP wraps; either way parameter names of
    ``model`` itself are unchanged, so optimizers can be built from ``model.named_parameters()``.
    ``find_unused_parameters``: DDP must expect parameters that some steps do not use."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return model, []
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    sharded = shard_embedding_tables(model, mesh, embedding_min_rows) if shard_embeddings else []
    ignored = _sharded_params(model)
    if strategy == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for stack in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
            for layer in stack:
                if any(p.requires_grad for p in layer.parameters()):
                    fully_shard(layer, mesh=mesh, ignored_params=ignored)
        fully_shard(model, mesh=mesh, ignored_params=ignored)
        return model, sharded
    ignored_names = [name for name, p in model.named_parameters() if p in ignored]
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored_names)
    # What ray.train.torch.prepare_model does on one device per worker, minus its Ray context lookup,
    # so this module also runs under torch.multiprocessing in tests.
    device_ids = [device.index] if device.type == "cuda" else None
    ddp = nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters
    )
    return ddp, sharded


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """The whole model's weights as plain CPU tensors, on rank 0 only (a collective: call on every rank).

    A copy: for unsharded CPU parameters torch would hand back the live tensors, which the next
    optimizer step would change under the caller.
    """
    state = get_model_state_dict(model, options=_FULL_ON_CPU)
    return {name: tensor.detach().clone() for name, tensor in state.items()}  # type: ignore[union-attr]


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer state keyed by parameter name, unsharded, on CPU, copied (like full_model_state)."""
    return copy.deepcopy(get_optimizer_state_dict(model, optimizer, options=_FULL_ON_CPU))


def load_full_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None,
    model_state: Mapping[str, Tensor],
    optimizer_state: dict[str, Any] | None = None,
) -> None:
    """Load full tensors into a (possibly sharded) model and optimizer; each rank keeps its own shard."""
    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, dict(model_state), options=options)
    if optimizer is not None and optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
