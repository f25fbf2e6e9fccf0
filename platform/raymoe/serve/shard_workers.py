"""Expert-parallel serving: N shard workers (Ray actors) behind a model-like proxy.

The Serve replica keeps its engine (scheduler, sampling) and swaps the model for a
`ShardedModel`. Each `ShardWorker` (`raymoe.serve.shard_worker`) holds the dense weights, its
expert slots (placement as data, EPLB replicas allowed) and its own KV cache rows; the workers
form one gloo (CPU) / NCCL (GPU) group and every MoE layer's dispatcher is an `AllToAllDispatcher`
over it (DESIGN.md "Expert shards in Ray actors").

Attention is data-parallel over the batch: engine slot s lives on worker s mod N as local cache
row s // N, so a sequence always meets its own keys. Each engine step sends every worker one Ray
call with all of that step's forwards (decode batch and prefill groups) restricted to its rows,
run in one pass (`raymoe.inference.forward_jobs`); a worker with no rows still runs every MoE layer
with zero tokens, so the collectives line up. Each worker samples its own rows with the
request's sampling settings and generator (`raymoe.serve.sampling.sample_rows`), so token ids
(and the log-probabilities asked for) come back instead of full-vocabulary logits, and are put
back in row order.

Live re-placement (`ShardedModel.apply_placement`): every worker first builds the expert modules
and dispatchers of the new placement beside the running ones (`stage_placement`, reading from the
artifact only the experts it lacks); then a commit, sent to all workers under the same lock that
sends each step's calls, swaps them in. A worker runs its calls in order, so every worker switches
between the same two engine steps, after the step in flight has finished with the old experts,
which are freed at the swap. Copies of one logical expert hold the same weights, so a request
decoding across the switch gets the tokens it would have got without it.

Shapes: B batch rows, T tokens, V vocabulary, D model dim, L MoE layers, E experts.
"""

from __future__ import annotations

import threading
import time

import torch

from raymoe.inference.forward_jobs import ForwardJob
from raymoe.parallel.layout import ExpertPlacement
from raymoe.serve.request import EngineStoppedError
from raymoe.serve.sampling import RowSample, RowSampling
from raymoe.serve.shard_worker import ShardWorker


class _LayerStats:
    """What the engine reads from a MoE layer after a forward (its routed-token counts)."""

    def __init__(self, num_experts: int):
        self.last_tokens_per_expert_E = torch.zeros(num_experts, dtype=torch.long)


class _RemoteCache:
    """Stands in for the engine's KVCache: the real rows live in the workers."""

    def __init__(self, num_slots: int, max_seq_len: int, nbytes: int):
        self.num_slots = num_slots
        self.max_seq_len = max_seq_len
        self._nbytes = nbytes

    def nbytes(self) -> int:
        return self._nbytes


class ShardedModel:
    """Model-like proxy over N `ShardWorker` actors, driven by the unchanged `EngineCore`.

    Offers `cfg`, `eval()`, `parameters()` (none here), `moe_layers()` (routed-token counts of
    the last step, summed over workers), `make_cache` (the engine's `kv_cache_factory`) and
    `forward_and_sample(jobs, specs)`: all forwards of one engine step in one Ray call per worker,
    each worker sampling its own rows; and
    `apply_placement` (live re-placement, from another thread while the engine steps).
    """

    def __init__(self, workers: list, cfg, placement: ExpertPlacement, placement_group=None):
        self.workers = workers
        self.cfg = cfg
        self.placement = placement
        self.placement_group = placement_group
        self.num_workers = len(workers)
        num_moe = sum(1 for i in range(cfg.num_layers) if cfg.is_moe_layer(i))
        self._layers = [_LayerStats(cfg.moe.num_experts) for _ in range(num_moe)]
        self.num_ray_calls = 0
        self._pings: list = []
        # The error of the step that broke the group (a worker died or failed mid-collective);
        # from then on every step and health check fails at once (see `forward_jobs`).
        self._broken: BaseException | None = None
        # Placement versions: 0 = the one the workers started with; +1 per applied placement.
        self.placement_version = 0
        # Held while a step's calls (or a placement commit) are sent, so that every worker sees
        # the commit between the same two steps; `_apply_lock`: one re-placement at a time.
        self._send_lock = threading.Lock()
        self._apply_lock = threading.Lock()

    @classmethod
    def launch(
        cls,
        model_path: str,
        ep: int,
        *,
        redundant_experts: list[int] | None = None,
        num_cpus: float = 1.0,
        num_gpus: float = 0.0,
        num_threads: int = 0,
        cpu_kernels: str = "default",
        expert_threads: int = 1,
        memory_per_worker_gb: float = 0.0,
        dtype: str = "fp32",
        timeout_s: float = 300.0,
    ) -> ShardedModel:
        """Starts `ep` shard workers in a SPREAD placement group and joins them into one group.

        Args:
            model_path: HF-format artifact every worker loads (must be readable on every node).
            ep: number of shard workers.
            redundant_experts: logical experts given a second slot (EPLB).
            num_cpus: CPUs per worker (fractions are fine on one machine).
            num_gpus: GPUs per worker; > 0 selects NCCL.
            num_threads: torch threads per worker; 0 = torch's default.
            cpu_kernels: "onednn" packs each worker's fp32 CPU weights (see `raymoe.inference.packed`).
            expert_threads: with "onednn", threads running each worker's experts side by side.
            memory_per_worker_gb: each worker's budget (0 = none): reserved from Ray (`memory`)
                and checked by the worker before it reads a tensor (`raymoe.serve.shard_memory`).
            dtype: "fp32" or "bf16", the same for every worker (their all-to-alls exchange
                activations of it), resolved by the replica (`raymoe.serve.app.engine_precision`).
            timeout_s: how long to wait for the placement group and the workers.

        Raises:
            ConfigError: when the expert slots do not split evenly over `ep`.
        """
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from raymoe.models.hf_io import read_hf_config

        cfg, _ = read_hf_config(model_path)
        placement = ExpertPlacement.with_redundant(cfg.moe.num_experts, ep, list(redundant_experts or []))
        memory = int(memory_per_worker_gb * 1024**3)
        bundle: dict[str, float] = {"CPU": num_cpus}
        if num_gpus > 0:
            bundle["GPU"] = num_gpus
        if memory:
            bundle["memory"] = memory
        # SPREAD: on a cluster the shards land on different nodes when they can (memory of each
        # node holds 1/ep of the experts); on one machine they share it.
        pg = placement_group([dict(bundle) for _ in range(ep)], strategy="SPREAD")
        workers: list = []
        try:
            ray.get(pg.ready(), timeout=timeout_s)
            actor = ray.remote(ShardWorker)
            workers = [
                actor.options(
                    num_cpus=num_cpus,
                    num_gpus=num_gpus,
                    memory=memory or None,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=r),
                ).remote(
                    model_path,
                    r,
                    ep,
                    placement.to_dict(),
                    num_threads,
                    num_gpus > 0,
                    cpu_kernels,
                    expert_threads,
                    memory_per_worker_gb,
                    dtype,
                )
                for r in range(ep)
            ]
            init_method = ray.get(workers[0].rendezvous_address.remote(), timeout=timeout_s)
            ray.get([w.join_group.remote(init_method) for w in workers], timeout=timeout_s)
        except BaseException:
            for w in workers:
                ray.kill(w)
            remove_placement_group(pg)
            raise
        return cls(workers, cfg, placement, pg)

    def eval(self) -> ShardedModel:
        return self

    def parameters(self):
        return iter(())

    def moe_layers(self):
        return iter(self._layers)

    def make_cache(self, cfg, num_slots: int, max_seq_len: int, dtype=None, device=None) -> _RemoteCache:
        """`kv_cache_factory` for `EngineCore`: slot s lives on worker s mod N, as row s // N."""
        import ray

        local = -(-num_slots // self.num_workers)
        nbytes = sum(ray.get([w.make_cache.remote(local, max_seq_len) for w in self.workers]))
        return _RemoteCache(num_slots, max_seq_len, nbytes)

    def forward_and_sample(
        self, jobs: list[ForwardJob], specs: list[list[RowSampling | None]]
    ) -> list[list[RowSample | None]]:
        """Runs one engine step's forwards on the workers, each sampling its own rows.

        Args:
            jobs: the step's forwards (`EngineCore._jobs`).
            specs: per job, per row, how to sample it (None: the row does not sample).

        Returns:
            Per job, per row, the worker's draw (None where the row does not sample). Token ids
            and the log-probabilities asked for cross the object store, not (B, V) logits.

        Raises:
            EngineStoppedError: a worker failed in this step or an earlier one (see below).
        """
        import ray

        if self._broken is not None:
            failed = type(self._broken).__name__
            raise EngineStoppedError(f"shard workers out of service since a step failed ({failed})")

        N = self.num_workers
        per_worker: list[list[ForwardJob | None]] = [[] for _ in range(N)]
        specs_per_worker: list[list[list[RowSampling | None] | None]] = [[] for _ in range(N)]
        row_index: list[list[list[int]]] = [[] for _ in range(N)]
        for job, job_specs in zip(jobs, specs):
            owner_B = job.slot_ids_B % N
            for w in range(N):
                index_b = torch.nonzero(owner_B == w).squeeze(1)
                row_index[w].append(index_b.tolist())
                if index_b.numel() == 0:
                    per_worker[w].append(None)
                    specs_per_worker[w].append(None)
                else:
                    local = job.rows(index_b)
                    local.slot_ids_B = local.slot_ids_B // N
                    per_worker[w].append(local)
                    specs_per_worker[w].append([job_specs[b] for b in row_index[w][-1]])
        with self._send_lock:
            refs = [w.run.remote(per_worker[i], specs_per_worker[i]) for i, w in enumerate(self.workers)]
        try:
            results = ray.get(refs)
        except ray.exceptions.RayError as exc:
            # A worker died (e.g. its node went) or failed inside a collective: the survivors'
            # group is out of step for good. The step's requests get EngineStoppedError (503,
            # retry), later steps fail without calling the workers, and check_health fails so
            # that Serve replaces the replica and its workers.
            self._broken = exc
            raise EngineStoppedError(f"a shard worker failed ({type(exc).__name__})") from exc
        self.num_ray_calls += N
        tokens_LE = sum(tokens for _, tokens in results)
        for layer, tokens_E in zip(self._layers, tokens_LE):
            layer.last_tokens_per_expert_E = tokens_E
        out: list[list[RowSample | None]] = []
        for j, job in enumerate(jobs):
            rows: list[RowSample | None] = [None] * job.ids_BT.shape[0]
            for w, (drawn, _) in enumerate(results):
                if drawn[j] is not None:
                    for b, row in zip(row_index[w][j], drawn[j]):
                        rows[b] = row
            out.append(rows)
        return out

    def apply_placement(self, placement: ExpertPlacement, timeout_s: float = 300.0) -> dict:
        """Switches every worker to `placement` between two engine steps; thread-safe, and the
        engine keeps stepping meanwhile (call it from any thread but the engine's).

        1. Stage: each worker builds the new layer modules beside the running ones, reading only
           the experts it lacks from the artifact (a step on that worker waits for it).
        2. Commit: sent to all workers under the lock that sends each step's calls, so every worker
           runs it after the same step (the one in flight finishes on the old experts) and before
           the next; the old experts are freed there. A failed stage drops the staged modules and
           leaves the running placement as it was.

        Returns:
            `version` (1 for the first re-placement), `loaded` (expert-layers read in all),
            `stage_s` and `seconds` (wall time of the whole switch).

        Raises:
            ConfigError: `placement` does not fit the model's experts or the worker count.
        """
        import ray

        from raymoe.config import require

        require(
            placement.num_experts == self.cfg.moe.num_experts and placement.ep == self.num_workers,
            f"placement (num_experts={placement.num_experts}, ep={placement.ep}) does not fit the "
            f"served model (num_experts={self.cfg.moe.num_experts}) on ep={self.num_workers} workers",
        )
        with self._apply_lock:
            start = time.perf_counter()
            version = self.placement_version + 1
            try:
                staged = ray.get(
                    [w.stage_placement.remote(version, placement.slot_expert) for w in self.workers], timeout=timeout_s
                )
            except BaseException:
                for w in self.workers:
                    w.drop_staged.remote(version)
                raise
            stage_s = time.perf_counter() - start
            with self._send_lock:
                commits = [w.commit_placement.remote(version) for w in self.workers]
                self.placement, self.placement_version = placement, version
            ray.get(commits, timeout=timeout_s)
        return {
            "version": version,
            "loaded": sum(s["loaded"] for s in staged),
            "stage_s": stage_s,
            "seconds": time.perf_counter() - start,
        }

    def check_health(self) -> None:
        """Raises if a worker died or a step broke the group; never waits (a worker busy in a
        step answers next time).

        Pings sent at the previous check are read only once all have answered; a dead actor's
        ping resolves at once with `RayActorError`, which propagates.
        """
        import ray

        if self._broken is not None:
            raise EngineStoppedError("shard workers out of service since a step failed") from self._broken
        if self._pings:
            ready, _ = ray.wait(self._pings, num_returns=len(self._pings), timeout=0)
            if len(ready) < len(self._pings):
                for ref in ready:
                    ray.get(ref)
                return
            ray.get(self._pings)
        self._pings = [w.ping.remote() for w in self.workers]

    def slot_rows(self) -> list[list[list[int]]]:
        """Per worker, per MoE layer, rows computed by each local slot (see which copies work)."""
        import ray

        return ray.get([w.slot_rows.remote() for w in self.workers])

    def shutdown(self) -> None:
        """Stops the workers and frees their placement group."""
        import ray
        from ray.util.placement_group import remove_placement_group

        for w in self.workers:
            ray.kill(w)
        if self.placement_group is not None:
            remove_placement_group(self.placement_group)
            self.placement_group = None
