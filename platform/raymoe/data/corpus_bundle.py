"""Corpus bundles: a directory of text or code files shipped as one gzip JSONL file + checksum.

A corpus that ships with the repository is data, not source files: linters, type checkers and code
search must not take a copy of someone else's library for ours. A bundle holds one document per
line, sorted by `id`:

    {"id": "ast.py", "text": "...", "license": "PSF-2.0"}

`id` is the file's path relative to the bundled directory (POSIX separators), `text` its exact
contents (UTF-8, nothing normalised: re-encoding `text` gives the file's bytes back) and `license`
the SPDX identifier of the whole bundle, repeated on every line so a document keeps it wherever it
goes. The gzip stream has mtime 0 and no file name, so the same files give the same bytes. Beside
the bundle, `<bundle>.sha256` holds the SHA-256 of its bytes in `sha256sum` format
(`sha256sum -c code.jsonl.gz.sha256` checks it as well).

Ingestion reads a bundle as any JSONL source, with `id_field: id` so each document is named by its
original path (raymoe.data.sources), after checking the sidecar.

    python -m raymoe.data.corpus_bundle build SRC_DIR OUT.jsonl.gz --license PSF-2.0 \
        [--glob '*.py'] [--max-file-bytes N] [--max-total-bytes N]
    python -m raymoe.data.corpus_bundle verify OUT.jsonl.gz [...]

Selection (`select_files`): the files under SRC_DIR matching `--glob`, in order of relative path;
a file over `--max-file-bytes` is skipped, and so is a file that would take the running total
over `--max-total-bytes` (later, smaller files may still fit).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from raymoe.atomic_io import atomic_write_bytes

SIDECAR_SUFFIX = ".sha256"
# Files are hashed in chunks this big, so a large bundle is never read into memory whole.
_HASH_CHUNK_BYTES = 1 << 20


class ChecksumError(ValueError):
    """A file's bytes do not match its `.sha256` sidecar."""


@dataclass(frozen=True)
class BundleInfo:
    """What `build_bundle` wrote: the bundle, its document count, text bytes and SHA-256 (hex)."""

    path: Path
    num_documents: int
    text_bytes: int
    sha256: str


def sidecar_path(path: str) -> str:
    """The checksum file of `path`: `path` + `.sha256`."""
    return path + SIDECAR_SUFFIX


def sidecar_text(digest: str, name: str) -> str:
    """A `sha256sum`-format line for the file `name` (a base name) with hex `digest`."""
    return f"{digest}  {name}\n"


def parse_sidecar(text: str, where: str) -> str:
    """The hex digest from a `sha256sum`-format sidecar.

    Raises:
        ChecksumError: the sidecar is not one `<64 hex digits>  <name>` line (names `where`).
    """
    fields = text.split()
    digest = fields[0].lower() if fields else ""
    if len(fields) != 2 or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise ChecksumError(f"{where}: expected one '<sha256 hex>  <file name>' line, got {text[:120]!r}")
    return digest


def check_digest(path: str, actual: str, sidecar: str) -> None:
    """Compares a file's digest with its sidecar's text.

    Raises:
        ChecksumError: they differ; the message names the file and both digests.
    """
    expected = parse_sidecar(sidecar, sidecar_path(path))
    if actual != expected:
        raise ChecksumError(
            f"{path}: sha256 {actual} does not match {expected} in "
            f"{sidecar_path(path)}; the file changed after it was built"
        )


def file_sha256(path: str | Path) -> str:
    """Hex SHA-256 of a local file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_HASH_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


def bundle_bytes(documents: Iterable[tuple[str, str]], license: str) -> bytes:
    """The gzip JSONL bytes of (id, text) pairs, one line each in the order given, gzip mtime 0."""
    lines = [
        json.dumps({"id": ident, "text": text, "license": license}, ensure_ascii=False) for ident, text in documents
    ]
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    return gzip.compress(data, compresslevel=9, mtime=0)


def select_files(
    src_dir: str | Path, glob: str = "**/*", max_file_bytes: int | None = None, max_total_bytes: int | None = None
) -> list[Path]:
    """The files of `src_dir` to bundle, sorted by relative POSIX path (see the module docstring).

    Args:
        src_dir: directory to bundle.
        glob: pattern relative to `src_dir` (`**` descends).
        max_file_bytes: skip files larger than this many bytes (None: no limit).
        max_total_bytes: skip a file that would take the total past this many bytes (None: no
            limit).
    """
    root = Path(src_dir)
    paths = sorted((p for p in root.glob(glob) if p.is_file()), key=lambda p: p.relative_to(root).as_posix())
    chosen, total = [], 0
    for path in paths:
        size = path.stat().st_size
        if max_file_bytes is not None and size > max_file_bytes:
            continue
        if max_total_bytes is not None and total + size > max_total_bytes:
            continue
        chosen.append(path)
        total += size
    return chosen


def build_bundle(
    src_dir: str | Path,
    out: str | Path,
    *,
    license: str,
    glob: str = "**/*",
    max_file_bytes: int | None = None,
    max_total_bytes: int | None = None,
) -> BundleInfo:
    """Writes the files `select_files` picks as a bundle at `out`, and its `.sha256` sidecar.

    Both are written atomically; the bundle first, so a sidecar never vouches for a file that is
    not there.

    Raises:
        ValueError: no file matches, `license` is empty, or a file is not UTF-8 (names the file
            and the byte offset).
    """
    if not license.strip():
        raise ValueError("license must name the bundle's license (an SPDX id such as PSF-2.0)")
    root = Path(src_dir)
    paths = select_files(root, glob, max_file_bytes, max_total_bytes)
    if not paths:
        raise ValueError(f"{root}: no file matches {glob!r} within the size limits")
    documents = []
    for path in paths:
        raw = path.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ValueError(f"{path}: not UTF-8 at byte {exc.start} ({exc.reason})") from exc
        documents.append((path.relative_to(root).as_posix(), text))
    data = bundle_bytes(documents, license)
    out = Path(out)
    atomic_write_bytes(out, data)
    digest = hashlib.sha256(data).hexdigest()
    atomic_write_bytes(sidecar_path(str(out)), sidecar_text(digest, out.name).encode())
    return BundleInfo(out, len(documents), sum(len(t.encode("utf-8")) for _, t in documents), digest)


def verify_bundle(path: str | Path) -> str:
    """Checks a local file against its `.sha256` sidecar; returns the hex digest.

    Raises:
        FileNotFoundError: the file or its sidecar is missing.
        ChecksumError: the digests differ, or the sidecar is malformed.
    """
    path = str(path)
    sidecar = Path(sidecar_path(path)).read_text(encoding="utf-8")
    actual = file_sha256(path)
    check_digest(path, actual, sidecar)
    return actual


def read_bundle(path: str | Path, *, verify: bool = True) -> dict[str, str]:
    """A bundle's documents, id -> text, in file order (for tools that need the exact texts).

    Ingestion does not use this: it reads bundles leniently, quarantining bad lines
    (raymoe.data.sources). Here any bad line is an error.

    Raises:
        ChecksumError, FileNotFoundError: see `verify_bundle` (when `verify`).
        ValueError: a line is not a JSON object with string `id` and `text` (names the line).
    """
    if verify:
        verify_bundle(path)
    documents: dict[str, str] = {}
    lines = gzip.decompress(Path(path).read_bytes()).decode("utf-8").split("\n")
    for lineno, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: bad JSON ({exc.msg} at column {exc.colno})") from exc
        if not (isinstance(obj, dict) and isinstance(obj.get("id"), str) and isinstance(obj.get("text"), str)):
            raise ValueError(f"{path}:{lineno}: expected an object with string 'id' and 'text'")
        if obj["id"] in documents:
            raise ValueError(f"{path}:{lineno}: id {obj['id']!r} appears twice")
        documents[obj["id"]] = obj["text"]
    return documents


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m raymoe.data.corpus_bundle",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    verbs = parser.add_subparsers(dest="verb", required=True)
    build = verbs.add_parser("build", help="bundle a directory of text files")
    build.add_argument("src_dir")
    build.add_argument("out", help="bundle to write, e.g. data/corpus/code.jsonl.gz")
    build.add_argument("--license", required=True, help="SPDX id of the files' license")
    build.add_argument("--glob", default="**/*", help="files to take, relative to src_dir")
    build.add_argument("--max-file-bytes", type=int, default=None)
    build.add_argument("--max-total-bytes", type=int, default=None)
    verify = verbs.add_parser("verify", help="check bundles against their .sha256 sidecars")
    verify.add_argument("paths", nargs="+")
    args = parser.parse_args(argv)
    if args.verb == "build":
        info = build_bundle(
            args.src_dir,
            args.out,
            license=args.license,
            glob=args.glob,
            max_file_bytes=args.max_file_bytes,
            max_total_bytes=args.max_total_bytes,
        )
        print(f"{info.path}: {info.num_documents} documents, {info.text_bytes} text bytes, sha256 {info.sha256}")
        return 0
    failed = 0
    for path in args.paths:
        try:
            print(f"{path}: OK sha256 {verify_bundle(path)}")
        except (OSError, ChecksumError) as exc:
            print(f"{path}: FAILED {exc}", file=sys.stderr)
            failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
