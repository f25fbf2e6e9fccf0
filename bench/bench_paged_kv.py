"""Paged KV: how many sequences run at once in one KV memory budget, against slot reservation.

Workload: the standard serving shape (a random Mixtral-shaped model, d512 x 8 layers, 4 heads / 2
kv heads, 8 experts top-2, F1024, vocab 32000), max_seq_len 2048; 32 requests of 128 random
prompt ids and 128 greedy new tokens (256-token sequences), all queued at once, the engine stepped
until every one has finished.

Peer: slot reservation, as the engine held KV before the paged cache: `KVCache` with a full
2048-position row per slot, 4 slots. raymoe: `PagedKVCache` in at most the same memory (511
blocks of 16 positions plus its spare block), 32 slots. Everything else (model, requests, token
budget per step) is the same. Reported: each cache's bytes, the most sequences running at once
(the ratio of the two is the target's measure: >= 4x), preemptions, engine steps, wall time and
tokens/s, and whether every request's greedy tokens are identical in both.

Run: `python -m bench.bench_paged_kv [--requests N] [--quick]`; writes bench/results/paged_kv.json.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from bench.harness import print_table, run_line, write_results
from raymoe.models import KVCache, MoETransformer
from raymoe.serve.debug_artifact import debug_config
from raymoe.serve.engine import EngineConfig, EngineCore
from raymoe.serve.request import GenerationRequest, SamplingParams

MAX_SEQ_LEN, BLOCK_SIZE, PEER_SLOTS = 2048, 16, 4


def run(core: EngineCore, prompts: list[list[int]], new_tokens: int) -> dict:
    """Queues every prompt, steps to the end; returns outputs and what the run looked like."""
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    for i, prompt in enumerate(prompts):
        core.add_request(GenerationRequest(request_id=str(i), prompt_ids=prompt, params=params))
    outputs: dict[str, list[int]] = {}
    peak = steps = 0
    start = time.perf_counter()
    while core.has_work():
        for rid, event in core.step():
            outputs.setdefault(rid, []).append(event.token_id)
        peak = max(peak, int(core.scheduler.stats()["running"]))
        steps += 1
    seconds = time.perf_counter() - start
    return {
        "outputs": [outputs[str(i)] for i in range(len(prompts))],
        "cache_bytes": core.cache.nbytes(),
        "peak_running": peak,
        "preemptions": core.num_preemptions,
        "steps": steps,
        "seconds": seconds,
        "tokens_per_s": len(prompts) * new_tokens / seconds,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--requests", type=int, default=32, help="256-token sequences queued at once")
    parser.add_argument("--quick", action="store_true", help="d256 x 4 layers, 16 requests of 64 + 64 tokens")
    args = parser.parse_args(argv)
    dim, layers, prompt_len, new_tokens = (256, 4, 64, 64) if args.quick else (512, 8, 128, 128)
    requests = 16 if args.quick else args.requests
    machine = run_line("fp32")
    print(machine, flush=True)

    model = MoETransformer(debug_config(32000, dim=dim, num_layers=layers, max_seq_len=MAX_SEQ_LEN))
    model.init_weights(seed=0)
    model.eval()
    rng = np.random.default_rng(0)
    prompts = [rng.integers(3, 32000, size=prompt_len).tolist() for _ in range(requests)]
    positions = PEER_SLOTS * MAX_SEQ_LEN

    def engine_config(num_slots: int, num_kv_blocks: int) -> EngineConfig:
        return EngineConfig(
            num_slots=num_slots,
            num_kv_blocks=num_kv_blocks,
            max_seq_len=MAX_SEQ_LEN,
            max_tokens_per_step=128,
            block_size=BLOCK_SIZE,
            max_waiting=requests,
        )

    peer = run(EngineCore(model, engine_config(PEER_SLOTS, 0), kv_cache_factory=KVCache), prompts, new_tokens)
    # The pool holds one spare block beside its budget: 511 + 1 blocks fill the peer's memory.
    paged = run(EngineCore(model, engine_config(32, positions // BLOCK_SIZE - 1)), prompts, new_tokens)
    same = peer["outputs"] == paged["outputs"]
    assert paged["cache_bytes"] <= peer["cache_bytes"], (paged["cache_bytes"], peer["cache_bytes"])

    title = (
        f"{requests} sequences of {prompt_len} + {new_tokens} tokens, max_seq_len {MAX_SEQ_LEN}, "
        f"d{dim} x {layers} layers, fp32, {torch.get_num_threads()} threads"
    )
    header = ["KV cache", "KV MiB", "most running at once", "preemptions", "steps", "seconds", "tok/s"]
    runs = {
        f"slot rows ({PEER_SLOTS} x {MAX_SEQ_LEN})": peer,
        f"paged ({positions // BLOCK_SIZE - 1} blocks of {BLOCK_SIZE}, 32 slots)": paged,
    }
    measures = ["peak_running", "preemptions", "steps", "seconds", "tokens_per_s"]
    table = print_table(
        title, header, [[name, r["cache_bytes"] / 2**20, *(r[m] for m in measures)] for name, r in runs.items()]
    )
    ratio = paged["peak_running"] / peer["peak_running"]
    print(f"\nrunning at once, paged / slot rows: {ratio:.2f} (target >= 4); identical greedy tokens: {same}")
    print(f"tokens/s, paged / slot rows: {paged['tokens_per_s'] / peer['tokens_per_s']:.2f}")
    write_results(
        "paged_kv",
        {
            "machine_line": machine,
            "table": table,
            "running_ratio": ratio,
            "identical_greedy_tokens": same,
            "slot_rows": {k: v for k, v in peer.items() if k != "outputs"},
            "paged": {k: v for k, v in paged.items() if k != "outputs"},
        },
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
