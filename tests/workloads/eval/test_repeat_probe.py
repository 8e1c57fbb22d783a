from __future__ import annotations

import numpy as np

from workloads.eval.repeat_probe import RepeatProbeConfig, planted_slates, run


def test_planted_slates_mark_repeats_of_the_slot_above_and_punish_only_those() -> None:
    cfg = RepeatProbeConfig(burst_rate=0.5, penalty=50.0, base=3.0, actors=1000, slate=6)
    batch, repeated = planted_slates(cfg, np.random.default_rng(0), 400)
    actors = batch.cand_actor_id.numpy()
    np.testing.assert_array_equal(repeated[:, 1:], actors[:, 1:] == actors[:, :-1])
    assert not repeated[:, 0].any() and 0.4 < repeated[:, 1:].mean() < 0.6
    assert batch.labels is not None
    engaged = batch.labels[..., 0].numpy() > 0
    assert not engaged[repeated].any()  # a 50-logit penalty: repeats are never engaged with
    assert engaged[~repeated].mean() > 0.8  # the others mostly are (base +3)


def test_every_variant_reports_aucs_and_the_response_at_each_checkpoint() -> None:
    cfg = RepeatProbeConfig(steps=4, every=2, test_sessions=40, batch_size=8, d_model=16)
    rows = run(cfg)
    assert [(r["variant"], r["step"]) for r in rows] == [
        (variant, step) for variant in ("plain", "actor_match", "self_only") for step in (2, 4)
    ]
    assert all(0 <= r["auc"] <= 1 and np.isfinite(r["response"]) for r in rows)
