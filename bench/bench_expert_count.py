"""Cost growth with the number of experts: batch-1 decode at 64 experts against 8, same top-k.

A token reads the same two experts' weights whatever the number of experts, so a decode step
should cost about the same at 64 as at 8; what can grow is the per-expert bookkeeping (router
width, expert counts, splits over every expert). Workload: random Mixtral-shaped models at the
standard serving shape (d512 x 8 layers, F1024, vocab 32000, top-2), one with 8 experts and one
with 64, each decoding 128 greedy tokens at batch 1 after a 128-token prompt through the serving
engine, with the server's default fp32 kernels (packed for oneDNN) and with PyTorch's. Decode
tokens/s counts the steps after the first token: the prompt's step (prefill) reads every expert
its tokens reach, most of 64, and is a prompt cost, not what the target measures. The peer is
the 8-expert model, measured in the same run; the target is 64 / 8 >= 0.8.

Run: `python -m bench.bench_expert_count [--quick]`; writes bench/results/expert_count.json.
"""

from __future__ import annotations

import argparse
import copy
import time

import numpy as np

from bench.harness import print_table, run_line, write_results
from raymoe.inference.packed import pack_onednn
from raymoe.models import MoETransformer
from raymoe.serve.debug_artifact import debug_config
from raymoe.serve.engine import EngineConfig, EngineCore
from raymoe.serve.request import GenerationRequest, SamplingParams


def decode_seconds(model, prompt: list[int], new_tokens: int) -> float:
    """Seconds of the decode steps after the prompt's (the first token's step is the prefill,
    which at 64 experts reads most experts' weights: a prompt cost, not a decode cost)."""
    core = EngineCore(model, EngineConfig(num_slots=1, max_seq_len=512, max_tokens_per_step=len(prompt)))
    params = SamplingParams(temperature=0.0, max_tokens=new_tokens)
    core.add_request(GenerationRequest(request_id="0", prompt_ids=prompt, params=params))
    core.step()
    start = time.perf_counter()
    while core.has_work():
        core.step()
    return time.perf_counter() - start


def decode_tokens_per_s(model, prompt: list[int], new_tokens: int) -> float:
    """Batch-1 decode tokens/s (prefill excluded), best of three runs after a warm-up."""
    decode_seconds(model, prompt, new_tokens)
    return (new_tokens - 1) / min(decode_seconds(model, prompt, new_tokens) for _ in range(3))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--quick", action="store_true", help="d256 x 4 layers, 32 + 32 tokens")
    args = parser.parse_args(argv)
    dim, layers, prompt_len, new_tokens = (256, 4, 32, 32) if args.quick else (512, 8, 128, 128)
    machine = run_line("fp32")
    print(machine, flush=True)
    prompt = np.random.default_rng(0).integers(3, 32000, size=prompt_len).tolist()

    rows: list[list[object]] = []
    speeds: dict[int, dict[str, float]] = {}
    for num_experts in (8, 64):
        cfg = debug_config(32000, dim=dim, num_layers=layers, max_seq_len=512, num_experts=num_experts)
        model = MoETransformer(cfg)
        model.init_weights(seed=0)
        model.eval()
        default = decode_tokens_per_s(model, prompt, new_tokens)
        packed_model = pack_onednn(copy.deepcopy(model))
        del model
        packed = decode_tokens_per_s(packed_model, prompt, new_tokens)
        del packed_model
        speeds[num_experts] = {"packed": packed, "default": default}
        rows.append([num_experts, packed, default])
    ratios = {kernels: speeds[64][kernels] / speeds[8][kernels] for kernels in ("packed", "default")}
    rows.append(["64 / 8", ratios["packed"], ratios["default"]])
    shape = f"d{dim} x {layers} layers, top-2, {prompt_len} + {new_tokens} tokens"
    title = f"Batch-1 decode tok/s (prefill excluded), {shape}"
    table = print_table(title, ["experts", "server's fp32 (packed)", "PyTorch default kernels"], rows)
    print(f"\n64 experts / 8 experts, server's kernels: {ratios['packed']:.2f} (target >= 0.8)")
    write_results("expert_count", {"machine_line": machine, "table": table, "speeds": speeds, "ratios": ratios})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
