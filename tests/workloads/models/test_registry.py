from __future__ import annotations

from typing import Any

import pytest
import torch
from pydantic import BaseModel, ValidationError

from tests.workloads.models.synthetic import random_batch
from workloads.models.dcnv2 import DCNv2ForRanking
from workloads.models.hstu import HSTUForRanking
from workloads.models.ligr import LiGRForRanking, LiGRRetrieval
from workloads.models.registry import (
    DCNv2Config,
    HSTUConfig,
    LiGRConfig,
    LiGRRetrievalConfig,
    ModelConfig,
    SASRecConfig,
    build_model,
    build_retrieval_model,
    dense_params,
    equal_size_hstu,
    parse_model_config,
    parse_retrieval_config,
)
from workloads.models.sasrec import SASRec


def error_locations(raw: dict[str, Any]) -> list[tuple[int | str, ...]]:
    with pytest.raises(ValidationError) as err:
        parse_model_config(raw)
    return [e["loc"] for e in err.value.errors()]


@pytest.mark.parametrize(
    ("raw", "field"),
    [
        ({"kind": "ligr", "d_model": 0}, "d_model"),
        ({"kind": "ligr", "n_layers": -2}, "n_layers"),
        ({"kind": "ligr", "d_model": 64, "n_heads": 3}, "n_heads"),
        ({"kind": "hstu", "d_model": 30, "n_heads": 4}, "n_heads"),
        ({"kind": "ligr", "max_history": 600, "max_candidates": 10, "max_tokens": 1024}, "max_tokens"),
        ({"kind": "ligr", "dropout": 1.5}, "dropout"),
        ({"kind": "ligr", "use_features": ["item_id", "colour"]}, "use_features"),
        ({"kind": "ligr", "item_hash_size": 0}, "item_hash_size"),
        ({"kind": "ligr", "lr_embedding": -0.01}, "lr_embedding"),
        ({"kind": "ligr", "attention_rank_loss_weight": -1}, "attention_rank_loss_weight"),
        ({"kind": "ligr", "attn_impl": "flash"}, "attn_impl"),
        ({"kind": "ligr", "n_layer": 2}, "n_layer"),  # a typo is an error, not a silent default
        ({"kind": "dcnv2", "mlp_dims": [64, 0]}, "mlp_dims"),
        ({"kind": "dcnv2", "n_cross_layers": 0}, "n_cross_layers"),
    ],
)
def test_nonsense_is_rejected_naming_the_field(raw: dict[str, Any], field: str) -> None:
    locations = error_locations(raw)
    assert any(field in loc for loc in locations), locations


def test_an_item_token_needs_a_feature() -> None:
    with pytest.raises(ValidationError, match="use_features"):
        LiGRConfig(use_features=frozenset())
    LiGRConfig(use_features=frozenset(), use_semantic_ids=True)  # semantic ids alone are a feature


def test_message_says_what_was_expected() -> None:
    with pytest.raises(ValidationError, match=r"n_heads=3 must divide d_model=64"):
        LiGRConfig(d_model=64, n_heads=3)
    with pytest.raises(ValidationError, match=r"1210 tokens exceeds max_tokens=1024"):
        LiGRConfig(max_history=600, max_candidates=10)
    with pytest.raises(ValidationError, match="n_heads"):
        LiGRRetrievalConfig(d_model=10, n_heads=4)
    with pytest.raises(ValidationError, match="max_tokens"):
        LiGRRetrievalConfig(max_len=600)
    with pytest.raises(ValidationError, match="n_heads"):
        SASRecConfig(d_model=10, n_heads=3)


def test_actor_match_needs_the_actor_feature_and_ligr_attention() -> None:
    with pytest.raises(ValidationError, match=r"actor_match: .* use_features must include actor_id"):
        LiGRConfig(actor_match=True, use_features=frozenset({"post_type", "content"}))
    with pytest.raises(
        ValidationError, match="actor_match: only LiGR's attention implements it, not HSTUConfig"
    ):
        HSTUConfig(actor_match=True)
    assert not equal_size_hstu(
        LiGRConfig(actor_match=True)
    ).actor_match  # the HSTU twin keeps plain attention


def test_setwise_actor_match_needs_the_setwise_layer_the_actor_feature_and_ligr_attention() -> None:
    needs = r"setwise_actor_match: needs setwise: true and actor_id among use_features"
    with pytest.raises(ValidationError, match=needs):
        LiGRConfig(setwise_actor_match=True, setwise=False)
    with pytest.raises(ValidationError, match=needs):
        LiGRConfig(setwise_actor_match=True, use_features=frozenset({"post_type", "content"}))
    with pytest.raises(ValidationError, match="setwise_actor_match: only LiGR's attention implements it"):
        HSTUConfig(setwise_actor_match=True)
    assert not equal_size_hstu(LiGRConfig(setwise_actor_match=True)).setwise_actor_match


def test_kind_picks_the_config_and_the_model() -> None:
    class Train(BaseModel):
        model: ModelConfig

    expected = {"ligr": LiGRForRanking, "hstu": HSTUForRanking, "dcnv2": DCNv2ForRanking}
    for kind, cls in expected.items():
        cfg = Train.model_validate({"model": {"kind": kind}}).model
        assert isinstance(build_model(cfg), cls)
        assert parse_model_config(cfg.model_dump()) == cfg  # round-trips through plain data
    assert isinstance(build_retrieval_model(parse_retrieval_config({"kind": "sasrec"})), SASRec)
    assert isinstance(
        build_retrieval_model(parse_retrieval_config({"kind": "ligr_retrieval"})), LiGRRetrieval
    )
    with pytest.raises(ValidationError, match="kind"):
        parse_model_config({"kind": "sasrec"})


@pytest.mark.parametrize(
    "cfg",
    [
        LiGRConfig(d_model=16, max_history=16, max_candidates=8),
        HSTUConfig(d_model=16, max_history=16, max_candidates=8),
        DCNv2Config(mlp_dims=(16,)),
    ],
)
def test_param_groups_split_embedding_tables_from_dense_layers(
    cfg: LiGRConfig | HSTUConfig | DCNv2Config,
) -> None:
    model = build_model(cfg)
    groups = model.param_groups()
    by_name = {g["name"]: g for g in groups}
    assert by_name["embedding"]["lr"] == 0.01 and by_name["dense"]["lr"] == 0.001
    embedding_ids = {id(p) for p in by_name["embedding"]["params"]}
    tables = [m.weight for m in model.modules() if isinstance(m, torch.nn.Embedding)]
    assert tables and embedding_ids == {id(t) for t in tables}
    everything = [id(p) for g in groups for p in g["params"]]
    assert sorted(everything) == sorted(id(p) for p in model.parameters())  # each exactly once
    custom = model.param_groups(cfg.model_copy(update={"lr_embedding": 0.05, "lr_dense": 0.002}))
    assert [g["lr"] for g in custom] == [0.05, 0.002]
    optimizer = torch.optim.AdamW(groups)
    out = model(random_batch(seed=0))
    assert out.loss is not None
    out.loss.backward()
    optimizer.step()
    assert [g["lr"] for g in optimizer.param_groups] == [0.01, 0.001]


def test_equal_size_hstu_is_the_depth_closest_to_ligr_in_dense_parameters() -> None:
    ligr = LiGRConfig(d_model=32, n_layers=2, n_heads=2, max_history=16, max_candidates=8)
    hstu = equal_size_hstu(ligr)
    target = dense_params(build_model(ligr))

    def gap(n_layers: int) -> int:
        return abs(dense_params(build_model(hstu.model_copy(update={"n_layers": n_layers}))) - target)

    assert (hstu.d_model, hstu.n_heads, hstu.max_history) == (ligr.d_model, ligr.n_heads, ligr.max_history)
    assert hstu.n_layers > ligr.n_layers  # an HSTU layer has fewer weights than a gated LiGR block
    assert gap(hstu.n_layers) <= min(gap(hstu.n_layers - 1), gap(hstu.n_layers + 1))
    assert gap(hstu.n_layers) < 0.1 * target


def test_dense_params_leave_out_the_embedding_tables() -> None:
    model = build_model(LiGRConfig(d_model=32, n_layers=2, n_heads=2, max_history=16, max_candidates=8))
    tables = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding))
    assert tables > 0
    assert dense_params(model) == sum(p.numel() for p in model.parameters()) - tables
