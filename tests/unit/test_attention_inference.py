"""Inference-only attention paths against the general ones: the CPU one-query decode kernel
against PyTorch's SDPA (and split over threads against one call), and fused q/k/v projections
against the three separate ones."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymoe.inference import fast_attention as attention_module
from raymoe.inference.cpu_threads import SharedThreads
from raymoe.inference.fast_attention import ThreadedDecodeAttention, fuse_qkv
from raymoe.inference.packed import pack_onednn
from raymoe.models import KVCache, MoETransformer
from raymoe.models.attention import GQAttention, decode_attend
from raymoe.models.lora import LoRALinear, lora_context
from raymoe.models.rope import RotaryEmbedding
from raymoe.serve.debug_artifact import debug_config


@pytest.mark.parametrize(
    ("heads", "kv_heads", "v_dim"), [(4, 2, 16), (4, 4, 16), (3, 3, 8)], ids=["gqa", "mha", "mla-shaped"]
)
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_equals_sdpa(heads, kv_heads, v_dim, masked):
    gen = torch.Generator().manual_seed(0)
    B, S, Dh = 5, 11, 16
    q = torch.randn(B, heads, 1, Dh, generator=gen)
    k = torch.randn(B, kv_heads, S, Dh, generator=gen)
    v = torch.randn(B, kv_heads, S, v_dim, generator=gen)
    mask = None
    if masked:  # row b sees keys 0..positions[b]: rows at different lengths in one batch
        positions = torch.tensor([10, 0, 4, 7, 10])
        mask = (torch.arange(S)[None, :] <= positions[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3, enable_gqa=heads != kv_heads)
    torch.testing.assert_close(decode_attend(q, k, v, mask, 0.3), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(("kv_heads", "v_dim"), [(2, 16), (4, 8)], ids=["gqa", "mla-shaped"])
def test_bf16_decode_attention_over_paged_strides_matches_float32(kv_heads, v_dim):
    # bf16 keys/values laid out as a paged cache's blocks hold them: (position, head) rows, so
    # positions are not adjacent in memory.
    gen = torch.Generator().manual_seed(1)
    B, S, Dh, heads = 3, 37, 16, 4
    q = torch.randn(B, heads, 1, Dh, generator=gen).bfloat16()
    k = torch.randn(B, S, kv_heads, Dh, generator=gen).bfloat16().transpose(1, 2)
    v = torch.randn(B, S, kv_heads, v_dim, generator=gen).bfloat16().transpose(1, 2)
    mask = (torch.arange(S)[None, :] <= torch.tensor([36, 3, 20])[:, None])[:, None, None, :]
    expected = F.scaled_dot_product_attention(
        q.float(), k.float(), v.float(), attn_mask=mask, scale=0.3, enable_gqa=heads != kv_heads
    )
    out = decode_attend(q, k, v, mask, 0.3)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=2e-2)


@pytest.mark.parametrize("variant", [{}, {"qkv_bias": True}, {"qk_norm": True}], ids=["plain", "qkv-bias", "qk-norm"])
def test_fused_qkv_gives_the_same_attention_output(variant):
    cfg = dataclasses.replace(debug_config(64, dim=64, num_layers=1, max_seq_len=32), **variant)
    torch.manual_seed(0)
    attn = GQAttention(cfg, 0)
    for p in attn.parameters():
        nn.init.normal_(p, std=0.3)
    x = torch.randn(2, 6, cfg.dim)
    rope = RotaryEmbedding(cfg.rope, cfg.rope_head_dim)(torch.arange(6).expand(2, 6))
    with torch.no_grad():
        expected = attn(x, rope, None)
        fuse_qkv(attn)
        assert attn.q_proj is None
        assert attn.qkv_proj.linear.out_features == (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        torch.testing.assert_close(attn(x, rope, None), expected, rtol=1e-5, atol=1e-6)


def test_packing_fuses_plain_projections_and_leaves_lora_wrapped_ones():
    model = MoETransformer(debug_config(96, dim=64, num_layers=2, max_seq_len=32))
    model.init_weights(seed=1)
    model.layers[0].attn.q_proj = LoRALinear(model.layers[0].attn.q_proj, lora_context(model))
    pack_onednn(model)
    first, second = model.layers[0].attn, model.layers[1].attn
    assert first.qkv_proj is None and isinstance(first.q_proj, LoRALinear)
    assert second.qkv_proj is not None and second.q_proj is None
    with pytest.raises(ValueError, match=r"plain nn\.Linear"):
        fuse_qkv(first)


def test_decode_through_the_cache_equals_full_recompute_with_fused_projections():
    model = MoETransformer(debug_config(96, dim=64, num_layers=2, max_seq_len=32))
    model.init_weights(seed=2)
    model.eval()
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)[:, -1]
        for layer in model.layers:
            fuse_qkv(layer.attn)
        cache = KVCache(model.cfg, num_slots=4, max_seq_len=32)
        slots = torch.tensor([2, 0, 3])
        positions = torch.arange(8).expand(3, 8)
        model(ids[:, :8], positions, cache, slots)
        step = model(ids[:, 8:], torch.full((3, 1), 8), cache, slots)[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("heads", "kv_heads", "v_dim"), [(4, 2, 16), (3, 3, 8)], ids=["gqa", "mla-shaped"])
@pytest.mark.parametrize("grad_mode", [torch.inference_mode, torch.no_grad])
def test_decode_attention_over_threads_equals_one_call(heads, kv_heads, v_dim, grad_mode):
    gen = torch.Generator().manual_seed(4)
    B, S, Dh = 7, 1200, 16  # 7 x 1200 row-keys: above the threshold; 7 rows in 6 uneven chunks
    assert B * S >= attention_module.THREADED_DECODE_MIN_ROW_KEYS
    q = torch.randn(B, heads, 1, Dh, generator=gen)
    k = torch.randn(B, kv_heads, S, Dh, generator=gen)
    v = torch.randn(B, kv_heads, S, v_dim, generator=gen)
    positions = torch.tensor([1199, 0, 640, 7, 1199, 300, 999])
    mask = (torch.arange(S)[None, :] <= positions[:, None])[:, None, None, :]
    cache = type("View", (), {"causal": False, "mask_B1TS": mask})()
    threads = SharedThreads.start(3)
    with grad_mode():  # the pool threads follow the caller's mode (writes into an inference tensor)
        threaded = ThreadedDecodeAttention(threads)(q, k, v, cache, 0.3, heads != kv_heads)
        serial = decode_attend(q, k, v, mask, 0.3)
    assert torch.equal(threaded, serial)


def test_packed_model_with_threads_decodes_long_contexts_exactly_as_with_one(monkeypatch):
    monkeypatch.setattr(attention_module, "THREADED_DECODE_MIN_ROW_KEYS", 16)  # the tiny model's steps count
    cfg = debug_config(96, dim=64, num_layers=2, max_seq_len=32)
    logits = []
    for expert_threads in (1, 3):
        model = MoETransformer(cfg)
        model.init_weights(seed=5)
        pack_onednn(model, expert_threads=expert_threads)
        assert all(layer.attn.attend_fn.threads.count == expert_threads for layer in model.layers)
        ids = torch.randint(0, 96, (4, 12), generator=torch.Generator().manual_seed(6))
        cache = KVCache(model.cfg, num_slots=4, max_seq_len=32)
        slots = torch.arange(4)
        with torch.inference_mode():
            model(ids[:, :11], torch.arange(11).expand(4, 11), cache, slots)
            logits.append(model(ids[:, 11:], torch.full((4, 1), 11), cache, slots))
    assert torch.equal(logits[0], logits[1])
