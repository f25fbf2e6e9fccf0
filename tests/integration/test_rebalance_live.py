"""Live expert re-placement: a 2-worker expert-parallel Serve app under load from client threads
switches placement twice (a hand-made one through the Serve handle, then the rebalance job's from
the app's own traffic windows) without failing a request or changing a greedy output.

Greedy tokens do not depend on which copy of a logical expert computes a row (the copies hold the
same weights), nor on where the experts live, so every response must equal the one the same
prompt got alone before any change. The placement the app reports, and the copies its
`raymoe_serve_expert_copies` gauge publishes, must follow each switch.
"""

import json
import threading
import time

import httpx
import pytest

from raymoe.serve.debug_artifact import make_debug_artifact
from tests.integration.local_processes import free_port

SHAPE = {"dim": 64, "num_layers": 2, "max_seq_len": 128}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [300, 20, 41], [99] * 12, [7, 200, 13, 14, 400], [42, 43]]
MAX_TOKENS = 8
APP, DEPLOYMENT = "live", "OpenAIServer"
# 7 experts + 1 copy = 8 slots, 4 per worker. The app starts with the copy on expert 0:
# with_redundant(7, 2, [0]) = worker 0 [0, 1, 2, 3], worker 1 [4, 5, 6, 0].
STARTING = [0, 1, 2, 3, 4, 5, 6, 0]
# By hand: the copy goes to expert 6, and experts 1 and 5 trade workers; each worker loads two
# experts it did not hold (worker 0: 5 and 6; worker 1: 1 and 3).
HAND_MADE = [0, 5, 2, 6, 4, 1, 3, 6]


def complete(client, port, prompt):
    return client.post(
        f"http://127.0.0.1:{port}/v1/completions",
        timeout=60,
        json={"model": "moe7", "prompt": prompt, "max_tokens": MAX_TOKENS, "temperature": 0},
    )


class Load:
    """Client threads sending greedy completions back to back, recording every answer."""

    def __init__(self, port, num_threads=3) -> None:
        self.port, self.stop = port, threading.Event()
        self.answers: list[tuple[int, int, str, float, float]] = []  # prompt, status, text, start, end
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.run, args=(i,)) for i in range(num_threads)]

    def run(self, offset):
        with httpx.Client() as client:
            i = offset
            while not self.stop.is_set():
                start = time.monotonic()
                reply = complete(client, self.port, PROMPTS[i % len(PROMPTS)])
                text = reply.json()["choices"][0]["text"] if reply.status_code == 200 else reply.text
                with self.lock:
                    self.answers.append((i % len(PROMPTS), reply.status_code, text, start, time.monotonic()))
                i += 1

    def answered_since(self, moment):
        with self.lock:
            return sum(1 for *_, start, _ in self.answers if start > moment)

    def in_flight_at(self, moment):
        with self.lock:
            return sum(1 for *_, start, end in self.answers if start < moment < end)


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return str(make_debug_artifact(tmp_path_factory.mktemp("live") / "moe7", seed=3, num_experts=7, **SHAPE))


def test_placement_switches_under_load_without_changing_a_response(ray_cluster, artifact, tmp_path):
    from ray import serve

    from pipelines.rebalance import main as rebalance_main
    from raymoe.monitor.traffic_windows import list_windows
    from raymoe.serve.app import build_app
    from raymoe.serve.live_placement import app_placement, apply_to_app

    # Prepare: the app (traffic windows on, a window every 4 sampled requests) and each prompt's
    # greedy answer alone, before anything changes.
    traffic = tmp_path / "traffic"
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    load = None
    try:
        serve.run(
            build_app(
                {
                    "model_path": artifact,
                    "num_cpus": 0.25,
                    "api_key_env": "",
                    "ep": 2,
                    "redundant_experts": [0],
                    "shard_num_cpus": 0.25,
                    "shard_num_threads": 1,
                    "engine": {"num_slots": 4, "num_threads": 1},
                    "traffic": {"enabled": True, "output_dir": str(traffic), "window_requests": 4},
                }
            ),
            name=APP,
            route_prefix="/",
        )
        with httpx.Client() as client:
            reference = {}
            for i, prompt in enumerate(PROMPTS):
                reply = complete(client, port, prompt)
                assert reply.status_code == 200, reply.text
                reference[i] = reply.json()["choices"][0]["text"]
        before = app_placement(APP, DEPLOYMENT)
        assert before["slot_expert"] == STARTING and before["version"] == 0
        assert before["published_expert_copies"] == [2, 1, 1, 1, 1, 1, 1]

        # Execute: load from three threads; a hand-made placement through the handle, then the
        # rebalance job on the app's traffic windows (target 1.0: it re-places unless perfect).
        load = Load(port)
        for t in load.threads:
            t.start()
        time.sleep(3)
        applied_at = time.monotonic()
        answers = apply_to_app(HAND_MADE, app_name=APP, deployment=DEPLOYMENT, timeout_s=60)
        after_hand = app_placement(APP, DEPLOYMENT)
        deadline = time.monotonic() + 30
        while not list_windows(traffic) and time.monotonic() < deadline:
            time.sleep(0.5)
        job_started = time.monotonic()
        status = rebalance_main(
            [
                "--config",
                "pipelines/configs/rebalance.debug.yaml",
                f"windows.dir={traffic}",
                f"model_path={artifact}",
                f"output_dir={tmp_path / 'out'}",
                "placement.num_workers=0",
                "placement.num_redundant_experts=-1",
                "placement.target_imbalance=1.0",
                "apply.enabled=true",
                f"apply.app_name={APP}",
            ]
        )
        job_ended = time.monotonic()
        after_job = app_placement(APP, DEPLOYMENT)
        # Keep the load on until requests started after the job have been answered (on busy cores
        # one greedy completion can take longer than any fixed pause).
        deadline = time.monotonic() + 60
        while load.answered_since(job_ended) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        if load is not None:
            load.stop.set()
            for t in load.threads:
                t.join(timeout=60)
        serve.shutdown()

    # Assert: the hand-made switch loaded 2 experts per worker per layer and the app reports it,
    # in its placement and its gauge.
    assert len(answers) == 1 and answers[0]["changed"] and answers[0]["version"] == 1
    assert answers[0]["loaded"] == 2 * 2 * SHAPE["num_layers"]
    assert after_hand["slot_expert"] == HAND_MADE
    assert after_hand["published_expert_copies"] == [1, 1, 1, 1, 1, 1, 2]
    # The job read the app's windows, asked the app for its placement, and the app now serves the
    # placement it wrote.
    assert status == 0
    written = json.loads((tmp_path / "out" / "placement.json").read_text())
    assert written["current"]["slot_expert"] == HAND_MADE
    assert written["source"]["kind"] == "windows" and written["source"]["files"]
    assert after_job["slot_expert"] == written["serving"]["slot_expert"]
    # Every request answered 200 with its prompt's greedy text, requests were in flight at the
    # switches, and requests started after the last switch too.
    assert load.answers and all(code == 200 for _, code, *_ in load.answers), [a for a in load.answers if a[1] != 200][
        :3
    ]
    wrong = [(i, text) for i, _, text, *_ in load.answers if text != reference[i]]
    assert not wrong, wrong[:3]
    assert load.in_flight_at(applied_at) > 0
    assert load.answered_since(job_ended) >= 3
    assert job_started < job_ended
