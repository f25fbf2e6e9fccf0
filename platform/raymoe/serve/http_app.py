"""FastAPI ingress: the OpenAI HTTP API over an `Engine`.

Routes: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(`stream: true` gives server-sent events in OpenAI's chunk format ending with `data: [DONE]`).
Every error leaves as OpenAI's error JSON `{"error": {"message", "type", "param", "code"}}`:
bad input 400 naming the field (FastAPI's 422 is replaced), missing or wrong API key 401,
unknown model 404, engine queue full 429 with Retry-After, more requests than the replica admits
(`raymoe.serve.admission`) 429 or 503 with Retry-After. The app is built around an injected
engine, so HTTP tests run it with a fake engine and no Ray. With a `TrafficSampler` every request
that completes (a stopped stream included, a failed or abandoned one not) is counted, and the
sampled ones are recorded for the traffic windows (`raymoe.serve.traffic_sampler`). The error
JSON and refusals are built in `raymoe.serve.openai_errors`, the SSE bodies in `raymoe.serve.sse`.
"""

from __future__ import annotations

import hmac
import json
import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from raymoe.data.chat_tokenizer import ChatTokenizer
from raymoe.serve import openai_schemas as oai
from raymoe.serve.admission import Admission, AdmissionMiddleware
from raymoe.serve.engine import Engine
from raymoe.serve.openai_errors import APIError, come_back_later, overloaded, validation_error
from raymoe.serve.request import EngineStoppedError, SamplingParams
from raymoe.serve.sse import response_json, sse_stream
from raymoe.serve.text_stream import Observer, RequestRefused, TextStream
from raymoe.serve.traffic_sampler import RequestFeatures, TrafficSampler

log = logging.getLogger(__name__)


@dataclass
class OpenAIServer:
    """What the routes need: the engine, the tokenizer, names and the optional API key."""

    engine: Engine
    tokenizer: ChatTokenizer
    model_id: str
    adapters: list[str] = field(default_factory=list)
    api_key: str | None = None
    retry_after_s: int = 1
    # SSE events per HTTP write after the first (see ServeConfig.stream_interval).
    stream_interval: int = 1
    observe: Observer | None = None
    # Called with (path, status) for every answered request (metrics).
    count: Callable[[str, int], None] | None = None
    # Samples finished requests into Parquet windows for the drift job; None = off.
    traffic: TrafficSampler | None = None
    # Caps the generation requests this replica takes at once (None = no cap, as in HTTP tests);
    # beyond it requests are refused at once with `backpressure_status`.
    admission: Admission | None = None
    backpressure_status: int = 503


class _CountAnswers:
    """ASGI middleware: `server.count(path, status)` as each HTTP answer starts. Plain ASGI, not
    `@app.middleware("http")`, whose wrapper costs every request a task and every streamed chunk
    a hop through a memory stream."""

    def __init__(self, app, *, server: OpenAIServer):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send) -> None:
        count = self.server.count
        if scope["type"] != "http" or count is None:
            await self.app(scope, receive, send)
            return

        async def counted(message) -> None:
            if message["type"] == "http.response.start":
                count(scope["path"], message["status"])
            await send(message)

        await self.app(scope, receive, counted)


def create_app(server: OpenAIServer) -> FastAPI:
    """Builds the FastAPI app serving `server`."""
    app = FastAPI(title="raymoe OpenAI-compatible server")
    tokenizer = server.tokenizer
    if server.admission is not None:
        app.add_middleware(
            AdmissionMiddleware,
            admission=server.admission,
            refusal=lambda a: overloaded(a, server.backpressure_status, server.retry_after_s).response(),
        )
    # Added last, so outermost: refusals are counted like any answer.
    app.add_middleware(_CountAnswers, server=server)

    @app.exception_handler(APIError)
    async def _api_error(_, exc: APIError):
        return exc.response()

    @app.exception_handler(EngineStoppedError)
    async def _engine_stopped(_, exc: EngineStoppedError):
        # The engine died under a request that had its first token already (one without is
        # refused in `open_stream`): retryable too, Serve's health check replaces the replica.
        message = f"engine unavailable ({exc}); the replica restarts, retry later"
        return come_back_later(503, message, server.retry_after_s).response()

    @app.exception_handler(RequestValidationError)
    async def _bad_request(request: Request, exc: RequestValidationError):
        try:
            json.loads(await request.body())
        except ValueError as err:
            return APIError(400, f"request body is not valid JSON: {err}", code="invalid_json").response()
        return validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_, exc: StarletteHTTPException):
        code = "not_found" if exc.status_code == 404 else None
        return APIError(exc.status_code, str(exc.detail), code=code).response()

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.error("internal error", exc_info=exc)
        return APIError(500, "internal server error", type_="server_error").response()

    def check_auth(request: Request) -> None:
        if not server.api_key:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        # compare_digest: the time taken does not reveal how much of the key matched.
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), server.api_key.encode()):
            raise APIError(
                401,
                "missing or invalid API key (send Authorization: Bearer <key>)",
                code="invalid_api_key",
                headers={"WWW-Authenticate": "Bearer"},
            )

    def model_cards() -> list[oai.ModelCard]:
        cards = [oai.ModelCard(id=server.model_id)]
        cards += [oai.ModelCard(id=f"{server.model_id}:{a}", parent=server.model_id) for a in server.adapters]
        return cards

    def resolve_model(name: str) -> str | None:
        """The adapter named by `name` (None = base model); 404 when it is not served."""
        if name == server.model_id:
            return None
        base, _, adapter = name.partition(":")
        if base == server.model_id and adapter in server.adapters:
            return adapter
        raise APIError(
            404,
            f"model {name!r} does not exist; served: {[c.id for c in model_cards()]}",
            param="model",
            code="model_not_found",
        )

    def sampling(
        body,
        prompt_ids: list[int],
        prompt_field: str,
        max_tokens: int | None,
        default_max: int | None,
        logprobs: int | None,
    ) -> SamplingParams:
        limit = server.engine.max_seq_len
        if not prompt_ids:
            raise APIError(400, f"{prompt_field}: must not be empty", param=prompt_field)
        if len(prompt_ids) >= limit:
            raise APIError(
                400,
                f"{prompt_field}: {len(prompt_ids)} tokens, the context is {limit} tokens and "
                "at least one must be left for the output",
                param=prompt_field,
                code="context_length_exceeded",
            )
        room = limit - len(prompt_ids)
        max_tokens = max_tokens if max_tokens is not None else min(default_max or room, room)
        if max_tokens > room:
            raise APIError(
                400,
                f"max_tokens: {max_tokens} + {len(prompt_ids)} prompt tokens exceeds the context of {limit} tokens",
                param="max_tokens",
                code="context_length_exceeded",
            )
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=body.temperature,
            top_p=body.top_p,
            top_k=max(body.top_k, 0),
            seed=body.seed,
            logprobs=logprobs,
            stop_token_ids=[] if body.ignore_eos else tokenizer.stop_token_ids,
        )

    def trace(prompt_ids: list[int], adapter: str | None, prompt_text: Callable[[], str]) -> RequestFeatures | None:
        """The request's traffic record (None when sampling is off)."""
        return None if server.traffic is None else server.traffic.start(prompt_ids, adapter, prompt_text)

    def traced(features: RequestFeatures | None, chunk: Callable, tail: Callable) -> tuple[Callable, Callable]:
        """A streamed reply's chunk and tail callbacks, also feeding `features`; the tail runs
        only when the stream has completed, which is when the request is recorded."""
        traffic = server.traffic
        if features is None or traffic is None:  # features come from traffic: both or neither
            return chunk, tail

        def chunk_(delta, event):
            features.add(delta, event)
            return chunk(delta, event)

        def tail_():
            traffic.record(features)
            return tail()

        return chunk_, tail_

    def record(features: RequestFeatures | None, pairs) -> None:
        if features is not None and server.traffic is not None:  # features come from traffic
            for delta, event in pairs:
                features.add(delta, event)
            server.traffic.record(features)

    async def open_stream(
        route, body, prompt_ids, params, adapter, features: RequestFeatures | None = None
    ) -> TextStream:
        stream = TextStream(
            server.engine, tokenizer, prompt_ids, params, adapter, body.stop_list(), route, server.observe
        )
        stream.request.record_features = features is not None and features.sampled
        try:
            await stream.start()
        except RequestRefused as exc:
            if exc.status in (429, 503):
                raise come_back_later(exc.status, str(exc), server.retry_after_s) from None
            raise APIError(exc.status, str(exc), param=exc.param) from None
        return stream

    def usage(stream: TextStream) -> oai.Usage:
        p, n = len(stream.prompt_ids), stream.num_tokens
        return oai.Usage(prompt_tokens=p, completion_tokens=n, total_tokens=p + n)

    def completion_logprobs(pairs) -> oai.CompletionLogprobs:
        lp, offset = oai.CompletionLogprobs(), 0
        for text, event in pairs:
            lp.tokens.append(tokenizer.token_text(event.token_id))
            lp.token_logprobs.append(event.logprob)
            lp.top_logprobs.append({tokenizer.token_text(t): v for t, v in (event.top_logprobs or {}).items()})
            lp.text_offset.append(offset)
            offset += len(text)
        return lp

    def chat_logprobs(events) -> oai.ChoiceLogprobs:
        def entry(token_id, logprob):
            text = tokenizer.token_text(token_id)
            return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

        return oai.ChoiceLogprobs(
            content=[
                oai.TokenLogprob(
                    **entry(e.token_id, e.logprob),
                    top_logprobs=[oai.TopLogprob(**entry(t, v)) for t, v in (e.top_logprobs or {}).items()],
                )
                for e in events
            ]
        )

    def include_usage(body) -> bool:
        return bool(body.stream_options and body.stream_options.include_usage)

    @app.get("/health")
    async def health():
        return {"status": "ok", **server.engine.stats()}

    @app.get("/v1/models")
    async def models(request: Request):
        check_auth(request)
        return oai.ModelList(data=model_cards())

    @app.post("/v1/completions")
    async def completions(body: oai.CompletionRequest, request: Request):
        check_auth(request)
        adapter = resolve_model(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = tokenizer.encode(body.prompt)
        else:
            prompt_ids, vocab = list(body.prompt), tokenizer.tokenizer.get_vocab_size()
            if max(prompt_ids) >= vocab:
                raise APIError(400, f"prompt: token ids must be below the vocabulary size {vocab}", param="prompt")
        params = sampling(body, prompt_ids, "prompt", body.max_tokens, 16, body.logprobs)
        features = trace(
            prompt_ids,
            adapter,
            lambda: (
                body.prompt if isinstance(body.prompt, str) else tokenizer.decode(prompt_ids, skip_special_tokens=False)
            ),
        )
        stream = await open_stream("/v1/completions", body, prompt_ids, params, adapter, features)
        rid, want_lp = f"cmpl-{uuid.uuid4().hex}", body.logprobs is not None

        def response(choices, usage_=None):
            return oai.CompletionResponse(id=rid, model=body.model, choices=choices, usage=usage_)

        if body.stream:

            def chunk(delta, event):
                lp = completion_logprobs([(delta, event)]) if want_lp else None
                return response([oai.CompletionChoice(text=delta, logprobs=lp)]) if delta or lp else None

            def tail():
                last = [response([oai.CompletionChoice(text="", finish_reason=stream.finish_reason)])]
                return last + ([response([], usage(stream))] if include_usage(body) else [])

            chunk, tail = traced(features, chunk, tail)
            return StreamingResponse(
                sse_stream(stream, chunk, tail, interval=server.stream_interval), media_type="text/event-stream"
            )
        pairs = [pair async for pair in stream]
        record(features, pairs)
        choice = oai.CompletionChoice(
            text="".join(d for d, _ in pairs),
            finish_reason=stream.finish_reason,
            logprobs=completion_logprobs(pairs) if want_lp else None,
        )
        return response_json(response([choice], usage(stream)))

    @app.post("/v1/chat/completions")
    async def chat(body: oai.ChatCompletionRequest, request: Request):
        check_auth(request)
        adapter = resolve_model(body.model)
        try:
            prompt_ids = tokenizer.encode_chat([{"role": m.role, "content": m.text()} for m in body.messages])
        except Exception as exc:  # noqa: BLE001 - a model's template may raise anything
            raise APIError(400, f"messages: {exc}", param="messages") from None
        top = body.top_logprobs or 0
        params = sampling(
            body,
            prompt_ids,
            "messages",
            body.max_completion_tokens or body.max_tokens,
            None,
            top if body.logprobs else None,
        )
        features = trace(prompt_ids, adapter, lambda: tokenizer.decode(prompt_ids, skip_special_tokens=False))
        stream = await open_stream("/v1/chat/completions", body, prompt_ids, params, adapter, features)
        rid = f"chatcmpl-{uuid.uuid4().hex}"

        if body.stream:

            def chunk_of(choices, usage_=None):
                return oai.ChatCompletionChunk(id=rid, model=body.model, choices=choices, usage=usage_)

            def chunk(delta, event):
                lp = chat_logprobs([event]) if body.logprobs else None
                if not (delta or lp):
                    return None
                return chunk_of([oai.ChatChunkChoice(delta=oai.DeltaMessage(content=delta), logprobs=lp)])

            def tail():
                last = [chunk_of([oai.ChatChunkChoice(delta=oai.DeltaMessage(), finish_reason=stream.finish_reason)])]
                return last + ([chunk_of([], usage(stream))] if include_usage(body) else [])

            head = [chunk_of([oai.ChatChunkChoice(delta=oai.DeltaMessage(role="assistant", content=""))])]
            chunk, tail = traced(features, chunk, tail)
            return StreamingResponse(
                sse_stream(stream, chunk, tail, head, server.stream_interval), media_type="text/event-stream"
            )
        pairs = [pair async for pair in stream]
        record(features, pairs)
        message = oai.AssistantMessage(content="".join(d for d, _ in pairs))
        choice = oai.ChatChoice(
            message=message,
            finish_reason=stream.finish_reason,
            logprobs=chat_logprobs([e for _, e in pairs]) if body.logprobs else None,
        )
        return response_json(
            oai.ChatCompletionResponse(id=rid, model=body.model, choices=[choice], usage=usage(stream))
        )

    return app
