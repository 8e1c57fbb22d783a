"""Publish a folder of outputs all at once: readers see the previous version or the new one, never half.

A stage writes into a hidden sibling temp folder and, only when everything (data files and the
manifest) is in place, swaps it in with two renames on the same filesystem. A failure removes the
temp folder and leaves the previous output untouched; a killed process leaves only a hidden temp
folder, which the next run removes once its owner process is gone.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

MANIFEST = "manifest.json"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def _remove_stale_temps(out_dir: Path) -> None:
    """Remove temp folders of earlier runs on this host whose process no longer exists."""
    for path in out_dir.parent.glob(f".{out_dir.name}.tmp-*"):
        pid = path.name.removeprefix(f".{out_dir.name}.tmp-").split("-")[0]
        if pid.isdigit() and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


@contextmanager
def atomic_dir(out_dir: Path, manifest: str = MANIFEST) -> Iterator[Path]:
    """Yield an empty temp folder; when the block exits cleanly it replaces ``out_dir`` in one swap.

    The block must write ``manifest`` into the folder: an existing ``out_dir`` is only ever replaced
    if it is empty or holds one, so a wrong path cannot wipe unrelated files.
    """
    out_dir = Path(out_dir).resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not (out_dir / manifest).is_file():
        raise FileExistsError(f"out_dir {out_dir} exists and holds no {manifest}; refusing to replace it")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(out_dir)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        if not (tmp / manifest).is_file():
            raise RuntimeError(f"refusing to publish {out_dir}: the writer left no {manifest}")
        if out_dir.exists():
            old = out_dir.parent / f".{out_dir.name}.tmp-{tag}-old"
            os.replace(out_dir, old)
            try:
                os.replace(tmp, out_dir)
            except BaseException:
                os.replace(old, out_dir)
                raise
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
