"""The serve config: GraphArgs validation, rendering the serveConfigV2 shape, and the CLI that renders it."""

from __future__ import annotations

import io
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError
from ray.serve.schema import ServeDeploySchema

from tests.workloads.serve.conftest import tiny_ligr_artifact
from workloads.serve.__main__ import main as serve_main
from workloads.serve.config import IMPORT_PATH, load_config, serve_config, to_yaml, validate_config
from workloads.serve.graph import DEFAULT_TASK_WEIGHTS, GraphArgs, deployment_names


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("config")
    return tiny_ligr_artifact(root / "ligr" / "v1", root, version=1, seed=0)


def args(artifact: Path, **overrides: object) -> GraphArgs:
    return GraphArgs.model_validate({"artifact_uri": str(artifact), "feature_repo": "/repo", **overrides})


def test_defaults_are_the_documented_ones(artifact: Path) -> None:
    graph = args(artifact)
    assert graph.candidates_limit == 1000 and graph.setwise_top_k == 10 and graph.model_kind == "ligr"
    assert graph.task_weights == DEFAULT_TASK_WEIGHTS and not graph.llm_enabled


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"task_weights": {"click": 1.0, "share": 1.0}}, "unknown task(s) ['share']"),
        ({"task_weights": {"click": 0.0}}, "at least one task weight must be positive"),
        ({"task_weights": {"click": -1.0}}, "greater than or equal to 0"),
        ({"model_kind": "brew"}, "model_kind brew needs llm_enabled"),
        ({"llm_enabled": True}, "llm_enabled needs world_dir"),
        ({"llm_enabled": True, "world_dir": "/w"}, "needs llm_artifact_uri"),
        (
            {"llm_enabled": True, "world_dir": "/w", "llm_artifact_uri": "/b", "llm_scorer": {"dtype": "x"}},
            "llm_scorer: 1 validation error for ScorerConfig\ndtype",
        ),
        ({"setwise_top_k": 20, "candidates_limit": 10}, "exceeds candidates_limit"),
        ({"candidates_limit": 0}, "greater than or equal to 1"),
        ({"artifact_path": "/x"}, "Extra inputs are not permitted"),
    ],
)
def test_bad_args_fail_naming_the_field(artifact: Path, overrides: dict, message: str) -> None:
    with pytest.raises(ValidationError, match=re.escape(message)):
        args(artifact, **overrides)


def test_the_config_has_the_serve_config_v2_shape_and_lists_the_graphs_deployments(artifact: Path) -> None:
    graph = args(artifact, model_version="v1", setwise_top_k=5)
    config = serve_config(graph, http_host="127.0.0.1", http_port=8765)
    ServeDeploySchema.model_validate(config)
    (app,) = config["applications"]
    assert app["import_path"] == IMPORT_PATH == "workloads.serve.graph:build_app"
    assert GraphArgs.model_validate(app["args"]) == graph  # args round-trip exactly
    names = [d["name"] for d in app["deployments"]]
    assert names == ["RankIngress", "FeatureFetcher", "PointwiseScorer", "SetwiseReranker"]
    scorer = next(d for d in app["deployments"] if d["name"] == "PointwiseScorer")
    assert scorer == {
        "name": "PointwiseScorer",
        "num_replicas": 1,
        "max_ongoing_requests": 64,
        "ray_actor_options": {"num_cpus": 1},
    }
    assert config["http_options"]["port"] == 8765
    assert yaml.safe_load(to_yaml(config)) == config


def test_the_setwise_reranker_is_deployed_only_when_it_has_work(artifact: Path, tmp_path: Path) -> None:
    assert "SetwiseReranker" not in deployment_names(args(artifact, setwise_top_k=0))
    from workloads.models.config import LiGRConfig
    from workloads.models.registry import build_model
    from workloads.train.artifact import save_artifact

    cfg = LiGRConfig(d_model=16, n_layers=1, n_heads=2, max_history=8, max_candidates=8, setwise=False)
    pointwise_only = save_artifact(tmp_path / "v1", build_model(cfg).state_dict(), cfg, name="p", version=1)
    assert "SetwiseReranker" not in deployment_names(args(pointwise_only))


def test_deployment_overrides_replace_the_defaults_and_must_name_real_deployments(artifact: Path) -> None:
    autoscaled = {"autoscaling_config": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}}
    config = serve_config(args(artifact), deployments={"PointwiseScorer": autoscaled})
    scorer = next(d for d in config["applications"][0]["deployments"] if d["name"] == "PointwiseScorer")
    assert "num_replicas" not in scorer and scorer["autoscaling_config"]["max_replicas"] == 4
    with pytest.raises(ValueError, match=r"\['BrewScorer'\] are not in this graph"):
        serve_config(args(artifact), deployments={"BrewScorer": {}})


def test_a_missing_artifact_fails_before_anything_is_deployed(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="is not a model artifact"):
        deployment_names(args(tmp_path / "nowhere"))


def test_configs_are_checked_on_load_including_the_graph_args(artifact: Path, tmp_path: Path) -> None:
    config = serve_config(args(artifact))
    path = tmp_path / "serve.yaml"
    path.write_text(to_yaml(config))
    assert load_config(path) == config
    config["applications"][0]["args"]["setwise_top_k"] = -1
    with pytest.raises(ValidationError, match="setwise_top_k"):
        validate_config(config)


def test_the_cli_renders_a_deployable_config_with_absolute_paths(artifact: Path, tmp_path: Path) -> None:
    args_file = tmp_path / "args.yaml"
    args_file.write_text(yaml.safe_dump({"artifact_uri": str(artifact), "feature_repo": "feature_repo"}))
    out = io.StringIO()
    with redirect_stdout(out):
        serve_main(["--render", str(args_file), "--set", "task_weights.click=3", "--port", "8999"])
    config = validate_config(yaml.safe_load(out.getvalue()))
    rendered = config["applications"][0]["args"]
    assert rendered["feature_repo"] == str(Path("feature_repo").resolve())
    assert rendered["task_weights"]["click"] == 3 and config["http_options"]["port"] == 8999


def test_the_operators_serve_config_is_valid_graph_args(artifact: Path) -> None:
    """The operator renders the RayService's serveConfigV2 itself; its args must be GraphArgs."""
    from operators.api.v1alpha1 import ModelKind, ModelVersion, ServingSpec
    from operators.pipeline import serve_config as operator_serve_config

    version = ModelVersion.model_validate(
        {
            "name": "v1",
            "generation": 1,
            "specHash": "abc",
            "kind": ModelKind.LIGR,
            "artifactUri": str(artifact),
            "featureRepo": "/repo",
            "dataSource": "/world",
        }
    )
    config = operator_serve_config("feed", version, ServingSpec(), lambda uri: uri)
    validate_config(config)
    graph = GraphArgs.model_validate(config["applications"][0]["args"])
    listed = {d["name"] for d in config["applications"][0]["deployments"]}
    assert listed <= set(deployment_names(graph))


def test_the_cli_refuses_bad_input_naming_the_field(
    artifact: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args_file = tmp_path / "args.yaml"
    args_file.write_text(yaml.safe_dump({"artifact_uri": str(artifact), "feature_repo": "feature_repo"}))
    cases = [
        (["--render", str(args_file), "--set", "setwise_top_k=many"], "setwise_top_k: Input should be"),
        (["--render", str(args_file), "--set", "setwise_top_k.x=1"], "setwise_top_k"),
        (["--render", str(args_file), "--set", "name=x", "--set", "name.y=1"], "name is 'x', not a section"),
        (["--render", str(tmp_path / "missing.yaml")], "--render"),
        (["--config", str(tmp_path / "missing.yaml")], "--config"),
        (["--config", str(args_file)], "invalid ServeDeploySchema:\napplications: Field required"),
        (["--config", str(args_file), "--detach"], "--detach needs --address"),
    ]
    for argv, expected in cases:
        with pytest.raises(SystemExit) as exit_info:
            serve_main(argv)
        err = capsys.readouterr().err
        assert exit_info.value.code == 2 and expected in err, (argv, err)
