"""Normalise stage: Unicode NFC, one newline convention, no trailing spaces, bounded blank runs.

Indentation and spaces inside a line are kept, because the corpus includes source code where they
carry meaning.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Literal

from raymoe.config import require

# C0/C1 control characters other than tab and newline, plus zero-width formatting that only
# makes byte-different copies of the same text.
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u200b\u200c\u200d\u2060\ufeff]")
_TRAILING_WS = re.compile(r"[ \t]+$", re.MULTILINE)
_BLANK_RUNS: dict[int, re.Pattern] = {}


@dataclass(kw_only=True)
class NormalizeConfig:
    """Text normalisation; defaults suit both prose and code."""

    unicode_form: Literal["NFC", "NFKC", "none"] = "NFC"
    strip_control: bool = True
    strip_trailing_whitespace: bool = True
    # Runs of more blank lines than this shrink to this many.
    max_blank_lines: int = 2

    def __post_init__(self) -> None:
        require(
            self.unicode_form in ("NFC", "NFKC", "none"),
            f"normalize.unicode_form must be NFC, NFKC or none, got {self.unicode_form!r}",
        )
        require(
            self.max_blank_lines >= 0,
            f"normalize.max_blank_lines must be >= 0, got {self.max_blank_lines}",
        )


def normalize_text(text: str, cfg: NormalizeConfig) -> str:
    """Returns the normalised text (the document is also stripped at both ends)."""
    # Each step is skipped when a cheap C-level test shows it cannot change the text: the regex
    # scans cost more than everything else here.
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if cfg.unicode_form != "none" and not text.isascii():  # ASCII is already NFC and NFKC
        text = unicodedata.normalize(cfg.unicode_form, text)
    if cfg.strip_control:
        text = _CONTROL.sub("", text)
    # `[ \t]+$` can only match before a newline or at the end.
    if cfg.strip_trailing_whitespace and (" \n" in text or "\t\n" in text or text.endswith((" ", "\t"))):
        text = _TRAILING_WS.sub("", text)
    limit = cfg.max_blank_lines
    if "\n" * (limit + 2) in text:
        pattern = _BLANK_RUNS.get(limit)
        if pattern is None:
            pattern = _BLANK_RUNS[limit] = re.compile(r"\n{%d,}" % (limit + 2))  # noqa: UP031 - the braces are the regex's
        text = pattern.sub("\n" * (limit + 1), text)
    return text.strip()


def normalize_batch(batch: dict[str, list], cfg: NormalizeConfig) -> dict:
    """Normalises `text` in place for rows not yet dropped."""
    for i, text in enumerate(batch["text"]):
        if not batch["reason"][i]:
            batch["text"][i] = normalize_text(text, cfg)
    return batch
