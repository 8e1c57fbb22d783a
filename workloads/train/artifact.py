"""The versioned model artifact: what training publishes and what evaluation and serving load.

Layout of ``<artifact_root>/<name>/v<version>/``::

    model.safetensors   full (unsharded) weights, CPU, keyed by parameter name
    config.json         {"model": <model config, with "kind">, "train": <training config or null>}
    feature_spec.json   the inputs the model reads: columns, history/candidate limits, item content source
    metrics.json        evaluation metrics of the final epoch, plus every epoch's
    data_window.json    the train and eval time windows (copied from the examples manifest)
    MANIFEST.json       name, version, creation time, format, and a sha256 per file

A version is written into a hidden temp folder next to it and renamed into place only when every
file is there, so a reader sees a whole artifact or none; a published version is never overwritten.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from workloads.data.schema import COUNTER_FEATURES, TASKS
from workloads.models.registry import (
    build_model,
    build_retrieval_model,
    parse_model_config,
    parse_retrieval_config,
)

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
MANIFEST = "MANIFEST.json"
_RANKING_KINDS = {"ligr", "hstu", "dcnv2"}


@dataclass
class LoadedArtifact:
    model: nn.Module  # in eval mode, on CPU
    config: dict[str, Any]  # {"model": ..., "train": ...} as written
    feature_spec: dict[str, Any]
    metrics: dict[str, Any]
    data_window: dict[str, Any]
    version: int
    name: str
    path: Path


def feature_spec(
    model_config: Any, item_content_source: str | None, semantic_ids: str | None
) -> dict[str, Any]:
    """Which example columns (and thus which Feast features) the model reads, and how many.

    ``n_features`` counts distinct input features the way the LiGR paper does (section 3.3: "less than
    ten features from hundreds"): one per id, categorical or embedding input, one per counter.
    """
    kind = model_config.kind
    if kind in ("ligr_retrieval", "sasrec"):
        return {
            "model_kind": kind,
            "max_len": model_config.max_len,
            "history_features": ["item_id"],
            "candidate_features": ["item_id"],
            "counter_features": [],
            "n_features": 1,
            "scoring": "dot product of user_embedding(SequenceBatch) and item_embedding(item_ids)",
        }
    spec: dict[str, Any] = {
        "model_kind": kind,
        "tasks": TASKS,
        "max_history": model_config.max_history,
        "max_candidates": model_config.max_candidates,
        "item_content_source": item_content_source,
        "semantic_ids_source": semantic_ids,
    }
    if kind in ("ligr", "hstu"):
        item = sorted(model_config.use_features) + (["semantic_ids"] if model_config.use_semantic_ids else [])
        spec["history_features"] = [*item, "actions", "session"]
        spec["candidate_features"] = item
        spec["counter_features"] = list(model_config.candidate_counters)
    elif kind == "dcnv2":
        spec["history_features"] = ["actor_id", "actions"] if model_config.use_history_summary else []
        spec["candidate_features"] = ["item_id", "actor_id", "post_type", "age_bucket"] + (
            ["content"] if model_config.use_content else []
        )
        spec["counter_features"] = list(COUNTER_FEATURES)
    else:
        raise ValueError(f"feature_spec: unknown ranking model kind {kind!r}")
    inputs = set(spec["history_features"]) | set(spec["candidate_features"])
    spec["n_features"] = len(inputs - {"session"}) + len(spec["counter_features"])
    return spec


def file_sha256(path: Path) -> str:
    """sha256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")


def save_artifact(
    out_dir: Path,
    state_dict: dict[str, torch.Tensor],
    model_config: Any,
    *,
    name: str,
    version: int,
    train_config: dict[str, Any] | None = None,
    feature_spec: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    data_window: dict[str, Any] | None = None,
) -> Path:
    """Publish one artifact version at ``out_dir`` atomically; refuses to overwrite an existing one."""
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise FileExistsError(f"artifact {out_dir} already exists; versions are immutable")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        # clone: safetensors refuses tensors that share storage (tied weights)
        tensors = {k: v.detach().to("cpu").clone().contiguous() for k, v in state_dict.items()}
        save_file(tensors, str(tmp / WEIGHTS))
        _write_json(
            tmp / "config.json", {"model": model_config.model_dump(mode="json"), "train": train_config}
        )
        _write_json(tmp / "feature_spec.json", feature_spec or {})
        _write_json(tmp / "metrics.json", metrics or {})
        _write_json(tmp / "data_window.json", data_window or {})
        files = sorted(p.name for p in tmp.iterdir())
        _write_json(
            tmp / MANIFEST,
            {
                "format": FORMAT_VERSION,
                "name": name,
                "version": version,
                "created": datetime.now(UTC).isoformat(),
                "model_kind": model_config.kind,
                "files": {f: file_sha256(tmp / f) for f in files},
            },
        )
        os.rename(tmp, out_dir)  # atomic on one filesystem; fails if a concurrent writer got there first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def load_model_config(raw: dict[str, Any]) -> Any:
    """A ranking or retrieval model config from its JSON form (picked by ``kind``)."""
    if raw.get("kind") in _RANKING_KINDS:
        return parse_model_config(raw)
    return parse_retrieval_config(raw)


def build_any_model(model_config: Any) -> nn.Module:
    if model_config.kind in _RANKING_KINDS:
        return build_model(model_config)
    return build_retrieval_model(model_config)


def load_artifact(path: str | Path, verify: bool = True) -> LoadedArtifact:
    """Load a published artifact: rebuild the model from its config, load the weights, eval mode, CPU.

    ``verify`` checks every file against the manifest's sha256 first, so a truncated copy fails here
    rather than serving wrong scores.
    """
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{path} is not a model artifact (no {MANIFEST})")
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("format") != FORMAT_VERSION:
        raise ValueError(f"{manifest_path}: format {manifest.get('format')!r}, expected {FORMAT_VERSION}")
    if verify:
        for file, expected in manifest["files"].items():
            if file_sha256(path / file) != expected:
                raise ValueError(f"{path / file}: sha256 does not match {MANIFEST}")
    config = json.loads((path / "config.json").read_text())
    model = build_any_model(load_model_config(config["model"]))
    model.load_state_dict(load_file(str(path / WEIGHTS)), strict=True)
    model.eval()
    return LoadedArtifact(
        model=model,
        config=config,
        feature_spec=json.loads((path / "feature_spec.json").read_text()),
        metrics=json.loads((path / "metrics.json").read_text()),
        data_window=json.loads((path / "data_window.json").read_text()),
        version=int(manifest["version"]),
        name=str(manifest["name"]),
        path=path,
    )


def latest_version(artifact_root: str | Path, name: str) -> Path | None:
    """The highest published ``v<N>`` folder of a model, or None."""
    versions = [
        (int(p.name[1:]), p)
        for p in (Path(artifact_root) / name).glob("v*")
        if p.name[1:].isdigit() and (p / MANIFEST).is_file()
    ]
    return max(versions)[1] if versions else None
