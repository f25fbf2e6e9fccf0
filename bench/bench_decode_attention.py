"""Decode steps over long contexts: attention split over the engine's shared threads against one
thread, in the same run on the same engine.

The serving engine's default CPU model (packed fp32 weights, `engine.expert_threads: 2`), a
batch of 32 different random prompts of a given length, prefilled, then timed decode steps. The
peer is the same engine with `THREADED_DECODE_MIN_ROW_KEYS` raised out of reach, so its decode
attention runs in one call on the engine thread (the experts still use both threads in both
rows). Greedy tokens must be equal in both (the split changes no arithmetic).

    python -m bench.bench_decode_attention           # ~2 min on 2 cores
    python -m bench.bench_decode_attention --quick   # smaller model, shorter contexts
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from bench.harness import print_table, run_line, write_results


def decode_steps(model, prompts: list[list[int]], steps: int) -> tuple[float, list[int]]:
    """Seconds per decode step (the fastest half of `steps`) after prefilling `prompts`, and the
    greedy tokens generated."""
    from raymoe.serve.engine import EngineConfig, EngineCore
    from raymoe.serve.request import GenerationRequest, SamplingParams

    longest = max(len(p) for p in prompts)
    core = EngineCore(
        model,
        EngineConfig(
            num_slots=len(prompts), max_seq_len=longest + steps + 2, max_tokens_per_step=sum(len(p) for p in prompts)
        ),
    )
    for i, prompt in enumerate(prompts):
        core.add_request(
            GenerationRequest(
                request_id=str(i), prompt_ids=prompt, params=SamplingParams(temperature=0.0, max_tokens=steps + 1)
            )
        )
    tokens = [event.token_id for _, event in sorted(core.step(), key=lambda item: int(item[0]))]  # prefill
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        events = core.step()
        times.append(time.perf_counter() - start)
        tokens += [event.token_id for _, event in sorted(events, key=lambda item: int(item[0]))]
    times.sort()
    fastest_half = times[: max(1, len(times) // 2)]
    return sum(fastest_half) / len(fastest_half), tokens


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--expert-threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="alternating rounds; each figure keeps its best")
    args = parser.parse_args(argv)
    from raymoe.inference import fast_attention
    from raymoe.inference.packed import pack_onednn
    from raymoe.models import MoETransformer
    from raymoe.serve.debug_artifact import debug_config

    torch.set_num_threads(1)  # as the serving engine runs (one engine thread)
    # Expert threads take one torch thread each (raymoe.inference.cpu_threads).
    machine = run_line("fp32 (oneDNN-packed weights)", f"1 engine thread, MoE experts on {args.expert_threads} threads")
    print(machine, flush=True)
    shape = dict(dim=256, num_layers=4) if args.quick else dict(dim=512, num_layers=8)
    contexts = [64, 256] if args.quick else [100, 300, 900]
    steps = 8 if args.quick else 16
    cfg = debug_config(2048, max_seq_len=max(contexts) + steps + 2, **shape)
    model = MoETransformer(cfg)
    model.init_weights(seed=0)
    pack_onednn(model, expert_threads=args.expert_threads)
    gen = torch.Generator().manual_seed(0)
    threshold = fast_attention.THREADED_DECODE_MIN_ROW_KEYS
    best: dict = {}
    for _ in range(args.rounds):
        for context in contexts:
            prompts = [torch.randint(3, cfg.vocab_size, (context,), generator=gen).tolist() for _ in range(args.batch)]
            tokens = {}
            for name, minimum in (("one thread", 1 << 62), ("shared threads", threshold)):
                fast_attention.THREADED_DECODE_MIN_ROW_KEYS = minimum
                seconds, tokens[name] = decode_steps(model, prompts, steps)
                key = (context, name)
                best[key] = min(best.get(key, seconds), seconds)
            fast_attention.THREADED_DECODE_MIN_ROW_KEYS = threshold
            if tokens["one thread"] != tokens["shared threads"]:
                raise SystemExit(f"context {context}: greedy tokens differ between the two attention paths")
    rows, ratios = [], {}
    for context in contexts:
        one, shared = best[(context, "one thread")], best[(context, "shared threads")]
        threaded = args.batch * context >= threshold
        ratios[f"context_{context}"] = one / shared
        rows.append([context, one * 1e3, shared * 1e3, one / shared, "yes" if threaded else "no (below threshold)"])
    print_table(
        f"Decode step, batch {args.batch}, d{shape['dim']} x {shape['num_layers']} layers, packed fp32, "
        f"expert_threads {args.expert_threads} (ms per step, fastest half of {steps} steps, best of "
        f"{args.rounds})",
        [
            "context tokens",
            "attention on one thread",
            "attention on shared threads",
            "speedup (one / shared)",
            "split at this size",
        ],
        rows,
    )
    path = write_results(
        "decode_attention",
        {
            "batch": args.batch,
            "expert_threads": args.expert_threads,
            "model": shape,
            "contexts": contexts,
            "steps": steps,
            "threshold_row_keys": threshold,
            "ratios": ratios,
            "ms_per_step": {f"{c}/{n}": v * 1e3 for (c, n), v in best.items()},
            "quick": args.quick,
            "machine_line": machine,
        },
    )
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
