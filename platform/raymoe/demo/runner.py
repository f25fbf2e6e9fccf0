"""The demo's order, what a rerun reuses, and where everything ended up.

    ingest -> train -> export -> finetune -> federated -> serve -> load -> drift -> rebalance
           -> report -> dashboards

A stage whose marker matches its config (and the configs of the stages it reads from) and whose
outputs exist is reused (`raymoe.demo.markers`). The serving app is started when a stage that
needs it runs (load, rebalance) or when it is to stay up (`keep_serving`); Ray starts only when a
stage needs it, so a rerun that reuses everything starts nothing.
"""

from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Any

from raymoe.atomic_io import atomic_write_json
from raymoe.console import Console
from raymoe.demo import live, markers, stages
from raymoe.demo.plan import DemoPlan

ORDER = [
    "ingest",
    "train",
    "export",
    "finetune",
    "federated",
    "serve",
    "load",
    "drift",
    "rebalance",
    "report",
    "dashboards",
]
# stage -> the stages whose outputs it reads.
DEPS: dict[str, tuple[str, ...]] = {
    "ingest": (),
    "train": ("ingest",),
    "export": ("train",),
    "finetune": ("export",),
    "federated": ("export",),
    "serve": ("train", "export"),
    "load": ("serve",),
    "drift": ("load",),
    "rebalance": ("load",),
    "report": ("train", "federated", "drift"),
    "dashboards": (),
}
RUN = {
    "ingest": stages.ingest,
    "train": stages.train,
    "export": stages.export,
    "finetune": stages.finetune,
    "federated": stages.federated,
    "serve": live.serve,
    "load": live.load,
    "drift": live.drift,
    "rebalance": live.rebalance,
    "report": stages.report,
    "dashboards": stages.dashboards,
}
# Stages that need the running app.
NEEDS_APP = ("load", "rebalance")


def bar_of(plan: DemoPlan, stage: str) -> tuple[int | None, str]:
    """(total, unit) of a stage's progress bar; total None = a clock only."""
    return {
        "train": (plan.train.steps, "step"),
        "finetune": (plan.finetune.steps, "step"),
        "federated": (plan.federated.rounds, "round"),
        "load": (2 * plan.load.requests_per_window, "req"),
    }.get(stage, (None, "s"))


def stage_hashes(plan: DemoPlan) -> dict[str, str]:
    """Each stage's marker hash: its config and, in order, the hashes of the stages it reads."""
    hashes: dict[str, str] = {}
    for stage in ORDER:
        hashes[stage] = markers.config_hash(plan.stage_config(stage), [hashes[d] for d in DEPS[stage]])
    return hashes


def schedule(plan: DemoPlan, keep_serving: bool) -> tuple[dict[str, str], set[str], bool]:
    """(stage hashes, the stages that will run, whether the app is started), from the markers."""
    hashes = stage_hashes(plan)
    reuse = {s: markers.reusable(markers.read_marker(plan.paths.work, s), hashes[s]) for s in ORDER}
    to_run = markers.stages_to_run(ORDER, DEPS, reuse)
    return hashes, to_run, keep_serving or any(s in to_run for s in NEEDS_APP)


class DemoRun:
    """What the stages share: the plan, the finished stages' markers, Ray and the running app."""

    def __init__(self, plan: DemoPlan, hashes: dict[str, str]):
        self.plan = plan
        self.hashes = hashes
        self.markers: dict[str, dict] = {}
        self.app: live.LiveApp | None = None

    def config_changed(self, stage: str) -> bool:
        """True when the stage finished before with another config (not: never ran, or was cut off)."""
        marker = markers.read_marker(self.plan.paths.work, stage)
        return marker is not None and marker["config_hash"] != self.hashes[stage]

    def ensure_ray(self) -> None:
        """The demo's one Ray: enough for training, fine-tuning, the silos and the app."""
        from raymoe.ray_runtime import init_ray

        init_ray(
            num_cpus=self.plan.ingest.execution.num_cpus,
            resources={s.resource_name: 1 for s in self.plan.federated.silos},
        )

    def stop_serving(self) -> None:
        if self.app is not None:
            from ray import serve

            serve.shutdown()
            self.app = None

    def stop_ray(self) -> None:
        """Ends this process's Ray (an embedded cluster's processes with it)."""
        import ray

        if ray.is_initialized():
            ray.shutdown()


def run_demo(plan: DemoPlan, console: Console, *, keep_serving: bool = False) -> tuple[DemoRun, dict[str, Any]]:
    """Runs (or reuses) every stage; returns the run (its app up with `keep_serving`) and the summary.

    Without `keep_serving` the app and Ray are shut down before it returns.

    Raises:
        ConfigError: a check that needed an earlier stage's output (e.g. the fine-tuning records
            against the exported tokenizer).
        Exception: a stage failed (the console has said which, and where its output is).
    """
    hashes, to_run, start_app = schedule(plan, keep_serving)
    run = DemoRun(plan, hashes)
    work = plan.paths.work
    console.line(
        f"raymoe demo: {len(ORDER)} stages under {work} "
        f"({len(ORDER) - len(to_run)} finished earlier; stage output in {plan.paths.logs})"
    )
    try:
        for name in ORDER:
            marker = markers.read_marker(work, name)
            runs = name in to_run or (name == "serve" and start_app)
            if not runs:
                assert marker is not None, f"{name} is reused only when its marker exists"
                later = "; not started now, as no stage needs it (--keep-serving starts it)" if name == "serve" else ""
                console.reused(name, marker["summary"] + later)
                run.markers[name] = marker
                if name == "rebalance" and run.app is not None:
                    live.reapply_placement(run, marker)
                    console.line("  (its placement applied to the running app)")
                continue
            total, unit = bar_of(plan, name)
            with console.stage(name, total, unit) as stage:
                done = RUN[name](run, stage)
                stage.summary = done.summary
            run.markers[name] = markers.write_marker(
                work,
                name,
                hashes[name],
                outputs=done.outputs,
                summary=done.summary,
                seconds=stage.seconds,
                result=done.result,
            )
        answer = live.ask(run.app, plan.cfg.prompt, plan.cfg.max_tokens) if run.app is not None else None
    except BaseException:
        with console.quiet("shutdown"):  # Ray's echoes of the failure stay in the log
            run.stop_serving()
            run.stop_ray()
        raise
    if not keep_serving:
        # Ray's lines about the app's actors going away stay in the log: Ray ends here too.
        with console.quiet("shutdown"):
            run.stop_serving()
            run.stop_ray()
    return run, summarize(run, answer, keep_serving)


def summarize(run: DemoRun, answer: dict | None, keep_serving: bool) -> dict[str, Any]:
    """Where everything is, and how to talk to the model."""
    plan, p = run.plan, run.plan.paths
    serve = plan.serve
    url = f"http://{serve.http.host}:{serve.http.port}{serve.route_prefix.rstrip('/')}"
    body = json.dumps({"model": serve.app.model_id, "prompt": plan.cfg.prompt, "max_tokens": 32, "temperature": 0})
    auth = f' -H "Authorization: Bearer ${serve.app.api_key_env}"' if run.app and run.app.api_key else ""
    return {
        "paths": {
            "data manifest": str(p.manifest),
            "checkpoints": f"{p.checkpoints} (step {run.markers['export']['result'].get('step')})",
            "model": str(p.model),
            "adapter": str(p.finetune_adapter),
            "federated adapter": str(p.federated_adapter),
            "traffic": str(p.traffic),
            "drift report": str(p.drift_report),
            "placement": str(p.placement),
            "report PNGs": str(p.report),
            "dashboards": str(p.dashboards),
            "stage logs": str(p.logs),
        },
        "answer": answer,
        "serving": keep_serving,
        "curl": f"curl {url}/v1/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}",
        "chat": [f"raymoe chat --model {p.model}"] + ([f"raymoe chat --url {url}"] if keep_serving else []),
        "stages": {name: run.markers[name]["summary"] for name in ORDER if name in run.markers},
    }


def print_summary(
    console: Console, summary: dict[str, Any], seconds: float, peak_bytes: int, out: Path | None = None
) -> None:
    """The closing lines (and, given `out`, the same as JSON there)."""
    from raymoe.demo.memory import GIB, PEAK_RSS_LIMIT_GIB

    summary = {**summary, "wall_s": round(seconds, 1), "peak_rss_gib": round(peak_bytes / GIB, 2)}
    answer = summary["answer"]
    if answer is not None:
        console.line(
            f"\nasked the served model (greedy, {answer['seconds']:.2f} s):\n  {answer['prompt']}{answer['text']}"
        )
    console.line("\nwhere everything is:")
    width = max(map(len, summary["paths"]))
    for name, path in summary["paths"].items():
        console.line(f"  {name:<{width}}  {path}")
    console.line("\ntalk to the model:")
    note = "the app is up until Ctrl-C" if summary["serving"] else "needs the app up: rerun with --keep-serving"
    console.line(f"  {summary['curl']}\n      ({note})")
    for line in summary["chat"]:
        console.line(f"  {line}")
    minutes, secs = divmod(round(seconds), 60)
    over = " - OVER THE LIMIT" if peak_bytes > PEAK_RSS_LIMIT_GIB * GIB else ""
    console.line(
        f"\ndone in {minutes} min {secs:02d} s; peak RSS {peak_bytes / GIB:.2f} GiB "
        f"(limit {PEAK_RSS_LIMIT_GIB:g} GiB){over}"
    )
    if out is not None:
        atomic_write_json(out, summary)
