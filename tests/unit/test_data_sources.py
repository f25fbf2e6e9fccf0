"""Listing sources and reading files into records, including every damaged-file case and bundles."""

import gzip
import hashlib
import io
import json
from dataclasses import asdict

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raymoe.config import ConfigError
from raymoe.data.corpus_bundle import ChecksumError
from raymoe.data.decode import DecodeConfig
from raymoe.data.dedup import DedupConfig
from raymoe.data.filters import FilterConfig
from raymoe.data.normalize import NormalizeConfig
from raymoe.data.pii import PIIConfig
from raymoe.data.sources import SourceConfig, file_format, list_files, read_file
from raymoe.data.units import clean_unit


def _parquet_bytes(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink)
    return sink.getvalue()


def _refs(tmp_path, **kw):
    cfg = SourceConfig(name="s", paths=[str(tmp_path)], **kw)
    return {r.path.rsplit("/", 1)[1]: r for r in list_files(cfg)}


def test_format_by_extension():
    assert file_format("a/b.PY", "auto") == "text"
    assert file_format("x.jsonl.gz", "auto") == "jsonl"
    assert file_format("x.parquet", "auto") == "parquet"
    assert file_format("x.bin", "auto") is None
    assert file_format("x.bin", "jsonl") == "jsonl"


def test_listing_walks_dirs_globs_and_uris_sorted(tmp_path):
    # Prepare
    (tmp_path / "sub").mkdir()
    for name in ("b.txt", "a.md", "sub/c.py", "skip.bin"):
        (tmp_path / name).write_text("x")
    # Execute
    by_dir = list_files(SourceConfig(name="s", paths=[str(tmp_path)]))
    by_glob = list_files(SourceConfig(name="s", paths=[str(tmp_path / "*.txt")]))
    by_uri = list_files(SourceConfig(name="s", paths=[f"file://{tmp_path}/b.txt"]))
    by_uri_glob = list_files(SourceConfig(name="s", paths=[f"file://{tmp_path}/*.??"]))
    by_uri_deep = list_files(SourceConfig(name="s", paths=[f"file://{tmp_path}/**.py"]))
    # Assert
    assert [r.path for r in by_dir] == [str(tmp_path / n) for n in ("a.md", "b.txt", "sub/c.py")]
    assert [r.path for r in by_glob] == [str(tmp_path / "b.txt")]
    assert [r.path for r in by_uri] == [str(tmp_path / "b.txt")]
    # "*.??" matches a.md only, and does not descend into sub/; "**" does.
    assert [r.path for r in by_uri_glob] == [str(tmp_path / "a.md")]
    assert [r.path for r in by_uri_deep] == [str(tmp_path / "sub/c.py")]
    assert by_dir[1].size == 1 and by_dir[1].format == "text"


def test_missing_path_is_an_error_naming_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"sources\[s\]\.paths: .*nope"):
        list_files(SourceConfig(name="s", paths=[str(tmp_path / "nope")]))


def test_source_config_checks():
    with pytest.raises(ConfigError, match=r"sources\[s\]\.weight"):
        SourceConfig(name="s", paths=["x"], weight=-1)
    with pytest.raises(ConfigError, match="paths"):
        SourceConfig(name="s", paths=[])


def test_text_and_empty_files(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello")
    (tmp_path / "e.txt").write_bytes(b"")
    refs = _refs(tmp_path)
    [a] = read_file(refs["a.txt"])
    [e] = read_file(refs["e.txt"])
    assert (a["raw"], a["reason"], a["kind"], a["nbytes"]) == (b"hello", "", "text", 5)
    assert (e["reason"], e["location"]) == ("empty_file", refs["e.txt"].path)


def test_jsonl_lines_keep_their_line_numbers(tmp_path):
    # Line 2 is blank and is not a record.
    (tmp_path / "d.jsonl").write_bytes(b'{"t": "a"}\n\n{bad\n')
    ref = _refs(tmp_path, text_field="t")["d.jsonl"]
    rows = read_file(ref)
    assert [r["location"] for r in rows] == [f"{ref.path}:1", f"{ref.path}:3"]
    assert [r["kind"] for r in rows] == ["json", "json"]
    assert rows[1]["raw"] == b"{bad"


def test_gzip_good_truncated_and_corrupt(tmp_path):
    payload = gzip.compress(b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(200)))
    (tmp_path / "good.jsonl.gz").write_bytes(payload)
    (tmp_path / "trunc.jsonl.gz").write_bytes(payload[: len(payload) // 2])
    (tmp_path / "junk.jsonl.gz").write_bytes(b"not gzip at all")
    refs = _refs(tmp_path)
    assert len(read_file(refs["good.jsonl.gz"])) == 200
    [t] = read_file(refs["trunc.jsonl.gz"])
    [j] = read_file(refs["junk.jsonl.gz"])
    assert t["reason"] == "truncated_gzip" and t["location"] == refs["trunc.jsonl.gz"].path
    assert j["reason"] == "corrupt_gzip"


def test_parquet_rows_nulls_truncation_and_wrong_types(tmp_path):
    good = _parquet_bytes(pa.table({"text": ["a", None, "c"], "n": [1, 2, 3]}))
    (tmp_path / "good.parquet").write_bytes(good)
    (tmp_path / "trunc.parquet").write_bytes(good[: len(good) // 2])
    (tmp_path / "int.parquet").write_bytes(_parquet_bytes(pa.table({"text": [1, 2]})))
    (tmp_path / "nocol.parquet").write_bytes(_parquet_bytes(pa.table({"body": ["x"]})))
    refs = _refs(tmp_path)
    rows = read_file(refs["good.parquet"])
    assert [r["raw"] for r in rows] == [b"a", None, b"c"]
    assert [r["reason"] for r in rows] == ["", "missing_field", ""]
    assert rows[2]["location"] == refs["good.parquet"].path + "#2"
    assert [r["reason"] for r in read_file(refs["trunc.parquet"])] == ["corrupt_parquet"]
    assert [r["reason"] for r in read_file(refs["int.parquet"])] == ["wrong_field_type"]
    assert [r["reason"] for r in read_file(refs["nocol.parquet"])] == ["missing_field"]


def test_unreadable_file(tmp_path):
    (tmp_path / "a.txt").write_text("x")
    ref = _refs(tmp_path)["a.txt"]
    (tmp_path / "a.txt").unlink()  # gone between listing and reading
    [row] = read_file(ref)
    assert row["reason"] == "unreadable_file"


def _bundle(tmp_path, lines: list[bytes], *, sidecar: bool = True):
    """Writes `lines` as a gzip JSONL bundle (with a correct sidecar); returns its FileRef."""
    data = gzip.compress(b"".join(line + b"\n" for line in lines), mtime=0)
    path = tmp_path / "corpus.jsonl.gz"
    path.write_bytes(data)
    if sidecar:
        (tmp_path / "corpus.jsonl.gz.sha256").write_text(f"{hashlib.sha256(data).hexdigest()}  corpus.jsonl.gz\n")
    [ref] = list_files(SourceConfig(name="s", paths=[str(path)], id_field="id"))
    return ref


def test_bundle_records_are_named_by_id_and_bad_lines_by_line(tmp_path):
    # Prepare: two good documents, then one line of each kind of damage.
    ref = _bundle(
        tmp_path,
        [
            json.dumps({"id": "pkg/a.py", "text": "caf\u00e9\n", "license": "MIT"}, ensure_ascii=False).encode(),
            json.dumps({"id": "b.txt", "text": "second"}).encode(),
            b'{"id": "c.txt", "text": "unterminated',  # line 3: bad_json
            json.dumps({"text": "no id"}).encode(),  # line 4: missing_field (id)
            json.dumps({"id": ["x"], "text": "list id"}).encode(),  # line 5: wrong_field_type
            json.dumps({"id": "d.txt", "text": 7}).encode(),  # wrong_field_type (text)
            b'{"id": "e.txt", "text": "bad \xc3\x28 utf8"}',  # line 7: undecodable
        ],
    )
    # Execute
    rows = read_file(ref)
    cleaned = clean_unit(
        [asdict(ref)],
        DecodeConfig(),
        NormalizeConfig(),
        PIIConfig(),
        FilterConfig(min_chars=1),
        DedupConfig(near=False),
    ).to_pylist()
    # Assert: good records carry the text's own UTF-8 bytes, located by id.
    assert [(r["location"], r["kind"], r["raw"]) for r in rows[:2]] == [
        (f"{ref.path}#pkg/a.py", "text", "caf\u00e9\n".encode()),
        (f"{ref.path}#b.txt", "text", b"second"),
    ]
    assert [(c["location"].removeprefix(ref.path), c["reason"]) for c in cleaned] == [
        ("#pkg/a.py", ""),
        ("#b.txt", ""),
        (":3", "bad_json"),
        (":4", "missing_field"),
        (":5", "wrong_field_type"),
        ("#d.txt", "wrong_field_type"),
        (":7", "undecodable"),
    ]
    assert cleaned[3]["detail"] == "no field 'id'"


def test_listing_checks_a_bundles_sidecar(tmp_path):
    # Prepare
    ref = _bundle(tmp_path, [b'{"id": "a", "text": "x"}'])
    assert ref.id_field == "id"
    # Execute: the bundle changes after its checksum was written.
    (tmp_path / "corpus.jsonl.gz").write_bytes(gzip.compress(b'{"id": "a", "text": "y"}\n'))
    # Assert
    with pytest.raises(ChecksumError, match=r"corpus\.jsonl\.gz: sha256 [0-9a-f]{64} does not"):
        list_files(SourceConfig(name="s", paths=[str(tmp_path)]))
    (tmp_path / "corpus.jsonl.gz.sha256").unlink()  # no sidecar: nothing to check
    assert len(list_files(SourceConfig(name="s", paths=[str(tmp_path)]))) == 1


def test_id_field_must_not_be_empty():
    with pytest.raises(ConfigError, match=r"sources\[s\]\.id_field"):
        SourceConfig(name="s", paths=["x"], id_field="")
