"""The real server on Ray Serve, spoken to by the official `openai` client and by httpx.

One random-weight Mixtral-shaped artifact; transformers' `generate` on the same files is the
reference for greedy output.
"""

import asyncio

import httpx
import pytest
import torch

from raymoe.data.chat_tokenizer import ChatTokenizer
from raymoe.serve.debug_artifact import make_debug_artifact
from tests.integration.local_processes import free_port

API_KEY = "test-key-123"


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    return str(make_debug_artifact(tmp_path_factory.mktemp("serve") / "tiny-moe", seed=1))


LORA_SCALE = 2.0  # lora_alpha / r


@pytest.fixture(scope="module")
def lora(artifact, tmp_path_factory):
    """A peft adapter on layer 0's q_proj and v_proj, written by hand with Mixtral's names."""
    import json

    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(11)
    tensors = {}
    for name, out_features in (("q_proj", 128), ("v_proj", 64)):
        key = f"base_model.model.model.layers.0.self_attn.{name}"
        tensors[f"{key}.lora_A.weight"] = torch.randn(4, 128, generator=gen) * 0.5
        tensors[f"{key}.lora_B.weight"] = torch.randn(out_features, 4, generator=gen) * 0.5
    root = tmp_path_factory.mktemp("adapters")
    (root / "sql").mkdir()
    save_file(tensors, str(root / "sql" / "adapter_model.safetensors"))
    (root / "sql" / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8}))
    return str(root), tensors


@pytest.fixture(scope="module")
def server(ray_cluster, artifact, lora, tmp_path_factory):
    from ray import serve

    from raymoe.serve.app import build_app

    key_file = tmp_path_factory.mktemp("secret") / "api_key"
    key_file.write_text(API_KEY + "\n")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    common = {
        "model_path": artifact,
        # Greedy tokens are compared with transformers in fp32 (`auto` is bf16 on AMX CPUs).
        "dtype": "fp32",
        "num_cpus": 0.25,
        "api_key_env": "",
        "api_key_file": str(key_file),
        "engine": {"num_slots": 4, "num_threads": 1},
    }
    serve.run(build_app({**common, "lora_dir": lora[0]}), name="main", route_prefix="/")
    # A second app whose replica takes one request at a time and queues one more.
    busy = {
        **common,
        "max_ongoing_requests": 1,
        "max_queued_requests": 1,
        "backpressure_status": 503,
        "retry_after_s": 2,
        "name": "Busy",
    }
    serve.run(build_app(busy), name="busy", route_prefix="/busy")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=f"{server}/v1", api_key=API_KEY, max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(artifact):
    return ChatTokenizer.from_dir(artifact)


def test_models_and_auth(server, client):
    assert [m.id for m in client.models.list().data] == ["tiny-moe", "tiny-moe:sql"]
    r = httpx.post(f"{server}/v1/completions", json={"model": "tiny-moe", "prompt": "hi"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"


def test_greedy_completion_equals_transformers_generate(client, artifact, tokenizer):
    from transformers import AutoModelForCausalLM

    prompt = "Hello world! How are"
    ids = tokenizer.encode(prompt)
    reference = AutoModelForCausalLM.from_pretrained(artifact).eval()
    with torch.no_grad():
        hf = reference.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=24)[0, len(ids) :].tolist()
    stops = [i for i, t in enumerate(hf) if t in tokenizer.stop_token_ids]
    expected_ids = hf[: stops[0]] if stops else hf
    # Execute
    r = client.completions.create(model="tiny-moe", prompt=prompt, max_tokens=24, temperature=0)
    # Assert
    assert r.choices[0].text == tokenizer.decode(expected_ids)
    assert r.choices[0].finish_reason == ("stop" if stops else "length")
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == (stops[0] + 1 if stops else 24)
    assert r.usage.total_tokens == len(ids) + r.usage.completion_tokens


def test_chat_streaming_matches_non_streaming_and_usage(client, tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about experts."}]
    full = client.chat.completions.create(model="tiny-moe", messages=messages, max_tokens=12, temperature=0)
    chunks = list(
        client.chat.completions.create(
            model="tiny-moe",
            messages=messages,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    prompt_tokens = len(
        tokenizer.encode(
            "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nTell me about experts.<|im_end|>\n"
            "<|im_start|>assistant\n"
        )
    )
    assert full.usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.prompt_tokens == prompt_tokens
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == full.choices[0].finish_reason


def test_stop_string_is_honoured_streaming_and_not(client):
    # The random model ends some prompts early with an end token: take one that talks for a while.
    for prompt in ("The quick brown", "Ray Serve runs", "def add(a, b):", "Mixture of experts", "Hello"):
        base = client.completions.create(model="tiny-moe", prompt=prompt, max_tokens=30, temperature=0).choices[0].text
        if len(base) > 6:
            break
    assert len(base) > 6, base
    stop = base[3:6]  # a stop string that first occurs at or before index 3
    cut = base[: base.index(stop)]
    r = client.completions.create(model="tiny-moe", prompt=prompt, max_tokens=30, temperature=0, stop=[stop])
    assert r.choices[0].text == cut and r.choices[0].finish_reason == "stop"
    chunks = list(
        client.completions.create(model="tiny-moe", prompt=prompt, max_tokens=30, temperature=0, stop=stop, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == cut


def test_bad_input_is_400(client):
    import openai

    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-moe", messages=[{"role": "user", "content": "x"}], max_tokens=10**6)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])


def test_overload_is_refused_quickly_while_admitted_requests_complete(server):
    async def one(http, i):
        body = {"model": "tiny-moe", "prompt": f"request {i}", "max_tokens": 40, "temperature": 0, "stream": True}
        async with http.stream(
            "POST", f"{server}/busy/v1/completions", json=body, headers={"Authorization": f"Bearer {API_KEY}"}
        ) as r:
            text = "".join([chunk async for chunk in r.aiter_text()])
            return r.status_code, r.headers.get("retry-after"), text, asyncio.get_running_loop().time()

    async def main():
        async with httpx.AsyncClient(timeout=120) as http:
            return await asyncio.gather(*(one(http, i) for i in range(8)))

    results = asyncio.run(main())
    ok = [r for r in results if r[0] == 200]
    refused = [r for r in results if r[0] in (429, 503)]
    assert len(ok) + len(refused) == 8, [r[:2] for r in results]
    assert 1 <= len(ok) <= 3 and refused
    assert all(r[1] == "2" for r in refused)
    assert all(r[2].rstrip().endswith("data: [DONE]") for r in ok)
    # every refusal was answered before the first admitted request finished
    assert max(r[3] for r in refused) < min(r[3] for r in ok)


def test_lora_adapter_is_selected_by_model_name(client, artifact, lora, tokenizer):
    from raymoe.models import load_hf
    from raymoe.serve.engine import generate_alone
    from raymoe.serve.request import SamplingParams

    _, tensors = lora
    # Reference: the adapter folded into the weights, W + (alpha / r) * B @ A, decoded in-process
    merged = load_hf(artifact).eval()
    with torch.no_grad():
        for name in ("q_proj", "v_proj"):
            key = f"base_model.model.model.layers.0.self_attn.{name}"
            getattr(merged.layers[0].attn, name).weight += LORA_SCALE * (
                tensors[f"{key}.lora_B.weight"] @ tensors[f"{key}.lora_A.weight"]
            )
    prompt = "Hello world! How are"
    ids = generate_alone(merged, tokenizer.encode(prompt), SamplingParams(temperature=0.0, max_tokens=12))
    stops = [i for i, t in enumerate(ids) if t in tokenizer.stop_token_ids]
    expected = tokenizer.decode(ids[: stops[0]] if stops else ids)
    with_adapter = client.completions.create(model="tiny-moe:sql", prompt=prompt, max_tokens=12, temperature=0)
    without = client.completions.create(model="tiny-moe", prompt=prompt, max_tokens=12, temperature=0)
    assert with_adapter.choices[0].text == expected
    assert with_adapter.choices[0].text != without.choices[0].text
