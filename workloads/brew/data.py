"""360Brew examples from the world's tables: (task, member, question entity, label, history as of then).

Examples are kept structured (ids and action bitmasks) rather than as text, because the text
depends on the tokenizer's budget; `workloads.brew.prompts.Verbalizer` turns them into prompts.

Time split, as in preprocessing (same boundaries, same resolver) and the paper's T1 setting: by
default the last 7 days are the evaluation period and training uses the sessions before them. Every
history holds only events strictly before its example's time (the start of the candidate's
session), so nothing leaks.

T1 tasks take their labels from impressions (an action bit on a shown item). The T2 task "does the
member follow this author" takes them from the follows table as of the evaluation period's start:
positives are followed actors, negatives actors the member does not follow, and no training example
ever asks about follows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as pads
from pydantic import BaseModel, ConfigDict, Field

from workloads.brew.prompts import HistoryEvent, TaskTemplate, Templates
from workloads.data.schema import ACTION_COLUMNS, WORLD_TABLES, Action, PostType
from workloads.data.window import Boundary, PreprocessConfig, impressions_path, resolve_window

MAX_HISTORY_EVENTS = 512  # kept per example before token truncation; far more than any budget holds


class TimeSplit(BaseModel):
    """Train on a window, evaluate on the period right after it (paper section 2.2, T1).

    The same boundaries, with the same meaning, as `workloads.data.window.PreprocessConfig`
    (a time, or a day offset: >= 0 from the world's start, < 0 from its end), resolved by the same
    function, so 360Brew and LiGR are evaluated on the same period.
    """

    model_config = ConfigDict(extra="forbid")

    train_start: Boundary = Field(0.0, description="first training session")
    train_end: Boundary = Field(-7.0, description="end of training = start of evaluation (last 7 days)")
    eval_end: Boundary | None = Field(None, description="end of evaluation (default: end of the world)")


@dataclass(frozen=True)
class Periods:
    train_start: int  # us, inclusive: sessions starting from here are training examples
    eval_start: int  # us; the training period ends here (exclusive)
    eval_end: int  # us, exclusive

    def iso(self) -> dict[str, str]:
        return {k: datetime.fromtimestamp(v / 1e6, tz=UTC).isoformat() for k, v in asdict(self).items()}


def resolve_periods(world_dir: Path, split: TimeSplit) -> Periods:
    """Resolve day offsets against the world's window exactly as preprocessing does."""
    cfg = PreprocessConfig(
        world_dir=world_dir, train_start=split.train_start, train_end=split.train_end, eval_end=split.eval_end
    )
    window = resolve_window(cfg, pads.dataset(impressions_path(world_dir), format="parquet"))
    return Periods(train_start=window.train_start, eval_start=window.train_end, eval_end=window.eval_end)


@dataclass
class World:
    """The world's tables as pandas frames; timestamps as int64 microseconds."""

    members: pd.DataFrame  # indexed by member_id
    actors: pd.DataFrame  # indexed by actor_id
    items: pd.DataFrame  # indexed by item_id
    follows: pd.DataFrame
    impressions: pd.DataFrame  # sorted by (member_id, timestamp, position), with `actions` bitmask column
    member_offsets: np.ndarray  # impressions of member m are rows member_offsets[m]:member_offsets[m + 1]


def _us(column: pd.Series) -> pd.Series:
    return column.astype("datetime64[us, UTC]").astype("int64")


def _read(world_dir: Path, name: str) -> pd.DataFrame:
    path = Path(world_dir) / f"{name}.parquet"
    if not path.is_file():
        raise FileNotFoundError(f"world table {name!r} not found at {path} (run `rankray data synth`)")
    frame = pd.read_parquet(path)
    missing = [f.name for f in WORLD_TABLES[name] if f.name not in frame.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing} (schema: workloads.data.schema.{name.upper()})")
    return frame


def load_world(world_dir: Path) -> World:
    """Read the five world tables written by `rankray data synth` (validated against the schema)."""
    imp = _read(world_dir, "impressions")
    imp["timestamp"] = _us(imp["timestamp"])
    bits = np.zeros(len(imp), dtype=np.int64)
    for action in Action:
        bits |= imp[ACTION_COLUMNS[action]].to_numpy().astype(np.int64) << int(action)
    imp["actions"] = bits
    imp = imp.sort_values(["member_id", "timestamp", "position"], kind="stable").reset_index(drop=True)
    imp["session_start"] = imp.groupby("session_id")["timestamp"].transform("min")
    members = _read(world_dir, "members").set_index("member_id")
    follows = _read(world_dir, "follows")
    follows["created_at"] = _us(follows["created_at"])
    offsets = np.searchsorted(imp["member_id"].to_numpy(), np.arange(int(members.index.max()) + 2))
    return World(
        members=members,
        actors=_read(world_dir, "actors").set_index("actor_id"),
        items=_read(world_dir, "items").set_index("item_id"),
        follows=follows,
        impressions=imp,
        member_offsets=offsets,
    )


class EntityText:
    """Verbalized members, items and actors (templates' entity formats), cached by id.

    The cache is consulted before the world's tables: a prompt's history repeats the same items
    many times over, and a pandas row lookup costs far more than the rendering it feeds.
    """

    def __init__(self, world: World, templates: Templates) -> None:
        self.world, self.templates = world, templates
        self._cache: dict[tuple[str, int], str] = {}

    def _cached(self, table: str, key: int, render: Callable[[], str]) -> str:
        text = self._cache.get((table, key))
        if text is None:
            text = self._cache[(table, key)] = render()
        return text

    def member(self, member_id: int) -> str:
        def render() -> str:
            row = self.world.members.loc[member_id]
            return self.templates.render("member", {**row.to_dict(), "skills": list(row["skills"])})

        return self._cached("member", member_id, render)

    def actor(self, actor_id: int) -> str:
        def render() -> str:
            return self.templates.render("actor", self.world.actors.loc[actor_id].to_dict())

        return self._cached("actor", actor_id, render)

    def item(self, item_id: int) -> str:
        def render() -> str:
            row = self.world.items.loc[item_id]
            if row["item_kind"] == "job":
                return self.templates.render(
                    "job", {**row.to_dict(), "required_skills": list(row["required_skills"])}
                )
            fields = {
                **row.to_dict(),
                "author": self.world.actors.at[int(row["actor_id"]), "name"],
                "post_type": PostType(int(row["post_type"])).name.lower(),
            }
            return self.templates.render("post", fields)

        return self._cached("item", item_id, render)

    def question(self, task: TaskTemplate, question_id: int) -> str:
        return self.actor(question_id) if task.question_entity == "actor" else self.item(question_id)


@dataclass(frozen=True)
class BrewExample:
    task: str
    member_id: int
    question_id: int  # item id (job, post) or actor id (T2 follow task)
    label: int
    at: int  # us; the history holds only events strictly before this instant
    history_items: np.ndarray  # item ids of past interactions, oldest first (at most MAX_HISTORY_EVENTS)
    history_actions: np.ndarray  # their Action bitmasks
    history_len: int  # interactions before `at` (before the MAX_HISTORY_EVENTS cap)


def member_history(
    world: World, member_id: int, at: int, task: TaskTemplate
) -> tuple[np.ndarray, np.ndarray, int]:
    """(item ids, action bitmasks, interaction count) of the member's history for `task` before `at`.

    The history is the member's impressions on the task's surface that one of its history groups
    shows: interactions, and with a `none` group also items shown without any action. The count is of
    interactions only (how much the member has done, the cold-start slicing variable).
    """
    lo, hi = world.member_offsets[member_id], world.member_offsets[member_id + 1]
    imp = world.impressions
    ts = imp["timestamp"].to_numpy()[lo:hi]
    cut = lo + int(np.searchsorted(ts, at, side="left"))
    actions = imp["actions"].to_numpy()[lo:cut]
    keep = task.in_history(actions) & (imp["surface"].to_numpy()[lo:cut] == task.surface)
    items = imp["item_id"].to_numpy()[lo:cut][keep]
    actions = actions[keep]
    interactions = int(((actions & task.history_mask) != 0).sum())
    return items[-MAX_HISTORY_EVENTS:], actions[-MAX_HISTORY_EVENTS:], interactions


def history_events(text: EntityText, example: BrewExample) -> list[HistoryEvent]:
    return [
        HistoryEvent(text.item(int(i)), int(a))
        for i, a in zip(example.history_items, example.history_actions, strict=True)
    ]


def _sample(
    rng: np.random.Generator, labels: np.ndarray, n: int, positive_fraction: float | None
) -> np.ndarray:
    """Row indices: uniform (natural label rate) or with the given share of positives, at most n rows."""
    if positive_fraction is None:
        return np.sort(rng.permutation(len(labels))[:n])
    pos, neg = np.flatnonzero(labels == 1), np.flatnonzero(labels == 0)
    n_pos = min(len(pos), round(n * positive_fraction))
    n_neg = min(len(neg), n - n_pos)
    return np.sort(
        np.concatenate([rng.choice(pos, n_pos, replace=False), rng.choice(neg, n_neg, replace=False)])
    )


def _session_pairs(rng: np.random.Generator, labels: np.ndarray, sessions: np.ndarray, n: int) -> np.ndarray:
    """Row indices: up to n // 2 positives, each with a random negative shown in the same session."""
    order = np.lexsort((labels, sessions))  # by session, negatives first
    sessions, labels = sessions[order], labels[order]
    starts = np.flatnonzero(np.r_[True, sessions[1:] != sessions[:-1]])
    sizes = np.diff(np.r_[starts, len(sessions)])
    negatives = np.add.reduceat(labels == 0, starts)
    usable = (negatives > 0) & (negatives < sizes)  # sessions holding both labels
    picked = rng.permutation(np.flatnonzero(usable))[: n // 2]
    positives = sizes[picked] - negatives[picked]
    positive = starts[picked] + negatives[picked] + (rng.random(len(picked)) * positives).astype(np.int64)
    negative = starts[picked] + (rng.random(len(picked)) * negatives[picked]).astype(np.int64)
    return np.sort(order[np.concatenate([positive, negative])])


def impression_examples(
    world: World,
    templates: Templates,
    task_name: str,
    start: int,
    end: int,
    n: int,
    seed: int,
    positive_fraction: float | None = None,
    session_pairs: bool = False,
) -> list[BrewExample]:
    """Up to n examples of a T1 task from the impressions of sessions starting in [start, end).

    With `session_pairs`, examples come in pairs from one session: a positive and a negative with the
    same member, time and so the same history, one pair per session. The history then says nothing
    about the label by itself (how active a member is, how long the prompt is); only how the question
    item relates to it does. `positive_fraction` is then 0.5 by construction and must be None.
    """
    task = templates.task(task_name)
    if task.label_action is None:
        raise ValueError(f"task {task_name!r} has no label_action: it is not labelled by impressions")
    if session_pairs and positive_fraction is not None:
        raise ValueError("session_pairs makes half the examples positive: positive_fraction must be None")
    imp = world.impressions
    ts = imp["session_start"].to_numpy()
    rows = np.flatnonzero((imp["surface"].to_numpy() == task.surface) & (ts >= start) & (ts < end))
    labels = imp[task.label_action].to_numpy()[rows].astype(np.int64)
    rng = np.random.default_rng(seed)
    if session_pairs:
        rows = rows[_session_pairs(rng, labels, imp["session_id"].to_numpy()[rows], n)]
    else:
        rows = rows[_sample(rng, labels, n, positive_fraction)]
    out = []
    for row in rows.tolist():
        member, at = int(imp.at[row, "member_id"]), int(imp.at[row, "session_start"])
        items, actions, count = member_history(world, member, at, task)
        out.append(
            BrewExample(
                task=task_name,
                member_id=member,
                question_id=int(imp.at[row, "item_id"]),
                label=int(imp.at[row, task.label_action]),
                at=at,
                history_items=items,
                history_actions=actions,
                history_len=count,
            )
        )
    return out


def follow_examples(
    world: World, templates: Templates, task_name: str, at: int, end: int, n: int, seed: int
) -> list[BrewExample]:
    """Up to n examples of the T2 follow task, half positive, for members active in [at, end)."""
    task = templates.task(task_name)
    rng = np.random.default_rng(seed)
    imp = world.impressions
    ts = imp["timestamp"].to_numpy()
    active = np.unique(imp["member_id"].to_numpy()[(ts >= at) & (ts < end)])
    follows = world.follows[world.follows["created_at"] < at]
    followed = follows.groupby("member_id")["actor_id"].apply(set).to_dict()
    actors = world.actors.index.to_numpy()
    out: list[BrewExample] = []
    for member in rng.permutation(active).tolist():
        if len(out) >= n:
            break
        yes = sorted(followed.get(member, set()))
        no = sorted(set(actors.tolist()) - set(yes))
        if not yes or not no:
            continue
        items, actions, count = member_history(world, member, at, task)
        for actor, label in ((int(rng.choice(yes)), 1), (int(rng.choice(no)), 0)):
            out.append(BrewExample(task_name, member, actor, label, at, items, actions, count))
    return out[:n]


def popularity_scores(
    world: World, templates: Templates, examples: list[BrewExample], before: int
) -> np.ndarray:
    """The popularity baseline: how often others acted the same way on the question's actor before `before`.

    T1: the author's (or hiring company's) count of the task's action; T2: the actor's followers
    other than the member. Neither looks at the member's own history.
    """
    imp = world.impressions[world.impressions["timestamp"] < before]
    follows = world.follows[world.follows["created_at"] < before]
    followers = follows.groupby("actor_id")["member_id"].apply(set).to_dict()
    counts: dict[str, dict[int, int]] = {}
    scores = np.zeros(len(examples))
    for k, ex in enumerate(examples):
        task = templates.task(ex.task)
        if task.question_entity == "actor":
            scores[k] = len(followers.get(ex.question_id, set()) - {ex.member_id})
            continue
        assert task.label_action is not None
        if ex.task not in counts:
            counts[ex.task] = imp.groupby("actor_id")[task.label_action].sum().to_dict()
        actor = int(world.items.at[ex.question_id, "actor_id"])
        scores[k] = counts[ex.task].get(actor, 0)
    return scores


def author_in_prompt_scores(
    world: World, templates: Templates, examples: list[BrewExample], used: np.ndarray
) -> np.ndarray:
    """How many of the interactions a prompt shows (its last ``used`` history items) are by the question's
    author (T2: the question actor; T1: the question item's author or hiring company).

    Not a competitor but a reading aid: it says how much the prompt itself gives away, so a model
    below it has not learned to read its own context (the T2 follow task is the case in point).
    """
    item_actor = world.items["actor_id"]
    scores = np.zeros(len(examples))
    for k, (ex, shown) in enumerate(zip(examples, used.tolist(), strict=True)):
        task = templates.task(ex.task)
        author = ex.question_id if task.question_entity == "actor" else int(item_actor.at[ex.question_id])
        history = ex.history_items[task.history_indices(ex.history_actions.tolist())]
        visible = history[len(history) - shown :] if shown else history[:0]
        scores[k] = int((item_actor.loc[visible].to_numpy() == author).sum())
    return scores


def entity_corpus(world: World, text: EntityText, before: int) -> Iterator[str]:
    """Raw entity text for continued pretraining: profiles, jobs and posts that exist before `before`."""
    for member_id in world.members.index.tolist():
        yield text.member(int(member_id))
    created = _us(world.items["created_at"])
    for item_id in world.items.index[created.to_numpy() < before].tolist():
        yield text.item(int(item_id))
        if world.items.at[item_id, "item_kind"] == "job":
            yield str(world.items.at[item_id, "text"])
    for actor_id in world.actors.index.tolist():
        yield text.actor(int(actor_id))
