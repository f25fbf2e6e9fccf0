"""SharedThreads: every item runs exactly once, on no more threads than asked, errors surface."""

import threading
import time

import pytest
import torch

from raymoe.inference.cpu_threads import SharedThreads


@pytest.mark.parametrize(
    ("count", "items", "max_threads"), [(1, 5, None), (3, 7, None), (3, 7, 2), (4, 2, None), (3, 0, None)]
)
def test_each_item_runs_once_on_at_most_the_allowed_threads(count, items, max_threads):
    threads = SharedThreads.start(count)
    seen, names = [], set()
    lock = threading.Lock()

    def run_item(i):
        with lock:
            seen.append(i)
            names.add(threading.current_thread().name)

    threads.run(items, run_item, max_threads=max_threads)
    assert sorted(seen) == list(range(items))
    allowed = min(count, items, count if max_threads is None else max_threads)
    assert len(names) <= allowed
    if count == 1:
        assert names <= {threading.current_thread().name}  # no pool: the caller runs everything


def test_pool_threads_share_the_work_when_items_block():
    threads = SharedThreads.start(2)
    both = threading.Barrier(2, timeout=10)  # passes only when two threads run items at once
    names = []

    def run_item(i):
        names.append(threading.current_thread().name)
        if i < 2:
            both.wait()

    threads.run(4, run_item)
    assert len(set(names)) == 2


def test_an_error_in_a_pool_thread_reaches_the_caller():
    threads = SharedThreads.start(2)
    started = threading.Barrier(2, timeout=10)

    def run_item(i):
        started.wait()  # one item per thread, so the pool thread runs one of them
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(f"item {i} failed")

    with pytest.raises(RuntimeError, match="failed"):
        threads.run(2, run_item)


def test_a_failing_caller_still_waits_for_the_pool_threads():
    threads = SharedThreads.start(2)
    both = threading.Barrier(2, timeout=10)
    done = []

    def run_item(i):
        both.wait()  # one item per thread
        if threading.current_thread() is threading.main_thread():
            raise RuntimeError("caller failed")
        time.sleep(0.2)  # still writing when the caller fails
        done.append(i)

    with pytest.raises(RuntimeError, match="caller failed"):
        threads.run(2, run_item)
    assert len(done) == 1  # the helper finished before run() returned


def test_pool_threads_follow_the_callers_inference_mode():
    threads = SharedThreads.start(2)
    modes = []
    both = threading.Barrier(2, timeout=10)

    def run_item(i):
        both.wait()
        modes.append((torch.is_inference_mode_enabled(), torch.is_grad_enabled()))

    with torch.inference_mode():
        threads.run(2, run_item)
    assert modes == [(True, False)] * 2
    modes.clear()
    with torch.no_grad():
        threads.run(2, run_item)
    assert modes == [(False, False)] * 2


def test_fewer_than_one_thread_is_refused():
    with pytest.raises(ValueError, match="expert_threads must be >= 1, got 0"):
        SharedThreads.start(0)
