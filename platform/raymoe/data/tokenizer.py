"""Byte-level BPE tokenizer, trained locally with Hugging Face `tokenizers`.

GPT-2 style (Radford et al. 2019): text is split by the GPT-2 regex, mapped to bytes, and BPE merges
are learned over those bytes, so every string round-trips and nothing is ever unknown. Special
tokens come first (ids 0, 1, 2): `<|endoftext|>` (end of document, also the pad token),
`<|im_start|>` and `<|im_end|>` (ChatML turns, used by the chat template).

The saved directory is a Hugging Face tokenizer: `transformers.AutoTokenizer.from_pretrained(dir)`
loads it and `apply_chat_template` renders ChatML.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from raymoe.atomic_io import atomic_write_bytes

EOS_TOKEN = "<|endoftext|>"
IM_START_TOKEN = "<|im_start|>"
IM_END_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

# ChatML (as Qwen and others ship it): each turn is `<|im_start|>role\ncontent<|im_end|>\n`.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
# 256 byte symbols + the special tokens must fit.
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


def _empty_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    # Normalisation (NFC, whitespace) happens in the ingest stages, not here, so the tokenizer
    # never changes text it is asked to encode and decode(encode(x)) == x for any string.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Tokenizer:
    """Trains a byte-level BPE tokenizer.

    The same texts in the same order give the same tokenizer (same merges and ids).

    Args:
        texts: training documents, in a deterministic order.
        vocab_size: total vocabulary including the 256 byte symbols and the 3 special tokens.
        min_frequency: a pair must occur this many times to become a merge.

    Returns:
        The trained tokenizer; special tokens have ids 0 (`<|endoftext|>`), 1, 2.
    """
    if not isinstance(vocab_size, int) or vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be an integer >= {MIN_VOCAB_SIZE}, got {vocab_size!r}")
    tok = _empty_tokenizer()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def save_tokenizer(tok: Tokenizer, out_dir: str | Path, model_max_length: int = 1 << 20) -> Path:
    """Writes tokenizer.json, tokenizer_config.json and special_tokens_map.json (HF layout).

    Args:
        tok: a tokenizer from `train_tokenizer` (or loaded with `load_tokenizer`).
        out_dir: directory to create or overwrite; each file is replaced atomically.
        model_max_length: recorded for transformers; the model's context length.

    Returns:
        The output directory.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    missing = [t for t in SPECIAL_TOKENS if tok.token_to_id(t) is None]
    if missing:
        raise ValueError(f"tokenizer lacks special tokens {missing}; train it with train_tokenizer")
    added = {
        str(tok.token_to_id(t)): {
            "content": t,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for t in SPECIAL_TOKENS
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "added_tokens_decoder": added,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
        "bos_token": None,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": model_max_length,
        "chat_template": CHAT_TEMPLATE,
    }
    special_map = {
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "additional_special_tokens": [IM_START_TOKEN, IM_END_TOKEN],
    }
    _atomic_write_text(out / "tokenizer.json", tok.to_str(pretty=True))
    _atomic_write_text(out / "tokenizer_config.json", json.dumps(config, indent=2, sort_keys=True))
    _atomic_write_text(out / "special_tokens_map.json", json.dumps(special_map, indent=2, sort_keys=True))
    return out


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Loads `tokenizer.json` from a directory written by `save_tokenizer` (or the file itself)."""
    path = Path(path)
    file = path / "tokenizer.json" if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"tokenizer: no tokenizer.json at {str(path)!r}")
    return Tokenizer.from_file(str(file))


def tokenizer_hash(dir_or_tok: str | Path | Tokenizer) -> str:
    """SHA-256 of the tokenizer's canonical JSON (vocab, merges, pre-tokenizer, specials).

    A directory and the `Tokenizer` loaded from it hash the same, so a manifest can name the
    tokenizer its shards were made with and a loader can check it.

    Returns:
        "sha256:<hex>".
    """
    tok = dir_or_tok if isinstance(dir_or_tok, Tokenizer) else load_tokenizer(dir_or_tok)
    canonical = json.dumps(json.loads(tok.to_str()), sort_keys=True, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def eos_id(tok: Tokenizer) -> int:
    """Id of `<|endoftext|>`, the end-of-document and pad token."""
    idx = tok.token_to_id(EOS_TOKEN)
    if idx is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN} token")
    return idx
