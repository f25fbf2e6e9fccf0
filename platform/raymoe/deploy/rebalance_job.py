"""The re-placement job (`python -m pipelines.rebalance`, `raymoe rebalance`): measured expert
load -> a new placement -> placement.json -> (optionally) applied to a running Serve app.

`run_once` reads tokens routed per expert per MoE layer over a window (the serving app's traffic
windows, a Prometheus counter, or a recorded trace; padding never counted), computes the placement
(`deploy.serving_placement`: one placement for all layers, migration-aware against the running
one), writes `placement.json` (atomic), `placement.md` (the before/after table) and a line of
`rebalance-history.jsonl` to output_dir, and with `apply.enabled` applies it to every replica of
the app (`raymoe.serve.live_placement.apply_to_app`).

Exit statuses: 0 done (or nothing to move), 2 load or layout that cannot be used (nothing
written), 1 the app could not be reached (nothing written) or the apply failed (placement.json
is written; replicas that did not switch keep their placement).
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

import numpy as np

from raymoe.config import ConfigError
from raymoe.deploy.rebalance_config import RebalanceJobConfig

log = logging.getLogger(__name__)


def read_load(cfg: RebalanceJobConfig) -> tuple[np.ndarray, dict]:
    """(L, E) tokens per expert per MoE layer and a description of where they came from."""
    from raymoe.deploy import load_trace

    if cfg.source == "windows":
        found = load_trace.windows_trace(cfg.windows.dir, cfg.windows.latest)
        for path, why in found.skipped.items():
            log.warning("skipped window %s: %s", path, why)
        return found.load_LE, {
            "kind": "windows",
            "dir": cfg.windows.dir,
            "files": found.files,
            "skipped": found.skipped,
        }
    if cfg.source == "prometheus":
        p = cfg.prometheus
        load = load_trace.prometheus_load(p.url, p.window, model=p.model, timeout_s=p.timeout_s)
        return load, {"kind": "prometheus", "url": p.url, "query": load_trace.prometheus_query(p.model, p.window)}
    trace = load_trace.read_trace(cfg.trace.path)
    steps = trace[-cfg.trace.last_steps :] if cfg.trace.last_steps else trace
    return steps.sum(axis=0), {"kind": "trace", "path": cfg.trace.path, "steps": len(steps)}


def running_placement(cfg: RebalanceJobConfig):
    """The running ExpertPlacement: `placement.current`'s file, else the app's, else None."""
    from raymoe.deploy.serving_placement import read_placement
    from raymoe.parallel.layout import ExpertPlacement

    if cfg.placement.current:
        return read_placement(cfg.placement.current).serving
    if not cfg.apply.enabled:
        return None
    from raymoe.serve.live_placement import app_placement, connect_ray

    connect_ray()
    now = app_placement(cfg.apply.app_name, cfg.apply.deployment, cfg.apply.timeout_s)
    if now["ep"] == 1:
        raise ConfigError(f"apply.app_name: {cfg.apply.app_name!r} serves with ep=1; re-placement needs ep > 1")
    return ExpertPlacement(num_experts=now["num_experts"], ep=now["ep"], slot_expert=now["slot_expert"])


def run_once(cfg: RebalanceJobConfig) -> int:
    """One re-placement; returns the exit status (module docstring)."""
    from raymoe.atomic_io import append_jsonl, atomic_write
    from raymoe.deploy.serving_placement import fit_experts, format_before_after, plan_placement, write_placement

    try:
        load, source = read_load(cfg)
        num_experts, num_groups = load.shape[1], 1
        if cfg.model_path:
            from raymoe.models.hf_io import read_hf_config

            moe = read_hf_config(cfg.model_path)[0].moe
            num_experts, num_groups = moe.num_experts, moe.num_groups
            load = fit_experts(load, num_experts)
        try:
            current = running_placement(cfg)
        except (OSError, RuntimeError) as exc:  # Ray or the Serve app cannot be reached
            print(f"rebalance: cannot ask {cfg.apply.app_name!r} for its placement: {exc!r}", file=sys.stderr)
            return 1
        p = cfg.placement
        workers = p.num_workers or current.ep
        redundant = (
            p.num_redundant_experts
            if p.num_redundant_experts >= 0
            else len(current.slot_expert) - num_experts
            if current is not None
            else 0
        )
        plan = plan_placement(
            load,
            num_workers=workers,
            num_slots=num_experts + redundant,
            current=current,
            policy=p.policy,
            num_groups=p.num_groups or num_groups,
            num_nodes=p.num_nodes,
            migration_aware=p.migration_aware,
            target_imbalance=p.target_imbalance,
            min_gain_per_move=p.min_gain_per_move,
            source=source,
        )
    except (ConfigError, ValueError) as exc:
        print(f"rebalance: {exc}", file=sys.stderr)
        return 2
    out = Path(cfg.output_dir)
    write_placement(out / "placement.json", plan)
    table = format_before_after(plan)
    atomic_write(out / "placement.md", lambda tmp: Path(tmp).write_text(table + "\n"))
    print(table)
    record = {
        "time": time.time(),
        "name": cfg.name,
        "source": source["kind"],
        "num_slots": plan.num_slots,
        "imbalance": plan.imbalance(),
        "moved_experts": plan.moved(),
        "applied": None,
    }
    status = 0
    if cfg.apply.enabled and plan.current is not None and plan.serving.slot_expert == plan.current.slot_expert:
        print("rebalance: the running placement is already the computed one; nothing applied")
    elif cfg.apply.enabled:
        from raymoe.serve.live_placement import apply_to_app, connect_ray

        try:
            connect_ray()
            answers = apply_to_app(
                plan.serving.slot_expert,
                app_name=cfg.apply.app_name,
                deployment=cfg.apply.deployment,
                timeout_s=cfg.apply.timeout_s,
                max_calls=cfg.apply.max_calls,
            )
            record["applied"] = [
                {k: a[k] for k in ("replica", "changed", "loaded", "seconds", "version")} for a in answers
            ]
            print(f"rebalance: applied to {len(answers)} replica(s) of {cfg.apply.app_name}")
        except Exception as exc:  # noqa: BLE001 - reported, logged, and the exit status says it
            record["applied"] = {"error": repr(exc)}
            print(f"rebalance: apply failed: {exc!r}", file=sys.stderr)
            status = 1
    append_jsonl(out / "rebalance-history.jsonl", record)
    # `wrote <what>: <absolute path>`, as every job ends (raymoe.storage.print_wrote).
    print(f"wrote placement: {(out / 'placement.json').absolute()}")
    print(f"wrote placement table: {(out / 'placement.md').absolute()}")
    return status


def prepare(cfg: RebalanceJobConfig) -> None:
    """What runs before the job starts: the filesystem checks
    (`rebalance_config.check_before_launch`), the debug windows when windows.dir is the debug
    config's own `debug_traffic.dir`, then the checks again; raises ConfigError."""
    from raymoe.deploy.rebalance_config import check_before_launch

    check_before_launch(cfg)
    debug = cfg.debug_traffic
    if cfg.writes_debug_traffic and debug is not None:
        from raymoe.serve.debug_traffic import write_debug_traffic

        if write_debug_traffic(debug.dir, debug.artifact):
            check_before_launch(cfg)


def run(cfg: RebalanceJobConfig) -> int:
    """`run_once`, or every `interval_s` seconds until stopped (re-placement on a schedule)."""
    while True:
        status = run_once(cfg)
        if cfg.interval_s == 0:
            return status
        time.sleep(cfg.interval_s)
