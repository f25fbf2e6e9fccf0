"""torch.distributed process groups for an `ep x dp` layout, from a 2-D `DeviceMesh`.

The mesh has shape (dp, ep) with dimensions named "dp" and "ep"; row-major rank order gives
`rank = dp_rank * ep + ep_rank`, the layout's own numbering. `init_device_mesh` creates every
group on every rank (group creation is collective); each rank keeps the two it belongs to.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist

from raymoe.parallel.layout import ParallelLayout


@dataclass
class ParallelGroups:
    """This rank's view of the layout: its position and its two process groups."""

    layout: ParallelLayout
    rank: int
    # Ranks sharing one copy of the expert set; tokens are exchanged inside it (None if ep == 1).
    ep_group: dist.ProcessGroup | None
    # Ranks holding the same experts; expert gradients are reduced inside it (None if dp == 1).
    dp_group: dist.ProcessGroup | None

    @property
    def ep_rank(self) -> int:
        return self.layout.ep_rank(self.rank)

    @property
    def dp_rank(self) -> int:
        return self.layout.dp_rank(self.rank)

    @property
    def world_size(self) -> int:
        return self.layout.world_size

    @property
    def distributed(self) -> bool:
        return self.layout.world_size > 1


def build_groups(layout: ParallelLayout) -> ParallelGroups:
    """Creates the ep and dp groups of `layout`; call on every rank after `init_process_group`.

    Without an initialised process group (a single process), returns groups of None for 1 x 1.
    """
    if not dist.is_initialized():
        layout.validate(num_experts=layout.ep, world_size=1)
        return ParallelGroups(layout=layout, rank=0, ep_group=None, dp_group=None)
    rank = dist.get_rank()
    world = dist.get_world_size()
    if world != layout.world_size:
        raise ValueError(
            f"world size {world} must equal layout.ep * layout.dp = {layout.ep} * {layout.dp} = {layout.world_size}"
        )
    from torch.distributed.device_mesh import init_device_mesh

    device_type = "cuda" if dist.get_backend() == "nccl" else "cpu"
    mesh = init_device_mesh(device_type, (layout.dp, layout.ep), mesh_dim_names=("dp", "ep"))
    ep_group = mesh.get_group("ep") if layout.ep > 1 else None
    dp_group = mesh.get_group("dp") if layout.dp > 1 else None
    return ParallelGroups(layout=layout, rank=rank, ep_group=ep_group, dp_group=dp_group)
