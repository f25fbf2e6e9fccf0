"""`ProcessEngine`: the engine core in a child process, driven over pipes (no Ray)."""

import asyncio
import functools
import os
import signal
import time
from pathlib import Path

import pytest

from raymoe.serve.app import build_core, load_model
from raymoe.serve.debug_artifact import make_debug_artifact
from raymoe.serve.engine import EngineConfig, generate_alone
from raymoe.serve.engine_process import ProcessEngine
from raymoe.serve.request import EngineOverloadedError, EngineStoppedError, InvalidRequestError
from raymoe.serve.serve_config import ServeConfig
from tests.unit.engine_streams import collect, greedy

# Added to the engine child's niceness in the shared engine (engine.process_nice).
NICE = 5


@pytest.fixture(scope="module")
def config(tmp_path_factory) -> ServeConfig:
    artifact = make_debug_artifact(
        tmp_path_factory.mktemp("art") / "tiny", vocab_size=300, dim=64, num_layers=2, max_seq_len=64
    )
    return ServeConfig(model_path=str(artifact), engine=EngineConfig(num_slots=2, max_waiting=2))


@pytest.fixture(scope="module")
def engine(config):
    engine = ProcessEngine(functools.partial(build_core, config, []), num_threads=2, nice=NICE)
    yield engine
    engine.close()


def test_concurrent_requests_equal_running_each_alone_in_this_process(engine, config):
    async def main():
        return await asyncio.gather(collect(engine, "x", [1, 2], 5), collect(engine, "y", [3, 4, 5], 7))

    x, y = asyncio.run(main())
    model = load_model(config, [])
    assert x == generate_alone(model, [1, 2], greedy(5))
    assert y == generate_alone(model, [3, 4, 5], greedy(7))


def test_refusals_reach_the_request_and_the_engine_goes_on(engine):
    async def main():
        with pytest.raises(InvalidRequestError, match="outside vocabulary") as bad:
            await collect(engine, "bad", [1, 10_000], 3)
        # 2 slots and 2 waiting places: of 6 requests sent at once, some are refused
        burst = await asyncio.gather(*(collect(engine, f"r{i}", [1, 2], 20) for i in range(6)), return_exceptions=True)
        return bad.value, burst, await collect(engine, "after", [1, 2], 4)

    bad, burst, after = asyncio.run(main())
    assert bad.param == "prompt"  # names the request field, for the 400 body
    refused = [r for r in burst if isinstance(r, EngineOverloadedError)]
    served = [r for r in burst if isinstance(r, list)]
    assert refused and served and len(refused) + len(served) == 6
    assert all(len(r) == 20 for r in served) and len(after) == 4


def test_leaving_early_aborts_and_stats_and_expert_counts_come_back(engine, config):
    async def main():
        return await collect(engine, "quit", [7, 7], 40, stop_after=2)

    assert len(asyncio.run(main())) == 2
    deadline = time.monotonic() + 10
    while engine.stats()["running"] and time.monotonic() < deadline:
        time.sleep(0.05)  # the child reports stats every STATS_INTERVAL_S while it steps
    assert engine.stats()["running"] == 0 and engine.stats()["generated_tokens"] > 0
    counts = engine.expert_counts()
    assert counts.shape == (2, 8) and counts.sum() > 0


def thread_niceness(pid: int) -> dict[int, int]:
    """tid -> niceness of every thread of `pid` (field 19 of /proc/PID/task/TID/stat)."""
    out = {}
    for tid in os.listdir(f"/proc/{pid}/task"):
        stat = Path(f"/proc/{pid}/task/{tid}/stat").read_text()
        out[int(tid)] = int(stat.rsplit(")", 1)[1].split()[16])
    return out


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")
def test_every_engine_thread_runs_at_the_lowered_priority(engine):
    # Prepare: a request makes torch start its 2-thread OpenMP team in the child.
    asyncio.run(collect(engine, "warm", [1, 2], 3))
    # Execute
    niceness = thread_niceness(engine._child.pid)
    # Assert: the engine's threads (several) sit NICE above this process; this one is unchanged.
    assert len(niceness) >= 2
    assert set(niceness.values()) == {os.getpriority(os.PRIO_PROCESS, 0) + NICE}


def test_a_failed_build_raises_its_error_in_the_replica(tmp_path):
    missing = ServeConfig(model_path=str(tmp_path / "nowhere"))
    with pytest.raises(Exception, match="nowhere"):
        ProcessEngine(functools.partial(build_core, missing, []))


def test_a_dead_child_fails_waiting_requests_and_the_health_check(config):
    engine = ProcessEngine(functools.partial(build_core, config, []), num_threads=1)

    async def main():
        os.kill(engine._child.pid, signal.SIGSTOP)  # the request below stays in flight
        waiting = asyncio.create_task(collect(engine, "long", [1, 2], 20))
        await asyncio.sleep(0.2)
        engine._child.kill()
        with pytest.raises(EngineStoppedError, match="engine stopped"):
            await waiting

    asyncio.run(main())
    with pytest.raises(EngineStoppedError, match="engine process stopped"):
        engine.check_alive()


def test_close_stops_the_child(config):
    engine = ProcessEngine(functools.partial(build_core, config, []), num_threads=1)
    engine.check_alive()
    engine.close()
    assert engine._child.returncode == 0
