"""Supervised fine-tuning (SFT) examples: chat records -> token ids with an answer-only loss mask.

Records are JSONL, one per line, in either form:
- `{"messages": [{"role": "system" | "user" | "assistant", "content": str}, ...]}` (OpenAI chat
  form), ending with an assistant message;
- `{"prompt": str, "completion": str}`, read as one user message and one assistant message.

Each record is rendered with the artifact's chat template (ChatTokenizer, the same render as
serving): `prompt = render(messages[:-1], add_generation_prompt=True)` and
`full = render(messages, add_generation_prompt=False)`. The answer is the tokens of `full` after
those of `prompt`, which must be a prefix of them (else `template_mismatch`). With ChatML the
answer is `ANSWER<|im_end|>\\n`: the end-of-turn marker is trained so the model learns to stop.
Only the final assistant turn is trained; earlier turns, assistant ones included, are context.

Lengths are in tokens. An example holds at most `max_seq_len` tokens (prompt + answer). With
truncation `left` a longer example loses prompt tokens from the left; one prompt token is always
kept so that every answer token has a position predicting it. An answer of `max_seq_len` tokens
or more, or with truncation `drop` any example over the limit, is quarantined as `too_long`.

Bad records are quarantined (raymoe.data.quarantine) with their reason and `path:LINE`
location (1-based), never dropped silently.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from raymoe.config import require
from raymoe.data.chat_tokenizer import ChatTokenizer
from raymoe.data.decode import (
    BAD_JSON,
    MISSING_FIELD,
    UNDECODABLE,
    WRONG_FIELD_TYPE,
    DecodeConfig,
    decode_bytes,
)
from raymoe.data.quarantine import quarantine_entry

# Quarantine reasons this reader adds to the decode ones. `too_long` has its own meaning here
# (over data.max_seq_len tokens), hence its own reason tuple (see quarantine_entry).
BAD_ROLE = "bad_role"
EMPTY_ANSWER = "empty_answer"
TOO_LONG = "too_long"
TEMPLATE_MISMATCH = "template_mismatch"
SFT_QUARANTINE_REASONS = (
    UNDECODABLE,
    BAD_JSON,
    MISSING_FIELD,
    WRONG_FIELD_TYPE,
    BAD_ROLE,
    EMPTY_ANSWER,
    TOO_LONG,
    TEMPLATE_MISMATCH,
)
SFT_SOURCE = "sft"
ROLES = ("system", "user", "assistant")
# Label of a token that carries no loss (F.cross_entropy's default ignore_index).
IGNORE_INDEX = -100


@dataclass(kw_only=True)
class SFTDataConfig:
    """Where SFT records are and how they are fitted to the context."""

    # A JSONL file of `messages` or `prompt`/`completion` records.
    path: str
    # Most tokens in one example (prompt + answer); the model must take max_seq_len - 1 inputs.
    max_seq_len: int = 256
    # `left`: cut prompt tokens from the left to fit; `drop`: quarantine what does not fit.
    truncation: Literal["drop", "left"] = "left"

    def __post_init__(self) -> None:
        require(
            isinstance(self.path, str) and bool(self.path),
            f"data.path must be the path of a JSONL file, got {self.path!r}",
        )
        require(
            type(self.max_seq_len) is int and self.max_seq_len >= 2,
            f"data.max_seq_len must be an integer >= 2 (tokens), got {self.max_seq_len!r}",
        )
        require(self.truncation in ("drop", "left"), f"data.truncation must be drop or left, got {self.truncation!r}")


@dataclass
class SFTExample:
    """One tokenized record: `labels[t]` is `input_ids[t]` on answer tokens, -100 elsewhere."""

    input_ids: list[int]
    labels: list[int]


def _check_messages(messages) -> tuple[list[dict[str, str]] | None, str, str]:
    if not isinstance(messages, list):
        return None, WRONG_FIELD_TYPE, f"field 'messages' is {type(messages).__name__}, not list"
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            kind = type(message).__name__
            return None, WRONG_FIELD_TYPE, f"messages[{i}] is {kind}, not an object"
        if message.get("role") not in ROLES:
            role = message.get("role")
            return None, BAD_ROLE, f"messages[{i}].role is {role!r}, expected one of {ROLES}"
        if "content" not in message:
            return None, MISSING_FIELD, f"messages[{i}] has no field 'content'"
        if not isinstance(message["content"], str):
            kind = type(message["content"]).__name__
            return None, WRONG_FIELD_TYPE, f"messages[{i}].content is {kind}, not str"
    if not messages or messages[-1]["role"] != "assistant":
        return None, BAD_ROLE, "the last message must be the assistant's (the answer to train)"
    if not messages[-1]["content"].strip():
        return None, EMPTY_ANSWER, "the final assistant message is empty or whitespace"
    return [{"role": m["role"], "content": m["content"]} for m in messages], "", ""


def parse_record(line: str) -> tuple[list[dict[str, str]] | None, str, str]:
    """Checks one JSONL line and returns its conversation as role/content messages.

    Returns:
        (messages, reason, detail): messages is None when the record must be quarantined, with
        reason `bad_json`, `missing_field`, `wrong_field_type`, `bad_role` or `empty_answer`.
    """
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        return None, BAD_JSON, f"{exc.msg} at column {exc.colno}"
    if not isinstance(obj, dict):
        return (
            None,
            MISSING_FIELD,
            (f"expected an object with 'messages' or 'prompt' and 'completion', got {type(obj).__name__}"),
        )
    if "messages" in obj:
        return _check_messages(obj["messages"])
    for key in ("prompt", "completion"):
        if key not in obj:
            return None, MISSING_FIELD, f"no field 'messages' and no field {key!r}"
        if not isinstance(obj[key], str):
            return None, WRONG_FIELD_TYPE, f"field {key!r} is {type(obj[key]).__name__}, not str"
    return _check_messages(
        [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["completion"]}]
    )


def tokenize_messages(
    messages: list[dict[str, str]], tokenizer: ChatTokenizer, max_seq_len: int, truncation: str
) -> tuple[SFTExample | None, str, str]:
    """Renders and tokenizes a checked conversation, masking all but the final answer.

    Returns:
        (example, reason, detail): example is None with reason `template_mismatch` or `too_long`.
    """
    render = tokenizer.render_messages
    prompt_ids = tokenizer.encode(render(messages[:-1], add_generation_prompt=True))
    full_ids = tokenizer.encode(render(messages, add_generation_prompt=False))
    n = len(prompt_ids)
    # BPE may merge across the prompt/answer boundary (e.g. the turn's "\n" with an answer's
    # leading spaces); then no token split separates prompt from answer.
    if full_ids[:n] != prompt_ids or len(full_ids) == n:
        return (
            None,
            TEMPLATE_MISMATCH,
            (f"the prompt's {n} tokens are not a strict prefix of the conversation's {len(full_ids)} tokens"),
        )
    answer_ids = full_ids[n:]
    if len(full_ids) > max_seq_len:
        if truncation == "drop" or len(answer_ids) >= max_seq_len:
            return (
                None,
                TOO_LONG,
                (
                    f"{len(full_ids)} tokens (answer {len(answer_ids)}) do not fit "
                    f"data.max_seq_len={max_seq_len} with truncation={truncation}"
                ),
            )
        prompt_ids = prompt_ids[len(full_ids) - max_seq_len :]
    return SFTExample(input_ids=prompt_ids + answer_ids, labels=[IGNORE_INDEX] * len(prompt_ids) + answer_ids), "", ""


def load_sft_examples(
    path: str | Path, tokenizer: ChatTokenizer, max_seq_len: int, truncation: str
) -> tuple[list[SFTExample], list[dict]]:
    """Reads a JSONL file of SFT records into examples, quarantining the bad ones.

    Args:
        path: the JSONL file; blank lines are not records and are skipped, as in ingest.
        tokenizer: the artifact's tokenizer and chat template.
        max_seq_len: most tokens per example.
        truncation: `left` or `drop` (see the module docstring).

    Returns:
        (examples in file order, quarantine entries with location `path:LINE`).
    """
    examples, entries = [], []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            line, reason, detail = decode_bytes(raw, DecodeConfig())
            messages = example = None
            if line is not None:
                messages, reason, detail = parse_record(line)
            if messages is not None:
                example, reason, detail = tokenize_messages(messages, tokenizer, max_seq_len, truncation)
            if example is None:
                entries.append(
                    quarantine_entry(
                        SFT_SOURCE, f"{path}:{lineno}", reason, detail, raw, reasons=SFT_QUARANTINE_REASONS
                    )
                )
            else:
                examples.append(example)
    return examples, entries


def quarantine_counts(entries: list[dict]) -> dict[str, int]:
    """Quarantined records per reason, reasons sorted."""
    counts = Counter(e["reason"] for e in entries)
    return {reason: counts[reason] for reason in sorted(counts)}


def collate(examples: list[SFTExample], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Pads examples on the right into next-token training pairs, already shifted.

    Args:
        examples: at least one example, each of 2 tokens or more.
        pad_id: token id put in padded input positions (they carry no loss).

    Returns:
        (input_ids_BT, targets_BT), LongTensors of shape (B, T) with T = longest example - 1:
        input_ids_BT[b, t] = input_ids[t] and targets_BT[b, t] = labels[t + 1] (the next token
        where it is an answer token, -100 on prompt tokens and padding).
    """
    if not examples:
        raise ValueError("collate needs at least one example")
    T = max(len(e.input_ids) for e in examples) - 1
    input_ids_BT = torch.full((len(examples), T), pad_id, dtype=torch.long)
    targets_BT = torch.full((len(examples), T), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e.input_ids) - 1
        input_ids_BT[b, :n] = torch.tensor(e.input_ids[:-1], dtype=torch.long)
        targets_BT[b, :n] = torch.tensor(e.labels[1:], dtype=torch.long)
    return input_ids_BT, targets_BT


class SFTBatches:
    """Micro-batches of examples in a shuffled order that depends only on (seed, index).

    As train.data.TrainBatches does for token rows: global micro-batch g of epoch e is examples
    perm_e[g*B:(g+1)*B] (perm_e drawn from (seed, e); the last partial batch of an epoch is not
    used) and worker `rank` takes its contiguous 1/world_size slice, so the data position is one
    integer, the same on every worker and for any number of workers.

    Args:
        examples: the training examples.
        batch_size: examples per micro-batch over all workers.
        seed: shuffling seed.
        pad_id: padding token id for `collate`.
        world_size: workers sharing each micro-batch; must divide batch_size.
        rank: this worker's rank.
    """

    def __init__(
        self, examples: list[SFTExample], batch_size: int, seed: int, *, pad_id: int, world_size: int = 1, rank: int = 0
    ):
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of world_size={world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        if len(examples) < batch_size:
            raise ValueError(f"{len(examples)} examples are fewer than batch_size={batch_size}")
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.pad_id, self.world_size, self.rank = pad_id, world_size, rank
        self.batches_per_epoch = len(examples) // batch_size
        self._perm_epoch, self._perm = -1, np.zeros(0, dtype=np.int64)

    def indices(self, index: int) -> list[int]:
        """Positions in `examples` of this worker's share of micro-batch `index` (run-wide)."""
        epoch, within = divmod(index, self.batches_per_epoch)
        if epoch != self._perm_epoch:
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
            self._perm_epoch = epoch
        local = self.batch_size // self.world_size
        start = within * self.batch_size + self.rank * local
        return [int(i) for i in self._perm[start : start + local]]

    def batch(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """This worker's (input_ids_BT, targets_BT) of batch `index`; B = batch_size / world."""
        return collate([self.examples[i] for i in self.indices(index)], self.pad_id)


def score_exact_match(predictions: list[str], answers: list[str]) -> float:
    """Fraction (0..1) of predictions equal to their answer, surrounding whitespace stripped."""
    if len(predictions) != len(answers) or not answers:
        raise ValueError(
            f"need as many predictions as answers, at least one; got {len(predictions)} and {len(answers)}"
        )
    hits = sum(p.strip() == a.strip() for p, a in zip(predictions, answers))
    return hits / len(answers)
