"""Fleet specs for capacity planning: one YAML file per GPU node type, every number cited there.

`load_fleet("h800")` reads the shipped `fleets/h800.yaml`; `load_fleet("cpu")` measures this
machine's CPU as a one-device "node" (`deploy.cpu_fleet`); any other argument is taken as a path
to a file of the same form. Numbers are datasheet peaks (dense, i.e. without 2:4 sparsity);
the efficiencies a real kernel reaches are `RooflineConfig` fields, not fleet properties.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from raymoe.config import load_config, require

FLEETS: tuple[str, ...] = ("h100-80g", "h800", "h200")


@dataclass(kw_only=True)
class FleetSpec:
    """One node type: its GPUs and the links between them."""

    name: str
    gpu: str
    # HBM per GPU in GB (1e9 bytes), as the datasheet states it.
    memory_gb: float
    # Dense tensor-core peak per GPU in TFLOP/s, by operand type ("bf16", "fp8", "fp32"); a
    # dtype a plan needs and the fleet lacks fails naming it.
    peak_tflops: dict[str, float]
    # HBM bandwidth per GPU in TB/s.
    hbm_tb_per_s: float
    gpus_per_node: int
    # One direction, per GPU: NVLink inside a node, the GPU's NIC between nodes (GB/s).
    intra_node_gb_per_s: float
    inter_node_gb_per_s: float

    def __post_init__(self) -> None:
        for key in ("memory_gb", "hbm_tb_per_s", "intra_node_gb_per_s", "inter_node_gb_per_s"):
            value = getattr(self, key)
            require(value > 0, f"fleet {self.name}: {key} must be > 0, got {value}")
        require(self.gpus_per_node >= 1, f"fleet {self.name}: gpus_per_node must be >= 1, got {self.gpus_per_node}")
        require(bool(self.peak_tflops), f"fleet {self.name}: peak_tflops needs at least one dtype (bf16, fp8, fp32)")
        require(
            all(v > 0 for v in self.peak_tflops.values()),
            f"fleet {self.name}: peak_tflops values must be > 0, got {self.peak_tflops}",
        )

    def peak_flops(self, dtype: str) -> float:
        """Dense peak in FLOP/s for operands of `dtype`."""
        if dtype not in self.peak_tflops:
            raise ValueError(f"fleet {self.name} has no peak for dtype {dtype!r}; known: {sorted(self.peak_tflops)}")
        return self.peak_tflops[dtype] * 1e12


def load_fleet(name_or_path: str | Path) -> FleetSpec:
    """A shipped fleet by name (see FLEETS), `cpu` (this machine, measured now: see
    `deploy.cpu_fleet`), or a fleet YAML file by path."""
    if str(name_or_path) == "cpu":
        from raymoe.deploy.cpu_fleet import measure_cpu_fleet

        return measure_cpu_fleet()
    if str(name_or_path) in FLEETS:
        ref = resources.files("raymoe.deploy") / "fleets" / f"{name_or_path}.yaml"
        with resources.as_file(ref) as path:
            return load_config(FleetSpec, path)
    path = Path(name_or_path)
    if not path.is_file():
        raise ValueError(f"fleet {str(name_or_path)!r}: not a shipped fleet {list(FLEETS)}, 'cpu', nor a file")
    return load_config(FleetSpec, path)
