"""The shipped corpus ingested the way every training run gets its tokens (for tests that train on it).

    data = ingest_corpus(tmp_path_factory.mktemp("ingest"), seq_len=64)   # needs a Ray session

Runs `pipelines/configs/ingest.debug.yaml` (dedup, PII scrubbing, quarantine, a 2048-token BPE)
with rows of seq_len + 1 tokens into `out`; about a minute on 2 cores.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def ingest_corpus(out: Path, *, seq_len: int) -> str:
    """Ingests data/corpus into `out` with rows of seq_len + 1 tokens; returns `out` as a string."""
    from raymoe.config import load_config
    from raymoe.data.ingest import run_ingest
    from raymoe.data.ingest_config import IngestConfig

    cfg = load_config(
        IngestConfig,
        str(ROOT / "pipelines" / "configs" / "ingest.debug.yaml"),
        [f"output_dir={out}", f"pack.seq_len={seq_len}", "execution.progress=false", "execution.cpus_per_task=0.5"],
    )
    for source in cfg.sources:  # relative to the repository root, not the test's directory
        source.paths = [str(ROOT / path) for path in source.paths]
    run_ingest(cfg)
    return str(out)
