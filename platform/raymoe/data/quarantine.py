"""Quarantine: every record or file the pipeline could not use, with its reason and location.

Written as `quarantine/quarantine.jsonl` in the output directory, one JSON object per line,
sorted by (location, reason) so reruns give the same file:
`{"source", "location", "reason", "detail", "sample"}`. `location` is `path` for a whole file,
`path:LINE` (1-based) for a JSONL line and `path#ROW` (0-based) for a Parquet row; `sample` holds
the first bytes of the bad record, escaped, to help find it.
"""

from __future__ import annotations

import json
from pathlib import Path

from raymoe.atomic_io import atomic_write_bytes
from raymoe.data.decode import BAD_JSON, UNDECODABLE
from raymoe.data.sources import (
    CORRUPT_GZIP,
    CORRUPT_PARQUET,
    EMPTY_FILE,
    MISSING_FIELD,
    TRUNCATED_GZIP,
    UNREADABLE_FILE,
    WRONG_FIELD_TYPE,
)

QUARANTINE_REASONS = (
    EMPTY_FILE,
    UNREADABLE_FILE,
    TRUNCATED_GZIP,
    CORRUPT_GZIP,
    CORRUPT_PARQUET,
    BAD_JSON,
    MISSING_FIELD,
    WRONG_FIELD_TYPE,
    UNDECODABLE,
)
QUARANTINE_FILE = "quarantine/quarantine.jsonl"
SAMPLE_BYTES = 120


def sample_of(raw: bytes | None) -> str:
    """Printable prefix of a bad record (invalid bytes shown as \\xNN)."""
    if not raw:
        return ""
    return raw[:SAMPLE_BYTES].decode("utf-8", errors="backslashreplace")


def quarantine_entry(
    source: str,
    location: str,
    reason: str,
    detail: str,
    raw: bytes | None,
    reasons: tuple[str, ...] = QUARANTINE_REASONS,
) -> dict:
    """One quarantine line; raises ValueError for a reason not in `reasons`.

    `reasons` defaults to the ingest pipeline's; a reader with its own record checks (SFT
    examples, raymoe.data.sft) passes its tuple. They are kept apart because the same word can
    mean different things: `too_long` is an ingest filter drop but an SFT quarantine.
    """
    if reason not in reasons:
        raise ValueError(f"quarantine reason must be one of {reasons}, got {reason!r}")
    return {"source": source, "location": location, "reason": reason, "detail": detail, "sample": sample_of(raw)}


def write_quarantine(out_dir: str | Path, entries: list[dict]) -> Path:
    """Writes the quarantine file atomically (sorted, one JSON object per line)."""
    ordered = sorted(entries, key=lambda e: (e["location"], e["reason"]))
    text = "".join(json.dumps(e, sort_keys=True, ensure_ascii=False) + "\n" for e in ordered)
    return atomic_write_bytes(Path(out_dir) / QUARANTINE_FILE, text.encode("utf-8"))


def read_quarantine(out_dir: str | Path) -> list[dict]:
    """The quarantine entries of an ingest output directory (empty if there are none)."""
    path = Path(out_dir) / QUARANTINE_FILE
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]
