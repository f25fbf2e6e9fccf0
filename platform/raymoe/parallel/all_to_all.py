"""All-to-all token dispatcher for expert parallelism (the `MoE.dispatcher` protocol).

Follows the DeepSpeed-MoE / Megatron "alltoall" token dispatcher and torchtitan's expert-parallel
dispatch: every rank sends each (token, k) pair to the rank that owns the chosen expert, the
owner runs its grouped expert GEMMs, and a second all-to-all brings the results home.

Counts go first (`all_to_all_single` of a small int tensor) so every rank knows how many rows it
will receive; the rows then travel with uneven splits through
`torch.distributed._functional_collectives.all_to_all_single_autograd`, whose backward is the
reverse all-to-all, so gradients flow to remote experts and back to local tokens. Gloo on CPU,
NCCL on GPU: the dispatcher only uses the group it is given.

Legend: T tokens on this rank, K top-k, D model dim, P = T*K (token, k) pairs, S rows this rank
computes (received from all ep peers), R ep ranks, L local experts per rank (E_local).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch.distributed._functional_collectives import all_to_all_single_autograd, wait_tensor

from raymoe.parallel.layout import ExpertPlacement


@dataclass
class AllToAllStats:
    """Running totals of what this dispatcher sent and how long its collectives took (forward)."""

    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    calls: int = 0

    def reset(self) -> AllToAllStats:
        """Returns a copy of the totals and zeroes them (call once per step)."""
        snapshot = AllToAllStats(self.bytes_sent, self.bytes_received, self.seconds, self.calls)
        self.bytes_sent = self.bytes_received = self.calls = 0
        self.seconds = 0.0
        return snapshot


@dataclass
class _DispatchState:
    """What `combine` needs to undo `dispatch`."""

    num_pairs: int  # P
    top_k: int  # K
    pair_index_sorted: torch.Tensor  # (P_valid,) pair index of each sent row, in send order
    recv_perm: torch.Tensor  # (S,) received-row index of each computed row (sorted by expert)
    x_SD: torch.Tensor  # the rows handed to the experts (kept to hold the autograd graph together)
    send_splits: list[int] = field(default_factory=list)  # rows sent to each ep rank
    recv_splits: list[int] = field(default_factory=list)  # rows received from each ep rank


class AllToAllDispatcher:
    """Sends (token, k) pairs to the ep rank that owns their expert and brings results back.

    When the placement gives a logical expert several slots (EPLB replicas, serving only), its
    pairs are spread over the copies by pair index: pair p (= t * K + k on this rank) goes to copy
    p mod (number of copies). Deterministic, needs no communication, and splits a hot expert's
    load about evenly; with one slot per expert it is exactly the plain lookup.

    Args:
        group: torch.distributed process group of the ep peers (ranks in ep-rank order).
        placement: which ep rank holds which expert (slots; replicas allowed).
        ep_rank: this rank's position in `group`.
    """

    def __init__(self, group: dist.ProcessGroup, *, placement: ExpertPlacement, ep_rank: int):
        self.group = group
        self.placement = placement
        self.ep_rank = ep_rank
        self.num_ranks = placement.ep
        self.num_local = placement.slots_per_rank
        # slot_table_EC[e, c] = physical slot of copy c of logical expert e (padded with the
        # first copy); slot // L is its rank and slot % L its local index there, so sorting by
        # slot sorts by (rank, local expert).
        expert_slots = placement.expert_slots
        self.num_copies_E = torch.tensor([len(expert_slots[e]) for e in range(placement.num_experts)], dtype=torch.long)
        C = int(self.num_copies_E.max())
        self.slot_table_EC = torch.tensor(
            [slots + [slots[0]] * (C - len(slots)) for _, slots in sorted(expert_slots.items())], dtype=torch.long
        )
        self.slot_of_expert = self.slot_table_EC[:, 0].clone()
        # Rows each local slot has computed since construction (which copies take load).
        self.rows_per_local_slot = torch.zeros(self.num_local, dtype=torch.long)
        self.stats = AllToAllStats()

    def _slots_of_pairs(self, pair_index_V: torch.Tensor, expert_V: torch.Tensor) -> torch.Tensor:
        """Physical slot of each valid (token, k) pair; a replicated expert's pairs rotate copies."""
        if self.slot_table_EC.shape[1] == 1:
            return self.slot_of_expert.to(expert_V.device)[expert_V]
        copies_V = self.num_copies_E.to(expert_V.device)[expert_V]
        copy_V = pair_index_V % copies_V
        return self.slot_table_EC.to(expert_V.device)[expert_V, copy_V]

    def dispatch(self, x_TD: torch.Tensor, expert_ids_TK: torch.Tensor):
        """Routes rows to the owners of their experts.

        Args:
            x_TD: this rank's token activations.
            expert_ids_TK: global expert id per (token, k); -1 = dropped (capacity).

        Returns:
            `(x_SD, counts, state)`: rows this rank's experts must compute, sorted by local expert;
            `counts[l]` rows for local expert l; `state` for `combine`.
        """
        T, K = expert_ids_TK.shape
        R, L = self.num_ranks, self.num_local
        ids_P = expert_ids_TK.reshape(-1)
        valid = torch.nonzero(ids_P >= 0).squeeze(1)
        slot_V = self._slots_of_pairs(valid, ids_P[valid])
        order = torch.argsort(slot_V, stable=True)
        pair_index_sorted = valid[order]
        send_x = x_TD.index_select(0, pair_index_sorted // K)

        # Counts first: send_counts_RL[r, l] rows go to rank r's local expert l.
        send_counts_RL = torch.bincount(slot_V, minlength=R * L).reshape(R, L)
        recv_counts_RL = self._exchange_counts(send_counts_RL)
        send_splits = send_counts_RL.sum(1).tolist()
        recv_splits = recv_counts_RL.sum(1).tolist()

        recv_x = self._exchange_rows(send_x, recv_splits, send_splits)

        # Received rows arrive grouped by source rank, then by local expert within each source;
        # the experts want them grouped by local expert.
        local_id_S = (
            torch.arange(L, device=recv_x.device)
            .repeat(R)
            .repeat_interleave(recv_counts_RL.reshape(-1).to(recv_x.device))
        )
        recv_perm = torch.argsort(local_id_S, stable=True)
        x_SD = recv_x.index_select(0, recv_perm)
        counts = recv_counts_RL.sum(0).tolist()
        self.rows_per_local_slot += torch.tensor(counts, dtype=torch.long)
        state = _DispatchState(T * K, K, pair_index_sorted, recv_perm, x_SD, send_splits, recv_splits)
        return x_SD, counts, state

    def combine(self, y_SD: torch.Tensor, state: _DispatchState) -> torch.Tensor:
        """Sends expert outputs back; returns `y_TKD` in (token, k) order, zeros for dropped pairs."""
        if y_SD.shape[0] == 0 and state.x_SD.requires_grad:
            # A rank that received no rows gets expert outputs built from nothing (no autograd
            # history), so its backward would skip both all-to-alls while its peers run them and
            # the collectives would mismatch. Tying the empty output to the received rows keeps
            # every rank's backward issuing the same collectives in the same order.
            y_SD = y_SD + 0.0 * state.x_SD.sum()
        # Every rank must put one dtype on the wire, or gloo reads a buffer of the wrong size and
        # aborts the process. Under autocast the experts' output dtype is not that: a rank that
        # computed rows holds bf16 matmul outputs, a rank that received none holds fp32 zeros.
        device_type = y_SD.device.type
        if torch.is_autocast_enabled(device_type):
            y_SD = y_SD.to(torch.get_autocast_dtype(device_type))
        # Undo the local sort (row i of y_SD belongs at received position recv_perm[i]).
        inverse = torch.empty_like(state.recv_perm)
        inverse[state.recv_perm] = torch.arange(state.recv_perm.numel(), device=inverse.device)
        y_recv = y_SD.index_select(0, inverse)
        y_sent = self._exchange_rows(y_recv, state.send_splits, state.recv_splits)
        D = y_SD.shape[-1]
        y_PD = y_sent.new_zeros(state.num_pairs, D).index_copy(0, state.pair_index_sorted, y_sent)
        return y_PD.reshape(state.num_pairs // state.top_k, state.top_k, D)

    def _exchange_counts(self, send_counts_RL: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        device = _collective_device(self.group)
        send = send_counts_RL.reshape(-1).to(device)
        recv = torch.empty_like(send)
        # Equal splits of L counts per rank; a plain (non-autograd) collective: counts are ints.
        dist.all_to_all_single(recv, send, group=self.group)
        self.stats.seconds += time.perf_counter() - start
        return recv.reshape(self.num_ranks, self.num_local).cpu()

    def _exchange_rows(self, rows: torch.Tensor, out_splits: list[int], in_splits: list[int]):
        start = time.perf_counter()
        out = all_to_all_single_autograd(rows.contiguous(), out_splits, in_splits, self.group)
        # Functional collectives return lazily-waited tensors; wait here so the timing is real.
        out = wait_tensor(out)
        self.stats.seconds += time.perf_counter() - start
        self.stats.calls += 1
        row_bytes = rows.shape[-1] * rows.element_size()
        self.stats.bytes_sent += (sum(in_splits) - in_splits[self.ep_rank]) * row_bytes
        self.stats.bytes_received += (sum(out_splits) - out_splits[self.ep_rank]) * row_bytes
        return out


def _collective_device(group: dist.ProcessGroup) -> torch.device:
    """NCCL moves CUDA tensors only; gloo moves CPU tensors."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
