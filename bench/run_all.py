"""`make bench`: every benchmark in turn, each in its own process (clean threads and memory).

Each prints its table and writes bench/results/<name>.json; a failing one is reported and the
rest still run. Pass module names to run a subset: `python -m bench.run_all bench_model`.
"""

from __future__ import annotations

import subprocess
import sys

BENCHMARKS = ["bench_model", "bench_ingest", "bench_train_ep", "serve_load"]


def main(argv: list[str]) -> int:
    names = argv or BENCHMARKS
    failed = []
    for name in names:
        print(f"\n=== bench.{name} ===", flush=True)
        if subprocess.run([sys.executable, "-m", f"bench.{name}"]).returncode != 0:
            failed.append(name)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
