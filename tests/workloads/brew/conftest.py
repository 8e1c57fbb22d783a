"""360Brew fixtures: the tiny world's tables and a tiny random Llama whose tokenizer was trained on them."""

from __future__ import annotations

from pathlib import Path

import pytest

from workloads.brew.data import (
    EntityText,
    Periods,
    TimeSplit,
    World,
    entity_corpus,
    load_world,
    resolve_periods,
)
from workloads.brew.model import TinyLlama, build_tiny_llama
from workloads.brew.prompts import UNACTED_TEMPLATES, Templates, load_templates


@pytest.fixture(scope="session")
def templates() -> Templates:
    return load_templates()


@pytest.fixture(scope="session")
def unacted_templates() -> Templates:
    """The shipped variant whose feed history also lists clicks, shares and posts shown, not acted on."""
    return load_templates(UNACTED_TEMPLATES)


@pytest.fixture(scope="session")
def world(tiny_world: Path) -> World:
    return load_world(tiny_world)


@pytest.fixture(scope="session")
def periods(tiny_world: Path) -> Periods:
    return resolve_periods(tiny_world, TimeSplit())


@pytest.fixture(scope="session")
def tiny_base(
    tmp_path_factory: pytest.TempPathFactory, world: World, templates: Templates, periods: Periods
) -> Path:
    """A random two-layer Llama (head dim 64) with a byte-level BPE tokenizer trained on the world's text."""
    corpus = list(entity_corpus(world, EntityText(world, templates), periods.eval_start))
    return build_tiny_llama(tmp_path_factory.mktemp("brew") / "tiny-base", corpus, templates, TinyLlama())


@pytest.fixture(scope="session")
def lora_training(
    ray_session: None, tmp_path_factory: pytest.TempPathFactory, tiny_world: Path, tiny_base: Path
):
    """One real two-worker Ray Train run (LoRA on the tiny base): its config and summary."""
    from workloads.brew.train import BrewTrainConfig, StageConfig, train

    cfg = BrewTrainConfig(
        world_dir=tiny_world,
        out_dir=tmp_path_factory.mktemp("brew-train"),
        name="test-lora",
        base={"kind": "path", "path": tiny_base},
        tasks=["job_apply", "feed_like"],
        max_context_tokens=256,
        examples_per_task=16,
        pretrain_blocks=8,
        pretrain_block_tokens=64,
        pretrain=StageConfig(epochs=1, lr=1e-2, batch_size=4),
        finetune=StageConfig(epochs=3, lr=1e-2, batch_size=4),
        finetune_mode="lora",
        lora={"r": 8, "alpha": 16},
        num_workers=2,
        max_failures=0,
    )
    return cfg, train(cfg)
