"""RQ-VAE semantic ids (LiGR 3.3, after Rajput et al. 2023 and Singh et al. 2024).

An item's content embedding x becomes a tuple of codes, coarse to fine:

    z   = f_phi(x)                                   encoder
    c_i = nearest(r_{i-1}, C_i),  r_i = r_{i-1} - c_i,  r_0 = z      residual quantization, N codebooks
    z_q = c_1 + ... + c_N,  x_hat = g_theta(z_q)     decoder

trained on ``||x - x_hat||^2`` plus, per level, the VQ-VAE codebook and commitment terms
``||sg(r_{i-1}) - c_i||^2 + beta ||r_{i-1} - sg(c_i)||^2`` (the paper's beta-weighted ``||z - z_q||^2``,
split so codebooks and encoder move toward each other), with a straight-through gradient from the
decoder to the encoder. As the paper does for stability, codes whose moving-average use falls below a
threshold are reset to a random residual of the current batch, and a FLOPs regularizer on the soft
assignments pushes toward evenly used codes. The ids feed LiGR as prefix n-gram embeddings
(``ligr.SemanticIdEmbedding``) through a ``SemanticIdTable``.

Run alone: ``python -m workloads.models.rqvae --set items_path=data/world/items.parquet --set out_path=...``
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from workloads.models.batch import ItemContentTable, SemanticIdTable
from workloads.models.config import RQVAEConfig


@dataclass
class RQVAEOutput:
    reconstruction: Tensor  # (N, E)
    codes: Tensor  # (N, levels) int64
    loss: Tensor
    reconstruction_loss: Tensor
    quantization_loss: Tensor
    residuals: list[Tensor]  # what each level quantized (detached), for dead-code resets


class RQVAE(nn.Module):
    usage: Tensor

    def __init__(self, cfg: RQVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Sequential(
            nn.Linear(cfg.input_dim, cfg.hidden_dim), nn.SiLU(), nn.Linear(cfg.hidden_dim, cfg.latent_dim)
        )
        self.codebooks = nn.Parameter(torch.randn(cfg.levels, cfg.codebook_size, cfg.latent_dim) * 0.1)
        self.decoder = nn.Sequential(
            nn.Linear(cfg.latent_dim, cfg.hidden_dim), nn.SiLU(), nn.Linear(cfg.hidden_dim, cfg.input_dim)
        )
        # moving-average share of assignments of each code (uniform = 1 / codebook_size)
        self.register_buffer("usage", torch.full((cfg.levels, cfg.codebook_size), 1.0 / cfg.codebook_size))

    def quantize(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor, list[Tensor]]:
        """(z_q, codes (N, levels), codebook + commitment loss, FLOPs regularizer, residuals)."""
        z_q = torch.zeros_like(z)
        residual = z
        codes, residuals = [], []
        quantization = flops = z.new_zeros(())
        for codebook in self.codebooks:  # (K, d) per level
            distance = torch.cdist(residual, codebook) ** 2  # (N, K)
            code = distance.argmin(dim=-1)
            chosen = codebook[code]  # (N, d)
            quantization = quantization + F.mse_loss(chosen, residual.detach())
            quantization = quantization + self.cfg.beta * F.mse_loss(residual, chosen.detach())
            # FLOPs regularizer (Paria et al. 2020) on soft assignments: sum_k mean_n(p_nk)^2, 1 when uniform
            soft_share = torch.softmax(-distance, dim=-1).mean(dim=0)
            flops = flops + len(codebook) * (soft_share**2).sum()
            z_q = z_q + chosen
            codes.append(code)
            residuals.append(residual.detach())
            residual = residual - chosen.detach()
        return z_q, torch.stack(codes, dim=-1), quantization, flops, residuals

    def forward(self, x: Tensor) -> RQVAEOutput:
        z = self.encoder(x)
        z_q, codes, quantization, flops, residuals = self.quantize(z)
        z_straight_through = z + (z_q - z).detach()
        x_hat = self.decoder(z_straight_through)
        reconstruction = F.mse_loss(x_hat, x)
        loss = reconstruction + quantization + self.cfg.flops_weight * flops
        return RQVAEOutput(x_hat, codes, loss, reconstruction, quantization, residuals)

    @torch.no_grad()
    def init_codebooks(self, x: Tensor) -> None:
        """Start each level's codes at residuals of real items, so none begins dead."""
        residual = self.encoder(x)
        for codebook in self.codebooks:
            codebook.copy_(residual[torch.randint(len(residual), (len(codebook),))])
            residual = residual - codebook[torch.cdist(residual, codebook).argmin(dim=-1)]

    @torch.no_grad()
    def reset_dead_codes(self, codes: Tensor, residuals: list[Tensor]) -> int:
        """Update usage averages; move codes used below the threshold onto random batch residuals."""
        K = self.cfg.codebook_size
        n_reset = 0
        for level, residual in enumerate(residuals):
            share = torch.bincount(codes[:, level], minlength=K).float() / len(codes)
            self.usage[level].mul_(self.cfg.usage_decay).add_(share, alpha=1 - self.cfg.usage_decay)
            dead = self.usage[level] < self.cfg.dead_code_threshold / K
            if dead.any():
                n_dead = int(dead.sum())
                self.codebooks[level, dead] = residual[torch.randint(len(residual), (n_dead,))]
                self.usage[level, dead] = 1.0 / K
                n_reset += n_dead
        return n_reset

    @torch.no_grad()
    def semantic_ids(self, content_emb: Tensor) -> Tensor:
        """(n_items, levels) int64 codes of each item's content embedding."""
        return self.quantize(self.encoder(content_emb))[1]


def fit(content: np.ndarray, cfg: RQVAEConfig) -> tuple[RQVAE, list[float]]:
    """Train an RQ-VAE on content embeddings (n_items, E); returns the model and its loss per step."""
    if content.ndim != 2 or content.shape[1] != cfg.input_dim:
        raise ValueError(f"content: expected (n_items, input_dim={cfg.input_dim}), got {content.shape}")
    torch.manual_seed(cfg.seed)
    x = torch.from_numpy(np.ascontiguousarray(content, dtype=np.float32))
    model = RQVAE(cfg)
    model.init_codebooks(x[torch.randperm(len(x))[: max(cfg.batch_size, cfg.codebook_size)]])
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    losses = []
    for _ in range(cfg.steps):
        out = model(x[torch.randint(len(x), (cfg.batch_size,))])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        model.reset_dead_codes(out.codes, out.residuals)
        losses.append(out.loss.item())
    return model.eval(), losses


def semantic_id_table(model: RQVAE, content: ItemContentTable) -> SemanticIdTable:
    """Semantic ids of every item in the content table, ready for ``collate(semantic_ids=...)``."""
    codes = model.semantic_ids(torch.from_numpy(content.embeddings)).numpy()
    return SemanticIdTable(codes, model.cfg.codebook_size)


# --- Stage: items parquet -> semantic ids parquet --------------------------------------------------------


class RQVAEStageConfig(BaseModel):
    """Fit an RQ-VAE on the items' content embeddings and write every item's semantic ids."""

    model_config = ConfigDict(extra="forbid")
    items_path: Path
    out_path: Path  # parquet: item_id, semantic_ids (list<int64>, one code per level)
    rqvae: RQVAEConfig = RQVAEConfig()


def write_semantic_ids(table: SemanticIdTable, out_path: Path) -> None:
    """Write atomically: a reader sees the old file or the whole new one."""
    arrow = pa.table(
        {
            "item_id": pa.array(np.arange(len(table.codes), dtype=np.int64)),
            "semantic_ids": pa.FixedSizeListArray.from_arrays(
                pa.array(table.codes.reshape(-1)), table.levels
            ),
        }
    )
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, suffix=".parquet.tmp")
    os.close(fd)
    try:
        pq.write_table(arrow, tmp)
        shutil.move(tmp, out_path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def main(cfg: RQVAEStageConfig) -> dict[str, object]:
    content = ItemContentTable.from_parquet(cfg.items_path)
    model, losses = fit(content.embeddings, cfg.rqvae)
    table = semantic_id_table(model, content)
    write_semantic_ids(table, cfg.out_path)
    distinct = len(np.unique(table.codes, axis=0))
    return {
        "items": len(table.codes),
        "distinct_ids": distinct,
        "final_loss": losses[-1],
        "out": str(cfg.out_path),
    }


if __name__ == "__main__":
    from workloads.stage import run_stage

    run_stage(RQVAEStageConfig, main)
