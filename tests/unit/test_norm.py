"""RMSNorm: the fused fp32 kernel against the formula Llama / Mixtral / DeepSeek use."""

import torch

from raymoe.models.norm import RMSNorm


def test_fused_rms_norm_is_bit_equal_to_the_float32_formula():
    norm = RMSNorm(64, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    x = torch.randn(3, 7, 64)
    by_formula = norm.weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5))
    assert torch.equal(norm(x), by_formula)


def test_bf16_rms_norm_is_bit_equal_to_hf_order_of_rounding():
    # HF's LlamaRMSNorm / MixtralRMSNorm: float32 normalisation, rounded to bf16, then the bf16 weight.
    norm = RMSNorm(512, eps=1e-5)
    torch.nn.init.normal_(norm.weight)
    norm = norm.to(torch.bfloat16)
    for shape in [(1, 1, 512), (32, 1, 512), (4, 33, 512)]:
        x = (torch.randn(*shape) * 3).to(torch.bfloat16)
        x32 = x.to(torch.float32)
        by_formula = norm.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-5)).to(torch.bfloat16)
        assert torch.equal(norm(x), by_formula)
