"""What every Ray Train worker runs: build the model, resume if there is a checkpoint, then per epoch
train on this worker's shard, evaluate, and report metrics with a checkpoint.

A checkpoint holds the full (unsharded) weights, the optimizer state keyed by parameter name and the
number of finished epochs, so a restarted worker group, after a crash or a fresh job with the same
run name, continues at the first unfinished epoch, possibly with another number of workers.

Two kinds of model train here. Ranking models (LiGR, HSTU, DCNv2) read ``RankingBatch``es collated from
the preprocessed example rows; their ``forward`` returns the loss. Next-item retrievers (LiGR
retrieval, SASRec) read MovieLens sequences; ``NextItemObjective`` gives them a ``forward`` so that
DDP and FSDP2, which hook ``forward``, see every step.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np
import ray.train
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.tensor import DTensor

from workloads.data.schema import TASKS
from workloads.eval.evaluate import read_catalog
from workloads.eval.metrics import auc, hit_rate_at_k, ndcg_at_k, normalized_entropy, seen_items, target_ranks
from workloads.models.base import NextItemModel
from workloads.models.batch import (
    ItemContentTable,
    SemanticIdTable,
    SequenceBatch,
    collate,
    collate_sequences,
)
from workloads.models.config import DCNv2Config, HSTUConfig, LiGRConfig
from workloads.train.artifact import build_any_model
from workloads.train.checkpoints import report_epoch, resumed_checkpoint
from workloads.train.config import TrainConfig
from workloads.train.sharding import (
    full_model_state,
    full_optimizer_state,
    load_full_state,
    parallelize,
    use_reserved_cpus,
)

CHECKPOINT_FILE = "state.pt"
RETRIEVAL_K = 10
ParamGroups = list[tuple[dict[str, Any], list[str]]]

logger = logging.getLogger(__name__)


# --- Small pieces -----------------------------------------------------------------------------------


def state_digest(state: dict[str, Tensor]) -> str:
    """sha256 over names and bytes of a state dict: equal digests mean bit-identical weights."""
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def named_param_groups(model: nn.Module, prefix: str = "") -> ParamGroups:
    """The model's optimizer groups (embedding vs dense learning rate) with parameters named, so they can
    be re-bound after sharding replaces the parameter objects (and the embedding module types)."""
    names = {id(p): prefix + n for n, p in model.named_parameters()}
    return [
        ({k: v for k, v in group.items() if k != "params"}, [names[id(p)] for p in group["params"]])
        for group in model.param_groups()  # type: ignore[operator]
    ]


def make_optimizer(module: nn.Module, groups: ParamGroups) -> torch.optim.Optimizer:
    params = dict(module.named_parameters())
    return torch.optim.AdamW(
        [{**settings, "params": [params[n] for n in names]} for settings, names in groups]
    )


def clip_grad_norm(params: Iterable[nn.Parameter], max_norm: float) -> float:
    """Clip the global gradient norm when gradients are a mix of replicated tensors and DTensor shards
    (FSDP2 rows, column-sharded tables), which ``nn.utils.clip_grad_norm_`` cannot stack together."""
    grads = [p.grad for p in params if p.grad is not None]
    replicated = torch.zeros((), dtype=torch.float64)
    sharded = torch.zeros((), dtype=torch.float64)
    for g in grads:
        if isinstance(g, DTensor) and any(pl.is_shard() for pl in g.placements):
            sharded += g.to_local().double().pow(2).sum().cpu()
        else:
            local = g.to_local() if isinstance(g, DTensor) else g
            replicated += local.double().pow(2).sum().cpu()
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(sharded)  # each rank holds a disjoint slice of these
    total = float((replicated + sharded).sqrt())
    scale = max_norm / (total + 1e-6)
    if scale < 1.0:
        for g in grads:
            g.mul_(scale)
    return total


def _finite(metrics: dict[str, Any]) -> dict[str, Any]:
    """NaN (e.g. AUC of a task without positives) becomes None: metrics travel as JSON."""
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()}


def _gather(local: Any) -> list[Any]:
    """Every rank's ``local`` object, in rank order (a collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [local]
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return parts


# --- Ranking models on preprocessed examples ----------------------------------------------------------


class RankingTask:
    """Ranking models: example rows -> ``RankingBatch``; loss from ``forward``; AUC / NE per task."""

    state_prefix = ""
    find_unused_parameters = False

    def __init__(self, cfg: TrainConfig) -> None:
        assert cfg.world_dir is not None
        assert isinstance(cfg.model, LiGRConfig | HSTUConfig | DCNv2Config)
        self.cfg = cfg
        self.model_cfg = cfg.model
        self.content = ItemContentTable.from_parquet(cfg.world_dir / "items.parquet")
        self.semantic_ids = None
        if cfg.semantic_ids_path is not None:
            codebook = getattr(cfg.model, "sid_codebook_size", 0)
            self.semantic_ids = SemanticIdTable.from_parquet(cfg.semantic_ids_path, codebook)

    def build(self, model: nn.Module) -> nn.Module:
        return model

    def batches(self, shard: Any, batch_size: int, seed: int | None, training: bool) -> Iterator[Any]:
        for rows in shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", **_shuffle(batch_size, seed)
        ):
            batch = collate(
                rows,
                self.content,
                self.model_cfg.max_history,
                self.model_cfg.max_candidates,
                self.semantic_ids,
            )
            yield batch if training else (batch, None)

    @staticmethod
    def events(batch: Any) -> int:
        return int(batch.hist_mask.sum()) + int(batch.cand_mask.sum())

    @staticmethod
    def loss(output: Any) -> Tensor:
        assert output.loss is not None, "training batches carry labels"
        return output.loss

    @staticmethod
    def eval_part(batch: Any, _: None, output: Any) -> tuple[np.ndarray, np.ndarray, float, int]:
        mask = batch.cand_mask
        probs = torch.sigmoid(output.logits.float())[mask].cpu().numpy()
        return (
            probs,
            batch.labels[mask].cpu().numpy(),
            float(output.loss) * batch.batch_size,
            batch.batch_size,
        )

    @staticmethod
    def eval_metrics(parts: list[tuple[np.ndarray, np.ndarray, float, int]]) -> dict[str, float]:
        empty = np.zeros((0, len(TASKS)))
        probs = np.concatenate([p[0] for p in parts] or [empty])
        labels = np.concatenate([p[1] for p in parts] or [empty])
        rows = sum(p[3] for p in parts)
        metrics = {
            "eval_loss": sum(p[2] for p in parts) / max(rows, 1),
            "eval_candidates": float(len(labels)),
        }
        for t, task in enumerate(TASKS):
            metrics[f"eval_{task}_auc"] = auc(labels[:, t], probs[:, t])
            metrics[f"eval_{task}_ne"] = normalized_entropy(labels[:, t], probs[:, t])
        return metrics


# --- Next-item retrievers on MovieLens sequences ------------------------------------------------------


class NextItemObjective(nn.Module):
    """``forward`` for a two-tower retriever: the next-item loss in training, catalog scores in eval."""

    catalog: Tensor

    def __init__(self, model: NextItemModel, catalog: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("catalog", catalog, persistent=False)

    def forward(self, batch: SequenceBatch) -> Tensor:
        if self.training:
            return self.model.loss(batch, candidate_ids=self.catalog)  # (,) softmax over the whole catalog
        return self.model.user_embedding(batch) @ self.model.item_embedding(self.catalog).T  # (B, n_items)


class NextItemTask:
    """Retrievers: train on each user's training sequence, validate on the held-out next item (HR/NDCG@10)."""

    state_prefix = "model."
    find_unused_parameters = True  # e.g. LiGR retrieval's action head when action_loss_weight is 0

    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.catalog = read_catalog(cfg.examples_dir)

    def build(self, model: nn.Module) -> nn.Module:
        assert isinstance(model, NextItemModel)
        return NextItemObjective(model, torch.from_numpy(self.catalog))

    def batches(self, shard: Any, batch_size: int, seed: int | None, training: bool) -> Iterator[Any]:
        max_len = self.cfg.model.max_len  # type: ignore[union-attr]
        for rows in shard.iter_batches(
            batch_size=batch_size, batch_format="numpy", **_shuffle(batch_size, seed)
        ):
            # the events' outcomes ride along: LiGR retrieval interleaves them as action tokens
            batch = collate_sequences(rows["train_item_ids"], max_len, actions=rows["train_actions"])
            if training:
                yield batch
            else:  # the validation target follows the training sequence
                yield batch, np.asarray(rows["valid_item_id"], dtype=np.int64)

    @staticmethod
    def events(batch: Any) -> int:
        return int(batch.mask.sum())

    @staticmethod
    def loss(output: Any) -> Tensor:
        return output

    def eval_part(self, sequences: SequenceBatch, targets: np.ndarray, output: Any) -> np.ndarray:
        """0-based rank of each user's validation item among the catalog minus the items already seen."""
        scores = output.float().cpu().numpy()
        seen = seen_items(self.catalog, sequences.item_id.cpu().numpy(), sequences.mask.cpu().numpy())
        return target_ranks(scores, np.searchsorted(self.catalog, targets), exclude=seen)

    @staticmethod
    def eval_metrics(parts: list[np.ndarray]) -> dict[str, float]:
        ranks = np.concatenate(parts) if parts else np.zeros(0)
        return {
            f"eval_hr@{RETRIEVAL_K}": hit_rate_at_k(ranks, RETRIEVAL_K),
            f"eval_ndcg@{RETRIEVAL_K}": ndcg_at_k(ranks, RETRIEVAL_K),
            "eval_users": float(len(ranks)),
        }


def _shuffle(batch_size: int, seed: int | None) -> dict[str, Any]:
    if seed is None:
        return {}
    return {"local_shuffle_buffer_size": 8 * batch_size, "local_shuffle_seed": seed}


def make_task(cfg: TrainConfig) -> RankingTask | NextItemTask:
    return NextItemTask(cfg) if cfg.is_retrieval else RankingTask(cfg)


# --- Epochs ---------------------------------------------------------------------------------------------


def _autocast(cfg: TrainConfig, device: torch.device) -> torch.autocast:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.autocast_bf16)


def _maybe_crash(cfg: TrainConfig, epoch: int, rank: int) -> None:
    """Fault injection: rank 0 dies abruptly after the first step of ``crash_at_epoch``, once per run.

    That is usually within Ray Train's 2 s result poll of the previous epoch's report, so the drill also
    covers a checkpoint Ray had not registered yet (``workloads.train.checkpoints``).
    """
    if cfg.crash_at_epoch != epoch or rank != 0:
        return
    marker = cfg.storage_path.resolve() / cfg.run_name / f".crash-injected-epoch-{epoch}"
    if marker.exists():
        return
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    os._exit(17)


def train_epoch(
    cfg: TrainConfig,
    task: RankingTask | NextItemTask,
    wrapped: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterator[Any],
    device: torch.device,
    epoch: int,
    rank: int,
) -> dict[str, float]:
    wrapped.train()
    loss_sum, steps, events = 0.0, 0, 0
    began = last_progress = time.perf_counter()
    for batch in batches:
        batch = batch.to(device)
        with _autocast(cfg, device):
            loss = task.loss(wrapped(batch))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip is not None:
            clip_grad_norm(wrapped.parameters(), cfg.grad_clip)
        optimizer.step()
        loss_sum += float(loss.detach())
        steps += 1
        events += task.events(batch)
        _maybe_crash(cfg, epoch, rank)
        if rank == 0 and time.perf_counter() - last_progress >= cfg.progress_seconds:
            last_progress = time.perf_counter()
            elapsed = last_progress - began
            # the job log the operator and `rankray run` stream: the run is alive and how fast it goes
            # (a log record: Ray Train sends a worker's print both to its log and to stdout, twice)
            logger.info(
                f"epoch {epoch}/{cfg.epochs} step {steps}: loss {loss_sum / steps:.4f}, "
                f"{events / elapsed:,.0f} events/s on this worker, {elapsed:.0f} s",
            )
    seconds = time.perf_counter() - began
    totals = torch.tensor([loss_sum, steps, events], dtype=torch.float64)
    if dist.is_initialized():
        dist.all_reduce(totals)
    return {
        "train_loss": float(totals[0] / totals[1].clamp(min=1)),
        "train_steps": int(totals[1]),
        "train_events": int(totals[2]),
        "train_seconds": seconds,
        "train_events_per_s": float(totals[2]) / max(seconds, 1e-9),
        "threads_per_worker": torch.get_num_threads(),  # what events/s was computed with
    }


@torch.no_grad()
def evaluate_epoch(
    cfg: TrainConfig,
    task: RankingTask | NextItemTask,
    wrapped: nn.Module,
    batches: Iterator[Any],
    device: torch.device,
) -> dict[str, float]:
    """The task's validation metrics over every worker's eval shard (gathered, then computed once)."""
    wrapped.eval()
    parts = []
    for inputs, extra in batches:  # extra: what the metric needs beyond the model inputs (targets)
        inputs = inputs.to(device)
        with _autocast(cfg, device):
            output = wrapped(inputs)
        parts.append(task.eval_part(inputs, extra, output))
    every_rank = [part for rank_parts in _gather(parts) for part in rank_parts]
    return task.eval_metrics(every_rank)


# --- Checkpoints ----------------------------------------------------------------------------------------


def _load_checkpoint_state() -> dict[str, Any] | None:
    with resumed_checkpoint() as folder:
        if folder is None:
            return None
        state: dict[str, Any] = torch.load(folder / CHECKPOINT_FILE, map_location="cpu", weights_only=True)
    return state


def _report(metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
    """Every rank reports; only rank 0 (which holds the gathered state) attaches the checkpoint."""
    write = None if state is None else lambda folder: torch.save(state, folder / CHECKPOINT_FILE)
    report_epoch(_finite(metrics), int(metrics["epoch"]), write)


def _strip(state: dict[str, Tensor], prefix: str) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """The Ray Train worker entry point; ``loop_config["train"]`` is a ``TrainConfig`` as JSON."""
    from ray.train.torch import get_device

    cfg = TrainConfig.model_validate(loop_config["train"])
    rank = ray.train.get_context().get_world_rank()
    device = get_device()
    use_reserved_cpus(cfg.cpus_per_worker, device)
    task = make_task(cfg)

    torch.manual_seed(cfg.seed)  # identical initial weights on every rank (FSDP2 shards each rank's copy)
    model = build_any_model(cfg.model)
    groups = named_param_groups(model, task.state_prefix)
    module = task.build(model).to(device)
    wrapped, _ = parallelize(
        module,
        cfg.strategy,
        cfg.shard_embeddings,
        device,
        cfg.embedding_shard_min_rows,
        task.find_unused_parameters,
    )
    optimizer = make_optimizer(module, groups)

    finished_epochs, restored_digest = 0, ""
    state = _load_checkpoint_state()
    if state is not None:
        finished_epochs = int(state["epoch"])
        prefixed = {task.state_prefix + k: v for k, v in state["model"].items()}
        load_full_state(module, optimizer, prefixed, state["optimizer"])
        restored = _strip(full_model_state(module), task.state_prefix)  # gathered on rank 0 only
        restored_digest = state_digest(restored) if rank == 0 else ""

    train_shard = ray.train.get_dataset_shard("train")
    eval_shard = ray.train.get_dataset_shard("eval")
    for epoch in range(finished_epochs + 1, cfg.epochs + 1):
        torch.manual_seed(cfg.seed + 1000 * epoch + rank)  # dropout stream independent of restarts
        metrics: dict[str, Any] = {"epoch": epoch, "resumed_from_epoch": finished_epochs}
        train_batches = task.batches(train_shard, cfg.batch_size, cfg.seed + epoch, training=True)
        metrics |= train_epoch(cfg, task, wrapped, optimizer, train_batches, device, epoch, rank)
        eval_batches = task.batches(eval_shard, cfg.eval_batch_size, None, training=False)
        metrics |= evaluate_epoch(cfg, task, wrapped, eval_batches, device)
        metrics["restored_weights_sha256"] = restored_digest
        model_state = _strip(full_model_state(module), task.state_prefix)  # collectives: every rank joins
        optimizer_state = full_optimizer_state(module, optimizer)
        checkpoint = None
        if rank == 0:
            checkpoint = {"epoch": epoch, "model": model_state, "optimizer": optimizer_state}
        _report(metrics, checkpoint)
