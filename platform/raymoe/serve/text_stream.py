"""One request's output as text: engine tokens -> detokenized deltas, cut at stop strings.

`TextStream.start()` submits the request and waits for its first token, so that a refusal (queue
full, request too long) becomes an HTTP error before any response byte is sent. Iterating yields
`(text_delta, event)` per token; leaving early (a stop string, the client gone) closes the engine
stream, which aborts the request and frees its KV slot.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable

from raymoe.serve.detokenize import StopStringDetokenizer
from raymoe.serve.engine import Engine
from raymoe.serve.request import (
    EngineOverloadedError,
    EngineStoppedError,
    FinishReason,
    GenerationRequest,
    InvalidRequestError,
    SamplingParams,
    TokenEvent,
)


class RequestRefused(Exception):
    """The engine would not take the request; `status` is the HTTP status to answer with."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.param = status, param


# (route, status, ttft_s, tpot_s, e2e_s, completion_tokens) -> None
Observer = Callable[[str, int, float | None, float | None, float, int], None]


class TextStream:
    """Runs one request on `engine` and turns its tokens into text."""

    def __init__(
        self,
        engine: Engine,
        tokenizer,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None,
        stop: list[str],
        route: str,
        observe: Observer | None = None,
    ):
        self.engine, self.params, self.route, self.observe = engine, params, route, observe
        self.prompt_ids = prompt_ids
        self.request = GenerationRequest(
            request_id=uuid.uuid4().hex, prompt_ids=prompt_ids, params=params, adapter=adapter
        )
        self.detok = StopStringDetokenizer(tokenizer, stop)
        self.finish_reason: FinishReason = "length"
        self.num_tokens = 0
        self._events: AsyncGenerator[TokenEvent, None] | None = None
        self._first: TokenEvent | None = None
        self._t0 = time.perf_counter()
        self._t_first: float | None = None

    async def start(self) -> None:
        """Submits the request and waits for its first token.

        Raises:
            RequestRefused: 429 when the engine's queue is full, 503 when the engine has died,
                400 when the request can never run.
        """
        self._events = self.engine.generate(self.request)
        try:
            self._first = await self._events.__anext__()
        except StopAsyncIteration:
            self._first = None
        except EngineOverloadedError as exc:
            raise RequestRefused(429, f"server busy: {exc}; retry later") from None
        except EngineStoppedError as exc:
            raise RequestRefused(503, f"engine unavailable ({exc}); the replica restarts, retry later") from None
        except InvalidRequestError as exc:
            raise RequestRefused(400, str(exc), exc.param) from None

    async def __aiter__(self) -> AsyncIterator[tuple[str, TokenEvent]]:
        try:
            event, events = self._first, self._events  # both None unless start() got a first token
            while event is not None and events is not None:
                yield self._text_of(event), event
                if self.detok.stopped or event.finish_reason:
                    break
                event = await anext(events, None)
        finally:
            await self.aclose()

    def _text_of(self, event: TokenEvent) -> str:
        self.num_tokens += 1
        self._t_first = self._t_first or time.perf_counter()
        if event.finish_reason == "stop" and event.token_id in self.params.stop_token_ids:
            self.finish_reason = "stop"  # an end token: it ends the text, it is not part of it
            return self.detok.flush()
        delta = self.detok.add(event.token_id)
        if self.detok.stopped:
            self.finish_reason = "stop"
        elif event.finish_reason:
            self.finish_reason = event.finish_reason
            delta += self.detok.flush()
        return delta

    async def aclose(self) -> None:
        """Ends the request (aborting it in the engine if it still runs) and reports its timings."""
        if self._events is None:
            return
        events, self._events = self._events, None
        await events.aclose()
        if self.observe is not None and self._t_first is not None:
            end = time.perf_counter()
            tpot = (end - self._t_first) / (self.num_tokens - 1) if self.num_tokens > 1 else None
            self.observe(self.route, 200, self._t_first - self._t0, tpot, end - self._t0, self.num_tokens)
