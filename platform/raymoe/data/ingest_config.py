"""The ingest job's config: `IngestConfig` (`python -m pipelines.ingest --config FILE`) and its
tokenizer, packing and execution parts; what can be checked before Ray starts; the config as the
manifest records it. The pipeline that runs it is `raymoe.data.ingest`.
"""

from __future__ import annotations

import glob
import os
from dataclasses import dataclass, field

from raymoe.config import ConfigError, require, require_at_least, require_resource, to_dict
from raymoe.data import tokenizer as toklib
from raymoe.data.decode import DecodeConfig
from raymoe.data.dedup import DedupConfig
from raymoe.data.filters import FilterConfig
from raymoe.data.normalize import NormalizeConfig
from raymoe.data.pii import PIIConfig
from raymoe.data.sources import SourceConfig


@dataclass(kw_only=True)
class TokenizerConfig:
    """Reuse a tokenizer (`path`) or train one on the first run."""

    path: str | None = None
    vocab_size: int = 2048
    min_frequency: int = 2
    # Training reads kept training documents in order until this many characters.
    max_train_chars: int = 100_000_000

    def __post_init__(self) -> None:
        require(
            self.vocab_size >= toklib.MIN_VOCAB_SIZE,
            f"tokenizer.vocab_size must be >= {toklib.MIN_VOCAB_SIZE}, got {self.vocab_size}",
        )
        require_at_least("tokenizer", self, min_frequency=1, max_train_chars=1)


@dataclass(kw_only=True)
class PackConfig:
    """Packing, shuffling, splitting and shard layout."""

    seq_len: int
    val_fraction: float = 0.02
    seed: int = 0
    # Pad the last partial row with EOS instead of dropping its tokens.
    pad_last: bool = False
    rows_per_shard: int = 2048
    # Small row groups let the loader stream a shard without reading it whole.
    rows_per_row_group: int = 256

    def __post_init__(self) -> None:
        require(self.seq_len >= 1, f"pack.seq_len must be >= 1, got {self.seq_len}")
        require(0.0 <= self.val_fraction < 1.0, f"pack.val_fraction must be in [0, 1), got {self.val_fraction}")
        require(self.rows_per_shard >= 1, f"pack.rows_per_shard must be >= 1, got {self.rows_per_shard}")
        require(self.rows_per_row_group >= 1, f"pack.rows_per_row_group must be >= 1, got {self.rows_per_row_group}")


@dataclass(kw_only=True)
class ExecutionConfig:
    """How the work is cut and run; none of it changes the output bytes."""

    # Logical CPUs of the embedded cluster (ignored when joining RAY_ADDRESS).
    num_cpus: int | None = None
    # Input bytes per work unit: one Ray task, one cache file, the unit of resume.
    unit_bytes: int = 1 << 20
    cpus_per_task: float = 1.0
    progress: bool = True

    def __post_init__(self) -> None:
        require(
            self.num_cpus is None or self.num_cpus >= 1,
            f"execution.num_cpus must be null (all cores) or >= 1, got {self.num_cpus}",
        )
        require(self.unit_bytes >= 1, f"execution.unit_bytes must be >= 1, got {self.unit_bytes}")
        require_resource("execution.cpus_per_task", self.cpus_per_task)
        require(self.cpus_per_task > 0, f"execution.cpus_per_task must be > 0, got {self.cpus_per_task}")


@dataclass(kw_only=True)
class IngestConfig:
    """An ingest run: sources in, shards + manifest out under `output_dir`."""

    output_dir: str = "runs/ingest"
    sources: list[SourceConfig]
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    normalize: NormalizeConfig = field(default_factory=NormalizeConfig)
    pii: PIIConfig = field(default_factory=PIIConfig)
    filter: FilterConfig = field(default_factory=FilterConfig)
    dedup: DedupConfig = field(default_factory=DedupConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    pack: PackConfig
    execution: ExecutionConfig = field(default_factory=ExecutionConfig)

    def __post_init__(self) -> None:
        require(bool(self.sources), "sources must list at least one source")
        names = [s.name for s in self.sources]
        require(len(set(names)) == len(names), f"sources[].name must be unique, got {names}")


def _has_input(entry: str, extensions: list[str]) -> bool:
    """A local `paths` entry names at least one input file (a file, a glob, or a directory
    holding a file with one of `extensions`)."""
    if any(c in entry for c in "*?["):
        return any(os.path.isfile(p) for p in glob.iglob(entry, recursive=True))
    if os.path.isfile(entry):
        return True
    suffixes = tuple(e.lower() for e in extensions)
    return any(name.lower().endswith(suffixes) for _, _, names in os.walk(entry) for name in names)


def check_before_launch(cfg: IngestConfig) -> None:
    """What can be checked before Ray starts: every local input path names an input file, the
    tokenizer to reuse exists and fits tokenizer.vocab_size, output_dir is not a file. Remote
    inputs (URIs) are listed by the job itself.

    Raises:
        ConfigError: naming the key, the value and what was expected.
    """
    for source in cfg.sources:
        for entry in source.paths:
            if "://" not in entry and not _has_input(entry, source.extensions):
                raise ConfigError(
                    f"sources[{source.name}].paths: {entry!r} matches no input file; expected "
                    f"existing files, directories or globs (extensions {source.extensions})"
                )
    if cfg.tokenizer.path:
        try:
            vocab = toklib.load_tokenizer(cfg.tokenizer.path).get_vocab_size()
        except FileNotFoundError:
            raise ConfigError(f"tokenizer.path={cfg.tokenizer.path!r} holds no tokenizer.json") from None
        require(
            vocab <= cfg.tokenizer.vocab_size,
            f"tokenizer.path={cfg.tokenizer.path!r} has a vocabulary of {vocab}, more than "
            f"tokenizer.vocab_size={cfg.tokenizer.vocab_size}",
        )
    require(
        not os.path.isfile(cfg.output_dir),
        f"output_dir={cfg.output_dir!r} is a file; expected a directory (created if missing)",
    )


def output_config(cfg: IngestConfig) -> dict:
    """The config as recorded in the manifest: without where it ran or how it was scheduled."""
    data = to_dict(cfg)
    data.pop("output_dir")
    data.pop("execution")
    return data
