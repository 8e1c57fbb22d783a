from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from workloads.data.schema import Action
from workloads.eval.history_reader import HistoryReaderConfig, Sessions, history_counts, run

DAY = 86_400_000_000
CLICK, LIKE, DWELL = 1 << Action.CLICK, 1 << Action.LIKE, 1 << Action.LONG_DWELL


def sessions_table(rows: list[dict]) -> pa.Table:
    columns = ("hist_actor_id", "hist_topic", "hist_actions", "hist_timestamp", "cand_actor_id", "cand_topic")
    columns += ("cand_post_type", "cand_age_bucket", "cand_actions")
    table = {name: [row[name] for row in rows] for name in columns}
    return pa.table(
        {
            **table,
            "session_start": [row["session_start"] for row in rows],
            "surface": ["feed"] * len(rows),
        }
    )


def one_session() -> pa.Table:
    return sessions_table(
        [
            {
                # oldest first: actor 5 long-read 10 days ago, 7 ignored, 5 clicked and liked 2 days ago, 9
                "hist_actor_id": [5, 7, 5, 9],
                "hist_topic": [1, 2, 1, 3],
                "hist_actions": [DWELL, 0, CLICK | LIKE, 0],
                "hist_timestamp": [0, 4 * DAY, 8 * DAY, 9 * DAY],
                "session_start": 10 * DAY,
                "cand_actor_id": [5, 9, 11],
                "cand_topic": [1, 3, 4],
                "cand_post_type": [0, 1, 2],
                "cand_age_bucket": [3, 4, 5],
                "cand_actions": [DWELL, 0, CLICK],
            }
        ]
    )


def test_the_counts_cover_exactly_the_last_n_events() -> None:
    sessions = Sessions(one_session(), max_history=8)  # padded to 8: the 4 missing events count nowhere
    features, labels = history_counts(sessions, 8)
    assert features.shape == (3, 16)
    member = [1, 1, 1, 4]  # clicks, contributions, long dwells, events
    # per key: events, clicks, contributions, long dwells, days since the newest such event
    assert features[0].tolist() == [*member, 2, 1, 1, 1, 2, 2, 1, 1, 1, 2, 0, 3]
    assert features[1].tolist() == [*member, 1, 0, 0, 0, 1, 1, 0, 0, 0, 1, 1, 4]
    assert features[2].tolist() == [*member, 0, 0, 0, 0, 999, 0, 0, 0, 0, 999, 2, 5]
    assert labels.tolist() == [[0, 0, 1], [0, 0, 0], [1, 0, 0]]  # click, contribution, long dwell

    newest_two, _ = history_counts(sessions, 2)  # actor 5's long read 10 days ago falls out
    assert newest_two[0].tolist() == [1, 1, 0, 2, 1, 1, 1, 0, 2, 1, 1, 1, 0, 2, 0, 3]


def affinity_world(members: int, rng: np.random.Generator) -> pa.Table:
    """A member long-reads exactly the actors they long-read before, and every such read is older than the
    newest 8 events (which show other actors only): only a reader that looks further back can know."""
    rows = []
    for _ in range(members):
        liked = set(rng.choice(40, 3, replace=False).tolist())
        old = rng.choice(40, 24).tolist() + sorted(liked)  # the liked actors' reads are 8+ events back
        recent = rng.choice(np.arange(40, 60), 8).tolist()  # actors never shown as candidates
        actors = old + recent
        actions = [DWELL if a in liked and i >= 24 else 0 for i, a in enumerate(old)] + [0] * 8
        candidates = rng.choice(40, 6).tolist()
        rows.append(
            {
                "hist_actor_id": actors,
                "hist_topic": [0] * len(actors),
                "hist_actions": actions,
                "hist_timestamp": list(range(len(actors))),
                "session_start": len(actors),
                "cand_actor_id": candidates,
                "cand_topic": [0] * 6,
                "cand_post_type": [0] * 6,
                "cand_age_bucket": [0] * 6,
                "cand_actions": [DWELL if a in liked else 0 for a in candidates],
            }
        )
    return sessions_table(rows)


@pytest.fixture
def affinity_examples(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for split, members in (("train", 600), ("eval", 300)):
        (tmp_path / split).mkdir()
        pq.write_table(affinity_world(members, rng), tmp_path / split / "part-0.parquet")
    return tmp_path


def test_the_reader_finds_signal_only_a_longer_history_holds(affinity_examples: Path) -> None:
    output = affinity_examples / "reader.json"
    rows = run(HistoryReaderConfig(examples_dir=affinity_examples, lengths=[40, 8], output=output))
    by_length = {row["history"]: row for row in rows}
    assert [row["history"] for row in rows] == [8, 40]  # shortest first
    assert by_length[8]["long_dwell_auc"] < 0.6  # the newest 8 events say nothing about the candidates
    assert by_length[40]["long_dwell_auc"] > 0.95
    assert output.is_file()
