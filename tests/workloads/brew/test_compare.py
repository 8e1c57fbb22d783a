"""360Brew vs the ranking models on the same pairs: the matched candidate, unscored pairs, refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch

from workloads.brew.compare import NO_ITEM, NO_SESSION, PAST_CAP, CompareConfig, compare
from workloads.brew.data import BrewExample, Periods, World, impression_examples, popularity_scores
from workloads.brew.evaluate import scores_frame
from workloads.brew.prompts import Templates
from workloads.data.schema import TASKS
from workloads.eval.evaluate import score_examples
from workloads.eval.metrics import auc
from workloads.models.config import DCNv2Config, LiGRConfig
from workloads.models.registry import build_model
from workloads.train.artifact import feature_spec, load_artifact, save_artifact
from workloads.train.trainer import data_window

TASK_NAMES = ["feed_like", "feed_long_dwell", "job_apply"]
TINY_LIGR = LiGRConfig(d_model=16, n_heads=2, n_layers=1, id_dim=8)
CAPPED_DCNV2 = DCNv2Config(id_dim=8, mlp_dims=(16,), max_candidates=3)  # slots 3+ are never scored


def brew_examples(world: World, templates: Templates, periods: Periods) -> list[BrewExample]:
    """24 pairs per task, plus two feed_like pairs no examples row holds: an unknown session and item."""
    out = []
    for k, task in enumerate(TASK_NAMES):
        out += impression_examples(world, templates, task, periods.eval_start, periods.eval_end, 24, k, 0.5)
    first, imp = out[0], world.impressions
    shown = imp.loc[(imp["member_id"] == first.member_id) & (imp["session_start"] == first.at), "item_id"]
    elsewhere = int(imp.loc[(imp["surface"] == "feed") & ~imp["item_id"].isin(shown), "item_id"].iloc[0])
    return [
        *out,
        dataclasses.replace(first, at=first.at + 1),
        dataclasses.replace(first, question_id=elsewhere, label=0),
    ]


def fake_brew_eval(
    folder: Path, world_dir: Path, world: World, templates: Templates, periods: Periods,
    examples: list[BrewExample], seed: int = 0, eval_period: dict[str, str] | None = None,
) -> Path:  # fmt: skip
    """What `workloads.brew.evaluate` writes, with random P(yes) instead of an LLM's."""
    brew = np.random.default_rng(seed).random(len(examples))
    pop = popularity_scores(world, templates, examples, periods.eval_start)
    folder.mkdir(parents=True)
    unused = np.zeros(len(examples))  # history_in_prompt, author_in_prompt: compare reads neither
    scores_frame(examples, brew, pop, unused, unused).to_parquet(folder / "scores.parquet")
    metrics = {
        "world_dir": str(world_dir),
        "eval_period": eval_period or periods.iso(),
        "tasks": {t: {"label_action": templates.task(t).label_action} for t in TASK_NAMES},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder


def publish(folder: Path, cfg: Any, world_dir: Path, window: dict[str, Any]) -> Path:
    torch.manual_seed(0)
    spec = {**feature_spec(cfg, str(world_dir / "items.parquet"), None), "surfaces": ["feed"]}
    state = build_model(cfg).state_dict()
    return save_artifact(
        folder, state, cfg, name=folder.name, version=1, feature_spec=spec, data_window=window
    )


@pytest.fixture(scope="module")
def setup(
    tmp_path_factory: pytest.TempPathFactory, tiny_world: Path, tiny_examples: Path, world: World,
    templates: Templates, periods: Periods,
) -> dict[str, Any]:  # fmt: skip
    root = tmp_path_factory.mktemp("compare")
    examples = brew_examples(world, templates, periods)
    window = data_window(tiny_examples)
    cfg = CompareConfig(
        brew_evals={
            "zero-shot": fake_brew_eval(root / "zs", tiny_world, world, templates, periods, examples, seed=1),
            "tuned": fake_brew_eval(root / "ft", tiny_world, world, templates, periods, examples, seed=2),
        },
        ranking_artifacts={
            "ligr": publish(root / "ligr", TINY_LIGR, tiny_world, window),
            "dcn": publish(root / "dcn", CAPPED_DCNV2, tiny_world, window),
        },
        ranking_examples=tiny_examples,
        out_dir=root / "out",
    )  # fmt: skip
    return {"cfg": cfg, "root": root, "examples": examples, "window": window, "summary": compare(cfg)}


def test_each_pair_gets_its_own_candidates_head_probability(
    setup: dict[str, Any], tiny_examples: Path, world: World
) -> None:
    cfg: CompareConfig = setup["cfg"]
    pairs = pd.read_parquet(cfg.out_dir / "pairs.parquet")
    examples = pq.read_table(tiny_examples / "eval")
    ligr = load_artifact(cfg.ranking_artifacts["ligr"])
    imp = world.impressions
    checked = 0
    for task, head in [("feed_like", "contribution"), ("feed_long_dwell", "long_dwell")]:
        for pair in pairs[(pairs["task"] == task) & pairs["ligr"].notna()].head(3).itertuples():
            shown = imp[(imp["member_id"] == pair.member_id) & (imp["session_start"] == pair.at)]
            slot = int(shown.loc[shown["item_id"] == pair.question_id, "position"].iloc[0])
            session = examples.filter(
                (pc.field("member_id") == pair.member_id) & (pc.field("session_start") == pair.at)
            )
            probs = score_examples(ligr, session).probs[:, TASKS.index(head)]
            assert pair.ligr == pytest.approx(probs[slot], rel=1e-5)
            assert len(probs) > 1 and np.ptp(probs) > 1e-4  # another slot would have given another score
            checked += 1
    assert checked == 6


def test_unfound_pairs_are_counted_and_every_column_is_compared_on_the_same_pairs(
    setup: dict[str, Any], world: World
) -> None:
    cfg: CompareConfig = setup["cfg"]
    report = json.loads((cfg.out_dir / "comparison.json").read_text())
    pairs = pd.read_parquet(cfg.out_dir / "pairs.parquet")
    imp = world.impressions.set_index(["member_id", "session_start", "item_id"])["position"]
    for task in ("feed_like", "feed_long_dwell"):
        group = pairs[pairs["task"] == task]
        positions = [imp.get((p.member_id, p.at, p.question_id)) for p in group.itertuples()]
        past_cap = sum(p is not None and p >= 3 for p in positions)
        injected = {NO_SESSION: 1, NO_ITEM: 1} if task == "feed_like" else {}
        r = report["tasks"][task]
        assert r["unscored"]["ligr"] == injected
        assert r["unscored"]["dcn"] == {**injected, **({PAST_CAP: past_cap} if past_cap else {})}
        assert 0 < r["compared"] == len(group) - sum(injected.values()) - past_cap
        both = group.dropna(subset=["ligr", "dcn"])
        for column in ("zero-shot", "tuned", "ligr", "dcn", "popularity"):
            assert r["models"][column]["n"] == r["compared"]
            assert r["models"][column]["auc"] == pytest.approx(auc(both["label"], both[column]), abs=1e-4)
    job = report["tasks"]["job_apply"]
    assert job["head"] is None and job["models"]["ligr"] is None and job["models"]["dcn"] is None
    assert job["compared"] == job["pairs"] == 24 and job["models"]["tuned"]["auc"] is not None
    table = (cfg.out_dir / "comparison.md").read_text()
    assert f"| job_apply | n/a | 24 ({job['positives']}) | 24 | " in table
    assert f"- feed_like, ligr: 1 pairs not scored ({NO_SESSION})" in table


def test_another_world_the_eval_period_in_training_or_other_pairs_are_refused(
    setup: dict[str, Any], tiny_world: Path, world: World, templates: Templates, periods: Periods
) -> None:
    cfg: CompareConfig = setup["cfg"]
    root, window = setup["root"], setup["window"]
    other_world = root / "other-world"
    shutil.copytree(tiny_world, other_world)
    meta = json.loads((other_world / "world.json").read_text())
    (other_world / "world.json").write_text(json.dumps({**meta, "seed": meta["seed"] + 1}))
    cases = {
        r"ranking_artifacts\.elsewhere: trained on .*another world": {
            "elsewhere": publish(
                root / "elsewhere", TINY_LIGR, tiny_world,
                {**window, "preprocess": {**window["preprocess"], "world_dir": str(other_world)}},
            )
        },
        r"ranking_artifacts\.peeked: trained on sessions up to .* after the 360Brew evaluation period": {
            "peeked": publish(
                root / "peeked", TINY_LIGR, tiny_world,
                {**window, "window": {**window["window"], "train_end": window["window"]["eval_end"]}},
            )
        },
    }  # fmt: skip
    for match, artifacts in cases.items():
        with pytest.raises(ValueError, match=match):
            compare(cfg.model_copy(update={"ranking_artifacts": artifacts, "out_dir": root / "refused"}))

    examples = setup["examples"]
    shifted = {**periods.iso(), "eval_start": periods.iso()["train_start"]}
    flipped = [dataclasses.replace(examples[0], label=1 - examples[0].label), *examples[1:]]
    brew = {
        r"brew_evals\.b: other \(task, member, item, time, label\) pairs": fake_brew_eval(
            root / "reseeded", tiny_world, world, templates, periods, examples[1:]
        ),
        r"brew_evals\.b: another world or evaluation period": fake_brew_eval(
            root / "shifted", tiny_world, world, templates, periods, examples, eval_period=shifted
        ),
    }
    for match, folder in brew.items():
        with pytest.raises(ValueError, match=match):
            compare(cfg.model_copy(update={"brew_evals": {"a": cfg.brew_evals["zero-shot"], "b": folder}}))
    alone = {
        "ranking_examples: the eval split covers": fake_brew_eval(
            root / "shifted-alone", tiny_world, world, templates, periods, examples, eval_period=shifted
        ),
        "not the same impressions": fake_brew_eval(
            root / "flipped", tiny_world, world, templates, periods, flipped
        ),
    }
    for match, folder in alone.items():
        with pytest.raises(ValueError, match=match):
            compare(cfg.model_copy(update={"brew_evals": {"a": folder}, "out_dir": root / "refused"}))
    assert not (root / "refused").exists()
