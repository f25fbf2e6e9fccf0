"""Serving entrypoint: an HF-format artifact behind the OpenAI API on Ray Serve.

    python -m pipelines.serve --config pipelines/configs/serve.debug.yaml [key.sub=value ...]
    serve run raymoe.serve.app:build_app model_path=/path/to/artifact      # the same app, Serve CLI

Locally this starts an embedded Ray cluster on 127.0.0.1; under `ray job submit` (RAY_ADDRESS set)
it joins the cluster. The config, the artifact (config.json, a tokenizer within its vocabulary),
lora_dir and the API key file are checked before Ray starts. A random-weight debug artifact is
written only at the config's `debug_artifact` path, when app.model_path is that path.
app.model_path, debug_artifact, app.lora_dir and app.traffic.output_dir resolve against the storage
root (`--storage-root`, RAYMOE_STORAGE_ROOT; raymoe.storage); the artifact served and, with
traffic sampling on, where its windows go are printed before serving starts.
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import fields
from pathlib import Path

from raymoe.config import ConfigError, exit_on_config_error, job_arg_parser, load_job_config, qualify, to_dict
from raymoe.console import Console
from raymoe.ray_runtime import init_ray
from raymoe.serve.app import build_app
from raymoe.serve.openai_client import post_json
from raymoe.serve.serve_config import ServeConfig, ServeJobConfig, check_port_free, list_adapters, read_api_key
from raymoe.storage import location, print_wrote

APP_KEYS = [f.name for f in fields(ServeConfig)]


def smoke_request(base_url: str, model: str, api_key: str | None) -> dict:
    """One chat completion through the proxy, as a client would send it."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
    status, reply = post_json(f"{base_url}/v1/chat/completions", body, api_key, timeout_s=120)
    if status != 200:
        raise RuntimeError(f"the smoke request got HTTP {status}: {reply.get('error', reply)}")
    return reply


def prepare(cfg: ServeJobConfig):
    """Everything checked (and the debug artifact written, where the config allows one) before
    Ray starts; returns the Serve application and the API key.

    Raises:
        ConfigError: naming the `app.` key, its value and what was expected.
    """
    from raymoe.artifact_check import check_artifact

    try:
        list_adapters(cfg.app.lora_dir)
        api_key = read_api_key(cfg.app)
    except ConfigError as exc:
        raise ConfigError(qualify("app", str(exc), APP_KEYS)) from None
    if not os.environ.get("RAY_ADDRESS"):  # the embedded cluster's proxy binds it (a cluster's may run already)
        check_port_free(cfg.http.host, cfg.http.port)
    if cfg.writes_debug_artifact and not (Path(cfg.app.model_path) / "config.json").is_file():
        from raymoe.serve.debug_artifact import make_debug_artifact

        make_debug_artifact(cfg.app.model_path)
        print_wrote("debug artifact", cfg.app.model_path)
    check_artifact("app.model_path", cfg.app.model_path)
    try:
        return build_app(to_dict(cfg.app)), api_key
    except ConfigError as exc:
        raise ConfigError(qualify("app", str(exc), APP_KEYS)) from None


def main(argv: list[str] | None = None) -> int:
    args = job_arg_parser(ServeJobConfig, prog="python -m pipelines.serve", description=__doc__).parse_args(argv)
    with exit_on_config_error(args.debug):
        cfg = load_job_config(ServeJobConfig, args)
        application, api_key = prepare(cfg)
    print(f"serving artifact: {location(cfg.app.model_path)}", flush=True)
    if cfg.app.traffic.enabled:
        print(f"traffic windows go to: {location(cfg.app.traffic.output_dir)}", flush=True)
    with exit_on_config_error():  # RAY_ADDRESS naming no reachable cluster
        init_ray()
    from ray import serve

    base_url = f"http://{cfg.http.host}:{cfg.http.port}{cfg.route_prefix.rstrip('/')}"
    # The stage ends when every replica is up (serve.run returns then).
    with Console().stage("serve") as stage:
        serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
        serve.run(application, name=cfg.app_name, route_prefix=cfg.route_prefix)
        stage.summary = f"serving {cfg.app.model_id!r} at {base_url}/v1 (OpenAI API)"
    if not cfg.block:
        reply = smoke_request(base_url, cfg.app.model_id, api_key)
        print(json.dumps({"smoke_reply": reply["choices"][0]["message"], "usage": reply["usage"]}), flush=True)
        serve.shutdown()
        return 0
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
