"""Traffic sampling on a real Serve app: completions in, Parquet windows out, read back with the
drift job's reader."""

import json
import time

import httpx
import pyarrow.parquet as pq
import pytest

from raymoe.data.chat_tokenizer import ChatTokenizer
from raymoe.monitor.traffic_windows import list_windows, merge_windows, read_window
from raymoe.serve.debug_artifact import make_debug_artifact
from tests.integration.local_processes import free_port

# (prompt, max_tokens); the fourth is streamed.
REQUESTS = [
    ("The quick brown fox", 4),
    ("Mixture of experts models route", 6),
    ("Hello world!", 3),
    ("Ray Serve runs an OpenAI", 5),
]
TOP_K = 2  # the debug artifact routes each token to 2 experts


def wait_for(predicate, timeout_s: float = 20.0):
    deadline = time.monotonic() + timeout_s
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.05)
    return predicate()


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return str(make_debug_artifact(tmp_path_factory.mktemp("serve") / "tiny-moe", seed=1))


def test_completions_become_window_files(ray_cluster, artifact, tmp_path):
    from ray import serve

    from raymoe.serve.app import build_app

    # Prepare: windows of 3 sampled requests; 4 requests give one full window and one at shutdown
    out = tmp_path / "traffic"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model_path": artifact,
        "num_cpus": 0.25,
        "api_key_env": "",
        "engine": {"num_slots": 4, "num_threads": 1},
        "traffic": {"enabled": True, "output_dir": str(out), "window_requests": 3, "window_seconds": 600},
    }
    try:
        serve.run(build_app(args), name="traffic", route_prefix="/")
        url = f"http://127.0.0.1:{port}/v1/completions"
        # Execute
        usages = []
        for i, (prompt, n) in enumerate(REQUESTS):
            body = {"model": "tiny-moe", "prompt": prompt, "max_tokens": n, "temperature": 0, "ignore_eos": True}
            if i == 3:
                body.update(stream=True, stream_options={"include_usage": True})
            r = httpx.post(url, json=body, timeout=60)
            assert r.status_code == 200, r.text
            if i == 3:
                usages.append(json.loads(r.text.split("data: ")[-2])["usage"])  # the chunk before [DONE]
            else:
                usages.append(r.json()["usage"])
        assert wait_for(lambda: len(list_windows(out)) == 1), list(out.iterdir())
        serve.delete("traffic")  # the replica's shutdown writes the open window
        assert wait_for(lambda: len(list_windows(out)) == 2), list(out.iterdir())
    finally:
        serve.shutdown()
    # Assert
    windows = [read_window(p) for p in list_windows(out)]
    assert [w.meta["num_sampled"] for w in windows] == [3, 1]
    assert [w.meta["num_requests_seen"] for w in windows] == [3, 1]
    merged = merge_windows(windows)
    tokenizer = ChatTokenizer.from_dir(artifact)
    prompt_lengths = [len(tokenizer.encode(p)) for p, _ in REQUESTS]
    assert merged.features["prompt_length"].tolist() == prompt_lengths == [u["prompt_tokens"] for u in usages]
    assert merged.features["output_length"].tolist() == [n for _, n in REQUESTS]
    assert merged.features["token_histogram"].sum() == sum(prompt_lengths)
    logprobs = merged.features["mean_logprob"]
    assert len(logprobs) == 4 and (logprobs < 0).all()
    assert merged.features["embedding"].shape == (4, 128)  # the debug artifact's model dim
    # Every token fed to the model is routed to TOP_K experts in every MoE layer: the prompt and
    # all generated tokens but the last (which is never fed back). The windows' loads add up to
    # the engine's counts at shutdown.
    per_layer = merged.features["expert_load"].sum(axis=1)
    fed = sum(p + n - 1 for p, (_, n) in zip(prompt_lengths, REQUESTS))
    assert per_layer.tolist() == [fed * TOP_K] * len(per_layer)
    for path in list_windows(out):
        assert not {"prompt_text", "output_text"} & set(pq.read_schema(path).names)
