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
# `api_key = "..."`, `SECRET: ...`, `password="..."`: only the value is replaced.
_ASSIGNED_SECRET = re.compile(
    r"(?i)\b((?:api[_-]?key|secret(?:[_-]?key)?|access[_-]?token|auth[_-]?token|password|passwd)"
    r"\s*[:=]\s*['\"]?)([A-Za-z0-9_/+=.-]{16,})"
)


@dataclass(kw_only=True)
class PIIConfig:
    """Which scrubbers run; all off unless `enabled`."""

    enabled: bool = False
    emails: bool = True
    keys: bool = True


def scrub_pii(text: str, cfg: PIIConfig) -> tuple[str, int, int]:
    """Replaces e-mail addresses with `<EMAIL>` and key-like strings with `<KEY>`.

    Returns:
        (text, emails_replaced, keys_replaced).
    """
    if not cfg.enabled:
        return text, 0, 0
    emails = keys = 0
    if cfg.emails:
        text, emails = _EMAIL.subn(EMAIL_PLACEHOLDER, text)
    if cfg.keys:
        text, n_prefixed = _PREFIXED_KEY.subn(KEY_PLACEHOLDER, text)
        text, n_assigned = _ASSIGNED_SECRET.subn(lambda m: m.group(1) + KEY_PLACEHOLDER, text)
        keys = n_prefixed + n_assigned
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
