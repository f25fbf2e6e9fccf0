"""LoRA on routed experts: one low-rank update per expert and projection, stacked like the experts.

LoRA (Hu et al. 2021) applied per expert as in MoE-LoRA fine-tuning of Mixtral-style models
(each expert's gate / up / down matrix gets its own A, B pair). The adapters are stacked over the
experts this process holds, exactly like `GroupedExperts`' weights, so an expert-parallel worker
holds the adapters of its own experts and nothing else ("expert LoRA lives with its expert's
shard"), and `raymoe.parallel.grad_sync` treats them as expert parameters (they are reached
through `moe.experts.parameters()`).

Shapes: L local experts, S rows routed here, D model dim, F expert hidden, R rank.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.models.moe import GroupedExperts

# Native stacked weight -> (in features attribute, out features attribute) of one expert matrix.
EXPERT_PROJECTIONS = ("w_gate_EFD", "w_up_EFD", "w_down_EDF")


def init_lora_pair(
    in_features: int, out_features: int, rank: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """peft's default LoRA init: A kaiming-uniform (a=sqrt(5), as nn.Linear), B zeros.

    B = 0 makes the adapted model equal the base model at step 0.
    """
    bound = 1.0 / math.sqrt(in_features)  # kaiming_uniform_(a=sqrt(5)) on an (R, in) matrix
    a_RI = (torch.rand(rank, in_features, generator=generator) * 2 - 1) * bound
    return a_RI, torch.zeros(out_features, rank)


class LoRAGroupedExperts(nn.Module):
    """`GroupedExperts` (frozen, kept as `base`) plus one trainable LoRA pair per expert and matrix.

    Parameters are `lora_A[proj]` (L, R, in) and `lora_B[proj]` (L, out, R) for proj in
    EXPERT_PROJECTIONS; the expert ids and their order are the base's.
    """

    def __init__(self, base: GroupedExperts, rank: int, scaling: float):
        super().__init__()
        self.base = base
        self.expert_ids = base.expert_ids
        self.rank = rank
        self.scaling = scaling
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for proj in EXPERT_PROJECTIONS:
            w = getattr(base, proj)  # (L, out, in)
            L, out_f, in_f = w.shape
            self.lora_A[proj] = nn.Parameter(torch.zeros(L, rank, in_f, device=w.device))
            self.lora_B[proj] = nn.Parameter(torch.zeros(L, out_f, rank, device=w.device))

    # The base's stacked weights under their usual names (parameter counts, export read them).
    @property
    def w_gate_EFD(self) -> nn.Parameter:
        return self.base.w_gate_EFD

    @property
    def w_up_EFD(self) -> nn.Parameter:
        return self.base.w_up_EFD

    @property
    def w_down_EDF(self) -> nn.Parameter:
        return self.base.w_down_EDF

    @torch.no_grad()
    def init_adapters(self, seed: int, layer_id: int) -> None:
        """Initialises each expert's pair from (seed, layer, expert id, matrix), so expert e
        starts the same whichever worker holds it (any ep layout trains the same adapter)."""
        for p_index, proj in enumerate(EXPERT_PROJECTIONS):
            A, B = self.lora_A[proj], self.lora_B[proj]
            for local, expert in enumerate(self.expert_ids):
                g = torch.Generator().manual_seed(((seed * 1009 + layer_id) * 1009 + expert) * 4 + p_index)
                a, b = init_lora_pair(A.shape[2], B.shape[1], self.rank, g)
                A[local].copy_(a)
                B[local].copy_(b)

    def _project(self, x_SI: torch.Tensor, proj: str, w_OI: torch.Tensor, local: int) -> torch.Tensor:
        a_RI, b_OR = self.lora_A[proj][local], self.lora_B[proj][local]
        return x_SI @ w_OI.T + ((x_SI @ a_RI.T) @ b_OR.T) * self.scaling

    def forward(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        base = self.base
        gates, ups, downs = base.w_gate_EFD.unbind(0), base.w_up_EFD.unbind(0), base.w_down_EDF.unbind(0)
        outputs = []
        for e, x_rows in enumerate(torch.split(x_SD, counts)):
            if x_rows.shape[0] == 0:
                continue
            h = F.silu(self._project(x_rows, "w_gate_EFD", gates[e], e)) * self._project(x_rows, "w_up_EFD", ups[e], e)
            outputs.append(self._project(h, "w_down_EDF", downs[e], e))
        if not outputs:
            # Same reason as GroupedExperts: keep the graph connected for the reverse all-to-all.
            return x_SD * 0 + sum(p.sum() * 0 for p in self.parameters() if p.requires_grad)
        return torch.cat(outputs)

    @torch.no_grad()
    def merged_weight(self, proj: str) -> torch.Tensor:
        """The base stack with every expert's update folded in: W + s * B @ A, shape (L, out, in)."""
        return getattr(self.base, proj) + self.scaling * torch.bmm(self.lora_B[proj], self.lora_A[proj])
