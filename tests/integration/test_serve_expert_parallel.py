"""Expert-parallel serving: an engine over 2 shard workers (Ray actors joined by gloo) gives the
same greedy tokens as the engine with the whole model in-process (ep=1), in one continuous batch;
the same seeded samples and log-probabilities with the workers sampling their own rows; also
with a redundant copy of the hottest expert, and through the HTTP app.

The ep=1 engine is the reference: expert parallelism changes where each expert runs, never what
it computes, so greedy tokens must be identical.
"""

import time

import httpx
import pytest

from raymoe.config import ConfigError
from raymoe.serve.debug_artifact import make_debug_artifact
from raymoe.serve.engine import EngineConfig, EngineCore
from raymoe.serve.request import GenerationRequest, SamplingParams
from tests.integration.local_processes import free_port

SHAPE = {"dim": 64, "num_layers": 2, "max_seq_len": 128}
PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [300, 20, 41], [99] * 12, [7, 200, 13, 14, 400]]
MAX_TOKENS = [8, 3, 6, 5]  # different lengths: late steps leave a worker without rows


def engine_config():
    return EngineConfig(num_slots=4, max_tokens_per_step=16, num_threads=1)


# Seeded sampling of every kind the sampler has, with log-probabilities asked for by some.
SAMPLED = [
    SamplingParams(temperature=0.8, top_p=0.9, seed=11, max_tokens=MAX_TOKENS[0], logprobs=3),
    SamplingParams(temperature=1.0, seed=5, max_tokens=MAX_TOKENS[1]),
    SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS[2], logprobs=2),
    SamplingParams(temperature=0.7, top_k=20, seed=9, max_tokens=MAX_TOKENS[3], logprobs=0),
]


def run_batch(core, params=None, events=None):
    """Three requests start together; the fourth arrives after two steps (continuous batching).
    Greedy unless `params` (one per request); every event goes to `events` when given."""

    def add(i):
        p = params[i] if params else SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS[i])
        core.add_request(GenerationRequest(request_id=f"r{i}", prompt_ids=PROMPTS[i], params=p))

    for i in range(3):
        add(i)
    outputs, steps = {}, 0
    while core.has_work() or steps < 2:
        if steps == 2:
            add(3)
        for rid, event in core.step():
            outputs.setdefault(rid, []).append(event.token_id)
            if events is not None:
                events.setdefault(rid, []).append(event)
        steps += 1
    return outputs, steps


def reference(path):
    from raymoe.models import load_hf

    core = EngineCore(load_hf(path), engine_config())
    outputs, _ = run_batch(core)
    return outputs, core.tokens_per_expert_LE


def sharded(path, redundant=()):
    from raymoe.serve.shard_workers import ShardedModel

    model = ShardedModel.launch(path, 2, redundant_experts=list(redundant), num_cpus=0.25, num_threads=1)
    return model, EngineCore(model, engine_config(), kv_cache_factory=model.make_cache)


@pytest.fixture(scope="module")
def artifact8(tmp_path_factory):
    return str(make_debug_artifact(tmp_path_factory.mktemp("ep") / "moe8", seed=2, **SHAPE))


@pytest.fixture(scope="module")
def artifact7(tmp_path_factory):
    # 7 experts + 1 redundant copy = 8 slots, 4 per worker.
    return str(make_debug_artifact(tmp_path_factory.mktemp("ep") / "moe7", seed=3, num_experts=7, **SHAPE))


def test_two_shard_workers_match_in_process_engine(ray_cluster, artifact8):
    # Prepare
    expected, tokens_LE = reference(artifact8)
    model, core = sharded(artifact8)
    try:
        # Execute
        got, _ = run_batch(core)
        # Assert: same tokens; one Ray call per worker per step; the engine's expert counts
        # (summed over workers) equal the in-process ones, since each token is routed alike.
        assert got == expected
        assert [len(got[f"r{i}"]) for i in range(4)] == MAX_TOKENS
        assert model.num_ray_calls == 2 * core.num_steps
        assert core.tokens_per_expert_LE.tolist() == tokens_LE.tolist()
        # A dead shard worker is reported by the health check (Serve then restarts the replica).
        model.check_health()
        model.check_health()
        ray_cluster.kill(model.workers[1])

        def poll_health():
            for _ in range(100):
                model.check_health()
                time.sleep(0.1)

        with pytest.raises(ray_cluster.exceptions.RayActorError):
            poll_health()
    finally:
        model.shutdown()


def test_workers_sample_their_rows_as_the_in_process_engine_does(ray_cluster, artifact8):
    # Prepare: the in-process engine's seeded samples and log-probabilities.
    from raymoe.models import load_hf

    want_events: dict = {}
    expected, _ = run_batch(EngineCore(load_hf(artifact8), engine_config()), SAMPLED, want_events)
    model, core = sharded(artifact8)
    try:
        # Execute: the same requests, each worker sampling its own rows.
        got_events: dict = {}
        got, _ = run_batch(core, SAMPLED, got_events)
    finally:
        model.shutdown()
    # Assert: the same tokens, and the same log-probabilities where they were asked for.
    assert got == expected
    assert len(set(map(tuple, got.values()))) == 4
    for rid, events in want_events.items():
        for want, event in zip(events, got_events[rid]):
            assert (event.logprob is None) == (want.logprob is None)
            if want.logprob is not None:
                assert event.logprob == pytest.approx(want.logprob, abs=1e-4)
                assert list(event.top_logprobs) == list(want.top_logprobs)
                assert list(event.top_logprobs.values()) == pytest.approx(list(want.top_logprobs.values()), abs=1e-4)


def test_redundant_copy_of_hot_expert_keeps_tokens_and_takes_load(ray_cluster, artifact7):
    # Prepare: the hottest expert of the reference run gets a second slot (the EPLB idea).
    expected, tokens_LE = reference(artifact7)
    hot = int(tokens_LE.sum(0).argmax())
    model, core = sharded(artifact7, redundant=[hot])
    try:
        # Execute
        got, _ = run_batch(core)
        rows = model.slot_rows()  # [worker][layer][local slot]
        # Assert: same tokens, and both copies of the hot expert computed rows.
        assert got == expected
        copies = model.placement.expert_slots[hot]
        assert len(copies) == 2 and model.placement.slot_rank(copies[0]) != model.placement.slot_rank(copies[1])
        per_copy = []
        for slot in copies:
            w, local = model.placement.slot_rank(slot), slot % model.placement.slots_per_rank
            per_copy.append(sum(layer[local] for layer in rows[w]))
        assert all(n > 0 for n in per_copy), per_copy
    finally:
        model.shutdown()


def test_http_app_with_two_shard_workers(ray_cluster, artifact8):
    from ray import serve

    from raymoe.serve.app import build_app

    # Prepare: reference greedy tokens of one prompt through the in-process engine.
    expected, _ = reference(artifact8)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        # The shard workers also run their experts on two threads (expert_threads): same tokens.
        serve.run(
            build_app(
                {
                    "model_path": artifact8,
                    "dtype": "fp32",  # compared with the fp32 model's greedy tokens
                    "num_cpus": 0.25,
                    "api_key_env": "",
                    "ep": 2,
                    "shard_num_cpus": 0.25,
                    "shard_num_threads": 1,
                    "engine": {"num_slots": 4, "num_threads": 1, "expert_threads": 2},
                }
            ),
            name="ep",
            route_prefix="/",
        )
        # Execute: token ids as the prompt, so the comparison needs no tokenizer round trip.
        reply = httpx.post(
            f"http://127.0.0.1:{port}/v1/completions",
            timeout=60,
            json={"model": "moe8", "prompt": PROMPTS[0], "max_tokens": MAX_TOKENS[0], "temperature": 0},
        )
        # Assert
        assert reply.status_code == 200, reply.text
        body = reply.json()
        assert body["usage"]["completion_tokens"] == MAX_TOKENS[0]
        assert body["usage"]["prompt_tokens"] == len(PROMPTS[0])
        assert body["choices"][0]["text"] == decode(artifact8, expected["r0"])
    finally:
        serve.shutdown()


def decode(path, ids):
    from raymoe.data.chat_tokenizer import ChatTokenizer

    return ChatTokenizer.from_dir(path).decode(ids)


def test_config_errors_name_the_fields(artifact8):
    from raymoe.serve.app import build_app
    from raymoe.serve.serve_config import ServeConfig

    # 8 experts + 1 copy = 9 slots cannot split over 2 workers: refused before any replica starts.
    with pytest.raises(ConfigError, match=r"8 \+ 1 = 9 expert slots do not split evenly over ep=2"):
        build_app({"model_path": artifact8, "ep": 2, "redundant_experts": [3]})
    with pytest.raises(ConfigError, match="redundant_experts=\\[3\\] needs ep > 1"):
        ServeConfig(model_path=artifact8, redundant_experts=[3])
    with pytest.raises(ConfigError, match="ep must be an integer >= 1, got 0"):
        ServeConfig(model_path=artifact8, ep=0)
