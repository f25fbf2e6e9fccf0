"""OpenAI response bodies: JSON without null fields, and a `TextStream` as server-sent events
(`data: {chunk}` per event, ending with `data: [DONE]`), written in batches of events per HTTP write.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable

from raymoe.serve import openai_schemas as oai
from raymoe.serve.text_stream import TextStream

log = logging.getLogger(__name__)


def response_json(obj) -> dict:
    """Response JSON without null fields, except `finish_reason`, which OpenAI always sends."""
    data = obj.model_dump(exclude_none=True)
    for choice, model in zip(data.get("choices", []), obj.choices):
        choice["finish_reason"] = model.finish_reason
    return data


def sse_event(obj) -> str:
    """One SSE event: a response object as JSON (see `response_json`), or a string as it is."""
    data = obj if isinstance(obj, str) else json.dumps(response_json(obj), separators=(",", ":"))
    return f"data: {data}\n\n"


async def sse_stream(
    stream: TextStream, chunk: Callable, tail: Callable, head=(), interval: int = 1
) -> AsyncIterator[str]:
    """SSE body: the head events, one per non-empty chunk, the tail events, `[DONE]`; a failure
    midway (the 200 is already sent) ends the stream with an error event. The first chunk is
    written at once; later ones go `interval` events per write (the events are unchanged)."""
    pending: list[str] = []
    sent_first = False
    try:
        for obj in head:
            yield sse_event(obj)
        async for delta, event in stream:
            if (obj := chunk(delta, event)) is not None:
                pending.append(sse_event(obj))
                if not sent_first or len(pending) >= interval:
                    yield "".join(pending)
                    pending.clear()
                    sent_first = True
        pending.extend(sse_event(obj) for obj in tail())
    except Exception:
        log.exception("stream failed")
        error = oai.ErrorBody(message="internal server error", type="server_error")
        pending.append(sse_event(oai.ErrorResponse(error=error).model_dump_json()))
    finally:
        await stream.aclose()
    yield "".join(pending) + sse_event("[DONE]")
