"""Drift job configuration (`python -m pipelines.drift`): which traffic windows to compare with which
reference, the detectors' thresholds, the quality evaluation and the actions taken on drift.

Checked before anything starts: the config itself in `__post_init__`, the filesystem (windows,
manifest, eval set, artifact) in `check_before_launch`.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from raymoe.artifact_check import check_artifact
from raymoe.config import ConfigError, require, require_at_least, same_path
from raymoe.monitor.drift import FEATURES, DriftConfig


@dataclass(kw_only=True)
class DebugTrafficConfig:
    """The only place a job may fabricate debug traffic (debug configs of the drift and
    re-placement jobs): windows are written into `dir` only when the job reads its windows from
    that same directory and it holds none, by serving the artifact at `artifact` in-process
    (`raymoe.serve.debug_traffic`; a random-weight debug artifact is written there first when none
    is). A job pointed elsewhere writes nothing.
    """

    # Directory the two debug windows go to.
    dir: str
    # Artifact served to produce them; the debug artifact is written here when missing.
    artifact: str

    def __post_init__(self) -> None:
        require(bool(self.dir), "debug_traffic.dir must be set (where the debug windows may be written)")
        require(bool(self.artifact), "debug_traffic.artifact must be set (the artifact the debug windows come from)")

    def applies_to(self, windows_dir: str) -> bool:
        """True when `windows_dir` (the job's windows) is this debug directory."""
        return same_path(windows_dir, self.dir)


@dataclass(kw_only=True)
class WindowsConfig:
    """The current traffic: Parquet windows written by the serving app (`app.traffic`)."""

    # Directory of `window-*.parquet` files (the serving app's `app.traffic.output_dir`).
    dir: str
    # The newest this-many window files, merged, form the current window.
    latest: int = 1

    def __post_init__(self) -> None:
        require(bool(self.dir), "current.dir must name the serving app's traffic directory")
        require(self.latest >= 1, f"current.latest must be >= 1, got {self.latest}")


@dataclass(kw_only=True)
class ReferenceConfig:
    """What the current window is compared with."""

    # "windows": earlier traffic windows; "manifest": the ingest manifest's profile (token
    # unigram and document-length histograms of the training data).
    kind: str = "windows"
    # kind windows: these files (globs allowed); empty = the `oldest` files of current.dir.
    paths: list[str] = field(default_factory=list)
    oldest: int = 1
    # kind manifest: the ingest output directory or its manifest.json.
    manifest: str = ""

    def __post_init__(self) -> None:
        require(
            self.kind in ("windows", "manifest"), f"reference.kind must be 'windows' or 'manifest', got {self.kind!r}"
        )
        require(self.oldest >= 1, f"reference.oldest must be >= 1, got {self.oldest}")
        require(
            self.kind != "manifest" or bool(self.manifest),
            "reference.manifest must name an ingest output when reference.kind is 'manifest'",
        )


@dataclass(kw_only=True)
class QualityConfig:
    """Held-out quality of the served artifact (`--eval`): perplexity of the answers of a fixed
    eval set, and exact match when the records have one right answer (the fine-tune task's)."""

    # The artifact the serving app serves (its `app.model_path`).
    artifact: str = ""
    # A peft adapter served on top of it (evaluated folded in); empty = the base.
    adapter: str = ""
    # Fixed eval records (chat or prompt/completion JSONL).
    eval_path: str = "data/sft/function_qa/heldout.jsonl"
    max_seq_len: int = 256
    # Greedy tokens per record for exact match; 0 = perplexity only.
    max_new_tokens: int = 24
    # Flag decay when perplexity exceeds the first recorded point by more than this fraction.
    decay_threshold: float = 0.1

    def __post_init__(self) -> None:
        require(self.max_seq_len >= 2, f"quality.max_seq_len must be >= 2, got {self.max_seq_len}")
        require(self.max_new_tokens >= 0, f"quality.max_new_tokens must be >= 0, got {self.max_new_tokens}")
        require(self.decay_threshold > 0, f"quality.decay_threshold must be > 0, got {self.decay_threshold}")


@dataclass(kw_only=True)
class ActionConfig:
    """A job started when its kind of drift is found; off unless `enabled`."""

    enabled: bool = False
    # The job's command line, run from the working directory.
    entrypoint: list[str] = field(default_factory=list)
    # "subprocess": run it here and wait; "ray_job": submit it through the Ray Jobs SDK to
    # `address` (the dashboard, e.g. http://raycluster-head-svc:8265) and return its id.
    mode: str = "subprocess"
    address: str = ""

    def check(self, key: str) -> None:
        require(
            self.mode in ("subprocess", "ray_job"),
            f"actions.{key}.mode must be 'subprocess' or 'ray_job', got {self.mode!r}",
        )
        require(
            not self.enabled or bool(self.entrypoint),
            f"actions.{key}.entrypoint must be set when actions.{key}.enabled is true",
        )
        require(
            self.mode != "ray_job" or not self.enabled or bool(self.address),
            f"actions.{key}.address must name the Ray dashboard when actions.{key}.mode is 'ray_job'",
        )


@dataclass(kw_only=True)
class ActionsConfig:
    # Router-load drift (feature expert_load) -> re-place experts from the measured load.
    rebalance: ActionConfig = field(
        default_factory=lambda: ActionConfig(
            entrypoint=["python", "-m", "pipelines.rebalance", "--config", "pipelines/configs/rebalance.debug.yaml"]
        )
    )
    # Input drift (any other feature) or quality decay -> fine-tune on fresh data.
    finetune: ActionConfig = field(
        default_factory=lambda: ActionConfig(
            entrypoint=["python", "-m", "pipelines.finetune", "--config", "pipelines/configs/finetune.debug.yaml"]
        )
    )

    def __post_init__(self) -> None:
        self.rebalance.check("rebalance")
        self.finetune.check("finetune")


@dataclass(kw_only=True)
class DriftJobConfig:
    """One drift check (or a watch loop of them); YAML at pipelines/configs/drift.*.yaml."""

    # The `run` label of the Prometheus gauges, and the report's title.
    name: str = "drift"
    current: WindowsConfig
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    # Features compared (see raymoe.monitor.drift.DETECTORS); [all] = every feature both sides have.
    features: list[str] = field(default_factory=lambda: ["all"])
    detectors: DriftConfig = field(default_factory=DriftConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    actions: ActionsConfig = field(default_factory=ActionsConfig)
    # drift.json, report.html, drift-history.jsonl, quality-history.jsonl, actions.jsonl go here.
    output_dir: str
    # Debug configs only: when current.dir is debug_traffic.dir and holds no window, serve
    # debug_traffic.artifact (the debug artifact is written there if missing) in-process on code
    # prompts, then prose prompts, writing one window each (`raymoe.serve.debug_traffic`).
    # Pointed at any other directory, the job fabricates nothing. null = never.
    debug_traffic: DebugTrafficConfig | None = None
    # Publish the results as Prometheus gauges through Ray's metrics agent.
    publish_metrics: bool = True
    # 0 = one check, then exit (0 no drift, 3 drift). > 0 = check every this-many seconds until
    # stopped, which keeps the gauges live for Prometheus and the alert rules.
    interval_s: float = 0.0
    # One check: keep the process (and its gauges) up this long after it, so a scrape sees them.
    linger_s: float = 0.0

    def __post_init__(self) -> None:
        known = set(FEATURES) | {"all"}
        for name in self.features:
            require(name in known, f"features: unknown feature {name!r}; known: {sorted(known)}")
        require(bool(self.output_dir), "output_dir must be set")
        require_at_least("", self, interval_s=0, linger_s=0)

    @property
    def writes_debug_traffic(self) -> bool:
        """True when current.dir is the debug config's own debug_traffic.dir."""
        return self.debug_traffic is not None and self.debug_traffic.applies_to(self.current.dir)


def window_files(cfg: DriftJobConfig) -> tuple[list[str], list[str]]:
    """(reference files, current files) of a windows-vs-windows check; reference empty for manifest.

    The current window is the newest `current.latest` files; an implicit reference is the oldest
    `reference.oldest` files, which must not overlap them.
    """
    from raymoe.monitor.traffic_windows import list_windows

    found = [str(p) for p in list_windows(cfg.current.dir)] if os.path.isdir(cfg.current.dir) else []
    current = found[-cfg.current.latest :]
    if cfg.reference.kind == "manifest":
        return [], current
    if cfg.reference.paths:
        reference = sorted({p for pattern in cfg.reference.paths for p in glob.glob(pattern)})
    else:
        reference = found[: cfg.reference.oldest]
    return reference, current


def check_before_launch(cfg: DriftJobConfig, evaluate: bool = False) -> None:
    """Filesystem checks that need no Ray: raises ConfigError naming the key and the path.

    With debug traffic still to be written (`writes_debug_traffic`, no windows yet) the windows
    are not checked: the job writes them, then checks again.
    """
    if evaluate:
        q = cfg.quality
        debug = cfg.debug_traffic
        artifact_pending = (
            cfg.writes_debug_traffic
            and debug is not None
            and same_path(q.artifact, debug.artifact)
            and not os.path.isfile(os.path.join(q.artifact, "config.json"))
        )
        if not artifact_pending:
            check_artifact("quality.artifact", q.artifact)
        if q.adapter and not os.path.isfile(os.path.join(q.adapter, "adapter_config.json")):
            raise ConfigError(f"quality.adapter={q.adapter!r}: no adapter_config.json there")
        if not os.path.isfile(q.eval_path):
            raise ConfigError(f"quality.eval_path={q.eval_path!r}: no such file")
    if cfg.reference.kind == "manifest":
        path = cfg.reference.manifest
        if not (os.path.isfile(path) or os.path.isfile(os.path.join(path, "manifest.json"))):
            raise ConfigError(f"reference.manifest={path!r}: no manifest.json there")
    if cfg.writes_debug_traffic and not window_files(cfg)[1]:
        return
    if not os.path.isdir(cfg.current.dir):
        raise ConfigError(
            f"current.dir={cfg.current.dir!r}: no such directory (the serving app's app.traffic.output_dir)"
        )
    reference, current = window_files(cfg)
    if len(current) < cfg.current.latest:
        raise ConfigError(
            f"current.dir={cfg.current.dir!r} holds {len(current)} window file(s), "
            f"current.latest={cfg.current.latest} needed"
        )
    if cfg.reference.kind == "manifest":
        return
    if not reference:
        raise ConfigError(f"reference.paths={cfg.reference.paths!r} matches no window file")
    if set(reference) & set(current):
        raise ConfigError(
            f"the reference and current windows overlap in {cfg.current.dir!r} "
            f"(current.latest={cfg.current.latest}, reference.oldest="
            f"{cfg.reference.oldest}): fewer files than both need"
        )
