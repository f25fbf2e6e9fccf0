"""The per-worker LoRA fine-tuning program, independent of Ray: load, shard, adapt, step, save.

Runs under any initialised torch.distributed group (Ray Train's) or in one process. Every worker
reads the (small) SFT file itself, in the same layout-independent order as pre-training's
batches; rank 0 writes the adapter, gathered from every expert shard, in peft's format.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from raymoe.data.chat_tokenizer import ChatTokenizer
from raymoe.data.sft import SFTBatches, SFTExample, collate, load_sft_examples
from raymoe.models.lora import write_peft_adapter
from raymoe.parallel.groups import build_groups
from raymoe.train.adapter_trainer import AdapterTrainer
from raymoe.train.finetune_config import FinetuneConfig
from raymoe.train.schedule import lr_at


@dataclass
class FinetuneSummary:
    """What one worker's run did."""

    losses: list[float] = field(default_factory=list)
    tokens: int = 0  # non-padding input tokens, all workers
    seconds: float = 0.0


def sft_micro_batch(examples: list[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids_BT, targets_BT, real_BT): `collate` plus the mask of non-padding inputs."""
    input_ids_BT, targets_BT = collate(examples, pad_id)
    lengths_B = torch.tensor([len(e.input_ids) - 1 for e in examples])
    real_BT = torch.arange(input_ids_BT.shape[1])[None, :] < lengths_B[:, None]
    return input_ids_BT, targets_BT, real_BT


def answer_tokens(examples: list[SFTExample]) -> int:
    """Targets that carry loss in a micro-batch of these examples (labels after the first token)."""
    return sum(sum(label != -100 for label in e.labels[1:]) for e in examples)


def pad_token_id(tokenizer: ChatTokenizer) -> int:
    # Padding positions carry no loss and count in no statistic; any valid id will do.
    return tokenizer.stop_token_ids[0] if tokenizer.stop_token_ids else 0


def run_finetune_worker(cfg: FinetuneConfig, report: Callable[[dict[str, Any]], None] | None = None) -> FinetuneSummary:
    """Trains the adapter for `cfg.steps` steps; rank 0 writes it to `cfg.adapter_dir`."""
    torch.set_num_threads(cfg.num_threads_per_worker)
    groups = build_groups(cfg.layout)
    trainer = AdapterTrainer(cfg.base, cfg.lora, cfg.optim, groups, seed=cfg.seed)
    tokenizer = ChatTokenizer.from_dir(cfg.base)
    examples, _ = load_sft_examples(cfg.data.path, tokenizer, cfg.data.max_seq_len, cfg.data.truncation)
    pad = pad_token_id(tokenizer)
    # Every worker draws the whole micro-batch (its answer tokens normalise the loss) and trains
    # on its contiguous share, as SFTBatches(world_size, rank) would slice it.
    batches = SFTBatches(examples, cfg.global_batch_size, cfg.seed, pad_id=pad)
    local = cfg.global_batch_size // groups.world_size
    summary = FinetuneSummary()
    start = window_start = time.perf_counter()
    window_tokens = 0
    for step in range(cfg.steps):
        whole = [examples[i] for i in batches.indices(step)]
        micro = sft_micro_batch(whole[groups.rank * local : (groups.rank + 1) * local], pad)
        result = trainer.step(
            [micro], lr=lr_at(step, cfg.optim, cfg.steps), global_target_counts=[answer_tokens(whole)]
        )
        summary.losses.append(result.loss)
        window_tokens += sum(len(e.input_ids) - 1 for e in whole)
        done = step + 1
        if report is not None and (done % cfg.log_every == 0 or done == cfg.steps):
            now = time.perf_counter()
            report(
                {
                    "step": done,
                    "loss": result.loss,
                    "grad_norm": result.grad_norm,
                    "lr": result.lr,
                    "tokens_per_s": window_tokens / max(now - window_start, 1e-9),
                    "rank": groups.rank,
                }
            )
            summary.tokens += window_tokens
            window_start, window_tokens = now, 0
    summary.seconds = time.perf_counter() - start
    tensors = trainer.adapter_tensors()  # collective: every rank takes part
    if groups.rank == 0:
        write_peft_adapter(cfg.adapter_dir, cfg.lora, tensors, extra_config={"base_model_name_or_path": cfg.base})
    return summary
