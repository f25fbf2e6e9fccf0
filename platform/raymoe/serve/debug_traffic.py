"""Two traffic windows with a known shift, for the drift job's debug config and the demo.

Serves the debug artifact in-process (`EngineCore`, the serving app's engine) on prompts cut from
the shipped corpus: first Python source (data/corpus/code.jsonl.gz), then English prose
(data/corpus/prose.jsonl.gz), recording every request through the serving app's `TrafficSampler`.
The prose window differs from the code window in its tokens, its embeddings and its routing, so the
drift job alarms on it.
"""

from __future__ import annotations

import random
from pathlib import Path

from raymoe.data.corpus_bundle import read_bundle

CORPUS = Path(__file__).resolve().parents[3] / "data" / "corpus"
NUM_REQUESTS = 48  # per window: enough rows for the tests to have power, a few seconds of CPU


def corpus_prompts(kind: str, num: int, seed: int) -> list[str]:
    """`num` prompts cut from the shipped corpus (`code` or `prose`): a random stretch of 80 to 600
    characters from a random file, each drawn with its own seeded RNG."""
    texts = list(read_bundle(CORPUS / f"{kind}.jsonl.gz").values())
    rng = random.Random(seed)
    prompts = []
    for _ in range(num):
        text = rng.choice(texts)
        length = rng.randint(80, 600)
        start = rng.randrange(max(1, len(text) - length))
        prompts.append(text[start : start + length])
    return prompts


def serve_window(core, tokenizer, sampler, prompts: list[str], max_tokens: int, seed: int) -> None:
    """Runs `prompts` through the engine (8 at a time) and records each finished one."""
    from raymoe.serve.request import GenerationRequest, SamplingParams

    limit = core.max_seq_len - max_tokens
    pending = {}
    for i, text in enumerate(prompts):
        ids = tokenizer.encode(text)[:limit]
        features = sampler.start(ids)
        pending[f"r{i}"] = features
        core.add_request(
            GenerationRequest(
                request_id=f"r{i}",
                prompt_ids=ids,
                record_features=features.sampled,
                params=SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed + i),
            )
        )
    while core.has_work():
        for rid, event in core.step():
            pending[rid].add("", event)
            if event.finish_reason:
                sampler.record(pending.pop(rid))


def write_debug_traffic(out_dir: str | Path, artifact: str | Path, seed: int = 0) -> list[Path]:
    """Writes the code window, then the prose window, into `out_dir` unless it already holds
    windows; writes the debug artifact at `artifact` first when there is none. Returns the new
    window files (none when there were windows already)."""
    from raymoe.data.chat_tokenizer import ChatTokenizer
    from raymoe.models import load_hf
    from raymoe.monitor.traffic_windows import list_windows
    from raymoe.serve.debug_artifact import make_debug_artifact
    from raymoe.serve.engine import EngineConfig, EngineCore
    from raymoe.serve.traffic_sampler import TrafficConfig, TrafficSampler

    out_dir, artifact = Path(out_dir), Path(artifact)
    if out_dir.is_dir() and list_windows(out_dir):
        return []
    if not (artifact / "config.json").is_file():
        texts = corpus_prompts("code", 100, seed) + corpus_prompts("prose", 100, seed + 1)
        make_debug_artifact(artifact, seed=seed, corpus=texts)
    model = load_hf(artifact)
    tokenizer = ChatTokenizer.from_dir(artifact)
    core = EngineCore(model, EngineConfig(num_slots=8, max_tokens_per_step=256, cpu_kernels="default"))
    sampler = TrafficSampler(
        TrafficConfig(enabled=True, output_dir=str(out_dir), window_requests=10**6),
        model_id=artifact.name,
        vocab_size=tokenizer.tokenizer.get_vocab_size(),
        expert_counts=lambda: core.tokens_per_expert_LE.clone(),
        replica_tag="debug",
        background=False,
    )
    written = []
    for kind, offset in (("code", 0), ("prose", 1000)):
        serve_window(
            core,
            tokenizer,
            sampler,
            corpus_prompts(kind, NUM_REQUESTS, seed + offset),
            max_tokens=16,
            seed=seed + offset,
        )
        written += sampler.flush()
    sampler.close()
    return written
