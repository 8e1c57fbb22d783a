"""Epoch checkpoints that survive a crash between ``ray.train.report`` and Ray registering them.

Ray Train V2 persists a reported checkpoint inside ``ray.train.report`` but registers it only when its
controller next polls the worker (every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S``, 2 s). A worker killed in
between leaves a complete checkpoint in the run's storage that ``ray.train.get_checkpoint()`` does not
return, and the restarted group would train that epoch again. So every checkpoint goes to a folder
named after its epoch with a manifest (epoch, metrics, sha256 of each file), and a (re)starting group
resumes from the newest complete checkpoint in storage. One Ray has not registered is reported again
without upload, which registers it and its epoch's metrics, so nothing downstream needs to know.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import torch.distributed as dist
from ray.train import CheckpointUploadMode

from workloads.train.artifact import file_sha256

MANIFEST = "manifest.json"
PREFIX = "checkpoint_epoch_"

logger = logging.getLogger(__name__)


def checkpoint_dir_name(finished_epochs: int) -> str:
    return f"{PREFIX}{finished_epochs:06d}"


def write_manifest(folder: Path, finished_epochs: int, metrics: dict[str, Any]) -> None:
    files = {p.name: file_sha256(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"finished_epochs": finished_epochs, "metrics": metrics, "files": files}
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))


def read_complete_manifest(folder: Path) -> dict[str, Any] | None:
    """The manifest if every file it lists is there with its digest; None for a torn or foreign folder."""
    try:
        manifest: dict[str, Any] = json.loads((folder / MANIFEST).read_text())
        files: dict[str, str] = manifest["files"]
        int(manifest["finished_epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    for name, digest in files.items():
        if not (folder / name).is_file() or file_sha256(folder / name) != digest:
            return None
    return manifest


def report_epoch(metrics: dict[str, Any], finished_epochs: int, write: Callable[[Path], None] | None) -> None:
    """Every rank calls this once per epoch; the rank holding the state passes ``write``, which puts the
    checkpoint's files into the folder it is given."""
    with tempfile.TemporaryDirectory(prefix="rankray-ckpt-") as folder:
        checkpoint = None
        if write is not None:
            write(Path(folder))
            write_manifest(Path(folder), finished_epochs, metrics)
            checkpoint = ray.train.Checkpoint.from_directory(folder)
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(finished_epochs)
        )


@dataclass(frozen=True)
class _Choice:
    path: str | None  # on the run's storage filesystem
    adopt_metrics: dict[str, Any] | None  # set when Ray has not registered the checkpoint


def _finished_epochs(checkpoint: ray.train.Checkpoint) -> int | None:
    with checkpoint.as_directory() as folder:
        manifest = read_complete_manifest(Path(folder))
    return None if manifest is None else int(manifest["finished_epochs"])


def _choose() -> _Choice:
    """Rank 0's decision: Ray's registered checkpoint, or a newer complete one Ray never registered."""
    registered = ray.train.get_checkpoint()
    registered_epochs = 0
    if registered is not None:
        found = _finished_epochs(registered)
        if found is None:  # written before checkpoints carried a manifest: Ray's word is all there is
            return _Choice(registered.path, None)
        registered_epochs = found
    storage = ray.train.get_context().get_storage()
    filesystem: pafs.FileSystem = storage.storage_filesystem
    listing = filesystem.get_file_info(pafs.FileSelector(storage.experiment_fs_path, allow_not_found=True))
    newer = sorted(
        (
            info.path
            for info in listing
            if info.type == pafs.FileType.Directory and info.base_name.startswith(PREFIX)
        ),
        reverse=True,
    )
    for path in newer:
        candidate = ray.train.Checkpoint(path, filesystem=filesystem)
        with candidate.as_directory() as folder:
            manifest = read_complete_manifest(Path(folder))
        if manifest is None:
            logger.warning("ignoring the incomplete checkpoint %s", path)
            continue
        if int(manifest["finished_epochs"]) <= registered_epochs:
            break
        logger.warning(
            "resuming from %s (epoch %d): complete in storage but not registered with Ray"
            " (a worker died before reporting it, or the run was restarted from storage)",
            path,
            manifest["finished_epochs"],
        )
        return _Choice(path, manifest["metrics"])
    return _Choice(None if registered is None else registered.path, None)


@contextmanager
def resumed_checkpoint() -> Iterator[Path | None]:
    """The folder of the checkpoint to resume from, or None for a fresh start. Every rank enters it
    (rank 0 decides for all; a checkpoint Ray had not registered is reported once more, registering it)."""
    choice = [_choose() if ray.train.get_context().get_world_rank() == 0 else None]
    if dist.is_initialized():
        dist.broadcast_object_list(choice, src=0)
    decided = choice[0]
    assert decided is not None
    if decided.path is None:
        yield None
        return
    storage = ray.train.get_context().get_storage()
    checkpoint = ray.train.Checkpoint(decided.path, filesystem=storage.storage_filesystem)
    if decided.adopt_metrics is not None:
        is_rank_0 = ray.train.get_context().get_world_rank() == 0
        ray.train.report(
            decided.adopt_metrics,
            checkpoint=checkpoint if is_rank_0 else None,
            checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD,
        )
    with checkpoint.as_directory() as folder:
        yield Path(folder)
