"""Shard writer/reader, atomic writes, manifest checks, quarantine file, reference profile."""

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from raymoe.atomic_io import atomic_write_bytes, remove_stale_temps
from raymoe.data.manifest import read_manifest, stable_view, verify_shards, write_manifest
from raymoe.data.profile import DOC_LENGTH_EDGES, length_histogram, token_unigram
from raymoe.data.quarantine import quarantine_entry, read_quarantine, write_quarantine
from raymoe.data.shards import read_row_group, read_shard, row_group_sizes, write_shard


def _rows(n, row_len=5, seed=0):
    return np.random.default_rng(seed).integers(0, 2048, size=(n, row_len), dtype=np.int32)


def test_round_trip_and_row_groups(tmp_path):
    rows = _rows(10)
    info = write_shard(tmp_path / "s.parquet", rows, row_group_rows=4)
    assert np.array_equal(read_shard(tmp_path / "s.parquet"), rows)
    assert row_group_sizes(tmp_path / "s.parquet") == [4, 4, 2]
    assert np.array_equal(read_row_group(tmp_path / "s.parquet", 2), rows[8:])
    data = (tmp_path / "s.parquet").read_bytes()
    assert info == {
        "rows": 10,
        "tokens": 50,
        "bytes": len(data),
        "row_groups": 3,
        "sha256": "sha256:" + hashlib.sha256(data).hexdigest(),
        "written": True,
    }


def test_same_rows_same_bytes_and_no_rewrite(tmp_path):
    rows = _rows(7)
    write_shard(tmp_path / "a.parquet", rows, 3)
    write_shard(tmp_path / "b.parquet", rows, 3)
    assert (tmp_path / "a.parquet").read_bytes() == (tmp_path / "b.parquet").read_bytes()
    mtime = (tmp_path / "a.parquet").stat().st_mtime_ns
    assert write_shard(tmp_path / "a.parquet", rows, 3)["written"] is False
    assert (tmp_path / "a.parquet").stat().st_mtime_ns == mtime
    assert write_shard(tmp_path / "a.parquet", _rows(7, seed=1), 3)["written"] is True


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    from raymoe.atomic_io import atomic_write

    (tmp_path / "x").write_bytes(b"old")

    def broken(tmp):
        Path(tmp).write_bytes(b"half")
        raise RuntimeError("crash")

    with pytest.raises(RuntimeError):
        atomic_write(tmp_path / "x", broken)
    assert (tmp_path / "x").read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x"]


def test_stale_temps_are_removed(tmp_path):
    atomic_write_bytes(tmp_path / "shard-00000.parquet", b"ok")
    (tmp_path / ".shard-00001.parquet.abc.tmp").write_bytes(b"half")
    assert remove_stale_temps(tmp_path) == 1
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000.parquet"]


def _manifest(tmp_path):
    info = write_shard(tmp_path / "train/shard-00000.parquet", _rows(4), 2)
    info.pop("written")
    manifest = {
        "format_version": 1,
        "created_at": "t",
        "tokenizer": {},
        "seq_len": 4,
        "row_len": 5,
        "counts": {},
        "shards": [{"path": "train/shard-00000.parquet", "split": "train", **info}],
    }
    write_manifest(tmp_path, manifest)
    return manifest


def test_manifest_round_trip_and_verify(tmp_path):
    manifest = _manifest(tmp_path)
    assert read_manifest(tmp_path) == manifest
    verify_shards(tmp_path, manifest)
    assert "created_at" not in stable_view(manifest)


def test_verify_names_the_bad_shard(tmp_path):
    manifest = _manifest(tmp_path)
    path = tmp_path / "train/shard-00000.parquet"
    data = bytearray(path.read_bytes())
    data[10] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shard train/shard-00000\.parquet: sha256"):
        verify_shards(tmp_path, manifest)
    path.unlink()
    with pytest.raises(ValueError, match=r"train/shard-00000\.parquet listed in the manifest is missing"):
        verify_shards(tmp_path, manifest)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run the ingest pipeline"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 99}))
    with pytest.raises(ValueError, match="format_version must be 1, got 99"):
        read_manifest(tmp_path)


def test_quarantine_file_sorted_and_reasons_checked(tmp_path):
    entries = [
        quarantine_entry("s", "b.jsonl:3", "bad_json", "x", b"{bad\xff"),
        quarantine_entry("s", "a.txt", "empty_file", "0 bytes", None),
    ]
    write_quarantine(tmp_path, entries)
    got = read_quarantine(tmp_path)
    assert [e["location"] for e in got] == ["a.txt", "b.jsonl:3"]
    assert got[1]["sample"] == "{bad\\xff"
    with pytest.raises(ValueError, match="quarantine reason must be one of"):
        quarantine_entry("s", "a", "too_short", "", None)


def test_profile_histograms():
    # Tokens 0,1,1,3 over vocab 4 -> [1, 2, 0, 1].
    assert token_unigram([np.array([[0, 1], [1, 3]])], 4).tolist() == [1, 2, 0, 1]
    with pytest.raises(ValueError, match="out of range"):
        token_unigram([np.array([4])], 4)
    # Lengths 0 and 15 in [0,16); 16 in [16,32); 2**21 in the open last bin.
    hist = length_histogram([0, 15, 16, 2**21])
    assert hist[:2] == [2, 1] and hist[-1] == 1 and sum(hist) == 4
    assert len(hist) == len(DOC_LENGTH_EDGES)
