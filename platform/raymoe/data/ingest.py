"""The ingest pipeline on Ray Data: raw text and code -> packed Parquet token shards + manifest.

    list files -> plan work units
    [Ray Data] clean:    read, decode, normalise, scrub PII, filter, hash + MinHash (per unit)
    [driver]   dedup:    exact + near duplicates over the compact fingerprints, split, weights
    [driver]   tokenizer: reuse the given one, or train on the kept training documents
    [Ray Data] tokenize: encode the kept documents (per unit)
    [driver]   pack:     shuffle documents, pack into seq_len + 1 rows, write shards, manifest

Work is cut into units of input files; each unit's results are committed under `_work/`
(see units.py), so a rerun skips finished units. Shards are written atomically and an identical
existing shard is not rewritten; the manifest is written last, so its presence marks a complete
run. The output directory must be a local or shared (NFS, PVC) path visible to all nodes; inputs
may be on any pyarrow filesystem.
The config (`IngestConfig`) and its up-front checks are in `raymoe.data.ingest_config`.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from raymoe.atomic_io import atomic_write_bytes, remove_stale_temps
from raymoe.config import to_dict
from raymoe.data import tokenizer as toklib
from raymoe.data.dedup import find_duplicates
from raymoe.data.filters import FILTER_REASONS
from raymoe.data.ingest_config import IngestConfig, output_config
from raymoe.data.ingest_tasks import count_metric, run_clean, run_units, tokenize_task
from raymoe.data.manifest import FORMAT_VERSION, MANIFEST_NAME, write_manifest
from raymoe.data.pack import pack_documents
from raymoe.data.profile import reference_profile, token_unigram
from raymoe.data.quarantine import QUARANTINE_REASONS, quarantine_entry, write_quarantine
from raymoe.data.sampling import assign_split, mix_repeats, shuffled
from raymoe.data.shards import write_shard
from raymoe.data.sources import list_files
from raymoe.data.units import (
    CACHE_VERSION,
    CLEAN_STAGES,
    load_clean,
    plan_units,
    reset_unit,
    stable_hash,
    unit_done,
)
from raymoe.monitor import metrics as M

SPLITS = ("train", "val")
PAUSE_ENV = "RAYMOE_INGEST_PAUSE_AT"  # fault injection for tests: "clean:N" or "shard:N"


def _pause_point(name: str, count: int) -> None:
    """Blocks forever at a named point when the test hook asks for it (kill tests)."""
    if os.environ.get(PAUSE_ENV) == f"{name}:{count}":
        print(f"PAUSED {name}:{count}", flush=True)
        while True:
            time.sleep(60)


def _progress(total: float, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    # Away from a terminal (a job's log) the bar is a line every 10 s, as the console's stages draw it.
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=True,
        disable=not enabled,
        file=sys.stderr,
        dynamic_ncols=True,
        mininterval=0.5 if sys.stderr.isatty() else 10.0,
    )


# ---- driver stages ----


def _clean(cfg: IngestConfig, units: list[dict], work: Path, stats: dict) -> None:
    pending = [u for u in units if not unit_done(work / "clean" / u["key"])]
    stats["clean_units"] = {"total": len(units), "run": len(pending)}
    print(f"ingest: clean {len(pending)} of {len(units)} work units (rest done earlier)", flush=True)
    if not pending:
        return
    for u in pending:
        reset_unit(work / "clean" / u["key"])
    items = [{"key": u["key"], "files": json.dumps(u["files"])} for u in pending]
    bar = _progress(sum(f["size"] for u in pending for f in u["files"]), "clean", "B", cfg.execution.progress)
    start, records = time.monotonic(), 0
    stage_cfgs = {name: to_dict(getattr(cfg, name)) for name, _, _ in CLEAN_STAGES}
    for parts, row in enumerate(run_clean(items, stage_cfgs, str(work / "clean"), cfg.execution.cpus_per_task), 1):
        records += int(row["records"])
        bar.update(int(row["bytes"]))
        bar.set_postfix(records=records, rec_s=f"{records / (time.monotonic() - start):.0f}")
        _pause_point("clean", parts)
    bar.close()


def _load_fingerprints(units: list[dict], work: Path) -> list[dict]:
    cols = ["source", "location", "reason", "detail", "sample", "nbytes", "emails", "keys", "hash", "minhash"]
    rows = []
    for u_idx, u in enumerate(units):
        table = load_clean(work / "clean" / u["key"], columns=cols)
        for r_idx, r in enumerate(table.to_pylist()):
            r["unit"], r["row"] = u_idx, r_idx
            rows.append(r)
    return rows


def _decide(cfg: IngestConfig, rows: list[dict]) -> None:
    """Sets `dup` and `split` on every kept row (input order = priority)."""
    kept = [r for r in rows if not r["reason"]]
    sigs = [np.frombuffer(r["minhash"], dtype=np.uint32) if r["minhash"] else None for r in kept]
    dups = find_duplicates([r["hash"] for r in kept], sigs, cfg.dedup)
    for r, dup in zip(kept, dups):
        r["dup"] = dup
        r["split"] = assign_split(r["hash"], cfg.pack.val_fraction, cfg.pack.seed)
    for kind, n in Counter(d for d in dups if d).items():
        count_metric(M.INGEST_DUPLICATES, n, {"kind": kind})


def _tokenizer(cfg: IngestConfig, units: list[dict], rows: list[dict], out: Path, work: Path) -> tuple[Path, bool]:
    tok_dir = out / "tokenizer"
    key_file = work / "tokenizer.key"
    if cfg.tokenizer.path:
        key_file.unlink(missing_ok=True)  # tok_dir no longer holds a tokenizer trained here
        src = Path(cfg.tokenizer.path)
        tok = toklib.load_tokenizer(src)
        if tok.get_vocab_size() > cfg.tokenizer.vocab_size:
            raise ValueError(
                f"tokenizer.path {str(src)!r} has vocab {tok.get_vocab_size()}, "
                f"more than tokenizer.vocab_size={cfg.tokenizer.vocab_size}"
            )
        toklib.save_tokenizer(tok, tok_dir)
        return tok_dir, False
    keep = [r for r in rows if not r["reason"] and not r["dup"] and r["split"] == "train"]
    train_key = stable_hash(
        [CACHE_VERSION, to_dict(cfg.tokenizer), [(units[r["unit"]]["key"], r["row"]) for r in keep]]
    )
    if (tok_dir / "tokenizer.json").is_file() and key_file.is_file() and key_file.read_text() == train_key:
        return tok_dir, True
    by_unit: dict[int, list[int]] = {}
    for r in keep:
        by_unit.setdefault(r["unit"], []).append(r["row"])

    def texts():
        budget = cfg.tokenizer.max_train_chars
        for u_idx in sorted(by_unit):
            col = load_clean(work / "clean" / units[u_idx]["key"], columns=["text"]).column("text")
            for row in by_unit[u_idx]:
                text = col[row].as_py()
                if budget <= 0:
                    return
                budget -= len(text)
                yield text

    tok = toklib.train_tokenizer(texts(), cfg.tokenizer.vocab_size, cfg.tokenizer.min_frequency)
    toklib.save_tokenizer(tok, tok_dir, model_max_length=cfg.pack.seq_len)
    atomic_write_bytes(key_file, train_key.encode())
    return tok_dir, True


def _tokenize(
    cfg: IngestConfig, units: list[dict], rows: list[dict], tok_dir: Path, tok_hash: str, work: Path, stats: dict
) -> list[str]:
    keep_by_unit: dict[int, list[tuple[int, str]]] = {i: [] for i in range(len(units))}
    for r in rows:
        if not r["reason"] and not r["dup"]:
            keep_by_unit[r["unit"]].append((r["row"], r["split"]))
    items, keys = [], []
    for u_idx, u in enumerate(units):
        keep = keep_by_unit[u_idx]
        key = stable_hash([CACHE_VERSION, u["key"], tok_hash, keep])
        keys.append(key)
        if not (work / "tokens" / f"{key}.parquet").is_file():
            items.append({"key": key, "clean_key": u["key"], "keep": json.dumps(keep)})
    stats["tokenize_units"] = {"total": len(units), "run": len(items), "tokens": 0, "task_seconds": 0.0}
    print(f"ingest: tokenize {len(items)} of {len(units)} work units (rest done earlier)", flush=True)
    if items:
        # Largest units first: with one task per unit, a big unit started last would run alone
        # while the other CPUs idle.
        sizes = {u["key"]: sum(f["size"] for f in u["files"]) for u in units}
        items.sort(key=lambda item: -sizes[item["clean_key"]])
        bar = _progress(sum(len(json.loads(i["keep"])) for i in items), "tokenize", "doc", cfg.execution.progress)
        start, tokens = time.monotonic(), 0
        kwargs = {"work_dir": str(work), "tok_dir": str(tok_dir), "tok_hash": tok_hash}
        for row in run_units(items, tokenize_task, kwargs, cfg.execution.cpus_per_task):
            tokens += int(row["tokens"])
            stats["tokenize_units"]["task_seconds"] += float(row["seconds"])
            bar.update(int(row["docs"]))
            bar.set_postfix(tokens=tokens, tok_s=f"{tokens / (time.monotonic() - start):.0f}")
        bar.close()
        stats["tokenize_units"]["tokens"] = tokens
    return keys


def _token_arrays(table) -> list[np.ndarray]:
    """The `tokens` list column as one int32 array per row (views, no per-token Python)."""
    arrays = []
    for chunk in table.column("tokens").chunks:
        values = chunk.values.to_numpy(zero_copy_only=False)
        offsets = chunk.offsets.to_numpy()
        arrays += [values[offsets[i] : offsets[i + 1]] for i in range(len(chunk))]
    return arrays


def _pack_and_write(
    cfg: IngestConfig, token_keys: list[str], eos: int, vocab: int, out: Path, work: Path, stats: dict
) -> tuple[list[dict], dict, dict]:
    docs: dict[str, list[np.ndarray]] = {s: [] for s in SPLITS}
    weights = {s.name: s.weight for s in cfg.sources}
    train_lengths = []
    for key in token_keys:
        table = pq.read_table(work / "tokens" / f"{key}.parquet")
        for h, source, split, arr in zip(
            *(table.column(c).to_pylist() for c in ("hash", "source", "split")), _token_arrays(table)
        ):
            if split == "train":
                train_lengths.append(len(arr))
                docs[split].extend([arr] * mix_repeats(h, weights[source], cfg.pack.seed))
            else:
                docs[split].append(arr)
    shards, written, unigram = [], {}, np.zeros(vocab, dtype=np.int64)
    stats["shards"] = {"written": 0, "unchanged": 0}
    for s_idx, split in enumerate(SPLITS):
        order = shuffled(len(docs[split]), cfg.pack.seed * 2 + s_idx)
        rows_NL, dropped = pack_documents((docs[split][i] for i in order), cfg.pack.seq_len, eos, cfg.pack.pad_last)
        split_dir = out / split
        split_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temps(split_dir)
        names = []
        for n, start in enumerate(range(0, len(rows_NL), cfg.pack.rows_per_shard)):
            name = f"{split}/shard-{n:05d}.parquet"
            info = write_shard(
                out / name, rows_NL[start : start + cfg.pack.rows_per_shard], cfg.pack.rows_per_row_group
            )
            stats["shards"]["written" if info.pop("written") else "unchanged"] += 1
            shards.append({"path": name, "split": split, **info})
            names.append(name)
            _pause_point("shard", len(shards))
        for old in split_dir.glob("shard-*.parquet"):  # left by an earlier, larger run
            if f"{split}/{old.name}" not in names:
                old.unlink()
        if split == "train":
            unigram = token_unigram([rows_NL], vocab)
        written[split] = {
            "docs": len(docs[split]),
            "rows": len(rows_NL),
            "tokens": int(rows_NL.size),
            "shards": len(names),
            "tokens_dropped_tail": int(dropped),
        }
    return shards, written, reference_profile(unigram, train_lengths)


def _counts(cfg: IngestConfig, units: list[dict], rows: list[dict]) -> tuple[dict, dict]:
    reasons = Counter(r["reason"] for r in rows if r["reason"])
    kept = [r for r in rows if not r["reason"]]
    counts: dict[str, Any] = {
        "files": sum(len(u["files"]) for u in units),
        "records": len(rows),
        "bytes": sum(r["nbytes"] or 0 for r in rows),
        "quarantined": {k: reasons[k] for k in sorted(reasons) if k in QUARANTINE_REASONS},
        "filtered": {k: reasons[k] for k in sorted(reasons) if k in FILTER_REASONS},
        "duplicates": dict(sorted(Counter(r["dup"] for r in kept if r["dup"]).items())),
        "pii_replaced": {"emails": sum(r["emails"] for r in rows), "keys": sum(r["keys"] for r in rows)},
        "kept_docs": sum(1 for r in kept if not r["dup"]),
    }
    counts["quarantined_total"] = sum(counts["quarantined"].values())
    sources = {}
    for s in cfg.sources:
        mine = [r for r in rows if r["source"] == s.name]
        sources[s.name] = {
            "files": sum(1 for u in units for f in u["files"] if f["source"] == s.name),
            "records": len(mine),
            "bytes": sum(r["nbytes"] or 0 for r in mine),
            "kept_docs": sum(1 for r in mine if not r["reason"] and not r["dup"]),
            "weight": s.weight,
        }
    return counts, sources


def run_ingest(cfg: IngestConfig) -> dict:
    """Runs the whole pipeline (Ray must be initialised) and returns the manifest it wrote."""
    t0 = time.monotonic()
    # Absolute: tasks get this path and need not share the driver's working directory.
    out = Path(cfg.output_dir).resolve()
    work = out / "_work"
    for sub in ("clean", "tokens"):
        (work / sub).mkdir(parents=True, exist_ok=True)
    remove_stale_temps(work / "tokens")
    settings = stable_hash([to_dict(getattr(cfg, name)) for name, _, _ in CLEAN_STAGES])
    files = [f for s in cfg.sources for f in list_files(s)]
    units = plan_units(files, cfg.execution.unit_bytes, settings)
    stats: dict = {"seconds": {}}
    _clean(cfg, units, work, stats)
    stats["seconds"]["clean"] = time.monotonic() - t0
    rows = _load_fingerprints(units, work)
    _decide(cfg, rows)
    tok_dir, trained = _tokenizer(cfg, units, rows, out, work)
    tok = toklib.load_tokenizer(tok_dir)
    tok_hash = toklib.tokenizer_hash(tok)
    stats["seconds"]["dedup_tokenizer"] = time.monotonic() - t0 - sum(stats["seconds"].values())
    t1 = time.monotonic()
    token_keys = _tokenize(cfg, units, rows, tok_dir, tok_hash, work, stats)
    stats["seconds"]["tokenize"] = time.monotonic() - t1
    t2 = time.monotonic()
    # From here shards change: an old manifest must not vouch for them. It comes back, rewritten,
    # when the run completes.
    (out / MANIFEST_NAME).unlink(missing_ok=True)
    vocab = tok.get_vocab_size()
    shards, written, profile = _pack_and_write(cfg, token_keys, toklib.eos_id(tok), vocab, out, work, stats)
    entries = [
        quarantine_entry(r["source"], r["location"], r["reason"], r["detail"] or "", (r["sample"] or "").encode())
        for r in rows
        if r["reason"] in QUARANTINE_REASONS
    ]
    write_quarantine(out, entries)
    counts, sources = _counts(cfg, units, rows)
    counts["written"] = written
    config = output_config(cfg)
    manifest = {
        "format_version": FORMAT_VERSION,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "config": config,
        "config_hash": "sha256:" + stable_hash(config),
        "tokenizer": {
            "dir": "tokenizer",
            "hash": tok_hash,
            "vocab_size": vocab,
            "eos_id": toklib.eos_id(tok),
            "trained": trained,
        },
        "seq_len": cfg.pack.seq_len,
        "row_len": cfg.pack.seq_len + 1,
        "dtype": "int32",
        "counts": counts,
        "sources": sources,
        "shards": shards,
        "quarantine": {"path": "quarantine/quarantine.jsonl", "entries": len(entries)},
        "profile": profile,
    }
    path = write_manifest(out, manifest)
    stats["seconds"]["pack_write"] = time.monotonic() - t2
    stats["seconds"]["total"] = time.monotonic() - t0
    stats["tokens"] = sum(w["tokens"] for w in written.values())
    atomic_write_bytes(out / "ingest_stats.json", json.dumps(stats, indent=1).encode())
    print(
        f"ingest: wrote {path} ({len(shards)} shards, {stats['tokens']} tokens, "
        f"{counts['quarantined_total']} quarantined) in {stats['seconds']['total']:.1f}s"
    )
    return manifest
