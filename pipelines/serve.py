"""Serving entrypoint: an HF-format artifact behind the OpenAI API on Ray Serve.

    python -m pipelines.serve --config pipelines/configs/serve.debug.yaml [key.sub=value ...]
    serve run raymoe.serve.app:build_app model_path=/path/to/artifact      # the same app, Serve CLI

Locally this starts an embedded Ray cluster on 127.0.0.1; under `ray job submit` (RAY_ADDRESS set)
it joins the cluster. The config is checked (and the artifact's presence) before Ray starts.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.request
from pathlib import Path

from raymoe.config import ConfigError, parse_job_args, to_dict
from raymoe.ray_runtime import init_ray
from raymoe.serve.app import ServeJobConfig, build_app, read_api_key


def smoke_request(base_url: str, model: str, api_key: str | None) -> dict:
    """One chat completion through the proxy, as a client would send it."""
    body = {"model": model, "messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 8}
    request = urllib.request.Request(f"{base_url}/v1/chat/completions", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def main(argv: list[str] | None = None) -> int:
    cfg = parse_job_args(ServeJobConfig, argv, prog="python -m pipelines.serve", description=__doc__)
    try:
        artifact = Path(cfg.app.model_path)
        if cfg.make_debug_artifact and not (artifact / "config.json").is_file():
            from raymoe.serve.debug_artifact import make_debug_artifact

            make_debug_artifact(artifact)
        if not (artifact / "config.json").is_file():
            raise ConfigError(f"app.model_path {cfg.app.model_path!r} holds no config.json (an HF-format artifact)")
        api_key = read_api_key(cfg.app)
        application = build_app(to_dict(cfg.app))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    init_ray()
    from ray import serve

    serve.start(http_options={"host": cfg.http.host, "port": cfg.http.port})
    serve.run(application, name=cfg.app_name, route_prefix=cfg.route_prefix)
    base_url = f"http://{cfg.http.host}:{cfg.http.port}{cfg.route_prefix.rstrip('/')}"
    print(f"serving {cfg.app.model_id!r} at {base_url}/v1 (OpenAI API)", flush=True)
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
