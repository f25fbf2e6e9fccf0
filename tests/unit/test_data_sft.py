"""SFT examples: record checks and quarantine, answer-only labels, truncation, batches, scoring."""

import json

import pytest
import torch

from raymoe.config import ConfigError
from raymoe.data.chat_tokenizer import ChatTokenizer
from raymoe.data.sft import (
    SFTBatches,
    SFTDataConfig,
    SFTExample,
    collate,
    load_sft_examples,
    quarantine_counts,
    score_exact_match,
    tokenize_messages,
)
from raymoe.data.tokenizer import save_tokenizer, train_tokenizer
from raymoe.serve.debug_artifact import CORPUS

SYSTEM = {"role": "system", "content": "Answer with the exact answer only."}
USER = {"role": "user", "content": "What is 3 + 4?"}
ANSWER = {"role": "assistant", "content": "7"}
# ChatML written out by hand: the prompt ends with the opened assistant turn.
PROMPT_TEXT = (
    "<|im_start|>system\nAnswer with the exact answer only.<|im_end|>\n"
    "<|im_start|>user\nWhat is 3 + 4?<|im_end|>\n<|im_start|>assistant\n"
)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    # The debug artifact's corpus, as make_debug_artifact trains it (a near byte-level BPE).
    out = tmp_path_factory.mktemp("tok")
    save_tokenizer(train_tokenizer(CORPUS, vocab_size=400), out)
    return ChatTokenizer.from_dir(out)


def _unmasked_text(tok, example):
    return tok.decode([t for t in example.labels if t != -100], skip_special_tokens=False)


def test_render_messages_is_chatml_with_and_without_generation_prompt(tok):
    # Execute
    prompt = tok.render_messages([SYSTEM, USER], add_generation_prompt=True)
    full = tok.render_messages([SYSTEM, USER, ANSWER], add_generation_prompt=False)
    # Assert
    assert prompt == PROMPT_TEXT == tok.render_chat([SYSTEM, USER])
    assert full == PROMPT_TEXT + "7<|im_end|>\n"


def test_labels_train_only_the_answer_and_end_of_turn(tok):
    # Execute
    example, reason, _ = tokenize_messages([SYSTEM, USER, ANSWER], tok, 256, "left")
    # Assert: the prompt's tokens carry -100; the rest are the answer, its <|im_end|> and the
    # newline ChatML puts after it, labelled with their own ids.
    assert reason == ""
    num_prompt = example.labels.count(-100)
    assert tok.decode(example.input_ids[:num_prompt], skip_special_tokens=False) == PROMPT_TEXT
    assert example.labels[num_prompt:] == example.input_ids[num_prompt:]
    assert _unmasked_text(tok, example) == "7<|im_end|>\n"


def test_prompt_completion_form_equals_messages_form(tmp_path, tok):
    # Prepare
    path = tmp_path / "two.jsonl"
    path.write_text(
        json.dumps({"prompt": "What is 3 + 4?", "completion": "7"})
        + "\n"
        + json.dumps({"messages": [USER, ANSWER]})
        + "\n"
    )
    # Execute
    examples, entries = load_sft_examples(path, tok, 256, "drop")
    # Assert
    assert entries == []
    assert examples[0] == examples[1]


def test_every_bad_record_is_quarantined_with_reason_and_line(tmp_path, tok):
    # Prepare: one crafted line per reason, two good records and a blank line (not a record).
    lines = [
        json.dumps({"messages": [SYSTEM, USER, ANSWER]}).encode(),  # 1 good
        b'{"messages": [',  # 2
        b"[1, 2]",  # 3
        json.dumps({"text": "hello"}).encode(),  # 4
        json.dumps({"prompt": "hi", "completion": 7}).encode(),  # 5
        json.dumps({"messages": "hi"}).encode(),  # 6
        json.dumps({"messages": [{"role": "robot", "content": "x"}, ANSWER]}).encode(),  # 7
        json.dumps({"messages": [ANSWER, USER]}).encode(),  # 8
        json.dumps({"messages": [{"content": "x"}, ANSWER]}).encode(),  # 9
        json.dumps({"prompt": "hi", "completion": "  "}).encode(),  # 10
        json.dumps({"prompt": "hi", "completion": "word " * 100}).encode(),  # 11
        # 12: "assistant\n" + four spaces pre-tokenize as one "\n   " piece (then " return"),
        # which this BPE merges (its corpus has "\n    return"): no prompt/answer token boundary.
        json.dumps({"prompt": "add", "completion": "    return a + b"}).encode(),  # 12
        b"",  # 13
        b'{"prompt": "caf\xff", "completion": "x"}',  # 14
        json.dumps({"prompt": "What is 3 + 4?", "completion": "7"}).encode(),  # 15 good
    ]
    path = tmp_path / "records.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    # Execute
    examples, entries = load_sft_examples(path, tok, 64, "left")
    # Assert
    assert len(examples) == 2
    assert [(e["location"], e["reason"]) for e in entries] == [
        (f"{path}:2", "bad_json"),
        (f"{path}:3", "missing_field"),
        (f"{path}:4", "missing_field"),
        (f"{path}:5", "wrong_field_type"),
        (f"{path}:6", "wrong_field_type"),
        (f"{path}:7", "bad_role"),
        (f"{path}:8", "bad_role"),
        (f"{path}:9", "bad_role"),
        (f"{path}:10", "empty_answer"),
        (f"{path}:11", "too_long"),
        (f"{path}:12", "template_mismatch"),
        (f"{path}:14", "undecodable"),
    ]
    assert entries[0]["sample"] == '{"messages": [' and entries[0]["source"] == "sft"
    assert quarantine_counts(entries) == {
        "bad_json": 1,
        "bad_role": 3,
        "empty_answer": 1,
        "missing_field": 2,
        "template_mismatch": 1,
        "too_long": 1,
        "undecodable": 1,
        "wrong_field_type": 2,
    }


def test_left_truncation_keeps_the_answer_and_cuts_the_prompt_from_the_left(tok):
    # Prepare: the answer is 3 tokens ("7", <|im_end|>, "\n"); a long user message.
    user = {"role": "user", "content": "Please tell me this. " * 10 + "What is 3 + 4?"}
    full_text = tok.render_messages([user, ANSWER], add_generation_prompt=False)
    # Execute
    cut, reason, _ = tokenize_messages([user, ANSWER], tok, 12, "left")
    tightest, _, _ = tokenize_messages([user, ANSWER], tok, 4, "left")
    # Assert
    assert reason == ""
    assert len(cut.input_ids) == 12 and cut.labels.count(-100) == 9
    assert full_text.endswith(tok.decode(cut.input_ids, skip_special_tokens=False))
    assert _unmasked_text(tok, cut) == "7<|im_end|>\n"
    # One prompt token is kept: the "\n" after "assistant", a pre-token of its own.
    assert tok.decode(tightest.input_ids, skip_special_tokens=False) == "\n7<|im_end|>\n"


def test_drop_and_overlong_answers_are_too_long(tok):
    # Execute
    dropped = tokenize_messages([USER, ANSWER], tok, 12, "drop")
    answer_only = tokenize_messages([USER, ANSWER], tok, 3, "left")
    # Assert: "drop" does not cut; 3 answer tokens leave no room for a prompt token at 3.
    assert dropped[0] is None and dropped[1] == "too_long"
    assert answer_only[0] is None and answer_only[1] == "too_long"


def test_collate_shifts_targets_and_pads_on_the_right():
    # Prepare: prompt tokens 5, 6 then answer 7, 8; prompt 9 then answer 10, 11.
    a = SFTExample(input_ids=[5, 6, 7, 8], labels=[-100, -100, 7, 8])
    b = SFTExample(input_ids=[9, 10, 11], labels=[-100, 10, 11])
    # Execute
    inputs_BT, targets_BT = collate([a, b], pad_id=0)
    # Assert: position t predicts token t + 1; padding carries no loss.
    assert inputs_BT.dtype == targets_BT.dtype == torch.long
    assert inputs_BT.tolist() == [[5, 6, 7], [9, 10, 0]]
    assert targets_BT.tolist() == [[-100, 7, 8], [10, 11, -100]]


def test_sft_batches_are_deterministic_and_split_by_rank():
    # Prepare: 10 distinct examples, global batches of 4 (2 per epoch; 2 examples left over).
    examples = [SFTExample(input_ids=[i, 100 + i], labels=[-100, 100 + i]) for i in range(10)]
    whole = SFTBatches(examples, 4, seed=3, pad_id=0)
    again = SFTBatches(examples, 4, seed=3, pad_id=0)
    ranks = [SFTBatches(examples, 4, seed=3, pad_id=0, world_size=2, rank=r) for r in (0, 1)]
    # Execute
    order = [whole.indices(i) for i in range(4)]
    # Assert
    assert order == [again.indices(i) for i in range(4)]
    assert len(set(order[0] + order[1])) == 8  # an epoch never repeats an example
    assert order[:2] != order[2:]  # epoch 1 is reshuffled
    for i in range(4):
        split = [r.indices(i) for r in ranks]
        assert split[0] + split[1] == order[i] and not set(split[0]) & set(split[1])
    inputs_BT, targets_BT = ranks[1].batch(2)
    assert inputs_BT.tolist() == [[i] for i in order[2][2:]]
    assert targets_BT.tolist() == [[100 + i] for i in order[2][2:]]
    with pytest.raises(ValueError, match="world_size=3"):
        SFTBatches(examples, 4, seed=3, pad_id=0, world_size=3, rank=0)


def test_score_exact_match_strips_whitespace():
    assert score_exact_match(["7", " Hello, Ada! ", "x"], ["7", "Hello, Ada!", "y"]) == 2 / 3
    with pytest.raises(ValueError, match="need as many predictions as answers"):
        score_exact_match(["7"], [])


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"max_seq_len": 1}, "data.max_seq_len.*1"),
        ({"truncation": "right"}, "data.truncation.*'right'"),
        ({"path": ""}, "data.path"),
    ],
)
def test_config_errors_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        SFTDataConfig(**{"path": "train.jsonl", **overrides})
