"""`make bench`: every benchmark in turn, each in its own process (clean threads and memory).

Each prints its table and writes bench/results/<name>.json; a failing one is reported and the
rest still run. Pass module names to run a subset: `python -m bench.run_all bench_model`. Run
`make demo` first for a meaningful INT8 perplexity check (serve_load then uses its trained model).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

BENCHMARKS = [
    "bench_model",
    "bench_decode_attention",
    "bench_mla_decode",
    "bench_ingest",
    "bench_train_ep",
    "bench_bf16_loss",
    "bench_train_startup",
    "bench_finetune",
    "bench_federated",
    "bench_placement",
    "bench_planner_cpu",
    "serve_load",
    "bench_paged_kv",
    "bench_expert_count",
    "bench_serve_overload",
]
# The `make demo` run: when it is there, serve_load checks INT8 perplexity on its trained model.
DEMO_MODEL, DEMO_HELDOUT = Path("runs/demo/model"), Path("runs/demo/data/val")


def extra_args(name: str) -> list[str]:
    if name == "serve_load" and (DEMO_MODEL / "config.json").is_file() and DEMO_HELDOUT.is_dir():
        return ["--ppl-artifact", str(DEMO_MODEL), "--heldout-shards", str(DEMO_HELDOUT)]
    return []


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    failed = []
    for name in names:
        print(f"\n=== bench.{name} ===", flush=True)
        if subprocess.run([sys.executable, "-m", f"bench.{name}", *extra_args(name)]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
