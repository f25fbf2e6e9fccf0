"""Paged KV cache: memory follows the block budget, outputs equal a model run without any cache."""

import dataclasses

import pytest
import torch

from raymoe.models import KVCache, MoETransformer, flavour
from raymoe.models.paged_kv_cache import PagedKVCache
from raymoe.serve.engine import EngineConfig, EngineCore
from raymoe.serve.request import GenerationRequest
from tests.unit.engine_streams import full_recompute_greedy, greedy


def build(attention: str) -> MoETransformer:
    cfg = flavour("debug")
    if attention == "gqa":
        cfg = dataclasses.replace(cfg, attention="gqa", num_kv_heads=2)
    cfg.max_seq_len = 512
    model = MoETransformer(cfg)
    model.init_weights(seed=1)
    return model.eval()


@pytest.fixture(scope="module", params=["mla", "gqa"])
def model(request):
    return build(request.param)


def run_counting_running(core) -> tuple[dict[str, list[int]], int]:
    """Steps to the end; returns each request's tokens and the most sequences running at once."""
    outputs: dict[str, list[int]] = {}
    peak = 0
    while core.has_work():
        for rid, event in core.step():
            outputs.setdefault(rid, []).append(event.token_id)
        peak = max(peak, int(core.scheduler.stats()["running"]))
    return outputs, peak


def test_memory_is_the_block_budget_whatever_the_number_of_slots(model):
    cfg = model.cfg
    few = PagedKVCache(cfg, num_slots=2, max_seq_len=512, num_blocks=32, block_size=16)
    many = PagedKVCache(cfg, num_slots=64, max_seq_len=512, num_blocks=32, block_size=16)
    per_position = 2 * cfg.num_layers * 4  # two fp32 tensors per layer
    if cfg.attention == "mla":
        per_position = cfg.num_layers * 4 * (cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    else:
        per_position *= cfg.num_kv_heads * cfg.head_dim
    # 32 blocks of 16 positions, plus the spare block.
    assert few.nbytes() == many.nbytes() == 33 * 16 * per_position
    # A slot-row cache pays for max_seq_len per slot.
    assert KVCache(cfg, num_slots=64, max_seq_len=512).nbytes() == 64 * 512 * per_position


def test_at_one_full_row_of_memory_eight_short_sequences_run_at_once_with_exact_outputs(model):
    # Prepare: the memory of one 512-token slot row (32 blocks of 16); eight requests of
    # 40 + 24 = 64 tokens (4 blocks each), different prompt lengths so prefills are padded.
    config = EngineConfig(num_slots=16, max_seq_len=512, max_tokens_per_step=512, block_size=16, num_kv_blocks=32)
    core = EngineCore(model, config)
    prompts = {f"r{i}": [(7 * i + j) % 2000 + 3 for j in range(40 - i)] for i in range(8)}
    # Execute
    for rid, prompt in prompts.items():
        core.add_request(GenerationRequest(request_id=rid, prompt_ids=prompt, params=greedy(24)))
    outputs, peak = run_counting_running(core)
    # Assert: all eight ran together in one row's memory, none was preempted, and each output is
    # the model's own greedy continuation.
    assert peak == 8 and core.num_preemptions == 0
    one_row = EngineCore(model, dataclasses.replace(config, num_slots=1, num_kv_blocks=0))
    assert core.cache.nbytes() < 2 * one_row.cache.nbytes()
    for rid, prompt in prompts.items():
        assert outputs[rid] == full_recompute_greedy(model, prompt, 24), rid


def test_blocks_freed_by_finished_and_preempted_sequences_are_reused_without_mixing_contexts(model):
    # Prepare: 12 blocks of 4 tokens for five sequences that grow to 6 + 14 = 20 tokens (5 blocks
    # each): they are admitted, preempted and readmitted into blocks others held before.
    core = EngineCore(model, EngineConfig(num_slots=5, max_tokens_per_step=32, block_size=4, num_kv_blocks=12))
    prompts = {f"r{i}": [100 + 13 * i + j for j in range(6)] for i in range(5)}
    # Execute
    for rid, prompt in prompts.items():
        core.add_request(GenerationRequest(request_id=rid, prompt_ids=prompt, params=greedy(14)))
    outputs, _ = run_counting_running(core)
    # Assert
    assert core.num_preemptions > 0
    for rid, prompt in prompts.items():
        assert outputs[rid] == full_recompute_greedy(model, prompt, 14), rid


def test_padding_positions_beyond_a_slots_blocks_never_touch_other_blocks():
    cfg = build("gqa").cfg
    cache = PagedKVCache(cfg, num_slots=2, max_seq_len=64, num_blocks=4, block_size=4)
    cache.assign(0, [2])  # slot 0: positions 0..3 in block 2
    cache.assign(1, [0, 3])  # slot 1: positions 0..7 in blocks 0 and 3
    k_pool, _ = cache.layers[0]
    k_pool[:4].fill_(7.0)
    # Slot 0 writes 8 positions (4 real, 4 padding), slot 1 as well.
    view = cache.view(torch.tensor([0, 1]), torch.arange(8).repeat(2, 1))
    new = torch.ones(2, 8, cfg.num_kv_heads, cfg.head_dim)
    new[1] *= 2
    k_BHSD, _ = view.update_heads(0, new, new)
    assert torch.all(k_pool[2] == 1) and torch.all(k_pool[0] == 2) and torch.all(k_pool[3] == 2)
    assert torch.all(k_pool[1] == 7)  # nobody's block: untouched
    # Each row reads its own blocks back in position order (slot 0's padding from the spare).
    assert torch.all(k_BHSD[0, :, :4] == 1) and torch.all(k_BHSD[1] == 2)


def test_block_lists_the_pool_cannot_hold_are_refused():
    cache = PagedKVCache(build("mla").cfg, num_slots=1, max_seq_len=8, num_blocks=4, block_size=4)
    with pytest.raises(ValueError, match="exceed max_seq_len=8"):
        cache.assign(0, [0, 1, 2])
    with pytest.raises(ValueError, match="outside the pool"):
        cache.assign(0, [4])
