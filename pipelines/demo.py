"""The main job end to end: ingest -> train (expert-parallel) -> export -> serve -> ask.

    python -m pipelines.demo --config pipelines/configs/demo.debug.yaml [key.sub=value ...]

Each stage is the same library call its own pipeline makes (`pipelines.ingest`, `pipelines.train`,
`raymoe export`, `pipelines.serve`), with paths rewired under `work_dir`, all on one embedded Ray
cluster (or the one RAY_ADDRESS names). Rerunning resumes: ingest skips finished work and
training continues from its newest checkpoint.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from raymoe.config import ConfigError, load_config, parse_job_args, to_dict


@dataclass(kw_only=True)
class StageConfig:
    """A pipeline's YAML config and dotted overrides applied on top of it."""

    config: str
    overrides: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class DemoConfig:
    work_dir: str = "runs/demo"
    ingest: StageConfig
    train: StageConfig
    serve: StageConfig
    prompt: str = "def fibonacci(n):"
    max_tokens: int = 48


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=300) as response:
        return json.loads(response.read())


def run_demo(cfg: DemoConfig) -> dict:
    """Runs every stage; returns a summary (paths, final loss, the served completion)."""
    from raymoe.data.ingest import IngestConfig, run_ingest
    from raymoe.ray_runtime import init_ray
    from raymoe.serve.app import ServeJobConfig, build_app
    from raymoe.train.config import TrainConfig, check_before_launch

    work = Path(cfg.work_dir)
    data_dir, ckpt_dir, model_dir = work / "data", work / "checkpoints", work / "model"
    ingest_cfg = load_config(IngestConfig, cfg.ingest.config, [*cfg.ingest.overrides, f"output_dir={data_dir}"])
    train_cfg = load_config(TrainConfig, cfg.train.config, [
        *cfg.train.overrides, f"data.path={data_dir}", f"checkpoint.uri={ckpt_dir}",
        f"storage_path={work / 'ray-train'}", f"history_path={work / 'train-history.jsonl'}", "name=demo"])
    serve_cfg = load_config(ServeJobConfig, cfg.serve.config, [
        *cfg.serve.overrides, f"app.model_path={model_dir}", "make_debug_artifact=false", "block=false"])
    init_ray()

    _banner("1/4 ingest: shipped corpus -> Parquet token shards")
    manifest = run_ingest(ingest_cfg)

    _banner(f"2/4 train: {train_cfg.flavour} model, ep={train_cfg.layout.ep} x dp={train_cfg.layout.dp}, "
            f"{train_cfg.steps} steps")
    check_before_launch(train_cfg)
    from raymoe.train.loop import run_training

    result = run_training(train_cfg)
    if result.error is not None:
        raise RuntimeError(f"training failed: {result.error}")

    _banner("3/4 export: checkpoint -> Hugging Face artifact")
    from raymoe.train.export import export_checkpoint

    export = export_checkpoint(str(ckpt_dir), str(model_dir))
    print(f"wrote {model_dir} ({export['architecture']}, step {export['checkpoint']['step']})")

    _banner("4/4 serve: Ray Serve, OpenAI API")
    from ray import serve

    # Serve's per-request and lifecycle INFO lines would drown the demo's own output.
    quiet = {"log_level": "WARNING"}
    serve.start(http_options={"host": serve_cfg.http.host, "port": serve_cfg.http.port}, logging_config=quiet)
    serve.run(build_app(to_dict(serve_cfg.app)), name=serve_cfg.app_name, route_prefix=serve_cfg.route_prefix,
              logging_config=quiet)
    base = f"http://{serve_cfg.http.host}:{serve_cfg.http.port}/v1"
    model_id = model_dir.name if not serve_cfg.app.model_id else serve_cfg.app.model_id
    try:
        started = time.perf_counter()
        reply = _post(f"{base}/completions", {"model": model_id, "prompt": cfg.prompt,
                                               "max_tokens": cfg.max_tokens, "temperature": 0})
        seconds = time.perf_counter() - started
    finally:
        serve.shutdown()
    text = reply["choices"][0]["text"]
    print(f"POST {base}/completions  prompt={cfg.prompt!r}  ({seconds:.2f} s)\n{cfg.prompt}{text}")
    summary = {"data_manifest": str(data_dir / "manifest.json"), "checkpoints": str(ckpt_dir),
               "model": str(model_dir), "final_metrics": result.metrics, "completion": text,
               "usage": reply.get("usage"), "documents": manifest.get("counts", {}).get("kept_docs")}
    return summary


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(DemoConfig, argv, prog="python -m pipelines.demo", description=__doc__)
    try:
        summary = run_demo(cfg)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    _banner("done")
    print(json.dumps({k: v for k, v in summary.items() if k != "final_metrics"}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
