"""Function QA: a small SFT task with exact answers, generated from the shipped code corpus.

Each record shows one short Python function from `data/corpus/code.jsonl.gz` (CPython 3.11.7
`Lib/*.py`, PSF license) and asks one of three questions whose answer the function's syntax decides:
- `name`: "What is the name of this function?" -> the name after `def`;
- `argcount`: "How many arguments does this function take?" -> a decimal count of its named
  parameters: positional-only, ordinary and keyword-only ones, `self`/`cls` included,
  `*args` and `**kwargs` excluded;
- `return`: "What does this function return?" -> the source text of the expression of the first
  `return` statement in source order, or `None` for a bare `return` or no `return` at all.

Functions are top-level or methods of top-level classes, without decorators, nested
definitions (def, class, lambda) or yield/await, of at most MAX_LINES lines and MAX_CHARS
characters (dedented), so a record fits in 256 tokens of the debug artifact's byte-level BPE;
a first `return` expression must be one line of at most MAX_ANSWER_CHARS characters. Identical
sources are kept once. Generation is deterministic (sorted files, fixed seed) and the split is by
function: the held-out functions are never shown in training.

Regenerate the shipped files:
`python -m raymoe.data.function_qa --corpus data/corpus/code.jsonl.gz --out data/sft/function_qa`
"""

from __future__ import annotations

import argparse
import ast
import json
import random
from dataclasses import dataclass
from pathlib import Path

from raymoe.atomic_io import atomic_write_bytes
from raymoe.data.corpus_bundle import read_bundle

SYSTEM_PROMPT = "Answer with the exact answer only."
QUESTIONS = {
    "name": "What is the name of this function?",
    "argcount": "How many arguments does this function take?",
    "return": "What does this function return?",
}
KINDS = tuple(QUESTIONS)
SEED = 0
NUM_TRAIN = 500
NUM_HELDOUT = 100
MAX_LINES = 10
MAX_CHARS = 180
MAX_ANSWER_CHARS = 30
# Nodes that make a function a poor fit: nested scopes (whose returns and parameters are not the
# function's own) and generators/coroutines (whose "return" is not what a call gives back).
_EXCLUDED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda, ast.Yield, ast.YieldFrom, ast.Await)


@dataclass(frozen=True)
class PyFunction:
    """A function found in the corpus: where it is and its dedented source."""

    path: str  # file name in the corpus (its id in the code bundle)
    lineno: int  # 1-based line of `def`
    source: str


def function_answers(source: str) -> dict[str, str]:
    """The answers to the three questions for `source`, which holds one function definition.

    Returns:
        {"name": ..., "argcount": ..., "return": ...} (see the module docstring for the rules).
    """
    node = ast.parse(source).body[0]
    if not isinstance(node, ast.FunctionDef):
        raise ValueError(f"expected a function definition, got {type(node).__name__}")
    args = node.args
    returns = [n for n in ast.walk(node) if isinstance(n, ast.Return)]
    # ast.walk is breadth first; the first return is the first in source position.
    first = min(returns, key=lambda n: (n.lineno, n.col_offset), default=None)
    value = (
        "None" if first is None or first.value is None else ast.get_source_segment(source, first.value) or ""
    )  # parsed nodes carry positions
    return {
        "name": node.name,
        "argcount": str(len(args.posonlyargs) + len(args.args) + len(args.kwonlyargs)),
        "return": value,
    }


def _dedented(lines: list[str], node: ast.FunctionDef) -> str | None:
    """The function's own lines with its indentation removed, or None if they are not its own."""
    body = lines[node.lineno - 1 : node.end_lineno]
    indent = " " * node.col_offset
    # Every line must carry the def's indentation (a docstring may not dedent past it) and the
    # function must own its first and last lines whole (no `x = 1; def f(): ...`).
    if any(line.strip() and not line.startswith(indent) for line in body):
        return None
    if body[0][: node.col_offset].strip() or body[-1][node.end_col_offset :].strip():
        return None
    return "\n".join(line[node.col_offset :] for line in body)


def _eligible(node: ast.FunctionDef, source: str) -> bool:
    if node.decorator_list:
        return False
    if (node.end_lineno or node.lineno) - node.lineno + 1 > MAX_LINES or len(source) > MAX_CHARS:
        return False
    if any(isinstance(n, _EXCLUDED) for n in ast.walk(node) if n is not node):
        return False
    answer = function_answers(source)["return"]
    return "\n" not in answer and len(answer) <= MAX_ANSWER_CHARS


def find_functions(corpus: str | Path) -> list[PyFunction]:
    """Eligible functions of the `*.py` documents of the code bundle `corpus`, by name then line.

    Returns:
        The functions, each distinct source once (its first occurrence).
    """
    found, seen = [], set()
    for name, text in sorted(read_bundle(corpus).items()):
        if not name.endswith(".py"):
            continue
        lines = text.splitlines()
        tree = ast.parse(text)
        candidates = list(tree.body)
        for node in tree.body:
            if isinstance(node, ast.ClassDef):
                candidates.extend(node.body)
        for node in sorted(candidates, key=lambda n: n.lineno):
            if not isinstance(node, ast.FunctionDef):
                continue
            source = _dedented(lines, node)
            if source is not None and _eligible(node, source) and source not in seen:
                seen.add(source)
                found.append(PyFunction(name, node.lineno, source))
    return found


def qa_record(source: str, kind: str) -> dict:
    """A `messages` SFT record asking question `kind` about the function in `source`."""
    user = f"{QUESTIONS[kind]}\n```python\n{source}\n```"
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user},
            {"role": "assistant", "content": function_answers(source)[kind]},
        ]
    }


def shuffled_functions(corpus: str | Path, seed: int = SEED) -> list[PyFunction]:
    """The eligible functions in a fixed shuffled order (what the splits are cut from)."""
    functions = find_functions(corpus)
    random.Random(seed).shuffle(functions)
    return functions


def function_qa_splits(
    corpus: str | Path, num_train: int = NUM_TRAIN, num_heldout: int = NUM_HELDOUT, seed: int = SEED
) -> tuple[list[dict], list[dict]]:
    """Train and held-out records, one question per function, kinds in turn (balanced to +-1).

    The held-out split takes the first `num_heldout` shuffled functions and train the next
    `num_train`, so no function is in both.

    Returns:
        (train records, held-out records).
    """
    functions = shuffled_functions(corpus, seed)
    if len(functions) < num_heldout + num_train:
        raise ValueError(
            f"{corpus} has {len(functions)} eligible functions, fewer than {num_heldout} held-out + {num_train} train"
        )
    heldout = functions[:num_heldout]
    train = functions[num_heldout : num_heldout + num_train]
    return (
        [qa_record(f.source, KINDS[i % len(KINDS)]) for i, f in enumerate(train)],
        [qa_record(f.source, KINDS[i % len(KINDS)]) for i, f in enumerate(heldout)],
    )


def jsonl_bytes(records: list[dict]) -> bytes:
    """Records as JSONL (one compact object per line, UTF-8), byte-identical for equal records."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records).encode("utf-8")


def write_jsonl(path: str | Path, records: list[dict]) -> Path:
    """Writes records as JSONL atomically."""
    return atomic_write_bytes(path, jsonl_bytes(records))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m raymoe.data.function_qa", description="Writes the function QA SFT task."
    )
    parser.add_argument("--corpus", default="data/corpus/code.jsonl.gz", help="code bundle")
    parser.add_argument("--out", default="data/sft/function_qa", help="output directory")
    args = parser.parse_args(argv)
    train, heldout = function_qa_splits(args.corpus)
    out = Path(args.out)
    write_jsonl(out / "train.jsonl", train)
    write_jsonl(out / "heldout.jsonl", heldout)
    print(f"function_qa: {len(train)} train, {len(heldout)} held-out records in {out}")


if __name__ == "__main__":
    main()
