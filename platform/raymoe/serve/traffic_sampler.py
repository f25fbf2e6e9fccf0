"""Live traffic sampled into Parquet windows, the input of the drift job.

The HTTP layer asks `TrafficSampler.start` for a `RequestFeatures` per request; a sampled one
(`sample_rate`, seeded) runs with `GenerationRequest.record_features`, so the engine puts the
chosen token's log-probability on every event and the pooled prompt embedding on the first. When
the request has finished (aborted and failed ones never get there) the HTTP layer hands it to
`record`. A background thread writes the buffered rows as one Parquet file per window, after
`window_seconds` or `window_requests` sampled rows, whichever comes first, and `close` writes what
is left when the replica stops. A window without sampled rows is not written (its expert load is
dropped with it). `raymoe.monitor.traffic_windows` reads the files.

File: `<output_dir>/window-<end unix ms, 13 digits>-<replica tag>.parquet`, written atomically
(`raymoe.atomic_io`). One row per sampled finished request:
  prompt_length         int32    prompt tokens
  output_length         int32    generated tokens (a final end token included, as in `usage`)
  mean_logprob          float64  mean log-probability of the generated tokens under the model's
                                 distribution (log_softmax of the raw logits: before temperature,
                                 top-k, top-p), nats; null when unknown or no tokens
  prompt_token_buckets  list<int32>, K long: prompt tokens per bucket, token t in bucket
                                 t * K // V (K = min(token_buckets, V), V the tokenizer's vocabulary)
  embedding             list<float32>: final hidden state after the final norm at the last
                                 prompt position (last-token pooling; the row that produced the
                                 first generated token); null when `embedding` is off, with
                                 expert-parallel shard workers (ep > 1), or from an engine that
                                 does not report it
  adapter               string   LoRA adapter (null = base model)
  finished_at           float64  unix seconds
  prompt_text, output_text  string, only with `store_text` (otherwise no text leaves the replica)
Schema metadata `raymoe.window`: JSON {format: 1, start, end (unix s), model, vocab_size,
token_buckets, sample_rate, num_requests_seen (every finished request of the window, sampled or
not), num_sampled (rows), expert_load: L x E tokens routed per expert per MoE layer during the
window over all traffic (difference of the engine's cumulative `expert_counts()` at the window's
start and end; a process engine's counts trail by up to its report interval, 0.25 s, while busy)}.
"""

from __future__ import annotations

import json
import logging
import os
import random
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from raymoe.atomic_io import atomic_write
from raymoe.config import require
from raymoe.serve.request import TokenEvent

log = logging.getLogger(__name__)

FORMAT = 1
META_KEY = "raymoe.window"


@dataclass(kw_only=True)
class TrafficConfig:
    """Traffic sampling of a serving replica (`app.traffic`)."""

    enabled: bool = False
    # Directory the window files go to (a local path or a mounted volume); required when enabled.
    output_dir: str = ""
    # Fraction of finished requests recorded, decided per request with a seeded generator.
    sample_rate: float = 1.0
    # A window is written after this many seconds or `window_requests` sampled requests,
    # whichever comes first.
    window_seconds: float = 300.0
    window_requests: int = 1000
    # Buckets of the prompt token histogram (capped at the vocabulary size).
    token_buckets: int = 256
    # Record the pooled prompt embedding (D floats per sampled request).
    embedding: bool = True
    # Also write prompt and output text; off by default so no raw text leaves the replica.
    store_text: bool = False
    # Seed of the per-request sampling decision.
    seed: int = 0

    def __post_init__(self) -> None:
        require(
            not self.enabled or bool(self.output_dir),
            "app.traffic.output_dir must be set when app.traffic.enabled is true",
        )
        require(0 < self.sample_rate <= 1, f"app.traffic.sample_rate must be in (0, 1], got {self.sample_rate}")
        require(self.window_seconds > 0, f"app.traffic.window_seconds must be > 0, got {self.window_seconds}")
        require(self.window_requests >= 1, f"app.traffic.window_requests must be >= 1, got {self.window_requests}")
        require(self.token_buckets >= 1, f"app.traffic.token_buckets must be >= 1, got {self.token_buckets}")


@dataclass
class RequestFeatures:
    """One request as the sampler sees it; the HTTP layer feeds it every (text, event) pair."""

    prompt_ids: list[int]
    adapter: str | None
    sampled: bool
    # Set only when the text is kept (`store_text`); then the output text is collected too.
    prompt_text: str | None = None
    num_tokens: int = 0
    logprob_sum: float = 0.0
    # False once an event came without `chosen_logprob` (mean_logprob is then null).
    logprobs_known: bool = True
    embedding: list[float] | None = None
    text: list[str] = field(default_factory=list)

    def add(self, delta: str, event: TokenEvent) -> None:
        if not self.sampled:
            return
        self.num_tokens += 1
        if event.chosen_logprob is None:
            self.logprobs_known = False
        else:
            self.logprob_sum += event.chosen_logprob
        if event.embedding is not None and self.embedding is None:
            self.embedding = event.embedding
        if self.prompt_text is not None:
            self.text.append(delta)

    @property
    def mean_logprob(self) -> float | None:
        return self.logprob_sum / self.num_tokens if self.logprobs_known and self.num_tokens else None


def bucket_counts(prompt_ids: list[int], vocab_size: int, num_buckets: int) -> np.ndarray:
    """Prompt tokens per bucket; token t goes to bucket t * K // vocab_size (K = num_buckets)."""
    ids = np.asarray(prompt_ids, dtype=np.int64)
    return np.bincount(ids * num_buckets // vocab_size, minlength=num_buckets).astype(np.int32)


def window_schema(store_text: bool):
    """The Parquet schema of a window file (without its metadata)."""
    import pyarrow as pa

    fields = [
        pa.field("prompt_length", pa.int32(), nullable=False),
        pa.field("output_length", pa.int32(), nullable=False),
        pa.field("mean_logprob", pa.float64()),
        pa.field("prompt_token_buckets", pa.list_(pa.int32()), nullable=False),
        pa.field("embedding", pa.list_(pa.float32())),
        pa.field("adapter", pa.string()),
        pa.field("finished_at", pa.float64(), nullable=False),
    ]
    if store_text:
        fields += [pa.field("prompt_text", pa.string()), pa.field("output_text", pa.string())]
    return pa.schema(fields)


def default_replica_tag() -> str:
    """`<host>-<pid>`, for a sampler outside Ray Serve."""
    return safe_tag(f"{socket.gethostname()}-{os.getpid()}")


_TAG_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-")


def safe_tag(tag: str) -> str:
    """`tag` with every character outside [A-Za-z0-9_.-] replaced by '_' (it becomes a file name)."""
    return "".join(c if c in _TAG_CHARS else "_" for c in tag) or "replica"


@dataclass
class _Window:
    """An ended window waiting to be written."""

    rows: list[dict[str, Any]]
    num_seen: int
    start: float
    end: float
    load_LE: np.ndarray


class TrafficSampler:
    """Buffers sampled requests of one replica and writes them as Parquet windows."""

    def __init__(
        self,
        config: TrafficConfig,
        *,
        model_id: str,
        vocab_size: int,
        expert_counts: Callable[[], Any],
        replica_tag: str | None = None,
        clock: Callable[[], float] = time.time,
        background: bool = True,
    ):
        """Starts the first window; with `background`, also the thread that writes windows.

        Args:
            config: the traffic settings (its output_dir is created).
            model_id: written into each window's metadata.
            vocab_size: tokenizer vocabulary (prompt token ids are below it), for the buckets.
            expert_counts: the engine's cumulative tokens per expert per MoE layer, (L, E).
            replica_tag: part of the file names, unique per replica (default host and pid).
            clock: unix seconds (tests pass a fake one).
            background: start the thread that writes full windows and ends windows on time;
                without it only `flush` and `close` write.
        """
        Path(config.output_dir).mkdir(parents=True, exist_ok=True)  # an unwritable place fails here
        self.config = config
        self.model_id = model_id
        self.vocab_size = vocab_size
        self.num_buckets = min(config.token_buckets, vocab_size)
        self.replica_tag = safe_tag(replica_tag) if replica_tag else default_replica_tag()
        self._expert_counts = expert_counts
        self._clock = clock
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()  # the open window and the ended ones (event loop vs. writer)
        self._write_lock = threading.Lock()  # one writer at a time, windows in order
        self._rows: list[dict[str, Any]] = []
        self._num_seen = 0
        self._window_start = clock()
        self._last_counts_LE = self._counts_now()
        self._ended: list[_Window] = []
        self._last_end_ms = 0
        self.num_windows = 0
        self.num_failed_windows = 0
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread = None
        if background:
            self._thread = threading.Thread(target=self._run, name="raymoe-traffic", daemon=True)
            self._thread.start()

    def start(
        self, prompt_ids: list[int], adapter: str | None = None, prompt_text: Callable[[], str] | None = None
    ) -> RequestFeatures:
        """Decides whether a new request is sampled (run it with `record_features` if so).

        Args:
            prompt_ids: the prompt's token ids.
            adapter: the LoRA adapter it runs with (None = base model).
            prompt_text: gives the prompt as text; called only for a sampled request with
                `store_text`.
        """
        sampled = self._rng.random() < self.config.sample_rate
        text = prompt_text() if sampled and self.config.store_text and prompt_text is not None else None
        return RequestFeatures(prompt_ids=prompt_ids, adapter=adapter, sampled=sampled, prompt_text=text)

    def record(self, request: RequestFeatures) -> None:
        """Counts a finished request and buffers its row when it was sampled; the row that fills
        the window ends it (the background thread writes it). Never raises: a failure here is
        logged, it does not fail the request."""
        try:
            row = self._row(request) if request.sampled else None
            with self._lock:
                self._num_seen += 1
                if row is None:
                    return
                self._rows.append(row)
                if len(self._rows) < self.config.window_requests:
                    return
                self._ended.append(self._end_window())
            self._wake.set()
        except Exception:  # monitoring must not break serving
            log.exception("traffic: could not record a request")

    def _row(self, r: RequestFeatures) -> dict[str, Any]:
        cfg = self.config
        row = {
            "prompt_length": len(r.prompt_ids),
            "output_length": r.num_tokens,
            "mean_logprob": r.mean_logprob,
            "prompt_token_buckets": bucket_counts(r.prompt_ids, self.vocab_size, self.num_buckets),
            "embedding": r.embedding if cfg.embedding else None,
            "adapter": r.adapter,
            "finished_at": self._clock(),
        }
        if cfg.store_text:
            row["prompt_text"] = r.prompt_text
            row["output_text"] = "".join(r.text)
        return row

    def _counts_now(self) -> np.ndarray:
        counts = np.array(self._expert_counts(), dtype=np.int64)  # a copy: the source may change
        return counts.reshape(0, 0) if counts.size == 0 else counts

    def _end_window(self) -> _Window:
        """Ends the open window and opens the next (the caller holds `_lock`)."""
        end, counts_LE = self._clock(), self._counts_now()
        window = _Window(self._rows, self._num_seen, self._window_start, end, counts_LE - self._last_counts_LE)
        self._rows, self._num_seen, self._window_start, self._last_counts_LE = [], 0, end, counts_LE
        return window

    def flush(self) -> list[Path]:
        """Ends the open window and writes every ended window that has rows (an empty one is
        dropped, its expert load with it).

        Returns:
            The files written, oldest first.

        Raises:
            OSError: a file could not be written (its rows are lost; nothing partial is left);
                the other windows are written first.
        """
        with self._lock:
            self._ended.append(self._end_window())
        return self._write_ended()

    def _write_ended(self) -> list[Path]:
        with self._write_lock:
            with self._lock:
                windows, self._ended = self._ended, []
            paths, errors = [], []
            for window in windows:
                if not window.rows:
                    continue
                try:
                    paths.append(self._write(window))
                except Exception as exc:  # noqa: BLE001 - raised once the others are written
                    errors.append(exc)
            self.num_windows += len(paths)
            self.num_failed_windows += len(errors)
            if errors:
                raise errors[0]
            return paths

    def _write(self, window: _Window) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # Two windows ending in the same millisecond (a close right after a full window) must
        # not share a name.
        end_ms = max(round(window.end * 1000), self._last_end_ms + 1)
        self._last_end_ms = end_ms
        meta = {
            "format": FORMAT,
            "start": window.start,
            "end": window.end,
            "model": self.model_id,
            "vocab_size": self.vocab_size,
            "token_buckets": self.num_buckets,
            "sample_rate": self.config.sample_rate,
            "num_requests_seen": window.num_seen,
            "num_sampled": len(window.rows),
            "expert_load": window.load_LE.tolist(),
        }
        schema = window_schema(self.config.store_text).with_metadata({META_KEY: json.dumps(meta)})
        table = pa.Table.from_pylist(window.rows, schema=schema)
        path = Path(self.config.output_dir) / f"window-{end_ms:013d}-{self.replica_tag}.parquet"
        return atomic_write(path, lambda tmp: pq.write_table(table, tmp))

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                ended = bool(self._ended)
                seconds_left = self._window_start + self.config.window_seconds - self._clock()
            if ended:
                self._logged(self._write_ended)
            elif seconds_left > 0:
                self._wake.wait(timeout=seconds_left)
                self._wake.clear()  # the state is read again, so a wake-up lost here is harmless
            else:
                self._logged(self.flush)

    def _logged(self, write: Callable[[], list[Path]]) -> None:
        try:
            write()
        except Exception:  # the next window is tried again
            log.exception("traffic: writing a window to %s failed; its rows are lost", self.config.output_dir)

    def close(self) -> None:
        """Stops the thread and writes the last windows (the replica is going away)."""
        if self._stop.is_set():
            return
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self._logged(self.flush)
