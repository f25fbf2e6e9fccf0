"""LoRA fine-tuning job configuration: base artifact, SFT data, adapter shape, layout, optimiser.

Checked in the driver before any worker starts: the config itself in `__post_init__` (sizes,
layout against the base's expert count) and the filesystem in `check_before_launch` (the base
artifact and the data files exist).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from raymoe.config import ConfigError, require, require_at_least, require_resource, same_path, to_dict
from raymoe.data.sft import SFTDataConfig
from raymoe.models.lora import LoRAConfig
from raymoe.parallel.layout import ParallelLayout
from raymoe.train.config import OptimConfig


def _finetune_optim() -> OptimConfig:
    # LoRA's usual settings (peft examples, Hu et al. 2021): a larger lr than full training, no
    # weight decay on the adapter, a short warmup.
    return OptimConfig(lr=2e-3, warmup_steps=10, weight_decay=0.0, min_lr_ratio=0.1)


@dataclass(kw_only=True)
class FinetuneConfig:
    """A LoRA fine-tuning run; YAML at pipelines/configs/finetune.*.yaml."""

    name: str = "finetune"
    # HF-format artifact to adapt (`raymoe export` output); its tokenizer's chat template renders
    # the records.
    base: str
    # The one path where a small random-weight debug base may be written (debug configs only):
    # when `base` is this path and holds no artifact, the job writes one there first. Any other
    # `base` must hold an artifact already. "" = never write one.
    debug_base: str = ""
    # Training records (JSONL); data.max_seq_len bounds prompt + answer tokens.
    data: SFTDataConfig
    # Held-out records for the before/after evaluation (loss and exact match); empty = none.
    eval_path: str = ""
    # Greedy tokens generated per held-out example for exact match.
    eval_max_new_tokens: int = 24
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    layout: ParallelLayout = field(default_factory=ParallelLayout)
    optim: OptimConfig = field(default_factory=_finetune_optim)
    steps: int
    # Examples per optimizer step over all workers.
    global_batch_size: int = 8
    seed: int = 0
    # adapter/ (peft format), metrics.json, quarantine/ and, with merge, merged/ go here.
    output_dir: str
    # Also write a merged HF artifact (base weights + adapter) to output_dir/merged.
    merge: bool = False
    num_cpus_per_worker: float = 1.0
    num_threads_per_worker: int = 1
    log_every: int = 10
    # Ray Train's own run storage (results, error files).
    storage_path: str = "runs/ray-train"

    def __post_init__(self) -> None:
        require(self.steps >= 1, f"steps must be >= 1, got {self.steps}")
        require(self.global_batch_size >= 1, f"global_batch_size must be >= 1, got {self.global_batch_size}")
        require(
            self.global_batch_size % self.layout.world_size == 0,
            f"global_batch_size={self.global_batch_size} must be divisible by the world size "
            f"layout.ep * layout.dp = {self.layout.world_size}",
        )
        require(bool(self.base), "base must be set (an HF-format artifact directory)")
        require_resource("num_cpus_per_worker", self.num_cpus_per_worker)
        require(self.num_cpus_per_worker > 0, f"num_cpus_per_worker must be > 0, got {self.num_cpus_per_worker}")
        require_at_least("", self, eval_max_new_tokens=1, num_threads_per_worker=1, log_every=1)
        require(bool(self.output_dir), "output_dir must be set")

    @property
    def writes_debug_base(self) -> bool:
        """True when `base` is the debug config's own `debug_base` path."""
        return bool(self.debug_base) and same_path(self.base, self.debug_base)

    @property
    def adapter_dir(self) -> str:
        return os.path.join(self.output_dir, "adapter")

    def to_dict(self) -> dict:
        return to_dict(self)


def check_lora_fits(model_cfg, lora: LoRAConfig) -> None:
    """The adapter's targets exist in the base (checked on a meta-device model: no weights)."""
    import torch

    from raymoe.models import MoETransformer
    from raymoe.models.lora import check_lora_targets

    with torch.device("meta"):
        model = MoETransformer(model_cfg)
    check_lora_targets(model, lora)


def check_before_launch(cfg: FinetuneConfig) -> None:
    """Checks what needs the filesystem: the base artifact, the data files, the layout vs experts.

    Raises:
        ConfigError: naming the key and its value.
    """
    from raymoe.artifact_check import check_artifact
    from raymoe.models import read_hf_config

    base = Path(cfg.base)
    if (base / "config.json").is_file() or not cfg.writes_debug_base:
        check_artifact("base", cfg.base)
        model_cfg, _ = read_hf_config(base)
        try:
            cfg.layout.validate(num_experts=model_cfg.moe.num_experts)
        except ConfigError as exc:
            raise ConfigError(f"layout does not fit base={cfg.base!r}: {exc}") from None
        check_lora_fits(model_cfg, cfg.lora)
    for key, path in (("data.path", cfg.data.path), ("eval_path", cfg.eval_path)):
        if path and not Path(path).is_file():
            raise ConfigError(f"{key}={path!r} is not a file")
