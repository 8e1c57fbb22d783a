from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.workloads.models.synthetic import content_table, example_rows, object_column
from workloads.data.schema import CONTENT_DIM, COUNTER_FEATURES, EXAMPLES, TASKS, Action, task_labels
from workloads.models.batch import (
    ItemContentTable,
    SemanticIdTable,
    actions_multi_hot,
    collate,
    collate_sequences,
    task_labels_from_multi_hot,
)
from workloads.models.batch import task_labels as vector_task_labels


@pytest.fixture
def rows() -> dict[str, np.ndarray]:
    return example_rows(np.random.default_rng(3), n_rows=6, hist_len=(0, 9), cand_len=(1, 5))


def test_history_and_candidates_are_right_padded_with_masks(rows: dict[str, np.ndarray]) -> None:
    table = content_table(np.random.default_rng(0))
    batch = collate(rows, table)
    hist_lens = [len(x) for x in rows["hist_item_id"]]
    cand_lens = [len(x) for x in rows["cand_item_id"]]
    assert batch.hist_item_id.shape == (6, max(hist_lens))
    assert batch.cand_item_id.shape == (6, max(cand_lens))
    for i in range(6):
        h, s = hist_lens[i], cand_lens[i]
        assert batch.hist_mask[i].tolist() == [True] * h + [False] * (max(hist_lens) - h)
        assert batch.cand_mask[i].tolist() == [True] * s + [False] * (max(cand_lens) - s)
        assert batch.hist_item_id[i, :h].tolist() == rows["hist_item_id"][i].tolist()
        assert batch.cand_actor_id[i, :s].tolist() == rows["cand_actor_id"][i].tolist()
        assert batch.cand_position[i, :s].tolist() == rows["cand_position"][i].tolist()
        np.testing.assert_array_equal(
            batch.hist_content[i, :h].numpy(), table.lookup(rows["hist_item_id"][i])
        )
        assert not batch.hist_content[i, h:].any() and not batch.hist_actions[i, h:].any()
    assert batch.hist_item_id.dtype == torch.int64 and batch.cand_content.dtype == torch.float32


def test_truncation_keeps_latest_history_and_first_candidates(rows: dict[str, np.ndarray]) -> None:
    batch = collate(rows, content_table(np.random.default_rng(0)), max_history=3, max_candidates=2)
    for i in range(6):
        hist = rows["hist_item_id"][i]
        assert batch.hist_item_id[i][batch.hist_mask[i]].tolist() == hist[-3:].tolist()
        assert batch.cand_item_id[i][batch.cand_mask[i]].tolist() == rows["cand_item_id"][i][:2].tolist()


def test_pad_to_limits_gives_fixed_shapes(rows: dict[str, np.ndarray]) -> None:
    batch = collate(rows, content_table(np.random.default_rng(0)), 20, 7, pad_to_limits=True)
    assert batch.hist_item_id.shape == (6, 20) and batch.cand_counters.shape == (6, 7, len(COUNTER_FEATURES))
    assert batch.hist_mask.sum().item() == sum(len(x) for x in rows["hist_item_id"])


def test_labels_and_actions_follow_the_bitmasks(rows: dict[str, np.ndarray]) -> None:
    batch = collate(rows, content_table(np.random.default_rng(0)))
    assert batch.labels is not None and batch.labels.shape[-1] == len(TASKS)
    for i in range(6):
        for j, bits in enumerate(rows["cand_actions"][i]):
            assert tuple(batch.labels[i, j].int().tolist()) == task_labels(int(bits))
        for j, bits in enumerate(rows["hist_actions"][i]):
            expected = [(int(bits) >> a) & 1 for a in Action]
            assert batch.hist_actions[i, j].int().tolist() == expected
    assert not batch.labels[~batch.cand_mask].any()


def test_vectorized_task_labels_match_the_schema_for_every_bitmask() -> None:
    bits = np.arange(1 << len(Action))
    expected = np.array([task_labels(int(b)) for b in bits], dtype=np.float32)
    np.testing.assert_array_equal(vector_task_labels(bits), expected)
    from_multi_hot = task_labels_from_multi_hot(torch.from_numpy(actions_multi_hot(bits)))
    np.testing.assert_array_equal(from_multi_hot.numpy(), expected)


def test_counters_are_stacked_in_counter_feature_order(rows: dict[str, np.ndarray]) -> None:
    batch = collate(rows, content_table(np.random.default_rng(0)))
    assert batch.cand_counters.shape[-1] == len(COUNTER_FEATURES)
    for c, name in enumerate(COUNTER_FEATURES):
        for i in range(6):
            s = len(rows["cand_item_id"][i])
            np.testing.assert_allclose(batch.cand_counters[i, :s, c].numpy(), rows[f"cand_{name}"][i])


def test_session_ordinals_are_dense_by_first_appearance() -> None:
    rows = example_rows(np.random.default_rng(0), n_rows=3, hist_len=(5, 5))
    rows["hist_session_id"] = object_column(
        [
            np.array([70, 70, 71, 90, 90]),  # ids are not ordinals
            np.array([9, 3, 3, 9, 5]),  # interleaved: a session keeps one ordinal, numbered by first event
            np.array([4, 4, 4, 4, 4]),
        ]
    )
    batch = collate(rows, content_table(np.random.default_rng(0)))
    assert batch.hist_session.tolist() == [[0, 0, 1, 2, 2], [0, 1, 1, 0, 2], [0, 0, 0, 0, 0]]


def test_rows_without_labels_give_none_and_empty_histories_still_pad(rows: dict[str, np.ndarray]) -> None:
    del rows["cand_actions"]
    rows["hist_item_id"] = object_column([np.zeros(0, np.int64)] * 6)
    for name in ("hist_actor_id", "hist_post_type", "hist_age_bucket", "hist_session_id", "hist_actions"):
        rows[name] = object_column([np.zeros(0, np.int64)] * 6)
    batch = collate(rows, content_table(np.random.default_rng(0)))
    assert batch.labels is None
    assert batch.hist_item_id.shape == (6, 1) and not batch.hist_mask.any()


def test_bad_rows_fail_naming_the_column(rows: dict[str, np.ndarray]) -> None:
    table = content_table(np.random.default_rng(0))
    without = {k: v for k, v in rows.items() if k != "cand_ma_imp_7d"}
    with pytest.raises(ValueError, match="cand_ma_imp_7d"):
        collate(without, table)
    out_of_vocabulary = dict(rows)
    out_of_vocabulary["cand_post_type"] = object_column([x + 9 for x in rows["cand_post_type"]])
    with pytest.raises(ValueError, match="cand_post_type"):
        collate(out_of_vocabulary, table)
    broken = dict(rows)
    broken["hist_actor_id"] = object_column([np.append(x, 1) for x in rows["hist_actor_id"]])
    with pytest.raises(ValueError, match="hist_actor_id"):
        collate(broken, table)


def test_content_table_reads_parquet_and_zeros_unknown_ids(tmp_path: Path) -> None:
    emb = pa.FixedSizeListArray.from_arrays(
        pa.array(np.arange(3 * CONTENT_DIM, dtype=np.float32)), CONTENT_DIM
    )
    emb = pa.array(
        [emb[0].as_py(), None, emb[2].as_py()], type=pa.list_(pa.float32(), CONTENT_DIM)
    )  # item 7 has no embedding
    pq.write_table(
        pa.table({"item_id": pa.array([5, 7, 2], pa.int64()), "content_emb": emb}), tmp_path / "i.parquet"
    )
    table = ItemContentTable.from_parquet(tmp_path / "i.parquet")
    out = table.lookup(np.array([[5, 2], [7, 99]]))
    assert out.shape == (2, 2, CONTENT_DIM)
    np.testing.assert_array_equal(out[0, 0], np.arange(CONTENT_DIM))
    np.testing.assert_array_equal(out[0, 1], np.arange(2 * CONTENT_DIM, 3 * CONTENT_DIM))
    assert not out[1].any()  # null embedding and unknown id
    assert not ItemContentTable.zeros(10, 4).lookup(np.array([3])).any()


def test_semantic_ids_are_looked_up_per_event(rows: dict[str, np.ndarray]) -> None:
    codes = np.random.default_rng(0).integers(0, 8, (50, 3))
    batch = collate(rows, content_table(np.random.default_rng(0)), semantic_ids=SemanticIdTable(codes, 8))
    assert batch.cand_semantic_ids is not None and batch.hist_semantic_ids is not None
    ids, sids = batch.cand_item_id[batch.cand_mask], batch.cand_semantic_ids[batch.cand_mask]
    for item, sid in zip(ids.tolist(), sids.tolist(), strict=True):
        assert sid == (codes[item].tolist() if item < 50 else [-1, -1, -1])
    assert (batch.hist_semantic_ids[~batch.hist_mask] == -1).all()
    with pytest.raises(ValueError, match="codes"):
        SemanticIdTable(codes, 4)


def test_collate_sequences_keeps_the_most_recent_events() -> None:
    batch = collate_sequences(
        object_column([np.array([1, 2, 3, 4]), np.array([7])]),
        max_len=3,
        actions=object_column([np.array([1, 0, 2, 1]), np.array([16])]),
    )
    assert batch.item_id.tolist() == [[2, 3, 4], [7, 0, 0]]
    assert batch.mask.tolist() == [[True, True, True], [True, False, False]]
    assert (
        batch.actions is not None
        and batch.actions[0, 1, 1] == 1
        and batch.actions[1, 0, Action.LONG_DWELL] == 1
    )


@pytest.mark.slow  # Ray Data's first read spins up its workers: ~30 s on 2 cores
def test_collate_reads_ray_data_numpy_batches(ray_session: None, tmp_path: Path) -> None:
    """The format collate is written for: parquet with the EXAMPLES schema, through Ray Data."""
    import ray

    rows = example_rows(np.random.default_rng(5), n_rows=8)
    table = pa.table({f.name: pa.array(list(rows[f.name]), type=f.type) for f in EXAMPLES}, schema=EXAMPLES)
    pq.write_table(table, tmp_path / "examples.parquet")
    [ray_rows] = list(ray.data.read_parquet(str(tmp_path)).iter_batches(batch_format="numpy", batch_size=8))
    content = content_table(np.random.default_rng(0))
    from_ray, direct = collate(ray_rows, content), collate(rows, content)
    for name, value in vars(direct).items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(getattr(from_ray, name), value), name
