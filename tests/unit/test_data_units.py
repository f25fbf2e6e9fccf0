"""Work units: planning, and the clean / tokenize functions a Ray task runs for one unit."""

from dataclasses import asdict

import numpy as np

from raymoe.data.decode import DecodeConfig
from raymoe.data.dedup import DedupConfig, content_hash
from raymoe.data.filters import FilterConfig
from raymoe.data.normalize import NormalizeConfig
from raymoe.data.pii import PIIConfig
from raymoe.data.sources import FileRef, SourceConfig, list_files
from raymoe.data.tokenizer import train_tokenizer
from raymoe.data.units import clean_unit, plan_units, tokenize_unit


def _ref(path, size):
    return FileRef("s", path, size, 0, "text", "text")


def test_plan_groups_files_in_order_by_bytes():
    files = [_ref("a", 60), _ref("b", 50), _ref("c", 30), _ref("d", 100)]
    units = plan_units(files, unit_bytes=100, settings_hash="h")
    # a+b would be 110 > 100; b+c = 80 fits; b+c+d would be 180.
    assert [[f["path"] for f in u["files"]] for u in units] == [["a"], ["b", "c"], ["d"]]
    again = plan_units(files, unit_bytes=100, settings_hash="h")
    assert [u["key"] for u in units] == [u["key"] for u in again]
    other = plan_units(files, unit_bytes=100, settings_hash="other settings")
    assert all(a["key"] != b["key"] for a, b in zip(units, other))
    changed = plan_units([_ref("a", 61), *files[1:]], unit_bytes=100, settings_hash="h")
    assert changed[0]["key"] != units[0]["key"] and changed[1]["key"] == units[1]["key"]


def test_clean_unit_keeps_reasons_and_fingerprints_kept_rows(tmp_path):
    # Prepare: a good doc with an e-mail and CRLF, a short one, one with invalid UTF-8, and a
    # JSONL file with one good line and one bad line.
    a = b"Contact me at ann@example.org about the report.\r\n"
    c = b"valid start \xff then broken bytes here"
    line = b'{"text": "a json document long enough to keep"}'
    (tmp_path / "a.txt").write_bytes(a)
    (tmp_path / "b.txt").write_bytes(b"tiny")
    (tmp_path / "c.txt").write_bytes(c)
    (tmp_path / "d.jsonl").write_bytes(line + b"\n[1\n")
    files = [asdict(r) for r in list_files(SourceConfig(name="s", paths=[str(tmp_path)]))]
    # Execute
    table = clean_unit(
        files, DecodeConfig(), NormalizeConfig(), PIIConfig(enabled=True), FilterConfig(min_chars=10), DedupConfig()
    )
    rows = table.to_pylist()
    # Assert
    assert [r["reason"] for r in rows] == ["", "too_short", "undecodable", "", "bad_json"]
    assert rows[0]["text"] == "Contact me at <EMAIL> about the report."
    assert rows[0]["emails"] == 1
    assert rows[0]["hash"] == content_hash(rows[0]["text"])
    assert len(rows[0]["minhash"]) == 128 * 4
    assert rows[1]["text"] is None and rows[1]["hash"] is None
    assert rows[2]["sample"] == "valid start \\xff then broken bytes here"
    assert rows[1]["sample"] == ""  # filtered documents are not quarantined, no sample
    assert rows[4]["location"].endswith("d.jsonl:2")
    # Whole files for text; each JSONL line without its newline.
    assert [r["nbytes"] for r in rows] == [len(a), 4, len(c), len(line), 2]


def test_tokenize_unit_encodes_selected_rows(tmp_path):
    (tmp_path / "a.txt").write_text("first document text")
    (tmp_path / "b.txt").write_text("second document text")
    files = [asdict(r) for r in list_files(SourceConfig(name="s", paths=[str(tmp_path)]))]
    clean = clean_unit(
        files, DecodeConfig(), NormalizeConfig(), PIIConfig(), FilterConfig(min_chars=1), DedupConfig(near=False)
    )
    tok = train_tokenizer(["first second document text"] * 10, 280)
    # Execute: keep only row 1, in the validation split.
    out = tokenize_unit(clean, [(1, "val")], tok)
    # Assert
    assert out.num_rows == 1
    assert out.column("split").to_pylist() == ["val"]
    ids = np.asarray(out.column("tokens")[0].as_py())
    assert tok.decode(ids.tolist()) == "second document text"
    assert tokenize_unit(clean, [], tok).num_rows == 0


def test_each_source_uses_its_own_text_field(tmp_path):
    # Prepare: two JSONL sources whose documents live under different keys.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a/x.jsonl").write_text('{"body": "document under body key"}\n')
    (tmp_path / "b/y.jsonl").write_text('{"text": "document under text key"}\n')
    files = [asdict(r) for r in list_files(SourceConfig(name="a", paths=[str(tmp_path / "a")], text_field="body"))]
    files += [asdict(r) for r in list_files(SourceConfig(name="b", paths=[str(tmp_path / "b")]))]
    # Execute
    rows = clean_unit(
        files, DecodeConfig(), NormalizeConfig(), PIIConfig(), FilterConfig(min_chars=1), DedupConfig(near=False)
    ).to_pylist()
    # Assert
    assert [(r["source"], r["reason"], r["text"]) for r in rows] == [
        ("a", "", "document under body key"),
        ("b", "", "document under text key"),
    ]


def test_parts_commit_resume_and_reload(tmp_path):
    # Prepare: a unit of 3 one-line files, cleaned through the stage chain.
    from raymoe.data.units import (
        CLEAN_STAGES,
        commit_parts,
        load_clean,
        read_records,
        reset_unit,
        unit_done,
    )

    for name in ("a", "b", "c"):
        (tmp_path / f"{name}.txt").write_text(f"document {name} with enough characters")
    files = [asdict(r) for r in list_files(SourceConfig(name="s", paths=[str(tmp_path)]))]
    cfgs = {
        "decode": DecodeConfig(),
        "normalize": NormalizeConfig(),
        "pii": PIIConfig(),
        "filter": FilterConfig(min_chars=1),
        "dedup": DedupConfig(),
    }
    records = read_records("u1", files)
    for name, stage, _ in CLEAN_STAGES:
        records = stage(records, cfgs[name])
    clean_dir = tmp_path / "clean"
    # Execute: commit the last record first, as a separate part (as a split block would be).
    commit_parts(records.slice(2, 1), clean_dir)
    partial = unit_done(clean_dir / "u1")
    summary = commit_parts(records.slice(0, 2), clean_dir)
    # Assert
    assert partial is False and unit_done(clean_dir / "u1") is True
    assert summary == [{"unit": "u1", "records": 2, "bytes": sum(f["size"] for f in files[:2])}]
    loaded = load_clean(clean_dir / "u1")
    assert loaded.column("idx").to_pylist() == [0, 1, 2]
    assert loaded.column("text").to_pylist() == [f"document {n} with enough characters" for n in "abc"]
    assert loaded.equals(clean_unit(files, *cfgs.values()))
    reset_unit(clean_dir / "u1")
    assert unit_done(clean_dir / "u1") is False
