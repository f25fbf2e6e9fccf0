"""bf16 training against fp32: the loss curve of 200 `debug` steps, and each run's speed.

The same run twice on the shipped corpus (one process, ep=1, same seed, same batches), once with
`train.precision: fp32` and once with `bf16` (autocast; fp32 weights, gradients and AdamW state,
routers and loss in fp32). bf16 rounds every matmul input, so the curves are not equal; the
claim is that they stay within a stated tolerance of each other: every 20-step window mean of
the bf16 losses within TOLERANCE_NATS of fp32's, and the last window within 1% of it.

Run: `python -m bench.bench_bf16_loss [--steps 200] [--data runs/ingest/debug-128]`; ingests the
corpus first (about a minute, on a local Ray) when no ingest output with 129-token rows is given.
Writes bench/results/bf16_loss.json.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from bench.harness import print_table, run_line, write_results
from raymoe.config import from_dict
from raymoe.precision import resolve_precision
from raymoe.train.config import TrainConfig
from raymoe.train.worker import run_worker

ROOT = Path(__file__).resolve().parents[1]
SEQ_LEN = 128
WINDOW = 20
TOLERANCE_NATS = 0.05
FINAL_TOLERANCE = 0.01


def ingest(out: Path) -> Path:
    """The debug ingest config into `out`, with rows of SEQ_LEN + 1 tokens."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pipelines.ingest",
            "--config",
            "pipelines/configs/ingest.debug.yaml",
            f"output_dir={out}",
            f"pack.seq_len={SEQ_LEN}",
        ],
        cwd=ROOT,
        check=True,
    )
    return out


def train(data: Path, precision: str, steps: int, threads: int, work: Path) -> tuple[list[float], float]:
    """Returns the per-step losses and the run's tokens/s."""
    cfg = from_dict(
        TrainConfig,
        {
            "name": f"bf16-loss-{precision}",
            "flavour": "debug",
            "steps": steps,
            "seed": 0,
            "precision": precision,
            "layout": {"ep": 1, "dp": 1},
            "optim": {"lr": 3e-3, "warmup_steps": 20, "clip_norm": 1.0},
            "data": {"path": str(data), "seq_len": SEQ_LEN, "global_batch_size": 8},
            "checkpoint": {"uri": str(work / precision), "every_steps": steps},
            "num_threads_per_worker": threads,
        },
    )
    start = time.perf_counter()
    summary = run_worker(cfg)
    seconds = time.perf_counter() - start
    return summary.losses, steps * 8 * SEQ_LEN / seconds


def window_means(losses: list[float]) -> list[float]:
    return [sum(losses[i : i + WINDOW]) / len(losses[i : i + WINDOW]) for i in range(0, len(losses), WINDOW)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data", type=Path, help=f"an ingest output with {SEQ_LEN + 1}-token rows (default: ingest)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    machine = run_line("fp32 and bf16 autocast (fp32 weights)", args.threads)
    print(machine, flush=True)
    print(f"train.precision auto here: {resolve_precision('auto', 'cpu').describe()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="bench-bf16-loss-") as tmp:
        work = Path(tmp)
        data = args.data or ingest(work / "data")
        fp32, fp32_tps = train(data, "fp32", args.steps, args.threads, work)
        bf16, bf16_tps = train(data, "bf16", args.steps, args.threads, work)
    fp32_w, bf16_w = window_means(fp32), window_means(bf16)
    rows = [
        [f"{i * WINDOW + 1}-{min((i + 1) * WINDOW, args.steps)}", f, b, b - f]
        for i, (f, b) in enumerate(zip(fp32_w, bf16_w, strict=True))
    ]
    header = ["steps", "fp32 mean loss", "bf16 mean loss", "bf16 - fp32"]
    table = print_table(f"debug flavour, {args.steps} steps, batch 8 x {SEQ_LEN}", header, rows)
    worst = max(abs(b - f) for f, b in zip(fp32_w, bf16_w, strict=True))
    final_rel = abs(bf16_w[-1] - fp32_w[-1]) / fp32_w[-1]
    within = worst <= TOLERANCE_NATS and final_rel <= FINAL_TOLERANCE
    print(
        f"\nloss {fp32[0]:.3f} -> {fp32_w[-1]:.3f} (fp32), {bf16[0]:.3f} -> {bf16_w[-1]:.3f} (bf16); "
        f"worst window gap {worst:.4f} nats (tolerance {TOLERANCE_NATS}), last window {final_rel:.2%} "
        f"(tolerance {FINAL_TOLERANCE:.0%}): {'within' if within else 'OUTSIDE'} tolerance\n"
        f"tokens/s fp32 {fp32_tps:.0f}, bf16 {bf16_tps:.0f} ({bf16_tps / fp32_tps:.2f}x)"
    )
    write_results(
        "bf16_loss",
        {
            "steps": args.steps,
            "fp32_losses": fp32,
            "bf16_losses": bf16,
            "worst_window_gap_nats": worst,
            "final_window_relative_gap": final_rel,
            "tolerance_nats": TOLERANCE_NATS,
            "within_tolerance": within,
            "tokens_per_s": {"fp32": fp32_tps, "bf16": bf16_tps},
            "table": table,
            "machine_line": machine,
        },
    )


if __name__ == "__main__":
    main()
