"""Normalise stage."""

import pytest

from raymoe.config import ConfigError
from raymoe.data.normalize import NormalizeConfig, normalize_batch, normalize_text


def test_nfc_composes_combining_marks():
    # "e" + COMBINING ACUTE ACCENT (2 code points) is NFC "é" (1 code point, U+00E9).
    assert normalize_text("caf\u0065\u0301", NormalizeConfig()) == "caf\u00e9"


def test_nfkc_is_optional():
    # U+FB01 LATIN SMALL LIGATURE FI survives NFC but becomes "fi" under NFKC.
    assert normalize_text("\ufb01le", NormalizeConfig()) == "\ufb01le"
    assert normalize_text("\ufb01le", NormalizeConfig(unicode_form="NFKC")) == "file"


def test_newlines_trailing_spaces_blank_runs_and_controls():
    # Prepare: CRLF and lone CR, trailing spaces/tabs, 5 blank lines, a NUL and a zero-width space.
    text = "  def f():\r\n    return 1   \r\n\n\n\n\n\nx\x00y\u200b\rend\t \n"
    # Execute
    out = normalize_text(text, NormalizeConfig(max_blank_lines=2))
    # Assert: leading indentation of the first line is stripped only because the document is.
    assert out == "def f():\n    return 1\n\n\nxy\nend"


def test_indentation_is_kept_inside_the_document():
    assert normalize_text("a\n        b", NormalizeConfig()) == "a\n        b"


def test_bad_config_is_named():
    with pytest.raises(ConfigError, match=r"normalize\.max_blank_lines"):
        NormalizeConfig(max_blank_lines=-1)


def test_batch_leaves_dropped_rows():
    batch = {"text": [" a ", None], "reason": ["", "undecodable"]}
    assert normalize_batch(batch, NormalizeConfig())["text"] == ["a", None]


def test_each_rule_applies_alone():
    cfg = NormalizeConfig(max_blank_lines=1)
    # Only a lone CR (no CRLF): it becomes a newline.
    assert normalize_text("a\rb", cfg) == "a\nb"
    # Trailing spaces and tabs on a middle line only (no CR, nothing else to do).
    assert normalize_text("a \t\nb", cfg) == "a\nb"
    # Exactly max_blank_lines + 1 = 2 blank lines shrink to 1; 1 blank line stays.
    assert normalize_text("a\n\n\nb\n\nc", cfg) == "a\n\nb\n\nc"
    # Trailing whitespace is only stripped at line ends, with the option off it stays.
    assert normalize_text("a  \nb", NormalizeConfig(strip_trailing_whitespace=False)) == "a  \nb"
