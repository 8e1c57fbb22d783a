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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, field_validator, model_validator
from transformers import PreTrainedTokenizerBase

from workloads.data.schema import ACTION_COLUMNS, Action

DEFAULT_TEMPLATES = Path(__file__).with_name("templates.yaml")
EntityKind = Literal["member", "job", "post", "actor"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _check_action(name: str) -> str:
    if name not in ACTION_COLUMNS:
        raise ValueError(f"unknown action {name!r}; expected one of {ACTION_COLUMNS}")
    return name


class HistoryGroup(_Strict):
    """One line of the history section: the events carrying `action`, announced by `text`."""

    action: str
    text: str

    _valid_action = field_validator("action")(_check_action)

    @property
    def bit(self) -> int:
        return 1 << Action[self.action.upper()]


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
        """Action bits of the events that belong in this task's history."""
        mask = 0
        for group in self.history_groups:
            mask |= group.bit
        return mask


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
    history_used: int  # interactions kept (the most recent ones)
    history_available: int  # interactions the member had before truncation

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

    def _ids(self, texts: list[str]) -> list[list[int]]:
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def prefix(self, task: TaskTemplate, profile: str, history: Sequence[HistoryEvent]) -> str:
        """Instruction, note, profile and the grouped history: everything before the question."""
        s = self.templates.sections
        parts = [f"{s.instruction}\n{task.instruction}"]
        if task.note:
            parts.append(f"{s.note}\n{task.note}")
        parts.append(f"{s.profile}\n{profile}")
        lines = [task.history_header]
        for group in task.history_groups:
            items = [e.text for e in history if e.actions & group.bit]
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
        relevant = [e for e in history if e.actions & task.history_mask]
        suffixes = [self.suffix(task, q) for q in questions]
        suffix_ids = self._ids(suffixes)
        room = self.max_context_tokens - max(len(ids) for ids in suffix_ids)

        def prefix_ids(kept: int) -> list[int]:
            return self._ids([self.prefix(task, profile, relevant[len(relevant) - kept :])])[0]

        if len(prefix_ids(0)) > room:
            raise ValueError(
                f"max_context_tokens={self.max_context_tokens} cannot hold the {task_name!r} prompt even "
                f"without history ({len(prefix_ids(0)) + self.max_context_tokens - room} tokens)"
            )
        # Prefix length grows with the number of kept events: binary search the largest that fits.
        lo, hi = 0, len(relevant)
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if len(prefix_ids(mid)) <= room:
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
