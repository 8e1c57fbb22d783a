"""`rankray crd`, `rankray validate` and `rankray operator` as a user runs them."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import yaml
from typer.testing import CliRunner

from operators.api.crd import crd_yaml
from operators.api.reference import reference_markdown
from operators.cli import app

ROOT = Path(__file__).resolve().parents[2]
runner = CliRunner()


def test_crd_prints_the_crd_and_writes_it_atomically(tmp_path: Path) -> None:
    result = runner.invoke(app, ["crd"])
    assert result.exit_code == 0 and result.stdout == crd_yaml()
    out = tmp_path / "crds" / "rankingmodels.rankray.io.yaml"
    assert runner.invoke(app, ["crd", "--out", str(out)]).exit_code == 0
    assert out.read_text() == crd_yaml() and not list(out.parent.glob(".*.tmp"))
    assert runner.invoke(app, ["crd", "--reference"]).stdout == reference_markdown()


def test_validate_accepts_the_examples() -> None:
    files = ["-f", str(ROOT / "examples/feed-ligr.yaml"), "-f", str(ROOT / "examples/jobs-brew.yaml")]
    result = runner.invoke(app, ["validate", *files])
    assert result.exit_code == 0, result.output
    assert "feed-ligr.yaml (feed-ligr): valid" in result.stdout
    assert "jobs-brew.yaml (jobs-brew): valid" in result.stdout


def _write(path: Path, *documents: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump_all(documents))
    return path


def test_validate_exits_non_zero_naming_each_bad_field(tmp_path: Path, manifest: dict[str, Any]) -> None:
    bad = copy.deepcopy(manifest)
    bad["metadata"]["name"] = "bad-model"
    bad["spec"]["training"]["workers"] = -2
    bad["spec"]["model"]["kind"] = "gbdt"
    bad["spec"]["serving"]["setwiseTopK"] = 900
    del bad["spec"]["featureRepo"]
    path = _write(tmp_path / "models.yaml", manifest, bad)
    result = runner.invoke(app, ["validate", "-f", str(path)])
    assert result.exit_code == 1
    assert f"{path} (document 1, feed-ligr): valid" in result.stdout
    lines = [line for line in result.stderr.splitlines() if "(document 2, bad-model)" in line]
    fields = {line.split(": ", 2)[1] for line in lines}
    assert fields == {
        "spec.training.workers",
        "spec.model.kind",
        "spec.serving.setwiseTopK",
        "spec.featureRepo",
    }, lines


def test_validate_reports_files_it_cannot_read(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("spec: [unclosed\n")
    result = runner.invoke(app, ["validate", "-f", str(broken)])
    assert result.exit_code == 1 and "not valid YAML" in result.stderr
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert runner.invoke(app, ["validate", "-f", str(empty)]).exit_code == 1
    assert runner.invoke(app, ["validate", "-f", str(tmp_path / "missing.yaml")]).exit_code == 2


def test_operator_command_is_wired() -> None:
    result = runner.invoke(app, ["operator", "--help"])
    assert result.exit_code == 0
    assert "--namespace" in result.stdout and "--sync-interval" in result.stdout


def test_synth_refuses_a_bad_override_naming_the_field(tmp_path: Path) -> None:
    for override, expected in [
        ("setwise_effect=abc", "setwise_effect: Input should be a valid number"),
        ("nosuchfield=1", "nosuchfield: Extra inputs are not permitted"),
    ]:
        result = runner.invoke(app, ["data", "synth", "--out", str(tmp_path / "w"), "--set", override])
        assert result.exit_code == 2, result.output  # a usage error, not a crash (exit 1)
        assert expected in " ".join(result.stderr.replace("│", " ").split())
    assert not (tmp_path / "w").exists(), "nothing is generated from a bad config"


def test_materialize_before_the_tables_exist_exits_with_the_missing_tables(
    tmp_path: Path, monkeypatch: Any
) -> None:
    """Not a traceback: the error names the views' tables and the command that builds them."""
    ignore = shutil.ignore_patterns("__pycache__", "data")
    repo = shutil.copytree(ROOT / "feature_repo", tmp_path / "feature_repo", ignore=ignore)
    (tmp_path / "data" / "feast").mkdir(parents=True)  # the registry's folder, but no world/features
    monkeypatch.setenv("RANKRAY_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("FEAST_FS_YAML_FILE_PATH", raising=False)
    assert runner.invoke(app, ["features", "apply", "--repo", str(repo)]).exit_code == 0
    result = runner.invoke(app, ["features", "materialize", "--repo", str(repo), "--service", "ligr_v2"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)  # typer.Exit, not a crash
    message = " ".join(result.stderr.split())
    assert "feature view table(s) missing" in message and "item_counters" in message
    assert "rankray features build" in message
