"""Parallel layout `ep x dp` and expert placement, applied to a built model from outside.

Follows torchtitan's habit of sharding a finished model (the model code does not know about
parallelism) and DeepSeek-V3's placement-as-data idea (EPLB): `logical expert -> [physical slots]`.

Ranks: `rank = dp_rank * ep + ep_rank`. The `ep` ranks of one data-parallel replica are contiguous
(on GPUs they usually share a node, where the all-to-all is cheapest); the `dp` copies of an expert
sit at the same `ep_rank` in every replica.

Legend: E experts (global), E_local experts held by one rank, F expert hidden, D model dim.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from raymoe.config import ConfigError, require


class MoEModel(Protocol):
    """What this package needs of a model (a `raymoe.models.MoETransformer`, which it does not
    import): its config and its MoE layers, each with `experts` and a swappable `dispatcher`."""

    cfg: Any

    def moe_layers(self) -> Iterator[Any]: ...

    def parameters(self, recurse: bool = True) -> Iterator[nn.Parameter]: ...


class StackedExperts(Protocol):
    """Experts stacked in `w_gate_EFD`, `w_up_EFD`, `w_down_EDF` (a `GroupedExperts`)."""

    expert_ids: list[int]


@dataclass(kw_only=True)
class ParallelLayout:
    """How many workers hold distinct experts (`ep`) and how many copies of each exist (`dp`)."""

    # Expert-parallel degree: the routed experts of every MoE layer are split over `ep` ranks.
    ep: int = 1
    # Data-parallel degree: number of full copies of the expert set; world size = ep * dp.
    dp: int = 1

    def __post_init__(self) -> None:
        require(isinstance(self.ep, int) and self.ep >= 1, f"layout.ep must be >= 1, got {self.ep}")
        require(isinstance(self.dp, int) and self.dp >= 1, f"layout.dp must be >= 1, got {self.dp}")

    @property
    def world_size(self) -> int:
        """Number of workers: ep * dp."""
        return self.ep * self.dp

    def validate(self, *, num_experts: int, world_size: int | None = None) -> None:
        """Fails loudly when the layout does not fit the model or the worker count.

        Args:
            num_experts: routed experts per MoE layer (`model.moe.num_experts`).
            world_size: number of workers actually started, if known.

        Raises:
            ConfigError: naming the fields and both numbers.
        """
        require(
            num_experts % self.ep == 0,
            f"layout.ep={self.ep} must divide model.moe.num_experts={num_experts}",
        )
        if world_size is not None:
            require(
                world_size == self.world_size,
                f"num_workers={world_size} must equal layout.ep * layout.dp = "
                f"{self.ep} * {self.dp} = {self.world_size}",
            )

    def ep_rank(self, rank: int) -> int:
        """Position of `rank` inside its expert-parallel group."""
        self._check_rank(rank)
        return rank % self.ep

    def dp_rank(self, rank: int) -> int:
        """Which data-parallel replica `rank` belongs to."""
        self._check_rank(rank)
        return rank // self.ep

    def ep_group_ranks(self, dp_rank: int) -> list[int]:
        """Ranks that together hold one full copy of the experts (they exchange tokens)."""
        return [dp_rank * self.ep + i for i in range(self.ep)]

    def dp_group_ranks(self, ep_rank: int) -> list[int]:
        """Ranks that hold the same experts (their expert gradients are reduced together)."""
        return [d * self.ep + ep_rank for d in range(self.dp)]

    def _check_rank(self, rank: int) -> None:
        if not 0 <= rank < self.world_size:
            raise ConfigError(f"rank {rank} outside 0..{self.world_size - 1} for layout {self}")


@dataclass(kw_only=True)
class ExpertPlacement:
    """Placement as data: which physical slot holds which logical expert, slots split over ranks.

    Training uses one slot per logical expert (`contiguous`); the rebalance pipeline may give hot
    experts extra slots (EPLB) -- routing then picks among a logical expert's slots.
    """

    num_experts: int
    ep: int
    # slot_expert[s] = logical expert held by physical slot s; slots s*k..(s+1)*k-1 live on ep rank s.
    slot_expert: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        require(
            len(self.slot_expert) % self.ep == 0,
            f"placement: {len(self.slot_expert)} slots do not split over layout.ep={self.ep} ranks",
        )
        missing = sorted(set(range(self.num_experts)) - set(self.slot_expert))
        require(not missing, f"placement: logical experts {missing} have no slot")
        bad = [e for e in self.slot_expert if not 0 <= e < self.num_experts]
        require(not bad, f"placement: expert ids {bad} outside 0..{self.num_experts - 1}")

    @classmethod
    def contiguous(cls, num_experts: int, ep: int) -> ExpertPlacement:
        """Experts 0..E/ep-1 on ep rank 0, the next E/ep on rank 1, and so on; no replicas."""
        require(ep >= 1 and num_experts % ep == 0, f"layout.ep={ep} must divide model.moe.num_experts={num_experts}")
        return cls(num_experts=num_experts, ep=ep, slot_expert=list(range(num_experts)))

    @classmethod
    def with_redundant(cls, num_experts: int, ep: int, redundant: list[int]) -> ExpertPlacement:
        """Primaries split as evenly as possible over ranks, plus a second slot for each expert in
        `redundant` (EPLB), put on the rank with most free slots that does not already hold it;
        a copy that only fits beside its original trades places with an expert of another rank.

        With `redundant=[]` and `ep` dividing `num_experts` this equals `contiguous`.

        Raises:
            ConfigError: when the slots do not split evenly, naming both numbers, or on bad ids.
        """
        num_slots = num_experts + len(redundant)
        require(ep >= 1, f"ep must be >= 1, got {ep}")
        require(
            num_slots % ep == 0,
            f"num_experts + len(redundant_experts) = {num_experts} + {len(redundant)} = {num_slots} "
            f"expert slots do not split evenly over ep={ep} ranks",
        )
        bad = [e for e in redundant if not 0 <= e < num_experts]
        require(not bad, f"redundant_experts {bad} outside 0..{num_experts - 1}")
        require(len(set(redundant)) == len(redundant), f"redundant_experts has repeats: {redundant}")
        per_rank = num_slots // ep
        ranks: list[list[int]] = []
        start = 0
        for r in range(ep):
            n = num_experts // ep + (1 if r < num_experts % ep else 0)
            ranks.append(list(range(start, start + n)))
            start += n
        for expert in redundant:
            # Most free slots first, lowest rank on ties: deterministic on every process.
            free = [r for r in range(ep) if len(ranks[r]) < per_rank]
            apart = [r for r in free if expert not in ranks[r]] or free
            target = max(apart, key=lambda r: (per_rank - len(ranks[r]), -r))
            ranks[target].append(expert)
        _separate_copies(ranks)
        return cls(num_experts=num_experts, ep=ep, slot_expert=[e for held in ranks for e in held])

    @property
    def slots_per_rank(self) -> int:
        return len(self.slot_expert) // self.ep

    @property
    def expert_slots(self) -> dict[int, list[int]]:
        """logical expert -> its physical slots."""
        table: dict[int, list[int]] = {e: [] for e in range(self.num_experts)}
        for slot, expert in enumerate(self.slot_expert):
            table[expert].append(slot)
        return table

    def slot_rank(self, slot: int) -> int:
        """The ep rank owning physical slot `slot`."""
        return slot // self.slots_per_rank

    def experts_of(self, ep_rank: int) -> list[int]:
        """Logical expert ids held by `ep_rank`, in local order (local index = position)."""
        k = self.slots_per_rank
        return self.slot_expert[ep_rank * k : (ep_rank + 1) * k]

    def is_one_to_one(self) -> bool:
        """True when every logical expert has exactly one slot (what training supports)."""
        return len(self.slot_expert) == self.num_experts

    def to_dict(self) -> dict[str, Any]:
        return {"num_experts": self.num_experts, "ep": self.ep, "slot_expert": list(self.slot_expert)}


def _separate_copies(ranks: list[list[int]]) -> None:
    """Swaps a second copy sitting on its primary's rank with an expert of another rank, so the
    copies of an expert live on different ranks (a copy beside its original takes no load off it)."""
    for r, held in enumerate(ranks):
        for i, expert in enumerate(held):
            if held.index(expert) == i:
                continue  # first copy on this rank
            for r2, other in enumerate(ranks):
                j = next((j for j, e in enumerate(other) if r2 != r and e not in held and expert not in other), None)
                if j is not None:
                    held[i], other[j] = other[j], expert
                    break


def slice_grouped_experts(experts: StackedExperts, keep: list[int]) -> None:
    """Keeps only the global experts `keep` (in that order) in a `GroupedExperts`, in place.

    Args:
        experts: a module with parameters `w_gate_EFD`, `w_up_EFD`, `w_down_EDF` stacked over the
            experts listed in its `expert_ids` attribute.
        keep: global expert ids to keep; each must currently be held.
    """
    held = list(experts.expert_ids)
    missing = [e for e in keep if e not in held]
    if missing:
        raise ValueError(f"cannot keep experts {missing}: this module holds {held}")
    if list(keep) == held:
        return  # already exactly these (a model built or loaded for this rank)
    # On the meta device (a model built by `build_sharded_model`) this allocates nothing.
    index = torch.tensor([held.index(e) for e in keep], dtype=torch.long)
    for name in ("w_gate_EFD", "w_up_EFD", "w_down_EDF"):
        old = getattr(experts, name)
        # A fresh Parameter (not a view) so the dropped experts' memory is released.
        new = nn.Parameter(old.detach().index_select(0, index.to(old.device)).clone(), requires_grad=old.requires_grad)
        setattr(experts, name, new)
    experts.expert_ids = list(keep)


def keep_placed_experts(model: MoEModel, placement: ExpertPlacement, ep_rank: int = 0) -> None:
    """Slices every MoE layer's experts of `model` to those `placement` puts on `ep_rank`, in
    place (on a meta-device model nothing is allocated). Memory checks weigh rank 0's share:
    every rank of a placement holds as many expert slots."""
    for moe in model.moe_layers():
        slice_grouped_experts(moe.experts, placement.experts_of(ep_rank))


def shard_model_experts(
    model: MoEModel,
    layout: ParallelLayout,
    rank: int,
    *,
    ep_group: Any = None,
    placement: ExpertPlacement | None = None,
    allow_replicas: bool = False,
) -> ExpertPlacement:
    """Shards a built `MoETransformer` for `rank`: keeps its experts, installs the all-to-all.

    Every `GroupedExperts` keeps only the experts placed on this rank's ep position; with ep > 1
    each MoE layer's dispatcher becomes an `AllToAllDispatcher` over `ep_group`. Dense weights
    (attention, shared experts, embeddings, router) stay whole on every rank. Applied to a model
    on the meta device it allocates nothing (then `model.materialize`); applied to a model that
    already holds exactly this rank's experts it only installs the dispatcher.

    Args:
        model: a freshly built model holding all experts.
        layout: the ep x dp layout.
        rank: this worker's global rank.
        ep_group: torch.distributed process group of this rank's ep peers (required if ep > 1).
        placement: expert placement; contiguous when omitted.
        allow_replicas: accept a placement giving some experts several slots (serving; training
            keeps one slot per expert because replicas would need their gradients summed).

    Returns:
        The placement used.
    """
    num_experts = model.cfg.moe.num_experts
    if placement is None or placement.is_one_to_one():
        layout.validate(num_experts=num_experts)
    placement = placement or ExpertPlacement.contiguous(num_experts, layout.ep)
    require(
        placement.ep == layout.ep and placement.num_experts == num_experts,
        f"placement (ep={placement.ep}, num_experts={placement.num_experts}) does not fit "
        f"layout.ep={layout.ep} and model.moe.num_experts={num_experts}",
    )
    require(
        allow_replicas or placement.is_one_to_one(),
        "training supports one slot per expert; redundant expert slots are a serving feature",
    )
    ep_rank = layout.ep_rank(rank)
    keep = placement.experts_of(ep_rank)
    if layout.ep > 1 and ep_group is None:
        raise ValueError(f"layout.ep={layout.ep} > 1 needs an ep_group for rank {rank}")
    for moe in model.moe_layers():
        slice_grouped_experts(moe.experts, keep)
        if layout.ep > 1:
            # Imported here: all_to_all imports this module (ExpertPlacement).
            from raymoe.parallel.all_to_all import AllToAllDispatcher

            moe.dispatcher = AllToAllDispatcher(ep_group, placement=placement, ep_rank=ep_rank)
    return placement
