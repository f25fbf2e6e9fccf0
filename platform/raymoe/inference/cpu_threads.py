"""Threads that the layers of a CPU inference model share (`engine.expert_threads`).

A layer's work is split into items (the experts that received rows; chunks of a decode batch's
attention); the calling thread and the pool's threads each take the next item as they free up,
one torch thread each. The items' kernels release the GIL, so they run side by side: one hand-off
per layer where an OpenMP team would synchronise inside every small kernel, and a thread that the
OS runs late (a busy serving machine) takes fewer items instead of holding up the layer.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharedThreads:
    """The caller plus `count - 1` pool threads (no pool for count 1)."""

    pool: ThreadPoolExecutor | None
    count: int

    @classmethod
    def start(cls, count: int) -> SharedThreads:
        if count < 1:
            raise ValueError(f"expert_threads must be >= 1, got {count}")
        pool = None
        if count > 1:
            pool = ThreadPoolExecutor(
                count - 1, thread_name_prefix="raymoe-cpu", initializer=torch.set_num_threads, initargs=(1,)
            )
        return cls(pool, count)

    def run(self, num_items: int, run_item: Callable[[int], None], max_threads: int | None = None) -> None:
        """Calls `run_item(i)` once for each i in range(num_items), on up to `max_threads` threads
        (default: all) of which the caller is one; returns when all have run. Pool threads run
        their items under the caller's inference mode, else without autograd (inference only)."""
        # `next` on an itertools.count is atomic under the GIL: each item runs exactly once.
        claims = itertools.count()

        def claim_and_run() -> None:
            while (i := next(claims)) < num_items:
                run_item(i)

        inference = torch.is_inference_mode_enabled()  # grad modes are per thread

        def helper() -> None:
            with torch.inference_mode() if inference else torch.no_grad():
                claim_and_run()

        n = min(self.count, num_items, self.count if max_threads is None else max_threads)
        helpers = [self.pool.submit(helper) for _ in range(n - 1)] if self.pool is not None else []
        try:
            claim_and_run()
        finally:  # the helpers finish before the caller goes on, also when the caller failed
            failures = [future.exception() for future in helpers if not future.cancel()]  # cancel: not started
        for failure in failures:
            if failure is not None:
                raise failure
