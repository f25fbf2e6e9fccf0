"""RMSNorm: the fused fp32 kernel against the formula Llama / Mixtral / DeepSeek use."""

import torch

from raymoe.models.norm import RMSNorm


def test_fused_rms_norm_is_bit_equal_to_the_float32_formula():
    norm = RMSNorm(64, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 7, 64)
    by_formula = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(norm(x), by_formula)
