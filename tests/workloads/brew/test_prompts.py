"""The verbalizer: Table 1 layout (golden prompts), most-recent-first truncation to an exact token budget."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from pydantic import ValidationError
from transformers import PreTrainedTokenizerBase

from workloads.brew.model import answer_token_ids, load_tokenizer
from workloads.brew.prompts import (
    DEFAULT_TEMPLATES,
    HistoryEvent,
    TaskTemplate,
    Templates,
    Verbalizer,
)
from workloads.data.schema import Action

GOLDEN = Path(__file__).parent / "golden"
APPLY, VIEW, DISMISS = (1 << Action.APPLY), (1 << Action.VIEW), (1 << Action.DISMISS)
LIKE, COMMENT, CLICK = (1 << Action.LIKE), (1 << Action.COMMENT), (1 << Action.CLICK)
SEEN = 0  # shown, no action taken

# A fixed member, written by hand so the golden prompts do not move when the world generator changes.
MEMBER = {
    "title": "Senior Data Scientist",
    "industry": "Software",
    "location": "Berlin",
    "skills": ["Python", "SQL", "Machine Learning"],
}
JOBS = [
    {"job_title": "Data Scientist", "company": "Nimbusforge Labs", "location": "Berlin",
     "required_skills": ["Python", "SQL"]},
    {"job_title": "Senior Accountant", "company": "Deltabridge Capital", "location": "London",
     "required_skills": ["Audit", "Tax"]},
    {"job_title": "Lead Software Engineer", "company": "Orbitpath Labs", "location": "Toronto",
     "required_skills": ["Go", "Kubernetes", "Distributed Systems"]},
    {"job_title": "Machine Learning Engineer", "company": "Auroralight Labs", "location": "Berlin",
     "required_skills": ["Python", "Machine Learning"]},
]  # fmt: skip
POSTS = [
    {"author": "Ava Chen", "post_type": "text", "text": "Three lessons on cloud infrastructure."},
    {"author": "Helixgate Capital", "post_type": "article", "text": "[article] A deep dive into fintech."},
    {"author": "Ava Chen", "post_type": "photo", "text": "[photo] Proud of the team for shipping."},
    {"author": "Ben Okafor", "post_type": "text", "text": "What I learned this quarter about retail."},
]


def _check_golden(name: str, text: str) -> None:
    path = GOLDEN / f"{name}.txt"
    if os.environ.get("BREW_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text(), f"prompt differs from the reviewed {path}; see the diff above"


@pytest.fixture(scope="module")
def tokenizer(tiny_base: Path) -> PreTrainedTokenizerBase:
    return load_tokenizer(tiny_base)


def test_job_apply_prompt_matches_golden(templates: Templates, tokenizer: PreTrainedTokenizerBase) -> None:
    history = [
        HistoryEvent(templates.render("job", JOBS[0]), VIEW | APPLY),
        HistoryEvent(templates.render("job", JOBS[1]), DISMISS),
        HistoryEvent(templates.render("job", JOBS[2]), VIEW),
        HistoryEvent(templates.render("post", POSTS[0]), LIKE),  # another surface's action: not job history
    ]
    verbalizer = Verbalizer(templates, tokenizer, max_context_tokens=4096)
    prompts = verbalizer.verbalize(
        "job_apply", templates.render("member", MEMBER), history, [templates.render("job", JOBS[3])]
    )
    assert prompts.history_used == prompts.history_available == 3
    _check_golden("job_apply", prompts.prompts[0])


def test_feed_and_zero_shot_prompts_match_golden(
    templates: Templates, unacted_templates: Templates, tokenizer: PreTrainedTokenizerBase
) -> None:
    history = [
        HistoryEvent(templates.render("post", POSTS[0]), CLICK | LIKE),
        HistoryEvent(templates.render("post", POSTS[1]), CLICK),
        HistoryEvent(templates.render("post", POSTS[3]), SEEN),  # shown, not acted on
        HistoryEvent(templates.render("post", POSTS[2]), LIKE | COMMENT),
    ]
    verbalizer = Verbalizer(templates, tokenizer, max_context_tokens=4096)
    profile = templates.render("member", MEMBER)
    like = verbalizer.verbalize("feed_like", profile, history, [templates.render("post", POSTS[1])])
    actor = {"name": "Ava Chen", "kind": "member", "industry": "Software"}
    follow = verbalizer.verbalize("follow_actor", profile, history, [templates.render("actor", actor)])
    assert like.history_available == 2  # a click alone or an unacted post is not in the default history
    _check_golden("feed_like", like.prompts[0])
    _check_golden("follow_actor", follow.prompts[0])

    # The variant that also lists clicks, shares and unacted posts (Table 1's "did not interact").
    unacted = Verbalizer(unacted_templates, tokenizer, max_context_tokens=4096)
    follow = unacted.verbalize("follow_actor", profile, history, [templates.render("actor", actor)])
    assert follow.history_available == 4
    _check_golden("follow_actor_unacted", follow.prompts[0])


def _job_history(templates: Templates, n: int) -> list[HistoryEvent]:
    return [
        HistoryEvent(templates.render("job", {**JOBS[i % 3], "job_title": f"Role number {i}"}), VIEW)
        for i in range(n)
    ]


@pytest.mark.parametrize("budget", [260, 400, 700])
def test_history_is_cut_most_recent_first_to_the_token_budget(
    templates: Templates,
    tokenizer: PreTrainedTokenizerBase,
    budget: int,
) -> None:
    history = _job_history(templates, 60)
    questions = [templates.render("job", j) for j in JOBS]  # questions of different lengths
    verbalizer = Verbalizer(templates, tokenizer, budget)
    profile = templates.render("member", MEMBER)
    prompts = verbalizer.verbalize("job_apply", profile, history, questions)

    assert all(len(ids) <= budget for ids in prompts.token_ids)
    assert 0 < prompts.history_used < 60
    kept = history[60 - prompts.history_used :]
    assert all(e.text in prompts.prefix for e in kept)  # the most recent ones ...
    assert history[59 - prompts.history_used].text not in prompts.prefix  # ... and not the next older one
    # Maximal: one more event would push the longest candidate over the budget.
    task = templates.task("job_apply")
    longer = verbalizer.prefix(task, profile, history[59 - prompts.history_used :])
    longest_suffix = max(
        len(tokenizer.encode(verbalizer.suffix(task, q), add_special_tokens=False)) for q in questions
    )
    assert len(tokenizer.encode(longer, add_special_tokens=False)) + longest_suffix > budget
    # Every candidate's ids start with the same member prefix (what vLLM's prefix cache reuses).
    prefix_ids = tokenizer.encode(prompts.prefix, add_special_tokens=False)
    assert all(ids[: len(prefix_ids)] == prefix_ids for ids in prompts.token_ids)


def test_history_kept_is_the_largest_that_fits_at_every_budget(
    templates: Templates, tokenizer: PreTrainedTokenizerBase
) -> None:
    """The search starts from an estimate (summed line counts); its answer must be the exact one.

    Feed events liked and commented on are listed in two groups, so the estimate's bookkeeping is
    exercised too; the reference is a plain scan over every possible number of kept events.
    """
    actions = [LIKE, LIKE | COMMENT, COMMENT, LIKE, CLICK]
    history = [
        HistoryEvent(templates.render("post", {**POSTS[i % 4], "text": f"Post {i}: " + "word " * (i % 7)}),
                     actions[i % 5])
        for i in range(80)
    ]  # fmt: skip
    profile = templates.render("member", MEMBER)
    question = templates.render("post", POSTS[0])
    task = templates.task("feed_like")
    relevant = [history[k] for k in task.history_indices([e.actions for e in history])]
    for budget in range(330, 1400, 41):
        verbalizer = Verbalizer(templates, tokenizer, budget)
        room = budget - len(tokenizer.encode(verbalizer.suffix(task, question), add_special_tokens=False))
        lengths = [
            len(tokenizer.encode(verbalizer.prefix(task, profile, relevant[len(relevant) - k :]),
                                 add_special_tokens=False))
            for k in range(len(relevant) + 1)
        ]  # fmt: skip
        largest = max(k for k, n in enumerate(lengths) if n <= room)
        assert verbalizer.verbalize("feed_like", profile, history, [question]).history_used == largest, budget


def test_unacted_group_keeps_its_newest_items_and_every_interaction(
    templates: Templates, tokenizer: PreTrainedTokenizerBase
) -> None:
    raw = templates.task("feed_like").model_dump()
    raw["history_groups"] = [
        {"action": "like", "text": "Liked:"},
        {"action": "none", "text": "Seen:", "max_items": 2},
    ]
    task = TaskTemplate.model_validate(raw)
    actions = [SEEN, LIKE, SEEN, SEEN, CLICK, LIKE, SEEN, LIKE | CLICK]
    # The last two unacted events (positions 3 and 6), every like; the click alone is in no group.
    assert task.history_indices(actions) == [1, 3, 5, 6, 7]
    assert task.in_history(np.array(actions)).tolist() == [True, True, True, True, False, True, True, True]

    custom = templates.model_copy(update={"tasks": {**templates.tasks, "feed_like": task}})
    history = [HistoryEvent(f"[post {k}]", a) for k, a in enumerate(actions)]
    prompts = Verbalizer(custom, tokenizer, 4096).verbalize(
        "feed_like", templates.render("member", MEMBER), history, ["[question]"]
    )
    assert prompts.history_used == prompts.history_available == 5
    assert "Liked:\n[post 1]\n[post 5]\n[post 7]\nSeen:\n[post 3]\n[post 6]\n" in prompts.prefix
    with pytest.raises(ValidationError, match="max_items"):
        TaskTemplate.model_validate(
            {**raw, "history_groups": [{"action": "none", "text": "x", "max_items": 0}]}
        )


def test_budget_too_small_for_any_prompt_names_the_knob(
    templates: Templates, tokenizer: PreTrainedTokenizerBase
) -> None:
    verbalizer = Verbalizer(templates, tokenizer, max_context_tokens=40)
    with pytest.raises(ValueError, match="max_context_tokens=40"):
        verbalizer.verbalize(
            "job_apply", templates.render("member", MEMBER), [], [templates.render("job", JOBS[0])]
        )


def test_answers_are_single_tokens(templates: Templates, tokenizer: PreTrainedTokenizerBase) -> None:
    yes, no = answer_token_ids(tokenizer, templates)
    assert yes != no
    assert tokenizer.decode([yes]) == templates.answer.yes and tokenizer.decode([no]) == templates.answer.no


def test_templates_reject_unknown_actions_and_unlabelled_trained_tasks() -> None:
    raw = yaml.safe_load(DEFAULT_TEMPLATES.read_text())
    raw["tasks"]["job_apply"]["history_groups"][0]["action"] = "applied"
    with pytest.raises(ValidationError, match="unknown action 'applied'"):
        Templates.model_validate(raw)
    raw = yaml.safe_load(DEFAULT_TEMPLATES.read_text())
    raw["tasks"]["feed_like"]["label_action"] = None
    with pytest.raises(ValidationError, match="needs label_action"):
        Templates.model_validate(raw)


def test_entity_format_missing_field_is_named(templates: Templates) -> None:
    with pytest.raises(ValueError, match="needs field 'company'"):
        templates.render("job", {"job_title": "x", "location": "y", "required_skills": []})
