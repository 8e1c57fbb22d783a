import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.workloads.eval.test_evaluate import publish
from workloads.eval.attention_probe import AttentionProbeConfig, _Sums, add_batch, run
from workloads.models.config import DCNv2Config, LiGRConfig
from workloads.models.registry import build_model
from workloads.train.artifact import feature_spec, save_artifact


def test_the_shares_of_a_hand_built_attention() -> None:
    """Events by actors 5, 7, 5 (oldest first); candidates by 5 and 9. Candidate 0 reads only actor 5's
    four tokens, evenly; candidate 1 has no event of its actor and is not counted."""
    batch = SimpleNamespace(
        hist_item_id=torch.zeros((1, 3), dtype=torch.long),
        hist_actor_id=torch.tensor([[5, 7, 5]]),
        hist_mask=torch.tensor([[True, True, True]]),
        cand_actor_id=torch.tensor([[5, 9]]),
        cand_mask=torch.tensor([[True, True]]),
    )
    weights = torch.zeros((1, 1, 8, 8))  # 6 history tokens (item, action per event), then 2 candidates
    weights[0, 0, 6, [0, 1, 4, 5]] = 0.25
    weights[0, 0, 7, :6] = 1 / 6
    sums = [_Sums(n_heads=1)]
    add_batch(sums, [weights], batch, old_after=1)  # type: ignore[arg-type]
    row = sums[0].row(0)
    assert row["candidates"] == 1 and row["candidates_with_own_actor"] == 0.5
    assert row["own_actor_attention"] == 1.0 and row["own_actor_tokens"] == round(4 / 6, 4)
    assert row["lift"] == 1.5 and row["lift_by_head"] == [1.5]
    # old_after=1: only the latest event is recent; half of actor 5's tokens are old, and half the attention
    assert row["own_actor_tokens_old"] == 0.5 and row["own_actor_attention_old"] == 0.5
    assert row["history_mass"] == 1.0


def test_attention_that_ignores_the_actor_has_lift_one(
    tmp_path: Path, tiny_world: Path, tiny_examples: Path
) -> None:
    """Zero query and key projections: every candidate reads its history evenly, whatever the actor."""
    cfg = LiGRConfig(d_model=16, n_heads=2, n_layers=2, id_dim=8)
    torch.manual_seed(0)
    model = build_model(cfg)
    for name, param in model.named_parameters():
        if name.endswith(("attn.q_proj.weight", "attn.k_proj.weight")):
            torch.nn.init.zeros_(param)
    spec = feature_spec(cfg, str(tiny_world / "items.parquet"), None)
    artifact = save_artifact(
        tmp_path / "ligr" / "v1", model.state_dict(), cfg, name="ligr", version=1, feature_spec=spec
    )
    output = tmp_path / "probe.json"
    rows = run(AttentionProbeConfig(artifact=artifact, examples_dir=tiny_examples, output=output))
    assert [row["layer"] for row in rows] == [0, 1] and json.loads(output.read_text()) == rows
    for row in rows:
        assert row["candidates"] > 20 and 0 < row["own_actor_tokens"] < 1
        assert row["lift"] == pytest.approx(1.0, abs=2e-3) and row["lift_by_head"] == [row["lift"]] * 2
        # a candidate reads the history and itself: 2n history tokens of 2n + 1
        assert 0.5 < row["history_mass"] < 1


def test_only_a_ligr_artifact_is_probed(tmp_path: Path, tiny_world: Path, tiny_examples: Path) -> None:
    dcn = publish(tmp_path, "dcn", DCNv2Config(id_dim=8, mlp_dims=(16,)), tiny_world)
    with pytest.raises(ValueError, match="is not a LiGR ranker"):
        run(AttentionProbeConfig(artifact=dcn, examples_dir=tiny_examples))
