"""The main job end to end, on one embedded Ray cluster (or the one RAY_ADDRESS names):

    ingest the shipped corpus -> train (Ray Train, expert-parallel) -> export -> LoRA fine-tune
    -> one federated round over 3 local silos -> serve (Ray Serve, expert shards, a second slot
    for the hot experts) -> a short load through the OpenAI API (a clean window, then a shifted
    one) -> drift check -> expert re-placement from the measured load, applied live -> PNG report
    -> Grafana dashboards

    python -m pipelines.demo --config pipelines/configs/demo.debug.yaml [--keep-serving] [key.sub=value ...]

Each stage is the library call its own pipeline makes, with its paths under `work_dir`
(`raymoe.demo`). A rerun reuses every stage whose config (and whose inputs' configs) did not change
and whose outputs exist. The demo ends with where everything is, how to talk to the model, its wall
time and its peak memory (RSS of the driver and every Ray process). With --keep-serving the app
stays up until Ctrl-C; otherwise Serve shuts down at the end.

Exit status: 0 done, 1 a stage failed (its output is in <work_dir>/logs), 2 a config error
(before anything started, or a check that needed an earlier stage's output).
"""

from __future__ import annotations

import os
import sys
import time

from raymoe.config import ConfigError, exit_on_config_error, job_arg_parser, load_job_config
from raymoe.demo.config import DemoConfig  # also where `raymoe config show demo` finds it


def main(argv: list[str] | None = None) -> int:
    started = time.perf_counter()
    parser = job_arg_parser(DemoConfig, prog="python -m pipelines.demo", description=__doc__)
    parser.add_argument(
        "--keep-serving", action="store_true", help="leave the served model up at the end, until Ctrl-C"
    )
    args = parser.parse_args(argv)
    with exit_on_config_error(args.debug):
        from raymoe.demo.plan import load_plan
        from raymoe.demo.runner import schedule

        cfg = load_job_config(DemoConfig, args)  # work_dir resolves against the storage root
        plan = load_plan(cfg)
        if schedule(plan, args.keep_serving)[2] and not os.environ.get("RAY_ADDRESS"):
            from raymoe.serve.serve_config import check_port_free

            check_port_free(plan.serve.http.host, plan.serve.http.port)

    from raymoe.console import Console
    from raymoe.demo.memory import PeakRSS
    from raymoe.demo.runner import print_summary, run_demo

    memory = PeakRSS().start()
    console = Console(plan.paths.logs, verbose=cfg.verbose)
    try:
        run, summary = run_demo(plan, console, keep_serving=args.keep_serving)
    except ConfigError as exc:  # a check that needed an earlier stage's output
        print(f"config error: {exc}", file=sys.stderr)
        return _stop_ray(2)
    except Exception as exc:
        if args.debug:
            raise
        print(f"demo stopped: {type(exc).__name__} (run again with --debug for the traceback)", file=sys.stderr)
        return _stop_ray(1)
    print_summary(console, summary, time.perf_counter() - started, memory.stop(), out=plan.paths.summary)
    if args.keep_serving:
        _wait_for_ctrl_c()
        run.stop_serving()
    return _stop_ray(0)


def _wait_for_ctrl_c() -> None:
    """Blocks until SIGINT (Ctrl-C) or SIGTERM, either of which then shuts the app down cleanly."""
    import signal
    import threading

    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(1.0):
        pass


def _stop_ray(status: int) -> int:
    """Ends this process's Ray (the embedded cluster's processes with it); returns `status`."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    return status


if __name__ == "__main__":
    sys.exit(main())
