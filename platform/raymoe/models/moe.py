"""Mixture-of-Experts layer: route -> dispatch -> grouped expert compute -> combine.

References: Switch Transformer (Fedus et al. 2021) for the load-balancing aux loss, ST-MoE
(Zoph et al. 2022) for the router z-loss, DeepSeekMoE / DeepSeek-V3 (arXiv:2412.19437) for shared
experts, sigmoid scores, group-limited routing and aux-loss-free balancing bias, Mixtral and
Qwen-MoE (Hugging Face modelling code) for softmax top-k routing. The dispatch/compute split
follows vLLM's fused MoE and torchtitan: the `Dispatcher` is where expert parallelism plugs in
(a local sort here, an all-to-all in `raymoe.parallel`), the model code does not change.

Shapes: T tokens, D model dim, E experts (global), L local experts, K top-k, F expert hidden,
S routed (token, expert) rows arriving at this process.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from raymoe.models.config import MoEConfig


class FeedForward(nn.Module):
    """SwiGLU MLP (dense layers and shared experts); HF names gate_proj / up_proj / down_proj."""

    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.up_proj = nn.Linear(dim, hidden_dim, bias=False)
        self.down_proj = nn.Linear(hidden_dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    """Scores experts, picks top-k (optionally within the best groups), returns combine weights."""

    bias_E: torch.Tensor  # buffer, (E,) float32

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, dim))
        # Aux-loss-free balancing: shifts selection only, never the combine weights.
        self.register_buffer("bias_E", torch.zeros(cfg.num_experts, dtype=torch.float32))

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns (weights_TK, expert_ids_TK, scores_TE, logits_TE); scores and weights are float32."""
        cfg = self.cfg
        # fp32 routing even under bf16 autocast, which would recast this linear to bf16 and change
        # which experts tokens pick.
        with torch.autocast(x_TD.device.type, enabled=False):
            logits_TE = F.linear(x_TD.to(torch.float32), self.weight.to(torch.float32))
        scores_TE = logits_TE.sigmoid() if cfg.score_func == "sigmoid" else logits_TE.softmax(dim=-1)
        choice_TE = scores_TE + self.bias_E if cfg.balance_bias else scores_TE
        if cfg.num_groups > 1:
            T = choice_TE.shape[0]
            per_group = cfg.num_experts // cfg.num_groups
            grouped = choice_TE.view(T, cfg.num_groups, per_group)
            # A group's score is the sum of its two best experts (DeepSeek-V3).
            group_scores_TG = grouped.topk(min(2, per_group), dim=-1).values.sum(dim=-1)
            keep_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
            keep_TG.scatter_(1, group_scores_TG.topk(cfg.topk_groups, dim=-1).indices, True)
            choice_TE = grouped.masked_fill(~keep_TG[:, :, None], float("-inf")).view(T, cfg.num_experts)
        expert_ids_TK = choice_TE.topk(cfg.num_experts_per_tok, dim=-1).indices
        weights_TK = scores_TE.gather(1, expert_ids_TK)
        if cfg.norm_topk_prob:
            weights_TK = weights_TK / (weights_TK.sum(dim=-1, keepdim=True) + 1e-20)
        return weights_TK * cfg.routed_scaling_factor, expert_ids_TK, scores_TE, logits_TE

    @torch.no_grad()
    def update_bias(self, tokens_per_expert_E: torch.Tensor) -> None:
        """DeepSeek-V3's rule: raise the bias of under-loaded experts, lower over-loaded ones."""
        load = tokens_per_expert_E.to(torch.float32)
        self.bias_E += self.cfg.bias_update_rate * torch.sign(load.mean() - load)


class Dispatcher(Protocol):
    """Moves routed rows to the process holding their expert and back."""

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor) -> tuple[torch.Tensor, list[int], Any]:
        """Returns rows sorted by local expert (x_SD), rows per local expert, and state for combine."""

    def combine(self, y_SD: torch.Tensor, state: Any) -> torch.Tensor:
        """Returns expert outputs in (token, k) order as y_TKD; dropped pairs are zeros."""


class LocalDispatcher:
    """All experts live in this process: a stable sort by expert id groups the rows."""

    def __init__(self, num_local_experts: int):
        self.num_local_experts = num_local_experts

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor):
        T, K = expert_ids_TK.shape
        flat_ids = expert_ids_TK.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        # One count for dropped pairs (id -1, which sort first) and one per expert.
        num_dropped, *counts = torch.bincount(flat_ids + 1, minlength=self.num_local_experts + 1).tolist()
        order = order[num_dropped:]
        return x_TD[order // K], counts, (order, T, K)

    def combine(self, y_SD: torch.Tensor, state) -> torch.Tensor:
        order, T, K = state
        out = y_SD.new_zeros(T * K, y_SD.shape[-1]).index_copy_(0, order, y_SD)
        return out.view(T, K, y_SD.shape[-1])


def rows_per_expert(x_SD: torch.Tensor, counts: list[int]) -> list[tuple[int, torch.Tensor]]:
    """(local expert, its rows of x_SD) for each expert that received rows, in expert order.

    Without autograd, slices only those experts: `torch.split` makes a view for every expert,
    which at 64 experts is a measurable part of a one-token decode step that reaches two of them.
    With autograd, one split: the backward of a slice zero-fills a gradient as large as x_SD, once
    per expert (measured: 0.22 s of a 6.2 s bf16 train step at the bench shape), where split's
    backward concatenates the experts' gradients once.
    """
    if x_SD.requires_grad and torch.is_grad_enabled():
        return [(e, rows) for e, (rows, n) in enumerate(zip(x_SD.split(counts), counts)) if n]
    work, start = [], 0
    for e, n in enumerate(counts):
        if n:
            work.append((e, x_SD[start : start + n]))
            start += n
    return work


class GroupedExperts(nn.Module):
    """The routed experts held by this process, stacked; one GEMM per expert on contiguous rows."""

    def __init__(self, dim: int, hidden_dim: int, expert_ids: list[int]):
        super().__init__()
        L = len(expert_ids)
        self.expert_ids = list(expert_ids)
        self.w_gate_EFD = nn.Parameter(torch.empty(L, hidden_dim, dim))
        self.w_up_EFD = nn.Parameter(torch.empty(L, hidden_dim, dim))
        self.w_down_EDF = nn.Parameter(torch.empty(L, dim, hidden_dim))

    def forward(self, x_SD: torch.Tensor, counts: list[int]) -> torch.Tensor:
        outputs = []
        weights = (self.w_gate_EFD, self.w_up_EFD, self.w_down_EDF)
        # With autograd, unbind once: indexing w[e] per expert would make autograd zero-fill a
        # full (L, F, D) gradient for every expert and add them up. Without it, index the experts
        # that have rows (unbinding 64 experts costs a view each).
        gates, ups, downs = (w.unbind(0) for w in weights) if torch.is_grad_enabled() else weights
        for e, x_rows in rows_per_expert(x_SD, counts):
            h = F.silu(x_rows @ gates[e].T) * (x_rows @ ups[e].T)
            outputs.append(h @ downs[e].T)
        if not outputs:
            # No rows here (an expert-parallel rank nobody routed to): an empty result that still
            # hangs off x_SD's graph, so backward runs the reverse all-to-all like every rank.
            return x_SD * 0
        return torch.cat(outputs)


def capacity_drop(expert_ids_TK: torch.Tensor, num_experts: int, capacity_factor: float) -> torch.Tensor:
    """Marks (-1) the pairs beyond each expert's capacity ceil(factor * T * K / E), first come first kept."""
    T, K = expert_ids_TK.shape
    capacity = math.ceil(capacity_factor * T * K / num_experts)
    flat = expert_ids_TK.reshape(-1)
    one_hot = F.one_hot(flat, num_experts)
    rank_in_expert = (one_hot.cumsum(dim=0) * one_hot).sum(dim=-1) - 1
    return torch.where(rank_in_expert < capacity, flat, torch.full_like(flat, -1)).view(T, K)


class MoE(nn.Module):
    """Routed experts + optional shared experts. Input and output x_TD (any leading dims)."""

    def __init__(self, dim: int, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(dim, cfg)
        self.experts = GroupedExperts(dim, cfg.expert_hidden_dim, list(range(cfg.num_experts)))
        self.dispatcher: Dispatcher = LocalDispatcher(cfg.num_experts)
        self.shared_experts = FeedForward(dim, cfg.shared_hidden_dim) if cfg.shared_hidden_dim else None
        self.shared_expert_gate = nn.Linear(dim, 1, bias=False) if cfg.shared_expert_gate else None
        # Statistics, not weights: on the CPU even when the model is built on the meta device.
        self.last_tokens_per_expert_E = torch.zeros(cfg.num_experts, dtype=torch.long, device="cpu")
        self.last_aux_loss = torch.zeros((), device="cpu")
        # Set by MoETransformer.forward for one pass: the real tokens (False = padding, which is
        # neither counted in the routing statistics nor sent to an expert).
        self.count_mask_T: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x_TD = x.reshape(-1, shape[-1])
        weights_TK, expert_ids_TK, scores_TE, logits_TE = self.router(x_TD)
        if self.cfg.capacity_factor is not None:
            expert_ids_TK = capacity_drop(expert_ids_TK, self.cfg.num_experts, self.cfg.capacity_factor)
        self._record_stats(expert_ids_TK, scores_TE, logits_TE)
        if self.count_mask_T is not None:
            # Padding never reaches the experts: its pairs are dropped like over-capacity ones
            # (its output is unused, and causal attention keeps it out of every real token).
            expert_ids_TK = expert_ids_TK.masked_fill(~self.count_mask_T[:, None], -1)
        if x_TD.shape[0] == 1 and isinstance(self.dispatcher, LocalDispatcher) and not self.training:
            y_TD = self._one_token(x_TD, weights_TK, expert_ids_TK, self.dispatcher.num_local_experts)
        else:
            x_SD, counts, state = self.dispatcher.dispatch(x_TD, expert_ids_TK)
            y_SD = self.experts(x_SD, counts)
            y_TKD = self.dispatcher.combine(y_SD, state)
            y_TD = self._combine(weights_TK, y_TKD)
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if self.shared_expert_gate is not None:
                shared_TD = torch.sigmoid(self.shared_expert_gate(x_TD)) * shared_TD
            y_TD = y_TD + shared_TD
        return y_TD.view(shape)

    @staticmethod
    def _combine(weights_TK: torch.Tensor, y_TKD: torch.Tensor) -> torch.Tensor:
        """Each token's expert outputs weighted and summed: (T, K) x (T, K, D) -> (T, D)."""
        if torch.is_autocast_enabled(y_TKD.device.type):
            # Autocast runs bmm in its low dtype whatever it is given: upcasting would only copy.
            return torch.bmm(weights_TK.to(y_TKD.dtype)[:, None, :], y_TKD)[:, 0]
        # Otherwise in fp32 whatever the experts' dtype: CPU bf16 batched GEMMs this small are
        # slower than fp32 ones (128 tokens: 0.6 against 0.2 ms), and the weights stay unrounded.
        return torch.bmm(weights_TK.float()[:, None, :], y_TKD.float())[:, 0].to(y_TKD.dtype)

    def _one_token(self, x_TD, weights_TK, expert_ids_TK, num_local_experts: int) -> torch.Tensor:
        """Decoding one sequence: the same expert GEMMs without the sort / scatter of a batch,
        whose fixed cost per layer is a good part of a one-token step."""
        ids = expert_ids_TK[0].tolist()
        order = sorted((k for k in range(len(ids)) if ids[k] >= 0), key=ids.__getitem__)
        counts = [0] * num_local_experts
        for k in order:
            counts[ids[k]] += 1
        y_SD = self.experts(x_TD.expand(len(order), -1), counts)
        return weights_TK[:, order].to(y_SD.dtype) @ y_SD

    def _record_stats(self, expert_ids_TK, scores_TE, logits_TE) -> None:
        cfg = self.cfg
        counted = expert_ids_TK if self.count_mask_T is None else expert_ids_TK[self.count_mask_T]
        kept = counted if cfg.capacity_factor is None else counted[counted >= 0]
        self.last_tokens_per_expert_E = torch.bincount(kept.reshape(-1), minlength=cfg.num_experts).detach()
        aux = scores_TE.new_zeros(())
        if not self.training:
            self.last_aux_loss = aux  # the aux losses only matter to training
            return
        if cfg.aux_loss_coef > 0:
            T, K = expert_ids_TK.shape
            # Switch-style: E * sum_e (fraction of routed pairs to e) * (mean score of e).
            fraction_E = self.last_tokens_per_expert_E.to(scores_TE.dtype) / (T * K)
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
            aux = aux + cfg.aux_loss_coef * cfg.num_experts * (fraction_E * probs_TE.mean(dim=0)).sum()
        if cfg.z_loss_coef > 0:
            aux = aux + cfg.z_loss_coef * torch.logsumexp(logits_TE, dim=-1).pow(2).mean()
        self.last_aux_loss = aux
