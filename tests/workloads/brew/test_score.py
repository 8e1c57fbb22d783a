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
from workloads.brew.model import answer_token_ids, load_tokenizer
from workloads.brew.prompts import DEFAULT_TEMPLATES, Templates, Verbalizer
from workloads.brew.score import ScorerConfig, TransformersScorer, VLLMScorer, artifact_for_base, make_scorer


@pytest.fixture(scope="module")
def base_artifact(tiny_base: Path, templates: Templates) -> BrewArtifact:
    """The untrained tiny base as an artifact: needs no training run."""
    yes, no = answer_token_ids(load_tokenizer(tiny_base), templates)
    return artifact_for_base(tiny_base, yes, no, DEFAULT_TEMPLATES, 256)


@pytest.fixture(scope="module")
def lora_artifact(lora_training: Any) -> BrewArtifact:
    return load_artifact(Path(lora_training[1]["artifact"]))


@pytest.fixture(scope="module")
def prompts(tiny_base: Path, world: World, templates: Templates, periods: Periods) -> list[list[int]]:
    """Eval-period prompts: a few members with several candidates each (shared prefixes), both tasks.

    Built with the tiny base's tokenizer, which every artifact trained from that base carries.
    """
    text = EntityText(world, templates)
    verbalizer = Verbalizer(templates, load_tokenizer(tiny_base), 256)
    out: list[list[int]] = []
    for task in ("feed_like", "job_apply"):
        examples = impression_examples(
            world, templates, task, periods.eval_start, periods.eval_end, 3, seed=3
        )
        items = [
            e.question_id for e in impression_examples(world, templates, task, 0, periods.eval_end, 6, 4)
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


def _p_yes_one(model_dir: Path, artifact: BrewArtifact, prompt: list[int]) -> float:
    """P(yes) of one prompt computed by hand: softmax over the two answer logits at the last position."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([prompt])).logits[0, -1]
    return float(torch.softmax(logits[[artifact.yes_token_id, artifact.no_token_id]].double(), -1)[0])


def test_transformers_scores_are_the_two_token_softmax_whatever_the_batching(
    base_artifact: BrewArtifact, prompts: list[list[int]], tiny_base: Path
) -> None:
    batched = TransformersScorer(base_artifact, ScorerConfig(backend="transformers", batch_size=16))
    one = TransformersScorer(base_artifact, ScorerConfig(backend="transformers", batch_size=1))
    all_at_once = batched.score(prompts)
    single = one.score(prompts[:4])
    np.testing.assert_allclose(all_at_once[:4], single, atol=1e-5)
    assert single[0] == pytest.approx(_p_yes_one(tiny_base, base_artifact, prompts[0]), abs=1e-6)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
def test_transformers_scorer_refuses_cuda_without_a_gpu(base_artifact: BrewArtifact) -> None:
    with pytest.raises(ValueError, match=r"scorer\.device: 'cuda'"):
        TransformersScorer(base_artifact, ScorerConfig(backend="transformers", device="cuda"))
    assert TransformersScorer(base_artifact, ScorerConfig(backend="transformers")).device.type == "cpu"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_transformers_scorer_runs_on_the_gpu_and_agrees_with_the_cpu(
    base_artifact: BrewArtifact, prompts: list[list[int]]
) -> None:
    gpu = TransformersScorer(base_artifact, ScorerConfig(backend="transformers"))  # auto picks the GPU
    cpu = TransformersScorer(base_artifact, ScorerConfig(backend="transformers", device="cpu"))
    assert gpu.device.type == "cuda" and next(gpu.model.parameters()).is_cuda
    np.testing.assert_allclose(gpu.score(prompts), cpu.score(prompts), atol=1e-4)


@pytest.mark.slow
def test_vllm_and_transformers_agree_on_a_lora_checkpoint(
    vllm_scorer: VLLMScorer, lora_artifact: BrewArtifact, prompts: list[list[int]], tiny_base: Path
) -> None:
    served = vllm_scorer.score(prompts)
    reference = TransformersScorer(lora_artifact, ScorerConfig(backend="transformers")).score(prompts)
    assert np.abs(served - reference).max() < 1e-2, np.abs(served - reference).max()
    # The adapter is really applied: without it the same prompt scores differently.
    assert abs(_p_yes_one(tiny_base, lora_artifact, prompts[0]) - served[0]) > 1e-2


@pytest.mark.slow
def test_vllm_prefix_cache_does_not_change_scores(vllm_scorer: VLLMScorer, prompts: list[list[int]]) -> None:
    vllm_scorer.reset_prefix_cache()
    cold = vllm_scorer.score(prompts)
    warm = vllm_scorer.score(prompts)  # every prefix is cached now
    np.testing.assert_allclose(cold, warm, atol=1e-4)


def test_unknown_backend_is_rejected() -> None:
    with pytest.raises(ValueError, match="backend"):
        ScorerConfig.model_validate({"backend": "onnx"})
