"""The engine behind an async API: `StreamingEngine` gives each request a stream of its tokens;
`LocalEngine` runs an `EngineCore` (`raymoe.serve.engine`) in a dedicated thread of this process.
`raymoe.serve.engine_process.ProcessEngine` is the other `StreamingEngine`, with the core in a
child process.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncGenerator, Callable

import torch

from raymoe.serve.engine import EngineConfig, EngineCore, step_or_fail
from raymoe.serve.request import EngineStoppedError, GenerationRequest, TokenEvent


class StreamingEngine:
    """The async side shared by `LocalEngine` and `raymoe.serve.engine_process.ProcessEngine`:
    each request gets a queue; whatever runs the `EngineCore` hands (request id, event or error)
    pairs to `_post` from its own thread, and the event loop routes them to the queues.
    Subclasses submit and abort requests and report health, stats and expert counts."""

    max_seq_len: int

    def __init__(self) -> None:
        self._queues: dict[str, asyncio.Queue] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    def _submit(self, request: GenerationRequest) -> None:
        raise NotImplementedError

    def _abort(self, request_id: str) -> None:
        raise NotImplementedError

    def check_alive(self) -> None:
        """Raises when the engine can no longer step (Serve's health check restarts the replica)."""
        raise NotImplementedError

    def stats(self) -> dict[str, float]:
        raise NotImplementedError

    def expert_counts(self) -> torch.Tensor:
        """Tokens routed to each expert of each MoE layer since start, (layers, experts)."""
        raise NotImplementedError

    def close(self) -> None:
        """Releases what runs the core (a thread ends with its process: nothing to do)."""

    def _post(self, items: list[tuple[str, TokenEvent | BaseException]]) -> None:
        """Hands (request id, event or error) pairs to the event loop, which queues them."""
        if self._loop is None:
            return  # no request has come yet: nobody to tell
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._deliver, items)

    def _deliver(self, items) -> None:
        for rid, item in items:
            queue = self._queues.get(rid)
            if queue is not None:
                queue.put_nowait(item)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        """Streams `request`'s tokens; leaving early (client gone, stop string) aborts it."""
        self.check_alive()
        self._loop = asyncio.get_running_loop()  # the loop streaming the requests (tests make several)
        rid = request.request_id
        queue: asyncio.Queue = asyncio.Queue()
        self._queues[rid] = queue  # before the engine can produce its first event
        try:
            self._submit(request)
        except BaseException:
            self._queues.pop(rid, None)
            raise
        done = False
        try:
            while not done:
                event = await queue.get()
                if isinstance(event, BaseException):
                    done = True  # the engine already dropped it
                    raise event
                done = event.finish_reason is not None
                yield event
        finally:
            self._queues.pop(rid, None)
            if not done:
                self._abort(rid)


class LocalEngine(StreamingEngine):
    """An `EngineCore` in a dedicated thread of this process, which runs steps back to back while
    there is work and hands each step's events to the event loop. The next step starts while the
    loop is still streaming the last one's tokens. Implements `Engine`."""

    def __init__(
        self, core: EngineCore | None = None, *, build: Callable[[], EngineCore] | None = None, num_threads: int = 0
    ):
        """Starts the engine thread, which runs `build` first when given (loading the model where
        it will run, see `raymoe.serve.app.build_engine`); waits for the build and re-raises its
        error.

        Args:
            core: a built engine core.
            build: makes the core, in the engine thread.
            num_threads: torch threads of the engine thread (0 = core.config.num_threads, else
                torch's default).
        """
        if (core is None) == (build is None):
            raise ValueError("LocalEngine takes a core or a build function, not both")
        super().__init__()
        self._wake = threading.Event()
        self._died: BaseException | None = None
        self._num_threads = num_threads or (core.config.num_threads if core is not None else 0)
        self.core: EngineCore  # set by _run: the given core, or what `build` made
        if core is not None:
            given = core

            def build() -> EngineCore:
                return given

        started = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(build, started), name="raymoe-engine", daemon=True)
        self._thread.start()
        started.wait()
        if self._died is not None:
            raise self._died
        self.max_seq_len = self.core.max_seq_len

    @classmethod
    def from_model(cls, model, config: EngineConfig) -> LocalEngine:
        return cls(EngineCore(model, config))

    def _run(self, build: Callable[[], EngineCore], started: threading.Event) -> None:
        if self._num_threads:
            torch.set_num_threads(self._num_threads)  # per thread under OpenMP
        try:
            self.core = build()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the constructor
            self._died = exc
            return
        finally:
            started.set()
        try:
            while True:
                self._wake.clear()
                if not self.core.has_work():
                    self._wake.wait()
                    continue
                if items := step_or_fail(self.core):
                    self._post(items)
        except BaseException as exc:  # reported by check_alive and to every waiting request
            self._died = exc
            error = EngineStoppedError(f"engine thread stopped: {exc!r}")
            self._post([(rid, error) for rid in list(self._queues)])
            raise

    def _submit(self, request: GenerationRequest) -> None:
        self.core.add_request(request)
        self._wake.set()

    def _abort(self, request_id: str) -> None:
        self.core.abort(request_id)

    def check_alive(self) -> None:
        if self._died is not None or not self._thread.is_alive():
            raise EngineStoppedError(f"engine thread stopped: {self._died!r}")

    def stats(self) -> dict[str, float]:
        return self.core.stats()

    def expert_counts(self) -> torch.Tensor:
        return self.core.tokens_per_expert_LE.clone()
