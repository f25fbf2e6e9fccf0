"""Continuous-batching scheduler: which tokens of which sequences run in the next engine step.

Plain Python, no torch: the engine asks `schedule()` for a `StepPlan`, runs the model over it and
reports the sampled tokens back with `commit()`. Ideas follow vLLM's scheduler (Kwon et al., 2023,
"Efficient Memory Management for LLM Serving with PagedAttention") and Sarathi-Serve's chunked
prefill (Agrawal et al., 2024):

- Iteration-level batching: a request admitted now runs in the very next step; a finished one
  leaves at once and its KV slot and blocks go to the next waiting request.
- A token budget per step. Running decodes go first (one token each), prefills share what is
  left in chunks, so a long prompt is spread over several steps instead of stalling every decode.
- KV memory is a fixed budget of blocks (`block_size` tokens each), handed out by id: a
  sequence holds the blocks its tokens reach (`Sequence.block_ids`, in position order), which the
  engine's paged cache maps its positions to (`raymoe.models.paged_kv_cache`). A fixed number of
  slots bounds how many sequences run at once. A request is admitted only when a slot is free and
  the blocks for its whole prompt can be reserved. When a decode needs a new block and none is
  free, the running sequence admitted last is preempted: its blocks are freed and it goes back to
  the head of the queue; on readmission its prompt *and* the tokens it already produced are
  prefilled again (recompute), so its output continues exactly where it stopped.
"""

from __future__ import annotations

import collections
import enum
import itertools
from dataclasses import dataclass, field

from raymoe.config import require


class QueueFullError(RuntimeError):
    """The waiting queue is at `max_waiting`; the caller should retry later (HTTP 429)."""


class SeqStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(kw_only=True)
class SchedulerConfig:
    """Limits of one engine replica.

    `num_slots` bounds how many sequences run at once, each up to `max_seq_len` tokens long;
    `num_kv_blocks` bounds how many tokens they hold together (0 = enough for every slot to be
    full, in which case preemption never happens).
    """

    num_slots: int = 8
    max_seq_len: int = 256
    # Tokens fed to the model per step (decodes count one each). Must cover every slot decoding.
    max_tokens_per_step: int = 128
    block_size: int = 16
    num_kv_blocks: int = 0
    # Requests allowed to wait for a slot; one more is refused with QueueFullError.
    max_waiting: int = 64

    def __post_init__(self) -> None:
        require(self.num_slots > 0, f"num_slots must be > 0, got {self.num_slots}")
        require(self.max_seq_len > 1, f"max_seq_len must be > 1, got {self.max_seq_len}")
        require(self.block_size > 0, f"block_size must be > 0, got {self.block_size}")
        require(
            self.max_tokens_per_step >= self.num_slots,
            f"max_tokens_per_step={self.max_tokens_per_step} must be >= num_slots="
            f"{self.num_slots} so that every running sequence can decode in one step",
        )
        require(self.num_kv_blocks >= 0, f"num_kv_blocks must be >= 0, got {self.num_kv_blocks}")
        if self.num_kv_blocks == 0:
            self.num_kv_blocks = self.num_slots * self.blocks_for(self.max_seq_len)
        require(
            self.num_kv_blocks >= self.blocks_for(2),
            f"num_kv_blocks={self.num_kv_blocks} cannot hold even one short sequence",
        )
        require(self.max_waiting >= 0, f"max_waiting must be >= 0, got {self.max_waiting}")

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks needed to hold `num_tokens` tokens of KV."""
        return -(-num_tokens // self.block_size)


@dataclass(eq=False)
class Sequence:
    """One request as the scheduler sees it: token ids and where its KV lives."""

    seq_id: str
    prompt_ids: list[int]
    max_new_tokens: int
    output_ids: list[int] = field(default_factory=list)
    status: SeqStatus = SeqStatus.WAITING
    # Tokens of prompt+output whose keys/values are in the cache.
    num_computed: int = 0
    slot: int | None = None
    # The KV blocks holding its tokens, in position order (block i holds positions i*K..i*K+K-1).
    block_ids: list[int] = field(default_factory=list)
    num_preemptions: int = 0
    finish_reason: str | None = None
    arrival: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, stop: int) -> list[int]:
        """Tokens start..stop-1 of prompt + output without joining the two lists, so a decode
        step reads its one token in O(1) instead of copying the whole sequence."""
        p = len(self.prompt_ids)
        if start >= p:
            return self.output_ids[start - p : stop - p]
        if stop <= p:
            return self.prompt_ids[start:stop]
        return self.prompt_ids[start:] + self.output_ids[: stop - p]

    @property
    def num_blocks(self) -> int:
        return len(self.block_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def held_slot(self) -> int:
        """The KV-cache row of a running sequence (only a running sequence holds one)."""
        if self.slot is None:
            raise RuntimeError(f"sequence {self.seq_id} holds no KV slot (status {self.status.name})")
        return self.slot


@dataclass
class ScheduledChunk:
    """Tokens of one sequence fed in one step, at positions start .. start+len-1 of its slot."""

    seq: Sequence
    slot: int
    start: int
    token_ids: list[int]

    @property
    def samples(self) -> bool:
        """Whether the logits after this chunk give the sequence's next token."""
        return self.start + len(self.token_ids) == self.seq.num_tokens

    @property
    def is_decode(self) -> bool:
        return len(self.token_ids) == 1 and self.samples and self.start > 0


@dataclass
class StepPlan:
    """What to run in one step: decode rows, prefill chunks, and who was pushed out to make room."""

    decodes: list[ScheduledChunk]
    prefills: list[ScheduledChunk]
    preempted: list[Sequence]

    @property
    def num_tokens(self) -> int:
        return len(self.decodes) + sum(len(c.token_ids) for c in self.prefills)

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class Scheduler:
    """Admission, chunked prefill, decode batching and preemption over a fixed KV budget."""

    def __init__(self, config: SchedulerConfig):
        self.config = config
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []  # in admission order; the last is preempted first
        self.free_slots: list[int] = list(range(config.num_slots))[::-1]
        # Popped from the end: a freed block is the next one handed out (still in cache lines).
        self.free_block_ids: list[int] = list(range(config.num_kv_blocks))[::-1]
        self._seqs: dict[str, Sequence] = {}
        self._arrivals = itertools.count()

    # -- requests in and out --------------------------------------------------------------------
    def add(self, seq_id: str, prompt_ids: list[int], max_new_tokens: int) -> Sequence:
        """Queues a request; it can run from the next `schedule()` on.

        Raises:
            ValueError: the request can never run here (too long, empty, duplicate id).
            QueueFullError: `max_waiting` requests are already waiting.
        """
        cfg = self.config
        if seq_id in self._seqs:
            raise ValueError(f"seq_id {seq_id!r} is already scheduled")
        if not prompt_ids:
            raise ValueError("prompt_ids must not be empty")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        total = len(prompt_ids) + max_new_tokens
        if total > cfg.max_seq_len:
            raise ValueError(
                f"prompt ({len(prompt_ids)} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
                f"exceeds max_seq_len={cfg.max_seq_len}"
            )
        if cfg.blocks_for(total) > cfg.num_kv_blocks:
            raise ValueError(f"request needs {cfg.blocks_for(total)} KV blocks, the budget is {cfg.num_kv_blocks}")
        if len(self.waiting) >= cfg.max_waiting:
            raise QueueFullError(f"{len(self.waiting)} requests waiting (max_waiting)")
        seq = Sequence(
            seq_id=seq_id,
            prompt_ids=list(prompt_ids),
            max_new_tokens=max_new_tokens,
            arrival=next(self._arrivals),
        )
        self._seqs[seq_id] = seq
        self.waiting.append(seq)
        return seq

    def finish(self, seq_id: str, reason: str) -> Sequence | None:
        """Ends a sequence (stop token, stop string, client gone) and frees its slot and blocks."""
        seq = self._seqs.pop(seq_id, None)
        if seq is None:
            return None
        if seq.status is SeqStatus.RUNNING:
            self._release(seq)
            self.running.remove(seq)
        elif seq.status is SeqStatus.WAITING:
            self.waiting.remove(seq)
        seq.status = SeqStatus.FINISHED
        seq.finish_reason = reason
        return seq

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    # -- one step -------------------------------------------------------------------------------
    def schedule(self) -> StepPlan:
        """Plans the next step: decodes first, then prefill chunks, then admissions."""
        cfg = self.config
        budget = cfg.max_tokens_per_step
        preempted: list[Sequence] = []
        decodes: list[ScheduledChunk] = []

        # Running sequences that have all their tokens computed but one decode.
        for seq in list(self.running):
            if seq.status is not SeqStatus.RUNNING or seq.num_computed != seq.num_tokens - 1:
                continue
            # The token fed now occupies position num_computed; it may need a fresh block.
            while seq.status is SeqStatus.RUNNING and cfg.blocks_for(seq.num_tokens) > seq.num_blocks:
                if self.free_block_ids:
                    seq.block_ids.append(self.free_block_ids.pop())
                    continue
                victim = self.running[-1]
                self._preempt(victim)
                preempted.append(victim)
                decodes = [c for c in decodes if c.seq is not victim]
            if seq.status is SeqStatus.RUNNING:
                decodes.append(ScheduledChunk(seq, seq.held_slot, seq.num_computed, seq.token_ids[-1:]))
        budget -= len(decodes)

        # Running sequences still prefilling (their prompt blocks were reserved at admission).
        prefills: list[ScheduledChunk] = []
        for seq in self.running:
            if budget <= 0:
                break
            if seq.num_computed < seq.num_tokens - 1:
                prefills.append(self._chunk(seq, budget))
                budget -= len(prefills[-1].token_ids)

        # Admit waiting sequences (FIFO, so a preempted sequence at the head goes first) while a
        # slot, the blocks for their known tokens plus one, and some budget remain.
        while self.waiting and budget > 0 and self.free_slots:
            seq = self.waiting[0]
            if seq in preempted:
                break  # pushed out this very step: let the others finish decoding first
            need = cfg.blocks_for(seq.num_tokens + 1)
            if need > self.free_blocks:
                break
            self.waiting.popleft()
            seq.status = SeqStatus.RUNNING
            seq.slot = self.free_slots.pop()
            seq.block_ids = [self.free_block_ids.pop() for _ in range(need)]
            seq.num_computed = 0
            self.running.append(seq)
            prefills.append(self._chunk(seq, budget))
            budget -= len(prefills[-1].token_ids)
        return StepPlan(decodes=decodes, prefills=prefills, preempted=preempted)

    def commit(self, plan: StepPlan, sampled: dict[str, int]) -> list[Sequence]:
        """Records a step's results.

        Args:
            plan: the plan returned by the last `schedule()`.
            sampled: next token per seq_id, for every chunk whose `samples` is true.

        Returns:
            Sequences that finished by length (max_new_tokens or max_seq_len reached); they have
            left the batch already.
        """
        finished = []
        for chunk in plan.decodes + plan.prefills:
            seq = chunk.seq
            if seq.status is not SeqStatus.RUNNING:
                continue  # finished by the engine meanwhile
            seq.num_computed = chunk.start + len(chunk.token_ids)
            if seq.num_computed == seq.num_tokens:
                seq.output_ids.append(sampled[seq.seq_id])
                if len(seq.output_ids) >= seq.max_new_tokens or seq.num_tokens >= self.config.max_seq_len:
                    self.finish(seq.seq_id, "length")
                    finished.append(seq)
        return finished

    # -- bookkeeping ----------------------------------------------------------------------------
    @property
    def free_blocks(self) -> int:
        return len(self.free_block_ids)

    def _chunk(self, seq: Sequence, budget: int) -> ScheduledChunk:
        n = min(seq.num_tokens - seq.num_computed, budget)
        start = seq.num_computed
        return ScheduledChunk(seq, seq.held_slot, start, seq.token_slice(start, start + n))

    def _release(self, seq: Sequence) -> None:
        self.free_block_ids.extend(reversed(seq.block_ids))
        seq.block_ids = []
        self.free_slots.append(seq.held_slot)
        seq.slot = None

    def _preempt(self, seq: Sequence) -> None:
        self._release(seq)
        self.running.remove(seq)
        seq.status = SeqStatus.WAITING
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)

    def stats(self) -> dict[str, float]:
        """Gauges for metrics: running / waiting sequences and the KV budget in use (0..1)."""
        cfg = self.config
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_usage": 1.0 - self.free_blocks / cfg.num_kv_blocks,
        }
