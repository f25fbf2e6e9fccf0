"""Held-out evaluation of an artifact on SFT records: answer-token loss and exact-match accuracy.

Loss is the mean cross-entropy over answer tokens (the tokens fine-tuning trains on), token
weighted over the whole set. Exact match greedily generates from each record's prompt until the
chat template's end-of-turn (or `max_new_tokens`) and compares the decoded text with the
record's answer (surrounding whitespace ignored). An adapter is evaluated on the artifact with
the adapter folded in (`raymoe.models.lora_merge`), the same weights a merged export serves.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from raymoe.data.chat_tokenizer import ChatTokenizer
from raymoe.data.sft import collate, parse_record, score_exact_match, tokenize_messages
from raymoe.models import MoETransformer, load_hf
from raymoe.models.generate import generate
from raymoe.models.lora_merge import merge_adapter


def read_eval_records(path: str | Path) -> list[list[dict[str, str]]]:
    """The valid conversations of a JSONL file (bad lines are skipped: training quarantines them)."""
    records = []
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                messages, _, _ = parse_record(line)
                if messages is not None:
                    records.append(messages)
    return records


@torch.no_grad()
def answer_loss(
    model: MoETransformer,
    tokenizer: ChatTokenizer,
    records: list[list[dict[str, str]]],
    max_seq_len: int,
    batch_size: int = 16,
) -> float:
    """Mean cross-entropy (nats per answer token) of the final answers given their prompts."""
    examples = [
        e for e, _, _ in (tokenize_messages(m, tokenizer, max_seq_len, "left") for m in records) if e is not None
    ]
    total, count = 0.0, 0
    pad = tokenizer.stop_token_ids[0] if tokenizer.stop_token_ids else 0
    for start in range(0, len(examples), batch_size):
        input_ids_BT, targets_BT = collate(examples[start : start + batch_size], pad)
        logits_BTV = model(input_ids_BT)
        total += float(
            F.cross_entropy(
                logits_BTV.reshape(-1, logits_BTV.shape[-1]), targets_BT.reshape(-1), ignore_index=-100, reduction="sum"
            )
        )
        count += int((targets_BT != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def greedy_answers(
    model: MoETransformer, tokenizer: ChatTokenizer, records: list[list[dict[str, str]]], max_new_tokens: int
) -> list[str]:
    """Each record's greedy answer, cut at the first end-of-turn / EOS token."""
    stops = set(tokenizer.stop_token_ids)
    answers = []
    for messages in records:
        prompt = tokenizer.encode(tokenizer.render_messages(messages[:-1], add_generation_prompt=True))
        room = model.cfg.max_seq_len - len(prompt)
        if room < 1:
            answers.append("")
            continue
        new = generate(model, torch.tensor([prompt]), min(max_new_tokens, room))[0].tolist()
        cut = next((i for i, t in enumerate(new) if t in stops), len(new))
        answers.append(tokenizer.decode(new[:cut]))
    return answers


def evaluate_model(
    model: MoETransformer,
    tokenizer: ChatTokenizer,
    records: list[list[dict[str, str]]],
    max_seq_len: int,
    max_new_tokens: int,
) -> dict[str, float]:
    """{"loss", "exact_match", "examples"} of `model` on `records`."""
    model.eval()
    predictions = greedy_answers(model, tokenizer, records, max_new_tokens)
    return {
        "loss": answer_loss(model, tokenizer, records, max_seq_len),
        "exact_match": score_exact_match(predictions, [m[-1]["content"] for m in records]),
        "examples": len(records),
    }


def evaluate_base_and_adapter(
    base_dir: str, adapter_dir: str, eval_path: str, max_seq_len: int, max_new_tokens: int
) -> dict[str, dict[str, float]]:
    """Before/after table: the base artifact and the base with the adapter folded in."""
    tokenizer = ChatTokenizer.from_dir(base_dir)
    records = read_eval_records(eval_path)
    if not records:
        raise ValueError(f"eval_path={eval_path!r} holds no valid record")
    out = {"base": evaluate_model(load_hf(base_dir), tokenizer, records, max_seq_len, max_new_tokens)}
    with tempfile.TemporaryDirectory() as tmp:
        merge_adapter(base_dir, adapter_dir, Path(tmp) / "merged")
        tuned = load_hf(Path(tmp) / "merged")
    out["adapter"] = evaluate_model(tuned, tokenizer, records, max_seq_len, max_new_tokens)
    return out


def format_table(results: dict[str, dict[str, float]]) -> str:
    """A Markdown before/after table."""
    lines = ["| model | held-out answer loss | exact match | examples |", "|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['loss']:.3f} | {r['exact_match']:.1%} | {r['examples']} |")
    return "\n".join(lines)


def held_out_quality(
    artifact: str, adapter: str, eval_path: str, max_seq_len: int, max_new_tokens: int
) -> dict[str, float]:
    """{"loss", "perplexity", "exact_match" (when max_new_tokens > 0), "examples"} of the artifact
    (with `adapter` folded in, if given) on the records of `eval_path`: the drift job's quality
    point."""
    import math

    tokenizer = ChatTokenizer.from_dir(artifact)
    records = read_eval_records(eval_path)
    if not records:
        raise ValueError(f"eval_path={eval_path!r} holds no valid record")
    if adapter:
        with tempfile.TemporaryDirectory() as tmp:
            merge_adapter(artifact, adapter, Path(tmp) / "merged")
            model = load_hf(Path(tmp) / "merged")
    else:
        model = load_hf(artifact)
    model.eval()
    loss = answer_loss(model, tokenizer, records, max_seq_len)
    out = {"loss": loss, "perplexity": math.exp(loss), "examples": len(records)}
    if max_new_tokens > 0:
        predictions = greedy_answers(model, tokenizer, records, max_new_tokens)
        out["exact_match"] = score_exact_match(predictions, [m[-1]["content"] for m in records])
    return out
