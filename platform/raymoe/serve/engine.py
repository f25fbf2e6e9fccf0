"""The serving engine: continuous batching over `MoETransformer` + `PagedKVCache`.

`EngineCore.step()` asks the scheduler for a plan, turns it into forward jobs (the decode batch,
prompt chunks), runs them in one pass over the weights (`raymoe.inference.forward_jobs`), samples
with per-request settings (`raymoe.serve.sampling`) and reports one `TokenEvent` per sampled
token. Requests with `record_features` (sampled for the traffic windows) also get the chosen
token's log-probability on every event and the pooled prompt embedding on the first.
`raymoe.serve.local_engine.LocalEngine` runs `EngineCore` in a thread of its own (which can also
load the model) and gives each request an async stream; `raymoe.serve.engine_process.
ProcessEngine` does the same with the core in a child process. Either is the `Engine` the Serve
deployment holds.

Shapes: B batch rows, T tokens of a chunk, V vocabulary, E experts, D model dim.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass
from typing import Protocol

import torch

from raymoe.config import require, require_at_least
from raymoe.cpu_allocator import keep_freed_memory
from raymoe.inference.forward_jobs import ForwardJob, run_forward_jobs
from raymoe.serve.request import (
    EngineOverloadedError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    TokenEvent,
)
from raymoe.serve.sampling import RowSampling, make_generator, sample_rows
from raymoe.serve.scheduler import QueueFullError, Scheduler, SchedulerConfig, StepPlan

log = logging.getLogger(__name__)


class Engine(Protocol):
    """What the HTTP layer needs from an engine (the real one or a fake in tests)."""

    max_seq_len: int

    def generate(self, request: GenerationRequest) -> AsyncGenerator[TokenEvent, None]:
        """Streams the tokens of one request; raises InvalidRequestError / EngineOverloadedError
        from the first iteration when the request cannot be taken."""
        ...

    def stats(self) -> dict[str, float]: ...

    def expert_counts(self) -> torch.Tensor:
        """Tokens routed to each expert of each MoE layer since start, (layers, experts)."""
        ...

    def close(self) -> None:
        """Stops what runs the engine (the replica is going away)."""
        ...


@dataclass(kw_only=True)
class EngineConfig:
    """Engine knobs; the scheduler's limits plus where and how the model runs."""

    # Sequences running at once (rows of the block table: a slot has no KV memory of its own).
    num_slots: int = 8
    # 0 = the model's max_seq_len.
    max_seq_len: int = 0
    max_tokens_per_step: int = 128
    # KV memory: num_kv_blocks blocks of block_size positions, handed to sequences as they grow;
    # 0 = enough for every slot to hold max_seq_len tokens. With ep > 1 the shard workers keep
    # full slot rows and the blocks only bound admission.
    block_size: int = 16
    num_kv_blocks: int = 0
    max_waiting: int = 64
    # torch intra-op threads of the engine thread; 0 = leave torch's setting.
    num_threads: int = 0
    # fp32 matmuls on CPU: "onednn" packs the weights once for oneDNN (`raymoe.inference.packed`,
    # 1.5-2.5x faster decode than PyTorch's default MKL path on the benchmark model);
    # "default" leaves PyTorch's kernels. Ignored on GPU and for INT8 weights.
    cpu_kernels: str = "onednn"
    # Packed fp32 (cpu_kernels onednn) or INT8 weights: threads that run a MoE layer's experts side
    # by side, and decode attention over long contexts, each with one torch thread
    # (`raymoe.inference.cpu_threads`); 1 = the engine thread alone.
    expert_threads: int = 1
    # ep=1: run the engine in a child process of the replica (`raymoe.serve.engine_process`),
    # off the GIL that the replica's event loop and Ray Serve's threads hold; false = a thread.
    own_process: bool = True
    # With own_process: the engine process's niceness (0-19, higher = lower CPU priority). On a
    # machine where the engine's steps take every core, the HTTP side (Serve's proxy, the
    # replica's event loop) then gets a core the moment it has work, so a refusal or a first
    # token is not queued behind steps; the engine takes back what the HTTP side leaves idle.
    process_nice: int = 10

    def __post_init__(self) -> None:
        # What the replica's SchedulerConfig will check, checked before anything starts.
        require_at_least(
            "engine",
            self,
            num_slots=1,
            max_tokens_per_step=1,
            block_size=1,
            num_kv_blocks=0,
            max_waiting=0,
            num_threads=0,
            expert_threads=1,
            max_seq_len=0,
            process_nice=0,
        )
        require(self.process_nice <= 19, f"engine.process_nice must be in 0..19, got {self.process_nice}")
        require(self.max_seq_len != 1, "engine.max_seq_len must be 0 (the model's) or >= 2, got 1")
        require(
            self.max_tokens_per_step >= self.num_slots,
            f"engine.max_tokens_per_step={self.max_tokens_per_step} must be >= engine.num_slots="
            f"{self.num_slots} so that every running sequence can decode in one step",
        )
        require(
            self.num_kv_blocks == 0 or self.num_kv_blocks * self.block_size >= 2,
            f"engine.num_kv_blocks={self.num_kv_blocks} of engine.block_size={self.block_size} tokens "
            "cannot hold even one short sequence (2 tokens)",
        )
        require(
            self.cpu_kernels in ("onednn", "default"),
            f"engine.cpu_kernels must be 'onednn' or 'default', got {self.cpu_kernels!r}",
        )

    def scheduler_config(self, model_max_seq_len: int) -> SchedulerConfig:
        return SchedulerConfig(
            num_slots=self.num_slots,
            max_seq_len=min(self.max_seq_len or model_max_seq_len, model_max_seq_len),
            max_tokens_per_step=self.max_tokens_per_step,
            block_size=self.block_size,
            num_kv_blocks=self.num_kv_blocks,
            max_waiting=self.max_waiting,
        )


def padding_groups(chunks: list, max_waste: float = 0.5) -> list[list]:
    """Groups chunks (longest first) so that padding adds at most `max_waste` of the real tokens."""
    groups: list[list] = []
    for chunk in sorted(chunks, key=lambda c: -len(c.token_ids)):
        if groups:
            group = groups[-1]
            padded = len(group[0].token_ids) * (len(group) + 1)
            real = sum(len(c.token_ids) for c in group) + len(chunk.token_ids)
            if padded <= (1 + max_waste) * real:
                group.append(chunk)
                continue
        groups.append([chunk])
    return groups


@dataclass
class _RequestState:
    request: GenerationRequest
    generator: torch.Generator


class EngineCore:
    """Synchronous engine: one `step()` = schedule, forward, sample, commit.

    Thread-safe for `add_request` / `abort` from another thread while `step()` runs: the
    scheduler is touched only under a lock, and never during the forward pass.
    """

    def __init__(self, model, config: EngineConfig, kv_cache_factory=None):
        from raymoe.models.paged_kv_cache import PagedKVCache

        self.model = model.eval()
        self.config = config
        self.sched_config = config.scheduler_config(model.cfg.max_seq_len)
        self.max_seq_len = self.sched_config.max_seq_len
        self.scheduler = Scheduler(self.sched_config)
        # The engine follows the model: tensors, cache and generators live where its weights do.
        first = next(model.parameters(), torch.empty(0))
        self.device = first.device
        if self.device.type == "cpu":
            keep_freed_memory()  # activations of a step reuse freed heap blocks (no page faults)
        # INT8 models keep fp32 activations (their packed weights are not parameters).
        dtype = first.dtype if first.is_floating_point() else torch.float32
        if kv_cache_factory is None:
            # KV memory is the scheduler's block budget, whatever the number of slots.
            self.cache = PagedKVCache(
                model.cfg,
                self.sched_config.num_slots,
                self.max_seq_len,
                num_blocks=self.sched_config.num_kv_blocks,
                block_size=self.sched_config.block_size,
                dtype=dtype,
                device=self.device,
            )
        else:
            self.cache = kv_cache_factory(
                model.cfg, self.sched_config.num_slots, self.max_seq_len, dtype=dtype, device=self.device
            )
        # Whether the cache maps positions to the scheduler's blocks (a slot-row cache, such as the
        # shard workers', reserves full rows and ignores them).
        self._paged = hasattr(self.cache, "assign")
        self._lock = threading.Lock()
        self._requests: dict[str, _RequestState] = {}
        # Per step: requests whose pooled prompt embedding is taken, and those embeddings.
        self._embed: set[str] = set()
        self._embeddings: dict[str, list[float]] = {}
        self.num_steps = 0
        self.last_batch_size = 0
        self.num_generated = 0
        self.num_preemptions = 0
        # Threads that run a MoE layer's experts side by side (`engine.expert_threads`; see
        # `_step_threads`). The expert-parallel `ShardedModel` is no module: its experts run in
        # the shard workers.
        modules = model.modules() if isinstance(model, torch.nn.Module) else ()
        self._shared_threads = max((getattr(m, "num_shared_threads", 1) for m in modules), default=1)
        num_moe = sum(1 for _ in model.moe_layers())
        # Tokens routed to each expert of each MoE layer since start (metrics).
        self.tokens_per_expert_LE = torch.zeros(num_moe, model.cfg.moe.num_experts, dtype=torch.long)

    def add_request(self, request: GenerationRequest) -> None:
        """Queues a request; it runs from the next step on."""
        if request.adapter is not None and request.adapter not in self._adapter_names():
            raise InvalidRequestError(f"adapter {request.adapter!r} is not loaded", "model")
        vocab = self.model.cfg.vocab_size
        bad = [t for t in request.prompt_ids if not 0 <= t < vocab]
        if bad:
            raise InvalidRequestError(f"prompt token id {bad[0]} outside vocabulary 0..{vocab - 1}", "prompt")
        p = request.params
        with self._lock:
            try:
                self.scheduler.add(request.request_id, request.prompt_ids, p.max_tokens)
            except QueueFullError as exc:
                raise EngineOverloadedError(str(exc)) from None
            except ValueError as exc:
                raise InvalidRequestError(str(exc), "max_tokens") from None
            self._requests[request.request_id] = _RequestState(request, make_generator(p.seed, self.device))

    def _adapter_names(self) -> set[str]:
        context = getattr(self.model, "lora_context", None)
        return context.names if context is not None else set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self.scheduler.finish(request_id, "abort")
            self._requests.pop(request_id, None)

    def abort_all(self) -> list[str]:
        """Aborts every request (after a failed step); returns their ids."""
        with self._lock:
            request_ids = list(self._requests)
            for rid in request_ids:
                self.scheduler.finish(rid, "abort")
            self._requests.clear()
        return request_ids

    def has_work(self) -> bool:
        with self._lock:
            return self.scheduler.has_work()

    def step(self) -> list[tuple[str, TokenEvent]]:
        """Runs one engine step; returns (request_id, event) for every token sampled in it."""
        with self._lock:
            plan = self.scheduler.schedule()
            states = {c.seq.seq_id: self._requests[c.seq.seq_id] for c in plan.decodes + plan.prefills}
            self._adapter_of = {rid: s.request.adapter for rid, s in states.items()}
            # Recorded requests about to sample their first token (decodes never do).
            self._embed = {
                c.seq.seq_id
                for c in plan.prefills
                if c.samples and not c.seq.output_ids and states[c.seq.seq_id].request.record_features
            }
            self._embeddings = {}
            if self._paged:  # block lists change only in schedule(), under this lock
                for c in plan.decodes + plan.prefills:
                    self.cache.assign(c.slot, c.seq.block_ids)
        if plan.empty:
            return []
        self.num_preemptions += len(plan.preempted)
        if hasattr(self.model, "forward_and_sample"):
            rows, picked = self._forward_and_sample(plan, states)
        else:
            with self._step_threads(plan):
                rows, logits_RV = self._forward(plan)
                specs = [_row_sampling(states[c.seq.seq_id]) for c in rows]
                picked = sample_rows(logits_RV, specs) if rows else []
        params = [states[c.seq.seq_id].request.params for c in rows]
        record = [states[c.seq.seq_id].request.record_features for c in rows]
        tokens = [p.token for p in picked]
        with self._lock:
            sampled = {c.seq.seq_id: t for c, t in zip(rows, tokens)}
            finished = {s.seq_id for s in self.scheduler.commit(plan, sampled)}
            events = []
            for i, (chunk, token) in enumerate(zip(rows, tokens)):
                rid = chunk.seq.seq_id
                if rid not in self._requests:
                    continue  # aborted while the step ran
                p = params[i]
                reason: FinishReason | None = None
                if token in p.stop_token_ids:
                    reason = "stop"
                    self.scheduler.finish(rid, "stop")
                elif rid in finished:
                    reason = "length"
                event = TokenEvent(
                    token_id=token,
                    logprob=None if p.logprobs is None else picked[i].logprob,
                    top_logprobs=picked[i].top_logprobs,
                    finish_reason=reason,
                    num_prompt_tokens=len(chunk.seq.prompt_ids),
                    chosen_logprob=picked[i].logprob if record[i] else None,
                    embedding=self._embeddings.get(rid),
                )
                events.append((rid, event))
                if reason:
                    self._requests.pop(rid, None)
        self.num_steps += 1
        self.last_batch_size = len(plan.decodes) + len(plan.prefills)
        self.num_generated += len(events)
        return events

    @contextlib.contextmanager
    def _step_threads(self, plan: StepPlan) -> Iterator[None]:
        """A one-row decode step on the engine thread's torch threads plus the idle expert threads.

        With `expert_threads` > 1 a step's experts run on the shared threads, and a torch thread
        team beside them would contend for the same cores (measured on a 2-core Xeon at 8 and 32
        rows: 10-25% slower with 2 torch threads). One row reaches two experts, which run on the
        engine thread alone (`ExpertsOnThreads`), so the cores the expert threads hold sit idle:
        that step's GEMMs (q/k/v, LM head) and attention take them as torch threads instead
        (measured: 66 -> 104 tokens/s at batch 1 on the same Xeon).
        """
        base = torch.get_num_threads()
        one_row = not plan.prefills and len(plan.decodes) == 1
        if self._shared_threads <= 1 or not one_row or self.device.type != "cpu":
            yield
            return
        torch.set_num_threads(base + self._shared_threads - 1)
        try:
            yield
        finally:
            torch.set_num_threads(base)

    def _forward_and_sample(self, plan: StepPlan, states: dict[str, _RequestState]):
        """Expert-parallel steps: each shard worker samples its own rows, so token ids cross the
        object store instead of (B, V) logits. Returns the rows that sample and their draws; a
        drawn-from generator comes back advanced and replaces the request's."""
        groups, jobs = self._jobs(plan)
        specs = [[_row_sampling(states[c.seq.seq_id]) if c.samples else None for c in group] for group in groups]
        results = self.model.forward_and_sample(jobs, specs)
        self._count_experts()
        rows, picked = [], []
        for group, job_results in zip(groups, results):
            for chunk, result in zip(group, job_results):
                if result is None:
                    continue
                if result.generator is not None:
                    states[chunk.seq.seq_id].generator = result.generator
                rows.append(chunk)
                picked.append(result)
        return rows, picked

    @torch.inference_mode()
    def _forward(self, plan: StepPlan):
        """Runs the step's forwards (`_jobs`) in one pass; returns the rows that sample and their
        logits (R, V), and keeps the pooled embeddings of the step's `_embed` requests in `_embeddings`
        (by request id). (The expert-parallel `ShardedModel` keeps no hidden states, so it has no
        embeddings: see `_forward_and_sample`.)"""
        groups, jobs = self._jobs(plan)
        embed = self._embed
        adapters = None
        if hasattr(self.model, "lora_context"):
            adapters = [[self._adapter_of[c.seq.seq_id] for c in group] for group in groups]
        outputs = run_forward_jobs(self.model, jobs, self.cache, adapters, keep_hidden=bool(embed))
        hidden_ND = self.model.last_hidden_ND
        self._count_experts()
        rows, sampled_N = [], []
        for n, chunk in enumerate(c for group in groups for c in group):
            sampled_N.append(chunk.samples)  # always true for decodes
            if chunk.samples:
                rows.append(chunk)
                if hidden_ND is not None and chunk.seq.seq_id in embed:
                    self._embeddings[chunk.seq.seq_id] = hidden_ND[n].float().tolist()
        # The sampling rows' logits as one (R, V) tensor; a decode-only step's are all of them
        # (no copy of 32 x V floats to unbind and stack again).
        logits_NV = outputs[0] if len(outputs) == 1 else torch.cat(outputs) if outputs else None
        if logits_NV is not None and not all(sampled_N):
            logits_NV = logits_NV[torch.tensor(sampled_N, device=logits_NV.device)]
        return rows, logits_NV

    def _jobs(self, plan: StepPlan) -> tuple[list[list], list[ForwardJob]]:
        """The step's forwards: all decodes as one batch; prompt chunks starting at position 0
        right-padded into groups (plain causal attention; pad keys are overwritten before any
        query reads them); other chunks alone. Returns the chunks of each job and the jobs."""
        groups: list[list] = []
        jobs: list[ForwardJob] = []
        if plan.decodes:
            # In slot order: when the slots are a contiguous range the cache is read as a slice
            # instead of gathered row by row (`CacheView`).
            decodes = sorted(plan.decodes, key=lambda c: c.slot)
            groups.append(decodes)
            jobs.append(
                ForwardJob(
                    ids_BT=self._tensor([c.token_ids[0] for c in decodes])[:, None],
                    positions_BT=self._tensor([c.start for c in decodes])[:, None],
                    slot_ids_B=self._tensor([c.slot for c in decodes]),
                    last_B=torch.zeros(len(decodes), dtype=torch.long, device=self.device),
                )
            )
        # With capacity-limited routing pad tokens would compete for expert capacity.
        batchable = self.model.cfg.moe.capacity_factor is None
        fresh = [c for c in plan.prefills if c.start == 0] if batchable else []
        for group in padding_groups(fresh) + [[c] for c in plan.prefills if c not in fresh]:
            T = max(len(c.token_ids) for c in group)
            ids_BT = torch.zeros(len(group), T, dtype=torch.long)
            for b, c in enumerate(group):
                ids_BT[b, : len(c.token_ids)] = torch.tensor(c.token_ids, dtype=torch.long)
            positions_BT = torch.stack([torch.arange(c.start, c.start + T) for c in group])
            groups.append(group)
            jobs.append(
                ForwardJob(
                    ids_BT=ids_BT.to(self.device),
                    positions_BT=positions_BT.to(self.device),
                    slot_ids_B=self._tensor([c.slot for c in group]),
                    last_B=self._tensor([len(c.token_ids) - 1 for c in group]),
                )
            )
        return groups, jobs

    def _tensor(self, values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _count_experts(self) -> None:
        for i, moe in enumerate(self.model.moe_layers()):
            self.tokens_per_expert_LE[i] += moe.last_tokens_per_expert_E.cpu()

    def stats(self) -> dict[str, float]:
        with self._lock:
            s = self.scheduler.stats()
        s.update(
            batch_size=self.last_batch_size,
            steps=self.num_steps,
            generated_tokens=self.num_generated,
            preemptions=self.num_preemptions,
        )
        return s


def _row_sampling(state: _RequestState) -> RowSampling:
    params = state.request.params
    generator = state.generator if params.temperature > 0 else None
    return RowSampling(params, generator, state.request.record_features)


def step_or_fail(core: EngineCore) -> list[tuple[str, TokenEvent | BaseException]]:
    """One step's (request id, event) pairs; a failed step fails the requests in it (each gets
    the error), not the server."""
    try:
        return list(core.step())
    except Exception as exc:
        log.exception("engine step failed; failing its requests")
        return [(rid, exc) for rid in core.abort_all()]


def generate_alone(model, prompt_ids: list[int], params: SamplingParams, max_seq_len: int = 0) -> list[int]:
    """Reference path: one request through an engine of its own, step by step (tests, bench)."""
    config = EngineConfig(num_slots=1, max_seq_len=max_seq_len, max_tokens_per_step=max(1, len(prompt_ids)))
    core = EngineCore(model, config)
    core.add_request(GenerationRequest(request_id="alone", prompt_ids=prompt_ids, params=params))
    out: list[int] = []
    while core.has_work():
        out.extend(e.token_id for _, e in core.step())
    return out
