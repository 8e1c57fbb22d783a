"""The 360Brew verbalizer: a member, their past interactions and a task become one text prompt.

The layout is the paper's Table 1 (instruction, optional note, member profile, past interactions
grouped by action, the question item, the answer slot); the wording lives in templates.yaml so a
new task is data, not code. History is the member's many-shot context (paper section 2.1), so it
is cut to a token budget keeping the most recent interactions: ``max_context_tokens`` is the knob
of the context-length scaling study (section 2.5).

A prompt is built as two token sequences, the member prefix (everything before the question) and
the question suffix, and its ids are their concatenation. All candidates of one member therefore
share the prefix ids exactly, which is what lets vLLM's prefix cache encode a history once per
member, and the budget is exact: ``len(prefix) + len(suffix) <= max_context_tokens``.
"""

from __future__ import annotations

from bisect import bisect_right
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

from workloads.data.schema import ACTION_COLUMNS, Action

DEFAULT_TEMPLATES = Path(__file__).with_name("templates.yaml")
UNACTED_TEMPLATES = Path(__file__).with_name("templates_unacted.yaml")  # + clicks, shares, unacted posts
NO_ACTION = "none"  # a history group of items shown to the member who did nothing with them
EntityKind = Literal["member", "job", "post", "actor"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_action(name: str) -> str:
    if name not in ACTION_COLUMNS:
        raise ValueError(f"unknown action {name!r}; expected one of {ACTION_COLUMNS}")
    return name


class HistoryGroup(_Strict):
    """One line of the history section: the events carrying `action`, announced by `text`.

    `action: none` gathers the items the member was shown and did not act on (Table 1's "did not
    interact"); they outnumber interactions many times over, so `max_items` keeps only the group's
    most recent ones and leaves the budget to the interactions.
    """

    action: str
    text: str
    max_items: int | None = Field(None, ge=1, description="keep only this group's most recent events")

    @field_validator("action")
    @classmethod
    def _valid_action(cls, name: str) -> str:
        return name if name == NO_ACTION else _check_action(name)

    @property
    def bit(self) -> int:
        """The action's bit in an impression's bitmask (0 for the no-action group)."""
        return 0 if self.action == NO_ACTION else 1 << Action[self.action.upper()]

    def matches(self, actions: int) -> bool:
        return actions == 0 if self.action == NO_ACTION else bool(actions & self.bit)


class TaskTemplate(_Strict):
    surface: Literal["feed", "jobs"]
    question_entity: Literal["job", "post", "actor"]
    label_action: str | None  # the impression's action bit that is the label; None: labelled elsewhere (T2)
    trained: bool  # False: a T2 task that fine-tuning never sees
    instruction: str
    note: str | None
    history_header: str
    history_groups: list[HistoryGroup]
    question: str

    @field_validator("label_action")
    @classmethod
    def _valid_label(cls, name: str | None) -> str | None:
        return None if name is None else _check_action(name)

    @model_validator(mode="after")
    def _trained_needs_label(self) -> TaskTemplate:
        if self.trained and self.label_action is None:
            raise ValueError("a trained task needs label_action (the impression action it predicts)")
        if not self.history_groups:
            raise ValueError("history_groups must name at least one action")
        return self

    @property
    def history_mask(self) -> int:
        """Action bits of the interactions that belong in this task's history."""
        mask = 0
        for group in self.history_groups:
            mask |= group.bit
        return mask

    @property
    def shows_unacted(self) -> bool:
        """Whether items shown without any action belong in the history (a `none` group)."""
        return any(g.action == NO_ACTION for g in self.history_groups)

    def in_history(self, actions: np.ndarray) -> np.ndarray:
        """Which impressions of this task's surface (action bitmasks) belong in its history."""
        keep = (actions & self.history_mask) != 0
        return keep | (actions == 0) if self.shows_unacted else keep

    def history_indices(self, actions: Sequence[int]) -> list[int]:
        """Positions of the events (action bitmasks, oldest first) that this task's history shows.

        Each group is cut to its `max_items` newest; an event is kept while any group it belongs to
        has room, so capping one group never drops an interaction that an uncapped group shows.
        """
        seen: Counter[int] = Counter()

        def has_room(group: int) -> bool:
            cap = self.history_groups[group].max_items
            return cap is None or seen[group] < cap

        kept = []
        for position in range(len(actions) - 1, -1, -1):
            groups = [k for k, g in enumerate(self.history_groups) if g.matches(int(actions[position]))]
            if any(has_room(k) for k in groups):
                kept.append(position)
            seen.update(groups)
        return kept[::-1]


class AnswerSlot(_Strict):
    slot: str
    yes: str
    no: str


class Sections(_Strict):
    instruction: str
    note: str
    profile: str
    question: str
    empty_history: str


class Templates(_Strict):
    answer: AnswerSlot
    sections: Sections
    entities: dict[EntityKind, str]
    tasks: dict[str, TaskTemplate]

    @field_validator("entities")
    @classmethod
    def _all_entities(cls, entities: dict[str, str]) -> dict[str, str]:
        missing = {"member", "job", "post", "actor"} - set(entities)
        if missing:
            raise ValueError(f"entities is missing formats for {sorted(missing)}")
        return entities

    def task(self, name: str) -> TaskTemplate:
        if name not in self.tasks:
            raise KeyError(f"unknown task {name!r}; templates define {sorted(self.tasks)}")
        return self.tasks[name]

    @property
    def trained_tasks(self) -> list[str]:
        return [name for name, t in self.tasks.items() if t.trained]

    def render(self, kind: EntityKind, fields: Mapping[str, Any]) -> str:
        """Write one entity (a row of a world table, as a mapping) in its template's format."""
        values = {k: ", ".join(map(str, v)) if isinstance(v, list | tuple) else v for k, v in fields.items()}
        try:
            return self.entities[kind].format_map(values)
        except KeyError as missing:
            raise ValueError(f"entity format {kind!r} needs field {missing}; got {sorted(fields)}") from None


def load_templates(path: Path | None = None) -> Templates:
    """Read and validate a templates file (the packaged templates.yaml by default)."""
    source = path or DEFAULT_TEMPLATES
    return Templates.model_validate(yaml.safe_load(source.read_text()))


@dataclass(frozen=True)
class HistoryEvent:
    """One past impression: the verbalized item and the member's actions on it (Action bitmask)."""

    text: str
    actions: int


@dataclass(frozen=True)
class PromptSet:
    """Prompts for one member and task, one per question, all sharing the member prefix."""

    prefix: str
    suffixes: list[str]
    token_ids: list[list[int]]  # prefix ids + suffix ids, one list per question
    history_used: int  # history events kept (the most recent ones)
    history_available: int  # history events the groups show before truncation to the budget

    @property
    def prompts(self) -> list[str]:
        return [self.prefix + s for s in self.suffixes]


class Verbalizer:
    """Builds Table 1 prompts for a task within a token budget, measured with the model's tokenizer."""

    def __init__(
        self, templates: Templates, tokenizer: PreTrainedTokenizerBase, max_context_tokens: int
    ) -> None:
        if max_context_tokens < 1:
            raise ValueError(f"max_context_tokens must be positive, got {max_context_tokens}")
        self.templates = templates
        self.tokenizer = tokenizer
        self.max_context_tokens = max_context_tokens
        self._line_counts: dict[str, int] = {}

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _line_tokens(self, line: str) -> int:
        """Tokens of one history line plus the newline that joins it (cached: items recur)."""
        count = self._line_counts.get(line)
        if count is None:
            count = self._line_counts[line] = len(self._ids([line])[0]) + 1
        return count

    def _estimated_lengths(
        self, task: TaskTemplate, relevant: Sequence[HistoryEvent], base: int
    ) -> list[int]:
        """Approximate prefix tokens when keeping the last k events, k = 0..len(relevant).

        Sums each line's own count (an event is listed once per group it matches, a group's header
        once), so it ignores merges across line breaks: a starting point, never the answer.
        """
        lengths, total, shown = [base], base, set()
        for event in reversed(relevant):
            for g, group in enumerate(task.history_groups):
                if group.matches(event.actions):
                    total += self._line_tokens(event.text)
                    if g not in shown:
                        shown.add(g)
                        total += self._line_tokens(group.text)
            lengths.append(total)
        return lengths

    def prefix(self, task: TaskTemplate, profile: str, history: Sequence[HistoryEvent]) -> str:
        """Instruction, note, profile and the grouped history: everything before the question."""
        s = self.templates.sections
        parts = [f"{s.instruction}\n{task.instruction}"]
        if task.note:
            parts.append(f"{s.note}\n{task.note}")
        parts.append(f"{s.profile}\n{profile}")
        lines = [task.history_header]
        for group in task.history_groups:
            items = [e.text for e in history if group.matches(e.actions)]
            if items:
                lines.append(group.text)
                lines.extend(items)
        if len(lines) == 1:
            lines.append(s.empty_history)
        parts.append("\n".join(lines))
        return "\n\n".join(parts) + "\n\n"

    def suffix(self, task: TaskTemplate, question_item: str) -> str:
        s = self.templates.sections
        return f"{s.question}\n{task.question}\n{question_item}\n\n{self.templates.answer.slot}"

    def verbalize(
        self, task_name: str, profile: str, history: Sequence[HistoryEvent], questions: Sequence[str]
    ) -> PromptSet:
        """One prompt per question item; history (oldest first) is cut most-recent-first to the budget."""
        if not questions:
            raise ValueError("questions must hold at least one item to ask about")
        task = self.templates.task(task_name)
        relevant = [history[k] for k in task.history_indices([e.actions for e in history])]
        suffixes = [self.suffix(task, q) for q in questions]
        suffix_ids = self._ids(suffixes)
        room = self.max_context_tokens - max(len(ids) for ids in suffix_ids)

        known: dict[int, list[int]] = {}

        def prefix_ids(kept: int) -> list[int]:
            if kept not in known:
                known[kept] = self._ids([self.prefix(task, profile, relevant[len(relevant) - kept :])])[0]
            return known[kept]

        def fits(kept: int) -> bool:
            return len(prefix_ids(kept)) <= room

        if not fits(0):
            raise ValueError(
                f"max_context_tokens={self.max_context_tokens} cannot hold the {task_name!r} prompt even "
                f"without history ({len(prefix_ids(0)) + self.max_context_tokens - room} tokens)"
            )
        # The largest number of recent events that fits, found exactly. Tokenizing whole prefixes is
        # what costs, so the search starts where summed per-line counts put it (usually two probes
        # settle it) and bisects whatever range is left.
        lo, hi = 0, len(relevant)
        estimate = self._estimated_lengths(task, relevant, len(prefix_ids(0)))
        guess = max(bisect_right(estimate, room) - 1, 0)
        if fits(guess):
            lo = guess
            if guess < hi:
                lo, hi = (guess + 1, hi) if fits(guess + 1) else (guess, guess)
        else:
            hi = guess - 1
            if hi > lo:
                lo, hi = (hi, hi) if fits(hi) else (lo, hi - 1)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(mid):
                lo = mid
            else:
                hi = mid - 1
        kept = relevant[len(relevant) - lo :]
        prefix = self.prefix(task, profile, kept)
        ids = prefix_ids(lo)
        return PromptSet(
            prefix=prefix,
            suffixes=suffixes,
            token_ids=[ids + s for s in suffix_ids],
            history_used=lo,
            history_available=len(relevant),
        )
