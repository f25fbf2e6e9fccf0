"""Parity with transformers: tiny random models of each supported architecture, built from configs.

Reference: transformers' own modelling code on the same weights (no hub access). Weights are
re-drawn with a larger spread than the default init so routing decisions and attention patterns
are far from uniform, and DeepSeek's correction bias is random, so a wrong mapping shows up.
"""

import zlib
from typing import Any

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

from raymoe.models import KVCache, load_hf, save_hf
from raymoe.models.generate import decode_step, generate, prefill

VOCAB = 96
# eos_token_id=None: no EOS, so generate never stops early.
BASE: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    max_position_embeddings=256,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=None,
)


def _deepseek(q_lora_rank, yarn):
    rope = {"rope_type": "default", "rope_theta": 10000.0}
    if yarn:
        rope = {
            "rope_type": "yarn",
            "rope_theta": 10000.0,
            "factor": 4.0,
            "original_max_position_embeddings": 64,
            "beta_fast": 32.0,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 0.7,
        }
    return DeepseekV3ForCausalLM, DeepseekV3Config(
        **BASE,
        num_key_value_heads=4,
        intermediate_size=96,
        moe_intermediate_size=32,
        n_routed_experts=8,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        num_experts_per_tok=3,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        q_lora_rank=q_lora_rank,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        rope_parameters=rope,
    )


CASES = {
    "mixtral": lambda: (
        MixtralForCausalLM,
        MixtralConfig(**BASE, num_key_value_heads=2, intermediate_size=48, num_local_experts=6, num_experts_per_tok=2),
    ),
    "qwen2_moe": lambda: (
        Qwen2MoeForCausalLM,
        Qwen2MoeConfig(
            **BASE,
            num_key_value_heads=2,
            intermediate_size=96,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=40,
            num_experts=6,
            num_experts_per_tok=2,
            mlp_only_layers=[1],
            norm_topk_prob=False,
        ),
    ),
    # head_dim: a config attribute Qwen3 attention reads that the dataclass's fields do not list.
    "qwen3_moe": lambda: (
        Qwen3MoeForCausalLM,
        Qwen3MoeConfig(
            **BASE,
            num_key_value_heads=2,
            head_dim=24,
            intermediate_size=96,
            moe_intermediate_size=32,
            num_experts=6,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        ),
    ),
    "deepseek_v3_q_lora_yarn": lambda: _deepseek(q_lora_rank=24, yarn=True),
    "deepseek_v3_no_q_lora": lambda: _deepseek(q_lora_rank=None, yarn=False),
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms around 1, biases around 0
                base = 0.0 if name.endswith("bias") else 1.0
                p.copy_(base + 0.2 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[-1] ** 0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.05 * torch.randn(b.shape, generator=gen))


@pytest.fixture(scope="module", params=sorted(CASES))
def checkpoint(request, tmp_path_factory):
    """(case name, reference transformers model, path of its saved checkpoint)."""
    torch.manual_seed(0)
    cls, config = CASES[request.param]()
    reference = cls(config).eval()
    _randomize(reference, seed=zlib.crc32(request.param.encode()))
    path = tmp_path_factory.mktemp(request.param)
    reference.save_pretrained(path)
    return request.param, reference, path


def _ids(batch=2, length=40, seed=1):
    return torch.randint(3, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_prefill_logits_match_transformers(checkpoint):
    # Prepare
    _, reference, path = checkpoint
    model = load_hf(path)
    ids = _ids()
    # Execute
    with torch.no_grad():
        expected = reference(ids).logits
        got = model(ids)
    # Assert
    assert got.shape == (2, 40, VOCAB)
    assert expected.abs().max() > 1.0  # the comparison is not between near-zero logits
    assert (got - expected).abs().max().item() <= 1e-4


def test_incremental_decode_with_cache_equals_full_recompute(checkpoint):
    _, _, path = checkpoint
    model = load_hf(path)
    ids = _ids(batch=2, length=24)
    cache = KVCache(model.cfg, num_slots=3, max_seq_len=32)
    slots = torch.tensor([2, 0])  # not 0..B-1: slot indirection must hold
    with torch.no_grad():
        full = model(ids)
        step_logits = [prefill(model, ids[:, :10], cache, slots, start_pos=0)]
        step_logits += [prefill(model, ids[:, 10:16], cache, slots, start_pos=10)]  # a second prefill chunk
        for pos in range(16, 24):
            step_logits.append(decode_step(model, ids[:, pos], torch.full((2,), pos), cache, slots))
    assert (step_logits[0] - full[:, 9]).abs().max() <= 1e-4
    assert (step_logits[1] - full[:, 15]).abs().max() <= 1e-4
    for i, pos in enumerate(range(16, 24)):
        assert (step_logits[2 + i] - full[:, pos]).abs().max() <= 1e-4


def test_greedy_generation_matches_transformers_generate(checkpoint):
    _, reference, path = checkpoint
    model = load_hf(path)
    prompt = _ids(batch=1, length=12, seed=3)
    expected = reference.generate(prompt, max_new_tokens=32, do_sample=False, pad_token_id=0)[:, 12:]
    assert expected.shape == (1, 32)
    got = generate(model, prompt, max_new_tokens=32)
    assert got.tolist() == expected.tolist()


def test_save_hf_round_trip_loads_in_transformers(checkpoint, tmp_path):
    _name, reference, path = checkpoint
    model = load_hf(path)
    save_hf(model, tmp_path)
    reloaded, info = AutoModelForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"] and not info["mismatched_keys"]
    ids = _ids(seed=5)
    with torch.no_grad():
        assert (reloaded.eval()(ids).logits - reference(ids).logits).abs().max() <= 1e-4
    assert type(reloaded) is type(reference)
