"""What crosses the engine boundary: a generation request in token ids, and the tokens coming back.

Plain dataclasses without torch, shared by the HTTP layer, the engines and the fake engine.
Text (prompts, stop strings, detokenization) stays in the HTTP layer; engines see token ids only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# Why generation ended: an end token or stop string ("stop"), or max_tokens / max_seq_len ("length").
FinishReason = Literal["stop", "length"]


class EngineOverloadedError(RuntimeError):
    """The engine's waiting queue is full; answered with 429 and Retry-After."""


class EngineStoppedError(RuntimeError):
    """The engine's thread or process has died; answered with 503 and Retry-After while Serve's
    health check restarts the replica."""


class InvalidRequestError(ValueError):
    """A request the engine can never serve; `param` names the offending request field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(kw_only=True)
class SamplingParams:
    """Per-request sampling. temperature 0 is greedy; top_k 0 and top_p 1.0 switch those off."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    # Number of most likely alternatives to report per token; None = no logprobs at all.
    logprobs: int | None = None
    # Token ids that end generation (the tokenizer's EOS); they are not part of the output text.
    stop_token_ids: list[int] = field(default_factory=list)


@dataclass(kw_only=True)
class GenerationRequest:
    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    # LoRA adapter name (from model "base:adapter"); None = base weights.
    adapter: str | None = None
    # Sampled for the traffic windows (`raymoe.serve.traffic_sampler`): every event carries the
    # chosen token's log-probability, the first one also the pooled prompt embedding.
    record_features: bool = False


@dataclass
class TokenEvent:
    """One generated token. `finish_reason` is set on the last one: "stop" or "length"."""

    token_id: int
    logprob: float | None = None
    top_logprobs: dict[int, float] | None = None
    finish_reason: FinishReason | None = None
    num_prompt_tokens: int = 0
    # Requests with `record_features` only (None otherwise, so events stay small):
    # log-probability of this token under the model's distribution (nats, before temperature).
    chosen_logprob: float | None = None
    # On the first token: the final-norm hidden state at the last prompt position (the row that
    # produced this token), D floats; None with expert-parallel shard workers.
    embedding: list[float] | None = None
