"""Drift monitoring entrypoint: compare served traffic with a reference, watch held-out quality, act.

    python -m pipelines.drift --config pipelines/configs/drift.debug.yaml [key.sub=value ...]
    python -m pipelines.drift --config ... --eval        # also held-out perplexity / exact match
    ray job submit --working-dir . -- python -m pipelines.drift --config ... interval_s=900

Reads the serving app's Parquet traffic windows (`app.traffic.output_dir`), compares the newest
with earlier windows or the ingest manifest's profile, and writes `drift.json`, a self-contained
`report.html` and a line of `drift-history.jsonl` to output_dir. With --eval it also evaluates the
served artifact on a fixed eval set and appends to `quality-history.jsonl`. Scores are published
as Prometheus gauges (raymoe_drift_*, raymoe_quality_*). Configured actions (re-placement,
fine-tuning) run on drift and are logged to `actions.jsonl`.

Exit status: 0 no drift, 3 drift or quality decay, 2 a config error (nothing written) or data that
cannot be compared (e.g. a manifest of another tokenizer).
With interval_s > 0 it checks every interval_s seconds until stopped.
Windows, manifests, artifacts and output_dir resolve against the storage root (`--storage-root`,
RAYMOE_STORAGE_ROOT; raymoe.storage); quality.eval_path is read from the working directory.
"""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from raymoe.config import exit_on_config_error, job_arg_parser, load_job_config
from raymoe.console import Console, JobFailed
from raymoe.monitor.drift_job_config import DriftJobConfig, check_before_launch
from raymoe.storage import print_wrote

EXIT_DRIFT = 3


def _parse(argv: list[str] | None) -> tuple[DriftJobConfig, bool]:
    parser = job_arg_parser(DriftJobConfig, prog="python -m pipelines.drift", description=__doc__)
    parser.add_argument("--eval", action="store_true", help="also evaluate held-out quality of quality.artifact")
    args = parser.parse_args(argv)
    with exit_on_config_error(args.debug):
        cfg = load_job_config(DriftJobConfig, args)
        check_before_launch(cfg, evaluate=args.eval)
        debug = cfg.debug_traffic
        if debug is not None and cfg.writes_debug_traffic:
            from raymoe.serve.debug_traffic import write_debug_traffic

            if write_debug_traffic(debug.dir, debug.artifact):
                print_wrote("debug traffic windows", debug.dir)
                check_before_launch(cfg, evaluate=args.eval)
    return cfg, args.eval


def check_quality(cfg: DriftJobConfig) -> dict:
    """Evaluates the served artifact, appends the point to the history, returns it judged."""
    from raymoe.atomic_io import append_jsonl
    from raymoe.monitor.quality_history import judge, read_history
    from raymoe.monitor.run_report import QUALITY_HISTORY_FILE
    from raymoe.train.adapter_eval import held_out_quality

    q = cfg.quality
    history_path = Path(cfg.output_dir) / QUALITY_HISTORY_FILE
    history = read_history(history_path)
    scores = held_out_quality(q.artifact, q.adapter, q.eval_path, q.max_seq_len, q.max_new_tokens)
    point = judge(
        history,
        {"time": time.time(), "model": Path(q.artifact).name, "adapter": q.adapter or None, **scores},
        q.decay_threshold,
    )
    append_jsonl(history_path, point)
    return point


def check_once(cfg: DriftJobConfig, evaluate: bool) -> tuple[bool, str]:
    """One check (+ quality, + actions): whether anything drifted or decayed, and the verdict."""
    from raymoe.monitor import metrics as m
    from raymoe.monitor.drift_actions import act_on
    from raymoe.monitor.drift_check import publish_drift, run_check, write_outputs

    result = run_check(cfg)
    paths = write_outputs(cfg, result)
    quality = check_quality(cfg) if evaluate else None
    if cfg.publish_metrics:
        publish_drift(cfg.name, result.summary)
        if quality is not None:
            tags = {"run": cfg.name, "model": quality["model"]}
            m.ray_metric(m.QUALITY_PERPLEXITY).set(quality["perplexity"], tags=tags)
            m.ray_metric(m.QUALITY_DECAY).set(quality["decay"], tags=tags)
    decayed = bool(quality and quality["decayed"])
    act_on(
        cfg.actions,
        router_drift=result.router_drift,
        input_drift=result.input_drift,
        quality_decay=decayed,
        drifted_features=result.summary["drifted_features"],
        log_path=Path(cfg.output_dir) / "actions.jsonl",
    )
    verdict = f"DRIFT in {', '.join(result.summary['drifted_features'])}" if result.drifted else "no drift"
    verdict += f" ({result.meta['current_requests']} requests vs {result.meta['reference']})"
    if quality is not None:
        verdict += (
            f"; quality: perplexity {quality['perplexity']:.3f}, decay x{quality['decay']:.3f}"
            + (f", exact match {quality['exact_match']:.1%}" if "exact_match" in quality else "")
            + (" - DECAYED" if decayed else "")
        )
    print_wrote("drift report", paths["html"])
    print_wrote("drift summary", paths["json"])
    if quality is not None:
        from raymoe.monitor.run_report import QUALITY_HISTORY_FILE

        print_wrote("quality history", Path(cfg.output_dir) / QUALITY_HISTORY_FILE)
    return result.drifted or decayed, verdict


def main(argv: list[str] | None = None) -> int:
    cfg, evaluate = _parse(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if cfg.publish_metrics:
        from raymoe.ray_runtime import init_ray

        with exit_on_config_error():  # RAY_ADDRESS naming no reachable cluster
            init_ray()
    while True:
        try:
            with Console().stage("drift", bar=False) as stage:
                try:
                    drifted, stage.summary = check_once(cfg, evaluate)
                except ValueError as exc:  # windows or a manifest that cannot be compared
                    raise JobFailed(str(exc)) from exc
        except JobFailed:
            return 2
        if cfg.interval_s == 0:
            time.sleep(cfg.linger_s)  # keeps the gauges up for a scrape
            return EXIT_DRIFT if drifted else 0
        time.sleep(cfg.interval_s)


if __name__ == "__main__":
    sys.exit(main())
