"""Expert re-placement and capacity planning: balance, experts moved, simulated serving, plans.

1. Balance: Zipf-skewed load over 64 experts, 8 workers, 8 redundant slots (72 slots), 8 layers
   with the ranks shuffled per layer; max/mean worker load before (8 experts per worker, no
   copies) and after plain EPLB, global and hierarchical (8 groups on 2 nodes).
2. Moves: the placement computed on one window, then 12 experts per layer trade popularity and a
   new window is sampled; experts sent by plain EPLB, by plain EPLB with its workers renamed to
   match the running ones, and by migration-aware re-placement, all to the 1.1 target.
3. Simulator: a drifting Zipf trace (2000 steps, 8 layers; every 100 steps 4 pairs of experts per
   layer trade popularity; 8192 routed tokens per layer per step) replayed under static,
   periodic (every 50 and every 200 steps) and drift-triggered re-placement. Time model: 10 ms
   per step outside the experts, 10 ms of expert time at perfect balance, 0.98 ms per expert
   copy sent (a DeepSeek-V3 expert in FP8, 44 MB, over a 50 GB/s NIC at 90%), TPOT SLO 22.5 ms.
4. Planner: every shipped flavour on every shipped fleet at 20 requests/s (default targets),
   DeepSeek-V3 at 100 and 1000 requests/s, and DeepSeek's and SGLang's published decode units
   against the roofline estimate.

Everything is arithmetic on this CPU; nothing is timed except the re-placement calls.

    python -m bench.bench_placement     # ~30 s on 2 cores; writes bench/results/placement.json
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from bench.harness import machine_line, print_table, write_results
from raymoe.deploy.eplb import Policy, rebalance_experts
from raymoe.deploy.eplb_migration import align_workers
from raymoe.deploy.fleet import FLEETS, load_fleet
from raymoe.deploy.load_trace import zipf_trace
from raymoe.deploy.placement import Placement, moved_experts
from raymoe.deploy.placement_sim import HEADER, SimConfig, Strategy, simulate
from raymoe.deploy.planner import PlanConfig, format_table, plan
from raymoe.deploy.roofline import Layout, RooflineConfig, decode_step, memory_per_gpu, model_sizes
from raymoe.models.config import flavour

LAYERS, EXPERTS, WORKERS, SLOTS = 8, 64, 8, 72
# (policy, expert groups, nodes): one flat pool, and DeepSeek's 8 groups over 2 nodes.
POLICIES: tuple[tuple[Policy, int, int], ...] = (("global", 1, 1), ("hierarchical", 8, 2))


def zipf_window(ranks: np.ndarray, s: float, tokens: int, rng) -> np.ndarray:
    weights = 1.0 / np.arange(1, EXPERTS + 1) ** s
    weights /= weights.sum()
    return np.stack([rng.multinomial(tokens, weights[r]) for r in ranks])


def balance_rows() -> list[list]:
    rows = []
    for s in (0.8, 1.0, 1.2):
        rng = np.random.default_rng(0)
        load = zipf_window(np.stack([rng.permutation(EXPERTS) for _ in range(LAYERS)]), s, 1_000_000, rng)
        before = Placement.from_phy2log(np.tile(np.arange(EXPERTS), (LAYERS, 1)), EXPERTS, WORKERS).imbalance(load)
        for policy, groups, nodes in POLICIES:
            start = time.perf_counter()
            after = rebalance_experts(
                load, SLOTS, WORKERS, num_groups=groups, num_nodes=nodes, policy=policy
            ).imbalance(load)
            ms = (time.perf_counter() - start) * 1e3 / LAYERS
            rows.append(
                [
                    s,
                    policy,
                    f"{before.mean():.3f} / {before.max():.3f}",
                    f"{after.mean():.3f} / {after.max():.3f}",
                    f"{ms:.1f}",
                ]
            )
    return rows


def move_rows() -> list[list]:
    rows = []
    for policy, groups, nodes in POLICIES:
        rng = np.random.default_rng(0)
        ranks = np.stack([rng.permutation(EXPERTS) for _ in range(LAYERS)])
        old = zipf_window(ranks, 1.0, 200_000, rng)
        for r in ranks:
            swap = rng.choice(EXPERTS, size=12, replace=False)
            r[swap] = r[rng.permutation(swap)]
        new = zipf_window(ranks, 1.0, 200_000, rng)
        kw: dict[str, Any] = dict(num_groups=groups, num_nodes=nodes, policy=policy)
        current = rebalance_experts(old, SLOTS, WORKERS, **kw)
        plain = rebalance_experts(new, SLOTS, WORKERS, **kw)
        renamed = Placement.from_phy2log(
            [align_workers(c, p, WORKERS, nodes) for c, p in zip(current.phy2log, plain.phy2log)], EXPERTS, WORKERS
        )
        start = time.perf_counter()
        aware = rebalance_experts(new, SLOTS, WORKERS, current=current, target_imbalance=1.1, **kw)
        ms = (time.perf_counter() - start) * 1e3 / LAYERS
        rows.append(
            [policy, f"{current.imbalance(new).max():.3f}"]
            + [f"{p.imbalance(new).max():.3f}: {int(moved_experts(current, p).sum())}" for p in (plain, renamed, aware)]
            + [f"{ms:.1f}"]
        )
    return rows


def sim_rows() -> list[list]:
    tokens = 8192
    trace = zipf_trace(
        num_steps=2000,
        num_layers=LAYERS,
        num_experts=EXPERTS,
        tokens_per_step=tokens,
        zipf_s=1.0,
        drift_every=100,
        drift_swaps=4,
        seed=0,
    )
    expert_bytes = 3 * 7168 * 2048  # one DeepSeek-V3 routed expert in FP8
    base: dict[str, Any] = dict(
        num_workers=WORKERS,
        num_slots=SLOTS,
        window_steps=50,
        check_every_steps=10,
        seconds_per_token=0.010 / tokens,
        overhead_s=0.010,
        seconds_per_moved_expert=expert_bytes / (50e9 * 0.9),
        slo_step_s=0.0225,
    )
    rows = []
    runs: tuple[tuple[Strategy, int], ...] = (("static", 200), ("periodic", 50), ("periodic", 200), ("drift", 200))
    for strategy, every in runs:
        result = simulate(trace, SimConfig(**base, every_steps=every), strategy)
        row = result.row()
        row[0] = f"periodic every {every}" if strategy == "periodic" else strategy
        rows.append(row)
    return rows


def published_rows() -> list[list]:
    sizes, rc = model_sizes(flavour("deepseek-v3")), RooflineConfig(weight_dtype="fp8")
    rows = []
    for who, fleet, ep, batch, context, published in (
        ("DeepSeek (Day 6)", "h800", 144, 128, 4989, 14_800),
        ("SGLang (LMSYS)", "h100-80g", 72, 256, 2000, 22_282),
    ):
        spec = load_fleet(fleet)
        layout = Layout(ep=ep, num_slots=288)
        memory = memory_per_gpu(sizes, spec, layout, rc, sequences=batch, kv_len=context, tokens=batch)
        step = decode_step(sizes, spec, layout, rc, batch=batch, context=context)
        per_node = step.tokens_per_s * spec.gpus_per_node
        rows.append(
            [
                who,
                f"{fleet} EP{ep} ({ep // 8} nodes)",
                batch,
                context,
                f"{memory.total / 1e9:.1f} / {memory.capacity / 1e9:.1f}",
                f"{step.seconds * 1e3:.1f}",
                f"{per_node:,.0f}",
                f"{published:,}",
                f"{per_node / published:.2f}",
            ]
        )
    return rows


def main() -> None:
    print(machine_line(), flush=True)
    tables = {
        "balance": print_table(
            "Zipf load, 64 experts, 8 workers, 8 redundant slots: max/mean worker load (mean / worst of 8 layers)",
            ["zipf s", "policy", "before", "after", "ms per layer"],
            balance_rows(),
        ),
        "moves": print_table(
            "Re-placement after drift, target 1.1: max/mean after: experts sent (8 layers)",
            [
                "policy",
                "running placement",
                "plain EPLB",
                "plain EPLB, workers renamed",
                "migration-aware",
                "migration-aware ms per layer",
            ],
            move_rows(),
        ),
        "simulator": print_table(
            "Simulated serving, drifting Zipf trace (64 experts, 8 workers, 72 slots, 8 layers, 1950 scored steps)",
            HEADER,
            sim_rows(),
        ),
        "planner": format_table(
            [
                plan(PlanConfig(model=m, fleet=f, rps=20))
                for m in ("deepseek-v3", "mixtral-8x7b", "qwen3-30b-a3b", "deepseek-v2-lite")
                for f in FLEETS
            ]
        ),
        "planner_deepseek_v3": format_table(
            [plan(PlanConfig(model="deepseek-v3", fleet=f, rps=r)) for r in (100, 1000) for f in FLEETS]
        ),
        "published": print_table(
            "Published DeepSeek-V3 decode units vs the roofline estimate",
            [
                "who",
                "unit",
                "batch/GPU",
                "KV len",
                "GB used / usable",
                "step ms",
                "estimate tok/s/node",
                "published tok/s/node",
                "estimate / published",
            ],
            published_rows(),
        ),
    }
    print("### Capacity plans at 20 requests/s (input 2000, output 550, TTFT 2 s, TPOT 50 ms)\n")
    print(tables["planner"], flush=True)
    print("\n### DeepSeek-V3 at 100 and 1000 requests/s\n")
    print(tables["planner_deepseek_v3"], flush=True)
    path = write_results("placement", {"tables": tables})
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
