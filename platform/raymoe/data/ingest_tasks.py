"""The Ray Data side of ingest: the clean stages as a chain of `map_batches`, and tokenize.

Clean: `from_items(units)` -> read -> decode -> normalize -> pii -> filter -> fingerprint ->
commit. Every step is a `map_batches` over an Arrow table of records calling one pure stage
function from units.py; Ray fuses the chain, so one task carries a unit from files to its
committed parts. Tokenize: one task per unit reads its cleaned records, encodes the kept ones and
commits a Parquet file. Both stream small summary rows back to the driver for the progress bar,
and emit the ingest metrics.
"""

from __future__ import annotations

import functools
import json
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from raymoe.config import from_dict
from raymoe.data import tokenizer as toklib
from raymoe.data.quarantine import QUARANTINE_REASONS
from raymoe.data.units import CLEAN_STAGES, commit_parts, load_clean, read_records, tokenize_unit, write_table
from raymoe.monitor import metrics as M


def count_metric(spec: M.MetricSpec, n: int, tags: dict[str, str]) -> None:
    """Adds `n` to a counter (skipped for 0: Ray counters reject it)."""
    if n > 0:
        M.ray_metric(spec).inc(n, tags=tags)


def _no_reservation(ds) -> None:
    """Turns off Ray Data's per-operator resource reservation for this dataset only.

    The reservation holds back part of the cluster for each operator of a pipeline; on a small
    cluster (2 CPUs) it left one CPU idle through most of a stage (measured: 8 tasks of 0.3 s on
    2 CPUs took 2.2 s instead of 1.3 s). Our pipelines are a single fused chain of stateless
    tasks, which the reservation exists to protect from starving other operators.
    """
    ds.context.op_resource_reservation_enabled = False


def read_task(batch: pa.Table) -> pa.Table:
    """Work units (`key`, `files` as JSON) -> their records."""
    tables = [
        read_records(key, json.loads(files))
        for key, files in zip(batch.column("key").to_pylist(), batch.column("files").to_pylist())
    ]
    return pa.concat_tables(tables)


def _stage_task(name: str, stage: Callable, config_cls: type) -> Callable:
    def task(batch: pa.Table, cfg: dict) -> pa.Table:
        return stage(batch, from_dict(config_cls, cfg, prefix=name))

    task.__name__ = task.__qualname__ = name  # what Ray Data calls the operator in its logs
    return task


STAGE_TASKS = [(name, _stage_task(name, stage, cls)) for name, stage, cls in CLEAN_STAGES]


def commit_task(batch: pa.Table, clean_dir: str) -> dict:
    """Commits a batch of cleaned records as parts; emits records/bytes/drop metrics."""
    per: Counter = Counter()
    for source, reason, nbytes in zip(*(batch.column(c).to_pylist() for c in ("source", "reason", "nbytes"))):
        per[(M.INGEST_RECORDS, "source", source)] += 1
        per[(M.INGEST_BYTES, "source", source)] += nbytes or 0
        if reason:
            spec = M.INGEST_QUARANTINED if reason in QUARANTINE_REASONS else M.INGEST_FILTERED
            per[(spec, "reason", reason)] += 1
    for (spec, tag, value), n in per.items():
        count_metric(spec, n, {tag: value})
    parts = commit_parts(batch, clean_dir)
    return {k: [p[k] for p in parts] for k in ("unit", "records", "bytes")}


def run_clean(items: list[dict], stage_cfgs: dict[str, dict], clean_dir: str, cpus: float) -> Iterator[dict]:
    """Runs the clean chain over work units; yields one summary row per committed part."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False  # the driver draws its own
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=len(items))
    _no_reservation(ds)
    # batch_size=None: a whole block per call, so a unit's records stay together.
    common: dict[str, Any] = {"batch_format": "pyarrow", "batch_size": None, "num_cpus": cpus}
    ds = ds.map_batches(read_task, **common)
    for name, task in STAGE_TASKS:
        ds = ds.map_batches(task, fn_kwargs={"cfg": stage_cfgs[name]}, **common)
    # Ray's type for `fn` takes the batch only; fn_kwargs supply commit_task's clean_dir.
    ds = ds.map_batches(commit_task, fn_kwargs={"clean_dir": clean_dir}, **common)  # type: ignore[arg-type]
    yield from ds.iter_rows()


@functools.lru_cache(maxsize=2)
def _tokenizer(path: str, tok_hash: str):
    tok = toklib.load_tokenizer(path)
    if toklib.tokenizer_hash(tok) != tok_hash:
        raise RuntimeError(f"tokenizer at {path} changed during the run (expected {tok_hash})")
    return tok


def tokenize_task(batch: dict, work_dir: str, tok_dir: str, tok_hash: str) -> dict:
    """Encodes each unit's kept documents into `_work/tokens/<key>.parquet`.

    Args:
        batch: columns `key`, `clean_key` (its cleaned unit) and `keep` (JSON [[row, split], ...]).
        work_dir: the run's `_work` directory.
        tok_dir: tokenizer directory; `tok_hash` guards against it changing under the run.

    Returns:
        Columns `key`, `docs`, `tokens`, `seconds` (task time) per unit, for the progress bar
        and the run stats.
    """
    tok = _tokenizer(tok_dir, tok_hash)
    out: dict[str, list] = {"key": [], "docs": [], "tokens": [], "seconds": []}
    for key, clean_key, keep_json in zip(batch["key"], batch["clean_key"], batch["keep"]):
        start = time.perf_counter()
        clean = load_clean(Path(work_dir) / "clean" / clean_key, columns=["source", "text", "hash"])
        table = tokenize_unit(clean, [tuple(k) for k in json.loads(keep_json)], tok)
        write_table(Path(work_dir) / "tokens" / f"{key}.parquet", table)
        lengths = pc.list_value_length(table.column("tokens")).to_pylist()
        counts: Counter = Counter()
        for split, n in zip(table.column("split").to_pylist(), lengths):
            counts[split] += n
        for split, n in counts.items():
            count_metric(M.INGEST_TOKENS, n, {"split": split})
        out["key"].append(key)
        out["docs"].append(table.num_rows)
        out["tokens"].append(sum(counts.values()))
        out["seconds"].append(time.perf_counter() - start)
    return out


def run_units(items: list[dict], fn: Callable, fn_kwargs: dict, cpus: float) -> Iterator[dict]:
    """Runs `fn` over `items` with Ray Data, one task per item; yields result rows as they end."""
    import ray

    ray.data.DataContext.get_current().enable_progress_bars = False
    ds: ray.data.Dataset = ray.data.from_items(items, override_num_blocks=len(items))
    _no_reservation(ds)
    ds = ds.map_batches(fn, fn_kwargs=fn_kwargs, batch_size=1, num_cpus=cpus)
    yield from ds.iter_rows()
