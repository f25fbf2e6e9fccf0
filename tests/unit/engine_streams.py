"""Helpers for tests that stream requests through an `Engine` (thread or process)."""

import torch

from raymoe.serve.request import GenerationRequest, SamplingParams


def greedy(n: int) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=n)


def full_recompute_greedy(model, prompt, n):
    """Reference without a KV cache: the whole sequence re-run for every new token."""
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            out.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
            ids.append(out[-1])
    return out


async def collect(engine, rid: str, prompt: list[int], n: int, stop_after: int | None = None) -> list[int]:
    """The token ids of one greedy request; leaves the stream after `stop_after` tokens."""
    out = []
    async for event in engine.generate(GenerationRequest(request_id=rid, prompt_ids=prompt, params=greedy(n))):
        out.append(event.token_id)
        if stop_after and len(out) == stop_after:
            break
    return out
