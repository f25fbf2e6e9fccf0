"""One engine step's forwards (a decode batch, prefill chunks) through the model in one pass.

A serving step holds several forwards of different shapes: B decodes of one token each, and a
few prompt chunks of T tokens. Run one after another, each forward reads every weight again;
at small batch a MoE decode is bound by reading expert weights, so a step with one prefill
chunk beside the decodes costs two passes over the experts. `run_forward_jobs` runs attention
per job (each has its own shape, positions and cache rows) but the feed-forward layers once over
all jobs' tokens, flattened: the experts' weights are read once per step (the flattened batch
of vLLM / Sarathi's mixed prefill-decode steps). With capacity-limited routing, tokens of
different jobs would compete for expert capacity, so such models run one job per pass.

Only the positions that are sampled reach the final norm and the LM head. With `keep_hidden`
their normed hidden states stay on the model as `model.last_hidden_ND` (one row per job row, in
job order), for the serving app's pooled prompt embeddings.

Shapes: B rows of a job, T tokens of a job, N tokens of all jobs, D model dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.models.kv_cache import KVCache
from raymoe.models.lora import set_row_adapters
from raymoe.models.paged_kv_cache import PagedKVCache


@dataclass
class ForwardJob:
    """One forward of an engine step: rows, their positions and cache slots, and which position
    of each row to return logits for."""

    ids_BT: torch.Tensor
    positions_BT: torch.Tensor
    slot_ids_B: torch.Tensor
    last_B: torch.Tensor

    def rows(self, index_b: torch.Tensor) -> ForwardJob:
        return ForwardJob(
            self.ids_BT[index_b], self.positions_BT[index_b], self.slot_ids_B[index_b], self.last_B[index_b]
        )

    def to(self, device: torch.device) -> ForwardJob:
        return ForwardJob(*(t.to(device) for t in (self.ids_BT, self.positions_BT, self.slot_ids_B, self.last_B)))


@torch.inference_mode()
def run_forward_jobs(
    model,
    jobs: list[ForwardJob],
    cache: KVCache | PagedKVCache,
    adapters: list[list[str | None]] | None = None,
    keep_hidden: bool = False,
) -> list[torch.Tensor]:
    """Runs `jobs` in one pass (see the module doc); returns each job's float32 logits (B, V).

    Args:
        model: a `MoETransformer` (or a shard of one: its MoE layers may exchange tokens by
            all-to-all; every MoE layer runs exactly once per call, also with zero tokens).
        jobs: the step's forwards; may be empty.
        cache: the KV cache the jobs' slots index.
        adapters: per job, the LoRA adapter of each row (None = base weights).
        keep_hidden: keep the final-norm hidden state of each job row's `last_B` position as
            `model.last_hidden_ND` (N rows over all jobs, in order); otherwise it is set to None.
    """
    if model.cfg.moe.capacity_factor is not None and len(jobs) > 1:
        outputs, counts, hidden = [], [], []
        for i, job in enumerate(jobs):
            outputs += run_forward_jobs(model, [job], cache, adapters and [adapters[i]], keep_hidden)
            counts.append(model.tokens_per_expert())
            hidden.append(model.last_hidden_ND)
        for moe, counts_E in zip(model.moe_layers(), torch.stack(counts).sum(0)):
            moe.last_tokens_per_expert_E = counts_E  # the step's counts, as after one pass
        model.last_hidden_ND = torch.cat(hidden) if keep_hidden else None
        return outputs
    views = [cache.view(j.slot_ids_B, j.positions_BT) for j in jobs]
    ropes = [model.rope(j.positions_BT) for j in jobs]
    h_list = [model.embed(j.ids_BT) for j in jobs]
    # Right padding of a group of prompts (positions after a row's last_B) is neither counted in
    # the routing statistics nor sent to an expert: the counts are the served tokens' load.
    # Decode-only steps (one token per row) have no padding: no mask is built on that hot path.
    real_N, padded_moes = None, []
    if any(j.ids_BT.shape[1] > 1 for j in jobs):
        real_N = torch.cat(
            [
                (torch.arange(j.ids_BT.shape[1], device=j.last_B.device)[None, :] <= j.last_B[:, None]).reshape(-1)
                for j in jobs
            ]
        )
        padded_moes = [] if bool(real_N.all()) else list(model.moe_layers())
    for moe in padded_moes:
        moe.count_mask_T = real_N
    try:
        h_list = _run_layers(model, jobs, h_list, ropes, views, adapters)
    finally:
        for moe in padded_moes:
            moe.count_mask_T = None
    model.last_hidden_ND = None
    if not jobs:
        return []
    if adapters is not None:
        set_row_adapters(model, [a for rows in adapters for a in rows])
    last_ND = torch.cat([h[torch.arange(h.shape[0], device=h.device), j.last_B] for h, j in zip(h_list, jobs)])
    normed_ND = model.norm(last_ND)
    if keep_hidden:
        model.last_hidden_ND = normed_ND
    logits_NV = model.lm_head(normed_ND).float()
    if adapters is not None:
        set_row_adapters(model, None)
    return list(logits_NV.split([j.ids_BT.shape[0] for j in jobs]))


def _run_layers(
    model, jobs: list[ForwardJob], h_list: list[torch.Tensor], ropes, views, adapters: list[list[str | None]] | None
) -> list[torch.Tensor]:
    """Every layer: attention per job, then the feed-forward once over all jobs' tokens."""
    D = model.cfg.dim
    sizes = [j.ids_BT.numel() for j in jobs]
    token_adapters = None
    if adapters is not None:
        token_adapters = [a for job, rows in zip(jobs, adapters) for a in rows for _ in range(job.ids_BT.shape[1])]
    for layer in model.layers:
        for i, (h, rope, view) in enumerate(zip(h_list, ropes, views)):
            if adapters is not None:
                set_row_adapters(model, adapters[i])
            h_list[i] = layer.attend(h, rope, view)
        if adapters is not None:
            set_row_adapters(model, token_adapters)
        flat_ND = torch.cat([h.reshape(-1, D) for h in h_list]) if jobs else model.embed.weight.new_zeros(0, D)
        flat_ND = layer.feed_forward(flat_ND)
        h_list = [chunk.view((*j.ids_BT.shape, D)) for chunk, j in zip(flat_ND.split(sizes), jobs)]
    return h_list
