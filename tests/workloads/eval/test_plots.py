from __future__ import annotations

from pathlib import Path

from workloads.eval.plots import epoch_plot


def test_epoch_plot_writes_a_png_into_a_folder_it_creates(tmp_path: Path) -> None:
    curve = [
        {"epoch": 1, "train_seconds": 5.0, "long_dwell_auc": 0.6},
        {"epoch": 2, "train_seconds": 9.0, "long_dwell_auc": 0.7},
    ]
    path = epoch_plot(
        {"LiGR": curve, "HSTU layers": curve}, ["long_dwell_auc"], tmp_path / "x" / "curves.png", "t"
    )
    assert path.read_bytes().startswith(b"\x89PNG")
