"""Corpus bundles: a directory written as one gzip JSONL file + sha256 sidecar, and read back."""

import gzip
import hashlib
import json
from pathlib import Path

import pytest

from raymoe.data.corpus_bundle import (
    ChecksumError,
    build_bundle,
    bundle_bytes,
    main,
    read_bundle,
    select_files,
    verify_bundle,
)

ROOT = Path(__file__).resolve().parents[2]


def _tree(root: Path) -> dict[str, bytes]:
    """Writes a small directory to bundle; returns its files' bytes by relative path."""
    files = {
        "b.py": b"def f():\n    return 1\n",
        "a.txt": 'caf\u00e9 \u2028 line\r\nnext "quoted" \\ tab\t\n'.encode(),
        "sub/c.txt": b"\xef\xbb\xbfwith a byte order mark\n",
        "a.py": b"",
    }
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return files


def test_round_trip_keeps_every_byte_sorted_by_path(tmp_path):
    # Prepare
    files = _tree(tmp_path / "src")
    out = tmp_path / "out" / "corpus.jsonl.gz"
    # Execute
    info = build_bundle(tmp_path / "src", out, license="PSF-2.0")
    docs = read_bundle(out)
    # Assert: "a.py" < "a.txt" < "b.py" < "sub/c.txt" as strings; texts re-encode to the files.
    assert list(docs) == ["a.py", "a.txt", "b.py", "sub/c.txt"]
    assert {k: v.encode("utf-8") for k, v in docs.items()} == files
    assert (info.num_documents, info.text_bytes) == (4, sum(len(v) for v in files.values()))
    # split("\n"), not splitlines(): U+2028 inside a text is not a record boundary.
    lines = gzip.decompress(out.read_bytes()).decode().split("\n")[:-1]
    assert [json.loads(line)["license"] for line in lines] == ["PSF-2.0"] * 4
    sidecar = Path(f"{out}.sha256").read_text()
    assert sidecar == f"{hashlib.sha256(out.read_bytes()).hexdigest()}  corpus.jsonl.gz\n"
    assert info.sha256 == verify_bundle(out)


def test_same_files_give_the_same_bytes(tmp_path):
    _tree(tmp_path / "src")
    first = build_bundle(tmp_path / "src", tmp_path / "one.jsonl.gz", license="MIT")
    # Touching the files (new mtimes) must not change the bundle.
    for path in (tmp_path / "src").rglob("*"):
        if path.is_file():
            path.write_bytes(path.read_bytes())
    second = build_bundle(tmp_path / "src", tmp_path / "two.jsonl.gz", license="MIT")
    assert (tmp_path / "one.jsonl.gz").read_bytes() == (tmp_path / "two.jsonl.gz").read_bytes()
    assert first.sha256 == second.sha256
    # gzip header: mtime field (bytes 4-8) is zero.
    assert (tmp_path / "one.jsonl.gz").read_bytes()[4:8] == b"\0\0\0\0"


def test_selection_by_glob_and_size_limits(tmp_path):
    # Prepare: sizes 5, 20, 7, 9 bytes in name order.
    for name, size in (("a.py", 5), ("b.py", 20), ("c.py", 7), ("d.py", 9), ("e.txt", 1)):
        (tmp_path / name).write_bytes(b"x" * size)
    # Execute
    picked = select_files(tmp_path, "*.py", max_file_bytes=10, max_total_bytes=15)
    # Assert: b (20 > 10) skipped; a (5) + c (7) = 12; d would make 21 > 15, skipped.
    assert [p.name for p in picked] == ["a.py", "c.py"]


def test_checksum_mismatch_is_detected_and_names_the_file(tmp_path):
    _tree(tmp_path / "src")
    out = tmp_path / "corpus.jsonl.gz"
    build_bundle(tmp_path / "src", out, license="MIT")
    out.write_bytes(bundle_bytes([("a.txt", "changed")], "MIT"))
    with pytest.raises(ChecksumError, match=r"corpus\.jsonl\.gz: sha256 .* does not match"):
        verify_bundle(out)
    with pytest.raises(ChecksumError):
        read_bundle(out)
    assert read_bundle(out, verify=False) == {"a.txt": "changed"}
    assert main(["verify", str(out)]) == 1


def test_malformed_sidecar_and_missing_sidecar(tmp_path):
    out = tmp_path / "c.jsonl.gz"
    out.write_bytes(bundle_bytes([("a", "b")], "MIT"))
    with pytest.raises(FileNotFoundError):
        verify_bundle(out)
    Path(f"{out}.sha256").write_text("not a digest\n")
    with pytest.raises(ChecksumError, match=r"c\.jsonl\.gz\.sha256: expected one"):
        verify_bundle(out)


def test_build_refuses_non_utf8_no_files_and_no_license(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(ValueError, match="no file matches"):
        build_bundle(tmp_path / "src", tmp_path / "x.jsonl.gz", license="MIT")
    (tmp_path / "src" / "bad.txt").write_bytes(b"ok \xff")
    with pytest.raises(ValueError, match=r"bad\.txt: not UTF-8 at byte 3"):
        build_bundle(tmp_path / "src", tmp_path / "x.jsonl.gz", license="MIT")
    with pytest.raises(ValueError, match="license"):
        build_bundle(tmp_path / "src", tmp_path / "x.jsonl.gz", license=" ")
    assert not (tmp_path / "x.jsonl.gz").exists()


def test_strict_reader_names_a_bad_line(tmp_path):
    out = tmp_path / "c.jsonl.gz"
    good = json.dumps({"id": "a", "text": "x"})
    out.write_bytes(gzip.compress(f"{good}\n{{broken\n".encode()))
    with pytest.raises(ValueError, match=r"c\.jsonl\.gz:2: bad JSON"):
        read_bundle(out, verify=False)


def test_cli_build_then_verify(tmp_path, capsys):
    _tree(tmp_path / "src")
    out = tmp_path / "c.jsonl.gz"
    assert main(["build", str(tmp_path / "src"), str(out), "--license", "MIT", "--glob", "*.py"]) == 0
    assert list(read_bundle(out)) == ["a.py", "b.py"]
    assert main(["verify", str(out)]) == 0
    assert "OK sha256" in capsys.readouterr().out


def test_shipped_bundles_match_their_checksums_and_readme():
    # The README states 97 modules and 79 topics; prose/if.txt repeats prose/else.txt.
    code = read_bundle(ROOT / "data/corpus/code.jsonl.gz")
    prose = read_bundle(ROOT / "data/corpus/prose.jsonl.gz")
    assert len(code) == 97 and all(name.endswith(".py") for name in code)
    assert len(prose) == 79 and prose["if.txt"] == prose["else.txt"]
