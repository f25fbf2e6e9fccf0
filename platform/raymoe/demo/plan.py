"""Every stage's config, loaded, put under work_dir and checked before Ray starts.

A stage's config is its pipeline's YAML with the stage's overrides, then the demo's own overrides
(the paths, and what ties the stages together: training reads what ingest wrote, fine-tuning,
federated and serving take the exported model, drift and re-placement read the load's windows and
re-place the running app). Everything that can be checked before anything ran is checked here, so
a user error ends the demo with one `config error:` line before Ray starts: each stage's config
and inputs, training's sequence length against ingest's rows, the tokenizer against the model's
vocabulary, the adapters' targets and layouts against the model that training will export, and
the hot expert slots against the serving layout.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raymoe.config import ConfigError, load_config, require, to_dict
from raymoe.demo.config import DemoConfig, StageConfig


@dataclass(frozen=True)
class DemoPaths:
    """Where each stage writes, all absolute, under the work directory."""

    work: Path

    def __getattr__(self, name: str) -> Path:  # only for names in LAYOUT
        try:
            return self.work / LAYOUT[name]
        except KeyError:
            raise AttributeError(name) from None


# Stage outputs under work_dir, by name.
LAYOUT = {
    "data": "data",
    "manifest": "data/manifest.json",
    "checkpoints": "checkpoints",
    "model": "model",
    "history": "train-history.jsonl",
    "ray_train": "ray-train",
    "finetune": "finetune",
    "finetune_adapter": "finetune/adapter",
    "federated": "federated",
    "federated_adapter": "federated/adapter",
    "traffic": "traffic",
    "windows": "load/windows",
    "drift": "drift",
    "drift_report": "drift/report.html",
    "rebalance": "rebalance",
    "placement": "rebalance/placement.json",
    "report": "report",
    "dashboards": "dashboards",
    "logs": "logs",
    "summary": "demo-summary.json",
}


@dataclass
class DemoPlan:
    """The demo's config and each stage's effective config."""

    cfg: DemoConfig
    paths: DemoPaths
    ingest: Any  # IngestConfig
    train: Any  # TrainConfig
    finetune: Any  # FinetuneConfig
    federated: Any  # FederatedConfig
    serve: Any  # ServeJobConfig (app.redundant_experts is chosen after training)
    drift: Any  # DriftJobConfig
    rebalance: Any  # RebalanceJobConfig

    @property
    def load(self):
        return self.cfg.load

    @property
    def num_experts(self) -> int:
        return self.train.model_config().moe.num_experts

    def stage_config(self, stage: str) -> Any:
        """The plain data a stage's marker hash covers (its config, or what the stage is told)."""
        if stage == "export":
            return {"checkpoints": str(self.paths.checkpoints), "model": str(self.paths.model)}
        if stage == "serve":  # what is served and how its traffic is sampled, not where it listens
            return {"app": to_dict(self.serve.app), "num_hot_experts": self.cfg.serve.num_hot_experts}
        if stage == "load":
            return to_dict(self.cfg.load)
        if stage in ("report", "dashboards"):
            return {"out": str(getattr(self.paths, stage))}
        return to_dict(getattr(self, stage))


def _stage(name: str, stage: StageConfig, cls: type, overrides: list[str], check=None):
    """A stage's config (and `check` of it); a ConfigError names the stage and its file."""
    try:
        stage_cfg: Any = load_config(cls, stage.config, [*stage.overrides, *overrides])
        if check is not None:
            check(stage_cfg)
        return stage_cfg
    except ConfigError as exc:
        raise ConfigError(f"{name} stage ({stage.config}): {exc}") from None


def _files_exist(*keyed: tuple[str, str]) -> None:
    for key, path in keyed:
        if path and not os.path.isfile(path):
            raise ConfigError(f"{key}={path!r} is not a file")


def _adapter_fits(model_cfg, lora, layout=None) -> None:
    """The adapter's targets (and the fine-tuning layout) fit the model training will export."""
    from raymoe.train.finetune_config import check_lora_fits

    if layout is not None:
        layout.validate(num_experts=model_cfg.moe.num_experts)
    check_lora_fits(model_cfg, lora)


def load_plan(cfg: DemoConfig) -> DemoPlan:
    """Loads and checks every stage's config (see the module docstring).

    Raises:
        ConfigError: naming the stage, its config file, the key and the value.
    """
    from raymoe.data.ingest_config import IngestConfig
    from raymoe.data.ingest_config import check_before_launch as check_ingest
    from raymoe.deploy.rebalance_config import RebalanceJobConfig
    from raymoe.federated.config import FederatedConfig
    from raymoe.monitor.drift_job_config import DriftJobConfig
    from raymoe.serve.serve_config import ServeJobConfig, read_api_key
    from raymoe.train.config import TrainConfig
    from raymoe.train.finetune_config import FinetuneConfig

    p = DemoPaths(Path(cfg.work_dir).resolve())
    ingest = _stage("ingest", cfg.ingest, IngestConfig, [f"output_dir={p.data}"], check=check_ingest)
    train = _stage(
        "train",
        cfg.train,
        TrainConfig,
        [
            f"data.path={p.data}",
            f"checkpoint.uri={p.checkpoints}",
            f"storage_path={p.ray_train}",
            f"history_path={p.history}",
            "name=demo",
        ],
    )
    # Training reads what ingest writes: checked now, not after the ingest stage ran.
    require(
        train.data.seq_len == ingest.pack.seq_len,
        f"train stage data.seq_len={train.data.seq_len} != ingest stage pack.seq_len={ingest.pack.seq_len}: "
        "training reads rows of data.seq_len + 1 tokens",
    )
    model_cfg = train.model_config()
    require(
        ingest.tokenizer.vocab_size <= model_cfg.vocab_size,
        f"ingest stage tokenizer.vocab_size={ingest.tokenizer.vocab_size} exceeds the train stage's "
        f"model.vocab_size={model_cfg.vocab_size}",
    )

    # Fine-tuning and federated both adapt the exported model (no debug base is ever written).
    def check_finetune(c) -> None:
        _files_exist(("data.path", c.data.path), ("eval_path", c.eval_path))
        _adapter_fits(model_cfg, c.lora, c.layout)

    def check_federated(c) -> None:
        local = not os.environ.get("RAY_ADDRESS")  # on a cluster the silos' files are on their nodes
        _files_exist(
            ("eval_path", c.eval_path),
            *((f"silos[{i}].data_path", s.data_path) for i, s in enumerate(c.silos) if local),
        )
        _adapter_fits(model_cfg, c.lora)

    finetune = _stage(
        "finetune",
        cfg.finetune,
        FinetuneConfig,
        [
            f"base={p.model}",
            "debug_base=",
            f"output_dir={p.finetune}",
            f"storage_path={p.ray_train}",
            "name=demo-finetune",
        ],
        check=check_finetune,
    )
    federated = _stage(
        "federated",
        cfg.federated,
        FederatedConfig,
        [f"base={p.model}", "debug_base=", f"output_dir={p.federated}", "name=demo-federated"],
        check=check_federated,
    )

    load = cfg.load
    serve = _stage(
        "serve",
        cfg.serve,
        ServeJobConfig,
        [
            f"app.model_path={p.model}",
            "block=false",
            "app.traffic.enabled=true",
            f"app.traffic.output_dir={p.traffic}",
            # A window is exactly one phase of the load: sealed by its requests, never by the clock.
            f"app.traffic.window_requests={load.requests_per_window}",
            "app.traffic.window_seconds=86400",
            "app.traffic.sample_rate=1.0",
        ],
        check=lambda c: read_api_key(c.app),
    )
    hot, ep = cfg.serve.num_hot_experts, serve.app.ep
    require(
        hot == 0 or ep > 1, f"serve.num_hot_experts={hot} needs an expert-parallel app (app.ep > 1), got app.ep={ep}"
    )
    require(
        hot <= model_cfg.moe.num_experts,
        f"serve.num_hot_experts={hot} exceeds the model's {model_cfg.moe.num_experts} experts",
    )
    require(
        ep == 1 or (model_cfg.moe.num_experts + hot) % ep == 0,
        f"serve.num_hot_experts={hot}: {model_cfg.moe.num_experts} experts + {hot} hot copies = "
        f"{model_cfg.moe.num_experts + hot} expert slots do not split evenly over the serve stage's "
        f"app.ep={ep}",
    )

    drift = _stage(
        "drift",
        cfg.drift,
        DriftJobConfig,
        [
            "name=demo-drift",
            f"current.dir={p.windows}",
            f"output_dir={p.drift}",
            "debug_traffic=null",
            "publish_metrics=false",
            "interval_s=0",
            "linger_s=0",
            f"quality.artifact={p.model}",
            f"reference.manifest={p.data}",
        ],
    )
    # The placement is computed from the load's windows and applied to the app the serve stage runs
    # (its running placement asked of it: placement.current is cleared).
    rebalance = _stage(
        "rebalance",
        cfg.rebalance,
        RebalanceJobConfig,
        [
            "name=demo-rebalance",
            "source=windows",
            f"windows.dir={p.windows}",
            "windows.latest=0",
            f"model_path={p.model}",
            f"output_dir={p.rebalance}",
            "debug_traffic=null",
            "interval_s=0",
            "placement.current=",
            "apply.enabled=true",
            f"apply.app_name={serve.app_name}",
            f"apply.deployment={serve.app.name}",
        ],
    )
    return DemoPlan(
        cfg=cfg,
        paths=p,
        ingest=ingest,
        train=train,
        finetune=finetune,
        federated=federated,
        serve=serve,
        drift=drift,
        rebalance=rebalance,
    )
