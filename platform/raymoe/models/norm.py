"""RMSNorm (Zhang & Sennrich 2019), computed in float32 as Llama/Mixtral/DeepSeek do."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32:
            # One fused kernel; the same arithmetic as below (bit-equal in fp32, tested).
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        # HF's order: normalise in float32, round to x's dtype, then scale by the weight in that
        # dtype. The fused kernel without a weight computes in float32 and rounds once, which is
        # that normalised-and-rounded tensor bit for bit (tested), in one call instead of five.
        return self.weight * F.rms_norm(x, (x.shape[-1],), None, self.eps)
