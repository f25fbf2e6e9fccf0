"""Continuous-batching scheduler, without torch: admission, chunked prefill, preemption."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from raymoe.config import ConfigError
from raymoe.serve.scheduler import QueueFullError, Scheduler, SchedulerConfig


def run_step(sched, kv, next_token):
    """Executes a plan against a fake KV cache (slot -> tokens by position); returns the plan.

    The "model" reads only what the cache holds for the slot, so a wrong position, a stale slot or
    a chunk fed twice changes the sampled token and shows up in the outputs.
    """
    plan = sched.schedule()
    sampled = {}
    for chunk in plan.decodes + plan.prefills:
        row = kv.setdefault(chunk.slot, [])
        assert chunk.start <= len(row), "a chunk must not leave a hole in its slot"
        del row[chunk.start :]
        row.extend(chunk.token_ids)
        if chunk.samples:
            sampled[chunk.seq.seq_id] = next_token(row)
    finished = sched.commit(plan, sampled)
    return plan, finished


def toy_next_token(context):
    return (sum(t * (i + 1) for i, t in enumerate(context)) % 97) + 3


def alone(prompt, max_new):
    """The reference: greedy generation of one sequence by hand, no scheduler."""
    ctx = list(prompt)
    out = []
    for _ in range(max_new):
        out.append(toy_next_token(ctx))
        ctx.append(out[-1])
    return out


def test_new_request_joins_running_batch_at_next_step():
    # Prepare
    sched = Scheduler(SchedulerConfig(num_slots=2, max_seq_len=16, max_tokens_per_step=8))
    sched.add("a", [1, 2, 3], max_new_tokens=4)
    plan = sched.schedule()
    sched.commit(plan, {"a": 100})
    # Execute: b arrives while a decodes
    sched.add("b", [7, 8], max_new_tokens=4)
    plan = sched.schedule()
    # Assert: one step holds a's decode at position 3 and b's whole prompt
    assert [(c.seq.seq_id, c.start, c.token_ids) for c in plan.decodes] == [("a", 3, [100])]
    assert [(c.seq.seq_id, c.start, c.token_ids) for c in plan.prefills] == [("b", 0, [7, 8])]
    assert plan.prefills[0].samples


def test_chunked_prefill_does_not_stall_running_decode():
    # Prepare: budget 4 per step; a decodes while b's 10-token prompt arrives
    sched = Scheduler(SchedulerConfig(num_slots=2, max_seq_len=32, max_tokens_per_step=4))
    sched.add("a", [1, 2], max_new_tokens=10)
    sched.commit(sched.schedule(), {"a": 5})
    sched.add("b", list(range(10, 20)), max_new_tokens=2)
    # Execute
    plans = []
    for _ in range(4):
        plan = sched.schedule()
        plans.append(plan)
        sampled = {c.seq.seq_id: 9 for c in plan.decodes + plan.prefills if c.samples}
        sched.commit(plan, sampled)
    # Assert: a decodes in every step; b's prompt goes in chunks of 3, 3, 3, then 1 (+ sample)
    assert all([c.seq.seq_id for c in p.decodes][:1] == ["a"] for p in plans)
    b_chunks = [(c.start, len(c.token_ids)) for p in plans for c in p.decodes + p.prefills if c.seq.seq_id == "b"]
    assert b_chunks == [(0, 3), (3, 3), (6, 3), (9, 1)]
    assert all(p.num_tokens <= 4 for p in plans)
    assert sched._seqs["b"].output_ids == [9]


def test_request_waits_for_a_free_slot_and_takes_it_when_one_finishes():
    sched = Scheduler(SchedulerConfig(num_slots=1, max_seq_len=16, max_tokens_per_step=8))
    sched.add("a", [1], max_new_tokens=2)
    sched.add("b", [2], max_new_tokens=1)
    plan = sched.schedule()
    assert [c.seq.seq_id for c in plan.prefills] == ["a"]
    sched.commit(plan, {"a": 3})
    plan = sched.schedule()
    assert [c.seq.seq_id for c in plan.decodes + plan.prefills] == ["a"]
    finished = sched.commit(plan, {"a": 4})
    assert [(s.seq_id, s.finish_reason, s.output_ids) for s in finished] == [("a", "length", [3, 4])]
    plan = sched.schedule()
    assert [(c.seq.seq_id, c.slot) for c in plan.prefills] == [("b", 0)]


def test_finish_frees_the_slot_for_the_waiting_request():
    sched = Scheduler(SchedulerConfig(num_slots=1, max_seq_len=16, max_tokens_per_step=8))
    sched.add("a", [1], max_new_tokens=8)
    sched.add("b", [2], max_new_tokens=1)
    sched.commit(sched.schedule(), {"a": 3})
    sched.finish("a", "stop")
    plan = sched.schedule()
    assert [c.seq.seq_id for c in plan.prefills] == ["b"] and not plan.decodes


def test_preemption_frees_blocks_and_readmits_with_recompute():
    # Prepare: 4 blocks of 2 tokens. a and b (3-token prompts) each reserve blocks_for(3+1)=2.
    cfg = SchedulerConfig(num_slots=2, max_seq_len=8, max_tokens_per_step=8, block_size=2, num_kv_blocks=4)
    sched = Scheduler(cfg)
    sched.add("a", [1, 2, 3], max_new_tokens=3)
    sched.add("b", [4, 5, 6], max_new_tokens=3)
    sched.commit(sched.schedule(), {"a": 10, "b": 20})  # both prefilled: 4 tokens each
    sched.commit(sched.schedule(), {"a": 11, "b": 21})  # decode at pos 3 fits: 5 tokens each
    # Execute: a's decode at position 4 needs a 3rd block; none is free -> b (admitted last) goes
    plan = sched.schedule()
    # Assert
    assert [s.seq_id for s in plan.preempted] == ["b"]
    assert [c.seq.seq_id for c in plan.decodes] == ["a"] and not plan.prefills
    assert sched.free_blocks == 1  # b's 2 blocks came back, a took 1
    finished = sched.commit(plan, {"a": 12})
    assert [s.seq_id for s in finished] == ["a"]
    # b comes back with its prompt and both tokens it had produced, from position 0
    plan = sched.schedule()
    assert [(c.seq.seq_id, c.start, c.token_ids) for c in plan.prefills] == [("b", 0, [4, 5, 6, 20, 21])]
    assert plan.prefills[0].samples
    finished = sched.commit(plan, {"b": 22})
    assert [(s.seq_id, s.output_ids) for s in finished] == [("b", [20, 21, 22])]
    assert sched.free_blocks == 4 and sorted(sched.free_slots) == [0, 1]


def test_queue_limit_refuses_extra_requests():
    sched = Scheduler(SchedulerConfig(num_slots=1, max_seq_len=16, max_waiting=2))
    sched.add("a", [1], 1)
    sched.add("b", [1], 1)
    with pytest.raises(QueueFullError):
        sched.add("c", [1], 1)


@pytest.mark.parametrize(
    "prompt, max_new, match",
    [([], 1, "prompt_ids"), ([1], 0, "max_new_tokens"), ([1] * 10, 7, "exceeds max_seq_len=16")],
)
def test_add_rejects_requests_that_can_never_run(prompt, max_new, match):
    sched = Scheduler(SchedulerConfig(num_slots=1, max_seq_len=16))
    with pytest.raises(ValueError, match=match):
        sched.add("x", prompt, max_new)


def test_add_rejects_request_larger_than_the_kv_budget():
    cfg = SchedulerConfig(num_slots=2, max_seq_len=64, max_tokens_per_step=8, block_size=4, num_kv_blocks=3)
    with pytest.raises(ValueError, match="needs 4 KV blocks, the budget is 3"):
        Scheduler(cfg).add("x", [1] * 10, 5)


def test_config_rejects_budget_smaller_than_slots():
    with pytest.raises(ConfigError, match="max_tokens_per_step=2 must be >= num_slots=4"):
        SchedulerConfig(num_slots=4, max_tokens_per_step=2)


def test_late_request_gets_first_token_before_earlier_ones_finish():
    sched = Scheduler(SchedulerConfig(num_slots=4, max_seq_len=64, max_tokens_per_step=16))
    kv = {}
    sched.add("early1", [5, 6, 7], 20)
    sched.add("early2", [8, 9], 20)
    for _ in range(3):
        run_step(sched, kv, toy_next_token)
    sched.add("late", [1, 2, 3, 4], 3)
    _plan, _ = run_step(sched, kv, toy_next_token)
    assert sched._seqs["late"].output_ids  # first token in the very step after it arrived
    assert len(sched._seqs["early1"].output_ids) < 20 and len(sched._seqs["early2"].output_ids) < 20


@settings(max_examples=60, deadline=None)
@given(
    requests=st.lists(
        st.tuples(
            st.lists(st.integers(1, 50), min_size=1, max_size=12),  # prompt
            st.integers(1, 8),  # max_new_tokens
            st.integers(0, 6),  # steps to wait before arriving
        ),
        min_size=1,
        max_size=8,
    ),
    num_slots=st.integers(1, 4),
    budget_extra=st.integers(0, 6),
    block_size=st.integers(1, 4),
    tight=st.booleans(),
)
def test_any_workload_gives_each_request_its_solo_output(requests, num_slots, budget_extra, block_size, tight):
    # Prepare: a KV budget that is either full-size or just enough for the largest request
    max_seq_len = 20
    largest = max(len(p) + n for p, n, _ in requests)
    blocks = max(-(-largest // block_size), -(-2 // block_size)) if tight else 0
    cfg = SchedulerConfig(
        num_slots=num_slots,
        max_seq_len=max_seq_len,
        max_tokens_per_step=num_slots + budget_extra,
        block_size=block_size,
        num_kv_blocks=blocks,
    )
    sched = Scheduler(cfg)
    kv, results = {}, {}
    pending = sorted(enumerate(requests), key=lambda r: r[1][2])
    # Execute
    for step in range(2000):
        while pending and pending[0][1][2] <= step:
            i, (prompt, max_new, _) = pending.pop(0)
            sched.add(str(i), prompt, max_new)
        if not pending and not sched.has_work():
            break
        _, finished = run_step(sched, kv, toy_next_token)
        for seq in finished:
            results[int(seq.seq_id)] = seq.output_ids
        # Invariants: blocks and slots are conserved, no slot is used twice
        held = sum(s.num_blocks for s in sched.running)
        assert held + sched.free_blocks == cfg.num_kv_blocks
        slots = [s.slot for s in sched.running]
        assert len(set(slots)) == len(slots) and len(slots) + len(sched.free_slots) == num_slots
    # Assert
    assert sorted(results) == list(range(len(requests)))
    for i, (prompt, max_new, _) in enumerate(requests):
        assert results[i] == alone(prompt, max_new)


def test_token_slice_equals_slicing_the_joined_sequence():
    from raymoe.serve.scheduler import Sequence

    seq = Sequence(seq_id="s", prompt_ids=[1, 2, 3, 4], max_new_tokens=8, output_ids=[5, 6, 7])
    joined = seq.token_ids
    for start in range(8):
        for stop in range(start, 8):
            assert seq.token_slice(start, stop) == joined[start:stop], (start, stop)
