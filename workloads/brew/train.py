"""`python -m workloads.brew.train`: fine-tune a decoder into 360Brew on Ray Train.

Two stages, as in the paper (section 2.2): continued training on raw entity text (member profiles,
job postings, posts; every token is a target), then instruction fine-tuning on verbalized
interaction prompts where only the answer token is a target. Both run in one `TorchTrainer` run,
one reported epoch after another, so checkpoints and resume cover the whole schedule.

- Full fine-tuning or LoRA (PEFT) by `finetune_mode`; the same parameters train in both stages.
- DDP with gloo on CPU, FSDP2 (`fully_shard` per decoder layer) on GPU, via
  `workloads.train.sharding.parallelize` (the LiGR trainer's; one code path for both models).
- Every epoch reports the mean loss with a checkpoint (the trainable weights, the optimizer and the
  next epoch). A failed worker group restarts from it (`FailureConfig`); a new job with the same
  `name` and `out_dir` continues from it too (Ray Train V2 restores the run's checkpoint state).
- The result is an artifact folder (`workloads.brew.artifact`): a full HF folder, or the base
  folder plus a LoRA adapter, which `workloads.brew.score` loads with transformers or vLLM.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
from peft import PeftModel
from pydantic import BaseModel, ConfigDict, Field, model_validator
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train import CheckpointConfig, FailureConfig, RunConfig
from ray.train.torch import TorchConfig, TorchTrainer
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from workloads.brew.artifact import BrewArtifact
from workloads.brew.data import (
    EntityText,
    Periods,
    TimeSplit,
    World,
    entity_corpus,
    history_events,
    impression_examples,
    load_world,
    resolve_periods,
)
from workloads.brew.loss import IGNORE, language_model_loss
from workloads.brew.model import BaseModelSpec, answer_token_ids, load_tokenizer, resolve_base
from workloads.brew.prompts import DEFAULT_TEMPLATES, Templates, Verbalizer, load_templates
from workloads.data.atomic import atomic_dir
from workloads.data.schema import data_root
from workloads.stage import run_stage
from workloads.train.checkpoints import report_epoch, resumed_checkpoint
from workloads.train.loop import clip_grad_norm
from workloads.train.sharding import (
    connect,
    full_model_state,
    full_optimizer_state,
    parallelize,
    use_reserved_cpus,
    worker_scaling,
)

STAGES = ("pretrain", "finetune")

logger = logging.getLogger(__name__)


class StageConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=0)
    lr: float = Field(1e-4, gt=0)
    batch_size: int = Field(8, ge=1, description="sequences per worker and step")


class LoraSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    r: int = Field(16, ge=1)
    alpha: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


class BrewTrainConfig(BaseModel):
    """`python -m workloads.brew.train`: continued pretraining + instruction fine-tuning of 360Brew."""

    model_config = ConfigDict(extra="forbid")

    world_dir: Path = Field(
        default_factory=lambda: data_root() / "world", description="rankray data synth output"
    )
    out_dir: Path = Field(
        default_factory=lambda: data_root() / "brew", description="checkpoints, base, artifact"
    )
    name: str = Field("brew", pattern=r"^[A-Za-z0-9_.-]+$", description="run name: the same name resumes")
    base: BaseModelSpec = BaseModelSpec()
    templates_file: Path = DEFAULT_TEMPLATES
    tasks: list[str] = Field(["job_apply", "job_dismiss", "feed_like", "feed_long_dwell"], min_length=1)
    surfaces: list[Literal["feed", "jobs"]] | None = Field(
        None,
        min_length=1,
        description="instead of tasks: every trained task of the templates on these surfaces (what a "
        "RankingModel's data.surfaces sets)",
    )
    max_context_tokens: int = Field(512, ge=64)
    split: TimeSplit = TimeSplit()
    examples_per_task: int = Field(1000, ge=1, description="instruction examples per task (training period)")
    positive_fraction: float | None = Field(0.3, gt=0, lt=1, description="share of positives; None: natural")
    session_pairs: bool = Field(
        False,
        description="each positive with a negative from its own session (same history), so the amount of "
        "history cannot stand in for the answer; positive_fraction must then be null",
    )
    pretrain_blocks: int = Field(256, ge=0, description="raw-entity-text blocks for stage 1 (at most)")
    pretrain_block_tokens: int = Field(256, ge=16)
    pretrain: StageConfig = StageConfig(epochs=1, lr=5e-4)
    finetune: StageConfig = StageConfig(epochs=2, lr=5e-4)
    finetune_mode: Literal["full", "lora"] = "full"
    lora: LoraSpec = LoraSpec()
    merge_lora: bool = Field(
        False,
        description="publish LoRA merged into the base weights: one plain HF folder, no adapter "
        "(vLLM's CPU build scored ~5x slower with an adapter than with merged weights)",
    )
    max_grad_norm: float = Field(1.0, gt=0)
    num_workers: int = Field(1, ge=1)
    cpus_per_worker: int = Field(1, ge=1, description="CPUs each worker reserves; torch uses as many threads")
    use_gpu: bool = False
    sharding: Literal["auto", "ddp", "fsdp2"] = Field("auto", description="auto: FSDP2 on GPU, DDP on CPU")
    max_failures: int = Field(1, ge=0, description="worker-group restarts from the last checkpoint")
    progress_seconds: float = Field(30.0, gt=0, description="rank 0 logs step, loss and pace this often")
    seed: int = 0
    ray_address: str | None = Field(
        None, description="None: $RAY_ADDRESS if set, else a new local cluster; 'auto' or 'ray://host:port'"
    )

    @model_validator(mode="after")
    def _tasks_trainable(self) -> BrewTrainConfig:
        templates = load_templates(self.templates_file)
        if self.surfaces is not None:
            if "tasks" in self.model_fields_set:
                raise ValueError("set tasks or surfaces, not both")
            self.tasks = [
                name for name in templates.trained_tasks if templates.task(name).surface in self.surfaces
            ]
            if not self.tasks:
                raise ValueError(f"the templates have no trained task on surfaces {self.surfaces}")
        for task in self.tasks:
            if not templates.task(task).trained:
                raise ValueError(
                    f"task {task!r} is marked trained: false (zero-shot only); remove it from tasks"
                )
        if self.pretrain.epochs + self.finetune.epochs == 0:
            raise ValueError("pretrain.epochs + finetune.epochs must be at least 1")
        if self.session_pairs and self.positive_fraction is not None:
            raise ValueError("session_pairs makes half the examples positive: set positive_fraction to null")
        if self.merge_lora and self.finetune_mode != "lora":
            raise ValueError("merge_lora: there is no adapter to merge unless finetune_mode is lora")
        return self

    @property
    def strategy(self) -> Literal["ddp", "fsdp2"]:
        if self.sharding == "auto":
            return "fsdp2" if self.use_gpu else "ddp"
        return self.sharding

    def schedule(self) -> list[str]:
        """The stage each reported epoch belongs to, in order."""
        return ["pretrain"] * self.pretrain.epochs + ["finetune"] * self.finetune.epochs

    def stage(self, name: str) -> StageConfig:
        return self.pretrain if name == "pretrain" else self.finetune


# --- Examples: token ids with answer-only labels -------------------------------------------------------
def answer_only_example(prompt_ids: Sequence[int], answer_id: int) -> dict[str, list[int]]:
    """The prompt followed by its answer token; only the answer position is a target.

    The causal LM shifts labels left by one inside the loss, so the label at the answer position is
    predicted from the logits at the prompt's last token: the same logits scoring reads.
    """
    return {"input_ids": [*prompt_ids, answer_id], "labels": [IGNORE] * len(prompt_ids) + [answer_id]}


def text_blocks(
    tokenizer: PreTrainedTokenizerBase, texts: Iterable[str], block: int, limit: int
) -> list[list[int]]:
    """Documents joined by EOS and cut into equal blocks: the stage-1 language-modelling data."""
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        if eos is not None:
            stream.append(eos)
        if len(stream) >= block * limit:
            break
    return [stream[i : i + block] for i in range(0, len(stream) - block + 1, block)][:limit]


def collate(batch: dict[str, np.ndarray], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad variable-length rows: pad ids are masked out of attention and of the loss."""
    rows = [list(map(int, ids)) for ids in batch["input_ids"]]
    labels = [list(map(int, lab)) for lab in batch["labels"]]
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    target = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (r, lab) in enumerate(zip(rows, labels, strict=True)):
        input_ids[i, : len(r)] = torch.tensor(r)
        target[i, : len(lab)] = torch.tensor(lab)
        mask[i, : len(r)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": target}


class PadCollate(NumpyBatchCollateFn):
    """`collate` as the callable class Ray Data's `iter_torch_batches` expects."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, batch: dict[str, np.ndarray]) -> Any:  # Ray types it as an unbound TypeVar
        return collate(batch, self.pad_id)


def instruction_rows(
    cfg: BrewTrainConfig,
    world: World,
    templates: Templates,
    tokenizer: PreTrainedTokenizerBase,
    periods: Periods,
) -> tuple[list[dict[str, list[int]]], dict[str, Any]]:
    """Verbalized training-period examples of every task, with the label as the answer token."""
    text = EntityText(world, templates)
    verbalizer = Verbalizer(templates, tokenizer, cfg.max_context_tokens)
    yes, no = answer_token_ids(tokenizer, templates)
    rows, stats = [], {}
    for k, task in enumerate(cfg.tasks):
        examples = impression_examples(
            world, templates, task, periods.train_start, periods.eval_start, cfg.examples_per_task,
            seed=cfg.seed + k, positive_fraction=cfg.positive_fraction, session_pairs=cfg.session_pairs,
        )  # fmt: skip
        for ex in examples:
            prompt = verbalizer.verbalize(
                task, text.member(ex.member_id), history_events(text, ex), [text.item(ex.question_id)]
            )
            rows.append(answer_only_example(prompt.token_ids[0], yes if ex.label else no))
        stats[task] = {"examples": len(examples), "positives": int(sum(e.label for e in examples))}
    if not rows:
        raise ValueError(f"no training examples for tasks {cfg.tasks} in the training period {periods.iso()}")
    np.random.default_rng(cfg.seed).shuffle(rows)
    return rows, stats


# --- The per-worker loop --------------------------------------------------------------------------------
def _load_model(cfg: BrewTrainConfig, base_dir: Path) -> PreTrainedModel | PeftModel:
    model: PreTrainedModel | PeftModel = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    if cfg.finetune_mode == "lora":
        from peft import LoraConfig, get_peft_model

        lora = cfg.lora
        model = get_peft_model(
            model,
            LoraConfig(
                r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules
            ),
        )
    return model


def _trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full tensors of the trained parameters only (LoRA: the adapters; full FT: everything)."""
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    return {k: v for k, v in full_model_state(model).items() if k in names}


def _mean_over_workers(value: float, count: int) -> float:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return value / max(count, 1)
    t = torch.tensor([value, float(count)], dtype=torch.float64)
    dist.all_reduce(t)
    return float(t[0] / t[1].clamp(min=1.0))


def train_loop(loop_config: dict[str, Any]) -> None:
    cfg = BrewTrainConfig.model_validate(loop_config["config"])
    pad_id = int(loop_config["pad_id"])
    device = ray.train.torch.get_device()
    use_reserved_cpus(cfg.cpus_per_worker, device)
    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(cfg.seed)
    model: torch.nn.Module = _load_model(cfg, Path(loop_config["base_dir"]))
    model.to(device)
    wrapped, _ = parallelize(model, cfg.strategy, shard_embeddings=False, device=device)
    schedule = cfg.schedule()

    first, optimizer_state, history = 0, None, []
    with resumed_checkpoint() as folder:
        if folder is not None:
            progress = json.loads((folder / "progress.json").read_text())
            weights = torch.load(folder / "trainable.pt", weights_only=True)
            set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True, strict=False))
            first, history = int(progress["next_epoch"]), progress["history"]
            if first < len(schedule) and schedule[first] == progress["stage"]:
                optimizer_state = torch.load(folder / "optimizer.pt", weights_only=False)

    optimizer: torch.optim.Optimizer | None = None
    for epoch in range(first, len(schedule)):
        stage = schedule[epoch]
        settings = cfg.stage(stage)
        if optimizer is None or epoch == 0 or schedule[epoch - 1] != stage:  # a fresh optimizer per stage
            optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings.lr)
            if optimizer_state is not None:
                set_optimizer_state_dict(
                    model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True)
                )
                optimizer_state = None
        wrapped.train()
        total, steps = 0.0, 0
        expected = math.ceil(loop_config["rows"][stage] / cfg.num_workers / settings.batch_size)
        began = last_progress = time.perf_counter()
        batches = ray.train.get_dataset_shard(stage).iter_torch_batches(
            batch_size=settings.batch_size, collate_fn=PadCollate(pad_id)
        )
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = language_model_loss(wrapped, batch)
            loss.backward()
            clip_grad_norm([p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            total, steps = total + float(loss.detach()), steps + 1
            if rank == 0 and time.perf_counter() - last_progress >= cfg.progress_seconds:
                last_progress = time.perf_counter()
                elapsed = last_progress - began
                # an LLM epoch on CPU takes long: the job log shows it is alive and how fast it goes
                # (a log record: Ray Train sends a worker's print both to its log and to stdout, twice)
                logger.info(
                    f"epoch {epoch + 1}/{len(schedule)} ({stage}) step {steps}/~{expected}: "
                    f"loss {total / steps:.4f}, {elapsed / steps:.1f} s/step, {elapsed:.0f} s",
                )
        metrics = {"epoch": epoch, "stage": stage, "loss": _mean_over_workers(total, steps), "steps": steps}
        history.append(metrics)
        weights = _trainable_state(model)  # collectives: every rank takes part
        opt_state = full_optimizer_state(model, optimizer)
        progress = {"next_epoch": epoch + 1, "stage": stage, "history": history}
        report_epoch(
            metrics, epoch + 1, _checkpoint_writer(weights, opt_state, progress) if rank == 0 else None
        )


def _checkpoint_writer(
    weights: dict[str, Any], optimizer_state: Any, progress: dict[str, Any]
) -> Callable[[Path], None]:
    def write(folder: Path) -> None:
        torch.save(weights, folder / "trainable.pt")
        torch.save(optimizer_state, folder / "optimizer.pt")
        (folder / "progress.json").write_text(json.dumps(progress))

    return write


# --- Driver ---------------------------------------------------------------------------------------------
def _publish(
    cfg: BrewTrainConfig,
    base_dir: Path,
    checkpoint: ray.train.Checkpoint,
    tokenizer: PreTrainedTokenizerBase,
    templates: Templates,
    periods: Periods,
    metrics: dict[str, Any],
) -> Path:
    """Write the artifact folder atomically: weights (or adapter), tokenizer, templates, manifest."""
    model = _load_model(cfg, base_dir)
    with checkpoint.as_directory() as folder:
        weights = torch.load(Path(folder) / "trainable.pt", weights_only=True)
    missing = set(weights) - set(model.state_dict())
    if missing:
        raise RuntimeError(f"checkpoint holds parameters the model lacks: {sorted(missing)[:5]}")
    model.load_state_dict(weights, strict=False)
    yes, no = answer_token_ids(tokenizer, templates)
    out = cfg.out_dir / "artifact"
    with atomic_dir(out) as tmp:
        shutil.copy(cfg.templates_file, tmp / "templates.yaml")
        if isinstance(model, PeftModel) and cfg.merge_lora:
            model = model.merge_and_unload()  # W + (alpha / r) B A, in place of the adapter
        if isinstance(model, PeftModel):
            model.save_pretrained(str(tmp / "adapter"))  # PEFT writes only the adapter weights
            tokenizer.save_pretrained(tmp / "adapter")
            model_dir, adapter_dir = base_dir.resolve(), Path("adapter")
        else:
            model.save_pretrained(str(tmp / "model"))
            tokenizer.save_pretrained(tmp / "model")
            model_dir, adapter_dir = Path("model"), None
        BrewArtifact(
            version=cfg.name,
            model_dir=model_dir,
            adapter_dir=adapter_dir,
            lora_rank=cfg.lora.r if adapter_dir else None,
            templates_file=Path("templates.yaml"),
            max_context_tokens=cfg.max_context_tokens,
            yes_token_id=yes,
            no_token_id=no,
            tasks=cfg.tasks,
            data_window=periods.iso(),
            metrics=metrics,
        ).save(tmp)
    return out


def train(cfg: BrewTrainConfig) -> dict[str, Any]:
    """Build the data on the driver, run both stages on Ray Train, publish the artifact."""
    templates = load_templates(cfg.templates_file)
    world = load_world(cfg.world_dir)
    periods = resolve_periods(cfg.world_dir, cfg.split)
    text = EntityText(world, templates)
    corpus = list(entity_corpus(world, text, periods.eval_start))
    base_dir = cfg.out_dir / "base"
    if not (cfg.base.kind == "tiny" and (base_dir / "config.json").is_file()):  # a resumed run keeps its base
        base_dir = resolve_base(cfg.base, base_dir, corpus, templates)
    tokenizer = load_tokenizer(base_dir)
    rows, stats = instruction_rows(cfg, world, templates, tokenizer, periods)
    blocks = text_blocks(tokenizer, corpus, cfg.pretrain_block_tokens, cfg.pretrain_blocks)
    if cfg.pretrain.epochs and not blocks:
        raise ValueError("stage 1 has no text blocks: lower pretrain_block_tokens or set pretrain.epochs: 0")

    connect(cfg.ray_address, cfg.num_workers, cfg.cpus_per_worker)
    datasets: dict[str, ray.data.Dataset | Callable[[], ray.data.Dataset]] = {}
    if cfg.pretrain.epochs:
        datasets["pretrain"] = ray.data.from_items([{"input_ids": b, "labels": b} for b in blocks])
    if cfg.finetune.epochs:
        datasets["finetune"] = ray.data.from_items(rows)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "base_dir": str(base_dir.resolve()),
            "pad_id": tokenizer.pad_token_id
            if tokenizer.pad_token_id is not None
            else tokenizer.eos_token_id,
            "rows": {"pretrain": len(blocks), "finetune": len(rows)},
        },
        scaling_config=worker_scaling(cfg.num_workers, cfg.use_gpu, cfg.cpus_per_worker),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(
            name=cfg.name,
            storage_path=str((cfg.out_dir / "ray").resolve()),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
        datasets=datasets,
    )
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"training run {cfg.name!r} finished without a checkpoint")
    with result.checkpoint.as_directory() as folder:
        history = json.loads((Path(folder) / "progress.json").read_text())["history"]
    metrics = {"epochs": history, "examples": stats, "pretrain_blocks": len(blocks)}
    artifact = _publish(cfg, base_dir, result.checkpoint, tokenizer, templates, periods, metrics)
    return {"artifact": str(artifact), "base": str(base_dir), **metrics}


def main(argv: list[str] | None = None) -> None:
    run_stage(BrewTrainConfig, train, argv)


if __name__ == "__main__":
    main()
