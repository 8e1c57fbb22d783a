"""The synthetic LinkedIn-like interaction world that every rankray experiment runs on.

There is no LinkedIn data, so a hidden generative model plants exactly the effects the LiGR and
360Brew papers say their models exploit: a per-member latent affinity to actors (the strongest
signal, stronger still for followed actors) and to topics, both drifting over time; a post-type
preference; item-age decay; position bias; a set-wise penalty when the same actor or topic is shown
back to back; and skill / location / seniority fit on the jobs surface. docs/data.md writes the
model out as equations. Every effect has a `WorldConfig` knob and 0 turns it off.

Each stage draws from its own random stream (seeded by ``seed`` and the stage's name) and the
effect knobs are read only by the outcome stage, so two worlds that differ in one effect knob show
the same members the same items at the same positions and differ only in the actions: an ablation
changes labels, never exposure. Everything is vectorized numpy over whole arrays, with no Python
loop per member, session or impression: 5,000 members and ~500k impressions take a few seconds.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from datetime import UTC, date, datetime
from itertools import pairwise
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from pydantic import BaseModel, ConfigDict, Field

from workloads.data.atomic import atomic_dir
from workloads.data.schema import (
    ACTORS,
    CONTENT_DIM,
    FOLLOWS,
    IMPRESSIONS,
    ITEMS,
    MEMBERS,
    TS,
    Action,
    PostType,
    data_root,
)
from workloads.stage import run_stage

GENERATOR_VERSION = 1  # bump when the same config would produce a different world

# Every time inside this module is int64 microseconds since the Unix epoch (schema.py explains why).
SECOND = 1_000_000
HOUR = 3600 * SECOND
DAY = 24 * HOUR

# --- Fixed parts of the generative model (the tunable strengths live in WorldConfig) ---------------
LATENT_DIM = 8  # width of the member/actor/topic taste vectors
DRIFT_COMPONENTS = 4  # random Fourier components of a member's drifting taste
PROFILE_WEIGHT = 0.5  # correlation of a member's (actor's) taste with their industry: what a profile reveals
MAX_POST_AGE = 14 * DAY  # the feed shows posts at most two weeks old
MEAN_POST_AGE = 24 * HOUR  # out-of-network candidates: exponential age with this mean
JOB_OPEN = 30 * DAY  # a job posting stays open this long
SAME_INDUSTRY_JOBS = 0.6  # jobs-surface slots filled from open jobs in the member's industry
IN_NETWORK_SHARE = 0.5  # feed slots filled from followed actors' recent posts
FOLLOW_POOL = 256  # actors a member considers following (all of them when there are fewer)
MEAN_FEED_SESSION = 10  # items per feed session (1 + negative binomial), at most MAX_FEED_SESSION
MAX_FEED_SESSION = 30
MEAN_JOB_SESSION = 5  # items per jobs session (1 + Poisson), at most MAX_JOB_SESSION
MAX_JOB_SESSION = 12
MEAN_SCROLL_GAP = 6 * SECOND  # time between consecutive impressions: 2 s + exponential, capped
MAX_SCROLL_GAP = 30 * SECOND
SESSION_BREAK = 60  # seconds between the end of a member's session and the start of their next one

# Weights inside the actor-affinity term: taste match, pair-specific affinity, follow boost, actor quality.
ACTOR_TASTE_W = 0.7
ACTOR_PAIR_W = 0.6
FOLLOW_BOOST = 1.0
ACTOR_QUALITY_SD = 0.3
# Topic affinity = 0.6 * the industry's topic profile + 0.8 * the member's own drifting topic taste.
TOPIC_PROFILE_W = 0.6
TOPIC_OWN_W = 0.8
SAME_TOPIC_PENALTY = 0.5  # share of `setwise_effect` applied when only the topic repeats
MEMBER_BIAS_SD = 0.5
ITEM_QUALITY_SD = 0.3
SHARED_NOISE_SD = 0.7  # per-impression noise shared by all actions of that impression (correlates them)
# Age and position terms are centred on a typical impression (a day-old post, the fifth slot), so switching an
# effect off changes who engages, not how much engagement there is overall: ablations compare like with like.
AGE_REFERENCE = math.log2(1 + 24)
POSITION_REFERENCE = math.log2(1 + 4)

# Intercepts, calibrated so the default world lands on click ~10%, contribution ~3.5%, long dwell ~7%,
# job view ~20%, apply ~4%, dismiss ~10% (docs/data.md lists the measured rates).
CLICK_BIAS = -3.9
LIKE_BIAS = -4.1
COMMENT_BIAS = -5.4
SHARE_BIAS = -6.0
NO_CLICK_CONTRIBUTION = -3.0  # like/comment/share without a click are this much (logit) rarer
DWELL_BIAS = -4.8
DWELL_AFTER_CLICK = 1.5
TYPE_CLICK = np.array([0.0, 0.1, 0.2, 0.4])  # text, photo, video, article
TYPE_DWELL = np.array([-0.3, 0.0, 0.6, 0.5])
VIEW_BIAS = -2.2
APPLY_BIAS = -3.4
DISMISS_BIAS = -2.5
SKILL_FIT_W = 2.0  # job fit = 2 * skill overlap + 1 * same location - 0.6 * |seniority gap|
LOCATION_FIT_W = 1.0
SENIORITY_FIT_W = 0.6
FIT_CENTER = -0.2  # a typical retrieved job's fit, so job_fit changes the spread, not the base rate


# --- The catalogue the profiles, posts and jobs are written from -----------------------------------
class Industry(NamedTuple):
    name: str
    weight: float  # share of members, actors and jobs
    roles: tuple[str, str, str]
    skills: tuple[str, ...]  # SKILLS_PER_INDUSTRY of them
    topics: tuple[str, str]  # TOPICS_PER_INDUSTRY of them
    company_suffix: str


INDUSTRIES: tuple[Industry, ...] = (
    Industry("Software", 3.0, ("Software Engineer", "Data Scientist", "Product Manager"),
             ("Python", "Java", "Kubernetes", "SQL", "Machine Learning", "React", "Go",
              "Distributed Systems"),
             ("AI and machine learning", "cloud infrastructure"), "Labs"),
    Industry("Finance", 2.0, ("Financial Analyst", "Investment Banker", "Accountant"),
             ("Financial Modeling", "Accounting", "Risk Management", "Valuation", "Bloomberg", "Audit",
              "Corporate Finance", "Tax"),
             ("markets and investing", "fintech"), "Capital"),
    Industry("Healthcare", 2.0, ("Nurse", "Physician", "Clinical Researcher"),
             ("Patient Care", "Clinical Trials", "EHR", "Pharmacology", "Public Health", "Medical Devices",
              "Telemedicine", "Epidemiology"),
             ("digital health", "medical research"), "Health"),
    Industry("Education", 1.0, ("Teacher", "Instructional Designer", "Professor"),
             ("Curriculum Design", "E-Learning", "Tutoring", "Classroom Management", "Assessment",
              "Academic Research", "Mentoring", "EdTech Tools"),
             ("edtech", "higher education"), "Academy"),
    Industry("Marketing", 1.5, ("Marketing Manager", "Content Strategist", "Growth Marketer"),
             ("SEO", "Content Marketing", "Brand Strategy", "Google Analytics", "Copywriting", "Social Media",
              "Email Marketing", "Market Research"),
             ("brand building", "growth marketing"), "Agency"),
    Industry("Manufacturing", 1.0, ("Mechanical Engineer", "Operations Manager", "Quality Engineer"),
             ("Lean Manufacturing", "CAD", "Six Sigma", "Supply Chain", "Quality Control", "PLC",
              "Process Engineering", "Logistics"),
             ("supply chains", "industrial automation"), "Works"),
    Industry("Retail", 1.0, ("Store Manager", "Merchandiser", "E-commerce Manager"),
             ("Merchandising", "Inventory Management", "Customer Service", "E-commerce", "Pricing",
              "Visual Merchandising", "Sales", "Category Management"),
             ("e-commerce", "consumer trends"), "Retail"),
    Industry("Energy", 1.0, ("Energy Analyst", "Electrical Engineer", "Sustainability Manager"),
             ("Renewable Energy", "Power Systems", "Energy Modeling", "ESG Reporting", "Solar PV",
              "Grid Operations", "Carbon Accounting", "Project Finance"),
             ("renewable energy", "climate policy"), "Energy"),
    Industry("Media", 1.0, ("Journalist", "Video Producer", "Editor"),
             ("Video Editing", "Storytelling", "Journalism", "Adobe Premiere", "Podcasting", "Photography",
              "Copy Editing", "Broadcasting"),
             ("creator economy", "journalism"), "Studios"),
    Industry("Legal", 0.7, ("Corporate Lawyer", "Paralegal", "Compliance Officer"),
             ("Contract Law", "Compliance", "Litigation", "Legal Research", "Regulatory Affairs",
              "Negotiation", "Privacy Law", "Intellectual Property"),
             ("legal tech", "regulation and compliance"), "Legal"),
    Industry("Consulting", 1.0, ("Management Consultant", "Business Analyst", "Strategy Manager"),
             ("Strategy", "Business Analysis", "Stakeholder Management", "PowerPoint", "Change Management",
              "Process Improvement", "Due Diligence", "Operations Strategy"),
             ("business strategy", "future of work"), "Partners"),
    Industry("Government", 0.8, ("Policy Analyst", "Program Manager", "Urban Planner"),
             ("Public Policy", "Grant Writing", "Urban Planning", "Program Evaluation", "Budgeting", "GIS",
              "Community Engagement", "Procurement"),
             ("public policy", "smart cities"), "Institute"),
)  # fmt: skip
SKILLS_PER_INDUSTRY = 8
TOPICS_PER_INDUSTRY = 2
GENERIC_SKILLS = ("Communication", "Leadership", "Project Management", "Excel", "Public Speaking", "Teamwork")
SKILLS: tuple[str, ...] = tuple(s for ind in INDUSTRIES for s in ind.skills) + GENERIC_SKILLS
TOPICS: tuple[str, ...] = tuple(t for ind in INDUSTRIES for t in ind.topics)  # topic k of industry i: 2i + k
N_INDUSTRIES = len(INDUSTRIES)
N_TOPICS = len(TOPICS)
N_POST_TYPES = 4  # PostType.TEXT .. PostType.ARTICLE; PostType.JOB marks job postings
POST_TYPE_SHARE = np.array([0.4, 0.3, 0.15, 0.15])
LOCATIONS = ("San Francisco", "New York", "London", "Bangalore", "Berlin", "Toronto", "Singapore", "Sydney",
             "Paris", "Austin")  # fmt: skip
LOCATION_SHARE = np.array([0.16, 0.16, 0.12, 0.12, 0.08, 0.08, 0.08, 0.06, 0.06, 0.08])
SENIORITY_TITLES = ("Intern", "Junior", "", "Senior", "Lead", "Principal")  # 0 intern .. 5 executive
SENIORITY_WORDS = ("internship", "entry level", "mid level", "senior", "lead", "executive")
SENIORITY_SHARE = np.array([0.08, 0.22, 0.30, 0.22, 0.13, 0.05])
FIRST_NAMES = ("Ava", "Ben", "Chloe", "Dev", "Elena", "Farid", "Grace", "Hiro", "Isla", "Jonas", "Kemi",
               "Liam", "Maya", "Nikhil", "Olga", "Pedro")  # fmt: skip
LAST_NAMES = ("Adams", "Bauer", "Chen", "Diaz", "Evans", "Fischer", "Gupta", "Haddad", "Ito", "Jensen", "Kim",
              "Lopez", "Martin", "Novak")  # fmt: skip
BRAND_HEADS = ("Nimbus", "Cobalt", "Aurora", "Summit", "Vertex", "Harbor", "Orbit", "Granite", "Lumen",
               "Pioneer", "Cedar", "Atlas")  # fmt: skip
BRAND_TAILS = ("forge", "wave", "point", "stone", "bridge", "field", "light", "path", "gate", "works")
POST_PHRASES = (
    "Here is what I learned this quarter about {topic}.",
    "Three lessons on {topic} that I wish I had known earlier.",
    "Hot take: {topic} is changing faster than most teams realise.",
    "Proud of the team for shipping a big {topic} milestone this week.",
    "What is the one question about {topic} you keep getting asked?",
    "A short thread on where {topic} is heading next year.",
)
POST_TEMPLATES = (
    "{phrase}",
    "[photo] {phrase}",
    "[video] {phrase}",
    "[article] A deep dive into {topic}. {phrase}",
)


class WorldConfig(BaseModel):
    """Size, time window and the strength of every planted effect (0 turns an effect off)."""

    model_config = ConfigDict(extra="forbid")

    # scale and time window
    members: int = Field(5000, ge=10, le=200_000, description="members; impressions grow ~100 per member")
    seed: int = Field(0, ge=0, description="random seed: the same seed gives the same world")
    start: date = Field(date(2024, 1, 1), description="first day of the impression log (00:00 UTC)")
    days: int = Field(60, ge=7, le=730, description="length of the impression log in days")
    sessions_per_day: float = Field(0.2, gt=0, le=50, description="mean sessions per member and active day")
    actors_per_member: float = Field(0.4, gt=0, le=10, description="actors (authors, companies) per member")
    posts_per_member: float = Field(4.0, gt=0, le=100, description="feed posts per member over the window")
    jobs_per_member: float = Field(0.1, gt=0, le=10, description="job postings per member over the window")
    # population
    cold_start_fraction: float = Field(0.3, ge=0, le=1, description="share of members joining in the window")
    activity_tail: float = Field(1.2, ge=0, le=3, description="sigma of log-normal activity; 0 = all equal")
    job_sessions: float = Field(0.15, ge=0, le=0.9, description="share of sessions on jobs; 0 = no jobs")
    # planted effects (logit scale)
    actor_affinity: float = Field(1.0, ge=0, le=5, description="member x actor affinity, follows included")
    topic_affinity: float = Field(0.7, ge=0, le=5, description="member x topic affinity")
    post_type_preference: float = Field(0.5, ge=0, le=5, description="member x post type preference")
    member_style: float = Field(0.5, ge=0, le=5, description="member's propensity per action type")
    item_age_decay: float = Field(0.2, ge=0, le=2, description="logit lost per doubling of 1 + age in hours")
    position_bias: float = Field(0.25, ge=0, le=2, description="logit lost per doubling of (1 + position)")
    setwise_effect: float = Field(
        0.8, ge=0, le=5, description="penalty: same actor (topic: half) as previous slot"
    )
    burst_rate: float = Field(
        0.12, ge=0, le=0.9, description="chance a feed slot shows the previous slot's actor again"
    )
    drift: float = Field(0.6, ge=0, le=4, description="taste drift; corr after d days exp(-(drift*d/30)^2/2)")
    job_fit: float = Field(1.0, ge=0, le=5, description="skill, location and seniority fit on job actions")


# --- Intermediate arrays, one dataclass per stage ------------------------------------------------------
@dataclass(frozen=True)
class Window:
    start: int  # first instant of the impression log
    end: int  # end of the impression log (exclusive)
    epoch: int  # earliest item creation (open jobs at `start` were posted up to JOB_OPEN before it)


@dataclass(frozen=True)
class Members:
    industry: np.ndarray
    location: np.ndarray
    seniority: np.ndarray
    title: list[str]
    skill_offsets: np.ndarray  # CSR over skill_ids
    skill_ids: np.ndarray
    skill_matrix: np.ndarray  # (members, len(SKILLS)) bool, for job fit
    join: np.ndarray
    is_new: np.ndarray  # joined during the window (cold start)
    activity: np.ndarray  # expected sessions per active day


@dataclass(frozen=True)
class Actors:
    industry: np.ndarray
    is_company: np.ndarray
    home_topic: np.ndarray
    favourite_type: np.ndarray
    log_popularity: np.ndarray
    name: list[str]


@dataclass(frozen=True)
class Taste:
    """The hidden part: latent preferences no table exposes; history is the only way to learn them.

    A member's own taste drifts as a stationary Gaussian process built from DRIFT_COMPONENTS random
    Fourier components: own(t) = sum_f [cos(w_f t) x_f + sin(w_f t) y_f] / sqrt(F) with w_f = drift * N(0, 1)
    radians per 30 days, so its correlation with itself after d days is about exp(-(drift * d / 30)^2 / 2).
    """

    member_profile: np.ndarray  # (M, D) the industry-determined part of a member's actor taste
    actor_own: tuple[np.ndarray, np.ndarray]  # (M, F, D) x 2: the x_f and y_f of the drifting actor taste
    actor_vec: np.ndarray  # (A, D)
    topic_profile: np.ndarray  # (M, K) the industry-determined part of a member's topic taste
    topic_own: tuple[np.ndarray, np.ndarray]  # (M, F, D) x 2: the drifting topic taste (matched to topic_vec)
    topic_vec: np.ndarray  # (K, D)
    frequency: np.ndarray  # (M, F) ~N(0, 1); times `drift` gives radians per 30 days
    type_pref: np.ndarray  # (M, 4)
    style: np.ndarray  # (M, 3): click, contribution, dwell propensity
    member_bias: np.ndarray  # (M,)
    actor_quality: np.ndarray  # (A,)
    pair_salt: np.uint64  # seeds the pair-specific affinity hash

    def _drifting(
        self, own: tuple[np.ndarray, np.ndarray], member: np.ndarray, phase: np.ndarray
    ) -> np.ndarray:
        """sum_f cos(phase_f) x_f + sin(phase_f) y_f over (..., F) phases -> (..., D)."""
        total = np.zeros((*phase.shape[:-1], LATENT_DIM))
        for f in range(DRIFT_COMPONENTS):  # one (..., D) gather at a time keeps the temporaries small
            total += (
                np.cos(phase[..., f, None]) * own[0][member, f]
                + np.sin(phase[..., f, None]) * own[1][member, f]
            )
        return total / math.sqrt(DRIFT_COMPONENTS)

    def phase(self, member: np.ndarray, months: np.ndarray | float, drift: float) -> np.ndarray:
        """Phases (..., F) of the member's taste components `months` (30-day units) into the window."""
        return drift * np.asarray(months)[..., None] * self.frequency[member]

    def actor_latent(self, member: np.ndarray, actor: np.ndarray, phase: np.ndarray) -> np.ndarray:
        """Taste match of member x actor, ~N(0, 1) over random pairs."""
        own = self._drifting(self.actor_own, member, phase)
        taste = self.member_profile[member] + math.sqrt(1 - PROFILE_WEIGHT**2) * own
        return np.einsum("...d,...d->...", taste, self.actor_vec[actor]) / math.sqrt(LATENT_DIM)

    def topic_latent(self, member: np.ndarray, topic: np.ndarray, phase: np.ndarray) -> np.ndarray:
        own = self._drifting(self.topic_own, member, phase)
        own_match = np.einsum("...d,...d->...", own, self.topic_vec[topic]) / math.sqrt(LATENT_DIM)
        return TOPIC_PROFILE_W * self.topic_profile[member, topic] + TOPIC_OWN_W * own_match

    def pair_affinity(self, member: np.ndarray, actor: np.ndarray) -> np.ndarray:
        """Member x actor affinity that no taste vector explains: ~N(0, 1), stable, one draw per pair.

        A hash instead of a (members x actors) matrix, so memory stays linear in the world's size.
        """
        x = _splitmix64(
            (member.astype(np.uint64) << np.uint64(32)) ^ actor.astype(np.uint64) ^ self.pair_salt
        )
        u1 = ((x >> np.uint64(40)).astype(np.float64) + 0.5) / 2.0**24
        u2 = ((x & np.uint64(0xFFFFFF)).astype(np.float64) + 0.5) / 2.0**24
        return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)


@dataclass(frozen=True)
class Posts:
    """Feed posts, ids 0..n-1 in creation order."""

    actor: np.ndarray
    post_type: np.ndarray
    topic: np.ndarray
    created: np.ndarray
    quality: np.ndarray
    emb: np.ndarray  # (n, CONTENT_DIM) float32
    text: list[str]
    by_actor: np.ndarray  # post ids sorted by (actor, created)
    actor_key: np.ndarray  # actor * span + created second, aligned with by_actor (for searchsorted)
    key_span: int


@dataclass(frozen=True)
class Jobs:
    """Job postings, item ids n_posts..n_posts+n-1 in creation order."""

    company: np.ndarray  # actor id of the hiring company
    industry: np.ndarray
    topic: np.ndarray
    location: np.ndarray
    seniority: np.ndarray
    created: np.ndarray
    emb: np.ndarray
    title: list[str]
    text: list[str]
    skill_offsets: np.ndarray
    skill_ids: np.ndarray
    skill_matrix: np.ndarray  # (n, len(SKILLS)) bool
    by_industry: np.ndarray  # job indices sorted by (industry, created)
    industry_key: np.ndarray  # industry * key_span + created second, aligned with by_industry
    key_span: int
    epoch: int


@dataclass(frozen=True)
class Follows:
    member: np.ndarray  # sorted by member, then actor
    actor: np.ndarray
    created: np.ndarray
    offsets: np.ndarray  # CSR: member m follows actor[offsets[m]:offsets[m + 1]]


@dataclass(frozen=True)
class Log:
    """Impressions in (session, position) order; sessions numbered in start-time order."""

    session: np.ndarray
    member: np.ndarray
    position: np.ndarray
    timestamp: np.ndarray
    session_start: np.ndarray
    is_job: np.ndarray
    item: np.ndarray  # filled in by the candidate stage


# --- Small vectorized helpers ------------------------------------------------------------------------
_GOLDEN, _MIX1, _MIX2 = (
    np.uint64(0x9E3779B97F4A7C15),
    np.uint64(0xBF58476D1CE4E5B9),
    np.uint64(0x94D049BB133111EB),
)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """A well-mixed 64-bit hash (wrapping uint64 arithmetic is intended)."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _MIX1
    x = (x ^ (x >> np.uint64(27))) * _MIX2
    return x ^ (x >> np.uint64(31))


def _rng(seed: int, stage: str) -> np.random.Generator:
    """One independent stream per stage, so changing what one stage draws leaves the others alone."""
    return np.random.default_rng(np.random.SeedSequence([seed, *stage.encode()]))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _pick_in_ranges(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """One uniform integer in [lo, hi) per row (hi > lo)."""
    return lo + (rng.random(len(lo)) * (hi - lo)).astype(np.int64)


def _sample_subsets(
    rng: np.random.Generator, group: np.ndarray, sizes: np.ndarray, extra: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, `sizes` distinct skills of its industry `group`, plus an optional generic skill.

    Returns CSR (offsets, skill ids) in row order.
    """
    rank = np.argsort(rng.random((len(group), SKILLS_PER_INDUSTRY)), axis=1)
    ids = group[:, None] * SKILLS_PER_INDUSTRY + rank
    keep = np.arange(SKILLS_PER_INDUSTRY)[None, :] < sizes[:, None]
    if extra is not None:
        generic = len(SKILLS) - len(GENERIC_SKILLS) + rng.integers(0, len(GENERIC_SKILLS), len(group))
        ids = np.concatenate([ids, generic[:, None]], axis=1)
        keep = np.concatenate([keep, extra[:, None]], axis=1)
    counts = keep.sum(axis=1)
    offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return offsets, ids[keep].astype(np.int64)


def _skill_matrix(offsets: np.ndarray, ids: np.ndarray) -> np.ndarray:
    rows = np.repeat(np.arange(len(offsets) - 1), np.diff(offsets))
    matrix = np.zeros((len(offsets) - 1, len(SKILLS)), dtype=bool)
    matrix[rows, ids] = True
    return matrix


def _duplicates(session: np.ndarray, item: np.ndarray) -> np.ndarray:
    """True for every repeat of an item already shown earlier in the same session."""
    key = session.astype(np.int64) * (int(item.max(initial=0)) + 1) + item
    order = np.argsort(key, kind="stable")  # stable: the earliest position is the one kept
    repeat_sorted = np.zeros(len(key), dtype=bool)
    repeat_sorted[1:] = key[order][1:] == key[order][:-1]
    repeat = np.empty_like(repeat_sorted)
    repeat[order] = repeat_sorted
    return repeat


def _window(cfg: WorldConfig) -> Window:
    start = int(datetime(cfg.start.year, cfg.start.month, cfg.start.day, tzinfo=UTC).timestamp()) * SECOND
    return Window(start=start, end=start + cfg.days * DAY, epoch=start - JOB_OPEN)


# --- Stage 1: who is in the world ---------------------------------------------------------------------
def _make_members(cfg: WorldConfig, window: Window) -> Members:
    rng = _rng(cfg.seed, "members")
    n = cfg.members
    weights = np.array([ind.weight for ind in INDUSTRIES])
    industry = rng.choice(N_INDUSTRIES, n, p=weights / weights.sum())
    location = rng.choice(len(LOCATIONS), n, p=LOCATION_SHARE)
    seniority = rng.choice(len(SENIORITY_SHARE), n, p=SENIORITY_SHARE)
    role = rng.integers(0, 3, n)
    title = [
        f"{SENIORITY_TITLES[s]} {INDUSTRIES[i].roles[r]}".strip()
        for s, i, r in zip(seniority.tolist(), industry.tolist(), role.tolist(), strict=True)
    ]
    skill_offsets, skill_ids = _sample_subsets(rng, industry, rng.integers(3, 7, n), rng.random(n) < 0.6)
    # Cold-start members join during the window; the rest joined up to ten years before it.
    is_new = rng.random(n) < cfg.cold_start_fraction
    joined_before = window.start - (DAY + rng.random(n) * 3650 * DAY).astype(np.int64)
    joined_during = window.start + (rng.random(n) * (window.end - window.start)).astype(np.int64)
    join = np.where(is_new, joined_during, joined_before) // SECOND * SECOND
    # Log-normal with mean 1: sigma = activity_tail sets how heavy the tail of heavy users is.
    sigma = cfg.activity_tail
    activity = cfg.sessions_per_day * rng.lognormal(-(sigma**2) / 2, sigma, n)
    return Members(
        industry=industry,
        location=location,
        seniority=seniority,
        title=title,
        skill_offsets=skill_offsets,
        skill_ids=skill_ids,
        skill_matrix=_skill_matrix(skill_offsets, skill_ids),
        join=join,
        is_new=is_new,
        activity=activity,
    )


def _make_actors(cfg: WorldConfig) -> Actors:
    rng = _rng(cfg.seed, "actors")
    n = max(20, round(cfg.members * cfg.actors_per_member))
    weights = np.array([ind.weight for ind in INDUSTRIES])
    industry = rng.choice(N_INDUSTRIES, n, p=weights / weights.sum())
    is_company = np.zeros(n, dtype=bool)
    is_company[rng.permutation(n)[: max(1, round(0.3 * n))]] = True
    home_topic = np.where(
        rng.random(n) < 0.8,
        industry * TOPICS_PER_INDUSTRY + rng.integers(0, TOPICS_PER_INDUSTRY, n),
        rng.integers(0, N_TOPICS, n),
    )
    first, last = rng.integers(0, len(FIRST_NAMES), n), rng.integers(0, len(LAST_NAMES), n)
    head, tail = rng.integers(0, len(BRAND_HEADS), n), rng.integers(0, len(BRAND_TAILS), n)
    people = [f"{FIRST_NAMES[f]} {LAST_NAMES[s]}" for f, s in zip(first.tolist(), last.tolist(), strict=True)]
    brands = [
        f"{BRAND_HEADS[h]}{BRAND_TAILS[t]} {INDUSTRIES[i].company_suffix}"
        for h, t, i in zip(head.tolist(), tail.tolist(), industry.tolist(), strict=True)
    ]
    name = [b if c else p for c, b, p in zip(is_company.tolist(), brands, people, strict=True)]
    return Actors(
        industry=industry,
        is_company=is_company,
        home_topic=home_topic,
        favourite_type=rng.choice(N_POST_TYPES, n, p=POST_TYPE_SHARE),
        log_popularity=rng.normal(0.0, 1.0, n),
        name=name,
    )


def _make_taste(cfg: WorldConfig, members: Members, actors: Actors) -> Taste:
    rng = _rng(cfg.seed, "taste")
    m, a = len(members.industry), len(actors.industry)
    industry_vec = rng.normal(size=(N_INDUSTRIES, LATENT_DIM))
    own_weight = math.sqrt(1 - PROFILE_WEIGHT**2)
    actor_vec = PROFILE_WEIGHT * industry_vec[actors.industry] + own_weight * rng.normal(size=(a, LATENT_DIM))
    # Each industry cares most about its own two topics: what a profile says about topic taste.
    industry_topics = rng.normal(0.0, 0.5, (N_INDUSTRIES, N_TOPICS))
    for k in range(TOPICS_PER_INDUSTRY):
        industry_topics[np.arange(N_INDUSTRIES), np.arange(N_INDUSTRIES) * TOPICS_PER_INDUSTRY + k] += 1.5
    m_f_d = (m, DRIFT_COMPONENTS, LATENT_DIM)
    return Taste(
        member_profile=PROFILE_WEIGHT * industry_vec[members.industry],
        actor_own=(rng.normal(size=m_f_d), rng.normal(size=m_f_d)),
        actor_vec=actor_vec,
        topic_profile=industry_topics[members.industry],
        topic_own=(rng.normal(size=m_f_d), rng.normal(size=m_f_d)),
        topic_vec=rng.normal(size=(N_TOPICS, LATENT_DIM)),
        frequency=rng.normal(size=(m, DRIFT_COMPONENTS)),
        type_pref=rng.normal(size=(m, N_POST_TYPES)),
        style=rng.normal(size=(m, 3)),
        member_bias=rng.normal(0.0, MEMBER_BIAS_SD, m),
        actor_quality=rng.normal(0.0, ACTOR_QUALITY_SD, a),
        pair_salt=np.uint64(rng.integers(0, 2**63)),
    )


# --- Stage 2: what can be shown -----------------------------------------------------------------------
def _content_embedding(rng: np.random.Generator, topic: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Topic centroid (unit norm) plus item noise (norm ~0.57): topic is recoverable, items stay distinct."""
    noise = rng.normal(0.0, 0.1, (len(topic), CONTENT_DIM))
    return (centroids[topic] + noise).astype(np.float32)


def _topic_centroids(seed: int) -> np.ndarray:
    centroids = _rng(seed, "centroids").normal(size=(N_TOPICS, CONTENT_DIM))
    return centroids / np.linalg.norm(centroids, axis=1, keepdims=True)


def _make_posts(cfg: WorldConfig, window: Window, actors: Actors) -> Posts:
    rng = _rng(cfg.seed, "posts")
    n = max(200, round(cfg.members * cfg.posts_per_member))
    popularity = np.exp(actors.log_popularity)
    actor = rng.choice(len(popularity), n, p=popularity / popularity.sum())  # prolific actors post more
    first = window.start - MAX_POST_AGE
    created = np.sort(first + (rng.random(n) * (window.end - first)).astype(np.int64) // SECOND * SECOND)
    topic = np.where(rng.random(n) < 0.75, actors.home_topic[actor], rng.integers(0, N_TOPICS, n))
    post_type = np.where(
        rng.random(n) < 0.5, actors.favourite_type[actor], rng.choice(N_POST_TYPES, n, p=POST_TYPE_SHARE)
    )
    phrase = rng.integers(0, len(POST_PHRASES), n)
    text = [
        POST_TEMPLATES[t].format(phrase=POST_PHRASES[p].format(topic=TOPICS[k]), topic=TOPICS[k])
        for t, p, k in zip(post_type.tolist(), phrase.tolist(), topic.tolist(), strict=True)
    ]
    by_actor = np.lexsort((created, actor))
    key_span = (window.end - window.epoch) // SECOND + 2
    actor_key = actor[by_actor] * key_span + (created[by_actor] - window.epoch) // SECOND
    return Posts(
        actor=actor,
        post_type=post_type,
        topic=topic,
        created=created,
        quality=rng.normal(0.0, ITEM_QUALITY_SD, n),
        emb=_content_embedding(rng, topic, _topic_centroids(cfg.seed)),
        text=text,
        by_actor=by_actor,
        actor_key=actor_key,
        key_span=key_span,
    )


def _make_jobs(cfg: WorldConfig, window: Window, actors: Actors) -> Jobs:
    rng = _rng(cfg.seed, "jobs")
    n = max(20, round(cfg.members * cfg.jobs_per_member)) if cfg.job_sessions > 0 else 0
    companies = np.flatnonzero(actors.is_company)
    company = companies[rng.integers(0, len(companies), n)]
    industry = actors.industry[company]
    created = np.sort(
        window.epoch + (rng.random(n) * (window.end - window.epoch)).astype(np.int64) // SECOND * SECOND
    )
    topic = industry * TOPICS_PER_INDUSTRY + rng.integers(0, TOPICS_PER_INDUSTRY, n)
    location = rng.choice(len(LOCATIONS), n, p=LOCATION_SHARE)
    seniority = rng.choice(len(SENIORITY_SHARE), n, p=SENIORITY_SHARE)
    role = rng.integers(0, 3, n)
    skill_offsets, skill_ids = _sample_subsets(rng, industry, rng.integers(3, 6, n), rng.random(n) < 0.3)
    title = [
        f"{SENIORITY_TITLES[s]} {INDUSTRIES[i].roles[r]}".strip()
        for s, i, r in zip(seniority.tolist(), industry.tolist(), role.tolist(), strict=True)
    ]
    by_industry = np.lexsort((created, industry))
    key_span = (window.end - window.epoch) // SECOND + 2
    required = [", ".join(SKILLS[i] for i in skill_ids[lo:hi]) for lo, hi in pairwise(skill_offsets.tolist())]
    text = [
        f"{actors.name[c]} is hiring a {t} in {LOCATIONS[loc]} ({SENIORITY_WORDS[s]}). "
        f"You will work on {TOPICS[k]}. Required skills: {skills}."
        for c, t, loc, s, k, skills in zip(
            company.tolist(),
            title,
            location.tolist(),
            seniority.tolist(),
            topic.tolist(),
            required,
            strict=True,
        )
    ]
    return Jobs(
        company=company,
        industry=industry,
        topic=topic,
        location=location,
        seniority=seniority,
        created=created,
        emb=_content_embedding(rng, topic, _topic_centroids(cfg.seed)),
        title=title,
        text=text,
        skill_offsets=skill_offsets,
        skill_ids=skill_ids,
        skill_matrix=_skill_matrix(skill_offsets, skill_ids),
        by_industry=by_industry,
        industry_key=industry[by_industry] * key_span + (created[by_industry] - window.epoch) // SECOND,
        key_span=key_span,
        epoch=window.epoch,
    )


# --- Stage 3: the social graph ------------------------------------------------------------------------
def _make_follows(
    cfg: WorldConfig, window: Window, members: Members, actors: Actors, taste: Taste
) -> Follows:
    """Members follow the actors they like: top-n of (taste match + pair affinity + popularity + Gumbel).

    Scored over a pool of FOLLOW_POOL actors per member so the cost stays linear in the world's size.
    """
    rng = _rng(cfg.seed, "follows")
    m, a = len(members.industry), len(actors.industry)
    pool_size = min(a, FOLLOW_POOL)
    wanted = np.where(
        members.is_new, rng.poisson(2.0, m), np.round(rng.lognormal(np.log(10.0), 0.8, m)).astype(np.int64)
    )
    wanted = np.minimum(wanted, pool_size // 2)
    chosen_member, chosen_actor = [], []
    for lo in range(0, m, 4096):  # blocks of members bound the (block x pool x D) working set
        member = np.arange(lo, min(lo + 4096, m))
        if a <= FOLLOW_POOL:
            pool = np.broadcast_to(np.arange(a), (len(member), a))
        else:
            pool = rng.integers(0, a, (len(member), pool_size))
        score = (
            taste.actor_latent(member[:, None], pool, taste.phase(member[:, None], 0.0, cfg.drift))
            + taste.pair_affinity(np.broadcast_to(member[:, None], pool.shape), pool)
            + 0.5 * actors.log_popularity[pool]
            + rng.gumbel(size=pool.shape)
        )
        best = np.take_along_axis(pool, np.argsort(-score, axis=1), axis=1)
        keep = np.arange(pool_size)[None, :] < wanted[member][:, None]
        chosen_member.append(np.broadcast_to(member[:, None], pool.shape)[keep])
        chosen_actor.append(best[keep])
    # Sorted and de-duplicated (a pool drawn with replacement may hold an actor twice).
    pairs = np.unique(np.concatenate(chosen_member) * a + np.concatenate(chosen_actor))
    member, actor = pairs // a, pairs % a
    # Established members followed before the window; new members right after joining (before any session).
    join = members.join[member]
    span = np.where(members.is_new[member], 10 * 60 * SECOND, window.start - join)
    created = (join + rng.random(len(member)) * span).astype(np.int64) // SECOND * SECOND
    offsets = np.searchsorted(member, np.arange(m + 1))
    return Follows(member=member, actor=actor, created=created, offsets=offsets)


# --- Stage 4: when members show up ------------------------------------------------------------------
def _group_start_index(sorted_keys: np.ndarray) -> np.ndarray:
    """For each row of a key-sorted array, the index of the first row with the same key."""
    return np.searchsorted(sorted_keys, sorted_keys)


def _make_sessions(cfg: WorldConfig, window: Window, members: Members, posts: Posts, jobs: Jobs) -> Log:
    """Sessions per member ~ Poisson(activity x active days) at uniform times, never overlapping."""
    rng = _rng(cfg.seed, "sessions")
    active_from = np.maximum(members.join + HOUR, window.start)  # new members get an hour to set up follows
    active_days = np.maximum(window.end - active_from, 0) / DAY
    n_sessions = rng.poisson(members.activity * active_days)
    member = np.repeat(np.arange(len(n_sessions)), n_sessions)
    span_s = (window.end - active_from[member]) // SECOND
    start_s = (active_from[member] - window.start) // SECOND + (rng.random(len(member)) * span_s).astype(
        np.int64
    )
    is_job = rng.random(len(member)) < cfg.job_sessions
    feed_len = 1 + rng.negative_binomial(2, 2 / (2 + MEAN_FEED_SESSION - 1), len(member))
    job_len = 1 + rng.poisson(MEAN_JOB_SESSION - 1, len(member))
    length = np.where(is_job, np.minimum(job_len, MAX_JOB_SESSION), np.minimum(feed_len, MAX_FEED_SESSION))

    # Push each session past the end of the member's previous one: t'_k = D_k + max_{j<=k}(t_j - D_j), with
    # D_k the summed durations (upper bounds, plus breaks) of the member's earlier sessions.
    order = np.lexsort((start_s, member))
    member, start_s, is_job, length = member[order], start_s[order], is_job[order], length[order]
    duration_s = length * (MAX_SCROLL_GAP // SECOND) + SESSION_BREAK
    before = np.cumsum(duration_s) - duration_s
    before -= before[_group_start_index(member)]
    pushed = start_s - before
    shift = int(pushed.min(initial=0))
    big = int(pushed.max(initial=0)) - shift + 1
    start_s = np.maximum.accumulate(pushed - shift + member * big) - member * big + shift + before
    start = window.start + start_s * SECOND

    # Cap each session by what can be shown then (at most half the eligible items, so de-duplication is
    # quick) and drop sessions that would run past the end of the window.
    eligible_posts = np.searchsorted(posts.created, start) - np.searchsorted(
        posts.created, start - MAX_POST_AGE
    )
    open_jobs = np.searchsorted(jobs.created, start) - np.searchsorted(jobs.created, start - JOB_OPEN)
    length = np.minimum(length, np.where(is_job, open_jobs, eligible_posts) // 2)
    keep = np.flatnonzero((length > 0) & (start + length * MAX_SCROLL_GAP < window.end))

    # Number sessions in time order; impressions follow in (session, position) order.
    by_time = keep[np.lexsort((member[keep], start[keep]))]
    length = length[by_time]
    first = np.cumsum(length) - length  # index of each session's first impression
    n = int(length.sum())
    position = np.arange(n) - np.repeat(first, length)
    gap = 2 * SECOND + np.minimum(
        rng.exponential(MEAN_SCROLL_GAP - 2 * SECOND, n), MAX_SCROLL_GAP - 2 * SECOND
    )
    gap = np.where(position == 0, 0, gap.astype(np.int64))
    elapsed = np.cumsum(gap)
    elapsed -= np.repeat(elapsed[first], length)  # time since the session's first impression
    session_start = np.repeat(start[by_time], length)
    return Log(
        session=np.repeat(np.arange(len(by_time)), length),
        member=np.repeat(member[by_time], length),
        position=position,
        timestamp=session_start + elapsed,
        session_start=session_start,
        is_job=np.repeat(is_job[by_time], length),
        item=np.full(n, -1, dtype=np.int64),
    )


# --- Stage 5: what each session shows -----------------------------------------------------------------
def _recent_post_of(
    posts: Posts, window: Window, actor: np.ndarray, t: np.ndarray, rank: np.ndarray
) -> np.ndarray:
    """The actor's `rank`-th most recent post created before t (-1 if none younger than MAX_POST_AGE)."""
    hi = np.searchsorted(posts.actor_key, actor * posts.key_span + (t - window.epoch) // SECOND)
    lo = np.searchsorted(posts.actor_key, actor * posts.key_span)
    idx = hi - 1 - rank
    post = posts.by_actor[np.clip(idx, 0, len(posts.by_actor) - 1)]
    ok = (idx >= lo) & (t - posts.created[post] <= MAX_POST_AGE)
    return np.where(ok, post, -1)


def _out_of_network_post(rng: np.random.Generator, posts: Posts, t: np.ndarray, uniform: bool) -> np.ndarray:
    """Any recent post: exponential age with mean MEAN_POST_AGE (or uniform over the eligible ones)."""
    lo = np.searchsorted(posts.created, t - MAX_POST_AGE)
    hi = np.searchsorted(posts.created, t)  # posts are sorted by creation time; ids are indices
    if uniform:
        return _pick_in_ranges(rng, lo, hi)
    target = t - rng.exponential(MEAN_POST_AGE, len(t)).astype(np.int64)
    return np.clip(np.searchsorted(posts.created, target), lo, hi - 1)


def _pick_feed_items(
    rng: np.random.Generator, window: Window, session: np.ndarray, member: np.ndarray, position: np.ndarray,
    t: np.ndarray, posts: Posts, follows: Follows, burst_rate: float,
) -> np.ndarray:  # fmt: skip
    """Half the slots from followed actors' latest posts, half from all recent posts; some slots repeat the
    previous slot's actor (bursts). The order is random with respect to engagement, so position and set
    effects are identifiable from the log."""
    n = len(member)
    item = _out_of_network_post(rng, posts, t, uniform=False)
    n_follows = np.diff(follows.offsets)[member]
    in_network = (rng.random(n) < IN_NETWORK_SHARE) & (n_follows > 0)
    pick = follows.offsets[member] + (rng.random(n) * n_follows).astype(np.int64)
    followed = follows.actor[np.minimum(pick, len(follows.actor) - 1)] if len(follows.actor) else pick
    recent = _recent_post_of(posts, window, followed, t, rng.geometric(0.5, n) - 1)
    item = np.where(in_network & (recent >= 0), recent, item)
    # A burst slot shows another post by the actor of the run's first slot (position 0 never repeats).
    burst = (position > 0) & (rng.random(n) < burst_rate)
    run_head = np.maximum.accumulate(np.where(burst, 0, np.arange(n)))
    again = _recent_post_of(posts, window, posts.actor[item[run_head]], t, rng.geometric(0.5, n) - 1)
    item = np.where(burst & (again >= 0), again, item)
    # A session never shows the same post twice: redraw repeats out of network until none is left.
    for attempt in range(100):
        repeat = np.flatnonzero(_duplicates(session, item))
        if len(repeat) == 0:
            return item
        item[repeat] = _out_of_network_post(rng, posts, t[repeat], uniform=attempt >= 3)
    raise RuntimeError("could not fill feed sessions with distinct posts")  # sessions hold <= half of them


def _job_fit(members: Members, jobs: Jobs, member: np.ndarray, job: np.ndarray) -> np.ndarray:
    """Skill overlap (share of the job's required skills the member has), same location, seniority gap."""
    required = jobs.skill_matrix[job]
    overlap = (members.skill_matrix[member] & required).sum(axis=-1) / required.sum(axis=-1)
    same_location = members.location[member] == jobs.location[job]
    gap = np.abs(members.seniority[member] - jobs.seniority[job])
    return SKILL_FIT_W * overlap + LOCATION_FIT_W * same_location - SENIORITY_FIT_W * gap


def _pick_jobs(
    rng: np.random.Generator,
    session: np.ndarray,
    member: np.ndarray,
    t: np.ndarray,
    members: Members,
    jobs: Jobs,
) -> np.ndarray:
    """Open jobs: most slots from the member's own industry (a crude retrieval), the rest from anywhere."""
    lo = np.searchsorted(jobs.created, t - JOB_OPEN)
    hi = np.searchsorted(jobs.created, t)
    job = _pick_in_ranges(rng, lo, hi)
    industry_key = members.industry[member] * jobs.key_span + (t - jobs.epoch) // SECOND
    same_lo = np.searchsorted(jobs.industry_key, industry_key - JOB_OPEN // SECOND)
    same_hi = np.searchsorted(jobs.industry_key, industry_key)
    same = _pick_in_ranges(rng, same_lo, np.maximum(same_hi, same_lo + 1))
    own_industry = (rng.random(len(t)) < SAME_INDUSTRY_JOBS) & (same_hi > same_lo)
    job = np.where(own_industry, jobs.by_industry[np.minimum(same, len(jobs.by_industry) - 1)], job)
    for _ in range(100):
        repeat = np.flatnonzero(_duplicates(session, job))
        if len(repeat) == 0:
            return job
        job[repeat] = _pick_in_ranges(rng, lo[repeat], hi[repeat])
    raise RuntimeError("could not fill job sessions with distinct jobs")


def _fill_items(
    cfg: WorldConfig, window: Window, log: Log, members: Members, posts: Posts, jobs: Jobs, follows: Follows
) -> None:
    rng = _rng(cfg.seed, "candidates")
    feed, job = np.flatnonzero(~log.is_job), np.flatnonzero(log.is_job)
    log.item[feed] = _pick_feed_items(
        rng,
        window,
        log.session[feed],
        log.member[feed],
        log.position[feed],
        log.session_start[feed],
        posts,
        follows,
        cfg.burst_rate,
    )
    log.item[job] = len(posts.actor) + _pick_jobs(
        rng, log.session[job], log.member[job], log.session_start[job], members, jobs
    )


# --- Stage 6: what members do -------------------------------------------------------------------------
@dataclass(frozen=True)
class ItemView:
    """Per-impression attributes of the shown item (posts and jobs alike)."""

    actor: np.ndarray
    post_type: np.ndarray
    topic: np.ndarray
    created: np.ndarray


def _item_view(log: Log, posts: Posts, jobs: Jobs) -> ItemView:
    actor = np.concatenate([posts.actor, jobs.company])[log.item]
    post_type = np.concatenate([posts.post_type, np.full(len(jobs.company), int(PostType.JOB))])[log.item]
    topic = np.concatenate([posts.topic, jobs.topic])[log.item]
    created = np.concatenate([posts.created, jobs.created])[log.item]
    return ItemView(actor=actor, post_type=post_type, topic=topic, created=created)


def _is_followed(follows: Follows, n_actors: int, member: np.ndarray, actor: np.ndarray) -> np.ndarray:
    keys = follows.member * n_actors + follows.actor  # sorted
    query = member * n_actors + actor
    idx = np.clip(np.searchsorted(keys, query), 0, max(len(keys) - 1, 0))
    return (keys[idx] == query) if len(keys) else np.zeros(len(query), dtype=bool)


def _actions(
    cfg: WorldConfig, window: Window, log: Log, view: ItemView, members: Members, posts: Posts, jobs: Jobs,
    follows: Follows, taste: Taste,
) -> dict[Action, np.ndarray]:  # fmt: skip
    """Multi-hot actions of every impression from the engagement logits of docs/data.md.

    The draws do not depend on any knob, so worlds that differ only in effect strengths share them.
    """
    rng = _rng(cfg.seed, "outcomes")
    n = len(log.item)
    noise = rng.normal(0.0, SHARED_NOISE_SD, n)
    u = rng.random((5, n))
    position_term = -cfg.position_bias * (np.log2(1.0 + log.position) - POSITION_REFERENCE)
    base = taste.member_bias[log.member] + noise + position_term
    actions = {a: np.zeros(n, dtype=bool) for a in Action}

    f = ~log.is_job
    m, a, k, pt = log.member[f], view.actor[f], view.topic[f], view.post_type[f]
    phase = taste.phase(m, (log.timestamp[f] - window.start) / (30 * DAY), cfg.drift)
    actor_term = (
        ACTOR_TASTE_W * taste.actor_latent(m, a, phase)
        + ACTOR_PAIR_W * taste.pair_affinity(m, a)
        + FOLLOW_BOOST * _is_followed(follows, len(taste.actor_quality), m, a)
        + taste.actor_quality[a]
    )
    age_hours = (log.timestamp[f] - view.created[f]) / HOUR
    # Set-wise: fatigue from seeing the same actor (or topic) in the slot right before.
    previous_same_actor = np.zeros(len(a), dtype=bool)
    previous_same_topic = np.zeros(len(a), dtype=bool)
    later = np.flatnonzero(log.position[f] > 0)  # feed rows keep (session, position) order
    previous_same_actor[later] = a[later] == a[later - 1]
    previous_same_topic[later] = k[later] == k[later - 1]
    interest = (
        base[f]
        + cfg.actor_affinity * actor_term
        + cfg.topic_affinity * taste.topic_latent(m, k, phase)
        + cfg.post_type_preference * taste.type_pref[m, pt]
        - cfg.item_age_decay * (np.log2(1.0 + age_hours) - AGE_REFERENCE)
        - cfg.setwise_effect * (previous_same_actor + SAME_TOPIC_PENALTY * previous_same_topic)
        + posts.quality[log.item[f]]
    )
    style = cfg.member_style * taste.style[m]
    click = u[0, f] < _sigmoid(CLICK_BIAS + interest + style[:, 0] + TYPE_CLICK[pt])
    contribution = interest + style[:, 1] + np.where(click, 0.0, NO_CLICK_CONTRIBUTION)
    actions[Action.CLICK][f] = click
    actions[Action.LIKE][f] = u[1, f] < _sigmoid(LIKE_BIAS + contribution)
    actions[Action.COMMENT][f] = u[2, f] < _sigmoid(COMMENT_BIAS + contribution)
    actions[Action.SHARE][f] = u[3, f] < _sigmoid(SHARE_BIAS + contribution)
    dwell = DWELL_BIAS + interest + style[:, 2] + TYPE_DWELL[pt] + DWELL_AFTER_CLICK * click
    actions[Action.LONG_DWELL][f] = u[4, f] < _sigmoid(dwell)

    j = log.is_job
    fit = cfg.job_fit * (_job_fit(members, jobs, log.member[j], log.item[j] - len(posts.actor)) - FIT_CENTER)
    job_interest = base[j] + fit
    viewed = u[0, j] < _sigmoid(VIEW_BIAS + job_interest + cfg.member_style * taste.style[log.member[j], 0])
    actions[Action.VIEW][j] = viewed
    actions[Action.APPLY][j] = viewed & (u[1, j] < _sigmoid(APPLY_BIAS + job_interest + 0.5 * fit))
    actions[Action.DISMISS][j] = ~viewed & (u[2, j] < _sigmoid(DISMISS_BIAS - job_interest))
    return actions


# --- Tables (exactly the schemas of workloads.data.schema) ----------------------------------------------
def _timestamps(us: np.ndarray) -> pa.Array:
    return pa.array(us.astype(np.int64), type=pa.int64()).cast(TS)


def _string_lists(offsets: np.ndarray, ids: np.ndarray) -> pa.Array:
    return pa.ListArray.from_arrays(
        pa.array(offsets, pa.int32()), pa.array(np.array(SKILLS)[ids], pa.string())
    )


def _members_table(members: Members) -> pa.Table:
    n = len(members.industry)
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(n), pa.int64()),
            pa.array(members.title, pa.string()),
            _string_lists(members.skill_offsets, members.skill_ids),
            pa.array([INDUSTRIES[i].name for i in members.industry.tolist()], pa.string()),
            pa.array(np.array(LOCATIONS)[members.location], pa.string()),
            pa.array(members.seniority, pa.int8()),
            _timestamps(members.join),
            pa.array(members.activity, pa.float32()),
            _timestamps(members.join),  # a profile is valid from the day the member joined
        ],
        schema=MEMBERS,
    )


def _actors_table(actors: Actors, window: Window) -> pa.Table:
    n = len(actors.industry)
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(n), pa.int64()),
            pa.array(actors.name, pa.string()),
            pa.array(np.where(actors.is_company, "company", "member"), pa.string()),
            pa.array([INDUSTRIES[i].name for i in actors.industry.tolist()], pa.string()),
            _timestamps(np.full(n, window.epoch)),
        ],
        schema=ACTORS,
    )


def _items_table(posts: Posts, jobs: Jobs, actors: Actors) -> pa.Table:
    n_posts, n_jobs = len(posts.actor), len(jobs.company)
    created = np.concatenate([posts.created, jobs.created])
    emb = np.concatenate([posts.emb, jobs.emb]).reshape(-1)
    no_job = [None] * n_posts
    skills = pa.array(np.array(SKILLS)[jobs.skill_ids], pa.string())
    required = pa.ListArray.from_arrays(
        pa.array(np.concatenate([np.zeros(n_posts, np.int64), jobs.skill_offsets]), pa.int32()),
        skills,
        mask=pa.array(np.arange(n_posts + n_jobs) < n_posts),
    )
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(n_posts + n_jobs), pa.int64()),
            pa.array(["post"] * n_posts + ["job"] * n_jobs, pa.string()),
            pa.array(np.concatenate([posts.actor, jobs.company]), pa.int64()),
            pa.array(np.concatenate([posts.post_type, np.full(n_jobs, int(PostType.JOB))]), pa.int8()),
            pa.array(np.concatenate([posts.topic, jobs.topic]), pa.int16()),
            _timestamps(created),
            pa.array(posts.text + jobs.text, pa.string()),
            pa.FixedSizeListArray.from_arrays(pa.array(emb, pa.float32()), CONTENT_DIM),
            pa.array(no_job + jobs.title, pa.string()),
            pa.array(no_job + [actors.name[c] for c in jobs.company.tolist()], pa.string()),
            pa.array(no_job + [LOCATIONS[i] for i in jobs.location.tolist()], pa.string()),
            required,
            pa.array(no_job + jobs.seniority.tolist(), pa.int8()),
            _timestamps(created),
        ],
        schema=ITEMS,
    )


def _follows_table(follows: Follows) -> pa.Table:
    return pa.Table.from_arrays(
        [
            pa.array(follows.member, pa.int64()),
            pa.array(follows.actor, pa.int64()),
            _timestamps(follows.created),
        ],
        schema=FOLLOWS,
    )


def _impressions_table(log: Log, view: ItemView, actions: dict[Action, np.ndarray]) -> pa.Table:
    surface = pa.DictionaryArray.from_arrays(pa.array(log.is_job.astype(np.int8)), pa.array(["feed", "jobs"]))
    return pa.Table.from_arrays(
        [
            pa.array(np.arange(len(log.item)), pa.int64()),
            pa.array(log.member, pa.int64()),
            pa.array(log.item, pa.int64()),
            pa.array(log.session, pa.int64()),
            pa.array(log.position, pa.int16()),
            _timestamps(log.timestamp),
            surface.cast(pa.string()),
            pa.array(view.actor, pa.int64()),
            pa.array(view.post_type, pa.int8()),
            pa.array(view.topic, pa.int16()),
            _timestamps(view.created),
            *[pa.array(actions[a], pa.int8()) for a in Action],
        ],
        schema=IMPRESSIONS,
    )


# --- Writing: the whole world appears at once or not at all ---------------------------------------------
def _write_world(out_dir: Path, tables: dict[str, pa.Table], meta: dict[str, Any]) -> None:
    """Swap the whole world in at once: a crash leaves the previous world (or none). Only an empty
    folder or an earlier world (``world.json``) is ever replaced, never, say, a home directory."""
    with atomic_dir(out_dir, manifest="world.json") as tmp:
        for name, table in tables.items():
            pq.write_table(table, tmp / f"{name}.parquet")
        (tmp / "world.json").write_text(json.dumps(meta, indent=2) + "\n")


def _rates(log: Log, actions: dict[Action, np.ndarray]) -> dict[str, float]:
    feed, job = ~log.is_job, log.is_job
    contribution = actions[Action.LIKE] | actions[Action.COMMENT] | actions[Action.SHARE]

    def rate(flags: np.ndarray, rows: np.ndarray) -> float:
        return round(float(flags[rows].mean()), 4) if rows.any() else 0.0

    return {
        "click": rate(actions[Action.CLICK], feed),
        "contribution": rate(contribution, feed),
        "long_dwell": rate(actions[Action.LONG_DWELL], feed),
        "view": rate(actions[Action.VIEW], job),
        "apply": rate(actions[Action.APPLY], job),
        "dismiss": rate(actions[Action.DISMISS], job),
    }


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / SECOND, tz=UTC).isoformat()


def generate(cfg: WorldConfig, out_dir: Path) -> dict[str, Any]:
    """Generate the world described by `cfg` into `out_dir` (replaced atomically); return its summary."""
    began = time.perf_counter()
    out_dir = Path(out_dir)
    window = _window(cfg)
    members = _make_members(cfg, window)
    actors = _make_actors(cfg)
    taste = _make_taste(cfg, members, actors)
    posts = _make_posts(cfg, window, actors)
    jobs = _make_jobs(cfg, window, actors)
    follows = _make_follows(cfg, window, members, actors, taste)
    log = _make_sessions(cfg, window, members, posts, jobs)
    _fill_items(cfg, window, log, members, posts, jobs, follows)
    view = _item_view(log, posts, jobs)
    actions = _actions(cfg, window, log, view, members, posts, jobs, follows, taste)

    tables = {
        "members": _members_table(members),
        "actors": _actors_table(actors, window),
        "items": _items_table(posts, jobs, actors),
        "follows": _follows_table(follows),
        "impressions": _impressions_table(log, view, actions),
    }
    n_sessions = int(log.session[-1]) + 1 if len(log.session) else 0
    job_sessions = int(np.unique(log.session[log.is_job]).size)
    counts = {name: table.num_rows for name, table in tables.items()} | {
        "posts": len(posts.actor),
        "jobs": len(jobs.company),
        "sessions": n_sessions,
        "feed_sessions": n_sessions - job_sessions,
        "job_sessions": job_sessions,
        "cold_start_members": int(members.is_new.sum()),
    }
    meta = {
        "generator_version": GENERATOR_VERSION,
        "config": cfg.model_dump(mode="json"),
        "seed": cfg.seed,
        "start": _iso(window.start),
        "end": _iso(window.end),
        "items_from": _iso(window.epoch),
        "counts": counts,
        "rates": _rates(log, actions),
    }
    _write_world(out_dir, tables, meta)
    return {"out": str(out_dir), **meta, "seconds": round(time.perf_counter() - began, 2)}


class SynthStageConfig(WorldConfig):
    """`python -m workloads.data.synth`: a WorldConfig plus where to write the world."""

    out: Path | None = Field(None, description="output folder (default: data_root()/world)")


def _run(cfg: SynthStageConfig) -> dict[str, Any]:
    world = WorldConfig.model_validate(cfg.model_dump(exclude={"out"}))
    return generate(world, cfg.out or data_root() / "world")


def main(argv: list[str] | None = None) -> None:
    run_stage(SynthStageConfig, _run, argv)


if __name__ == "__main__":
    main()
