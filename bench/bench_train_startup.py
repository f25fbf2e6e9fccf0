"""Training start-up time and peak memory per worker at ep=1, 2 and 4 (`small` flavour unless --flavour).

Each layout runs as that many gloo processes (one torch thread each), started together:
- sharded (what training does): build on the meta device, keep this rank's experts, allocate and
  initialise only those (`raymoe.train.worker.build_sharded_model`), then AdamW; then one optimizer
  step on a random batch, so gradients and AdamW state are allocated too;
- resume: the same, loading a checkpoint saved at ep=2 (`resume_checkpoint`: each worker reads
  only the tensors it holds; ep=1 and ep=4 reshard);
- peer, measured in the same run: the way workers started before, the whole model built and
  initialised on the CPU (constructors' init, then the seeded init again) and the other ranks'
  experts sliced away; then the same step.
Start-up is the slowest worker's seconds from entering the worker to a ready optimizer (2 cores:
more workers than cores share them, so wall time grows with ep on this machine). Peak RSS is each
process's VmHWM (it includes the ~0.2 GiB an idle process with torch already has), after start-up
and after the step; parameter + AdamW bytes are what the worker holds after the step.

Run: `python -m bench.bench_train_startup [--flavour small]`; writes bench/results/train_startup.json.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from typing import TYPE_CHECKING

import torch

from bench.harness import machine_line, print_table, write_results
from raymoe.config import from_dict
from raymoe.parallel.launch import spawn_gloo
from raymoe.train.config import TrainConfig

if TYPE_CHECKING:
    from raymoe.models import MoETransformer

MIB = 1024**2


def _cfg(flavour: str, ep: int, uri: str) -> TrainConfig:
    return from_dict(
        TrainConfig,
        {
            "flavour": flavour,
            "steps": 1,
            "seed": 0,
            "layout": {"ep": ep, "dp": 1},
            "data": {"path": "unused", "seq_len": 32, "global_batch_size": 4},
            "checkpoint": {"uri": uri},
        },
    )


def _full_then_slice(cfg: TrainConfig, groups) -> MoETransformer:
    """The peer: the whole model on the CPU, initialised twice, other ranks' experts dropped."""
    from raymoe.models import MoETransformer
    from raymoe.parallel.layout import shard_model_experts

    model = MoETransformer(cfg.model_config())
    model.init_weights(seed=cfg.seed)
    shard_model_experts(model, cfg.layout, groups.rank, ep_group=groups.ep_group)
    return model


def _worker(rank: int, cfg_dict: dict, mode: str, save: bool) -> dict:
    """Starts one worker the `mode` way, steps once; returns its start-up seconds and memory."""
    from raymoe.parallel.groups import build_groups
    from raymoe.parallel.shard_memory import peak_rss_bytes, shard_bytes
    from raymoe.train.checkpoint import resume_checkpoint, save_checkpoint
    from raymoe.train.memory import optimizer_bytes
    from raymoe.train.step import build_optimizer, train_step
    from raymoe.train.worker import build_sharded_model

    cfg = from_dict(TrainConfig, cfg_dict)
    groups = build_groups(cfg.layout)
    if groups.distributed:
        torch.distributed.barrier()
    start = time.perf_counter()
    if mode == "peer":
        model = _full_then_slice(cfg, groups)
    else:
        model = build_sharded_model(cfg, groups, torch.device("cpu"), init=mode != "resume")
    optimizer = build_optimizer(model, cfg.optim)
    if mode == "resume":
        loaded = resume_checkpoint(cfg.checkpoint.uri, model=model, optimizer=optimizer, groups=groups)
        assert loaded is not None, "no checkpoint to resume from"
    startup_s = time.perf_counter() - start
    startup_rss = peak_rss_bytes()
    vocab = cfg.model_config().vocab_size
    tokens = torch.randint(
        0, vocab, (cfg.local_batch_size, cfg.data.seq_len + 1), generator=torch.Generator().manual_seed(rank)
    )
    train_step(model, optimizer, [(tokens[:, :-1], tokens[:, 1:])], groups=groups, lr=1e-3, clip_norm=1.0)
    if save:
        save_checkpoint(cfg.checkpoint.uri, step=1, data_position=1, model=model, optimizer=optimizer, groups=groups)
    held = shard_bytes(model)
    return {
        "startup_s": startup_s,
        "startup_rss": startup_rss,
        "peak_rss": peak_rss_bytes(),
        "held_bytes": held.total + optimizer_bytes(optimizer),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--flavour", default="small")
    parser.add_argument("--layouts", default="1,2,4", help="ep degrees to measure")
    args = parser.parse_args(argv)
    eps = [int(e) for e in args.layouts.split(",")]

    print(machine_line())
    results, rows = {}, []
    with tempfile.TemporaryDirectory(prefix="raymoe-startup-") as tmp:
        uri = f"{tmp}/checkpoints"
        # The checkpoint every resume reads: written once at ep=2.
        spawn_gloo(_worker, 2, _cfg(args.flavour, 2, uri).to_dict(), "sharded", True)
        for ep in eps:
            cfg = _cfg(args.flavour, ep, uri).to_dict()
            run = {mode: spawn_gloo(_worker, ep, cfg, mode, False) for mode in ("sharded", "resume", "peer")}
            results[f"ep{ep}"] = run
            worst = {
                mode: {
                    "startup_s": max(w["startup_s"] for w in workers),
                    "startup_rss": max(w["startup_rss"] for w in workers),
                    "peak_rss": max(w["peak_rss"] for w in workers),
                    "held_bytes": max(w["held_bytes"] for w in workers),
                }
                for mode, workers in run.items()
            }
            rows.append(
                [
                    f"ep={ep} ({ep} worker{'s' if ep > 1 else ''})",
                    f"{worst['sharded']['startup_s']:.2f}",
                    f"{worst['resume']['startup_s']:.2f}",
                    f"{worst['peer']['startup_s']:.2f}",
                    f"{worst['sharded']['startup_rss'] / MIB:.0f}",
                    f"{worst['peer']['startup_rss'] / MIB:.0f}",
                    f"{worst['sharded']['held_bytes'] / MIB:.0f}",
                    f"{worst['sharded']['peak_rss'] / MIB:.0f}",
                    f"{worst['peer']['peak_rss'] / MIB:.0f}",
                ]
            )
    print_table(
        f"Training start-up per worker ({args.flavour}, fp32, 1 thread per worker)",
        [
            "layout",
            "start-up s (sharded)",
            "start-up s (resume, reads its share)",
            "start-up s (peer: full model, sliced)",
            "RSS after start-up MiB (sharded)",
            "RSS after start-up MiB (peer)",
            "params + AdamW MiB (after 1 step)",
            "peak RSS MiB after 1 step (sharded)",
            "peak RSS MiB after 1 step (peer)",
        ],
        rows,
    )
    write_results("train_startup", {"flavour": args.flavour, "machine_line": machine_line(), "layouts": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
