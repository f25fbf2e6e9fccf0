"""Decode stage: raw bytes -> text, per record, with a configured policy for invalid UTF-8.

JSONL records are decoded and then parsed here too, because the text field can only be
extracted from a decoded line. Each function returns a drop reason instead of raising, so one
bad record is quarantined and the rest of the file goes on.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Literal

from raymoe.config import require

# Quarantine reasons this stage gives.
UNDECODABLE = "undecodable"
BAD_JSON = "bad_json"
MISSING_FIELD = "missing_field"
WRONG_FIELD_TYPE = "wrong_field_type"


@dataclass(kw_only=True)
class DecodeConfig:
    """How invalid UTF-8 is handled.

    `quarantine` sends the record to quarantine (default: nothing is silently changed);
    `replace` substitutes U+FFFD; `ignore` drops the invalid bytes.
    """

    errors: Literal["quarantine", "replace", "ignore"] = "quarantine"

    def __post_init__(self) -> None:
        require(
            self.errors in ("quarantine", "replace", "ignore"),
            f"decode.errors must be quarantine, replace or ignore, got {self.errors!r}",
        )


def decode_bytes(raw: bytes, cfg: DecodeConfig) -> tuple[str | None, str, str]:
    """Decodes UTF-8 bytes (a leading BOM is dropped).

    Returns:
        (text, reason, detail): text is None when the record must be quarantined, with reason
        `undecodable` and the byte offset in detail.
    """
    policy = "strict" if cfg.errors == "quarantine" else cfg.errors
    try:
        return raw.decode("utf-8-sig", errors=policy), "", ""
    except UnicodeDecodeError as exc:
        return None, UNDECODABLE, f"invalid UTF-8 at byte {exc.start}: {exc.reason}"


def extract_json_text(line: str, text_field: str) -> tuple[str | None, str, str]:
    """Parses one JSONL line and returns its `text_field` string.

    Returns:
        (text, reason, detail): reason is `bad_json`, `missing_field` or `wrong_field_type` when
        text is None.
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, BAD_JSON, f"{exc.msg} at column {exc.colno}"
    if not isinstance(obj, dict):
        return None, WRONG_FIELD_TYPE, f"expected a JSON object, got {type(obj).__name__}"
    if text_field not in obj or obj[text_field] is None:
        return None, MISSING_FIELD, f"no field {text_field!r}"
    value = obj[text_field]
    if not isinstance(value, str):
        return None, WRONG_FIELD_TYPE, f"field {text_field!r} is {type(value).__name__}, not str"
    return value, "", ""


def decode_batch(batch: dict[str, list], cfg: DecodeConfig) -> dict:
    """Fills `text` from `raw` for rows not yet dropped; `kind == "json"` rows are parsed too.

    Args:
        batch: columns `raw` (bytes), `kind` ("text" or "json"), `field` (the JSON key holding
            the document), `text`, `reason`, `detail`.
        cfg: decode policy.

    Returns:
        The same batch, updated in place.
    """
    for i, raw in enumerate(batch["raw"]):
        if batch["reason"][i]:
            continue
        text, reason, detail = decode_bytes(raw, cfg)
        if text is not None and batch["kind"][i] == "json":
            text, reason, detail = extract_json_text(text, batch["field"][i])
        batch["text"][i] = text
        batch["reason"][i] = reason
        batch["detail"][i] = detail
    return batch
