"""Optional PII scrubbing: e-mail addresses and key-like secrets are replaced by placeholders.

Patterns are deliberately narrow (known key prefixes, `key = "..."` assignments) so source code
with long hex constants survives; a false negative is preferred to mangling the corpus.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

EMAIL_PLACEHOLDER = "<EMAIL>"
KEY_PLACEHOLDER = "<KEY>"

_EMAIL = re.compile(r"(?<![\w.+-])[A-Za-z0-9._%+-]+@(?:[A-Za-z0-9-]+\.)+[A-Za-z]{2,}(?![\w-])")
# Prefixed provider tokens: AWS access key ids, GitHub, Slack, OpenAI/Stripe style secret keys,
# Google API keys.
_PREFIXED_KEY = re.compile(
    r"\b(?:AKIA[0-9A-Z]{16}"
    r"|gh[pousr]_[A-Za-z0-9]{36,}"
    r"|xox[baprs]-[A-Za-z0-9-]{10,}"
    r"|(?:sk|pk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"
    r"|sk-[A-Za-z0-9_-]{20,}"
    r"|AIza[0-9A-Za-z_-]{35})\b"
)
# Every prefixed key starts with one of these literals: a text with none of them cannot match,
# and `in` scans (C substring search) cost a fraction of `_PREFIXED_KEY`'s attempt at every
# position.
_KEY_PREFIXES = ("AKIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "xox", "sk_", "pk_", "rk_", "sk-", "AIza")
# `api_key = "..."`, `SECRET: ...`, `password="..."`: only the value is replaced.
_ASSIGNED_SECRET = re.compile(
    # The lookahead only lets the scan skip positions that cannot start a keyword (all start with
    # a, p or s in any case); it changes no match.
    r"(?i)(?=[aps])\b((?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token"
    r"|password|passwd)"
    r"\s*[:=]\s*['\"]?)([A-Za-z0-9_/+=.-]{16,})"
)
# Every keyword above, lower-cased, contains a match of this: for ASCII text, where lower() is
# exactly what (?i) matches, a text whose lower() has none cannot match `_ASSIGNED_SECRET`.
_SECRET_WORD = re.compile(r"api[_-]?key|secret|access[_-]?token|auth[_-]?token|passw")


def _scrub_emails(text: str) -> tuple[str, int]:
    """`_EMAIL.subn` restricted to the lines holding an "@".

    Exact: a match never spans a newline (no class in `_EMAIL` admits one) and a newline fails
    both lookarounds just as the ends of the text do, so each line is scrubbed as it would be in
    place, and a line without "@" has nothing to replace.
    """
    at = text.find("@")
    if at < 0:
        return text, 0
    pieces, done, total = [], 0, 0
    while at >= 0:
        start = text.rfind("\n", 0, at) + 1
        end = text.find("\n", at)
        end = len(text) if end < 0 else end
        line, n = _EMAIL.subn(EMAIL_PLACEHOLDER, text[start:end])
        pieces += [text[done:start], line]
        total += n
        done = end
        at = text.find("@", end)
    pieces.append(text[done:])
    return "".join(pieces), total


@dataclass(kw_only=True)
class PIIConfig:
    """Which scrubbers run; all off unless `enabled`."""

    enabled: bool = False
    emails: bool = True
    keys: bool = True


def _keep_name(match: re.Match) -> str:
    return match.group(1) + KEY_PLACEHOLDER


def scrub_pii(text: str, cfg: PIIConfig) -> tuple[str, int, int]:
    """Replaces e-mail addresses with `<EMAIL>` and key-like strings with `<KEY>`.

    Returns:
        (text, emails_replaced, keys_replaced).
    """
    if not cfg.enabled:
        return text, 0, 0
    emails = keys = 0
    if cfg.emails:
        text, emails = _scrub_emails(text)
    if cfg.keys:
        if any(prefix in text for prefix in _KEY_PREFIXES):
            text, keys = _PREFIXED_KEY.subn(KEY_PLACEHOLDER, text)
        if not text.isascii() or _SECRET_WORD.search(text.lower()):
            text, n_assigned = _ASSIGNED_SECRET.subn(_keep_name, text)
            keys += n_assigned
    return text, emails, keys


def scrub_batch(batch: dict[str, list], cfg: PIIConfig) -> tuple[dict, list[int], list[int]]:
    """Scrubs `text` in place for kept rows.

    Returns:
        (batch, emails, keys): the per-row numbers of replaced e-mails and keys.
    """
    emails = [0] * len(batch["text"])
    keys = [0] * len(batch["text"])
    for i, text in enumerate(batch["text"]):
        if not batch["reason"][i]:
            batch["text"][i], emails[i], keys[i] = scrub_pii(text, cfg)
    return batch, emails, keys
