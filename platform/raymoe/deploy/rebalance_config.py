"""Re-placement job configuration (`python -m pipelines.rebalance`): where the expert load comes
from, how the placement is computed, and whether and where it is applied.

Checked before anything starts: the config itself in `__post_init__` (errors name the dotted key),
the filesystem (windows, trace, artifact, running placement) in `check_before_launch`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from raymoe.config import require, require_at_least, same_path
from raymoe.monitor.drift_job_config import DebugTrafficConfig


@dataclass(kw_only=True)
class WindowsSourceConfig:
    """The serving app's traffic windows (`app.traffic.output_dir`): expert load per window."""

    dir: str = ""
    # The newest this-many window files, summed; 0 = every window in dir.
    latest: int = 0

    def __post_init__(self) -> None:
        require(self.latest >= 0, f"windows.latest must be >= 0, got {self.latest}")


@dataclass(kw_only=True)
class PrometheusSourceConfig:
    """`increase(ray_raymoe_serve_tokens_per_expert_total[window])` from Prometheus' HTTP API."""

    url: str = ""
    # A PromQL duration: the load of the last hour by default.
    window: str = "1h"
    # The served model's `model` label; "" = every model's counters summed.
    model: str = ""
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        require(
            bool(self.window) and self.window[-1] in "smhdwy" and self.window[:-1].isdigit(),
            f"prometheus.window must be a PromQL duration like 15m or 1h, got {self.window!r}",
        )
        require(self.timeout_s > 0, f"prometheus.timeout_s must be > 0, got {self.timeout_s}")


@dataclass(kw_only=True)
class TraceSourceConfig:
    """A recorded load trace (`.npy` (T, L, E), `.jsonl`, or a windows directory)."""

    path: str = ""
    # Sum only the last this-many steps; 0 = all.
    last_steps: int = 0

    def __post_init__(self) -> None:
        require(self.last_steps >= 0, f"trace.last_steps must be >= 0, got {self.last_steps}")


@dataclass(kw_only=True)
class PlacementPolicyConfig:
    """How the new placement is computed (`raymoe.deploy.eplb`)."""

    # Expert-parallel workers of the app; 0 = the running placement's (from the app or `current`).
    num_workers: int = 0
    # Redundant slots (copies beyond one per expert); -1 = as many as the running placement has.
    num_redundant_experts: int = -1
    policy: Literal["auto", "hierarchical", "global"] = "auto"
    # Nodes the workers sit on (hierarchical policy); groups: 0 = the model's moe.num_groups.
    num_nodes: int = 1
    num_groups: int = 0
    # The running placement as a placement.json (its `serving` entry); "" = ask the app when
    # apply.enabled, else none (a fresh placement).
    current: str = ""
    # Start from the running placement and move as few experts as reach target_imbalance.
    migration_aware: bool = True
    target_imbalance: float = 1.1
    min_gain_per_move: float = 0.0

    def __post_init__(self) -> None:
        require(self.num_workers >= 0, f"placement.num_workers must be >= 0, got {self.num_workers}")
        require(
            self.num_redundant_experts >= -1,
            f"placement.num_redundant_experts must be >= -1, got {self.num_redundant_experts}",
        )
        require(self.num_nodes >= 1, f"placement.num_nodes must be >= 1, got {self.num_nodes}")
        require(self.num_groups >= 0, f"placement.num_groups must be >= 0, got {self.num_groups}")
        require(self.target_imbalance >= 1.0, f"placement.target_imbalance must be >= 1.0, got {self.target_imbalance}")
        require(self.min_gain_per_move >= 0, f"placement.min_gain_per_move must be >= 0, got {self.min_gain_per_move}")


@dataclass(kw_only=True)
class ApplyConfig:
    """Applying the placement to a running Serve app (`raymoe.serve.live_placement.apply_to_app`),
    joining the Ray cluster at RAY_ADDRESS (or the cluster this job was submitted to)."""

    enabled: bool = False
    # The Serve application and deployment (`pipelines.serve` app_name, `ServeConfig.name`).
    app_name: str = "raymoe"
    deployment: str = "OpenAIServer"
    timeout_s: float = 300.0
    # Handle calls before giving up on reaching every replica; 0 = 8 x the running replicas.
    max_calls: int = 0

    def __post_init__(self) -> None:
        require(bool(self.app_name), "apply.app_name must name the Serve application")
        require(bool(self.deployment), "apply.deployment must name the deployment")
        require(self.timeout_s > 0, f"apply.timeout_s must be > 0, got {self.timeout_s}")
        require(self.max_calls >= 0, f"apply.max_calls must be >= 0, got {self.max_calls}")


@dataclass(kw_only=True)
class RebalanceJobConfig:
    """`python -m pipelines.rebalance`: load in, placement.json out, optionally applied live."""

    name: str = "rebalance"
    # placement.json, placement.md (before/after table) and rebalance-history.jsonl go here.
    output_dir: str
    source: Literal["windows", "prometheus", "trace"] = "windows"
    windows: WindowsSourceConfig = field(default_factory=WindowsSourceConfig)
    prometheus: PrometheusSourceConfig = field(default_factory=PrometheusSourceConfig)
    trace: TraceSourceConfig = field(default_factory=TraceSourceConfig)
    # The served artifact: its expert count and groups check the load; "" = taken from the load.
    model_path: str = ""
    # Debug configs only: when windows.dir is debug_traffic.dir and holds no window, write two
    # windows there first by serving debug_traffic.artifact in-process (written there if
    # missing), as the drift job's debug config does. Any other windows.dir: nothing is written.
    debug_traffic: DebugTrafficConfig | None = None
    placement: PlacementPolicyConfig = field(default_factory=PlacementPolicyConfig)
    apply: ApplyConfig = field(default_factory=ApplyConfig)
    # > 0: run again every interval_s seconds (re-placement on a schedule); 0 = once.
    interval_s: float = 0.0

    @property
    def writes_debug_traffic(self) -> bool:
        """True when the load comes from windows.dir and it is the debug config's debug_traffic.dir."""
        return (
            self.source == "windows"
            and self.debug_traffic is not None
            and self.debug_traffic.applies_to(self.windows.dir)
        )

    def __post_init__(self) -> None:
        require(bool(self.output_dir), "output_dir must be set")
        require_at_least("", self, interval_s=0)
        needs = {
            "windows": ("windows.dir", self.windows.dir),
            "prometheus": ("prometheus.url", self.prometheus.url),
            "trace": ("trace.path", self.trace.path),
        }[self.source]
        require(bool(needs[1]), f"{needs[0]} must be set when source is {self.source!r}")
        require(
            self.apply.enabled or self.placement.num_workers > 0 or bool(self.placement.current),
            "placement.num_workers must be > 0 (or placement.current set) when apply.enabled is false: "
            "there is no app to ask for its layout",
        )


def check_before_launch(cfg: RebalanceJobConfig) -> None:
    """Checks what the job will read exists (after the debug windows, if any, are written).

    Raises:
        ConfigError: naming the key and the path.
    """
    from raymoe.monitor.traffic_windows import list_windows

    has_windows = Path(cfg.windows.dir).is_dir() and bool(list_windows(cfg.windows.dir))
    # Debug windows still to be written: the job writes them (and the artifact), then checks again.
    pending = cfg.writes_debug_traffic and not has_windows
    if cfg.source == "windows" and not pending:
        require(has_windows, f"windows.dir {cfg.windows.dir!r} holds no traffic windows (window-*.parquet)")
    if cfg.source == "trace":
        require(Path(cfg.trace.path).exists(), f"trace.path {cfg.trace.path!r} does not exist")
    debug = cfg.debug_traffic
    if cfg.model_path and not (pending and debug is not None and same_path(cfg.model_path, debug.artifact)):
        require(
            (Path(cfg.model_path) / "config.json").is_file(),
            f"model_path {cfg.model_path!r} has no config.json (an HF-format artifact directory)",
        )
    if cfg.placement.current:
        require(Path(cfg.placement.current).is_file(), f"placement.current {cfg.placement.current!r} does not exist")
