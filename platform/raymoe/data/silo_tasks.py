"""Three small non-IID SFT data sets, one per federated silo, and a held-out set drawn from all.

Every record is a `messages` record (system prompt as in function_qa, one question, one exact
answer), generated deterministically from the shipped corpus or from a seeded generator:
- `code`: function QA (name / argument count, in turn) on functions of
  `data/corpus/code.jsonl.gz` that the function_qa task does not use (those after its held-out
  and train functions);
- `prose`: sentences from `data/corpus/prose.jsonl.gz` (the CPython 3.11.7 language reference
  topics):
  "What is the first word of this sentence?", "How many words are in this sentence?" and
  "What is the last word of this sentence?", in turn; words are the space-separated pieces,
  answered without a trailing comma or full stop; only plain sentences are used (letters,
  spaces and commas, ending in a full stop, 5 to 16 words);
- `chat`: greetings ("Say hello to Ada." -> "Hello, Ada!"; also goodbye, good morning) and
  arithmetic on integers 0..20 ("What is 3 + 4?" -> "7"; +, - and *).
Held-out items (functions, sentences, questions) never appear in a silo's training file.

Regenerate the shipped files:
`python -m raymoe.data.silo_tasks --corpus data/corpus --out data/sft/silos`
"""

from __future__ import annotations

import argparse
import random
import re
from pathlib import Path

from raymoe.data.corpus_bundle import read_bundle
from raymoe.data.function_qa import (
    NUM_HELDOUT,
    NUM_TRAIN,
    SEED,
    SYSTEM_PROMPT,
    qa_record,
    shuffled_functions,
    write_jsonl,
)

SILOS = ("code", "prose", "chat")
NUM_SILO_TRAIN = 150
NUM_SILO_HELDOUT = 20  # per silo; the held-out file holds 3x this
PROSE_QUESTIONS = {
    "first": "What is the first word of this sentence?",
    "count": "How many words are in this sentence?",
    "last": "What is the last word of this sentence?",
}
NAMES = (
    "Ada",
    "Alan",
    "Grace",
    "Guido",
    "Barbara",
    "Donald",
    "Edsger",
    "Frances",
    "John",
    "Katherine",
    "Linus",
    "Margaret",
    "Niklaus",
    "Radia",
    "Tim",
)
GREETINGS = ("Hello", "Goodbye", "Good morning")
_PLAIN_SENTENCE = re.compile(r"[A-Z][a-z]*(?:,? [A-Za-z]+)*\.")


def _record(user: str, answer: str) -> dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
            {"role": "assistant", "content": answer},
        ]
    }


def code_records(code_bundle: str | Path, count: int, seed: int = SEED) -> list[dict]:
    """Name / argument-count questions on `count` functions function_qa leaves unused."""
    start = NUM_HELDOUT + NUM_TRAIN
    functions = shuffled_functions(code_bundle, seed)[start : start + count]
    if len(functions) < count:
        raise ValueError(f"{code_bundle}: {len(functions)} unused functions, {count} needed")
    return [qa_record(f.source, ("name", "argcount")[i % 2]) for i, f in enumerate(functions)]


def plain_sentences(prose_bundle: str | Path) -> list[str]:
    """The distinct plain sentences of the `*.txt` documents of a prose bundle, in name then text
    order."""
    found, seen = [], set()
    for name, text in sorted(read_bundle(prose_bundle).items()):
        if not name.endswith(".txt"):
            continue
        # Paragraphs are blank-line separated; indented ones are grammar or code, not prose.
        for para in text.split("\n\n"):
            if not para.strip() or para.startswith(" "):
                continue
            for sentence in re.split(r"(?<=\.)\s+", " ".join(para.split())):
                if _PLAIN_SENTENCE.fullmatch(sentence) and 5 <= len(sentence.split()) <= 16 and sentence not in seen:
                    seen.add(sentence)
                    found.append(sentence)
    return found


def prose_records(prose_bundle: str | Path, count: int, seed: int = SEED) -> list[dict]:
    """Word questions on `count` shuffled plain sentences, the three kinds in turn."""
    sentences = plain_sentences(prose_bundle)
    if len(sentences) < count:
        raise ValueError(f"{prose_bundle}: {len(sentences)} plain sentences, {count} needed")
    random.Random(seed).shuffle(sentences)
    records = []
    for i, sentence in enumerate(sentences[:count]):
        words = sentence.split()
        kind = tuple(PROSE_QUESTIONS)[i % len(PROSE_QUESTIONS)]
        answer = {"first": words[0].rstrip(","), "count": str(len(words)), "last": words[-1].rstrip(".")}[kind]
        records.append(_record(f"{PROSE_QUESTIONS[kind]}\n{sentence}", answer))
    return records


def chat_records(count: int, seed: int = SEED) -> list[dict]:
    """`count` distinct greeting and arithmetic questions, one greeting per five records."""
    # 45 greetings and 3 * 21 * 21 sums exist: enough for count <= 225 with this mix.
    if count > 225:
        raise ValueError(f"chat_records makes at most 225 distinct records, {count} asked")
    rng = random.Random(seed)
    records: list[dict] = []
    seen: set[str] = set()
    while len(records) < count:
        if len(records) % 5 == 0:
            name, greeting = rng.choice(NAMES), rng.choice(GREETINGS)
            user, answer = f"Say {greeting.lower()} to {name}.", f"{greeting}, {name}!"
        else:
            a, b, op = rng.randint(0, 20), rng.randint(0, 20), rng.choice("+-*")
            user, answer = f"What is {a} {op} {b}?", str({"+": a + b, "-": a - b, "*": a * b}[op])
        if user in seen:
            continue
        seen.add(user)
        records.append(_record(user, answer))
    return records


def silo_splits(
    corpus_dir: str | Path, num_train: int = NUM_SILO_TRAIN, num_heldout: int = NUM_SILO_HELDOUT, seed: int = SEED
) -> tuple[dict[str, list[dict]], list[dict]]:
    """Each silo's training records and the shared held-out records.

    Args:
        corpus_dir: the shipped corpus (with `code.jsonl.gz` and `prose.jsonl.gz`).
        num_train: training records per silo.
        num_heldout: held-out records per silo (the first ones generated).

    Returns:
        ({silo: train records}, held-out records: code, then prose, then chat).
    """
    corpus = Path(corpus_dir)
    n = num_heldout + num_train
    per_silo = {
        "code": code_records(corpus / "code.jsonl.gz", n, seed),
        "prose": prose_records(corpus / "prose.jsonl.gz", n, seed),
        "chat": chat_records(n, seed),
    }
    train = {silo: records[num_heldout:] for silo, records in per_silo.items()}
    heldout = [r for silo in SILOS for r in per_silo[silo][:num_heldout]]
    return train, heldout


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m raymoe.data.silo_tasks", description="Writes the federated silo SFT data sets."
    )
    parser.add_argument("--corpus", default="data/corpus", help="dir of the two bundles")
    parser.add_argument("--out", default="data/sft/silos", help="output directory")
    args = parser.parse_args(argv)
    train, heldout = silo_splits(args.corpus)
    out = Path(args.out)
    for silo, records in train.items():
        write_jsonl(out / silo / "train.jsonl", records)
    write_jsonl(out / "heldout.jsonl", heldout)
    sizes = ", ".join(f"{silo} {len(records)}" for silo, records in train.items())
    print(f"silo_tasks: train {sizes}; {len(heldout)} held-out records in {out}")


if __name__ == "__main__":
    main()
