"""OpenAI HTTP layer over a fake engine: responses, streaming, stop strings, errors, auth."""

import json

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from raymoe.data.chat_tokenizer import ChatTokenizer
from raymoe.serve.http_app import OpenAIServer, create_app
from tests.unit.fake_engine import FakeEngine, write_tokenizer

REPLY = "Hello world! The quick brown fox"


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return ChatTokenizer.from_dir(write_tokenizer(tmp_path_factory.mktemp("tok")))


def make_client(tokenizer, api_key=None, **engine_kw):
    engine = FakeEngine(tokenizer.encode(REPLY), **engine_kw)
    server = OpenAIServer(engine=engine, tokenizer=tokenizer, model_id="moe", adapters=["sql"], api_key=api_key)
    return TestClient(create_app(server)), engine


@pytest.fixture(scope="module")
def client(tokenizer):
    return make_client(tokenizer)


def sse_events(text):
    events = [e for e in text.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    return [json.loads(e[len("data: ") :]) for e in events[:-1]]


def test_models_lists_base_and_adapters(client):
    c, _ = client
    assert [m["id"] for m in c.get("/v1/models").json()["data"]] == ["moe", "moe:sql"]


def test_completion_returns_text_and_usage(client, tokenizer):
    c, _ = client
    n = len(tokenizer.encode(REPLY))
    r = c.post("/v1/completions", json={"model": "moe", "prompt": "Ray Serve runs", "max_tokens": n})
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == REPLY
    assert body["choices"][0]["finish_reason"] == "length"
    p = len(tokenizer.encode("Ray Serve runs"))
    assert body["usage"] == {"prompt_tokens": p, "completion_tokens": n, "total_tokens": p + n}


def test_stop_string_cuts_the_text_and_ends_the_request(tokenizer):
    c, engine = make_client(tokenizer)
    ids = tokenizer.encode(REPLY)
    # Reference: the first prefix of the reply whose text contains the stop string
    k = next(k for k in range(1, len(ids) + 1) if "brown" in tokenizer.decode(ids[:k]))
    r = c.post("/v1/completions", json={"model": "moe", "prompt": "x", "max_tokens": 50, "stop": ["brown", "zzz"]})
    body = r.json()
    assert body["choices"][0]["text"] == "Hello world! The quick "
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == k
    assert engine.aborted == [engine.requests[0].request_id]


def test_chat_uses_the_template_and_streams_chunks(client, tokenizer):
    c, engine = client
    n = len(tokenizer.encode(REPLY))
    r = c.post(
        "/v1/chat/completions",
        json={
            "model": "moe:sql",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": n,
            "stream": True,
            "stream_options": {"include_usage": True},
        },
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
    assert text == REPLY
    assert [e["choices"][0]["finish_reason"] for e in events if e["choices"]][-1] == "length"
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] == n
    assert all(e["object"] == "chat.completion.chunk" for e in events)
    # ChatML written out by hand, and the adapter picked from the model name
    expected = tokenizer.encode("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert engine.requests[-1].prompt_ids == expected
    assert engine.requests[-1].adapter == "sql"
    assert events[-1]["usage"]["prompt_tokens"] == len(expected)


def test_eos_ends_with_stop_and_is_not_in_the_text(tokenizer):
    c, _ = make_client(tokenizer, eos_after=2)
    ids = tokenizer.encode(REPLY)
    r = c.post("/v1/chat/completions", json={"model": "moe", "messages": [{"role": "user", "content": "Hi"}]})
    body = r.json()
    assert body["choices"][0]["message"]["content"] == tokenizer.decode(ids[:2])
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"]["completion_tokens"] == 3


def test_completion_stream_ends_with_done(client):
    c, _ = client
    r = c.post("/v1/completions", json={"model": "moe", "prompt": "x", "max_tokens": 3, "stream": True})
    events = sse_events(r.text)
    assert events[-1]["choices"][0]["finish_reason"] == "length"


def test_logprobs_in_chat_response(client):
    c, _ = client
    r = c.post(
        "/v1/chat/completions",
        json={
            "model": "moe",
            "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 2,
            "logprobs": True,
            "top_logprobs": 1,
        },
    )
    content = r.json()["choices"][0]["logprobs"]["content"]
    assert [c_["logprob"] for c_ in content] == [-0.5, -0.5]
    assert all(len(c_["top_logprobs"]) == 1 for c_ in content)


CHAT = {"model": "moe", "messages": [{"role": "user", "content": "Hi"}]}


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": "moe"}, 400, "messages"),
        ({"model": "moe", "messages": "hi"}, 400, "messages"),
        ({"model": "moe", "messages": []}, 400, "messages"),
        ({"model": "moe", "messages": [{"role": "user"}]}, 400, "messages.0.content"),
        ({"model": "moe", "messages": [{"role": "wizard", "content": "x"}]}, 400, "messages.0.role"),
        ({**CHAT, "max_tokens": 0}, 400, "max_tokens"),
        ({**CHAT, "max_tokens": "5"}, 400, "max_tokens"),
        ({**CHAT, "max_tokens": 10_000}, 400, "max_tokens"),
        ({**CHAT, "temperature": -0.1}, 400, "temperature"),
        ({**CHAT, "top_p": 0}, 400, "top_p"),
        ({**CHAT, "n": 2}, 400, "n"),
        ({**CHAT, "stream": "yes"}, 400, "stream"),
        ({**CHAT, "seed": 2**70}, 400, "seed"),
        ({**CHAT, "messages": [{"role": "user", "content": "word " * 200}]}, 400, "messages"),
        ({**CHAT, "model": "gpt-4"}, 404, "model"),
        ({**CHAT, "model": "moe:nope"}, 404, "model"),
    ],
)
def test_bad_chat_input_is_a_client_error_naming_the_field(client, body, status, param):
    c, _ = client
    r = c.post("/v1/chat/completions", json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["message"]


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": "moe"}, "prompt"),
        ({"model": "moe", "prompt": 5}, "prompt"),
        ({"model": "moe", "prompt": "x " * 300}, "prompt"),
        ({"model": "moe", "prompt": [1, 99999]}, "prompt"),
        ({"model": "moe", "prompt": "x", "logprobs": 9}, "logprobs"),
    ],
)
def test_bad_completion_input_is_400(client, body, param):
    c, _ = client
    r = c.post("/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


@pytest.mark.parametrize(
    "raw",
    [
        b"{not json",
        b"",
        b"[]",
        b'"text"',
        b"null",
        b'{"model": NaN}',
        b'{"model": "moe", "messages": [], "temperature": Infinity}',
    ],
)
def test_unparseable_or_non_object_body_is_400(client, raw):
    c, _ = client
    r = c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error"
    if raw in (b"{not json", b""):
        assert err["code"] == "invalid_json" and "not valid JSON" in err["message"]


def test_api_key_is_required_when_configured(tokenizer):
    c, _ = make_client(tokenizer, api_key="s3cret")
    assert c.get("/v1/models").status_code == 401
    assert c.get("/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = c.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert c.get("/v1/models", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert c.get("/health").status_code == 200


def test_engine_queue_full_is_429_with_retry_after(tokenizer):
    c, _ = make_client(tokenizer, capacity=0)
    for stream in (False, True):
        r = c.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["code"] == "rate_limit_exceeded"


@pytest.mark.parametrize(
    "status, type_, code",
    [(503, "server_error", "server_overloaded"), (429, "rate_limit_error", "rate_limit_exceeded")],
)
def test_requests_beyond_what_the_replica_admits_are_refused_at_once_as_openai_json(tokenizer, status, type_, code):
    import asyncio

    import httpx

    from raymoe.serve.admission import Admission

    # Prepare: 1 running + 2 queued; the engine holds every token until the gate opens
    engine = FakeEngine(tokenizer.encode(REPLY))
    admission = Admission(max_ongoing=1, max_queued=2)
    server = OpenAIServer(
        engine=engine,
        tokenizer=tokenizer,
        model_id="moe",
        admission=admission,
        backpressure_status=status,
        retry_after_s=2,
    )
    counted = []
    server.count = lambda path, code_: counted.append((path, code_))
    body = {"model": "moe", "prompt": "Ray Serve runs", "max_tokens": 3}

    async def main():
        engine.gate = asyncio.Event()
        transport = httpx.ASGITransport(app=create_app(server))
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as http:
            held = [
                asyncio.create_task(http.post("/v1/completions", json={**body, "stream": i == 0})) for i in range(3)
            ]
            while admission.admitted < 3:
                await asyncio.sleep(0.001)
            # Execute: a fourth request, and the routes that are never refused
            refused = await http.post("/v1/chat/completions", json=CHAT)
            health = await http.get("/health")
            running_in_engine = len(engine.requests)
            engine.gate.set()
            return refused, health, running_in_engine, await asyncio.gather(*held)

    refused, health, running_in_engine, held = asyncio.run(main())
    # Assert: refused with the app's own error JSON while the admitted ones ran one at a time
    assert refused.status_code == status and refused.headers["retry-after"] == "2"
    error = refused.json()["error"]
    assert error["type"] == type_ and error["code"] == code
    assert "3 requests admitted" in error["message"] and "1 running + 2 queued" in error["message"]
    assert health.status_code == 200 and running_in_engine == 1
    assert [r.status_code for r in held] == [200, 200, 200] and held[0].text.endswith("data: [DONE]\n\n")
    assert admission.admitted == 0
    assert sorted(counted) == [("/health", 200), ("/v1/chat/completions", status)] + [("/v1/completions", 200)] * 3


def test_an_unbounded_queue_admits_every_request():
    from raymoe.serve.admission import Admission

    admission = Admission(max_ongoing=2, max_queued=-1)
    assert all(admission.try_admit() for _ in range(1000))
    assert admission.limit is None and admission.waiting == 998


def test_a_dead_engine_is_503_with_retry_after_not_500(tokenizer):
    c, _ = make_client(tokenizer, stopped=True)
    for stream in (False, True):
        r = c.post("/v1/chat/completions", json={**CHAT, "stream": stream})
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert r.json()["error"]["type"] == "server_error" and "engine" in r.json()["error"]["message"]


def test_an_engine_dying_mid_request_is_503_with_retry_after_not_500(tokenizer):
    # Prepare: the engine dies after two tokens of the request (a shard worker's node went).
    c, _ = make_client(tokenizer, stop_after=2)
    # Execute
    r = c.post("/v1/completions", json={"model": "moe", "prompt": "Hello", "max_tokens": 8})
    # Assert: retryable, OpenAI error JSON, not the generic 500.
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["type"] == "server_error" and "shard worker failed" in r.json()["error"]["message"]


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=12,
)
fields = st.sampled_from(
    [
        "model",
        "messages",
        "prompt",
        "max_tokens",
        "temperature",
        "top_p",
        "top_k",
        "n",
        "stream",
        "stop",
        "seed",
        "logprobs",
        "top_logprobs",
        "stream_options",
        "max_completion_tokens",
        "echo",
    ]
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    base=st.sampled_from([CHAT, {"model": "moe", "prompt": "hello"}, {}]),
    changes=st.dictionaries(fields, json_values, max_size=4),
)
def test_fuzzed_bodies_never_cause_a_server_error(client, route, base, changes):
    c, _ = client
    body = {**base, **changes}
    r = c.post(route, json=body)
    assert r.status_code in (200, 400, 404), (r.status_code, r.text)
    if r.status_code != 200:
        assert r.json()["error"]["message"]
    elif body.get("stream") is True:
        sse_events(r.text)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_fuzzed_raw_bytes_never_cause_a_server_error(client, raw):
    c, _ = client
    r = c.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert r.status_code == 400, r.text


@pytest.fixture(scope="module")
def real_client(tokenizer):
    """The app over the real engine and a one-layer model: fuzzing reaches sampling and the scheduler."""
    from raymoe.models import MoETransformer
    from raymoe.serve.debug_artifact import debug_config
    from raymoe.serve.engine import EngineConfig
    from raymoe.serve.local_engine import LocalEngine

    model = MoETransformer(debug_config(tokenizer.tokenizer.get_vocab_size(), dim=32, num_layers=1, max_seq_len=64))
    engine = LocalEngine.from_model(model, EngineConfig(num_slots=2, max_tokens_per_step=16))
    server = OpenAIServer(engine=engine, tokenizer=tokenizer, model_id="moe")
    with TestClient(create_app(server)) as c:  # one event loop for the engine's background task
        yield c


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    route=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
    base=st.sampled_from([CHAT, {"model": "moe", "prompt": "hello"}]),
    changes=st.dictionaries(fields, json_values, max_size=4),
)
def test_fuzzed_bodies_against_the_real_engine_never_cause_a_server_error(real_client, route, base, changes):
    r = real_client.post(route, json={**base, **changes})
    assert r.status_code in (200, 400, 404), (r.status_code, r.text)
    if r.status_code == 200 and changes.get("stream") is True:
        assert "server_error" not in r.text


def test_stream_interval_groups_writes_but_keeps_every_event(tokenizer):
    # Prepare: the same fake reply streamed with 1 and with 4 events per write.
    def stream_body(interval):
        engine = FakeEngine(tokenizer.encode(REPLY))
        server = OpenAIServer(engine=engine, tokenizer=tokenizer, model_id="moe", stream_interval=interval)
        body = {"model": "moe", "prompt": "hi", "max_tokens": 32, "stream": True}
        with TestClient(create_app(server)) as c, c.stream("POST", "/v1/completions", json=body) as r:
            return list(r.iter_raw())

    # Execute
    one, four = stream_body(1), stream_body(4)

    # Assert: identical events (ids aside), fewer writes; the first write carries only the first token.
    def strip(events):
        return [{k: v for k, v in e.items() if k not in ("id", "created")} for e in events]

    assert strip(sse_events(b"".join(four).decode())) == strip(sse_events(b"".join(one).decode()))
    assert len(four) < len(one)
    assert four[0].count(b"data: ") == 1
