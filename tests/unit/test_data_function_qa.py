"""Function QA and silo tasks: the answer rules, the choice of functions, the shipped files."""

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from raymoe.data.chat_tokenizer import ChatTokenizer
from raymoe.data.corpus_bundle import build_bundle
from raymoe.data.function_qa import (
    find_functions,
    function_answers,
    function_qa_splits,
    jsonl_bytes,
    qa_record,
)
from raymoe.data.sft import load_sft_examples
from raymoe.data.silo_tasks import chat_records, plain_sentences, silo_splits
from raymoe.data.tokenizer import save_tokenizer, train_tokenizer
from raymoe.serve.debug_artifact import CORPUS

ROOT = Path(__file__).resolve().parents[2]
CORPUS_DIR = ROOT / "data" / "corpus"
SFT_DIR = ROOT / "data" / "sft"

# Two positional-only (self, x), one ordinary (y), one keyword-only (z): 4; *args, **kwargs not
# counted. The first return in the source is `x * y`; ast.walk (breadth first) would meet the
# function-level `return None` first.
SCALE = '''def scale(self, x, /, y=2, *args, z, **kwargs):
    """Doc."""
    if x:
        return x * y
    return None'''


@pytest.fixture(scope="module")
def splits():
    return function_qa_splits(CORPUS_DIR / "code.jsonl.gz")


@pytest.fixture(scope="module")
def silos():
    return silo_splits(CORPUS_DIR)


def _function(record):
    return record["messages"][1]["content"].split("```python\n", 1)[1]


def _user(record):
    return record["messages"][1]["content"]


def test_answers_of_a_hand_written_function():
    assert function_answers(SCALE) == {"name": "scale", "argcount": "4", "return": "x * y"}
    assert function_answers("def f():\n    pass")["return"] == "None"
    assert function_answers("def g(a, b):\n    if a:\n        return\n    return b") == {
        "name": "g",
        "argcount": "2",
        "return": "None",
    }


def test_qa_record_is_a_messages_record():
    # Execute
    record = qa_record(SCALE, "argcount")
    # Assert
    assert record == {
        "messages": [
            {"role": "system", "content": "Answer with the exact answer only."},
            {"role": "user", "content": "How many arguments does this function take?\n```python\n" + SCALE + "\n```"},
            {"role": "assistant", "content": "4"},
        ]
    }


def test_find_functions_keeps_short_plain_functions_once(tmp_path):
    # Prepare: line numbers in the comments.
    (tmp_path / "a.py").write_text(
        "def kept(a):\n"  # 1
        "    return a\n"
        "@staticmethod\n"  # 3: decorated
        "def decorated():\n"
        "    return 1\n"
        "def nested():\n"  # 6: nested def
        "    def inner():\n"
        "        return 2\n"
        "    return inner\n"
        "def gen():\n"  # 10: generator
        "    yield 1\n"
        "class C:\n"
        "    def method(self, b):\n"  # 13: method, dedented
        "        return b\n"
        "def long():\n"
        + "    x = 1\n"
        * 10  # 15: 11 lines
        + "def kept(a):\n"  # 26: same source again
        "    return a\n"
    )
    (tmp_path / "b.py").write_text("def other():\n    return 'b'\n")
    bundle = build_bundle(tmp_path, tmp_path / "out" / "code.jsonl.gz", license="MIT", glob="*.py")
    # Execute
    found = find_functions(bundle.path)
    # Assert
    assert [(f.path, f.lineno, f.source) for f in found] == [
        ("a.py", 1, "def kept(a):\n    return a"),
        ("a.py", 13, "def method(self, b):\n    return b"),
        ("b.py", 1, "def other():\n    return 'b'"),
    ]


def test_splits_are_sized_balanced_and_disjoint_by_function(splits):
    # Prepare
    train, heldout = splits
    # Execute
    kinds = Counter(_user(r).split("\n")[0] for r in train)
    # Assert
    assert (len(train), len(heldout)) == (500, 100)
    assert sorted(kinds.values()) == [166, 167, 167]
    train_functions = {_function(r) for r in train}
    assert len(train_functions) == 500
    assert not train_functions & {_function(r) for r in heldout}


def test_generation_is_deterministic(splits):
    assert function_qa_splits(CORPUS_DIR / "code.jsonl.gz") == splits


def test_shipped_files_equal_a_fresh_generation(splits, silos):
    # Prepare
    train, heldout = splits
    silo_train, silo_heldout = silos
    # Execute / Assert: regenerate with `python -m raymoe.data.function_qa` / `silo_tasks`.
    assert (SFT_DIR / "function_qa" / "train.jsonl").read_bytes() == jsonl_bytes(train)
    assert (SFT_DIR / "function_qa" / "heldout.jsonl").read_bytes() == jsonl_bytes(heldout)
    for silo, records in silo_train.items():
        assert (SFT_DIR / "silos" / silo / "train.jsonl").read_bytes() == jsonl_bytes(records)
    assert (SFT_DIR / "silos" / "heldout.jsonl").read_bytes() == jsonl_bytes(silo_heldout)


def test_silos_are_sized_and_their_heldout_is_disjoint(silos, splits):
    # Prepare
    silo_train, heldout = silos
    # Execute
    train_users = {_user(r) for records in silo_train.values() for r in records}
    # Assert
    sizes = {silo: len(r) for silo, r in silo_train.items()}
    assert sizes == {"code": 150, "prose": 150, "chat": 150}
    assert len(heldout) == 60 and not train_users & {_user(r) for r in heldout}
    # The code silo uses none of function_qa's functions.
    code_functions = {_function(r) for r in silo_train["code"]}
    assert not code_functions & {_function(r) for r in splits[0] + splits[1]}


def test_chat_answers_are_right():
    # Execute
    records = chat_records(40)
    # Assert
    assert len({_user(r) for r in records}) == 40
    for r in records:
        user, answer = _user(r), r["messages"][2]["content"]
        if m := re.fullmatch(r"What is (\d+) ([-+*]) (\d+)\?", user):
            a, op, b = int(m[1]), m[2], int(m[3])
            assert int(answer) == {"+": a + b, "-": a - b, "*": a * b}[op]
        else:
            m = re.fullmatch(r"Say (hello|goodbye|good morning) to (\w+)\.", user)
            assert answer == f"{m[1].capitalize()}, {m[2]}!"


def test_plain_sentences_skip_code_and_punctuation(tmp_path):
    # Prepare
    (tmp_path / "t.txt").write_text(
        "Plain words are here\ntoday. Use the f() call for this.\nShort one. Also, this is a plain "
        "sentence.\n\n   indented lines are grammar or code here.\n"
    )
    bundle = build_bundle(tmp_path, tmp_path / "out" / "prose.jsonl.gz", license="MIT", glob="*.txt")
    # Execute / Assert
    assert plain_sentences(bundle.path) == ["Plain words are here today.", "Also, this is a plain sentence."]


def test_every_shipped_record_fits_the_debug_tokenizer(tmp_path):
    # Prepare: the debug artifact's tokenizer, as make_debug_artifact trains it.
    save_tokenizer(train_tokenizer(CORPUS, vocab_size=512), tmp_path)
    tok = ChatTokenizer.from_dir(tmp_path)
    # Execute
    files = sorted(SFT_DIR.rglob("*.jsonl"))
    results = [load_sft_examples(f, tok, 256, "drop") for f in files]
    # Assert
    assert len(files) == 6
    assert all(entries == [] for _, entries in results)
    assert sum(len(examples) for examples, _ in results) == 600 + 450 + 60
    # Every answer is non-empty and one line.
    for f in files:
        for line in f.read_text().splitlines():
            answer = json.loads(line)["messages"][-1]["content"]
            assert answer.strip() and "\n" not in answer
