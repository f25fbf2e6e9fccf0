"""One expert-parallel shard worker (a Ray actor): the dense weights, its expert slots and its KV
cache rows, in one gloo (CPU) / NCCL (GPU) group with the other workers; `raymoe.serve.shard_workers`
starts N of them behind the model-like `ShardedModel` the engine drives.

Each engine step arrives as one `run` call with all of that step's forwards restricted to this
worker's rows (`raymoe.inference.forward_jobs`); with no rows it still runs every MoE layer with
zero tokens, so the collectives line up. The worker samples its rows itself (each request's
generator travels with its row and comes back advanced), so token ids go back, not logits. Live
re-placement is `stage_placement` (build the new experts and dispatchers beside the running
ones) then `commit_placement` (swap them in between two `run` calls).

Shapes: B batch rows, V vocabulary, L MoE layers, E experts.
"""

from __future__ import annotations

import functools
import socket
import time
from typing import TYPE_CHECKING

import torch

from raymoe.inference.forward_jobs import ForwardJob, run_forward_jobs
from raymoe.parallel.layout import ExpertPlacement
from raymoe.serve.sampling import RowSample, RowSampling, sample_rows

if TYPE_CHECKING:
    from raymoe.models import KVCache


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]


class ShardWorker:
    """One expert shard (a Ray actor): dense weights + its expert slots + its KV cache rows."""

    def __init__(
        self,
        model_path: str,
        rank: int,
        world_size: int,
        placement: dict,
        num_threads: int = 0,
        use_gpu: bool = False,
        cpu_kernels: str = "default",
        expert_threads: int = 1,
        memory_per_worker_gb: float = 0.0,
        dtype: str = "fp32",
    ):
        """Loads the dense weights and this rank's experts of `placement` from `model_path`.

        Before any tensor is allocated or read, the worker's parameter bytes are checked against
        `memory_per_worker_gb` (0 = none) and this process's RLIMIT_AS headroom
        (`raymoe.serve.shard_memory`).

        Raises:
            WorkerMemoryError: the share does not fit; names the layout, the estimate and the limit.
        """
        from raymoe.cpu_allocator import keep_freed_memory
        from raymoe.models import load_hf
        from raymoe.serve.shard_memory import check_shard_fits

        if num_threads:
            torch.set_num_threads(num_threads)
        self.rank = rank
        self.world_size = world_size
        self.model_path = model_path
        self.placement = ExpertPlacement(**placement)
        self.device = torch.device("cuda", 0) if use_gpu and torch.cuda.is_available() else torch.device("cpu")
        # Built on the meta device and checked there; only the dense weights and this worker's
        # experts are allocated and read.
        fits = functools.partial(check_shard_fits, layout=f"ep={world_size}", memory_per_worker_gb=memory_per_worker_gb)
        self.model = load_hf(model_path, expert_ids=self.placement.experts_of(rank), check=fits)
        self.model = self.model.to(self.device, torch.bfloat16 if dtype == "bf16" else torch.float32).eval()
        self.cpu_kernels, self.expert_threads = cpu_kernels, expert_threads
        self.cache: KVCache | None = None  # make_cache
        # (version, placement, [(moe, experts, dispatcher) per MoE layer]) built by stage_placement.
        self._staged: tuple | None = None
        if self.device.type == "cpu":
            keep_freed_memory()

    def rendezvous_address(self) -> str:
        """`tcp://ip:port` on this worker's node (asked of worker 0 only)."""
        import ray

        return f"tcp://{ray.util.get_node_ip_address()}:{_free_port()}"

    def join_group(self, init_method: str, timeout_s: float = 120.0) -> list[int]:
        """Joins the group (all workers call this at once) and keeps this rank's expert slots.

        `timeout_s` bounds every collective: when a peer dies mid-step the survivors fail the step
        instead of waiting forever (torch's default is 30 minutes).
        """
        from datetime import timedelta

        import torch.distributed as dist

        from raymoe.parallel.layout import ParallelLayout, shard_model_experts

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(
            backend,
            init_method=init_method,
            rank=self.rank,
            world_size=self.world_size,
            timeout=timedelta(seconds=timeout_s),
        )
        shard_model_experts(
            self.model,
            ParallelLayout(ep=self.world_size),
            self.rank,
            ep_group=dist.group.WORLD,
            placement=self.placement,
            allow_replicas=True,
        )
        from raymoe.inference.packed import pack_onednn, wants_packed_weights

        if wants_packed_weights(self.cpu_kernels, self.model):
            pack_onednn(self.model, self.expert_threads)  # after sharding: only this worker's experts
        return self.placement.experts_of(self.rank)

    def make_cache(self, num_slots: int, max_seq_len: int) -> int:
        """Allocates this worker's KV cache rows; returns its size in bytes."""
        from raymoe.models import KVCache

        dtype = next(self.model.parameters()).dtype
        cache = KVCache(self.model.cfg, num_slots, max_seq_len, dtype=dtype, device=self.device)
        self.cache = cache
        return cache.nbytes()

    @torch.inference_mode()
    def run(
        self, jobs: list[ForwardJob | None], specs: list[list[RowSampling | None] | None]
    ) -> tuple[list[list[RowSample | None] | None], torch.Tensor]:
        """Runs one engine step's forwards in order (None = no rows here, join the collectives)
        and samples each row that samples, as the engine would (`specs`: per job, per row, how;
        None where the row does not sample).

        Returns:
            Per job (None for empty jobs) per row its draw (None where it does not sample), and
            the (L, E) tokens routed per expert summed over the jobs (this worker's tokens).
        """
        if self.cache is None:
            raise RuntimeError(f"rank {self.rank}: run before make_cache")
        cache = self.cache
        moe_layers = list(self.model.moe_layers())
        tokens_LE = torch.zeros(len(moe_layers), self.model.cfg.moe.num_experts, dtype=torch.long)
        # Every worker makes the same passes, so each MoE layer's all-to-all lines up: one pass
        # over this worker's jobs (possibly none), or with capacity-limited routing one per job.
        if self.model.cfg.moe.capacity_factor is None:
            passes = [[job for job in jobs if job is not None]]
        else:
            passes = [[] if job is None else [job] for job in jobs]
        logits = []
        for batch in passes:
            logits += run_forward_jobs(self.model, [job.to(self.device) for job in batch], cache)
            for i, moe in enumerate(moe_layers):
                tokens_LE[i] += moe.last_tokens_per_expert_E.cpu()
        found = iter(logits)
        drawn: list[list[RowSample | None] | None] = []
        for job, job_specs in zip(jobs, specs):
            if job is None:
                drawn.append(None)
                continue
            logits_BV = next(found).cpu()  # the requests' generators are CPU generators
            job_specs = job_specs or [None] * logits_BV.shape[0]
            sampled = [(b, spec) for b, spec in enumerate(job_specs) if spec is not None]
            rows: list[RowSample | None] = [None] * len(job_specs)
            if sampled:
                picked = sample_rows(logits_BV[[b for b, _ in sampled]], [spec for _, spec in sampled])
                for (b, _), row in zip(sampled, picked):
                    rows[b] = row
            drawn.append(rows)
        return drawn, tokens_LE

    def slot_rows(self) -> list[list[int]]:
        """Per MoE layer, the rows each local expert slot has computed so far."""
        from raymoe.parallel.all_to_all import AllToAllDispatcher

        rows = []
        for moe in self.model.moe_layers():
            if not isinstance(moe.dispatcher, AllToAllDispatcher):
                raise RuntimeError(f"rank {self.rank}: slot_rows before join_group")
            rows.append(moe.dispatcher.rows_per_local_slot.tolist())
        return rows

    def stage_placement(self, version: int, slot_expert: list[int]) -> dict:
        """Builds every MoE layer's experts and dispatcher for the placement `slot_expert` beside
        the running ones (see `raymoe.serve.expert_reload`); `commit_placement` swaps them in.

        Returns:
            `rank`, `experts` (this rank's new slot list), `loaded` (expert-layers read from the
            artifact) and `seconds`.
        """
        import torch.distributed as dist

        from raymoe.models.hf_io import read_hf_config
        from raymoe.models.moe import MoE
        from raymoe.parallel.all_to_all import AllToAllDispatcher
        from raymoe.serve.expert_reload import ExpertReader, experts_for_slots

        start = time.perf_counter()
        placement = ExpertPlacement(
            num_experts=self.model.cfg.moe.num_experts, ep=self.world_size, slot_expert=list(slot_expert)
        )
        keep = placement.experts_of(self.rank)
        group = dist.group.WORLD
        if group is None:
            raise RuntimeError(f"rank {self.rank}: stage_placement before join_group")
        staged = []
        arch = getattr(self.model, "hf_architecture", None) or read_hf_config(self.model_path)[1]
        with torch.no_grad(), ExpertReader(self.model_path, arch) as reader:
            for layer_id, layer in enumerate(self.model.layers):
                if not isinstance(layer.ffn, MoE):
                    continue
                moe = layer.ffn
                experts = experts_for_slots(
                    moe.experts, keep, functools.partial(reader.read, layer_id, like=moe.experts)
                )
                staged.append((moe, experts, AllToAllDispatcher(group, placement=placement, ep_rank=self.rank)))
        self._staged = (version, placement, staged)
        return {"rank": self.rank, "experts": keep, "loaded": reader.num_read, "seconds": time.perf_counter() - start}

    def commit_placement(self, version: int) -> list[int]:
        """Swaps in the staged placement `version` (between two `run` calls); the old experts are
        freed. Returns this rank's slot list."""
        if self._staged is None or self._staged[0] != version:
            raise RuntimeError(f"rank {self.rank}: no staged placement version {version} to commit")
        _, placement, staged = self._staged
        for moe, experts, dispatcher in staged:
            moe.register_module("experts", experts)  # GroupedExperts or packed: replaced whole
            moe.dispatcher = dispatcher
        self.placement, self._staged = placement, None
        return placement.experts_of(self.rank)

    def drop_staged(self, version: int) -> None:
        """Forgets a staged placement that will not be committed (another worker failed to stage)."""
        if self._staged is not None and self._staged[0] == version:
            self._staged = None

    def ping(self) -> bool:
        return True

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
