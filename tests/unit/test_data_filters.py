"""Quality filters with hand-computed ratios."""

import pytest

from raymoe.config import ConfigError
from raymoe.data.filters import (
    FilterConfig,
    filter_batch,
    filter_reason,
    non_text_ratio,
    repeated_line_ratio,
)


def test_non_text_ratio_counts_only_symbols_outside_text():
    # "ab ¤¤" : a, b, space are text; two U+00A4 are not -> 2/5.
    assert non_text_ratio("ab \u00a4\u00a4") == pytest.approx(2 / 5)
    # ASCII punctuation is text (code is full of it); accented letters are alphanumeric.
    assert non_text_ratio("x = f(y) + 1;  # é") == 0.0
    assert non_text_ratio("") == 0.0


def test_repeated_line_ratio():
    # 5 non-blank lines: a, b, a, a, c -> 2 repeat an earlier line. Blank lines are ignored and
    # leading/trailing spaces do not make a line different.
    assert repeated_line_ratio("a\nb\n\n  a\na \nc") == pytest.approx(2 / 5)
    assert repeated_line_ratio("\n\n") == 0.0


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("short", "too_short"),
        ("x" * 101, "too_long"),
        ("\u00a4" * 20 + "a" * 20, "non_text_ratio"),  # 0.5 > 0.3
        ("same line\n" * 4 + "other line", "repeated_lines"),  # 3/5 = 0.6 > 0.5
        ("a fine line of text\nand a second one", ""),
    ],
)
def test_filter_reason(text, reason):
    cfg = FilterConfig(min_chars=10, max_chars=100, max_non_text_ratio=0.3, max_repeated_line_ratio=0.5)
    assert filter_reason(text, cfg) == reason


def test_boundaries_are_inclusive():
    cfg = FilterConfig(min_chars=4, max_chars=4, max_non_text_ratio=0.5, max_repeated_line_ratio=1.0)
    assert filter_reason("abcd", cfg) == ""
    assert filter_reason("ab\u00a4\u00a4", cfg) == ""  # exactly 0.5


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"filter\.max_chars=1 must be >= filter\.min_chars=5"):
        FilterConfig(min_chars=5, max_chars=1)
    with pytest.raises(ConfigError, match=r"filter\.max_non_text_ratio"):
        FilterConfig(max_non_text_ratio=1.5)


def test_batch_sets_reasons_only_for_live_rows():
    batch = {"text": ["tiny", None, "long enough text here"], "reason": ["", "bad_json", ""]}
    out = filter_batch(batch, FilterConfig(min_chars=10))
    assert out["reason"] == ["too_short", "bad_json", ""]


def test_non_text_ratio_on_ascii_control_characters():
    # Prepare: "ab" + SOH + STX: control characters are neither word, whitespace nor
    # punctuation -> 2/4. FS and GS (U+001C, U+001D) are whitespace to Python (str.isspace) -> 0.
    assert non_text_ratio("ab\x01\x02") == pytest.approx(2 / 4)
    assert non_text_ratio("ab\x1c\x1d") == 0.0
    # DEL (U+007F) and a non-ASCII symbol in the same text: 2 of 5.
    assert non_text_ratio("ab\x7f \u00a4") == pytest.approx(2 / 5)
