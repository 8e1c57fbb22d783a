"""The pipeline's contract with the workloads: every stage config the operator emits is accepted by the
stage's own pydantic config (they forbid unknown fields), and the artifact layout is where training writes."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from operators.api.v1alpha1 import Counter, ModelSize, ModelSpec, RankingModel, TokenFeature
from operators.backends.kuberay import resolve_storage
from operators.pipeline import (
    LLM_DEPLOYMENT,
    SCORER_DEPLOYMENT,
    Stage,
    last_json_line,
    ligr_model_config,
    new_version,
    serve_config,
    stage_config,
    stages,
)
from tests.operators.conftest import as_model
from workloads.brew.score import ScorerConfig
from workloads.brew.train import BrewTrainConfig
from workloads.data.schema import COUNTER_FEATURES
from workloads.data.window import PreprocessConfig
from workloads.eval.gate import GateStageConfig
from workloads.models.config import ALL_FEATURES, LiGRConfig
from workloads.serve.config import validate_config
from workloads.serve.graph import GraphArgs, deployment_names
from workloads.train.config import TrainConfig

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def _example(name: str, **window: str) -> RankingModel:
    manifest = yaml.safe_load((EXAMPLES / name).read_text())
    if window:
        manifest["spec"]["data"]["window"] = window
    return as_model(manifest, generation=4)


WINDOW = {
    "start": "2026-01-01T00:00:00Z",
    "trainEnd": "2026-03-01T00:00:00Z",
    "evalEnd": "2026-03-08T00:00:00Z",
}


@pytest.mark.parametrize("window", [{}, WINDOW], ids=["default-split", "explicit-window"])
def test_ligr_stage_configs_are_accepted_by_the_workloads(window: dict[str, str]) -> None:
    model = _example("feed-ligr.yaml", **window)
    version = new_version(model.spec, "feed-ligr", 4)
    assert stages(model.spec.model.kind) == (Stage.PREPROCESS, Stage.TRAIN, Stage.EVALUATE)
    preprocess = PreprocessConfig.model_validate(
        stage_config(model.spec, "feed-ligr", Stage.PREPROCESS, version, None, resolve_storage)
    )
    train = TrainConfig.model_validate(
        stage_config(model.spec, "feed-ligr", Stage.TRAIN, version, None, resolve_storage)
    )
    assert preprocess.world_dir == train.world_dir == Path("/mnt/pvc/rankray-data/world")
    assert (
        preprocess.out_dir
        == train.examples_dir
        == Path("/mnt/pvc/rankray-artifacts/models/feed-ligr/work/v4/examples")
    )
    assert isinstance(train.model, LiGRConfig)
    assert preprocess.max_history == train.model.max_history == model.spec.model.history_length == 64
    assert str(train.artifact_dir) == resolve_storage(version.artifact_uri), (
        "serving loads what training publishes"
    )
    assert train.model.kind == "ligr" and train.model.setwise is True
    assert train.model.use_features == {"actor_id", "post_type", "age_bucket", "content"}
    assert (train.model.candidate_counters, train.model.counter_scale) == (
        ("ma_eng_30d", "item_ctr_7d"),
        "log_odds",
    )
    evaluate = GateStageConfig.model_validate(
        stage_config(model.spec, "feed-ligr", Stage.EVALUATE, version, version, resolve_storage)
    )
    assert evaluate.examples_dir == train.examples_dir and evaluate.artifact_dir == train.artifact_dir
    assert evaluate.gate.task == "long_dwell" and evaluate.gate.reference_artifact_dir == train.artifact_dir
    assert (train.num_workers, train.use_gpu, train.strategy, train.max_failures) == (2, False, "ddp", 3)
    if window:
        assert str(preprocess.train_end).startswith("2026-03-01")


def test_brew_trains_straight_from_the_log_and_publishes_where_serving_looks() -> None:
    model = _example("jobs-brew.yaml", **WINDOW)
    version = new_version(model.spec, "jobs-brew", 4)
    assert stages(model.spec.model.kind) == (Stage.TRAIN, Stage.EVALUATE)
    train = BrewTrainConfig.model_validate(
        stage_config(model.spec, "jobs-brew", Stage.TRAIN, version, None, resolve_storage)
    )
    assert train.out_dir / "artifact" == Path(resolve_storage(version.artifact_uri))
    assert train.base.kind == "path" and train.base.path == Path(
        "/mnt/pvc/rankray-models/smollm2-135m-instruct"
    )
    assert (train.num_workers, train.use_gpu, train.strategy) == (4, True, "fsdp2")
    assert str(train.split.train_end).startswith("2026-03-01")
    # data.surfaces [jobs] picks the job tasks; model.contextTokens is the prompt budget
    assert (train.tasks, train.max_context_tokens) == (["job_apply", "job_dismiss"], 1024)
    evaluate = GateStageConfig.model_validate(
        stage_config(model.spec, "jobs-brew", Stage.EVALUATE, version, None, resolve_storage)
    )
    assert evaluate.kind == "brew" and evaluate.artifact_dir == train.out_dir / "artifact"
    assert evaluate.train_end is not None and evaluate.train_end.startswith("2026-03-01")


@pytest.mark.parametrize("size", list(ModelSize))
@pytest.mark.parametrize("history", [1, 256, 4096])
def test_every_size_and_history_length_is_a_valid_ligr_model(size: ModelSize, history: int) -> None:
    config = LiGRConfig.model_validate(
        ligr_model_config(ModelSpec(kind="ligr", size=size, history_length=history))
    )
    assert config.max_history == history


def test_without_features_and_counters_a_ligr_model_reads_all_five_and_no_counter() -> None:
    config = LiGRConfig.model_validate(ligr_model_config(ModelSpec(kind="ligr")))
    default = LiGRConfig()
    assert (config.use_features, config.candidate_counters, config.counter_scale) == (
        default.use_features,
        (),
        default.counter_scale,
    )


@pytest.mark.parametrize("switch", ["actor_match", "setwise_actor_match"])
@pytest.mark.parametrize("value", [None, False, True])
def test_actor_match_reaches_the_model_only_when_asked_for(switch: str, value: bool | None) -> None:
    spec = ModelSpec.model_validate({"kind": "ligr", "features": ["actor_id", "content"], switch: value})
    config = LiGRConfig.model_validate(ligr_model_config(spec))
    assert getattr(config, switch) is bool(value)


def test_the_apis_features_and_counters_are_the_models() -> None:
    """The API spells them itself (operators does not import the models); they must not drift apart."""
    assert {f.value for f in TokenFeature} == set(ALL_FEATURES)
    assert [c.value for c in Counter] == COUNTER_FEATURES


def test_the_evaluate_config_names_the_gate_and_its_reference(manifest: dict[str, Any]) -> None:
    model = as_model(manifest, generation=2)
    candidate, served = new_version(model.spec, "feed-ligr", 2), new_version(model.spec, "feed-ligr", 1)
    config = stage_config(model.spec, "feed-ligr", Stage.EVALUATE, candidate, served, resolve_storage)
    assert config["artifact_dir"] == "/mnt/pvc/rankray-artifacts/models/feed-ligr/v2"
    assert config["gate"] == {
        "metric": "auc",
        "task": None,
        "min_lift": 0.005,
        "reference_artifact_dir": "/mnt/pvc/rankray-artifacts/models/feed-ligr/v1",
        "reference_name": "v1",
    }
    baseline = copy.deepcopy(manifest)
    baseline["spec"]["evaluation"]["against"] = "baseline"
    model = as_model(baseline, generation=2)
    config = stage_config(model.spec, "feed-ligr", Stage.EVALUATE, candidate, served, resolve_storage)
    assert config["gate"]["reference_artifact_dir"] is None and config["gate"]["reference_name"] == "baseline"


@pytest.mark.parametrize("example", ["feed-ligr.yaml", "jobs-brew.yaml"])
def test_the_serve_config_is_one_the_serving_graph_accepts(example: str, tmp_path: Path) -> None:
    """Ray's ServeDeploySchema, the graph's GraphArgs (extra fields forbidden), and options only for
    deployments the graph has (Ray rejects others)."""
    model = _example(example)
    name = model.metadata.name
    version = new_version(model.spec, name, 4)

    def resolve(uri: str) -> str:
        return str(tmp_path / uri.replace("://", "/"))

    if version.kind == "ligr":  # the graph reads the artifact's model config to know its deployments
        artifact = Path(resolve(version.artifact_uri))
        artifact.mkdir(parents=True)
        (artifact / "config.json").write_text(json.dumps({"model": ligr_model_config(model.spec.model)}))
    config = serve_config(name, version, model.spec.serving, resolve)
    validate_config(config)
    (application,) = config["applications"]
    args = GraphArgs.model_validate(application["args"])
    assert {d["name"] for d in application["deployments"]} <= set(deployment_names(args))
    scorer = SCORER_DEPLOYMENT if version.kind == "ligr" else LLM_DEPLOYMENT
    assert [d["name"] for d in application["deployments"]] == [scorer]
    assert args.model_version == "v4" and args.artifact_uri == resolve(version.artifact_uri)


def test_serving_llm_settings_reach_the_llm_deployments_scorer() -> None:
    """serving.llm's backend, dtype, context and prefix caching become the BrewScorer's ScorerConfig;
    a GPU replica scores on the GPU, a CPU one never picks up a GPU by accident."""
    manifest = yaml.safe_load((EXAMPLES / "jobs-brew.yaml").read_text())
    manifest["spec"]["serving"]["llm"].update(
        {"backend": "transformers", "dtype": "bfloat16", "maxModelLen": 4096, "prefixCaching": False}
    )
    model = as_model(manifest, generation=4)
    version = new_version(model.spec, "jobs-brew", 4)
    (application,) = serve_config("jobs-brew", version, model.spec.serving, resolve_storage)["applications"]
    scorer = ScorerConfig.model_validate(GraphArgs.model_validate(application["args"]).llm_scorer)
    assert (scorer.backend, scorer.dtype, scorer.device) == ("transformers", "bfloat16", "cuda")
    assert (scorer.max_model_len, scorer.enable_prefix_caching) == (4096, False)

    manifest["spec"]["serving"]["llm"] = {"enabled": True}  # the defaults: vLLM's CPU build in float32
    model = as_model(manifest, generation=4)
    (application,) = serve_config("jobs-brew", version, model.spec.serving, resolve_storage)["applications"]
    scorer = ScorerConfig.model_validate(GraphArgs.model_validate(application["args"]).llm_scorer)
    assert (scorer.backend, scorer.dtype, scorer.device) == ("vllm", "float32", "cpu")
    assert (scorer.max_model_len, scorer.enable_prefix_caching) == (2048, True)


def test_a_stage_summary_is_the_last_json_object_line() -> None:
    assert last_json_line('{"a": 1}\nnoise\n{"b": 2}\n[1, 2]\n{broken\n') == {"b": 2}
    assert last_json_line("no json here\n") is None
