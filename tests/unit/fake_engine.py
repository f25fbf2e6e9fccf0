"""A scripted engine for HTTP tests, and a tiny trained tokenizer to go with it."""

from __future__ import annotations

import asyncio

from raymoe.data.tokenizer import save_tokenizer, train_tokenizer
from raymoe.serve.request import (
    EngineOverloadedError,
    EngineStoppedError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    TokenEvent,
)

CORPUS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Mixture of experts models route each token to a few experts.",
    "Ray Serve runs the OpenAI compatible server. STOP here please.",
] * 20


def write_tokenizer(out_dir) -> str:
    """Trains a small byte-level BPE (ChatML specials, chat template) and saves it in HF layout."""
    save_tokenizer(train_tokenizer(CORPUS, vocab_size=400), out_dir)
    return str(out_dir)


class FakeEngine:
    """Replies with the token ids of `reply` (cycled), one per `await`, like a real engine would.

    Refuses with EngineOverloadedError when `capacity` requests are already in flight, and
    records every request it accepted.
    """

    def __init__(
        self,
        reply_ids: list[int],
        max_seq_len: int = 128,
        capacity: int = 1000,
        eos_after: int | None = None,
        stopped: bool = False,
        stop_after: int | None = None,
    ):
        self.stopped = stopped  # as an engine whose thread or process has died
        # Dies after this many tokens of a request (a shard worker's node lost mid-request).
        self.stop_after = stop_after
        self.reply_ids = reply_ids
        self.max_seq_len = max_seq_len
        self.capacity = capacity
        self.eos_after = eos_after
        self.in_flight = 0
        self.requests: list[GenerationRequest] = []
        self.aborted: list[str] = []
        self.gate: asyncio.Event | None = None  # when set by a test, tokens wait for it

    async def generate(self, request: GenerationRequest):
        if self.stopped:
            raise EngineStoppedError("engine process stopped: exit code -9")
        if self.in_flight >= self.capacity:
            raise EngineOverloadedError(f"{self.in_flight} requests in flight")
        if len(request.prompt_ids) + request.params.max_tokens > self.max_seq_len:
            raise InvalidRequestError("too long", "max_tokens")
        self.requests.append(request)
        self.in_flight += 1
        done = False
        try:
            p = request.params
            for i in range(p.max_tokens):
                if self.gate is not None:
                    await self.gate.wait()
                await asyncio.sleep(0)
                if self.stop_after is not None and i == self.stop_after:
                    raise EngineStoppedError("a shard worker failed (ActorDiedError)")
                reason: FinishReason | None
                if self.eos_after is not None and i == self.eos_after:
                    token, reason = p.stop_token_ids[0], "stop"
                else:
                    token = self.reply_ids[i % len(self.reply_ids)]
                    reason = "length" if i == p.max_tokens - 1 else None
                done = reason is not None
                yield TokenEvent(
                    token_id=token,
                    finish_reason=reason,
                    num_prompt_tokens=len(request.prompt_ids),
                    logprob=-0.5 if p.logprobs is not None else None,
                    top_logprobs={token: -0.5} if p.logprobs else ({} if p.logprobs is not None else None),
                )
                if done:
                    return
        finally:
            self.in_flight -= 1
            if not done:
                self.aborted.append(request.request_id)

    def stats(self):
        return {"running": self.in_flight}
