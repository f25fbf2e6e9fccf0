"""Byte-level BPE tokenizer: training, special tokens, save/load, hash, transformers loading."""

import json

import pytest

from raymoe.data.tokenizer import (
    EOS_TOKEN,
    IM_END_TOKEN,
    IM_START_TOKEN,
    load_tokenizer,
    save_tokenizer,
    tokenizer_hash,
    train_tokenizer,
)

TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "Ünïcödé text, emoji \U0001f600 and tabs\tstay intact.",
] * 20


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(TEXTS, vocab_size=300)


def test_special_tokens_first_and_vocab_bounded(tok):
    assert [tok.token_to_id(t) for t in (EOS_TOKEN, IM_START_TOKEN, IM_END_TOKEN)] == [0, 1, 2]
    # 3 specials + 256 bytes + merges, never more than asked for.
    assert 259 < tok.get_vocab_size() <= 300


def test_any_string_round_trips(tok):
    # Byte-level: text never seen in training (other scripts, control chars) still round-trips.
    for s in ["Привет мир", "  leading spaces\n\n\ttabs", "\x00\x01 bytes", "日本語"]:
        assert tok.decode(tok.encode(s).ids) == s


def test_training_learns_merges(tok):
    # A frequent word costs fewer tokens than its UTF-8 bytes.
    assert len(tok.encode(" quick").ids) < len(b" quick")


def test_same_texts_same_tokenizer():
    assert tokenizer_hash(train_tokenizer(TEXTS, 300)) == tokenizer_hash(train_tokenizer(TEXTS, 300))
    assert tokenizer_hash(train_tokenizer(TEXTS, 300)) != tokenizer_hash(train_tokenizer(TEXTS, 280))


def test_vocab_too_small_is_rejected():
    with pytest.raises(ValueError, match="vocab_size must be an integer >= 259, got 100"):
        train_tokenizer(TEXTS, 100)


def test_save_load_and_hash(tok, tmp_path):
    out = save_tokenizer(tok, tmp_path / "tok")
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert tokenizer_hash(out) == tokenizer_hash(tok) == tokenizer_hash(load_tokenizer(out))
    assert tokenizer_hash(out).startswith("sha256:")
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["eos_token"] == config["pad_token"] == EOS_TOKEN


def test_transformers_loads_it_and_renders_chatml(tok, tmp_path):
    from transformers import AutoTokenizer

    out = save_tokenizer(tok, tmp_path / "tok")
    hf = AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert hf.eos_token_id == 0 and hf.pad_token_id == 0
    ids = hf(text)["input_ids"]
    assert ids[0] == 1 and ids.count(2) == 2  # <|im_start|> and <|im_end|> are single tokens
    assert hf.decode(ids) == text
    assert hf("some text")["input_ids"] == tok.encode("some text").ids
