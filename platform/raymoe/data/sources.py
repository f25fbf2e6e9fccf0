"""Sources: where raw documents come from, and reading one file into records.

A source is a list of local paths, globs or pyarrow filesystem URIs (file://, s3://, gs://, ...)
plus a format, the JSON/Parquet text field and a mixing weight. Formats by extension:
`.txt .md .py` (one file = one document), `.jsonl` / `.jsonl.gz` (one line = one record) and
`.parquet` (one row = one record). Reading never raises for bad data: a file that cannot be read
becomes a single record carrying the quarantine reason.

A record's location names it in quarantine: the path for a whole file, `path:LINE` (1-based) for a
JSONL line, `path#ROW` (0-based) for a Parquet row, and `path#ID` for a JSONL line whose
`id_field` names it (corpus bundles, raymoe.data.corpus_bundle: the ID is the document's original
file path). A JSONL or Parquet file with a `<file>.sha256` sidecar is checked against it when the
source is listed; a mismatch is an error naming the file, raised before any work starts, because a
shipped corpus that changed is not bad data to skip but the wrong input.
"""

from __future__ import annotations

import fnmatch
import gzip
import hashlib
import io
import json
import os
import re
import zlib
from dataclasses import dataclass, field
from glob import glob
from typing import Literal

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from raymoe.config import require
from raymoe.data.corpus_bundle import check_digest, sidecar_path

TEXT_EXTENSIONS = (".txt", ".md", ".py")
JSONL_EXTENSIONS = (".jsonl", ".jsonl.gz")
PARQUET_EXTENSIONS = (".parquet",)
ALL_EXTENSIONS = TEXT_EXTENSIONS + JSONL_EXTENSIONS + PARQUET_EXTENSIONS

# File-level quarantine reasons.
EMPTY_FILE = "empty_file"
UNREADABLE_FILE = "unreadable_file"
TRUNCATED_GZIP = "truncated_gzip"
CORRUPT_GZIP = "corrupt_gzip"
CORRUPT_PARQUET = "corrupt_parquet"
MISSING_FIELD = "missing_field"
WRONG_FIELD_TYPE = "wrong_field_type"

RECORD_COLUMNS = ("source", "location", "kind", "field", "raw", "text", "reason", "detail", "nbytes")


@dataclass(kw_only=True)
class SourceConfig:
    """One input source.

    `paths` entries may be directories (walked recursively for known extensions), globs, files,
    or URIs such as s3://bucket/prefix/ that pyarrow's filesystems understand.
    """

    name: str
    paths: list[str]
    format: Literal["auto", "text", "jsonl", "parquet"] = "auto"
    # Field holding the document in JSONL objects / column in Parquet files.
    text_field: str = "text"
    # JSONL key naming each record (`id` in corpus bundles): quarantine then says `path#ID`
    # instead of `path:LINE`. None: records are named by line. JSONL only.
    id_field: str | None = None
    # Mixing weight for the training split: 2.0 repeats each document twice, 0.5 keeps a
    # deterministic half (chosen by document hash).
    weight: float = 1.0
    extensions: list[str] = field(default_factory=lambda: list(ALL_EXTENSIONS))

    def __post_init__(self) -> None:
        require(bool(self.name), "sources[].name must be a non-empty string")
        require(bool(self.paths), f"sources[{self.name}].paths must list at least one path")
        require(
            0 <= self.weight < float("inf"), f"sources[{self.name}].weight must be >= 0 and finite, got {self.weight}"
        )
        require(
            self.format in ("auto", "text", "jsonl", "parquet"),
            f"sources[{self.name}].format must be auto, text, jsonl or parquet, got {self.format!r}",
        )
        require(
            self.id_field is None or bool(self.id_field),
            f"sources[{self.name}].id_field must be a non-empty key or null, got ''",
        )


@dataclass(frozen=True)
class FileRef:
    """One input file: `path` is an absolute local path or a URI; size and mtime detect changes."""

    source: str
    path: str
    size: int
    mtime_ns: int
    format: str
    text_field: str
    id_field: str | None = None


def file_format(path: str, declared: str) -> str | None:
    """`text`, `jsonl` or `parquet` for `path` (None: not a known extension)."""
    if declared != "auto":
        return declared
    lower = path.lower()
    if lower.endswith(JSONL_EXTENSIONS):
        return "jsonl"
    if lower.endswith(PARQUET_EXTENSIONS):
        return "parquet"
    if lower.endswith(TEXT_EXTENSIONS):
        return "text"
    return None


def _filesystem(path: str) -> tuple[pafs.FileSystem, str]:
    if "://" in path:
        return pafs.FileSystem.from_uri(path)
    return pafs.LocalFileSystem(), os.path.abspath(path)


def _uri(path: str, fs_path: str) -> str:
    """Path to store in a FileRef: absolute local path, or scheme://fs_path for remote files."""
    if "://" not in path or path.startswith("file://"):
        return fs_path
    return f"{path.split('://', 1)[0]}://{fs_path}"


def list_files(cfg: SourceConfig) -> list[FileRef]:
    """Expands a source's paths into files, sorted by path, each listed once.

    Raises:
        FileNotFoundError: a path matches nothing (a typo must not yield an empty corpus).
    """
    found: dict[str, FileRef] = {}
    for entry in cfg.paths:
        matched = 0
        has_glob = any(c in entry for c in "*?[")
        candidates = sorted(glob(entry, recursive=True)) if has_glob and "://" not in entry else [entry]
        for cand in candidates:
            if has_glob and "://" in cand:
                # Remote glob: list below the fixed prefix, then match; `**` descends.
                base = re.split(r"[*?\[]", cand, maxsplit=1)[0].rsplit("/", 1)[0]
                fs, root = _filesystem(base)
                selector = pafs.FileSelector(root, recursive="**" in cand)
                pattern = root + cand[len(base) :]  # not from_uri: "?" would start a query
                infos = [
                    i
                    for i in fs.get_file_info(selector)
                    if fnmatch.fnmatch(i.path, pattern) and ("**" in cand or i.path.count("/") == pattern.count("/"))
                ]
            else:
                fs, root = _filesystem(cand)
                info = fs.get_file_info(root)
                if info.type == pafs.FileType.Directory:
                    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True))
                    infos = [i for i in infos if i.path.lower().endswith(tuple(cfg.extensions))]
                elif info.type == pafs.FileType.File:
                    infos = [info]
                else:
                    infos = []
            for info in infos:
                if info.type != pafs.FileType.File:
                    continue
                fmt = file_format(info.path, cfg.format)
                if fmt is None:
                    continue
                uri = _uri(cand, info.path)
                mtime = info.mtime_ns or 0
                found[uri] = FileRef(cfg.name, uri, info.size or 0, mtime, fmt, cfg.text_field, cfg.id_field)
                matched += 1
        if matched == 0:
            raise FileNotFoundError(f"sources[{cfg.name}].paths: {entry!r} matches no input file")
    refs = [found[k] for k in sorted(found)]
    for ref in refs:
        if ref.format != "text":
            verify_sidecar(ref.path)
    return refs


def verify_sidecar(path: str) -> bool:
    """Checks a file against its `<path>.sha256` sidecar, if it has one; True when checked.

    Reads the whole file once (on the driver, at listing time).

    Raises:
        ChecksumError: the file's SHA-256 differs from the sidecar's, or the sidecar is malformed;
            the message names the file.
    """
    fs, fs_path = _filesystem(path)
    side = sidecar_path(fs_path)
    if fs.get_file_info(side).type != pafs.FileType.File:
        return False
    with fs.open_input_stream(side, compression=None) as fh:
        sidecar = fh.read().decode("utf-8", errors="replace")
    digest = hashlib.sha256()
    with fs.open_input_stream(fs_path, compression=None) as fh:
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    check_digest(path, digest.hexdigest(), sidecar)
    return True


def _row(ref: FileRef, location: str, kind: str, raw: bytes | None, reason: str = "", detail: str = "") -> dict:
    return {
        "source": ref.source,
        "location": location,
        "kind": kind,
        "field": ref.text_field,
        "raw": raw,
        "text": None,
        "reason": reason,
        "detail": detail,
        "nbytes": len(raw) if raw else 0,
    }


def _read_bytes(ref: FileRef) -> bytes:
    fs, path = _filesystem(ref.path)
    # compression=None: pyarrow would otherwise gunzip .gz itself and hide truncation from us.
    with fs.open_input_stream(path, compression=None) as fh:
        return fh.read()


def _jsonl_rows(ref: FileRef, data: bytes) -> list[dict]:
    rows = []
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        if line.strip():
            rows.append(_row(ref, f"{ref.path}:{lineno}", "json", line.rstrip(b"\r")))
    return rows


def _keyed_jsonl_rows(ref: FileRef, data: bytes) -> list[dict]:
    """JSONL lines named by `ref.id_field`: a good line becomes a text record at `path#ID`.

    Parsed here, not in the decode stage, because the location must be known when the record is
    made. A line that does not parse (bad JSON or bad UTF-8) stays a `json` record at `path:LINE`
    and a line without a string text field a `json` record at `path#ID`, so the decode stage
    quarantines them with the same reasons as any JSONL line.
    """
    rows = []
    for lineno, line in enumerate(data.split(b"\n"), start=1):
        line = line.rstrip(b"\r")
        if not line.strip():
            continue
        at_line = f"{ref.path}:{lineno}"
        try:
            obj = json.loads(line)
        except ValueError:  # JSONDecodeError and UnicodeDecodeError
            rows.append(_row(ref, at_line, "json", line))
            continue
        if not isinstance(obj, dict):
            rows.append(_row(ref, at_line, "json", line))
            continue
        ident = obj.get(ref.id_field)
        if ident is None:
            rows.append(_row(ref, at_line, "json", line, MISSING_FIELD, f"no field {ref.id_field!r}"))
            continue
        if isinstance(ident, bool) or not isinstance(ident, (str, int)) or ident == "":
            rows.append(
                _row(
                    ref,
                    at_line,
                    "json",
                    line,
                    WRONG_FIELD_TYPE,
                    f"field {ref.id_field!r} is {ident!r}, not a non-empty str or int",
                )
            )
            continue
        text = obj.get(ref.text_field)
        if isinstance(text, str):
            # surrogatepass: a lone surrogate from a \ud800 escape reaches the decode stage as
            # invalid UTF-8 and is quarantined there like any undecodable record.
            rows.append(_row(ref, f"{ref.path}#{ident}", "text", text.encode("utf-8", errors="surrogatepass")))
        else:
            rows.append(_row(ref, f"{ref.path}#{ident}", "json", line))
    return rows


def _parquet_rows(ref: FileRef, data: bytes) -> list[dict]:
    pf = pq.ParquetFile(io.BytesIO(data))
    schema = pf.schema_arrow
    if ref.text_field not in schema.names:
        return [
            _row(ref, ref.path, "text", None, MISSING_FIELD, f"no column {ref.text_field!r}; columns: {schema.names}")
        ]
    col_type = schema.field(ref.text_field).type
    if not (
        pa.types.is_string(col_type)
        or pa.types.is_large_string(col_type)
        or pa.types.is_binary(col_type)
        or pa.types.is_large_binary(col_type)
    ):
        return [
            _row(ref, ref.path, "text", None, WRONG_FIELD_TYPE, f"column {ref.text_field!r} is {col_type}, not string")
        ]
    rows = []
    index = 0
    for rg in range(pf.num_row_groups):
        column = pf.read_row_group(rg, columns=[ref.text_field]).column(0)
        # Re-decoded by the decode stage so invalid UTF-8 follows the same policy as text files.
        for value in column.cast(pa.large_binary()).to_pylist():
            loc = f"{ref.path}#{index}"
            if value is None:
                rows.append(_row(ref, loc, "text", None, MISSING_FIELD, "null value"))
            else:
                rows.append(_row(ref, loc, "text", value))
            index += 1
    return rows


def read_file(ref: FileRef) -> list[dict]:
    """Reads one file into records (dicts with `RECORD_COLUMNS`).

    A file that is empty, unreadable, a truncated/corrupt gzip or a corrupt Parquet file yields one
    record whose `reason` says so (location = the file). Records of a damaged compressed file are
    all dropped with it, since where the damage starts cannot be trusted.
    """
    try:
        data = _read_bytes(ref)
    except OSError as exc:
        return [_row(ref, ref.path, "text", None, UNREADABLE_FILE, str(exc)[:200])]
    if not data:
        return [_row(ref, ref.path, "text", None, EMPTY_FILE, "0 bytes")]
    if ref.format == "text":
        return [_row(ref, ref.path, "text", data)]
    if ref.format == "jsonl":
        if ref.path.lower().endswith(".gz"):
            try:
                data = gzip.decompress(data)
            except EOFError as exc:
                return [_row(ref, ref.path, "text", None, TRUNCATED_GZIP, str(exc))]
            except (gzip.BadGzipFile, zlib.error) as exc:
                return [_row(ref, ref.path, "text", None, CORRUPT_GZIP, str(exc))]
        rows = _keyed_jsonl_rows(ref, data) if ref.id_field else _jsonl_rows(ref, data)
        return rows or [_row(ref, ref.path, "text", None, EMPTY_FILE, "no records")]
    try:
        rows = _parquet_rows(ref, data)
    except (pa.ArrowException, OSError) as exc:
        return [_row(ref, ref.path, "text", None, CORRUPT_PARQUET, str(exc)[:200])]
    return rows or [_row(ref, ref.path, "text", None, EMPTY_FILE, "no rows")]
