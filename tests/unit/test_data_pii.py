"""PII scrubbing."""

from raymoe.data.pii import PIIConfig, scrub_batch, scrub_pii

ON = PIIConfig(enabled=True)


def test_disabled_by_default():
    assert scrub_pii("mail bob@example.com", PIIConfig()) == ("mail bob@example.com", 0, 0)


def test_emails_replaced():
    text = "Guido van Rossum <guido@python.org>, cc: a.b+c@mail.example.co.uk."
    assert scrub_pii(text, ON) == ("Guido van Rossum <<EMAIL>>, cc: <EMAIL>.", 2, 0)


def test_not_emails():
    # A decorator and a bare @ are not addresses.
    text = "@property\ndef x(self): return a @ b"
    assert scrub_pii(text, ON) == (text, 0, 0)


def test_keys_replaced_by_prefix_and_assignment():
    # Prepare: an AWS access key id (AKIA + 16), a GitHub token (ghp_ + 36), an assignment.
    aws = "AKIA" + "ABCDEFGHIJKLMNOP"
    gh = "ghp_" + "a1" * 18
    text = f"id={aws} tok {gh}\napi_key = 'Zx9Zx9Zx9Zx9Zx9Zx9'\n"
    # Execute
    out, emails, keys = scrub_pii(text, ON)
    # Assert
    assert out == "id=<KEY> tok <KEY>\napi_key = '<KEY>'\n"
    assert (emails, keys) == (0, 3)


def test_long_hex_constants_in_code_survive():
    text = "_MAGIC = 0x9E3779B97F4A7C15\ndigest = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'"
    assert scrub_pii(text, ON) == (text, 0, 0)


def test_batch_counts_per_row():
    batch = {"text": ["x@y.org and z@w.org", None, "none"], "reason": ["", "bad_json", ""]}
    out, emails, keys = scrub_batch(batch, ON)
    assert out["text"] == ["<EMAIL> and <EMAIL>", None, "none"]
    assert emails == [2, 0, 0] and keys == [0, 0, 0]


def test_emails_on_several_lines_and_at_line_edges():
    # Prepare: addresses at the start and end of lines, two on one line, a line with only a bare
    # "@", and a line with no "@" at all (scrubbing works line by line around each "@").
    text = "a@b.io first\nplain line\nx @ y\nmid c.d@e.org and f@g.net\nlast h@i.dev"
    # Execute / Assert: the 4 addresses replaced, everything else untouched.
    assert scrub_pii(text, ON) == ("<EMAIL> first\nplain line\nx @ y\nmid <EMAIL> and <EMAIL>\nlast <EMAIL>", 4, 0)


def test_assigned_secret_is_case_insensitive_and_found_in_non_ascii_text():
    # Upper-case keyword (ASCII text) and a keyword in a text that also holds a non-ASCII letter.
    assert scrub_pii("API_KEY: abcdefghijklmnop1234", ON) == ("API_KEY: <KEY>", 0, 1)
    assert scrub_pii("clé\nPassword = 'abcdefghijklmnop1234'", ON) == ("clé\nPassword = '<KEY>'", 0, 1)
    # A keyword without an assignment, and a value too short (15 < 16 characters), stay.
    assert scrub_pii("the secret of it; token=abcdefghijklmno", ON) == ("the secret of it; token=abcdefghijklmno", 0, 0)
