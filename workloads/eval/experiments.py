"""The LiGR paper's claims, re-run on the synthetic world with the platform's own stages.

``python -m workloads.eval.experiments --which all|baseline|setwise|scaling|hstu|movielens``

Every model is trained by the training stage (Ray Train, ``train_and_publish``) and scored by the
evaluation stage (``evaluate.run``) on the days right after training; worlds, examples and
artifacts are cached under ``--out`` keyed by their configs, so a re-run only does what changed.

1. baseline:  LiGR (6 features), and LiGR + one item counter (7), vs the DCNv2 production baseline
              (ids + content + 11 counters); optionally the 7-feature LiGR with both extensions.
2. setwise:   set-wise in-session attention on vs off, in a world with the set-level effect on and off.
3. scaling:   eval AUC against history length (16, 64, 256) and against model size -> docs/img PNG.
4. hstu:      LiGR vs its HSTU-layer variant at equal compute (equal dense parameters, same history),
              after each epoch and against training seconds -> docs/img PNG.
5. movielens: HR@10 / NDCG@10 leave-one-out of LiGR retrieval vs SASRec on MovieLens-100K.

These are results, not tests: they print a markdown table per experiment and write
``<out>/results.json`` and ``<out>/results.md``; docs/benchmarks.md records the figures and scale.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import ray
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, PositiveInt, field_validator

from workloads.data.movielens import prepare as prepare_movielens
from workloads.data.preprocess import run as preprocess
from workloads.data.schema import TASKS, data_root
from workloads.data.synth import SAME_TOPIC_PENALTY, WorldConfig, generate
from workloads.data.window import PreprocessConfig
from workloads.eval import history_reader
from workloads.eval.evaluate import EvalConfig, Gate, read_examples, score_examples
from workloads.eval.evaluate import run as evaluate
from workloads.eval.history_reader import HistoryReaderConfig
from workloads.eval.metrics import auc, auc_standard_error
from workloads.eval.plots import comparison_plot, epoch_plot, scaling_plot
from workloads.models.config import LiGRConfig
from workloads.models.registry import build_model, dense_params, equal_size_hstu
from workloads.train.artifact import load_artifact
from workloads.train.config import TrainConfig
from workloads.train.trainer import train_and_publish

Which = Literal["all", "baseline", "setwise", "scaling", "hstu", "movielens", "id_init"]
EXPERIMENTS: tuple[str, ...] = ("baseline", "setwise", "scaling", "hstu", "movielens", "id_init")
AUCS = ("long_dwell_auc", "contribution_auc", "click_auc")
# the result lists each experiment may return, printed as tables in this order
TABLES = ("rows", "by_epoch", "probe", "by_history", "plain_by_history", "reader_by_history", "by_size")
HISTORY_LENGTHS = (16, 64, 256)
MODEL_SIZES = ((16, 1), (32, 2), (64, 3), (128, 4))  # (d_model, n_layers)
DEFAULT_SETWISE_EFFECT = WorldConfig().setwise_effect
DEFAULT_BURST_RATE = WorldConfig().burst_rate
# The paper's 7-feature LiGR (5.4): "added the top features from the DLRM model ... we did find that with
# too few features the model can suffer from item cold start". Here: the item-token features without the
# item id (76% of eval posts are new, so their id rows are untrained noise), the actions, and the DLRM's
# item and member x actor counters read as log-odds / log1p.
SEVEN_FEATURES: dict[str, Any] = {
    "use_features": ["actor_id", "post_type", "age_bucket", "content"],
    "candidate_counters": ["item_ctr_7d", "ma_eng_30d"],
    "counter_scale": "log_odds",
}


class ExperimentConfig(BaseModel):
    """Scale of the experiments (the demo world is 5,000 members; 2 shared cores need less)."""

    model_config = ConfigDict(extra="forbid")

    which: Which = "all"
    members: PositiveInt = 1500
    epochs: PositiveInt = 3
    batch_size: PositiveInt = 64
    d_model: PositiveInt = 32
    n_layers: PositiveInt = 2
    max_history: PositiveInt = 64
    num_workers: PositiveInt = 2
    movielens_epochs: PositiveInt = 30
    setwise_effects: tuple[NonNegativeFloat, ...] = Field(
        (DEFAULT_SETWISE_EFFECT, 0.0),
        min_length=1,
        description="the worlds' setwise_effect in the set-wise experiment, comma-separated (e.g. 3,0.8,0)",
    )
    setwise_burst_rate: float = Field(
        DEFAULT_BURST_RATE,
        ge=0,
        le=0.9,
        description="the set-wise worlds' burst_rate: how often a slot shows the previous slot's actor again",
    )
    scaling_features: Literal["all", "seven"] = Field(
        "all", description="the scaling experiment's LiGR inputs: all features, or claim 1's seven"
    )
    scaling_actor_match: bool = Field(
        False,
        description="scaling with actor_match on; the history curve is then also drawn without it",
    )
    setwise_actor_match: bool = Field(
        False, description="the set-wise experiment's arms: setwise_actor_match and its self-only control"
    )
    baseline_extended_history: PositiveInt | None = Field(
        None,
        description="also train claim 1's 7-feature LiGR with both extensions at this history length",
    )
    hstu_features: Literal["all", "seven"] = Field(
        "all", description="the hstu experiment's inputs (LiGR and HSTU alike): all, or claim 1's seven"
    )
    seed: int = 0
    out: Path = Field(default_factory=lambda: data_root() / "experiments")
    img_dir: Path = Path("docs/img")

    @field_validator("setwise_effects", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        return tuple(value.split(",")) if isinstance(value, str) else value


def _key(payload: Any) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:8]


class Lab:
    """Cached building blocks: worlds, examples, trained artifacts, evaluation reports."""

    def __init__(self, cfg: ExperimentConfig) -> None:
        self.cfg = cfg
        self.out = cfg.out.resolve()

    def world(
        self, setwise_effect: float = DEFAULT_SETWISE_EFFECT, burst_rate: float = DEFAULT_BURST_RATE
    ) -> Path:
        world_cfg = WorldConfig(
            members=self.cfg.members, seed=self.cfg.seed, setwise_effect=setwise_effect, burst_rate=burst_rate
        )
        name = f"m{self.cfg.members}-seed{self.cfg.seed}-setwise{setwise_effect}"
        path = (
            self.out / "worlds" / (name if burst_rate == DEFAULT_BURST_RATE else f"{name}-burst{burst_rate}")
        )
        if not (path / "world.json").is_file():
            generate(world_cfg, path)
        return path

    def examples(self, world: Path, max_history: int = max(HISTORY_LENGTHS)) -> Path:
        path = self.out / "examples" / f"{world.name}-h{max_history}"
        if not (path / "manifest.json").is_file():
            preprocess(PreprocessConfig(world_dir=world, out_dir=path, max_history=max_history))
        return path

    def train(
        self, label: str, model: dict[str, Any], examples: Path, world: Path | None, epochs: int
    ) -> Path:
        """Train (or reuse) one artifact; its name carries a hash of everything that shaped it."""
        settings = {
            "model": model,
            "examples_dir": str(examples),
            "world_dir": str(world) if world else None,
            "epochs": epochs,
            "batch_size": self.cfg.batch_size,
            "num_workers": self.cfg.num_workers,
            "seed": self.cfg.seed,
        }
        cfg = TrainConfig.model_validate(
            {
                **settings,
                "name": f"{label}-{_key(settings)}",
                "storage_path": str(self.out / "runs"),
                "artifact_root": str(self.out / "models"),
            }
        )
        if not (cfg.artifact_dir / "MANIFEST.json").is_file():
            began = time.perf_counter()
            train_and_publish(cfg)
            print(f"trained {cfg.name} in {time.perf_counter() - began:.0f}s", flush=True)
        return cfg.artifact_dir

    def evaluate(
        self, label: str, artifacts: list[Path], examples: Path, baseline: Path | None = None
    ) -> Any:
        output = self.out / "eval" / f"{label}.json"
        gate = Gate(metric="long_dwell_auc", min_lift=0.0) if baseline else None
        evaluate(
            EvalConfig(
                artifacts=artifacts, baseline=baseline, gate=gate, examples_dir=examples, output=output
            )
        )
        report: dict[str, Any] = json.loads(output.read_text())
        return report

    def ligr(self, **overrides: Any) -> dict[str, Any]:
        cfg = {
            "kind": "ligr",
            "d_model": self.cfg.d_model,
            "n_layers": self.cfg.n_layers,
            "n_heads": 2,
            "max_history": self.cfg.max_history,
            **overrides,
        }
        return LiGRConfig.model_validate(cfg).model_dump(mode="json")


def _overall(report: dict[str, Any], artifact: Path) -> dict[str, Any]:
    label = f"{artifact.parent.name}/{artifact.name}"  # <name>/v<version>, as evaluate labels them
    result: dict[str, Any] = report["models"][label]
    return result


def _lift(value: float, base: float) -> float:
    return 100.0 * (value - base) / base


# --- The experiments -----------------------------------------------------------------------------------


def baseline(lab: Lab) -> dict[str, Any]:
    """LiGR on its own tokens, and LiGR with 7 features (two of them the DLRM's top counters, the paper's
    route to beating production with few features, 5.4), each against DCNv2 over all 11 counters."""
    world = lab.world()
    examples = lab.examples(world)
    ligr = lab.train("ligr", lab.ligr(), examples, world, lab.cfg.epochs)
    seven = lab.train("ligr7", lab.ligr(**SEVEN_FEATURES), examples, world, lab.cfg.epochs)
    # the baseline reads its counters on the same scale (log-odds rates made DCNv2 better too)
    dcn_model = {"kind": "dcnv2", "max_history": lab.cfg.max_history, "counter_scale": "log_odds"}
    dcn = lab.train("dcnv2", dcn_model, examples, world, lab.cfg.epochs)
    models = [("LiGR", ligr), ("LiGR, 7 features", seven)]
    if (history := lab.cfg.baseline_extended_history) is not None:
        # the two extensions that let this world's LiGR use long histories and the set (claims 2, 3)
        extensions = {"actor_match": True, "setwise_actor_match": True, "max_history": history}
        extended = lab.train(
            "ligr7-extended", lab.ligr(**SEVEN_FEATURES, **extensions), examples, world, lab.cfg.epochs
        )
        models.append((f"LiGR, 7 features, both extensions, history {history}", extended))
    report = lab.evaluate("baseline", [path for _, path in models], examples, baseline=dcn)
    models.append(("DCNv2 (counters)", dcn))
    rows = []
    for name, path in models:
        result = _overall(report, path)
        overall, cold = result["overall"], result["slices"]["0"]
        rows.append(
            {
                "model": name,
                "features": result["n_features"],
                **_pick(overall),
                "cold_start_long_dwell_auc": cold["long_dwell_auc"],
                "candidates": overall["candidates"],
            }
        )
    lifts = {
        row["model"]: {m: _lift(row[m], rows[-1][m]) for m in ("long_dwell_auc", "contribution_auc")}
        for row in rows[:-1]
    }
    # each lift's 95% interval from the paired comparison on the same candidates (sessions resampled)
    intervals = {}
    for name, path in models[:-1]:
        paired = _overall(report, path).get("vs_baseline") or {}
        intervals[name] = {
            f"{task}_auc": [_lift(rows[-1][f"{task}_auc"] + paired[task][bound], rows[-1][f"{task}_auc"])
                            for bound in ("ci95_low", "ci95_high")]
            for task in ("long_dwell", "contribution") if task in paired
        }  # fmt: skip
    plot = comparison_plot(rows, AUCS, lab.cfg.img_dir / "ligr_vs_dcnv2.png", "LiGR vs DCNv2 (eval period)")
    return {
        "rows": rows,
        "lift_percent": lifts,
        "lift_percent_ci95": intervals,
        "gate": report["gate"],
        "plot": str(plot),
    }


def setwise(lab: Lab) -> dict[str, Any]:
    """Set-wise attention on / off in worlds with and without the set-level effect, and two controls
    that keep the set-wise layer: without its slot-distance bias (is the gain the world's position
    bias?), and with each candidate reading only itself (is the gain just the extra depth and loss?).

    With ``setwise_actor_match`` the arms are that extension and its self-only control, evaluated as a
    pair (the same candidates; the interval of their difference)."""
    arms: dict[str, dict[str, Any]]
    if lab.cfg.setwise_actor_match:
        match: dict[str, Any] = {"setwise_actor_match": True}
        arms = {"on, actor match": match, "on, actor match, self only": {**match, "setwise_context": "self"}}
        labels = {"on, actor match": "ligr-setmatch", "on, actor match, self only": "ligr-setmatch-selfonly"}
        control, compared = "on, actor match, self only", ["on, actor match"]
    else:
        arms = {
            "on": {},
            "on, no slot bias": {"setwise_slot_bias": False},
            "on, self only": {"setwise_context": "self"},
            "off": {"setwise": False},
        }
        labels = {
            "on": "ligr",
            "on, no slot bias": "ligr-noslot",
            "on, self only": "ligr-selfonly",
            "off": "ligr-pointwise",
        }
        control, compared = "off", ["on", "on, no slot bias", "on, self only"]
    rows: list[dict[str, Any]] = []
    probe: list[dict[str, Any]] = []
    for effect in lab.cfg.setwise_effects:
        world = lab.world(effect, lab.cfg.setwise_burst_rate)
        examples = lab.examples(world)
        artifacts = {
            arm: lab.train(labels[arm], lab.ligr(**overrides), examples, world, lab.cfg.epochs)
            for arm, overrides in arms.items()
        }
        name = f"setwise-{effect}" + ("-match" if lab.cfg.setwise_actor_match else "")
        report = lab.evaluate(
            name, [artifacts[arm] for arm in compared], examples, baseline=artifacts[control]
        )
        probe += setwise_probe(effect, artifacts, examples)
        metrics = {arm: _overall(report, path) for arm, path in artifacts.items()}
        for arm in arms:
            rows.append(
                {"world_setwise_effect": effect, "setwise_attention": arm, **_pick(metrics[arm]["overall"])}
            )
        for arm in compared:
            paired = metrics[arm].get("vs_baseline") or {}
            rows.append(
                {
                    "world_setwise_effect": effect,
                    "setwise_attention": f"{arm} - {control}",
                    **{m: metrics[arm]["overall"][m] - metrics[control]["overall"][m] for m in AUCS},
                    **{
                        f"{task}_ci95": [paired[task]["ci95_low"], paired[task]["ci95_high"]]
                        for task in ("long_dwell", "contribution")
                        if task in paired
                    },
                }
            )
    return {"rows": rows, "probe": probe}


def previous_slot_repeats(examples: pa.Table, max_candidates: int) -> tuple[np.ndarray, np.ndarray]:
    """Per scored candidate (sessions in order, each one's first ``max_candidates`` slots): does the
    slot right before it show the same actor, the same topic? The world's set-level effect is a penalty
    on exactly these (``workloads.data.synth``), so they say what set-wise attention has to find."""
    same_actor: list[bool] = []
    same_topic: list[bool] = []
    columns = (examples.column(c).to_pylist() for c in ("cand_position", "cand_actor_id", "cand_topic"))
    for positions, actors, topics in zip(*columns, strict=True):
        index_of_slot = {slot: i for i, slot in enumerate(positions)}
        for i, slot in enumerate(positions[:max_candidates]):
            before = index_of_slot.get(slot - 1)
            same_actor.append(before is not None and actors[before] == actors[i])
            same_topic.append(before is not None and topics[before] == topics[i])
    return np.array(same_actor, dtype=bool), np.array(same_topic, dtype=bool)


def setwise_probe(effect: float, artifacts: dict[str, Path], examples: Path) -> list[dict[str, Any]]:
    """What the set-wise AUCs alone cannot say. The ceiling: the self-only control's logits plus the
    world's true set term, i.e. the most a perfect set-wise layer could add in this world. The response:
    each arm's set-wise long-dwell logit on candidates whose previous slot shows the same actor, minus on
    candidates whose previous slot repeats neither actor nor topic (the world's truth: -effect)."""
    table = read_examples(examples, "eval", ["feed"])
    rows = []
    for arm, path in artifacts.items():
        artifact = load_artifact(path)
        scored = score_examples(artifact, table)
        same_actor, same_topic = previous_slot_repeats(table, artifact.feature_spec["max_candidates"])
        if scored.setwise_logits is not None:
            long_dwell = scored.setwise_logits[:, TASKS.index("long_dwell")]
            plain = long_dwell[~same_actor & ~same_topic].mean()
            rows.append(
                {
                    "world_setwise_effect": effect,
                    "setwise_attention": arm,
                    "response_same_actor": float(long_dwell[same_actor].mean() - plain),
                    "response_same_topic": float(long_dwell[same_topic & ~same_actor].mean() - plain),
                }
            )
        if arm.endswith("self only"):
            probs = np.clip(scored.probs.astype(np.float64), 1e-7, 1 - 1e-7)
            truth = -effect * (same_actor + SAME_TOPIC_PENALTY * same_topic)
            logits = np.log(probs / (1 - probs)) + truth[:, None]
            ceiling = {f"{task}_auc": auc(scored.labels[:, t], logits[:, t]) for t, task in enumerate(TASKS)}
            rows.append(
                {"world_setwise_effect": effect, "setwise_attention": "self only + true set term", **ceiling}
            )
    return rows


def scaling(lab: Lab) -> dict[str, Any]:
    """Claim 3: AUC against history length and model size, with DCNv2 and the counting reader as lines."""
    world = lab.world()
    examples = lab.examples(world)
    features = SEVEN_FEATURES if lab.cfg.scaling_features == "seven" else {}
    match = {"actor_match": True} if lab.cfg.scaling_actor_match else {}
    label = "ligr7" if features else "ligr"

    def history_curve(overrides: dict[str, Any], name: str) -> list[dict[str, Any]]:
        points = []
        for history in HISTORY_LENGTHS:
            model = lab.ligr(**features, **overrides, max_history=history)
            artifact = lab.train(label, model, examples, world, lab.cfg.epochs)
            overall = _overall(lab.evaluate(f"{name}-{history}", [artifact], examples), artifact)["overall"]
            points.append({"history": history, **_pick(overall)})
        return points

    by_history = history_curve(match, "history-match" if match else "history")
    # with actor_match, the paper's plain attention on the same examples is the curve to compare with
    plain_by_history = history_curve({}, "history") if match else []
    # what the same examples reward at each length when read by counts instead of learned embeddings
    reader = history_reader.run(HistoryReaderConfig(examples_dir=examples, lengths=list(HISTORY_LENGTHS)))
    reader_by_history = [{k: row[k] for k in ("history", *AUCS)} for row in reader]
    by_size = []
    for d_model, n_layers in MODEL_SIZES:
        model = lab.ligr(**features, **match, d_model=d_model, n_layers=n_layers, id_dim=d_model // 2)
        artifact = lab.train(label, model, examples, world, lab.cfg.epochs)
        name = f"size-{d_model}x{n_layers}" + ("-match" if match else "")
        overall = _overall(lab.evaluate(name, [artifact], examples), artifact)["overall"]
        params = dense_params(build_model(LiGRConfig.model_validate(model)))
        by_size.append({"d_model": d_model, "n_layers": n_layers, "dense_params": params, **_pick(overall)})
    # The production baseline trained for as many epochs, drawn as the line LiGR has to cross (claim 1).
    dcn = lab.train(
        "dcnv2", {"kind": "dcnv2", "max_history": lab.cfg.max_history}, examples, world, lab.cfg.epochs
    )
    reference = _pick(_overall(lab.evaluate("scaling-dcnv2", [dcn], examples), dcn)["overall"])
    epochs = f"{lab.cfg.epochs} epoch" + ("s" if lab.cfg.epochs > 1 else "")
    model_name = "LiGR" + (" (7 features)" if features else "") + (" + actor_match" if match else "")
    title = f"{model_name} on {lab.cfg.members} members, {epochs}, against DCNv2 trained as long"
    suffix = ("_seven" if features else "") + ("_match" if match else "")
    plot = scaling_plot(
        by_history,
        by_size,
        lab.cfg.img_dir / f"ligr_scaling{suffix}.png",
        title=title,
        reference=reference,
        reference_label="DCNv2",
        reader=reader_by_history,
        plain=plain_by_history,
    )
    return {
        "by_history": by_history,
        "plain_by_history": plain_by_history,
        "reader_by_history": reader_by_history,
        "by_size": by_size,
        "dcnv2": reference,
        "plot": str(plot),
    }


def hstu(lab: Lab) -> dict[str, Any]:
    """Claim 4: LiGR vs its HSTU-layer variant at equal dense parameters and history. Besides the final
    models (paired), every epoch's eval AUCs from the training stage, against epochs and against
    training seconds: the paper compares training curves, and HSTU's extra layers cost time."""
    world = lab.world()
    examples = lab.examples(world)
    features = SEVEN_FEATURES if lab.cfg.hstu_features == "seven" else {}
    suffix = "7" if features else ""
    ligr_cfg = LiGRConfig.model_validate(lab.ligr(**features))
    hstu_cfg = equal_size_hstu(ligr_cfg)
    ligr = lab.train(f"ligr{suffix}", ligr_cfg.model_dump(mode="json"), examples, world, lab.cfg.epochs)
    variant = lab.train(f"hstu{suffix}", hstu_cfg.model_dump(mode="json"), examples, world, lab.cfg.epochs)
    report = lab.evaluate(f"hstu{suffix}", [variant], examples, baseline=ligr)
    rows, curves = [], {}
    for name, path, cfg in (("LiGR", ligr, ligr_cfg), ("HSTU layers", variant, hstu_cfg)):
        overall = _overall(report, path)["overall"]
        params = dense_params(build_model(cfg))
        rows.append({"model": name, "n_layers": cfg.n_layers, "dense_params": params, **_pick(overall)})
        curves[name] = epoch_curve(load_artifact(path).metrics)
    paired = _overall(report, variant).get("vs_baseline") or {}
    rows.append(
        {
            "model": "HSTU layers - LiGR",
            **{m: rows[1][m] - rows[0][m] for m in AUCS},
            **{f"{task}_ci95": [paired[task]["ci95_low"], paired[task]["ci95_high"]] for task in paired},
        }
    )
    title = "LiGR vs HSTU layers at equal dense parameters" + (" (7 features)" if features else "")
    plot = comparison_plot(rows[:2], AUCS, lab.cfg.img_dir / f"ligr{suffix}_vs_hstu.png", title)
    curve_plot = epoch_plot(curves, AUCS, lab.cfg.img_dir / f"ligr{suffix}_vs_hstu_epochs.png", title)
    by_epoch = [{"model": name, **point} for name, curve in curves.items() for point in curve]
    return {"rows": rows, "by_epoch": by_epoch, "plot": str(plot), "epoch_plot": str(curve_plot)}


def epoch_curve(metrics: dict[str, Any]) -> list[dict[str, float]]:
    """From an artifact's metrics: the eval AUCs the training stage recorded after each epoch (the same
    eval split as ``evaluate``), with the training seconds spent up to then."""
    spent = 0.0
    curve = []
    for epoch in metrics["epochs"]:
        spent += epoch["train_seconds"]
        aucs = {m: epoch[f"eval_{m}"] for m in AUCS}
        curve.append({"epoch": epoch["epoch"], "train_seconds": spent, **aucs})
    return curve


def movielens(lab: Lab) -> dict[str, Any]:
    folder = lab.out / "movielens"
    if not (folder / "manifest.json").is_file():
        prepare_movielens(folder, data_root() / "cache")
    shared = {"d_model": 64, "n_layers": 2, "max_len": 200, "item_hash_size": 4096}
    models = {
        "LiGR retrieval": {"kind": "ligr_retrieval", "n_heads": 2, **shared},
        "SASRec": {"kind": "sasrec", "n_heads": 1, **shared},
    }
    epochs = lab.cfg.movielens_epochs
    artifacts = {
        name: lab.train(name.split()[0].lower() + "-ml", cfg, folder, None, epochs)
        for name, cfg in models.items()
    }
    report = lab.evaluate("movielens", list(artifacts.values()), folder)
    rows = []
    for name, path in artifacts.items():
        overall = _overall(report, path)["overall"]
        rows.append(
            {"model": name, **{k: overall[k] for k in ("hr@10", "ndcg@10", "hr@1", "hr@20", "users")}}
        )
    return {"rows": rows, "epochs": epochs}


def id_init(lab: Lab) -> dict[str, Any]:
    """LiGR and DCNv2 with unit-norm vs DLRM (near-zero) hashed id rows: most eval posts are new, so
    their item rows are whatever initialization left there (item cold start, 5.4)."""
    world = lab.world()
    examples = lab.examples(world)
    models = {}
    for init in ("unit", "dlrm"):
        ligr = lab.ligr(id_dim=lab.cfg.d_model // 2, hashed_id_init=init)
        dcn = {"kind": "dcnv2", "max_history": lab.cfg.max_history, "hashed_id_init": init}
        models[f"LiGR, {init} ids"] = lab.train(f"ligr-{init}", ligr, examples, world, lab.cfg.epochs)
        models[f"DCNv2, {init} ids"] = lab.train(f"dcnv2-{init}", dcn, examples, world, lab.cfg.epochs)
    report = lab.evaluate("id-init", list(models.values()), examples)
    rows = []
    for name, path in models.items():
        result = _overall(report, path)
        rows.append(
            {
                "model": name,
                **_pick(result["overall"]),
                "cold_start_long_dwell_auc": result["slices"]["0"]["long_dwell_auc"],
            }
        )
    return {"rows": rows}


def _pick(overall: dict[str, Any]) -> dict[str, Any]:
    """The AUCs, long-dwell NE, and the long-dwell AUC's standard error (Hanley-McNeil)."""
    positives = overall["long_dwell_positives"]
    se = auc_standard_error(overall["long_dwell_auc"], positives, overall["candidates"] - positives)
    return {**{m: overall[m] for m in (*AUCS, "long_dwell_ne")}, "long_dwell_auc_se": se}


RUNNERS = {
    "baseline": baseline,
    "setwise": setwise,
    "scaling": scaling,
    "hstu": hstu,
    "movielens": movielens,
    "id_init": id_init,
}


# --- Reporting ------------------------------------------------------------------------------------------


def markdown_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    columns = list(dict.fromkeys(c for row in rows for c in row))

    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:.4f}"
        if isinstance(value, list):  # an interval
            return "[" + ", ".join(cell(v) for v in value) + "]"
        return "" if value is None else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(row.get(c)) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def report_markdown(results: dict[str, Any]) -> str:
    parts = []
    for name, result in results.items():
        if name == "settings":
            continue
        parts.append(f"### {name}\n")
        for key in TABLES:
            if key in result:
                parts.append(markdown_table(result[key]) + "\n")
        for key in ("lift_percent", "plot", "epoch_plot", "epochs"):
            if key in result:
                parts.append(f"{key}: {json.dumps(result[key])}\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    for name, field in ExperimentConfig.model_fields.items():
        parser.add_argument(f"--{name.replace('_', '-')}", dest=name, default=None, help=field.description)
    raw = {k: v for k, v in vars(parser.parse_args(argv)).items() if v is not None}
    cfg = ExperimentConfig.model_validate(raw)
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    lab = Lab(cfg)
    results_path = lab.out / "results.json"
    results: dict[str, Any] = json.loads(results_path.read_text()) if results_path.is_file() else {}
    results["settings"] = cfg.model_dump(mode="json")
    for name in EXPERIMENTS if cfg.which == "all" else (cfg.which,):
        began = time.perf_counter()
        results[name] = {**RUNNERS[name](lab), "seconds": round(time.perf_counter() - began)}
        lab.out.mkdir(parents=True, exist_ok=True)
        results_path.write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(report_markdown({name: results[name]}), flush=True)
    (lab.out / "results.md").write_text(report_markdown(results))
    return results


if __name__ == "__main__":
    main()
