"""Checks that a directory holds an HF-format artifact raymoe can load, before anything starts.

Serving, fine-tuning, federated fine-tuning, the drift job's quality evaluation and re-placement
all read an artifact (config.json + weights + tokenizer files, as `raymoe export` writes). A
missing or mismatched one is a user error: it is reported in one line naming the config key, the
path and what was expected, instead of failing later inside a Ray worker. Reads only config.json
and tokenizer.json (no weights, no torch).
"""

from __future__ import annotations

import json
from pathlib import Path

from raymoe.config import ConfigError


def check_artifact(key: str, path: str) -> None:
    """Checks the artifact at `path` (the value of config key `key`).

    The model's vocabulary must cover the tokenizer's: a token id the embedding has no row for
    would fail only once a request or record produced it.

    Raises:
        ConfigError: no such directory, no config.json or tokenizer.json, a config.json raymoe
            does not read, or a tokenizer with more tokens than the model's vocab_size.
    """
    root = Path(path)
    where = f"{key}={path!r}"
    if not root.is_dir():
        raise ConfigError(f"{where}: no such directory; expected an HF-format artifact (`raymoe export` output)")
    config_file, tokenizer_file = root / "config.json", root / "tokenizer.json"
    if not config_file.is_file():
        raise ConfigError(f"{where} holds no config.json; expected an HF-format artifact (`raymoe export` output)")
    from raymoe.models.hf_config import config_from_hf

    try:
        model_cfg, _ = config_from_hf(json.loads(config_file.read_text(encoding="utf-8")))
    except (OSError, ValueError, KeyError, TypeError) as exc:  # JSON errors are ValueErrors
        raise ConfigError(f"{where}: config.json cannot be read as a model config: {exc}") from None
    if not tokenizer_file.is_file():
        raise ConfigError(f"{where} holds no tokenizer.json; expected the artifact's tokenizer beside config.json")
    from tokenizers import Tokenizer

    try:
        vocab = Tokenizer.from_file(str(tokenizer_file)).get_vocab_size(with_added_tokens=True)
    except Exception as exc:  # noqa: BLE001 - the tokenizers library raises its own Exception types
        raise ConfigError(f"{where}: tokenizer.json cannot be read: {exc}") from None
    if vocab > model_cfg.vocab_size:
        raise ConfigError(
            f"{where}: the tokenizer has {vocab} tokens but config.json has vocab_size="
            f"{model_cfg.vocab_size}; expected a tokenizer no larger than the model's vocabulary"
        )
