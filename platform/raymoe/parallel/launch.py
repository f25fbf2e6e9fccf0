"""Run a function on N local processes joined by a gloo group, without Ray.

For tests and benchmarks of the parallel code on one machine: each process gets
`init_process_group("gloo")` over a rendezvous file, runs `fn(rank, *args)`, and its return value
comes back pickled. Ray Train does the same job on a cluster.
"""

from __future__ import annotations

import os
import pickle
import sys
import tempfile
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, init_file: str, out_dir: str, threads: int, fn, args) -> None:
    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, *args)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"result-{rank}.pkl"), "wb") as fh:
        pickle.dump(result, fh)


# A fork server imports torch and the caller's code once; every later launch forks from it, so
# repeated launches (tests, benchmarks) skip the multi-second imports. It is started fresh (never
# forked from a process whose OpenMP pool is running), so forking from it is safe.
_PRELOAD = ["torch", "torch.distributed"]


def _preload_for(fn: Callable[..., Any]) -> list[str]:
    """What the fork server imports: torch and the module that defines `fn` (with what it imports,
    e.g. the training code); a module run with `python -m` by its importable name. Only the
    first launch's list counts: the server, once started, stays."""
    module = fn.__module__
    if module == "__main__":
        spec = getattr(sys.modules["__main__"], "__spec__", None)
        module = spec.name if spec is not None else module
    return [*_PRELOAD, module]


def spawn_gloo(
    fn: Callable[..., Any], world_size: int, *args: Any, threads: int = 1, env: dict[str, str] | None = None
) -> list[Any]:
    """Runs `fn(rank, *args)` on `world_size` fresh processes; returns their results by rank.

    `fn` must be importable (a module-level function). An exception in any process is raised here.
    With `env`, the processes start as new interpreters (spawn) with those environment variables
    set from the start, for settings libraries read when they load (the fork server's processes
    inherit its environment instead).
    """
    method = "forkserver" if env is None else "spawn"
    if env is None:
        ctx = mp.get_context("forkserver")
        ctx.set_forkserver_preload(_preload_for(fn))
    saved = {key: os.environ.get(key) for key in env or {}}
    os.environ.update(env or {})
    try:
        with tempfile.TemporaryDirectory(prefix="raymoe-gloo-") as tmp:
            init_file = os.path.join(tmp, "rendezvous")
            mp.start_processes(
                _entry, args=(world_size, init_file, tmp, threads, fn, args), nprocs=world_size, start_method=method
            )
            results = []
            for rank in range(world_size):
                with open(os.path.join(tmp, f"result-{rank}.pkl"), "rb") as fh:
                    results.append(pickle.load(fh))
            return results
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
