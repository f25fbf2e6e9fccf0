"""Quality filters: length bounds, non-text ratio, repeated-line ratio.

The repeated-line rule follows Gopher's quality filters (Rae et al. 2021, "Scaling Language
Models", appendix A): a document whose lines are mostly copies of one another is boilerplate.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from raymoe.config import require

TOO_SHORT = "too_short"
TOO_LONG = "too_long"
NON_TEXT = "non_text_ratio"
REPEATED_LINES = "repeated_lines"
FILTER_REASONS = (TOO_SHORT, TOO_LONG, NON_TEXT, REPEATED_LINES)

# Anything that is not a word character (letters, digits, underscore in any script), whitespace
# or ASCII punctuation; a regex scan is ~10x faster than a per-character Python loop.
_NON_TEXT = re.compile(r"[^\w\s" + re.escape(string.punctuation) + "]")
# The ASCII bytes `_NON_TEXT` does not match (derived from it, so the two always agree): deleting
# them from an ASCII text leaves exactly its non-text characters, in one C pass.
_ASCII_TEXT_BYTES = bytes(c for c in range(128) if not _NON_TEXT.match(chr(c)))


@dataclass(kw_only=True)
class FilterConfig:
    """Bounds a document must meet to be kept; lengths in characters after normalisation."""

    min_chars: int = 32
    max_chars: int = 1_000_000
    # Fraction of characters that are neither letters, digits, whitespace nor ASCII punctuation
    # (binary junk, mojibake, U+FFFD from a `replace` decode).
    max_non_text_ratio: float = 0.3
    # Fraction of non-blank lines that repeat an earlier line of the same document.
    max_repeated_line_ratio: float = 0.5

    def __post_init__(self) -> None:
        require(self.min_chars >= 0, f"filter.min_chars must be >= 0, got {self.min_chars}")
        require(
            self.max_chars >= self.min_chars,
            f"filter.max_chars={self.max_chars} must be >= filter.min_chars={self.min_chars}",
        )
        for name in ("max_non_text_ratio", "max_repeated_line_ratio"):
            value = getattr(self, name)
            require(0.0 <= value <= 1.0, f"filter.{name} must be in [0, 1], got {value}")


def non_text_ratio(text: str) -> float:
    """Fraction of characters that are not alphanumeric, whitespace or ASCII punctuation."""
    if not text:
        return 0.0
    if text.isascii():
        return len(text.encode("ascii").translate(None, _ASCII_TEXT_BYTES)) / len(text)
    return len(_NON_TEXT.findall(text)) / len(text)


def repeated_line_ratio(text: str) -> float:
    """Fraction of non-blank lines (stripped) equal to an earlier non-blank line."""
    # Each line equal to an earlier one is a repeat: repeats = lines - distinct lines.
    lines = [line for line in map(str.strip, text.split("\n")) if line]
    return (len(lines) - len(set(lines))) / len(lines) if lines else 0.0


def filter_reason(text: str, cfg: FilterConfig) -> str:
    """Returns "" to keep `text`, else the first failed rule's reason (checked cheapest first)."""
    if len(text) < cfg.min_chars:
        return TOO_SHORT
    if len(text) > cfg.max_chars:
        return TOO_LONG
    if non_text_ratio(text) > cfg.max_non_text_ratio:
        return NON_TEXT
    if repeated_line_ratio(text) > cfg.max_repeated_line_ratio:
        return REPEATED_LINES
    return ""


def filter_batch(batch: dict[str, list], cfg: FilterConfig) -> dict:
    """Sets `reason` for rows that fail a filter; rows already dropped are left alone."""
    for i, text in enumerate(batch["text"]):
        if not batch["reason"][i]:
            batch["reason"][i] = filter_reason(text, cfg)
    return batch
