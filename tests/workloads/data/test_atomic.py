"""Atomic publishing of output folders: all or nothing, even when the writer is killed."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from workloads.data.atomic import MANIFEST, atomic_dir


def publish(out: Path, files: dict[str, str]) -> None:
    with atomic_dir(out) as tmp:
        for name, text in files.items():
            (tmp / name).write_text(text)


def temps(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.tmp-*"))


def test_publishes_and_replaces_a_previous_output(tmp_path: Path) -> None:
    out = tmp_path / "examples"
    publish(out, {MANIFEST: "{}", "a.parquet": "old"})
    publish(out, {MANIFEST: "{}", "b.parquet": "new"})
    assert sorted(p.name for p in out.iterdir()) == ["b.parquet", MANIFEST]
    assert temps(out) == []


def test_a_failing_writer_leaves_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "examples"
    publish(out, {MANIFEST: "{}", "a.parquet": "old"})
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(out) as tmp:
        (tmp / "half.parquet").write_text("half")
        raise RuntimeError("boom")
    assert (out / "a.parquet").read_text() == "old" and not (out / "half.parquet").exists()
    assert temps(out) == []


def test_output_without_a_manifest_is_not_published(tmp_path: Path) -> None:
    out = tmp_path / "examples"
    with pytest.raises(RuntimeError, match=r"no manifest\.json"):
        publish(out, {"a.parquet": "data"})
    assert not out.exists() and temps(out) == []


def test_refuses_to_replace_a_folder_it_did_not_write(tmp_path: Path) -> None:
    out = tmp_path / "home"
    out.mkdir()
    (out / "notes.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"holds no manifest\.json"):
        publish(out, {MANIFEST: "{}"})
    assert (out / "notes.txt").read_text() == "precious"


def test_a_killed_writer_leaves_the_old_output_and_its_temp_is_cleaned_later(tmp_path: Path) -> None:
    out = tmp_path / "examples"
    publish(out, {MANIFEST: "{}", "a.parquet": "old"})
    killed = textwrap.dedent(
        f"""
        import os, signal
        from pathlib import Path
        from workloads.data.atomic import atomic_dir
        with atomic_dir(Path({str(out)!r})) as tmp:
            (tmp / "half.parquet").write_text("half")
            os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    done = subprocess.run([sys.executable, "-c", killed], cwd=Path(__file__).parents[3])
    assert done.returncode == -9
    assert (out / "a.parquet").read_text() == "old" and not (out / "half.parquet").exists()
    (leftover,) = temps(out)  # hidden, next to the output, never inside it
    assert (leftover / "half.parquet").exists()

    publish(out, {MANIFEST: "{}", "b.parquet": "new"})  # the next run removes the dead writer's temp
    assert temps(out) == []
    assert sorted(p.name for p in out.iterdir()) == ["b.parquet", MANIFEST]


def test_a_live_writers_temp_is_left_alone(tmp_path: Path) -> None:
    out = tmp_path / "examples"
    with atomic_dir(out) as mine:
        (mine / MANIFEST).write_text("{}")
        publish(tmp_path / "other", {MANIFEST: "{}"})  # unrelated outputs do not touch it
        with pytest.raises(RuntimeError), atomic_dir(out):  # neither does a concurrent writer
            raise RuntimeError("second writer fails")
        assert mine.exists()
    assert (out / MANIFEST).exists()
