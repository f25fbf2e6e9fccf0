"""Engine over the debug MoE model: cache-based decoding, continuous batching, preemption."""

import asyncio

import pytest

from raymoe.models import MoETransformer, flavour
from raymoe.serve.engine import (
    EngineConfig,
    EngineCore,
    generate_alone,
    padding_groups,
)
from raymoe.serve.local_engine import LocalEngine
from raymoe.serve.request import (
    EngineOverloadedError,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
)
from tests.unit.engine_streams import collect, full_recompute_greedy, greedy


@pytest.fixture(scope="module")
def model():
    m = MoETransformer(flavour("debug"))
    m.init_weights(seed=0)
    return m.eval()


def run_to_end(core):
    outputs, first_step, finish_step, step = {}, {}, {}, 0
    while core.has_work():
        step += 1
        for rid, ev in core.step():
            outputs.setdefault(rid, []).append(ev.token_id)
            first_step.setdefault(rid, step)
            if ev.finish_reason:
                finish_step[rid] = step
    return outputs, first_step, finish_step


def test_cached_decoding_equals_full_recompute(model):
    prompt = [5, 6, 7, 8, 9, 10, 11]
    assert generate_alone(model, prompt, greedy(10)) == full_recompute_greedy(model, prompt, 10)


def test_late_request_starts_before_earlier_ones_finish_and_outputs_match_solo(model):
    # Prepare: budget 8 tokens/step so the late 20-token prompt is prefilled in chunks
    core = EngineCore(model, EngineConfig(num_slots=4, max_tokens_per_step=8))
    prompts = {"a": [3, 4, 5], "b": [9, 8, 7, 6], "late": list(range(100, 120))}
    max_new = {"a": 16, "b": 16, "late": 4}
    for rid in ("a", "b"):
        core.add_request(GenerationRequest(request_id=rid, prompt_ids=prompts[rid], params=greedy(max_new[rid])))
    events = [core.step() for _ in range(3)]
    assert all(len(e) == 2 for e in events[1:])  # a and b decode together
    core.add_request(GenerationRequest(request_id="late", prompt_ids=prompts["late"], params=greedy(4)))
    # Execute
    outputs, first_step, finish_step = run_to_end(core)
    # Assert: late's first token comes while a and b still run (steps counted after its arrival)
    assert first_step["late"] < finish_step["a"] and first_step["late"] < finish_step["b"]
    for rid in ("a", "b"):
        outputs[rid] = [e.token_id for step in events for r, e in step if r == rid] + outputs[rid]
    for rid, prompt in prompts.items():
        assert outputs[rid] == generate_alone(model, prompt, greedy(max_new[rid])), rid


def test_preemption_under_a_tight_kv_budget_keeps_outputs_identical(model):
    # 6 blocks of 4 tokens: three 5-token prompts that each grow to 15 tokens cannot all fit
    core = EngineCore(model, EngineConfig(num_slots=3, max_tokens_per_step=16, block_size=4, num_kv_blocks=6))
    prompts = {f"r{i}": [10 + i, 20 + i, 30 + i, 40 + i, 50 + i] for i in range(3)}
    for rid, prompt in prompts.items():
        core.add_request(GenerationRequest(request_id=rid, prompt_ids=prompt, params=greedy(10)))
    outputs, _, _ = run_to_end(core)
    assert core.num_preemptions > 0
    for rid, prompt in prompts.items():
        assert outputs[rid] == generate_alone(model, prompt, greedy(10)), rid


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=123, max_tokens=8)
    alone = generate_alone(model, [1, 2, 3], params)
    core = EngineCore(model, EngineConfig(num_slots=3))
    core.add_request(GenerationRequest(request_id="other", prompt_ids=[7, 7], params=SamplingParams(max_tokens=8)))
    core.add_request(GenerationRequest(request_id="seeded", prompt_ids=[1, 2, 3], params=params))
    outputs, _, _ = run_to_end(core)
    assert outputs["seeded"] == alone


def test_stop_token_ends_with_reason_stop(model):
    first = generate_alone(model, [4, 5, 6], greedy(3))
    core = EngineCore(model, EngineConfig(num_slots=1))
    params = SamplingParams(temperature=0.0, max_tokens=3, stop_token_ids=[first[1]])
    core.add_request(GenerationRequest(request_id="x", prompt_ids=[4, 5, 6], params=params))
    events = [e for _ in range(5) for _, e in core.step()]
    assert [e.token_id for e in events] == first[:2]
    assert [e.finish_reason for e in events] == [None, "stop"]


def test_queue_limit_and_impossible_requests_are_refused(model):
    core = EngineCore(model, EngineConfig(num_slots=1, max_waiting=1))
    core.add_request(GenerationRequest(request_id="a", prompt_ids=[1], params=greedy(2)))
    with pytest.raises(EngineOverloadedError):
        core.add_request(GenerationRequest(request_id="b", prompt_ids=[1], params=greedy(2)))
    with pytest.raises(InvalidRequestError, match="exceeds max_seq_len=256"):
        EngineCore(model, EngineConfig()).add_request(
            GenerationRequest(request_id="c", prompt_ids=[1] * 250, params=greedy(10))
        )


def test_async_engine_streams_concurrently_and_abort_frees_the_slot(model):
    engine = LocalEngine.from_model(model, EngineConfig(num_slots=2))

    async def main():
        quitter = await collect(engine, "q", [9, 9], 50, stop_after=2)
        return quitter, await asyncio.gather(collect(engine, "x", [1, 2], 5), collect(engine, "y", [3, 4], 6))

    quitter, (x, y) = asyncio.run(main())
    assert len(quitter) == 2
    assert x == generate_alone(model, [1, 2], greedy(5))
    assert y == generate_alone(model, [3, 4], greedy(6))
    assert not engine.core.has_work() and sorted(engine.core.scheduler.free_slots) == [0, 1]


def test_a_failed_step_fails_its_requests_and_the_engine_serves_on(model, monkeypatch):
    engine = LocalEngine.from_model(model, EngineConfig(num_slots=2))
    real_forward, calls = engine.core._forward, []

    def forward_failing_once(plan):
        calls.append(plan)
        if len(calls) == 2:  # the second step: both requests are decoding
            raise RuntimeError("simulated kernel failure")
        return real_forward(plan)

    monkeypatch.setattr(engine.core, "_forward", forward_failing_once)

    async def collect(rid, prompt, n):
        return [
            ev.token_id
            async for ev in engine.generate(GenerationRequest(request_id=rid, prompt_ids=prompt, params=greedy(n)))
        ]

    async def main():
        first = await asyncio.gather(collect("a", [1, 2], 5), collect("b", [3, 4], 5), return_exceptions=True)
        return first, await collect("c", [5, 6], 4)

    (a, b), c = asyncio.run(main())
    assert isinstance(a, RuntimeError) and isinstance(b, RuntimeError) and "simulated" in str(a)
    assert c == generate_alone(model, [5, 6], greedy(4))
    engine.check_alive()
    assert not engine.core.has_work() and sorted(engine.core.scheduler.free_slots) == [0, 1]


class Chunk:
    def __init__(self, n):
        self.token_ids = list(range(n))


@pytest.mark.parametrize(
    "lengths, expected",
    [
        ([10, 9, 2], [[10, 9, 2]]),  # 30 padded <= 1.5 * 21 real
        ([10, 1], [[10], [1]]),  # 20 padded > 1.5 * 11 real
        ([3, 8, 8, 1], [[8, 8, 3], [1]]),  # longest first; 32 > 1.5 * 20 with the 1
    ],
)
def test_padding_groups_bound_the_wasted_tokens(lengths, expected):
    groups = padding_groups([Chunk(n) for n in lengths])
    assert [[len(c.token_ids) for c in g] for g in groups] == expected


def test_engine_built_in_its_own_thread_serves_and_reports_build_errors(model):
    import threading

    where = []

    def build():
        where.append(threading.current_thread().name)
        return EngineCore(model, EngineConfig(num_slots=1))

    engine = LocalEngine(build=build)
    assert where == ["raymoe-engine"]

    async def collect():
        return [
            ev.token_id
            async for ev in engine.generate(GenerationRequest(request_id="a", prompt_ids=[1, 2], params=greedy(3)))
        ]

    assert asyncio.run(collect()) == generate_alone(model, [1, 2], greedy(3))

    def broken():
        raise FileNotFoundError("no config.json in /nowhere")

    with pytest.raises(FileNotFoundError, match="/nowhere"):
        LocalEngine(build=broken)


def test_one_row_decode_steps_take_the_idle_expert_threads_as_torch_threads(model, monkeypatch):
    import copy

    import torch

    from raymoe.inference.packed import pack_onednn

    packed = pack_onednn(copy.deepcopy(model), expert_threads=2)
    core = EngineCore(packed, EngineConfig(num_slots=2, max_tokens_per_step=8))
    real_forward, seen = core._forward, []

    def forward_recording_threads(plan):
        seen.append((len(plan.prefills), len(plan.decodes), torch.get_num_threads()))
        return real_forward(plan)

    monkeypatch.setattr(core, "_forward", forward_recording_threads)
    base = torch.get_num_threads()
    core.add_request(GenerationRequest(request_id="a", prompt_ids=[3, 4, 5], params=greedy(3)))
    core.step()  # prefill of a
    core.step()  # a decodes alone
    core.add_request(GenerationRequest(request_id="b", prompt_ids=[6, 7], params=greedy(3)))
    core.step()  # a decodes beside b's prefill
    run_to_end(core)
    assert seen[0] == (1, 0, base)  # a prompt's experts use the expert threads
    assert seen[1] == (0, 1, base + 1)  # one row: the second core joins as a torch thread
    assert seen[2] == (1, 1, base)
    assert torch.get_num_threads() == base  # restored after every step
    # The same tokens as the unpacked model's, step for step.
    assert generate_alone(packed, [3, 4, 5], greedy(6)) == generate_alone(model, [3, 4, 5], greedy(6))
