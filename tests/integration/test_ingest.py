"""The ingest pipeline end to end on a small damaged corpus, on the session's local Ray cluster.

The corpus is built here, in tmp_path, so every expected count below follows from what is written
(see `_build_corpus`): 30 records = 12 quarantined + 3 filtered + 4 duplicates + 11 kept.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from raymoe.config import from_dict
from raymoe.data.corpus_bundle import sidecar_text
from raymoe.data.ingest import run_ingest
from raymoe.data.ingest_config import IngestConfig
from raymoe.data.loader import LoaderConfig, TokenLoader
from raymoe.data.manifest import read_manifest, stable_view
from raymoe.data.quarantine import read_quarantine
from raymoe.data.shards import read_shard
from raymoe.data.tokenizer import load_tokenizer, tokenizer_hash

ROOT = Path(__file__).resolve().parents[2]
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "sa", "to", "vi", "be", "do", "fu", "gi"]


def _prose(seed: int, words: int) -> str:
    rng = random.Random(seed)
    out = []
    for i in range(words):
        w = "".join(rng.choice(SYLLABLES) for _ in range(rng.randint(1, 3)))
        out.append(w + ("." if i % 12 == 11 else ""))
    lines = [" ".join(out[i : i + 10]) for i in range(0, len(out), 10)]
    return "\n".join(lines)


def _parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _build_corpus(root: Path) -> dict[str, str]:
    """Writes the corpus; returns the expected kept documents (normalised) by name."""
    t, j, p, b = root / "text", root / "jsonl", root / "parquet", root / "bundle"
    for d in (t, j, p, b):
        d.mkdir(parents=True)
    doc_a = _prose(1, 160)
    expected = {
        "a": doc_a,
        "b": _prose(2, 70),
        "c": "def area(r):\n    return 3.14159 * r * r\n\nprint(area(2.0))  # prints the area of a circle of radius 2",
    }
    # text source (11 records): 3 kept, 2 exact + 1 near duplicate, 3 filtered, 2 quarantined.
    (t / "a.txt").write_text(doc_a)
    (t / "a_copy.txt").write_text(doc_a)  # exact_duplicate
    (t / "a_crlf.txt").write_bytes(doc_a.replace("\n", "  \r\n").encode())  # exact after normalise
    (t / "a_near.txt").write_text(doc_a.rsplit(" ", 1)[0] + " different")  # near_duplicate
    (t / "b.md").write_text(expected["b"])
    (t / "bad_utf8.txt").write_bytes(b"almost fine text \xff\xfe with two bad bytes in it")
    (t / "c.py").write_text(expected["c"])
    (t / "empty.txt").write_bytes(b"")  # empty_file
    (t / "junk.txt").write_text("spam spam spam\n" * 8 + "eggs")  # repeated_lines
    (t / "short.txt").write_text("too short")  # too_short
    (t / "symbols.txt").write_text("\u00a4\u00b6\u00a7 " * 20)  # non_text_ratio
    # jsonl source, text field "content" (10 records): 5 kept, 5 quarantined.
    docs = {f"d{i}": _prose(10 + i, 50) for i in range(1, 6)}
    docs["d3"] += "\nwrite to alice.smith@example.com for a copy"
    expected.update(docs)
    expected["d3"] = expected["d3"].replace("alice.smith@example.com", "<EMAIL>")
    lines = [
        json.dumps({"content": docs["d1"]}).encode(),
        json.dumps({"content": docs["d2"]}).encode(),
        b'{"content": "unterminated',
        b'{"body": "no content field"}',
        b'{"content": 5}',
        b"",
        json.dumps({"content": docs["d3"]}).encode(),
        b'{"content": "bad \xc3\x28 utf8"}',
    ]
    (j / "good.jsonl").write_bytes(b"\n".join(lines) + b"\n")
    gz_lines = "".join(json.dumps({"content": docs[k]}) + "\n" for k in ("d4", "d5"))
    (j / "good2.jsonl.gz").write_bytes(gzip.compress(gz_lines.encode()))
    big = "".join(json.dumps({"content": _prose(100 + i, 40)}) + "\n" for i in range(50))
    payload = gzip.compress(big.encode())
    (j / "trunc.jsonl.gz").write_bytes(payload[: len(payload) // 2])  # truncated_gzip
    # parquet source, weight 2 (5 records): 2 kept, 3 quarantined.
    expected.update({"p1": _prose(21, 60), "p2": _prose(22, 60)})
    good = _parquet(pa.table({"text": [expected["p1"], None, expected["p2"]]}))
    (p / "good.parquet").write_bytes(good)  # row 1: missing_field
    (p / "trunc.parquet").write_bytes(good[: len(good) // 2])  # corrupt_parquet
    (p / "wrong.parquet").write_bytes(_parquet(pa.table({"text": [1, 2, 3]})))  # wrong_field_type
    # bundle source, records named by id, with its checksum (4 records): 1 kept, 1 exact duplicate
    # of b.md, 2 quarantined.
    expected["e"] = _prose(31, 60)
    lines = [
        json.dumps({"id": "notes/e.txt", "text": expected["e"], "license": "MIT"}).encode(),
        json.dumps({"id": "notes/f.txt", "text": expected["b"]}).encode(),
        b'{"id": "notes/g.txt", "text": "unterminated',  # line 3: bad_json
        json.dumps({"id": "notes/h.txt"}).encode(),
    ]  # missing_field
    data = gzip.compress(b"".join(line + b"\n" for line in lines), mtime=0)
    (b / "corpus.jsonl.gz").write_bytes(data)
    (b / "corpus.jsonl.gz.sha256").write_text(sidecar_text(hashlib.sha256(data).hexdigest(), "corpus.jsonl.gz"))
    return expected


def _config(corpus: Path, out: Path, **execution) -> dict:
    return {
        "output_dir": str(out),
        "sources": [
            {"name": "text", "paths": [str(corpus / "text")]},
            {"name": "jsonl", "paths": [str(corpus / "jsonl")], "text_field": "content"},
            {"name": "parquet", "paths": [str(corpus / "parquet" / "*.parquet")], "weight": 2.0},
            {"name": "bundle", "paths": [str(corpus / "bundle" / "corpus.jsonl.gz")], "id_field": "id"},
        ],
        "pii": {"enabled": True},
        "filter": {"min_chars": 20},
        "tokenizer": {"vocab_size": 320},
        # Every document lands in train and nothing is dropped, so decoding can be checked whole.
        "pack": {"seq_len": 32, "val_fraction": 0.0, "pad_last": True, "rows_per_shard": 16, "rows_per_row_group": 4},
        "execution": {"progress": False, "cpus_per_task": 0.5, **execution},
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    return root, _build_corpus(root)


@pytest.fixture(scope="module")
def reference_run(ray_cluster, corpus, tmp_path_factory):
    root, _ = corpus
    out = tmp_path_factory.mktemp("run1")
    manifest = run_ingest(from_dict(IngestConfig, _config(root, out)))
    return out, manifest


def test_counts_quarantine_and_decoded_shards(corpus, reference_run):
    root, expected = corpus
    out, manifest = reference_run
    counts = manifest["counts"]
    # Counts, derived from _build_corpus.
    assert counts["files"] == 11 + 3 + 3 + 1
    assert counts["records"] == 30
    assert counts["quarantined"] == {
        "bad_json": 2,
        "corrupt_parquet": 1,
        "empty_file": 1,
        "missing_field": 3,
        "truncated_gzip": 1,
        "undecodable": 2,
        "wrong_field_type": 2,
    }
    assert counts["filtered"] == {"non_text_ratio": 1, "repeated_lines": 1, "too_short": 1}
    assert counts["duplicates"] == {"exact_duplicate": 3, "near_duplicate": 1}
    assert counts["kept_docs"] == 11 and counts["pii_replaced"]["emails"] == 1
    # Parquet source has weight 2: its 2 documents appear twice.
    assert counts["written"]["train"]["docs"] == 13 and counts["written"]["val"]["docs"] == 0
    assert {k: v["records"] for k, v in manifest["sources"].items()} == {
        "text": 11,
        "jsonl": 10,
        "parquet": 5,
        "bundle": 4,
    }
    # Quarantine: each bad item with its reason and location.
    got = {
        (Path(e["location"].split(":")[0].split("#")[0]).name, e["location"][-2:], e["reason"])
        for e in read_quarantine(out)
    }
    assert got == {
        ("empty.txt", "xt", "empty_file"),
        ("bad_utf8.txt", "xt", "undecodable"),
        ("good.jsonl", ":3", "bad_json"),
        ("good.jsonl", ":4", "missing_field"),
        ("good.jsonl", ":5", "wrong_field_type"),
        ("good.jsonl", ":8", "undecodable"),
        ("trunc.jsonl.gz", "gz", "truncated_gzip"),
        ("good.parquet", "#1", "missing_field"),
        ("trunc.parquet", "et", "corrupt_parquet"),
        ("wrong.parquet", "et", "wrong_field_type"),
        ("corpus.jsonl.gz", ":3", "bad_json"),
        ("corpus.jsonl.gz", "xt", "missing_field"),
    }
    # A bundle record is named by its id, a line that does not parse by its line number.
    bundle = str(root / "bundle" / "corpus.jsonl.gz")
    assert {e["location"] for e in read_quarantine(out) if e["source"] == "bundle"} == {
        f"{bundle}:3",
        f"{bundle}#notes/h.txt",
    }
    # Shards decode back to exactly the kept documents (parquet ones twice).
    tok = load_tokenizer(out / "tokenizer")
    assert manifest["tokenizer"]["hash"] == tokenizer_hash(tok)
    rows = np.concatenate([read_shard(out / s["path"]) for s in manifest["shards"]])
    assert rows.shape[1] == 33
    stream = rows.ravel().tolist()
    while stream and stream[-1] == 0:  # the EOS padding of the last row
        stream.pop()
    docs, cur = [], []
    for t in [*stream, 0]:
        if t == 0:
            docs.append(tok.decode(cur))
            cur = []
        else:
            cur.append(t)
    want = Counter(expected.values()) + Counter([expected["p1"], expected["p2"]])
    assert Counter(docs) == want
    # The reference profile counts every token in the training rows.
    assert sum(manifest["profile"]["token_unigram"]["counts"]) == rows.size


def test_rerun_is_byte_identical_and_loader_reads_it(ray_cluster, corpus, reference_run, tmp_path):
    root, _ = corpus
    out1, manifest1 = reference_run
    # A second run elsewhere, cut into different work units, gives the same bytes.
    out2 = tmp_path / "run2"
    manifest2 = run_ingest(from_dict(IngestConfig, _config(root, out2, unit_bytes=64)))
    assert stable_view(manifest2) == stable_view(manifest1)
    for shard in manifest1["shards"]:
        assert (out1 / shard["path"]).read_bytes() == (out2 / shard["path"]).read_bytes()
    for name in ("tokenizer/tokenizer.json", "quarantine/quarantine.jsonl"):
        assert (out1 / name).read_bytes() == (out2 / name).read_bytes()
    # Rerunning in place redoes nothing.
    run_ingest(from_dict(IngestConfig, _config(root, out2, unit_bytes=64)))
    stats = json.loads((out2 / "ingest_stats.json").read_text())
    assert stats["clean_units"]["run"] == 0 and stats["tokenize_units"]["run"] == 0
    assert stats["shards"]["written"] == 0
    # The training loader reads the shards, two ranks splitting each global batch.
    cfg = LoaderConfig(data_dir=str(out1), batch_size=2, seed=3)
    r0, r1 = TokenLoader(cfg, 0, 2), TokenLoader(cfg, 1, 2)
    b0, b1 = r0.batch(0), r1.batch(0)
    assert b0.shape == (2, 33) and b0.dtype == torch.int64
    all_rows = {tuple(r) for s in manifest1["shards"] for r in read_shard(out1 / s["path"]).tolist()}
    assert {tuple(r) for r in b0.tolist() + b1.tolist()} <= all_rows
    assert not {tuple(r) for r in b0.tolist()} & {tuple(r) for r in b1.tolist()}


def _run_until_paused(cfg_path: Path, pause_at: str, address: str):
    env = dict(os.environ, RAY_ADDRESS=address, RAYMOE_INGEST_PAUSE_AT=pause_at, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipelines.ingest", "--config", str(cfg_path)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    # A run that never reaches the pause point must not hang the suite: kill it after 3 minutes.
    guard = threading.Timer(180, lambda: _kill(proc))
    guard.start()
    log = []
    assert proc.stdout is not None  # stdout=PIPE
    for line in proc.stdout:
        log.append(line)
        if line.startswith(f"PAUSED {pause_at}"):
            guard.cancel()
            return proc, "".join(log)
    guard.cancel()
    raise AssertionError(f"ingest exited ({proc.wait()}) before {pause_at}:\n{''.join(log[-30:])}")


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_killed_runs_resume_to_the_same_result(ray_cluster, corpus, reference_run, tmp_path):
    root, _ = corpus
    out_ref, manifest_ref = reference_run
    out = tmp_path / "killed"
    cfg_path = tmp_path / "ingest.yaml"
    # One file per work unit, so the first kill lands with most units unfinished.
    cfg_path.write_text(yaml.safe_dump(_config(root, out, unit_bytes=1)))
    address = ray_cluster.get_runtime_context().gcs_address
    # Kill 1: after the first cleaned unit. Kill 2: after the first shard is written.
    logs = []
    for point in ("clean:1", "shard:1"):
        proc, log = _run_until_paused(cfg_path, point, address)
        _kill(proc)
        logs.append(log)
        assert not (out / "manifest.json").exists()
    assert "ingest: clean 18 of 18 work units" in logs[0]
    # The second run resumed: it did not clean every unit again.
    assert "ingest: clean 18 of 18" not in logs[1] and "ingest: clean " in logs[1]
    assert (out / "train/shard-00000.parquet").is_file()
    # A crashed writer's temp file is cleaned up, never taken for a shard.
    (out / "train/.shard-00001.parquet.x1y2.tmp").write_bytes(b"half a shard")
    manifest = run_ingest(from_dict(IngestConfig, _config(root, out, unit_bytes=1)))
    stats = json.loads((out / "ingest_stats.json").read_text())
    assert stats["clean_units"]["run"] == 0 and stats["shards"]["unchanged"] >= 1
    assert stable_view(manifest) == stable_view(manifest_ref)
    assert sorted(p.name for p in (out / "train").iterdir()) == sorted(
        Path(s["path"]).name for s in manifest_ref["shards"]
    )
    for shard in manifest_ref["shards"]:
        assert (out / shard["path"]).read_bytes() == (out_ref / shard["path"]).read_bytes()
    assert read_manifest(out)["counts"] == manifest_ref["counts"]
