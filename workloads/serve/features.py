"""The feature fetcher: one deployment that reads members' histories and items' features from Feast.

Requests that arrive together are read together (``@serve.batch``): one online read per feature view
for the whole batch (member history, member profile, the union of candidate and history items, and the
counter views holding the counters the model reads, those features only: `model_counters`), the batched
`OnlineFeatures` API of ``workloads.data.features``.
The online store is whatever the repo's feature_store.yaml says (SQLite by default; Redis when
``FEAST_FS_YAML_FILE_PATH`` names feature_store.redis.yaml in the application's runtime_env).

A read that fails or exceeds ``timeout_s`` is retried a bounded number of times (tenacity); after
that the request gets a 503 with the reason, never a hang. Reads run on a small thread pool so a
store that hangs cannot pile up threads without bound: once the pool is busy, attempts time out.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from ray import serve
from tenacity import AsyncRetrying, stop_after_attempt, wait_exponential

from workloads.data.features import HISTORY_ARRAYS, OnlineFeatures, age_buckets
from workloads.data.schema import CONTENT_DIM, COUNTER_FEATURES
from workloads.serve.batching import configure_batching
from workloads.serve.errors import ServeError, client_error, unavailable
from workloads.serve.schemas import InlineItem

# what collate reads (workloads.models.batch), plus topic for the counters
HISTORY_COLUMNS = [name for name in HISTORY_ARRAYS if name != "hist_timestamp"]
CANDIDATE_ITEM_FIELDS = ["actor_id", "post_type", "topic"]
_UNKNOWN_LISTED = 10  # unknown item ids named in the error message
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def model_counters(model: Any) -> list[str]:
    """The counters a ranking model config reads, what serving must fetch for it: DCNv2 all of
    ``COUNTER_FEATURES``, LiGR and HSTU their ``candidate_counters`` (none by default)."""
    if model.kind == "dcnv2":
        return list(COUNTER_FEATURES)
    return list(getattr(model, "candidate_counters", ()))


@dataclass
class FetchRequest:
    member_id: int
    candidates: np.ndarray  # (S,) int64 item ids, distinct
    inline_items: list[InlineItem]  # features of candidates the store may not know
    as_of_us: int  # item ages are measured at this time (us since the epoch)


@dataclass
class RequestFeatures:
    """What the scorer needs for one request, in the column names of ``workloads.models.batch.collate``."""

    member_id: int
    member_known: bool  # the member has a profile row
    history: dict[str, np.ndarray]  # HISTORY_COLUMNS, the last max_history events in time order
    hist_content: np.ndarray  # (H, E) float32
    candidates: dict[str, np.ndarray]  # cand_item_id, cand_actor_id, ..., cand_<counter> (those read)
    cand_content: np.ndarray  # (S, E) float32
    read_ms: float  # the batch's store reads

    @property
    def history_len(self) -> int:
        return len(self.history["hist_item_id"])


class FeatureReader:
    """Batched online reads with a timeout and bounded retries; usable without Ray Serve."""

    def __init__(
        self,
        feature_repo: str | Path,
        max_history: int,
        counters: Sequence[str] = (),
        timeout_s: float = 1.0,
        attempts: int = 3,
    ) -> None:
        """``counters``: the ones the model reads (`model_counters`): only their views are read, and
        those must have been materialized."""
        self.online = OnlineFeatures(Path(feature_repo))
        empty = self.online.never_materialized(counters)  # also refuses unknown names
        self.counters = tuple(counters)
        if empty:
            raise RuntimeError(
                f"the model reads counters {sorted(self.counters)} but feature view(s) {empty} were never "
                f"materialized into the online store of {feature_repo}: run `rankray features materialize` "
                "(all views, or --service with a feature service that holds them, e.g. ligr_v2)"
            )
        self.max_history = max_history
        self.timeout_s, self.attempts = timeout_s, attempts
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="feast-read")

    async def read(self, requests: list[FetchRequest]) -> list[RequestFeatures | ServeError]:
        """Features per request, or the client error of that request (unknown items); 503 on outage."""
        loop = asyncio.get_running_loop()
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.attempts),  # so at most attempts * (timeout_s + 0.5 s)
            wait=wait_exponential(multiplier=0.05, max=0.5),
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    return await asyncio.wait_for(
                        loop.run_in_executor(self._pool, self.read_now, requests), self.timeout_s
                    )
        except TimeoutError:
            raise unavailable(
                f"feature store: no answer within {self.timeout_s}s (tried {self.attempts} times)"
            ) from None
        except Exception as err:  # whatever the store's client raises: sqlite3, redis, protobuf
            raise unavailable(f"feature store: {type(err).__name__}: {err}") from None
        raise AssertionError("unreachable: tenacity either returns or reraises")

    def read_now(self, requests: list[FetchRequest]) -> list[RequestFeatures | ServeError]:
        began = time.perf_counter()
        member_ids = sorted({r.member_id for r in requests})
        histories = self.online.member_history(member_ids)
        profiles = self.online.member_profile(member_ids)
        row_of = {m: i for i, m in enumerate(member_ids)}
        history_items = {m: self._history(histories, row_of[m]) for m in member_ids}
        item_ids = np.unique(
            np.concatenate(
                [r.candidates for r in requests] + [h["hist_item_id"] for h in history_items.values()]
            )
        )
        items = self.online.item_features(item_ids.tolist())  # rows in item_ids order
        if items["content_emb"].shape[1] == 0:  # the store found none of them, so it knows no width
            items["content_emb"] = np.zeros((len(item_ids), CONTENT_DIM), dtype=np.float32)
        out: list[RequestFeatures | ServeError] = []
        for request in requests:
            history = history_items[request.member_id]
            hist_rows = np.searchsorted(item_ids, history["hist_item_id"])
            cand_rows = np.searchsorted(item_ids, request.candidates)
            candidates = self._candidates(request, items, cand_rows)
            if isinstance(candidates, ServeError):
                out.append(candidates)
                continue
            columns, cand_content = candidates
            out.append(
                RequestFeatures(
                    member_id=request.member_id,
                    member_known=profiles["title"][row_of[request.member_id]] is not None,
                    history=history,
                    hist_content=items["content_emb"][hist_rows],
                    candidates=columns,
                    cand_content=cand_content,
                    read_ms=0.0,
                )
            )
        if self.counters:
            self._add_counters([f for f in out if isinstance(f, RequestFeatures)])
        read_ms = (time.perf_counter() - began) * 1e3
        for features in out:
            if isinstance(features, RequestFeatures):
                features.read_ms = read_ms
        return out

    def _history(self, histories: dict[str, Any], row: int) -> dict[str, np.ndarray]:
        """One member's last ``max_history`` events (an unknown member has none: cold start)."""
        return {
            name: histories[name][row][-self.max_history :].astype(np.int64, copy=False)
            for name in HISTORY_COLUMNS
        }

    def _candidates(
        self, request: FetchRequest, items: dict[str, Any], rows: np.ndarray
    ) -> tuple[dict[str, np.ndarray], np.ndarray] | ServeError:
        """Candidate columns from the store, inline features for items it has not seen."""
        found = items["found"][rows]
        fields = {name: items[name][rows].astype(np.int64) for name in CANDIDATE_ITEM_FIELDS}
        created_at = items["created_at"][rows].astype(np.int64)
        content = items["content_emb"][rows]  # a copy (fancy indexing)
        inline = {item.item_id: item for item in request.inline_items}
        missing = []
        for index in np.flatnonzero(~found):
            item_id = int(request.candidates[index])
            given = inline.get(item_id)
            if given is None:
                missing.append(item_id)
                continue
            for name in CANDIDATE_ITEM_FIELDS:
                fields[name][index] = getattr(given, name)
            created_at[index] = (given.created_at - EPOCH) // timedelta(microseconds=1)
            content[index] = given.content_emb
        if missing:
            listed = ", ".join(map(str, missing[:_UNKNOWN_LISTED]))
            listed += " ..." if len(missing) > _UNKNOWN_LISTED else ""
            return client_error(
                "unknown_items",
                "candidates",
                f"{len(missing)} item(s) are not in the feature store and have no item_features: {listed}",
            )
        columns = {
            "cand_item_id": request.candidates.astype(np.int64),
            **{f"cand_{name}": values for name, values in fields.items()},
            "cand_age_bucket": age_buckets(request.as_of_us - created_at).astype(np.int64),
            "cand_position": np.arange(len(rows), dtype=np.int64),
        }
        return columns, content

    def _add_counters(self, batch: list[RequestFeatures]) -> None:
        """The hand-crafted counters the model reads, one online read per view that holds some of them."""
        if not batch:
            return
        queries = pd.DataFrame(
            {
                "member_id": np.concatenate(
                    [np.full(len(f.candidates["cand_item_id"]), f.member_id) for f in batch]
                ),
                "item_id": np.concatenate([f.candidates["cand_item_id"] for f in batch]),
                "actor_id": np.concatenate([f.candidates["cand_actor_id"] for f in batch]),
                "topic": np.concatenate([f.candidates["cand_topic"] for f in batch]),
            }
        )
        counters = self.online.counters(queries, self.counters)
        values = {name: counters[name].to_numpy(dtype=np.float32) for name in self.counters}
        start = 0
        for features in batch:
            n = len(features.candidates["cand_item_id"])
            for name in self.counters:
                features.candidates[f"cand_{name}"] = values[name][start : start + n]
            start += n


@serve.deployment(max_ongoing_requests=64, ray_actor_options={"num_cpus": 0.25})
class FeatureFetcher:
    """Reads the features of the requests that arrive together in one batch of online reads."""

    def __init__(
        self,
        feature_repo: str,
        max_history: int,
        counters: Sequence[str],
        timeout_s: float,
        attempts: int,
        max_batch_size: int,
        batch_wait_timeout_s: float,
    ) -> None:
        self.reader = FeatureReader(feature_repo, max_history, counters, timeout_s, attempts)
        configure_batching(self.fetch, max_batch_size, batch_wait_timeout_s)

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.002)
    async def fetch(self, requests: list[FetchRequest]) -> list[RequestFeatures | ServeError]:
        """Features per request; a request's own mistake (unknown items) comes back as its ServeError,
        as a value, so it neither fails its batch mates nor logs a stack trace."""
        return await self.reader.read(requests)
