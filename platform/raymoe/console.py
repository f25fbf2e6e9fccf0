"""The one console style of every job: a tqdm bar while a stage runs, one line when it is done.

    ✓ train: 300 steps, loss 7.62 -> 4.97, ep=2 x dp=1 (94 s)
    ↺ train: reused (300 steps, loss 7.62 -> 4.97, ep=2 x dp=1)
    ✗ train failed after 12 s: <the error>; its output: runs/demo/logs/train.log

A line saying `step N/M` (the training and fine-tuning loops' console lines, the federated rounds')
moves the stage's bar. Bars go to stderr, the one-line results to stdout. Two ways to run:
- with a `log_dir` (the demo): whatever a stage prints (the library calls' own lines, Ray's worker
  lines forwarded to the driver, loggers writing to the console) goes to `<log_dir>/<stage>.log`
  instead, so the console shows only bars and result lines; `verbose` keeps every stage's output on
  the console and draws no bars;
- without one (`python -m pipelines.<name>`, `raymoe <name>`): the output passes through to the
  console, above the bar on a terminal; where stderr is not a terminal (a log file, `ray job
  submit`) no bar is drawn, and the output and result lines read as a plain log.
"""

from __future__ import annotations

import contextlib
import io
import logging
import re
import shutil
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TextIO

# `step 20/300 ...` (training, fine-tuning) and `round 2/3 ...` (federated) lines move a bar.
STEP_LINE = re.compile(r"\b(?:step|round) (\d+)/(\d+)\b")
# How much of a line without its newline yet (tqdm's carriage-return updates) is kept for matching.
MAX_PARTIAL = 4096


class JobFailed(Exception):
    """A job's own failure (a training run that ended in error, data that cannot be compared), not
    a bug: the stage's ✗ line says it and the pipeline exits non-zero without a traceback."""


class _StageStream(io.TextIOBase):
    """Stands in for a console stream (sys.stdout or sys.stderr): while a stage runs, what is
    written goes to the stage's sink (its log, or the console) and each complete line to the
    stage (`route`); between stages it goes to the console stream itself. A logger that took this
    stream as sys.stderr during one stage therefore writes to the next stage's sink, never to a
    closed file."""

    def __init__(self, console: TextIO):
        self._console = console
        self._sink: TextIO | None = None
        self._on_line: Callable[[str], None] = lambda line: None
        self._lock = threading.Lock()  # Ray's log thread and the stage write at once
        self._partial = ""

    def route(self, sink: TextIO | None, on_line: Callable[[str], None] = lambda line: None) -> None:
        """Sends what is written to `sink` (and its lines to `on_line`); None = to the console
        with no line handling. The console itself may be the sink."""
        with self._lock:
            if self._sink is not None:
                self._sink.flush()
            self._sink, self._on_line, self._partial = sink, on_line, ""

    @property
    def console(self) -> TextIO:
        """The console stream this one stands in for."""
        return self._console

    @property
    def encoding(self) -> str:  # type: ignore[override]  # TextIOBase declares it a plain attribute
        return "utf-8"

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return (self._sink or self._console).fileno()

    def write(self, text: str) -> int:
        with self._lock:
            if self._sink is None:
                self._console.write(text)
                return len(text)
            self._sink.write(text)
            *lines, partial = (self._partial + text).split("\n")
            self._partial = partial[-MAX_PARTIAL:]
            on_line = self._on_line
        for line in lines:
            on_line(line)
        return len(text)

    def flush(self) -> None:
        with self._lock:
            (self._sink or self._console).flush()


class _AboveBar(io.TextIOBase):
    """A stage's sink on a terminal while its bar is drawn: each complete line is written above the
    bar (the bar is cleared, the line written, the bar drawn again); partial lines wait."""

    def __init__(self, console: TextIO, bar):
        self._console, self._bar, self._partial = console, bar, ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            self._bar.clear()
            self._console.write("".join(line + "\n" for line in lines))
            self._console.flush()
            self._bar.refresh()
        return len(text)

    def flush(self) -> None:
        self._console.flush()


class Stage:
    """A running stage: its bar, its log file and the summary line it ends with."""

    def __init__(self, name: str, bar, log_path: Path | None):
        self.name, self.bar, self.log_path = name, bar, log_path
        self.summary = ""
        self.started = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.started

    def advance(self, n: int = 1) -> None:
        """Moves the bar `n` units on (requests sent, rounds done)."""
        if self.bar is not None:
            self.bar.update(n)

    def set_progress(self, n: int, total: int | None = None) -> None:
        """Puts the bar at `n` (of `total`, when the stage learns it only now)."""
        if self.bar is None:
            return
        if total is not None and total != self.bar.total:
            self.bar.total = total
        self.bar.n = min(n, self.bar.total) if self.bar.total else n
        self.bar.refresh()

    def on_line(self, line: str) -> None:
        """Moves the bar to the step of a `step N/M` line."""
        match = STEP_LINE.search(line)
        if match:
            self.set_progress(int(match.group(1)), int(match.group(2)))


class Console:
    """Where a job talks to its user (see the module docstring)."""

    def __init__(
        self,
        log_dir: Path | None = None,
        *,
        verbose: bool = False,
        out: TextIO | None = None,
        err: TextIO | None = None,
    ):
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.verbose = verbose
        self.out = out or sys.stdout
        self.err = err or sys.stderr
        self.tty = self.err.isatty()
        # What sys.stdout and sys.stderr are while a stage runs (and stay, for whoever kept them).
        self._streams = (_StageStream(self.out), _StageStream(self.err))

    def line(self, text: str) -> None:
        print(text, file=self.out, flush=True)

    def reused(self, name: str, summary: str) -> None:
        self.line(f"↺ {name}: reused" + (f" ({summary})" if summary else ""))

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None, unit: str = "step", *, bar: bool = True) -> Iterator[Stage]:
        """Runs the body as stage `name`: a bar (of `total` `unit`s, or a clock when None) while it
        runs, then `✓ name: <stage.summary> (N s)`; on an exception, the `✗` line (and, with a
        log, the log's last lines), and the exception goes on. `bar=False`: the body draws its own
        bars (ingest's per-phase bars), so a stage without a log draws none."""
        if self.verbose:
            self.line(f"▶ {name}")
            stage = Stage(name, None, None)
            try:
                yield stage
            except BaseException as exc:
                self._failed(stage, exc)
                raise
            self.line(f"✓ {name}: {stage.summary} ({stage.seconds:.0f} s)")
            return
        if self.log_dir is None:
            with self._passed_through(name, total, unit, bar) as stage:
                yield stage
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        with (
            self._with_bar(name, total, unit, log_path) as stage,
            open(log_path, "a", encoding="utf-8", buffering=1) as log,
        ):
            log.write(f"--- {name} started {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
            with self._captured(log, stage.on_line):
                yield stage

    @contextlib.contextmanager
    def _passed_through(self, name: str, total: int | None, unit: str, bar: bool) -> Iterator[Stage]:
        """A stage whose output stays on the console: above its bar on a terminal, as it is
        (no bar) elsewhere."""
        if not (self.tty and bar):
            stage = Stage(name, None, None)
            try:
                with self._captured(None, stage.on_line):
                    yield stage
            except BaseException as exc:
                self._failed(stage, exc)
                raise
            self.line(f"✓ {name}: {stage.summary} ({stage.seconds:.0f} s)")
            return
        with self._with_bar(name, total, unit, None) as stage:
            above = _AboveBar(self.out, stage.bar)
            with self._captured(above, stage.on_line):  # type: ignore[arg-type]  # a TextIO enough
                yield stage

    @contextlib.contextmanager
    def _with_bar(self, name: str, total: int | None, unit: str, log_path: Path | None) -> Iterator[Stage]:
        """Draws the stage's bar (its clock ticking) around the body, then its result line."""
        bar = self._bar(name, total, unit)
        stage = Stage(name, bar, log_path)
        stop = threading.Event()
        ticker = threading.Thread(target=self._tick, args=(bar, stop), daemon=True)
        ticker.start()
        try:
            yield stage
        except BaseException as exc:
            stop.set()
            bar.close()
            self._failed(stage, exc)
            raise
        stop.set()
        bar.close()
        self.line(f"✓ {name}: {stage.summary} ({stage.seconds:.0f} s)")

    @contextlib.contextmanager
    def quiet(self, name: str) -> Iterator[None]:
        """Runs the body with its output in `<log_dir>/<name>.log` (no bar, no line); without a
        log directory the output stays on the console."""
        if self.verbose or self.log_dir is None:
            yield
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with (
            open(self.log_dir / f"{name}.log", "a", encoding="utf-8", buffering=1) as log,
            self._captured(log, lambda line: None),
        ):
            yield

    @contextlib.contextmanager
    def _captured(self, sink: TextIO | None, on_line: Callable[[str], None]) -> Iterator[None]:
        """sys.stdout, sys.stderr and every logging handler writing to the console -> `sink`
        (None: each to its own console stream), and every complete line to `on_line`."""
        out, err = self._streams
        consoles = {id(s): out for s in (self.out, sys.stdout, sys.__stdout__)}
        consoles.update({id(s): err for s in (self.err, sys.stderr, sys.__stderr__)})
        moved = []
        for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
            for handler in getattr(logger, "handlers", []):
                plain = isinstance(handler, logging.StreamHandler) and not isinstance(handler, logging.FileHandler)
                if plain and id(handler.stream) in consoles and handler.stream not in self._streams:
                    moved.append((handler, handler.setStream(consoles[id(handler.stream)])))
        for stream in self._streams:
            stream.route(stream.console if sink is None else sink, on_line)
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                yield
        finally:
            for stream in self._streams:
                stream.route(None)
            for handler, stream in moved:
                handler.setStream(stream)

    def _bar(self, name: str, total: int | None, unit: str):
        from tqdm import tqdm

        fmt = None if total else "{desc}: {elapsed}"
        # shutil's size falls back to $COLUMNS or 80 where the terminal reports none (tqdm's own
        # detection would draw a bar 0 columns wide there).
        width = min(shutil.get_terminal_size().columns, 100)
        return tqdm(
            total=total,
            desc=name,
            unit=unit,
            file=self.err,
            leave=False,
            ncols=width,
            bar_format=fmt,
            mininterval=0.5 if self.tty else 10.0,
        )

    def _tick(self, bar, stop: threading.Event) -> None:
        """Redraws the bar so its clock moves while nothing is counted."""
        while not stop.wait(0.5 if self.tty else 10.0):
            bar.refresh()

    def _failed(self, stage: Stage, exc: BaseException) -> None:
        what = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"failed after {stage.seconds:.0f} s"
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        print(f"✗ {stage.name} {what}: {message}", file=self.err, flush=True)
        if stage.log_path is not None and stage.log_path.is_file():
            import traceback

            with open(stage.log_path, "a", encoding="utf-8") as log:
                log.write("".join(traceback.format_exception(exc)))
            tail = stage.log_path.read_text(encoding="utf-8", errors="replace").splitlines()[-15:]
            print("  " + "\n  ".join(line[-300:] for line in tail), file=self.err)
            print(f"  its whole output: {stage.log_path}", file=self.err, flush=True)
