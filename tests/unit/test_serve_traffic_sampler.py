"""Traffic sampling: engine features (chosen-token logprob, pooled embedding), window files, the
HTTP layer's recording, config validation."""

import json
import os
import re
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from fastapi.testclient import TestClient

from raymoe.config import ConfigError, from_dict
from raymoe.data.chat_tokenizer import ChatTokenizer
from raymoe.models import MoETransformer, flavour
from raymoe.serve.engine import EngineConfig, EngineCore
from raymoe.serve.http_app import OpenAIServer, create_app
from raymoe.serve.request import GenerationRequest, SamplingParams, TokenEvent
from raymoe.serve.serve_config import ServeConfig
from raymoe.serve.traffic_sampler import RequestFeatures, TrafficConfig, TrafficSampler
from tests.unit.engine_streams import greedy
from tests.unit.fake_engine import FakeEngine, write_tokenizer


@pytest.fixture(scope="module")
def model():
    m = MoETransformer(flavour("debug"))
    m.init_weights(seed=0)
    return m.eval()


class Clock:
    def __init__(self, t: float):
        self.t = t

    def __call__(self) -> float:
        return self.t


def make_sampler(tmp_path, counts, clock=None, **cfg):
    config = TrafficConfig(enabled=True, output_dir=str(tmp_path), **cfg)
    return TrafficSampler(
        config,
        model_id="tiny",
        vocab_size=10,
        expert_counts=lambda: counts,
        replica_tag="r0",
        clock=clock or Clock(1000.0),
        background=False,
    )


def features(prompt, logprobs, embedding=None, adapter=None, sampled=True, text=None):
    request = RequestFeatures(prompt_ids=prompt, adapter=adapter, sampled=sampled, prompt_text=text)
    for i, lp in enumerate(logprobs):
        request.add(f"t{i}", TokenEvent(token_id=1, chosen_logprob=lp, embedding=embedding if i == 0 else None))
    return request


def run_engine(model, requests):
    core = EngineCore(model, EngineConfig(num_slots=4, max_tokens_per_step=64))
    for r in requests:
        core.add_request(r)
    events = {}
    while core.has_work():
        for rid, event in core.step():
            events.setdefault(rid, []).append(event)
    return events


# -- the engine's features ------------------------------------------------------------------------
def test_recorded_requests_carry_the_model_logprob_and_last_prompt_hidden_state(model):
    # Prepare: two recorded prompts of different lengths prefilled together (one padded group)
    # beside an unrecorded one, so the embedding rows must be picked per request.
    prompts = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [100, 3, 42], "plain": [17, 18, 19, 20]}
    requests = [
        GenerationRequest(request_id=rid, prompt_ids=p, params=greedy(5), record_features=rid != "plain")
        for rid, p in prompts.items()
    ]
    # Execute
    events = run_engine(model, requests)
    # Assert: reference by running the model on the whole sequence at every step
    with torch.no_grad():
        for rid in ("a", "b"):
            ids = list(prompts[rid])
            for event in events[rid]:
                logprobs_V = model(torch.tensor([ids]))[0, -1].log_softmax(-1)
                assert event.token_id == int(logprobs_V.argmax())
                assert event.chosen_logprob == pytest.approx(float(logprobs_V[event.token_id]), abs=1e-5)
                ids.append(event.token_id)
            hidden_D = model.hidden_states(torch.tensor([prompts[rid]]))[0, -1]
            first, *rest = events[rid]
            torch.testing.assert_close(torch.tensor(first.embedding), hidden_D, atol=1e-5, rtol=1e-5)
            assert all(e.embedding is None for e in rest)
    assert all(e.chosen_logprob is None and e.embedding is None and e.logprob is None for e in events["plain"])


@pytest.mark.parametrize("capacity_factor", [None, 1.0])  # one pass over all jobs; a pass per job
def test_forward_jobs_keep_the_final_norm_hidden_state_of_each_returned_row(capacity_factor):
    from raymoe.inference.forward_jobs import run_forward_jobs
    from tests.unit.test_forward_jobs import filled_cache, make_model, step_jobs

    model = make_model(capacity_factor)
    jobs = step_jobs(model.cfg.vocab_size)
    cache, plain_cache = filled_cache(model), filled_cache(model)
    run_forward_jobs(model, jobs, cache, keep_hidden=True)
    hidden_ND = model.last_hidden_ND
    with torch.no_grad():
        expected = [
            model.hidden_states(j.ids_BT, j.positions_BT, plain_cache, j.slot_ids_B)[
                torch.arange(j.ids_BT.shape[0]), j.last_B
            ]
            for j in jobs
        ]
    torch.testing.assert_close(hidden_ND, torch.cat(expected), rtol=1e-4, atol=1e-4)
    run_forward_jobs(model, jobs, filled_cache(model))
    assert model.last_hidden_ND is None  # not asked: nothing kept


def test_recording_does_not_change_the_tokens(model):
    params = SamplingParams(max_tokens=8, temperature=1.0, top_p=0.9, seed=7)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    plain = run_engine(model, [GenerationRequest(request_id="x", prompt_ids=prompt, params=params)])
    recorded = run_engine(
        model, [GenerationRequest(request_id="x", prompt_ids=prompt, params=params, record_features=True)]
    )
    assert [e.token_id for e in recorded["x"]] == [e.token_id for e in plain["x"]]


def test_window_mean_logprob_is_the_engine_runs_log_softmax_mean(model, tmp_path):
    # Prepare: a greedy run of the debug model, its events fed to the sampler as the HTTP layer does
    prompt = [11, 12, 13, 14]
    events = run_engine(
        model, [GenerationRequest(request_id="r", prompt_ids=prompt, params=greedy(6), record_features=True)]
    )["r"]
    with torch.no_grad():
        ids, expected = list(prompt), []
        for e in events:
            expected.append(float(model(torch.tensor([ids]))[0, -1].log_softmax(-1)[e.token_id]))
            ids.append(e.token_id)
    sampler = TrafficSampler(
        TrafficConfig(enabled=True, output_dir=str(tmp_path)),
        model_id="debug",
        vocab_size=model.cfg.vocab_size,
        expert_counts=lambda: np.zeros((3, 8)),
        background=False,
    )
    request = sampler.start(prompt)
    for e in events:
        request.add("", e)
    # Execute
    sampler.record(request)
    [path] = sampler.flush()
    table = pq.read_table(path)
    # Assert
    assert table.column("output_length").to_pylist() == [6]
    assert table.column("mean_logprob").to_pylist()[0] == pytest.approx(sum(expected) / 6, abs=1e-5)
    with torch.no_grad():
        hidden_D = model.hidden_states(torch.tensor([prompt]))[0, -1]
    np.testing.assert_allclose(table.column("embedding").to_pylist()[0], hidden_D.numpy(), atol=1e-5, rtol=1e-5)


# -- window files ---------------------------------------------------------------------------------
def test_window_columns_and_metadata_equal_hand_computed_values(tmp_path):
    # Prepare: V=10, K=4, so token t goes to bucket t*4//10: 0,1,2 -> 0; 3,4 -> 1; 5,6,7 -> 2; 8,9 -> 3
    counts = np.array([[1, 2], [3, 4]])
    clock = Clock(1700000000.0)
    sampler = make_sampler(tmp_path, counts, clock, token_buckets=4)
    clock.t += 2.5
    sampler.record(features([0, 3, 3, 9, 5], [-1.0, -2.0, -0.5], embedding=[0.5, -1.5]))
    sampler.record(features([7, 8, 2], [-0.25], adapter="sql"))
    sampler.record(features([1, 2], [-9.0], sampled=False))  # seen, not sampled
    counts[:] = [[4, 2], [3, 9]]
    clock.t = 1700000060.123
    # Execute
    [path] = sampler.flush()
    # Assert
    assert path.name == "window-1700000060123-r0.parquet"
    table = pq.read_table(path)
    assert table.column_names == [
        "prompt_length",
        "output_length",
        "mean_logprob",
        "prompt_token_buckets",
        "embedding",
        "adapter",
        "finished_at",
    ]
    # (Parquet names a list's items "element" where pyarrow says "item".)
    assert [str(f.type).replace("element:", "item:") for f in table.schema] == [
        "int32",
        "int32",
        "double",
        "list<item: int32>",
        "list<item: float>",
        "string",
        "double",
    ]
    assert table.column("prompt_length").to_pylist() == [5, 3]
    assert table.column("output_length").to_pylist() == [3, 1]
    assert table.column("mean_logprob").to_pylist() == pytest.approx([-3.5 / 3, -0.25])
    assert table.column("prompt_token_buckets").to_pylist() == [[1, 2, 1, 1], [1, 0, 1, 1]]
    assert table.column("embedding").to_pylist() == [[0.5, -1.5], None]
    assert table.column("adapter").to_pylist() == [None, "sql"]
    assert table.column("finished_at").to_pylist() == [1700000002.5] * 2
    meta = json.loads(table.schema.metadata[b"raymoe.window"])
    assert meta == {
        "format": 1,
        "start": 1700000000.0,
        "end": 1700000060.123,
        "model": "tiny",
        "vocab_size": 10,
        "token_buckets": 4,
        "sample_rate": 1.0,
        "num_requests_seen": 3,
        "num_sampled": 2,
        "expert_load": [[3, 0], [0, 5]],
    }


def test_text_columns_only_with_store_text(tmp_path):
    sampler = make_sampler(tmp_path / "text", np.zeros((1, 2)), store_text=True)
    sampler.record(features([1, 2], [-1.0, -1.0], text="hi there"))
    table = pq.read_table(sampler.flush()[0])
    assert table.column("prompt_text").to_pylist() == ["hi there"]
    assert table.column("output_text").to_pylist() == ["t0t1"]
    # Without the flag the prompt text handed over is not kept
    sampler = make_sampler(tmp_path / "plain", np.zeros((1, 2)))
    request = sampler.start([1, 2], prompt_text=lambda: "secret")
    assert request.sampled and request.prompt_text is None


def test_embedding_off_writes_null_embeddings(tmp_path):
    sampler = make_sampler(tmp_path, np.zeros((1, 2)), embedding=False)
    sampler.record(features([1], [-1.0], embedding=[1.0, 2.0]))
    assert pq.read_table(sampler.flush()[0]).column("embedding").to_pylist() == [None]


def test_sample_rate_half_keeps_about_half_and_the_seed_repeats_the_choice(tmp_path):
    a = make_sampler(tmp_path, np.zeros((1, 2)), sample_rate=0.5, seed=3)
    b = make_sampler(tmp_path, np.zeros((1, 2)), sample_rate=0.5, seed=3)
    picks = [a.start([1]).sampled for _ in range(2000)]
    # Binomial(2000, 0.5): standard deviation 22; 100 is over 4 of them.
    assert 900 <= sum(picks) <= 1100
    assert [b.start([1]).sampled for _ in range(2000)] == picks


def test_a_failed_write_leaves_no_file(tmp_path, monkeypatch):
    sampler = make_sampler(tmp_path, np.zeros((1, 2)))
    sampler.record(features([1, 2, 3], [-1.0]))

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        sampler.flush()
    assert list(tmp_path.iterdir()) == []  # neither a window nor its temp file


def test_an_empty_window_is_not_written_and_its_expert_load_is_not_carried_over(tmp_path):
    counts = np.array([[0, 0]])
    clock = Clock(100.0)
    sampler = make_sampler(tmp_path, counts, clock)
    sampler.record(features([1], [-1.0], sampled=False))
    counts[:] = [[5, 1]]
    clock.t = 200.0
    assert sampler.flush() == []
    assert list(tmp_path.iterdir()) == []
    sampler.record(features([1], [-1.0]))
    counts[:] = [[6, 3]]
    clock.t = 300.0
    meta = json.loads(pq.read_table(sampler.flush()[0]).schema.metadata[b"raymoe.window"])
    assert (meta["start"], meta["num_requests_seen"], meta["expert_load"]) == (200.0, 1, [[1, 2]])


def test_windows_ending_in_the_same_millisecond_get_distinct_names(tmp_path):
    sampler = make_sampler(tmp_path, np.zeros((1, 2)))
    sampler.record(features([1], [-1.0]))
    [first] = sampler.flush()
    sampler.record(features([2], [-1.0]))
    [second] = sampler.flush()
    # The clock stands at 1000.0 s = 1000000 ms for both
    assert (first.name, second.name) == ("window-0000001000000-r0.parquet", "window-0000001000001-r0.parquet")


def test_background_thread_flushes_on_request_count_and_time_and_close_writes_the_rest(tmp_path):
    config = TrafficConfig(enabled=True, output_dir=str(tmp_path / "n"), window_requests=2, window_seconds=60)
    sampler = TrafficSampler(
        config, model_id="m", vocab_size=10, expert_counts=lambda: [[0, 0]], replica_tag="replica/1"
    )
    for prompt in ([1], [2], [3]):
        sampler.record(features(prompt, [-1.0]))
    deadline = time.monotonic() + 10
    while not list((tmp_path / "n").glob("window-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    sampler.close()
    files = sorted((tmp_path / "n").glob("window-*"))
    assert [pq.read_table(f).num_rows for f in files] == [2, 1]
    assert all(re.fullmatch(r"window-\d{13}-replica_1\.parquet", f.name) for f in files)
    # On time: a window of 0.2 s with one row is written without a flush call
    config = TrafficConfig(enabled=True, output_dir=str(tmp_path / "t"), window_seconds=0.2)
    sampler = TrafficSampler(config, model_id="m", vocab_size=10, expert_counts=lambda: [[0, 0]])
    sampler.record(features([1], [-1.0]))
    deadline = time.monotonic() + 10
    while not list((tmp_path / "t").glob("window-*")) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(list((tmp_path / "t").glob("window-*"))) == 1
    sampler.close()


# -- the HTTP layer -------------------------------------------------------------------------------
def test_http_layer_records_finished_requests_streamed_or_not(tmp_path):
    tokenizer = ChatTokenizer.from_dir(write_tokenizer(tmp_path / "tok"))
    engine = FakeEngine(tokenizer.encode("Hello world! The quick brown fox"))
    vocab = tokenizer.tokenizer.get_vocab_size()
    sampler = TrafficSampler(
        TrafficConfig(enabled=True, output_dir=str(tmp_path / "w"), token_buckets=8),
        model_id="moe",
        vocab_size=vocab,
        expert_counts=lambda: [[1, 2]],
        background=False,
    )
    server = OpenAIServer(engine=engine, tokenizer=tokenizer, model_id="moe", adapters=["sql"], traffic=sampler)
    client = TestClient(create_app(server))
    # Execute: a plain and a streamed completion, a streamed chat, and a refused request
    plain = client.post("/v1/completions", json={"model": "moe", "prompt": "Ray Serve runs", "max_tokens": 3})
    streamed = client.post(
        "/v1/completions", json={"model": "moe:sql", "prompt": [5, 6, 7], "max_tokens": 2, "stream": True}
    )
    chat = client.post(
        "/v1/chat/completions",
        json={"model": "moe", "max_tokens": 4, "stream": True, "messages": [{"role": "user", "content": "hi"}]},
    )
    refused = client.post("/v1/completions", json={"model": "moe", "prompt": "x", "max_tokens": 1000})
    # Assert
    assert [r.status_code for r in (plain, streamed, chat, refused)] == [200, 200, 200, 400]
    assert all(r.record_features for r in engine.requests)
    table = pq.read_table(sampler.flush()[0])
    chat_ids = tokenizer.encode_chat([{"role": "user", "content": "hi"}])
    assert table.column("prompt_length").to_pylist() == [plain.json()["usage"]["prompt_tokens"], 3, len(chat_ids)]
    assert table.column("output_length").to_pylist() == [3, 2, 4]
    assert table.column("adapter").to_pylist() == [None, "sql", None]
    assert (
        table.column("prompt_token_buckets").to_pylist()[1]
        == np.bincount(np.array([5, 6, 7]) * 8 // vocab, minlength=8).tolist()
    )
    # The fake engine reports no chosen-token logprobs or embeddings: nulls, not zeros
    assert table.column("mean_logprob").to_pylist() == [None] * 3
    assert table.column("embedding").to_pylist() == [None] * 3
    assert "prompt_text" not in table.column_names
    assert json.loads(table.schema.metadata[b"raymoe.window"])["num_requests_seen"] == 3


def test_http_layer_writes_text_only_with_store_text(tmp_path):
    tokenizer = ChatTokenizer.from_dir(write_tokenizer(tmp_path / "tok"))
    engine = FakeEngine(tokenizer.encode("Hello world!"))
    sampler = TrafficSampler(
        TrafficConfig(enabled=True, output_dir=str(tmp_path / "w"), store_text=True),
        model_id="moe",
        vocab_size=tokenizer.tokenizer.get_vocab_size(),
        expert_counts=lambda: [[0]],
        background=False,
    )
    client = TestClient(create_app(OpenAIServer(engine=engine, tokenizer=tokenizer, model_id="moe", traffic=sampler)))
    r = client.post("/v1/completions", json={"model": "moe", "prompt": "Ray Serve runs", "max_tokens": 3})
    table = pq.read_table(sampler.flush()[0])
    assert table.column("prompt_text").to_pylist() == ["Ray Serve runs"]
    assert table.column("output_text").to_pylist() == [r.json()["choices"][0]["text"]]


# -- config ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "traffic, match",
    [
        ({"enabled": True}, "app.traffic.output_dir"),
        ({"sample_rate": 0.0}, "app.traffic.sample_rate"),
        ({"sample_rate": 1.5}, "app.traffic.sample_rate"),
        ({"window_seconds": 0}, "app.traffic.window_seconds"),
        ({"window_requests": 0}, "app.traffic.window_requests"),
        ({"token_buckets": 0}, "app.traffic.token_buckets"),
        ({"sample_rat": 0.5}, "traffic.sample_rat"),
    ],
)
def test_bad_traffic_config_names_the_key(traffic, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(ServeConfig, {"model_path": "/m", "traffic": traffic})


def test_token_buckets_are_capped_at_the_vocabulary(tmp_path):
    sampler = make_sampler(tmp_path, np.zeros((1, 2)), token_buckets=256)
    assert sampler.num_buckets == 10
    sampler.record(features([0, 9, 9], [-1.0]))
    assert pq.read_table(sampler.flush()[0]).column("prompt_token_buckets").to_pylist() == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 2]
    ]
