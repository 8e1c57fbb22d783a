"""Training: answer-only loss masks, and a real two-worker Ray Train run whose loss falls and that resumes."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import ray.train
import torch
from transformers import AutoModelForCausalLM

from workloads.brew.artifact import load_artifact
from workloads.brew.data import Periods
from workloads.brew.loss import IGNORE, language_model_loss
from workloads.brew.model import load_tokenizer
from workloads.brew.prompts import Templates
from workloads.brew.score import ScorerConfig, TransformersScorer
from workloads.brew.train import BrewTrainConfig, _publish, answer_only_example, collate, train


def test_loss_is_on_the_answer_token_only_predicted_from_the_last_prompt_position(tiny_base: Path) -> None:
    model = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    prompts, answers = [[5, 17, 29, 31, 8], [40, 41, 42]], [283, 284]
    rows = [answer_only_example(p, a) for p, a in zip(prompts, answers, strict=True)]
    assert rows[0]["labels"] == [IGNORE] * 5 + [283] and rows[0]["input_ids"] == [*prompts[0], 283]
    batch = collate(
        {k: np.array([r[k] for r in rows], dtype=object) for k in ("input_ids", "labels")}, pad_id=0
    )
    assert (batch["labels"] != IGNORE).sum() == 2  # one target per row, none on padding
    assert batch["attention_mask"].tolist()[1] == [1, 1, 1, 1, 0, 0]

    with torch.no_grad():
        loss = model(**batch).loss
        manual = []
        for prompt, answer in zip(prompts, answers, strict=True):
            logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]  # what scoring reads
            manual.append(-torch.log_softmax(logits, -1)[answer])
    torch.testing.assert_close(loss, torch.stack(manual).mean(), rtol=1e-4, atol=1e-4)


def test_answer_logits_alone_give_the_models_own_loss_and_gradients(tiny_base: Path) -> None:
    """Instruction tuning projects only the positions that predict an answer onto the vocabulary."""
    model = AutoModelForCausalLM.from_pretrained(tiny_base)
    rows = [
        answer_only_example(p, a) for p, a in (([5, 17, 29, 31, 8], 283), ([40, 41, 42], 284), ([7, 9], 283))
    ]
    batch = collate({k: np.array([r[k] for r in rows], dtype=object) for k in ("input_ids", "labels")}, 0)

    def loss_and_grads(loss_fn: Any) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad()
        loss = loss_fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters() if p.grad is not None]

    full, full_grads = loss_and_grads(lambda: model(**batch).loss)
    sparse, sparse_grads = loss_and_grads(lambda: language_model_loss(model, batch))
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-6)
    for a, b in zip(sparse_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)

    # every position a target (stage 1): the model's own loss, unchanged
    dense = {**batch, "labels": batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE)}
    torch.testing.assert_close(language_model_loss(model, dense), model(**dense).loss)


@pytest.mark.slow
def test_two_worker_lora_run_lowers_the_answer_loss_and_publishes_an_adapter(lora_training: Any) -> None:
    cfg, summary = lora_training
    epochs = summary["epochs"]
    assert [e["stage"] for e in epochs] == ["pretrain", "finetune", "finetune", "finetune"]
    finetune = [e["loss"] for e in epochs if e["stage"] == "finetune"]
    assert finetune[-1] < 0.8 * finetune[0], finetune
    artifact = load_artifact(Path(summary["artifact"]))
    assert artifact.adapter_dir is not None and (artifact.adapter_dir / "adapter_config.json").is_file()
    assert artifact.model_dir == Path(cfg.base.path).resolve() and artifact.tasks == cfg.tasks
    assert artifact.max_context_tokens == cfg.max_context_tokens


@pytest.mark.slow
def test_rerun_with_the_same_name_resumes_after_the_last_checkpoint(lora_training: Any) -> None:
    cfg, first = lora_training
    longer = BrewTrainConfig.model_validate(
        {**cfg.model_dump(), "finetune": {**cfg.finetune.model_dump(), "epochs": cfg.finetune.epochs + 1}}
    )
    second = train(longer)
    assert second["epochs"][: len(first["epochs"])] == first["epochs"]  # finished epochs are not redone
    assert [e["epoch"] for e in second["epochs"]] == [0, 1, 2, 3, 4]


def test_merge_lora_publishes_one_folder_that_scores_like_the_adapter(
    lora_training: Any, tmp_path: Path, templates: Templates, periods: Periods
) -> None:
    cfg, summary = lora_training
    adapter = load_artifact(Path(summary["artifact"]))
    checkpoints = (cfg.out_dir / "ray" / cfg.name).glob("checkpoint_*/trainable.pt")
    last = max(checkpoints, key=lambda p: p.stat().st_mtime).parent
    merged_cfg = cfg.model_copy(update={"out_dir": tmp_path, "merge_lora": True})
    folder = _publish(
        merged_cfg, adapter.model_dir, ray.train.Checkpoint.from_directory(last),
        load_tokenizer(adapter.model_dir), templates, periods, {},
    )  # fmt: skip
    merged = load_artifact(folder)
    assert merged.adapter_dir is None and merged.lora_rank is None
    assert (merged.model_dir / "config.json").is_file() and not (folder / "adapter").exists()

    tokenizer = load_tokenizer(merged.model_dir)
    texts = ["Member Profile: Data Scientist in Berlin. Question: Will the member apply? Answer:", "Answer:"]
    prompts = [tokenizer(t)["input_ids"] for t in texts]
    config = ScorerConfig(backend="transformers")
    np.testing.assert_allclose(
        TransformersScorer(merged, config).score(prompts),
        TransformersScorer(adapter, config).score(prompts),
        atol=1e-5,
    )


def test_session_pairs_with_a_positive_fraction_is_refused() -> None:
    with pytest.raises(ValueError, match="session_pairs"):
        BrewTrainConfig(session_pairs=True)
    assert BrewTrainConfig(session_pairs=True, positive_fraction=None).session_pairs


def test_merge_lora_without_lora_is_refused() -> None:
    with pytest.raises(ValueError, match="merge_lora"):
        BrewTrainConfig(finetune_mode="full", merge_lora=True)


def test_surfaces_choose_the_trained_tasks_on_them() -> None:
    """What a RankingModel's data.surfaces sets: the templates' trained tasks there, never T2."""
    assert BrewTrainConfig(surfaces=["jobs"]).tasks == ["job_apply", "job_dismiss"]
    assert BrewTrainConfig(surfaces=["feed"]).tasks == ["feed_like", "feed_long_dwell"]
    with pytest.raises(ValueError, match="tasks or surfaces, not both"):
        BrewTrainConfig(surfaces=["feed"], tasks=["feed_like"])
