"""How a stage reads its config from the command line, and how it refuses a bad one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel, ConfigDict, Field

from workloads.stage import parse_config, run_stage

ROOT = Path(__file__).resolve().parents[2]


class Optimizer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    lr: float = 1e-3
    betas: list[float] = [0.9, 0.98]


class StageConfig(BaseModel):
    """A stage config shaped like the real ones: a nested section, bounds, no unknown fields."""

    model_config = ConfigDict(extra="forbid")

    epochs: int = Field(1, ge=1)
    name: str = "run"
    optimizer: Optimizer = Optimizer()


def refusal(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """parse_config must exit with status 2 (a usage error) and say why on stderr."""
    with pytest.raises(SystemExit) as exit_info:
        parse_config(StageConfig, argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_file_then_json_then_overrides(tmp_path: Path) -> None:
    config = tmp_path / "stage.yaml"
    config.write_text("epochs: 3\noptimizer: {lr: 0.1}\n")
    cfg = parse_config(
        StageConfig,
        ["--config", str(config), "--config-json", json.dumps({"name": "x"}), "--set", "optimizer.lr=0.5"],
    )
    assert cfg == StageConfig(epochs=3, name="x", optimizer=Optimizer(lr=0.5))
    assert parse_config(StageConfig, ["--set", "optimizer.betas=[0.5, 0.6]"]).optimizer.betas == [0.5, 0.6]


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--set", "epochs=abc"], "epochs: Input should be a valid integer"),
        (["--set", "epochs=0"], "epochs: Input should be greater than or equal to 1 (got 0)"),
        (["--set", "nosuchfield=1"], "nosuchfield: Extra inputs are not permitted"),
        (["--set", "optimizer.lr=fast"], "optimizer.lr: Input should be a valid number"),
        (["--set", "epochs"], "--set expects KEY=VALUE"),
        (["--set", "=1"], "--set expects KEY=VALUE"),
        (["--set", "optimizer..lr=1"], "--set expects KEY=VALUE"),
        (["--set", "epochs=[1"], "--set epochs: '[1' is not a valid YAML value"),
        (["--set", "name=x", "--set", "name.first=y"], "--set name.first: name is 'x', not a section"),
        (["--config-json", "{epochs: 2"], "--config-json: not valid JSON"),
        (["--config-json", "[1, 2]"], "--config-json must hold a mapping of field names to values"),
    ],
)
def test_bad_values_name_the_field_without_a_traceback(
    argv: list[str], expected: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refusal(argv, capsys)
    assert expected in err
    assert "Traceback" not in err and "errors.pydantic.dev" not in err


def test_bad_config_files_name_the_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = tmp_path / "missing.yaml"
    assert f"--config {missing}: cannot read it (No such file or directory)" in refusal(
        ["--config", str(missing)], capsys
    )
    assert "cannot read it (Is a directory)" in refusal(["--config", str(tmp_path)], capsys)
    broken = tmp_path / "broken.yaml"
    broken.write_text("epochs: [1\n")
    assert f"--config {broken}: not valid YAML" in refusal(["--config", str(broken)], capsys)
    listed = tmp_path / "list.yaml"
    listed.write_text("- epochs\n")
    assert "must hold a mapping of field names to values, got a list" in refusal(
        ["--config", str(listed)], capsys
    )


def test_a_real_stage_refuses_a_bad_override_before_starting_ray() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "workloads.data.preprocess", "--set", "max_history=abc"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "RAY_AUTH_MODE": "disabled"},
    )
    assert result.returncode == 2, result.stderr
    assert "invalid PreprocessConfig:\nmax_history: Input should be a valid integer" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_stage_run_is_one_span_and_a_duration_point_even_when_it_fails(
    telemetry: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    def fail(cfg: StageConfig) -> dict[str, Any]:
        raise RuntimeError(f"epoch {cfg.epochs} diverged")

    run_stage(StageConfig, lambda cfg: {"epochs": cfg.epochs}, ["--set", "epochs=2"])
    assert json.loads(capsys.readouterr().out.splitlines()[-1]) == {"epochs": 2}
    with pytest.raises(RuntimeError, match="diverged"):
        run_stage(StageConfig, fail, [])
    ok, failed = telemetry.spans("stage StageConfig")[-2:]
    assert ok.status.is_ok and not failed.status.is_ok
    assert failed.events[0].name == "exception"
    outcomes = {
        p.attributes["outcome"]: p.count
        for p in telemetry.points("rankray.stage.duration")
        if p.attributes["rankray.config"] == "StageConfig"
    }
    assert outcomes["ok"] >= 1 and outcomes["error"] >= 1
