"""Scoring: P(yes) from the two answer logits, identical across backends for the same checkpoint."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from workloads.brew.artifact import BrewArtifact, load_artifact
from workloads.brew.data import EntityText, Periods, World, history_events, impression_examples
from workloads.brew.model import load_tokenizer
from workloads.brew.prompts import Templates, Verbalizer
from workloads.brew.score import ScorerConfig, TransformersScorer, VLLMScorer, make_scorer


@pytest.fixture(scope="module")
def lora_artifact(lora_training: Any) -> BrewArtifact:
    return load_artifact(Path(lora_training[1]["artifact"]))


@pytest.fixture(scope="module")
def prompts(
    lora_artifact: BrewArtifact, world: World, templates: Templates, periods: Periods
) -> list[list[int]]:
    """Eval-period prompts: a few members with several candidates each (shared prefixes), both tasks."""
    text = EntityText(world, templates)
    verbalizer = Verbalizer(
        templates,
        load_tokenizer(lora_artifact.adapter_dir or lora_artifact.model_dir),
        lora_artifact.max_context_tokens,
    )
    out: list[list[int]] = []
    for task in ("feed_like", "job_apply"):
        examples = impression_examples(
            world, templates, task, periods.eval_start, periods.eval_end, 3, seed=3
        )
        items = [
            e.question_id for e in impression_examples(world, templates, task, 0, periods.eval_end, 6, seed=4)
        ]
        for ex in examples:
            profile, history = text.member(ex.member_id), history_events(text, ex)
            out += verbalizer.verbalize(task, profile, history, [text.item(i) for i in items]).token_ids
    return out


@pytest.fixture(scope="module")
def vllm_scorer(lora_artifact: BrewArtifact) -> Iterator[VLLMScorer]:
    """One vLLM engine (about 20 s to start on CPU) shared by this module's tests."""
    scorer = make_scorer(lora_artifact, ScorerConfig(backend="vllm"))
    assert isinstance(scorer, VLLMScorer)
    yield scorer
    scorer.close()


def test_transformers_scores_are_the_two_token_softmax_whatever_the_batching(
    lora_artifact: BrewArtifact, prompts: list[list[int]]
) -> None:
    batched = TransformersScorer(lora_artifact, ScorerConfig(backend="transformers", batch_size=16)).score(
        prompts
    )
    one = TransformersScorer(lora_artifact, ScorerConfig(backend="transformers", batch_size=1))
    single = one.score(prompts[:4])
    np.testing.assert_allclose(batched[:4], single, atol=1e-5)
    with torch.no_grad():
        logits = one.model(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    pair = torch.softmax(logits[[lora_artifact.yes_token_id, lora_artifact.no_token_id]].double(), -1)
    assert single[0] == pytest.approx(float(pair[0]), abs=1e-6)


@pytest.mark.slow
def test_vllm_and_transformers_agree_on_a_lora_checkpoint(
    vllm_scorer: VLLMScorer, lora_artifact: BrewArtifact, prompts: list[list[int]], tiny_base: Path
) -> None:
    served = vllm_scorer.score(prompts)
    reference = TransformersScorer(lora_artifact, ScorerConfig(backend="transformers")).score(prompts)
    assert np.abs(served - reference).max() < 1e-2, np.abs(served - reference).max()
    # The adapter is really applied: without it the same prompts score differently.
    base = AutoModelForCausalLM.from_pretrained(tiny_base).eval()
    with torch.no_grad():
        logits = base(input_ids=torch.tensor([prompts[0]])).logits[0, -1]
    base_p = float(torch.softmax(logits[[lora_artifact.yes_token_id, lora_artifact.no_token_id]], -1)[0])
    assert abs(base_p - served[0]) > 1e-2


@pytest.mark.slow
def test_vllm_prefix_cache_does_not_change_scores(vllm_scorer: VLLMScorer, prompts: list[list[int]]) -> None:
    vllm_scorer.reset_prefix_cache()
    cold = vllm_scorer.score(prompts)
    warm = vllm_scorer.score(prompts)  # every prefix is cached now
    np.testing.assert_allclose(cold, warm, atol=1e-4)


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="backend"):
        ScorerConfig.model_validate({"backend": "onnx"})
