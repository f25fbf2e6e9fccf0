"""A silo's client: local LoRA training on data that never leaves the silo.

`SiloClient` runs as a Ray actor pinned to the silo's nodes (the server places it with the silo's
custom resource). It opens only its own `data_path`, trains the adapter it is sent for the round's
local steps (the fine-tuning step, plus FedProx's proximal term when asked) and returns adapter
tensors, its example count and the tokens it routed to each expert, and a few scalars. Never a
record, a token id or a text: `SiloResult` is the whole of what leaves, and the server checks it.

With privacy on, the returned update is the clipped delta (plus this silo's share of the noise
under secure aggregation); with secure aggregation it is a masked uint64 vector that only the sum
over all participants unmasks.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch

from raymoe.data.chat_tokenizer import ChatTokenizer
from raymoe.data.sft import SFTBatches, load_sft_examples
from raymoe.federated.privacy import NoiseMode, privatize_update
from raymoe.federated.secure_aggregation import SiloKeys, mask_vector
from raymoe.federated.strategies import FitInstructions, weighted_numerators
from raymoe.federated.updates import ClientUpdate, flatten
from raymoe.models.lora import LoRAConfig
from raymoe.parallel.groups import build_groups
from raymoe.parallel.layout import ParallelLayout
from raymoe.train.adapter_trainer import AdapterTrainer
from raymoe.train.config import OptimConfig
from raymoe.train.finetune_worker import answer_tokens, pad_token_id, sft_micro_batch


@dataclass
class SiloResult:
    """Everything a silo returns for one round.

    Exactly one of `params` (plain mode: the adapter after local training) and `masked` (secure
    aggregation: this silo's masked share of the sums) is set.
    """

    silo: str
    num_examples: int
    tokens_per_expert_LE: torch.Tensor  # int64 (num_layers, E)
    params: dict[str, torch.Tensor] | None = None
    masked: np.ndarray | None = None  # uint64
    metrics: dict[str, float] = field(default_factory=dict)

    def as_update(self) -> ClientUpdate:
        assert self.params is not None
        return ClientUpdate(
            silo=self.silo,
            params=self.params,
            num_examples=self.num_examples,
            tokens_per_expert_LE=self.tokens_per_expert_LE,
            metrics=self.metrics,
        )


@dataclass
class PrivacyInstructions:
    """DP settings of one round, sent with the fit instructions."""

    clip_norm: float
    noise_multiplier: float
    mode: NoiseMode  # "central" (server adds noise) or "distributed" (each silo adds its share)
    num_participants: int


def secret_generator() -> torch.Generator:
    """A generator seeded from the OS's entropy: DP noise must be unknown to the server and to
    other silos (a seed derived from the config would let anyone subtract it), so DP runs are
    not bit-reproducible."""
    return torch.Generator().manual_seed(int.from_bytes(os.urandom(8), "little") >> 1)


class SiloClient:
    """Local trainer of one silo (wrap with `ray.remote` to place it on the silo's node)."""

    def __init__(
        self,
        name: str,
        data_path: str,
        base: str,
        lora: dict,
        optim: dict,
        max_seq_len: int,
        batch_size: int,
        seed: int,
        num_threads: int,
        reset_optimizer: bool = True,
    ):
        from raymoe.config import from_dict

        torch.set_num_threads(num_threads)
        self.name = name
        self.seed = seed
        self.batch_size = batch_size
        self.reset_optimizer = reset_optimizer
        self.trainer = AdapterTrainer(
            base, from_dict(LoRAConfig, lora), from_dict(OptimConfig, optim), build_groups(ParallelLayout()), seed=seed
        )
        tokenizer = ChatTokenizer.from_dir(base)
        self.pad = pad_token_id(tokenizer)
        self.examples, quarantined = load_sft_examples(data_path, tokenizer, max_seq_len, "left")
        self.num_quarantined = len(quarantined)
        if len(self.examples) < batch_size:
            raise ValueError(
                f"silo {name}: {len(self.examples)} usable records at {data_path!r}, "
                f"fewer than local_batch_size={batch_size}"
            )
        self.batches = SFTBatches(self.examples, batch_size, seed, pad_id=self.pad)
        self.keys: dict[int, SiloKeys] = {}
        self.moe_layer_ids = [i for i, layer in enumerate(self.trainer.model.layers) if hasattr(layer.ffn, "router")]

    def describe(self) -> dict:
        """Node id and counts (no data): where the actor runs and how much it holds."""
        import ray

        return {
            "silo": self.name,
            "node_id": ray.get_runtime_context().get_node_id(),
            "examples": len(self.examples),
            "quarantined": self.num_quarantined,
        }

    def public_key(self, round: int) -> bytes:
        """This round's X25519 public key (a fresh key pair every round, never reused)."""
        self.keys = {round: SiloKeys.generate()}
        return self.keys[round].public_bytes

    def fit(
        self,
        instructions: FitInstructions,
        privacy: PrivacyInstructions | None = None,
        peer_keys: dict[str, bytes] | None = None,
        moe_aware: bool = False,
        frac_bits: int = 24,
    ) -> SiloResult:
        """Trains the global adapter `instructions.params` locally and returns the update."""
        started = time.perf_counter()
        trainer = self.trainer
        trainer.load_tensors(instructions.params)
        if self.reset_optimizer:
            trainer.reset_optimizer()
        global_params = {k: v.detach().clone() for k, v in instructions.params.items()}
        # The adapter's parameters right after loading the global one: FedProx's anchor.
        anchors = [p.detach().clone() for p in trainer.params]
        mu = instructions.proximal_mu

        def proximal() -> torch.Tensor:
            # FedProx (Li et al. 2020): (mu / 2) * ||w - w_global||^2 over the adapter.
            return 0.5 * mu * torch.stack([(p - a).pow(2).sum() for p, a in zip(trainer.params, anchors)]).sum()

        counts_LE = torch.zeros(len(trainer.model.layers), trainer.model.cfg.moe.num_experts, dtype=torch.long)
        losses = []
        first = (instructions.round - 1) * instructions.local_steps
        for step in range(instructions.local_steps):
            examples = [self.examples[i] for i in self.batches.indices(first + step)]
            stepped = trainer.step(
                [sft_micro_batch(examples, self.pad)],
                lr=instructions.lr,
                global_target_counts=[answer_tokens(examples)],
                extra_loss=proximal if mu > 0 else None,
            )
            losses.append(stepped.loss)
            counts_LE[self.moe_layer_ids] += stepped.tokens_per_expert_LE
        params = {k: v.detach().clone() for k, v in trainer.local_tensors().items()}
        # FedAvg's n_k (McMahan et al. 2017): the size of the silo's training set.
        num_examples = len(self.examples)
        metrics = {"train_seconds": time.perf_counter() - started}
        if privacy is None and peer_keys is None:
            metrics["loss"] = float(np.mean(losses))
        # Under secure aggregation the counts travel inside the masked sum only; in clear they
        # would show the server this silo's routing.
        hidden = peer_keys is not None
        result = SiloResult(
            silo=self.name,
            num_examples=0 if hidden else num_examples,
            tokens_per_expert_LE=torch.zeros_like(counts_LE) if hidden else counts_LE,
            metrics=metrics,
        )
        if privacy is not None:
            # DP-FedAvg: the clipped delta (+ this silo's noise share when the server cannot add it).
            delta = flatten(params) - flatten(global_params)
            noisy, norm = privatize_update(
                delta,
                mode=privacy.mode,
                noise_multiplier=privacy.noise_multiplier,
                clip_norm=privacy.clip_norm,
                num_participants=privacy.num_participants,
                generator=secret_generator(),
            )
            del norm  # a silo's own norm is not published under DP
            vector = noisy.to(torch.float64)
            if peer_keys is None:
                result.params = {"delta": vector}
                return result
        elif peer_keys is not None:
            update = ClientUpdate(
                silo=self.name, params=params, num_examples=num_examples, tokens_per_expert_LE=counts_LE
            )
            numerators, weights = weighted_numerators(update, moe_aware)
            vector = torch.cat([flatten(numerators), flatten(weights)])
        else:
            result.params = params
            return result
        if not torch.isfinite(vector).all():
            raise FloatingPointError(f"silo {self.name}: non-finite update; not sent")
        result.masked = mask_vector(
            vector.numpy(),
            self.name,
            self.keys[instructions.round].private_key,
            peer_keys,
            instructions.round,
            frac_bits,
        )
        return result
