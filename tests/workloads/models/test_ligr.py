from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from tests.workloads.models.synthetic import (
    candidate_slice,
    content_table,
    example_rows,
    planted_batch,
    planted_slate_batch,
    random_batch,
)
from workloads.models.batch import RankingBatch, SemanticIdTable, collate, collate_sequences
from workloads.models.config import LiGRConfig, LiGRRetrievalConfig
from workloads.models.ligr import (
    ACTION,
    CANDIDATE,
    ITEM,
    SETWISE_MATCH_GAIN_INIT,
    AttentionMask,
    GatedBlock,
    LiGRForRanking,
    LiGRRetrieval,
    TokenLayout,
    relative_buckets,
)


def tiny(**overrides: object) -> LiGRConfig:
    base: dict[str, object] = dict(
        d_model=16,
        n_layers=2,
        n_heads=2,
        id_dim=8,
        max_history=16,
        max_candidates=8,
        dropout=0.0,
        item_hash_size=1009,
        actor_hash_size=101,
    )
    return LiGRConfig(**{**base, **overrides})


def model(**overrides: object) -> LiGRForRanking:
    torch.manual_seed(0)
    return LiGRForRanking(tiny(**overrides)).eval()


def clone(batch: RankingBatch) -> RankingBatch:
    """A copy whose tensors can be edited in place."""
    return dataclasses.replace(
        batch,
        **{f.name: v.clone() for f in dataclasses.fields(batch) if (v := getattr(batch, f.name)) is not None},
    )


def rows_of(batch: RankingBatch, rows: torch.Tensor) -> RankingBatch:
    return dataclasses.replace(
        batch,
        **{f.name: v[rows] for f in dataclasses.fields(batch) if (v := getattr(batch, f.name)) is not None},
    )


def test_historical_mask_follows_the_session_rules() -> None:
    # one request: events in sessions [0, 0, 1], two candidates, one padding event
    layout = TokenLayout.interleaved(
        hist_session=torch.tensor([[0, 0, 1, 0]]),
        hist_mask=torch.tensor([[True, True, True, False]]),
        cand_mask=torch.tensor([[True, True]]),
    )
    assert layout.kind[0].tolist() == [ITEM, ACTION] * 4 + [CANDIDATE] * 2
    dense = AttentionMask(layout.historical(), layout).dense()[0].int().tolist()
    #          i0 a0 i1 a1 i2 a2 pi pa c0 c1
    expected = [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],  # item 0: nothing earlier, not its own action
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],  # action 0: its item
        [0, 0, 1, 0, 0, 0, 0, 0, 0, 0],  # item 1: same session as item 0, so neither it nor its action
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],  # action 1: its session so far
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],  # item 2: the earlier session, items and actions
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 0],
        [0, 0, 0, 0, 0, 0, 1, 0, 0, 0],  # padding sees only itself (keeps softmax finite)
        [0, 0, 0, 0, 0, 0, 0, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 0, 0, 1, 0],  # candidates: the whole history, not each other
        [1, 1, 1, 1, 1, 1, 0, 0, 0, 1],
    ]
    assert dense == expected


def test_history_item_sees_only_earlier_sessions() -> None:
    batch = random_batch(seed=1, n_rows=2, hist_len=(10, 10))
    net = model(n_layers=3)
    with torch.no_grad():
        hist_states, _ = net.backbone(batch)
    sessions = batch.hist_session[0]
    event = int(torch.nonzero(sessions == sessions[5])[0])  # first event of a middle session
    same_or_later = [e for e in range(10) if sessions[e] >= sessions[event]]
    earlier = [e for e in range(10) if sessions[e] < sessions[event]]
    assert earlier and len(same_or_later) > 1, "the fixture must have sessions on both sides"

    def item_state_after(changed: RankingBatch) -> torch.Tensor:
        with torch.no_grad():
            return net.backbone(changed)[0][0, event]

    # its own outcome, its session neighbours, later sessions: nothing moves it
    for other in same_or_later:
        changed = clone(batch)
        changed.hist_actions[0, other] = 1 - batch.hist_actions[0, other]
        if other != event:
            changed.hist_item_id[0, other] = 999
            changed.hist_actor_id[0, other] = 998
            changed.hist_content[0, other] = 5.0
        torch.testing.assert_close(item_state_after(changed), hist_states[0, event])
    # an earlier session's outcome does (so the test can fail)
    changed = clone(batch)
    changed.hist_actions[0, earlier[-1]] = 1 - batch.hist_actions[0, earlier[-1]]
    assert not torch.allclose(item_state_after(changed), hist_states[0, event])


def test_pointwise_score_ignores_other_candidates_but_setwise_does_not() -> None:
    batch = random_batch(seed=2, n_rows=3, cand_len=(4, 4))
    net = model()
    with torch.no_grad():
        before = net(batch)
        other = clone(batch)
        other.cand_item_id[:, 1:] += 7
        other.cand_actor_id[:, 1:] += 3
        after = net(other)
    torch.testing.assert_close(after.pointwise_logits[:, 0], before.pointwise_logits[:, 0])
    assert before.setwise_logits is not None and after.setwise_logits is not None
    assert not torch.allclose(after.setwise_logits[:, 0], before.setwise_logits[:, 0])


@pytest.mark.parametrize("setwise_actor_match", [False, True])
def test_the_self_only_ablation_keeps_the_setwise_layer_but_not_the_set(setwise_actor_match: bool) -> None:
    batch = random_batch(seed=2, n_rows=3, cand_len=(4, 4))
    session = model(setwise_actor_match=setwise_actor_match)
    alone = model(setwise_context="self", setwise_actor_match=setwise_actor_match)
    alone.load_state_dict(session.state_dict())  # same parameters: only the mask differs
    other = clone(batch)
    other.cand_item_id[:, 1:] += 7
    other.cand_actor_id[:, 1:] = batch.cand_actor_id[:, :1]  # the others all repeat candidate 0's actor
    with torch.no_grad():
        before, after = alone(batch), alone(other)
        with_set = session(batch)
    assert before.setwise_logits is not None and after.setwise_logits is not None
    torch.testing.assert_close(after.setwise_logits[:, 0], before.setwise_logits[:, 0])
    assert with_set.setwise_logits is not None
    assert not torch.allclose(with_set.setwise_logits[:, 0], before.setwise_logits[:, 0])


def test_single_pass_scoring_equals_scoring_each_candidate_alone() -> None:
    rng = np.random.default_rng(4)
    rows = example_rows(rng, n_rows=3, hist_len=(2, 12), cand_len=(3, 6))
    content = content_table(rng)
    net = model(setwise=False)
    with torch.no_grad():
        together = net.score_pointwise(collate(rows, content))
        for i in range(3):
            for j in range(len(rows["cand_item_id"][i])):
                alone_rows = {k: v[i : i + 1] for k, v in rows.items()}
                alone_rows = {k: (_pick(v, j) if k.startswith("cand_") else v) for k, v in alone_rows.items()}
                alone = net.score_pointwise(collate(alone_rows, content))  # its own history padding, S=1
                torch.testing.assert_close(alone[0, 0], together[i, j], atol=1e-5, rtol=1e-5)


def _pick(column: np.ndarray, j: int) -> np.ndarray:
    out = np.empty(1, dtype=object)
    out[0] = column[0][j : j + 1]
    return out


@pytest.mark.parametrize("setwise_actor_match", [False, True])
def test_split_scoring_setwise_on_the_chosen_candidates_only(setwise_actor_match: bool) -> None:
    batch = random_batch(seed=5, n_rows=2, cand_len=(6, 6))
    net = model(setwise_actor_match=setwise_actor_match)
    with torch.no_grad():
        out = net(batch)
        states = net.encode(batch)
        everyone = net.score_setwise(batch, torch.arange(6).expand(2, 6), cand_states=states)
        top = torch.tensor([[4, 0, 2], [1, 5, 3]])
        chosen = net.score_setwise(batch, top)
        shown_alone = candidate_slice(batch, torch.tensor([4, 0, 2]))
        shown_alone.cand_position = torch.arange(3).expand(2, 3)  # in the order chosen
        alone = net(shown_alone)
    assert out.setwise_logits is not None and alone.setwise_logits is not None
    torch.testing.assert_close(everyone, out.setwise_logits)
    torch.testing.assert_close(out.logits, out.pointwise_logits + out.setwise_logits)
    torch.testing.assert_close(net.score_pointwise(batch, cand_states=states), out.pointwise_logits)
    # the top-k are a set of their own: same as a request that showed only them, in that order
    torch.testing.assert_close(chosen[0], alone.setwise_logits[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("slot_bias", [True, False])
def test_setwise_order_matters_only_through_the_slot_bias(slot_bias: bool) -> None:
    batch = random_batch(seed=5, n_rows=2, cand_len=(6, 6))
    net = model(setwise_slot_bias=slot_bias)
    for block in net.setwise_blocks:  # a trained bias, not the zeros it starts as
        for p in block.parameters():
            torch.nn.init.normal_(p, std=0.3)
    top = torch.tensor([[4, 0, 2], [1, 5, 3]])
    with torch.no_grad():
        chosen = net.score_setwise(batch, top)
        permuted = net.score_setwise(batch, top[:, [2, 0, 1]])
    # without the bias the set is unordered: permuting it permutes the corrections
    assert torch.allclose(permuted, chosen[:, [2, 0, 1]], atol=1e-5) != slot_bias


def test_models_without_setwise_correct_nothing() -> None:
    batch = random_batch(seed=6)
    net = model(setwise=False)
    with torch.no_grad():
        out = net(batch)
    assert out.setwise_logits is None
    torch.testing.assert_close(out.logits, out.pointwise_logits)
    assert not net.score_setwise(batch, torch.zeros((4, 2), dtype=torch.long)).any()


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
def test_attention_kernels_agree_with_the_eager_reference(impl: str) -> None:
    batch = random_batch(seed=7, n_rows=3, hist_len=(3, 12))
    reference = model(attn_impl="eager")
    other = LiGRForRanking(tiny(attn_impl=impl)).eval()
    other.load_state_dict(reference.state_dict())
    with torch.no_grad():
        expected, got = reference(batch), other(batch)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("actor_match", [False, True])
def test_attention_weights_are_what_the_layer_reads(actor_match: bool) -> None:
    """``weights`` (the analysis view) times the values is the layer's own output, masks included."""
    batch = random_batch(seed=3, n_rows=3, hist_len=(2, 12))
    net = model(actor_match=actor_match)
    captured: list[torch.Tensor] = []
    attn = net.backbone.blocks[1].attn
    attn.register_forward_hook(
        lambda module, args, out: captured.extend([*args[:1], out, module.weights(*args)])
    )
    with torch.no_grad():
        net(batch)
        x, out, weights = captured
        v = attn.heads(attn.v_proj(x))
        rebuilt = attn.o_proj((weights @ v).transpose(1, 2).reshape(x.shape))
    torch.testing.assert_close(rebuilt, out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(-1), torch.ones(weights.shape[:-1]))


def test_actor_match_adds_gain_times_the_actor_cosine_to_the_scores() -> None:
    """With the query and key projections at zero, a score is the match term alone: gain x cos(actors)."""
    batch = random_batch(seed=5, n_rows=2, hist_len=(6, 12))
    net = model(actor_match=True)
    attn = net.backbone.blocks[0].attn
    with torch.no_grad():
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        attn.match_gain.copy_(torch.tensor([0.0, 0.3]))
    captured: list[torch.Tensor] = []
    attn.register_forward_hook(lambda module, args, out: captured.append(module.weights(*args)))
    with torch.no_grad():
        net(batch)
    weights = captured[0][0]  # first row: (heads, L, L)
    H = batch.hist_item_id.shape[1]
    n = int(batch.hist_mask[0].sum())  # real events of row 0, oldest first
    actors = torch.cat([batch.hist_actor_id[0].repeat_interleave(2), batch.cand_actor_id[0]])
    m = torch.nn.functional.normalize(net.backbone.items.features["actor_id"](actors), dim=-1)
    query, keys = 2 * H, torch.arange(2 * n)  # the first candidate reads every history token
    cosine = m[keys] @ m[query]
    # head 0 (gain 0) reads evenly; head 1 in proportion to exp(3 * cosine) (gain x MATCH_GAIN_SCALE)
    torch.testing.assert_close(weights[0, query, keys], torch.full((2 * n,), float(weights[0, query, 0])))
    expected = torch.softmax(3.0 * torch.cat([cosine, (m[query] @ m[query])[None]]), dim=0)
    torch.testing.assert_close(weights[1, query, keys], expected[:-1], atol=1e-5, rtol=1e-4)


def test_actor_match_at_zero_gain_is_the_papers_attention() -> None:
    batch = random_batch(seed=7, n_rows=3, hist_len=(3, 12))
    plain, matched = model(), model(actor_match=True)
    assert set(matched.state_dict()) - set(plain.state_dict()) == {
        f"backbone.blocks.{i}.attn.match_gain" for i in range(2)
    }  # the set-wise layer reads candidates, not history: no match there
    matched.load_state_dict(plain.state_dict(), strict=False)
    for block in matched.backbone.blocks:
        torch.nn.init.zeros_(block.attn.match_gain)
    with torch.no_grad():
        torch.testing.assert_close(matched(batch).logits, plain(batch).logits, atol=1e-5, rtol=1e-5)


def test_setwise_actor_match_adds_gain_times_the_actor_cosine_for_other_candidates_only() -> None:
    """With the query and key projections at zero, a set-wise score is the match term alone: gain x
    cos(actors) towards every other candidate, 0 towards itself and towards the sink (first token)."""
    batch = random_batch(seed=5, n_rows=2, cand_len=(6, 6))
    batch.cand_actor_id[0, 3] = batch.cand_actor_id[0, 2]  # one repeat: cosine 1 between slots 2 and 3
    net = model(setwise_actor_match=True)
    attn = net.setwise_blocks[0].attn
    with torch.no_grad():
        attn.q_proj.weight.zero_()
        attn.k_proj.weight.zero_()
        attn.rel_bias.bias.zero_()
        attn.slot_match.bias[0] = 0.0  # head 0: no match; head 1: 0.3 at every slot distance
        attn.slot_match.bias[1] = 0.3
    captured: list[torch.Tensor] = []
    attn.register_forward_hook(lambda module, args, out: captured.append(module.weights(*args)))
    with torch.no_grad():
        net(batch)
    weights = captured[0][0]  # first row: (heads, 1 + S, 1 + S), the sink first
    m = torch.nn.functional.normalize(net.backbone.items.features["actor_id"](batch.cand_actor_id[0]), dim=-1)
    cosine = m @ m.T
    cosine.fill_diagonal_(0.0)  # a candidate's own actor adds nothing
    S = m.shape[0]
    torch.testing.assert_close(weights[0, 1:, :], torch.full((S, S + 1), 1.0 / (S + 1)))  # gain 0: even
    expected = torch.softmax(3.0 * torch.nn.functional.pad(cosine, (1, 0)), dim=-1)  # gain x SCALE = 3
    torch.testing.assert_close(weights[1, 1:, :], expected, atol=1e-5, rtol=1e-4)
    assert weights[1, 4, 3] > 0.5 > weights[1, 3, 0]  # candidate 3 reads its repeat; 2 hardly the sink


def test_setwise_actor_match_starts_with_the_gain_on_candidates_within_two_slots_only() -> None:
    """The rule set-wise attention replaced is "two items between posts of one actor" (3.2)."""
    gains = model(setwise_actor_match=True).setwise_blocks[0].attn.slot_match
    distance = torch.arange(-6, 7)
    start = gains(distance[None])[0, :, 6, :]  # (heads, 13): from slot 6 to slots 0..12
    near = distance.abs().le(2) & distance.ne(0)
    assert (start[:, near] == SETWISE_MATCH_GAIN_INIT).all() and (start[:, ~near] == 0).all()


def test_setwise_actor_match_needs_the_candidates_actors() -> None:
    net = model(setwise_actor_match=True)
    with pytest.raises(ValueError, match="setwise_actor_match needs the candidates' actor_ids"):
        net.setwise_correction(torch.zeros(2, 3, 16), torch.ones(2, 3, dtype=torch.bool))


@pytest.mark.parametrize("impl", ["sdpa", "flex"])
@pytest.mark.parametrize("where", ["history", "setwise"])
def test_actor_match_kernels_agree_with_the_eager_reference(impl: str, where: str) -> None:
    batch = random_batch(seed=7, n_rows=3, hist_len=(3, 12))
    match = {"actor_match": True} if where == "history" else {"setwise_actor_match": True}
    reference = model(attn_impl="eager", **match)
    other = LiGRForRanking(tiny(attn_impl=impl, **match)).eval()
    other.load_state_dict(reference.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(other(batch).logits, reference(batch).logits, atol=1e-5, rtol=1e-5)


needs_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def assert_same_logits_and_gradients(
    reference: LiGRForRanking, other: LiGRForRanking, batch: RankingBatch
) -> None:
    """`other`, given `reference`'s weights, computes the same logits and every same gradient."""
    other.load_state_dict(reference.state_dict())
    expected, got = reference(batch), other(batch)
    torch.testing.assert_close(got.logits, expected.logits, atol=1e-4, rtol=1e-4)
    assert expected.loss is not None and got.loss is not None
    expected.loss.backward()
    got.loss.backward()
    for (name, want), have in zip(reference.named_parameters(), other.parameters(), strict=True):
        if want.grad is None:
            assert have.grad is None, name
        else:
            torch.testing.assert_close(have.grad, want.grad, atol=1e-4, rtol=1e-3, msg=name)


@needs_gpu
@pytest.mark.parametrize("head_dim", [8, 16, 128])
def test_compiled_flex_attention_on_gpu_matches_eager_in_value_and_gradient(head_dim: int) -> None:
    """On a GPU ``auto`` trains with compiled FlexAttention: same logits and gradients as the reference.

    Head dim 8 is below what the Triton kernels accept (dense fallback); 128 needs smaller backward tiles.
    """
    batch = random_batch(seed=7, n_rows=3, hist_len=(3, 12)).to("cuda")
    torch.manual_seed(0)
    reference = LiGRForRanking(tiny(attn_impl="eager", d_model=2 * head_dim)).cuda().train()
    flex = LiGRForRanking(tiny(attn_impl="auto", d_model=2 * head_dim)).cuda().train()
    assert_same_logits_and_gradients(reference, flex, batch)


@needs_gpu
@pytest.mark.parametrize("d_model", [32, 64])
def test_actor_match_with_compiled_flex_on_gpu_matches_eager_in_value_and_gradient(d_model: int) -> None:
    """actor_match widens q and k past v (head dim + actor embedding): compiled FlexAttention must take it.

    64 x 2 heads is the configuration of the history experiments (docs/models.md, claim 3).
    """
    batch = random_batch(seed=7, n_rows=3, hist_len=(3, 12)).to("cuda")
    torch.manual_seed(0)
    reference = LiGRForRanking(tiny(attn_impl="eager", d_model=d_model, actor_match=True)).cuda().train()
    flex = LiGRForRanking(tiny(attn_impl="auto", d_model=d_model, actor_match=True)).cuda().train()
    assert_same_logits_and_gradients(reference, flex, batch)


@needs_gpu
def test_flex_attention_trains_in_bf16_at_head_dim_128_on_gpu() -> None:
    """The shape that failed to compile with the default backward tiles on an H100 (d_model 256, 2 heads)."""
    batch = random_batch(seed=7, n_rows=3, hist_len=(3, 12)).to("cuda")
    net = LiGRForRanking(tiny(attn_impl="flex", d_model=256)).cuda().train()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = net(batch)
    assert out.loss is not None
    out.loss.backward()
    assert all(p.grad is not None and p.grad.isfinite().all() for p in net.backbone.blocks.parameters())


def test_flex_config_still_trains_on_cpu() -> None:
    """CPU FlexAttention has no backward in torch 2.13; training falls back to the dense kernel."""
    net = LiGRForRanking(tiny(attn_impl="flex"))
    out = net(random_batch(seed=8))
    assert out.loss is not None
    out.loss.backward()
    assert all(p.grad is not None for p in net.backbone.blocks.parameters())


def test_gates_read_the_unnormalized_residual_stream() -> None:
    torch.manual_seed(0)
    block = GatedBlock(d_model=8, n_heads=2, ffn_mult=2, dropout=0.0, attn_impl="eager")
    h = torch.randn(2, 5, 8) * 3 + 1
    layout = TokenLayout.one_session(torch.ones(2, 5, dtype=torch.bool))
    mask = AttentionMask(layout.in_session(), layout)
    seen: list[torch.Tensor] = []
    block.attn_gate.register_forward_hook(lambda _m, args, out: seen.extend([args[0], out]))
    out = block(h, mask)
    assert out.shape == h.shape
    gate_input, gate_output = seen
    torch.testing.assert_close(gate_input, h)  # sigmoid(h W), not sigmoid(LN(h) W)
    assert gate_output.shape == (2, 5, 8)  # one gate per channel
    # h <- h + F(LN(h)) * sigmoid(h W), twice
    mid = h + block.attn(block.attn_norm(h), mask) * torch.sigmoid(block.attn_gate(h))
    expected = mid + block.ffn(block.ffn_norm(mid)) * torch.sigmoid(block.ffn_gate(mid))
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("feature", ["item_id", "actor_id", "post_type", "age_bucket"])
def test_feature_ablation_drops_exactly_that_feature(feature: str) -> None:
    batch = random_batch(seed=9)
    field = f"cand_{feature}"
    changed = dataclasses.replace(batch, **{field: (getattr(batch, field) + 1) % 5})
    with_feature = model()
    without = model(
        use_features=frozenset({"item_id", "actor_id", "post_type", "age_bucket", "content"} - {feature})
    )
    with torch.no_grad():
        assert not torch.allclose(with_feature.score_pointwise(changed), with_feature.score_pointwise(batch))
        torch.testing.assert_close(without.score_pointwise(changed), without.score_pointwise(batch))


def test_semantic_ids_are_a_token_feature() -> None:
    rng = np.random.default_rng(10)
    rows, content = example_rows(rng, 4), content_table(rng)
    table = SemanticIdTable(rng.integers(0, 16, (100, 3)), 16)
    net = model(use_semantic_ids=True, sid_codebook_size=16, use_features=frozenset({"content"}))
    with torch.no_grad():
        base = net.score_pointwise(collate(rows, content, semantic_ids=table))
        other = SemanticIdTable((table.codes + 1) % 16, 16)
        assert not torch.allclose(net.score_pointwise(collate(rows, content, semantic_ids=other)), base)
    with pytest.raises(ValueError, match="semantic_ids"):
        net(collate(rows, content))


def test_batches_longer_than_the_config_are_refused() -> None:
    with pytest.raises(ValueError, match="max_history"):
        model(max_history=4)(random_batch(seed=11, hist_len=(8, 8)))


def test_learns_a_signal_that_only_the_history_reveals() -> None:
    """Candidates are positive iff by the member's favourite actor, shown only by history actions."""
    rng = np.random.default_rng(12)
    torch.manual_seed(0)
    cfg = tiny(d_model=32, setwise=False, use_features=frozenset({"actor_id"}), lr_dense=0.003)
    net = LiGRForRanking(cfg)
    optimizer = torch.optim.AdamW(net.param_groups())
    losses = []
    for _ in range(300):  # at 200 AUC was 0.89-0.95 by the CPU's float kernels; 300 gives 0.98+
        out = net(planted_batch(rng, 64))
        assert out.loss is not None
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.loss.item())
    test = planted_batch(rng, 128)
    with torch.no_grad():
        scores = net.eval().score_pointwise(test)
    assert test.labels is not None
    auc = roc_auc_score(test.labels[..., 0].flatten().numpy(), scores[..., 0].flatten().numpy())
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])  # BCE and listwise terms have floors
    assert auc > 0.9, auc


def test_relative_buckets_are_exact_near_zero_and_signed() -> None:
    distance = torch.tensor([-3, -2, -1, 0, 1, 2, 3, 50, 500])
    buckets = relative_buckets(distance, 16).tolist()
    assert buckets[:7] == [3, 2, 1, 0, 9, 10, 11]  # one bucket per slot near the query, by side
    assert 11 < buckets[7] <= buckets[8] == 15  # far keys share log-spaced buckets


def test_setwise_learns_what_only_the_slate_order_reveals() -> None:
    """A post right below one of the same actor is skipped: pointwise is at chance, set-wise is not."""
    rng = np.random.default_rng(14)
    torch.manual_seed(0)
    cfg = tiny(d_model=32, n_layers=1, use_features=frozenset({"actor_id"}), lr_dense=0.005)
    net = LiGRForRanking(cfg)
    optimizer = torch.optim.AdamW(net.param_groups())
    for _ in range(120):
        out = net(planted_slate_batch(rng, 64))
        assert out.loss is not None
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    test = planted_slate_batch(rng, 128)
    with torch.no_grad():
        out = net.eval()(test)
    assert test.labels is not None
    labels = test.labels[..., 0].flatten().numpy()
    assert roc_auc_score(labels, out.logits[..., 0].flatten().numpy()) > 0.9
    assert roc_auc_score(labels, out.pointwise_logits[..., 0].flatten().numpy()) < 0.65


# --- retrieval -----------------------------------------------------------------------------------------


def retrieval(**overrides: object) -> LiGRRetrieval:
    torch.manual_seed(0)
    cfg = LiGRRetrievalConfig(
        **{**dict(d_model=32, n_heads=2, max_len=12, dropout=0.0, item_hash_size=1009), **overrides}
    )
    return LiGRRetrieval(cfg)


@pytest.mark.parametrize("interleave", [True, False])
def test_retrieval_user_state_reads_only_the_past(interleave: bool) -> None:
    net = retrieval(interleave_actions=interleave).eval()
    seqs = [np.array([3, 9, 4, 7, 1, 8]), np.array([5, 2, 6])]
    acts = [np.array([1, 0, 2, 1, 0, 3]), np.array([1, 1, 0])]
    with torch.no_grad():
        items, users = net.member_states(collate_sequences(seqs, actions=acts))
        changed = [np.array([3, 9, 4, 70, 10, 80]), seqs[1]]
        changed_acts = [np.array([1, 0, 2, 9, 9, 9]), acts[1]]
        items2, users2 = net.member_states(collate_sequences(changed, actions=changed_acts))
    torch.testing.assert_close(users2[0, :3], users[0, :3])
    torch.testing.assert_close(items2[0, :3], items[0, :3])
    assert not torch.allclose(users2[0, 3], users[0, 3])
    if interleave:  # an item's state never includes its own action
        own = [seqs[0], seqs[1]]
        own_acts = [np.array([1, 0, 2, 1, 0, 3]), np.array([1, 1, 5])]
        with torch.no_grad():
            items3, _ = net.member_states(collate_sequences(own, actions=own_acts))
        torch.testing.assert_close(items3[1, 2], items[1, 2])


def test_retrieval_learns_next_item_and_ranks_the_catalog() -> None:
    """Sequences walk the catalog one id at a time; the next item is then fully predictable."""
    rng = np.random.default_rng(13)
    net = retrieval()
    optimizer = torch.optim.AdamW(net.param_groups())
    catalog = torch.arange(40)

    def walks(n: int) -> list[np.ndarray]:
        return [(rng.integers(0, 40) + np.arange(10)) % 40 for _ in range(n)]

    for _ in range(120):
        batch = collate_sequences(walks(32), actions=[np.ones(10, dtype=np.int64)] * 32)
        loss = net.loss(batch, candidate_ids=catalog)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    test = walks(50)
    with torch.no_grad():
        users = net.eval().user_embedding(
            collate_sequences([s[:-1] for s in test], actions=[np.ones(9, dtype=np.int64)] * 50)
        )
        scores = users @ net.item_embedding(catalog).T
    hits = (scores.topk(10, dim=1).indices == torch.tensor([s[-1] for s in test])[:, None]).any(dim=1)
    assert hits.float().mean() > 0.8
    with pytest.raises(ValueError, match="candidate_ids"):
        batch = collate_sequences(walks(2), actions=[np.ones(10, dtype=np.int64)] * 2)
        net.loss(batch, candidate_ids=torch.arange(3))


def test_retrieval_with_action_tokens_refuses_sequences_without_actions() -> None:
    """Zeros in place of missing outcomes would train and score a different model than the data's."""
    sequences = collate_sequences([np.array([3, 9, 4]), np.array([5, 2])])
    with pytest.raises(ValueError, match=r"batch\.actions"):
        retrieval(interleave_actions=True).member_states(sequences)
    _, users = retrieval(interleave_actions=False).member_states(sequences)
    assert users.shape[:2] == (2, 3)


def test_candidate_counters_reach_only_the_candidate_they_belong_to() -> None:
    """A counter named in candidate_counters moves its own candidate's score and no other's; without
    candidate_counters the counters are ignored (the 5-feature LiGR never reads them)."""
    batch = random_batch(5, n_rows=2, cand_len=(3, 6))
    changed = clone(batch)
    changed.cand_counters[0, 1] += 50.0  # every counter of candidate 1 of row 0
    with torch.no_grad():
        reads = model(candidate_counters=("item_ctr_7d",))
        before, after = reads(batch).logits, reads(changed).logits
        ignores = model()
        torch.testing.assert_close(ignores(batch).logits, ignores(changed).logits)
    assert not torch.allclose(before[0, 1], after[0, 1])
    pointwise_before, pointwise_after = reads(batch).pointwise_logits, reads(changed).pointwise_logits
    torch.testing.assert_close(pointwise_after[0, [0, 2]], pointwise_before[0, [0, 2]])
    torch.testing.assert_close(after[1], before[1])
    with pytest.raises(ValueError, match="candidate_counters"):
        tiny(candidate_counters=("clicks_forever",))


def test_config_json_lists_features_in_one_order() -> None:
    """use_features is a set; its JSON must not follow the process's string hash order, or equal configs
    would get different artifact contents and experiment cache keys from run to run."""
    features = frozenset({"post_type", "item_id", "content", "actor_id"})
    dumped = tiny(use_features=features).model_dump(mode="json")
    assert dumped["use_features"] == ["actor_id", "content", "item_id", "post_type"]
    assert LiGRConfig.model_validate(dumped) == tiny(use_features=frozenset(dumped["use_features"]))


@pytest.mark.parametrize("kind", ["ligr", "hstu", "dcnv2"])
def test_dlrm_init_starts_hashed_id_rows_near_zero(kind: str) -> None:
    from workloads.models.ligr import HashedEmbedding
    from workloads.models.registry import build_model, parse_model_config

    cfg = {"kind": kind, "d_model": 32, "n_heads": 2} if kind != "dcnv2" else {"kind": "dcnv2"}
    unit = build_model(parse_model_config(cfg))
    dlrm = build_model(parse_model_config({**cfg, "hashed_id_init": "dlrm"}))
    tables = [(name, m) for name, m in dlrm.named_modules() if isinstance(m, HashedEmbedding)]
    assert tables
    for name, table in tables:
        assert table.table.weight.abs().max() <= table.size**-0.5
        assert unit.get_submodule(name).table.weight.norm(dim=-1).mean() > 0.5  # unit rows by default
