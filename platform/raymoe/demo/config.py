"""The demo's run configuration (pipelines/configs/demo.debug.yaml).

A stage section names the pipeline config it runs (`config`, the same YAML `python -m
pipelines.<stage>` takes) and dotted `overrides` applied on top; the demo then puts every path of
that config under `work_dir` (see `raymoe.demo.plan`), so a stage's config says what to do and
the demo says where.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from raymoe.config import require
from raymoe.demo.load import LoadConfig


@dataclass(kw_only=True)
class StageConfig:
    """A pipeline's YAML config and dotted overrides applied on top of it."""

    config: str
    overrides: list[str] = field(default_factory=list)


@dataclass(kw_only=True)
class ServeStageConfig(StageConfig):
    """The serve stage: the serve pipeline's config, plus the experts given a second slot."""

    # The experts that got the most tokens in training (train-history.jsonl) each get a second
    # slot (EPLB's redundant experts); num_experts + num_hot_experts must split evenly over app.ep.
    num_hot_experts: int = 2

    def __post_init__(self) -> None:
        require(self.num_hot_experts >= 0, f"serve.num_hot_experts must be >= 0, got {self.num_hot_experts}")


@dataclass(kw_only=True)
class DemoConfig:
    """`python -m pipelines.demo`: every stage of the main job, in order, under one work_dir."""

    # Everything the demo writes goes under this directory; a rerun reuses its finished stages.
    work_dir: str = "runs/demo"
    ingest: StageConfig
    train: StageConfig
    finetune: StageConfig
    federated: StageConfig
    serve: ServeStageConfig
    load: LoadConfig = field(default_factory=LoadConfig)
    drift: StageConfig
    rebalance: StageConfig
    # Asked of the served model (greedy) once the experts were re-placed; shown in the summary.
    prompt: str = "def fibonacci(n):"
    # Tokens of that answer.
    max_tokens: int = 48
    # Print every stage's own output (and Ray's worker lines) instead of a bar per stage; the
    # output goes to <work_dir>/logs/<stage>.log otherwise.
    verbose: bool = False

    def __post_init__(self) -> None:
        require(bool(self.work_dir), "work_dir must be set")
        require(self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
