"""The preprocessing config and its time window, without Ray: what a training window is and where it lies.

`PreprocessConfig` names the world and the boundaries of the training and evaluation periods (day offsets
or times); `resolve_window` turns them into microseconds and `validate_impressions` checks the impression
log against its contract before any work starts. The Ray Data pipeline (`workloads.data.preprocess`) and
360Brew's example builder (`workloads.brew.data`) share them, so both cut the same periods, and code that
only needs the window (360Brew on a machine without Ray, its benchmarks) does not import Ray.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as pads
from pydantic import BaseModel, ConfigDict, Field

from workloads.data.counters import DAY_US
from workloads.data.schema import IMPRESSIONS, data_root

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# Every column the examples are built from, typed as in the impression log contract.
EVENT_COLUMNS = [f.name for f in IMPRESSIONS if f.name != "impression_id"]

Boundary = float | datetime


class PreprocessConfig(BaseModel):
    """`python -m workloads.data.preprocess`: training examples from a world's impression log."""

    model_config = ConfigDict(extra="forbid")

    world_dir: Path = Field(
        default_factory=lambda: data_root() / "world", description="has impressions.parquet"
    )
    out_dir: Path = Field(default_factory=lambda: data_root() / "examples", description="replaced atomically")
    max_history: int = Field(256, ge=1, le=65_536, description="most recent events kept per example")
    # A boundary is a time (naive = UTC) or a day offset: >= 0 from the world start, < 0 from its end.
    train_start: Boundary = Field(0.0, description="first training target; earlier sessions are history only")
    train_end: Boundary = Field(-7.0, description="end of training = start of evaluation (last 7 days)")
    eval_end: Boundary | None = Field(None, description="end of evaluation (default: end of the world)")
    surfaces: list[Literal["feed", "jobs"]] = Field(["feed"], min_length=1, description="targets and history")
    min_candidates: int = Field(1, ge=1, description="sessions with fewer impressions are history only")
    ray_address: str | None = Field(None, description="None: a local cluster; 'auto' or 'ray://host:port'")
    num_partitions: int | None = Field(None, ge=1, description="member partitions (default: 2 per CPU)")


class ImpressionLogError(ValueError):
    """The impression log does not match `schema.IMPRESSIONS`; the message names the column."""


@dataclass(frozen=True)
class SplitWindow:
    """Target-session boundaries in microseconds since the epoch, plus the world they sit in."""

    world_start: int
    world_end: int
    train_start: int
    train_end: int
    eval_end: int

    def iso(self) -> dict[str, str]:
        return {k: datetime.fromtimestamp(v / 1e6, tz=UTC).isoformat() for k, v in asdict(self).items()}


# --- Validation: fail before any Ray work starts -----------------------------------------------------------
def impressions_path(world_dir: Path) -> Path:
    path = Path(world_dir) / "impressions.parquet"
    if not path.exists():
        raise FileNotFoundError(f"no impression log at {path} (expected a parquet file or folder of them)")
    return path


def validate_impressions(path: Path, surfaces: list[str]) -> pads.Dataset:
    """Check every column the examples need against `schema.IMPRESSIONS`; reject an empty log."""
    log = pads.dataset(path, format="parquet")
    for expected in IMPRESSIONS:
        if expected.name not in EVENT_COLUMNS:
            continue
        if expected.name not in log.schema.names:
            raise ImpressionLogError(
                f"impression log {path} is missing column {expected.name!r} (expected {expected.type})"
            )
        actual = log.schema.field(expected.name).type
        if not actual.equals(expected.type):
            raise ImpressionLogError(
                f"impression log column {expected.name!r} has type {actual}, expected {expected.type}"
            )
    for fragment in log.get_fragments():
        metadata = fragment.metadata
        for rg in range(metadata.num_row_groups):
            group = metadata.row_group(rg)
            for i in range(group.num_columns):
                chunk = group.column(i)
                nulls = chunk.statistics.null_count if chunk.statistics is not None else 0
                if chunk.path_in_schema in EVENT_COLUMNS and nulls:
                    raise ImpressionLogError(
                        f"impression log column {chunk.path_in_schema!r} has {nulls} nulls "
                        f"in {fragment.path}, expected none"
                    )
    if log.count_rows() == 0:
        raise ImpressionLogError(f"impression log {path} is empty; expected at least one impression")
    if log.count_rows(filter=pc.field("surface").isin(surfaces)) == 0:
        raise ImpressionLogError(f"impression log column 'surface' has no rows in {surfaces}")
    return log


def _us(value: datetime) -> int:
    """Microseconds since the epoch (naive times are UTC), in integers: floats drop microseconds."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return (value - EPOCH) // timedelta(microseconds=1)


def resolve_window(cfg: PreprocessConfig, log: pads.Dataset) -> SplitWindow:
    """Turn day offsets into times: the world's window comes from world.json, else from the log itself."""
    meta_path = Path(cfg.world_dir) / "world.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        start, end = _us(datetime.fromisoformat(meta["start"])), _us(datetime.fromisoformat(meta["end"]))
    else:
        bounds = pc.min_max(log.to_table(columns=["timestamp"]).column("timestamp").cast(pa.int64()))
        start, end = bounds["min"].as_py(), bounds["max"].as_py() + 1

    def at(boundary: Boundary) -> int:
        if isinstance(boundary, datetime):
            return _us(boundary)
        return (start if boundary >= 0 else end) + round(boundary * DAY_US)

    window = SplitWindow(
        world_start=start,
        world_end=end,
        train_start=at(cfg.train_start),
        train_end=at(cfg.train_end),
        eval_end=end if cfg.eval_end is None else at(cfg.eval_end),
    )
    if not window.train_start < window.train_end <= window.eval_end:
        raise ValueError(f"need train_start < train_end <= eval_end, got {window.iso()}")
    return window
