"""Overload through Ray Serve's proxy: 4x the configured limits, every answer one the `openai`
client understands.

A replica that runs 2 requests and queues 4 gets 24 concurrent streaming requests. Each one
either streams to its end or is refused with 429/503 whose body is OpenAI error JSON (the client
parses it into `APIStatusError.body`) and which carries Retry-After; none meets Serve's
plain-text "Request dropped due to backpressure". The refusal latency is printed (run with -s).
"""

import asyncio
import time

import pytest

from raymoe.serve.debug_artifact import make_debug_artifact
from tests.integration.local_processes import free_port

MAX_ONGOING, MAX_QUEUED, RETRY_AFTER_S = 2, 4, 2
LOAD = 4 * (MAX_ONGOING + MAX_QUEUED)


@pytest.fixture(scope="module")
def server(ray_cluster, tmp_path_factory):
    from ray import serve

    from raymoe.serve.app import build_app

    artifact = make_debug_artifact(tmp_path_factory.mktemp("overload") / "tiny-moe", seed=3, num_layers=2)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    args = {
        "model_path": str(artifact),
        "num_cpus": 0.25,
        "api_key_env": "",
        "engine": {"num_slots": MAX_ONGOING, "num_threads": 1},
        "max_ongoing_requests": MAX_ONGOING,
        "max_queued_requests": MAX_QUEUED,
        "backpressure_status": 503,
        "retry_after_s": RETRY_AFTER_S,
        "name": "Overload",
    }
    serve.run(build_app(args), name="overload", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_request(client, i: int):
    """('done', finish_reason, seconds) for a stream read to its end, or ('refused', error, seconds)
    with the seconds until the refusal arrived."""
    import openai

    t0 = time.perf_counter()
    try:
        stream = await client.completions.create(
            model="tiny-moe",
            prompt=f"request {i}",
            max_tokens=24,
            temperature=0,
            stream=True,
            extra_body={"ignore_eos": True},
        )
        finish = [c.choices[0].finish_reason async for c in stream if c.choices]
        return "done", finish[-1], time.perf_counter() - t0
    except openai.APIStatusError as exc:
        return "refused", exc, time.perf_counter() - t0


def test_4x_the_limits_gives_completed_streams_or_openai_refusals_with_retry_after(server):
    from openai import AsyncOpenAI

    # Prepare: every request sent at once, with no client-side retry
    async def main():
        async with AsyncOpenAI(base_url=f"{server}/v1", api_key="none", max_retries=0, timeout=60) as client:
            return await asyncio.gather(*(one_request(client, i) for i in range(LOAD)))

    # Execute
    results = asyncio.run(main())
    # Assert
    done = [r for r in results if r[0] == "done"]
    refused = [r for r in results if r[0] == "refused"]
    assert len(done) + len(refused) == LOAD
    assert done and refused, f"{len(done)} completed, {len(refused)} refused"
    assert all(finish == "length" for _, finish, _ in done)
    for _, exc, _ in refused:
        assert exc.status_code in (429, 503), (exc.status_code, exc.response.text)
        assert exc.response.headers.get("retry-after") == str(RETRY_AFTER_S), exc.response.headers
        # The client found an error object: `body` is the parsed `error`, not the raw text.
        assert isinstance(exc.body, dict), exc.response.text
        assert {"message", "type", "code"} <= exc.body.keys() and exc.body["message"]
        assert exc.response.json()["error"]["code"] == "server_overloaded"
    waits = [s for _, _, s in refused]
    print(
        f"\n{LOAD} concurrent streams at limits {MAX_ONGOING}+{MAX_QUEUED}: {len(done)} completed, "
        f"{len(refused)} refused; refusal latency p50 {percentile(waits, 0.5) * 1000:.0f} ms, "
        f"p99 {percentile(waits, 0.99) * 1000:.0f} ms, max {max(waits) * 1000:.0f} ms"
    )
