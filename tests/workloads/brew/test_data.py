"""Examples from the world's tables: point-in-time histories, labels from the log, the shared time split."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from workloads.brew.data import (
    MAX_HISTORY_EVENTS,
    BrewExample,
    Periods,
    TimeSplit,
    World,
    author_in_prompt_scores,
    follow_examples,
    impression_examples,
    popularity_scores,
    resolve_periods,
)
from workloads.brew.prompts import Templates
from workloads.data.window import PreprocessConfig, resolve_window


def test_periods_are_the_preprocessing_split(tiny_world: Path, periods: Periods) -> None:
    import pyarrow.dataset as pads

    window = resolve_window(
        PreprocessConfig(world_dir=tiny_world), pads.dataset(tiny_world / "impressions.parquet")
    )
    assert (periods.train_start, periods.eval_start, periods.eval_end) == (
        window.train_start,
        window.train_end,
        window.eval_end,
    )
    shorter = resolve_periods(tiny_world, TimeSplit(train_end=-14.0))
    assert shorter.eval_start == periods.eval_start - 7 * 86_400 * 10**6


def test_impression_examples_are_point_in_time_and_labelled_from_the_log(
    world: World, templates: Templates, unacted_templates: Templates, periods: Periods
) -> None:
    imp = world.impressions
    cases = [("job_apply", templates), ("feed_like", templates), ("feed_like", unacted_templates)]
    for task, variant in cases:
        spec = variant.task(task)
        examples = impression_examples(world, variant, task, periods.eval_start, periods.eval_end, 60, seed=0)
        assert examples
        for ex in examples:
            assert periods.eval_start <= ex.at < periods.eval_end
            shown = imp[
                (imp.member_id == ex.member_id)
                & (imp.item_id == ex.question_id)
                & (imp.session_start == ex.at)
            ]
            assert len(shown) >= 1 and shown.iloc[0]["surface"] == spec.surface
            assert ex.label == int(shown[spec.label_action].max())
            # History: only the surface's events strictly before the session start that a group shows;
            # history_len counts the interactions among them.
            past = imp[(imp.member_id == ex.member_id) & (imp.timestamp < ex.at)]
            past = past[past.surface == spec.surface]
            shown = past[spec.in_history(past.actions.to_numpy())]
            assert ex.history_len == int(((past.actions & spec.history_mask) != 0).sum())
            assert ex.history_items.tolist() == shown.item_id.tolist()[-MAX_HISTORY_EVENTS:]
            assert np.all(spec.in_history(ex.history_actions))
            if spec.shows_unacted:
                assert len(shown) > ex.history_len  # unacted impressions are there too


def test_positive_fraction_oversamples_rare_labels(
    world: World, templates: Templates, periods: Periods
) -> None:
    natural = impression_examples(
        world, templates, "feed_like", periods.train_start, periods.eval_start, 200, 0
    )
    balanced = impression_examples(
        world, templates, "feed_like", periods.train_start, periods.eval_start, 200, 0, 0.5
    )
    assert np.mean([e.label for e in natural]) < 0.2
    assert abs(np.mean([e.label for e in balanced]) - 0.5) < 0.05


def test_session_pairs_share_member_time_and_history_so_only_the_question_differs(
    world: World, templates: Templates, periods: Periods
) -> None:
    pairs = impression_examples(
        world, templates, "feed_like", periods.train_start, periods.eval_start, 60, 0, session_pairs=True
    )
    assert 0 < len(pairs) <= 60 and len(pairs) % 2 == 0
    imp = world.impressions.set_index(["member_id", "session_start", "item_id"])
    sessions: dict[tuple[int, int], list[int]] = {}
    for ex in pairs:
        sessions.setdefault((ex.member_id, ex.at), []).append(ex.label)
        row = imp.loc[(ex.member_id, ex.at, ex.question_id)]
        assert int(np.atleast_1d(row["like"])[0]) == ex.label  # labelled from the log
    assert all(sorted(labels) == [0, 1] for labels in sessions.values())  # one pair per session
    by_session: dict[tuple[int, int], list[list[int]]] = {}
    for ex in pairs:
        by_session.setdefault((ex.member_id, ex.at), []).append(ex.history_items.tolist())
    assert all(a == b for a, b in by_session.values())  # the same history on both sides
    again = impression_examples(
        world, templates, "feed_like", periods.train_start, periods.eval_start, 60, 0, session_pairs=True
    )
    assert [(e.member_id, e.question_id) for e in again] == [(e.member_id, e.question_id) for e in pairs]
    with pytest.raises(ValueError, match="positive_fraction must be None"):
        impression_examples(
            world, templates, "feed_like", periods.train_start, periods.eval_start, 60, 0, 0.4, True
        )


def test_follow_examples_and_popularity_never_see_the_members_own_follow(
    world: World, templates: Templates, periods: Periods
) -> None:
    examples = follow_examples(
        world, templates, "follow_actor", periods.eval_start, periods.eval_end, 40, seed=0
    )
    assert len(examples) == 40 and sum(e.label for e in examples) == 20
    follows = world.follows[world.follows.created_at < periods.eval_start]
    pairs = set(zip(follows.member_id, follows.actor_id, strict=True))
    for ex in examples:
        assert ex.label == int((ex.member_id, ex.question_id) in pairs)
    scores = popularity_scores(world, templates, examples, periods.eval_start)
    followers = follows.groupby("actor_id").member_id.nunique()
    for ex, score in zip(examples, scores, strict=True):
        assert score == followers.get(ex.question_id, 0) - ex.label


def test_author_in_prompt_counts_only_the_interactions_the_prompt_shows(
    world: World, unacted_templates: Templates, periods: Periods
) -> None:
    templates = unacted_templates  # a history with an unacted group capped by max_items
    follows = follow_examples(world, templates, "follow_actor", periods.eval_start, periods.eval_end, 40, 0)
    likes = impression_examples(world, templates, "feed_like", periods.eval_start, periods.eval_end, 40, 0)
    examples = follows + likes
    authors = world.items["actor_id"]

    def shown_history(ex: BrewExample) -> list[int]:
        """Every interaction and the newest `max_items` unacted impressions (the feed's `none` group)."""
        spec = templates.task(ex.task)
        cap = next(g.max_items for g in spec.history_groups if g.action == "none")
        assert cap is not None
        keep = (ex.history_actions & spec.history_mask) != 0
        keep[np.flatnonzero(~keep)[-cap:]] = True
        return ex.history_items[keep].tolist()

    histories = [shown_history(e) for e in examples]
    assert any(len(h) < len(e.history_items) for h, e in zip(histories, examples, strict=True))
    everything = np.array([len(h) for h in histories])
    last_two = np.minimum(everything, 2)
    for used in (everything, last_two):
        scores = author_in_prompt_scores(world, templates, examples, used)
        for ex, history, shown, score in zip(examples, histories, used, scores, strict=True):
            question_author = ex.question_id if ex.task == "follow_actor" else authors[ex.question_id]
            visible = history[len(history) - shown :] if shown else []
            assert score == sum(authors[i] == question_author for i in visible)
    assert author_in_prompt_scores(world, templates, examples, np.zeros(len(examples), int)).sum() == 0
    # the fixture world must exercise the count: some prompt shows the question's author
    assert author_in_prompt_scores(world, templates, examples, everything).max() > 0
