"""Checkpoint manifests: a complete checkpoint is recognised, a torn or foreign one never is."""

from __future__ import annotations

from pathlib import Path

from workloads.train.checkpoints import MANIFEST, checkpoint_dir_name, read_complete_manifest, write_manifest


def checkpoint(folder: Path, epochs: int = 3) -> Path:
    folder.mkdir()
    (folder / "state.pt").write_bytes(b"weights" * 1000)
    (folder / "progress.json").write_text('{"next_epoch": 3}')
    write_manifest(folder, epochs, {"epoch": epochs, "eval_loss": 0.5})
    return folder


def test_a_complete_checkpoint_gives_its_epoch_and_metrics(tmp_path: Path) -> None:
    manifest = read_complete_manifest(checkpoint(tmp_path / "c"))
    assert manifest is not None
    assert manifest["finished_epochs"] == 3
    assert manifest["metrics"] == {"epoch": 3, "eval_loss": 0.5}
    assert sorted(manifest["files"]) == ["progress.json", "state.pt"]


def test_a_truncated_file_makes_it_incomplete(tmp_path: Path) -> None:
    folder = checkpoint(tmp_path / "c")
    (folder / "state.pt").write_bytes(b"weights" * 999)  # an upload cut short
    assert read_complete_manifest(folder) is None


def test_a_missing_file_or_manifest_makes_it_incomplete(tmp_path: Path) -> None:
    missing_file = checkpoint(tmp_path / "a")
    (missing_file / "progress.json").unlink()
    assert read_complete_manifest(missing_file) is None
    missing_manifest = checkpoint(tmp_path / "b")
    (missing_manifest / MANIFEST).unlink()
    assert read_complete_manifest(missing_manifest) is None
    broken_manifest = checkpoint(tmp_path / "c")
    (broken_manifest / MANIFEST).write_text('{"files": {}')
    assert read_complete_manifest(broken_manifest) is None


def test_folder_names_sort_in_epoch_order() -> None:
    names = [checkpoint_dir_name(n) for n in (10, 2, 100, 1)]
    assert sorted(names) == [checkpoint_dir_name(n) for n in (1, 2, 10, 100)]
