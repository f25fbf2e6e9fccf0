"""The demo's stages around the running app: serve, load, drift, rebalance.

serve      `pipelines.serve`'s app (`raymoe.serve.app.build_app`) on Ray Serve with expert shards
           (`app.ep` workers) and a second slot for the experts that got the most tokens in
           training; traffic sampling writes Parquet windows to <work_dir>/traffic.
load       `raymoe.demo.load`: a clean window of requests, then a shifted one, through the
           OpenAI API; the two sealed windows are copied to <work_dir>/load/windows.
drift      `pipelines.drift`'s check (`raymoe.monitor.drift_check`): the shifted window against
           the clean one (or the ingest manifest's profile), drift.json + report.html.
rebalance  `pipelines.rebalance`'s job (`raymoe.deploy.rebalance_job.run_once`): a placement from
           the measured expert load of both windows, applied live to the running app.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from raymoe.config import to_dict
from raymoe.demo.stages import Done, read_history

# The training steps whose expert load picks the hot experts: the newest logged ones.
HOT_EXPERT_STEPS = 10


@dataclass
class LiveApp:
    """The running Serve application, as clients and the demo's stages reach it."""

    base_url: str  # without /v1
    model_id: str
    api_key: str | None
    app_name: str
    deployment: str


def hottest_experts(history_path: str | Path, num: int, num_experts: int) -> list[int]:
    """The `num` experts with the most tokens routed to them (summed over MoE layers) in the newest
    HOT_EXPERT_STEPS logged training steps, most first; experts 0.. when no load was logged."""
    loads = [r["tokens_per_expert"] for r in read_history(history_path) if r.get("tokens_per_expert")]
    if not loads:
        return list(range(num))
    load_E = np.asarray(loads[-HOT_EXPERT_STEPS:], dtype=np.int64).sum(axis=(0, 1))[:num_experts]
    # Most tokens first; the lower id on ties (a stable sort of the negated counts).
    return [int(e) for e in np.argsort(-load_E, kind="stable")[:num]]


def serve(run, stage) -> Done:
    from ray import serve as ray_serve

    from raymoe.artifact_check import check_artifact
    from raymoe.serve.app import build_app
    from raymoe.serve.live_placement import app_placement
    from raymoe.serve.serve_config import read_api_key

    plan, p = run.plan, run.plan.paths
    cfg = plan.serve
    hot = hottest_experts(p.history, plan.cfg.serve.num_hot_experts, plan.num_experts)
    app = to_dict(cfg.app)
    app["redundant_experts"] = hot
    check_artifact("app.model_path", cfg.app.model_path)
    run.ensure_ray()
    # Serve's per-request and lifecycle INFO lines would drown the demo's own output.
    quiet = {"log_level": "WARNING"}
    ray_serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port}, logging_config=quiet)
    ray_serve.run(build_app(app), name=cfg.app_name, route_prefix=cfg.route_prefix, logging_config=quiet)
    base_url = f"http://{cfg.http.host}:{cfg.http.port}{cfg.route_prefix.rstrip('/')}"
    run.app = LiveApp(base_url, cfg.app.model_id, read_api_key(cfg.app), cfg.app_name, cfg.app.name)
    placement = app_placement(cfg.app_name, cfg.app.name)
    copies = placement["expert_copies"]
    doubled = [e for e, n in enumerate(copies) if n > 1]
    return Done(
        f"{cfg.app.model_id!r} at {base_url}/v1 (OpenAI API), ep={placement['ep']} shard workers, "
        f"{len(placement['slot_expert'])} expert slots, hot expert(s) {doubled} doubled",
        {},
        {"url": base_url, "hot_experts": hot, "slot_expert": placement["slot_expert"]},
    )


def load(run, stage) -> Done:
    from raymoe.data.chat_tokenizer import ChatTokenizer
    from raymoe.demo.load import drive_load
    from raymoe.models.hf_io import read_hf_config

    plan, app, cfg = run.plan, run.app, run.plan.load
    model = plan.paths.model
    context = plan.serve.app.engine.max_seq_len or read_hf_config(model)[0].max_seq_len
    tokenizer = ChatTokenizer.from_dir(model)
    # A few tokens of margin: the server may add special tokens around the prompt.
    windows = drive_load(
        app.base_url,
        app.model_id,
        app.api_key,
        cfg,
        traffic_dir=plan.paths.traffic,
        windows_dir=plan.paths.windows,
        encode=tokenizer.encode,
        max_prompt_tokens=context - cfg.max_tokens - 8,
        on_request=stage.advance,
    )
    clean, shifted = windows["clean"], windows["shifted"]
    total = clean["requests"] + shifted["requests"]
    return Done(
        f"{total} requests ({clean['requests']} {clean['kind']}, "
        f"then {shifted['requests']} {shifted['kind']}), "
        f"{cfg.concurrency} at a time, p50 {clean['p50_s']:.2f} / {shifted['p50_s']:.2f} s; "
        "2 traffic windows sealed",
        {"clean": clean["window"], "shifted": shifted["window"]},
        {"first": clean["first"], "requests": total, "kinds": [clean["kind"], shifted["kind"]]},
    )


def drift(run, stage) -> Done:
    from raymoe.monitor.drift_check import run_check, write_outputs
    from raymoe.monitor.drift_job_config import check_before_launch

    cfg = run.plan.drift
    check_before_launch(cfg)
    result = run_check(cfg)
    paths = write_outputs(cfg, result)
    found = result.summary["drifted_features"]
    clean, shifted = run.markers["load"]["result"]["kinds"]
    against = f"the {clean} window" if cfg.reference.kind == "windows" else "the training data's profile"
    verdict = f"ALARM: drift in {', '.join(found)}" if found else "no drift"
    return Done(
        f"{verdict} of {len(result.summary['features'])} features compared "
        f"({result.meta['current_requests']} {shifted} requests vs {against})",
        {"json": str(paths["json"]), "html": str(paths["html"])},
        {"drifted": result.drifted, "drifted_features": found},
    )


def rebalance(run, stage) -> Done:
    from raymoe.deploy.rebalance_job import prepare, run_once
    from raymoe.serve.live_placement import app_placement

    cfg = run.plan.rebalance
    prepare(cfg)
    status = run_once(cfg)
    if status != 0:
        raise RuntimeError(f"the re-placement job ended with status {status} (its output says why)")
    plan = json.loads((Path(cfg.output_dir) / "placement.json").read_text())
    before, after = plan["step_imbalance"]["current"], plan["step_imbalance"]["serving"]
    now = app_placement(cfg.apply.app_name, cfg.apply.deployment)
    if now["slot_expert"] != plan["serving"]["slot_expert"]:
        raise RuntimeError(f"the app serves {now['slot_expert']}, not the applied {plan['serving']['slot_expert']}")
    moved = plan["moved_experts"] or 0
    layers = len(plan["load"])
    action = (
        f"{moved} expert copies sent over {layers} MoE layers, applied live (placement v{now['version']})"
        if moved
        else "the running placement was already the best one: nothing moved"
    )
    return Done(
        f"max/mean worker load {before:.3f} -> {after:.3f} on the load the {len(plan['source']['files'])} "
        f"windows measured; {action}",
        {"placement": str(Path(cfg.output_dir) / "placement.json")},
        {"before": before, "after": after, "slot_expert": plan["serving"]["slot_expert"]},
    )


def reapply_placement(run, marker: dict) -> None:
    """Puts a reused rebalance stage's placement on a freshly started app."""
    from raymoe.serve.live_placement import apply_to_app

    cfg = run.plan.rebalance
    apply_to_app(
        marker["result"]["slot_expert"],
        app_name=cfg.apply.app_name,
        deployment=cfg.apply.deployment,
        timeout_s=cfg.apply.timeout_s,
    )


def ask(app: LiveApp, prompt: str, max_tokens: int) -> dict:
    """One greedy completion of `prompt` from the running app: {"prompt", "text", "seconds"}."""
    import time

    from raymoe.serve.openai_client import post_json

    started = time.perf_counter()
    status, reply = post_json(
        f"{app.base_url}/v1/completions",
        {"model": app.model_id, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0},
        app.api_key,
        300,
    )
    if status != 200:
        raise RuntimeError(f"the served model answered HTTP {status}: {reply.get('error', reply)}")
    return {"prompt": prompt, "text": reply["choices"][0]["text"], "seconds": time.perf_counter() - started}
