"""The engine in a child process of the replica (`engine.own_process`, the default with ep=1).

In one process, the engine thread shares the GIL with the replica's event loop and Ray Serve's
own threads (request routing, streaming replies, serialization). The engine thread takes the
GIL back after every torch op, about a thousand times per step, and each time may wait for a
thread that holds it; measured here, a background thread holding the GIL 30% of the time in
0.3 ms bursts cut engine throughput by a third on two otherwise idle cores. vLLM moved its
engine core to a process of its own for the same reason. `ProcessEngine` starts
`python -m raymoe.serve.engine_process`, which builds the `EngineCore` (loads the model) and
runs steps back to back; requests and aborts go to it over one pipe, each step's events (plus
the engine's stats and expert counts) come back over another, read by a thread of the replica
that hands them to the event loop (`StreamingEngine`).

A child that finds its pipe closed (the replica died) exits; a child that dies fails its
requests, and `check_alive` reports it so Serve restarts the replica.
"""

from __future__ import annotations

import contextlib
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from multiprocessing import Pipe
from multiprocessing.connection import Connection

import torch

from raymoe.serve.engine import EngineCore, step_or_fail
from raymoe.serve.local_engine import StreamingEngine
from raymoe.serve.request import (
    EngineOverloadedError,
    EngineStoppedError,
    GenerationRequest,
    InvalidRequestError,
    TokenEvent,
)

log = logging.getLogger(__name__)

# The child reports stats and expert counts with a step's events at most this often.
STATS_INTERVAL_S = 0.25


class ProcessEngine(StreamingEngine):
    """An `EngineCore` in a child process; implements `Engine`."""

    def __init__(self, build: Callable[[], EngineCore], num_threads: int = 0, nice: int = 0):
        """Starts the child, sends it `build` (pickled: a module-level function or a partial of
        one) and waits until it has built the core; re-raises the build's error.

        Args:
            build: makes the core, in the child.
            num_threads: torch threads of the child (0 = torch's default).
            nice: added to the child's niceness (`engine.process_nice`), before it builds.
        """
        super().__init__()
        commands_in, self._commands = Pipe(duplex=False)
        self._events, events_out = Pipe(duplex=False)
        fds = (commands_in.fileno(), events_out.fileno())
        # The child imports what this process imports (a Ray worker's path, a job's working dir).
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
        self._child = subprocess.Popen([sys.executable, "-m", __name__, *map(str, fds)], pass_fds=fds, env=env)
        commands_in.close()
        events_out.close()
        self._send_lock = threading.Lock()
        self._died: BaseException | None = None
        self._send(("build", build, num_threads, nice))
        kind, *payload = self._receive()
        if kind == "failed":
            self._child.wait()
            raise payload[0]
        self.max_seq_len, self._stats, self._counts = payload
        self._reader = threading.Thread(target=self._read, name="raymoe-engine-events", daemon=True)
        self._reader.start()

    def _send(self, message) -> None:
        with self._send_lock:  # requests come from the event loop, shutdown from any thread
            self._commands.send(message)

    def _receive(self):
        try:
            return self._events.recv()
        except (EOFError, OSError) as exc:
            code = self._child.wait()
            raise RuntimeError(f"engine process exited with code {code} (its stderr is in this process's log)") from exc

    def _read(self) -> None:
        try:
            while True:
                _, items, stats, counts = self._receive()
                if stats is not None:
                    self._stats, self._counts = stats, counts
                if items:
                    self._post(items)
        except BaseException as exc:  # noqa: BLE001 - reported by check_alive and to every waiting request
            self._died = exc
            self._post([(rid, EngineStoppedError(f"engine stopped: {exc}")) for rid in list(self._queues)])

    def _submit(self, request: GenerationRequest) -> None:
        self._send(("add", request))

    def _abort(self, request_id: str) -> None:
        if self._died is None:
            self._send(("abort", request_id))

    def check_alive(self) -> None:
        if self._died is not None or self._child.poll() is not None:
            raise EngineStoppedError(f"engine process stopped: {self._died!r} (exit code {self._child.poll()})")

    def stats(self) -> dict[str, float]:
        return dict(self._stats)

    def expert_counts(self) -> torch.Tensor:
        return torch.tensor(self._counts, dtype=torch.long)

    def close(self) -> None:
        """Stops the child (also done by the child itself when this process goes away)."""
        if self._child.poll() is None:
            with contextlib.suppress(OSError):
                self._send(("stop",))
            try:
                self._child.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._child.kill()


def _report(core: EngineCore) -> tuple[dict, list]:
    return core.stats(), core.tokens_per_expert_LE.tolist()


def serve_commands(core: EngineCore, commands: Connection, events: Connection) -> None:
    """The child's loop: apply every waiting command, run a step, send its events; block on the
    pipe while there is nothing to do (after reporting the state it waits in). Returns on "stop"
    or when the replica's end of the pipe closes."""
    last_report, idle_reported = 0.0, True
    while True:
        items: list[tuple[str, TokenEvent | BaseException]] = []
        try:
            while commands.poll() or not (core.has_work() or items):
                if not idle_reported and not commands.poll():
                    events.send(("events", [], *_report(core)))
                    idle_reported = True
                kind, *payload = commands.recv()
                idle_reported = False
                if kind == "stop":
                    return
                if kind == "abort":
                    core.abort(payload[0])
                    continue
                request = payload[0]
                try:
                    core.add_request(request)
                except (InvalidRequestError, EngineOverloadedError) as exc:
                    items.append((request.request_id, exc))  # its stream raises it
        except EOFError:
            return  # the replica is gone
        if core.has_work():
            items += step_or_fail(core)
            idle_reported = False
        report: tuple[dict | None, list | None] = (None, None)
        if time.monotonic() - last_report > STATS_INTERVAL_S:
            report, last_report = _report(core), time.monotonic()
        if items or report[0] is not None:
            events.send(("events", items, *report))


def lower_priority(nice: int) -> None:
    """Adds `nice` to the niceness of every thread of this process. Linux keeps niceness per
    thread (a new thread inherits its creator's), so the threads that importing torch may have
    started are reniced one by one; those started later (torch's OpenMP team) inherit it."""
    target = os.getpriority(os.PRIO_PROCESS, 0) + nice
    tasks = "/proc/self/task"
    for tid in os.listdir(tasks) if os.path.isdir(tasks) else ["0"]:
        with contextlib.suppress(ProcessLookupError):  # a thread that ended meanwhile
            os.setpriority(os.PRIO_PROCESS, int(tid), min(target, 19))


def main(argv: list[str]) -> None:
    commands, events = Connection(int(argv[0]), writable=False), Connection(int(argv[1]), readable=False)
    _, build, num_threads, nice = commands.recv()
    if nice:
        lower_priority(nice)
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        core = build()
    except BaseException as exc:  # noqa: BLE001 - re-raised in the replica
        try:
            events.send(("failed", exc))
        except Exception:  # noqa: BLE001 - an error that does not pickle reaches the replica as text
            events.send(("failed", RuntimeError(f"engine build failed: {exc!r}")))
        return
    events.send(("ready", core.max_seq_len, *_report(core)))
    serve_commands(core, commands, events)


if __name__ == "__main__":
    main(sys.argv[1:])
