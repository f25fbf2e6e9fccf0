"""LoRA training on a frozen artifact: one object that fine-tuning workers and silo clients share.

`AdapterTrainer` loads the base artifact, keeps this rank's experts (ep x dp layout, like
pre-training), adds the trainable adapter (`raymoe.models.lora.add_trainable_lora`) and steps it
with the pre-training step (`raymoe.train.step.train_step`: masked cross-entropy, gradient sync
over the layout, global-norm clipping) with the base router's balance bias left alone. Only the
adapter is trained and only the adapter leaves: `adapter_tensors` gathers the expert adapters
of every ep rank (small: r x (in + out) per expert and matrix).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist

from raymoe.models import load_hf, read_hf_config
from raymoe.models.lora import LoRAConfig, add_trainable_lora, lora_state, set_lora_state
from raymoe.parallel.groups import ParallelGroups
from raymoe.parallel.layout import ExpertPlacement, shard_model_experts
from raymoe.train.config import OptimConfig
from raymoe.train.step import StepResult, train_step


class AdapterTrainer:
    """A frozen base model with a trainable LoRA adapter on this rank.

    Args:
        base_dir: HF-format artifact (`raymoe export` output or any supported checkpoint).
        lora: which layers get adapters, rank and alpha.
        optim: AdamW settings (lr is set per step by the caller's schedule).
        groups: this rank's process groups (`build_groups(layout)`; single-process is fine).
        seed: adapter initialisation seed (same on every rank).
    """

    def __init__(self, base_dir: str, lora: LoRAConfig, optim: OptimConfig, groups: ParallelGroups, seed: int):
        self.groups = groups
        if groups.layout.ep > 1:
            # Read and allocate only this rank's experts, then install the all-to-all.
            num_experts = read_hf_config(base_dir)[0].moe.num_experts
            held = ExpertPlacement.contiguous(num_experts, groups.layout.ep).experts_of(groups.ep_rank)
            self.model = load_hf(base_dir, expert_ids=held)
            shard_model_experts(self.model, groups.layout, groups.rank, ep_group=groups.ep_group)
        else:
            self.model = load_hf(base_dir)
        self.params = add_trainable_lora(self.model, lora, seed=seed)
        self.model.train()
        # LoRA adapters are not decayed towards zero by default (peft + transformers' Trainer
        # decay them like any weight; OptimConfig.weight_decay says how much).
        self.optimizer = torch.optim.AdamW(
            self.params, lr=optim.lr, betas=(optim.beta1, optim.beta2), eps=optim.eps, weight_decay=optim.weight_decay
        )
        self.clip_norm = optim.clip_norm

    def step(
        self,
        micro_batches: list[tuple[torch.Tensor, ...]],
        lr: float,
        global_target_counts: list[int],
        extra_loss: Callable[[], torch.Tensor] | None = None,
    ) -> StepResult:
        """One optimizer step of the adapter over this rank's micro-batches.

        Args:
            micro_batches: [(input_ids_BT, targets_BT, real_BT)] this rank's share of each.
            lr: learning rate of this step.
            global_target_counts: answer tokens of each whole micro-batch (all ranks); the loss
                is their mean, whatever the layout.
            extra_loss: added to the loss (FedProx's proximal term).
        """
        return train_step(
            self.model,
            self.optimizer,
            micro_batches,
            groups=self.groups,
            lr=lr,
            clip_norm=self.clip_norm,
            update_bias=False,
            extra_loss=extra_loss,
            global_target_counts=global_target_counts,
        )

    def local_tensors(self) -> dict[str, torch.Tensor]:
        """This rank's adapter as peft-named tensors (live views: clone before keeping them)."""
        return lora_state(self.model)

    def load_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Sets the adapter (e.g. the global adapter of a federated round)."""
        set_lora_state(self.model, tensors)

    def reset_optimizer(self) -> None:
        """Forgets Adam's moments (each federated round starts local training afresh)."""
        self.optimizer.state.clear()

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """The whole adapter: dense pairs from this rank, expert pairs gathered from every rank.

        A collective when distributed: every rank must call it.
        """
        local = {k: v.detach().cpu().clone() for k, v in self.local_tensors().items()}
        if not self.groups.distributed:
            return local
        gathered: list[dict[str, torch.Tensor] | None] = [None] * self.groups.world_size
        dist.all_gather_object(gathered, local)
        merged: dict[str, torch.Tensor] = {}
        for part in gathered:
            merged.update(part or {})
        return merged
