"""Inference-only attention paths against the general ones: the CPU one-query decode kernel
against PyTorch's SDPA, and fused q/k/v projections against the three separate ones."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from raymoe.models import KVCache, MoETransformer
from raymoe.models.attention import GQAttention, _decode_attend
from raymoe.models.lora import LoRALinear, lora_context
from raymoe.models.packed import pack_fp32
from raymoe.models.rope import RotaryEmbedding
from raymoe.serve.debug_artifact import debug_config


@pytest.mark.parametrize(("heads", "kv_heads", "v_dim"), [(4, 2, 16), (4, 4, 16), (3, 3, 8)],
                         ids=["gqa", "mha", "mla-shaped"])
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
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.3,
                                              enable_gqa=heads != kv_heads)
    torch.testing.assert_close(_decode_attend(q, k, v, mask, 0.3), expected, rtol=1e-5, atol=1e-6)


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
        attn.fuse_qkv()
        assert attn.q_proj is None and attn.qkv_proj.out_features == (cfg.num_heads + 2 * cfg.num_kv_heads) * cfg.head_dim
        torch.testing.assert_close(attn(x, rope, None), expected, rtol=1e-5, atol=1e-6)


def test_packing_fuses_plain_projections_and_leaves_lora_wrapped_ones():
    model = MoETransformer(debug_config(96, dim=64, num_layers=2, max_seq_len=32))
    model.init_weights(seed=1)
    model.layers[0].attn.q_proj = LoRALinear(model.layers[0].attn.q_proj, lora_context(model))
    pack_fp32(model)
    first, second = model.layers[0].attn, model.layers[1].attn
    assert first.qkv_proj is None and isinstance(first.q_proj, LoRALinear)
    assert second.qkv_proj is not None and second.q_proj is None
    with pytest.raises(ValueError, match="plain nn.Linear"):
        first.fuse_qkv()


def test_decode_through_the_cache_equals_full_recompute_with_fused_projections():
    model = MoETransformer(debug_config(96, dim=64, num_layers=2, max_seq_len=32))
    model.init_weights(seed=2)
    model.eval()
    ids = torch.randint(0, 96, (3, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids)[:, -1]
        for layer in model.layers:
            layer.attn.fuse_qkv()
        cache = KVCache(model.cfg, num_slots=4, max_seq_len=32)
        slots = torch.tensor([2, 0, 3])
        positions = torch.arange(8).expand(3, 8)
        model(ids[:, :8], positions, cache, slots)
        step = model(ids[:, 8:], torch.full((3, 1), 8), cache, slots)[:, -1]
    torch.testing.assert_close(step, full, rtol=1e-4, atol=1e-5)
