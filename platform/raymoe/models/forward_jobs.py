"""One engine step's forwards (a decode batch, prefill chunks) through the model in one pass.

A serving step holds several forwards of different shapes: B decodes of one token each, and a
few prompt chunks of T tokens. Run one after another, each forward reads every weight again;
at small batch a MoE decode is bound by reading expert weights, so a step with one prefill
chunk beside the decodes costs two passes over the experts. `run_forward_jobs` runs attention
per job (each has its own shape, positions and cache rows) but the feed-forward layers once over
all jobs' tokens, flattened: the experts' weights are read once per step (the flattened batch
of vLLM / Sarathi's mixed prefill-decode steps). With capacity-limited routing, tokens of
different jobs would compete for expert capacity, so such models run one job per pass.

Only the positions that are sampled reach the final norm and the LM head.

Shapes: B rows of a job, T tokens of a job, N tokens of all jobs, D model dim, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from raymoe.models.kv_cache import KVCache
from raymoe.models.lora import set_row_adapters


@dataclass
class ForwardJob:
    """One forward of an engine step: rows, their positions and cache slots, and which position
    of each row to return logits for."""

    ids_BT: torch.Tensor
    positions_BT: torch.Tensor
    slot_ids_B: torch.Tensor
    last_B: torch.Tensor

    def rows(self, index_b: torch.Tensor) -> ForwardJob:
        return ForwardJob(self.ids_BT[index_b], self.positions_BT[index_b], self.slot_ids_B[index_b],
                          self.last_B[index_b])

    def to(self, device: torch.device) -> ForwardJob:
        return ForwardJob(*(t.to(device) for t in (self.ids_BT, self.positions_BT, self.slot_ids_B, self.last_B)))


@torch.inference_mode()
def run_forward_jobs(model, jobs: list[ForwardJob], cache: KVCache,
                     adapters: list[list[str | None]] | None = None) -> list[torch.Tensor]:
    """Runs `jobs` in one pass (see the module doc); returns each job's float32 logits (B, V).

    Args:
        model: a `MoETransformer` (or a shard of one: its MoE layers may exchange tokens by
            all-to-all; every MoE layer runs exactly once per call, also with zero tokens).
        jobs: the step's forwards; may be empty.
        cache: the KV cache the jobs' slots index.
        adapters: per job, the LoRA adapter of each row (None = base weights).
    """
    if model.cfg.moe.capacity_factor is not None and len(jobs) > 1:
        outputs, counts_LE = [], 0
        for i, job in enumerate(jobs):
            outputs += run_forward_jobs(model, [job], cache, adapters and [adapters[i]])
            counts_LE = counts_LE + model.tokens_per_expert()
        for moe, counts_E in zip(model.moe_layers(), counts_LE):
            moe.last_tokens_per_expert_E = counts_E  # the step's counts, as after one pass
        return outputs
    D = model.cfg.dim
    views = [cache.view(j.slot_ids_B, j.positions_BT) for j in jobs]
    ropes = [model.rope(j.positions_BT) for j in jobs]
    h_list = [model.embed(j.ids_BT) for j in jobs]
    token_adapters = None
    if adapters is not None:
        token_adapters = [a for job, rows in zip(jobs, adapters) for a in rows for _ in range(job.ids_BT.shape[1])]
    sizes = [j.ids_BT.numel() for j in jobs]
    for layer in model.layers:
        for i, (h, rope, view) in enumerate(zip(h_list, ropes, views)):
            if adapters is not None:
                set_row_adapters(model, adapters[i])
            h_list[i] = layer.attend(h, rope, view)
        if adapters is not None:
            set_row_adapters(model, token_adapters)
        flat_ND = torch.cat([h.reshape(-1, D) for h in h_list]) if jobs else model.embed.weight.new_zeros(0, D)
        flat_ND = layer.feed_forward(flat_ND)
        h_list = [chunk.view(j.ids_BT.shape + (D,)) for chunk, j in zip(flat_ND.split(sizes), jobs)]
    if not jobs:
        return []
    if adapters is not None:
        set_row_adapters(model, [a for rows in adapters for a in rows])
    last_ND = torch.cat([h[torch.arange(h.shape[0], device=h.device), j.last_B] for h, j in zip(h_list, jobs)])
    logits_NV = model.lm_head(model.norm(last_ND)).float()
    if adapters is not None:
        set_row_adapters(model, None)
    return list(logits_NV.split([j.ids_BT.shape[0] for j in jobs]))
