"""Decode stage: UTF-8 policies and JSONL field extraction."""

import pytest

from raymoe.config import ConfigError
from raymoe.data.decode import DecodeConfig, decode_batch, decode_bytes, extract_json_text


def test_valid_utf8_and_bom_are_decoded():
    # Prepare: "café" in UTF-8, once with a byte-order mark.
    raw = "café".encode()
    # Execute / Assert
    assert decode_bytes(raw, DecodeConfig()) == ("café", "", "")
    assert decode_bytes(b"\xef\xbb\xbf" + raw, DecodeConfig()) == ("café", "", "")


def test_invalid_utf8_policies():
    # Prepare: 0xff can never appear in UTF-8; it sits at byte offset 2.
    raw = b"ab\xffcd"
    # Execute
    quarantined = decode_bytes(raw, DecodeConfig(errors="quarantine"))
    replaced = decode_bytes(raw, DecodeConfig(errors="replace"))
    ignored = decode_bytes(raw, DecodeConfig(errors="ignore"))
    # Assert
    assert quarantined[0] is None and quarantined[1] == "undecodable"
    assert "byte 2" in quarantined[2]
    assert replaced == ("ab\ufffdcd", "", "")
    assert ignored == ("abcd", "", "")


def test_bad_policy_names_field_and_value():
    with pytest.raises(ConfigError, match=r"decode\.errors.*'strict'"):
        DecodeConfig(errors="strict")


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"text": "x"', "bad_json"),
        ('["text"]', "wrong_field_type"),
        ('{"body": "x"}', "missing_field"),
        ('{"text": null}', "missing_field"),
        ('{"text": 3}', "wrong_field_type"),
    ],
)
def test_json_extraction_reasons(line, reason):
    text, got, detail = extract_json_text(line, "text")
    assert text is None and got == reason and detail


def test_json_extraction_uses_configured_field():
    assert extract_json_text('{"content": "hello", "text": 1}', "content") == ("hello", "", "")


def test_decode_batch_skips_dropped_rows_and_parses_json():
    # Prepare: a text row, a JSON row, a row already dropped by the reader.
    batch = {
        "raw": [b"plain", b'{"body": "from json"}', None],
        "kind": ["text", "json", "text"],
        "field": ["text", "body", "text"],
        "text": [None, None, None],
        "reason": ["", "", "empty_file"],
        "detail": ["", "", "0 bytes"],
    }
    # Execute
    out = decode_batch(batch, DecodeConfig())
    # Assert
    assert out["text"] == ["plain", "from json", None]
    assert out["reason"] == ["", "", "empty_file"]
