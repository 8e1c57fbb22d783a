from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from workloads.data.schema import CONTENT_DIM
from workloads.models.batch import ItemContentTable, SemanticIdTable
from workloads.models.config import RQVAEConfig
from workloads.models.rqvae import RQVAE, RQVAEStageConfig, fit, main, semantic_id_table

CFG = RQVAEConfig(codebook_size=16, hidden_dim=32, steps=250, batch_size=128)


def clustered_content(
    n_items: int = 600, n_clusters: int = 12, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(n_clusters, CONTENT_DIM)) * 2
    cluster = rng.integers(0, n_clusters, n_items)
    return (centers[cluster] + rng.normal(size=(n_items, CONTENT_DIM)) * 0.3).astype(np.float32), cluster


def test_fit_improves_reconstruction_and_ids_are_in_range() -> None:
    content, cluster = clustered_content()
    untrained = RQVAE(CFG)
    x = torch.from_numpy(content)
    with torch.no_grad():
        before = untrained(x).reconstruction_loss.item()
    model, losses = fit(content, CFG)
    with torch.no_grad():
        after = model(x).reconstruction_loss.item()
    assert after < 0.3 * before and losses[-1] < losses[0]
    ids = model.semantic_ids(x)
    assert ids.shape == (600, CFG.levels) and ids.dtype == torch.int64
    assert ids.min() >= 0 and ids.max() < CFG.codebook_size
    # the coarse code captures the coarse structure: items of one cluster mostly share it
    purity = np.mean(
        [np.bincount(ids[cluster == c, 0].numpy()).max() / (cluster == c).sum() for c in np.unique(cluster)]
    )
    assert purity > 0.8
    assert len(np.unique(ids.numpy(), axis=0)) > 12  # finer levels split the clusters further


def test_dead_codes_are_reset_onto_batch_residuals() -> None:
    torch.manual_seed(0)
    model = RQVAE(CFG)
    residual = torch.randn(64, CFG.latent_dim)
    codes = torch.zeros(64, CFG.levels, dtype=torch.long)  # only code 0 is ever used
    model.usage.fill_(0.0)
    used_code = model.codebooks[0, 0].detach().clone()
    n_reset = model.reset_dead_codes(codes, [residual] * CFG.levels)
    assert n_reset == CFG.levels * (CFG.codebook_size - 1)
    rows = {tuple(r) for r in residual.tolist()}
    assert all(tuple(c) in rows for c in model.codebooks[0, 1:].tolist())
    torch.testing.assert_close(model.codebooks[0, 0].detach(), used_code)  # the used code stays


def test_stage_writes_semantic_ids_that_collate_can_read(tmp_path: Path) -> None:
    content, _ = clustered_content(n_items=200)
    items = pa.table(
        {
            "item_id": pa.array(np.arange(200), pa.int64()),
            "content_emb": pa.FixedSizeListArray.from_arrays(pa.array(content.reshape(-1)), CONTENT_DIM),
        }
    )
    pq.write_table(items, tmp_path / "items.parquet")
    cfg = RQVAEStageConfig(
        items_path=tmp_path / "items.parquet",
        out_path=tmp_path / "out" / "semantic_ids.parquet",
        rqvae=CFG.model_copy(update={"steps": 30}),
    )
    summary = main(cfg)
    assert summary["items"] == 200
    table = SemanticIdTable.from_parquet(cfg.out_path, CFG.codebook_size)
    assert table.codes.shape == (200, CFG.levels)
    model, _ = fit(content, cfg.rqvae)  # same seed, same data: the same ids
    expected = semantic_id_table(model, ItemContentTable.from_parquet(cfg.items_path))
    np.testing.assert_array_equal(table.codes, expected.codes)
    assert [p.name for p in cfg.out_path.parent.iterdir()] == ["semantic_ids.parquet"]  # no temp file left
