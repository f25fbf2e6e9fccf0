"""A model larger than one worker's memory trains at ep=4 and is refused cleanly at ep=1.

Each worker process caps its own address space (`resource.setrlimit(RLIMIT_AS)`) at 1.5 GiB above
what it had mapped when it started. The `small` flavour needs ~1.7 GiB of parameters, gradients
and AdamW state in one process (dense 89 MiB + experts 336 MiB, x4), ~0.7 GiB per worker at ep=4.
- ep=1: the worker fails before allocating anything, with an error naming the layout, the
  estimate and the limit (not a kill by the kernel, not an allocator failure half-way);
- ep=4: the four capped workers build, train two steps and write their checkpoint.
The same numbers with `memory_per_worker_gb` fail the ep=1 run in the driver, before Ray starts.
"""

import resource

import numpy as np
import pytest

from raymoe.config import ConfigError, from_dict
from raymoe.parallel.launch import spawn_gloo
from raymoe.parallel.shard_memory import GIB, WorkerMemoryError
from raymoe.train.config import TrainConfig, check_before_launch
from raymoe.train.worker import run_worker
from tests.unit.ingest_output import write_ingest_output

CAP_GIB = 1.5
# Arrow's default allocator (mimalloc) reserves ~1 GiB of address space on the first Parquet read
# while using a few MB of it; with the system allocator the cap measures memory, not reservations.
# Read when Arrow loads, so the workers start as fresh interpreters with it set.
ENV = {"ARROW_DEFAULT_MEMORY_POOL": "system"}


def _capped_run(rank, cfg_dict, cap_bytes):
    """Caps this process's address space at cap_bytes above its current size, then trains."""
    with open("/proc/self/status") as fh:
        mapped = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmSize:"))
    _, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped + cap_bytes, hard))
    try:
        summary = run_worker(from_dict(TrainConfig, cfg_dict))
    except WorkerMemoryError as exc:
        return {"error": str(exc)}
    with open("/proc/self/status") as fh:
        peak = next(int(line.split()[1]) * 1024 for line in fh if line.startswith("VmPeak:"))
    return {
        "final_step": summary.final_step,
        "checkpoints": summary.checkpoints,
        "peak_rss": summary.peak_rss_bytes,
        "address_space_used": peak - mapped,
    }


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    rows = np.random.default_rng(0).integers(3, 8192, size=(16, 17))
    return str(write_ingest_output(tmp_path_factory.mktemp("data"), rows, vocab_size=8192))


def _cfg(tmp_path, data_dir, ep, **extra):
    return from_dict(
        TrainConfig,
        {
            "flavour": "small",
            "steps": 2,
            "seed": 0,
            "layout": {"ep": ep, "dp": 1},
            "data": {"path": data_dir, "seq_len": 16, "global_batch_size": 4},
            "checkpoint": {"uri": str(tmp_path / f"ep{ep}"), "every_steps": 2},
            **extra,
        },
    )


def test_capped_workers_train_at_ep4_and_ep1_fails_cleanly(tmp_path, data_dir):
    cap = int(CAP_GIB * GIB)
    # Execute: ep=1 first (one capped process), then ep=4 (four capped processes).
    (ep1,) = spawn_gloo(_capped_run, 1, _cfg(tmp_path, data_dir, 1).to_dict(), cap, env=ENV)
    ep4 = spawn_gloo(_capped_run, 4, _cfg(tmp_path, data_dir, 4).to_dict(), cap, env=ENV)
    # Assert: ep=1 returned an error naming the layout, the need and the limit, and wrote nothing.
    print(f"\nep=1 under a {CAP_GIB} GiB address-space cap: {ep1.get('error')}")
    assert "error" in ep1, ep1
    for needle in ("layout ep=1 x dp=1", "16 of 16 experts", "RLIMIT_AS", "raise layout.ep"):
        assert needle in ep1["error"]
    assert not (tmp_path / "ep1").exists()
    # ep=4: every capped worker trained both steps and checkpointed.
    for rank, worker in enumerate(ep4):
        assert "error" not in worker, worker
        assert worker["final_step"] == 2 and worker["checkpoints"] == [2]
        print(
            f"ep=4 rank {rank} under the cap: peak RSS {worker['peak_rss'] / 2**20:.0f} MiB, "
            f"address space used {worker['address_space_used'] / 2**20:.0f} of {cap / 2**20:.0f} MiB"
        )
    assert (tmp_path / "ep4" / "step-00000002" / "manifest.json").is_file()


def test_memory_budget_refuses_ep1_in_the_driver(tmp_path, data_dir):
    # Prepare / Execute / Assert: the budget is checked on a meta-device model, before any worker.
    with pytest.raises(ConfigError, match=r"layout ep=1 x dp=1.*memory_per_worker_gb=1.5"):
        check_before_launch(_cfg(tmp_path, data_dir, 1, memory_per_worker_gb=CAP_GIB))
    check_before_launch(_cfg(tmp_path, data_dir, 4, memory_per_worker_gb=CAP_GIB))
