"""Admission control inside a replica, so that every refusal is OpenAI error JSON and immediate.

Ray Serve 2.60 refuses requests beyond `max_queued_requests` in its proxy with a plain-text body
("Request dropped due to backpressure ..."), which the `openai` client cannot parse as an error;
`BackpressureConfig` sets only the status and Retry-After, not the body. So the replica admits
requests itself: at most `max_ongoing` run at once, at most `max_queued` more wait (FIFO) for one
of them to finish, and any request beyond that is answered at once with the refusal the app builds
(`raymoe.serve.openai_errors.overloaded`: 429 or 503, OpenAI error JSON, Retry-After). Serve's own
limits are set above these (`raymoe.serve.app.deployment_options`) so that Serve never refuses first.

Only POST requests (the generation routes) are counted; /health and /v1/models always answer.
A request holds its place until its response has been sent in full (a stream until `[DONE]`) or
its client has gone (Serve cancels the request).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field

from starlette.responses import Response
from starlette.types import ASGIApp, Receive, Scope, Send


@dataclass(kw_only=True)
class Admission:
    """Counts one replica's admitted requests: `max_ongoing` running plus `max_queued` waiting."""

    max_ongoing: int
    # -1 = unbounded: requests wait for a running slot and none is refused.
    max_queued: int
    # Requests admitted and not yet finished (running + waiting).
    admitted: int = field(default=0, init=False)
    # Running places; bound to the event loop that first waits on it (the replica's).
    slots: asyncio.Semaphore = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.slots = asyncio.Semaphore(self.max_ongoing)

    @property
    def limit(self) -> int | None:
        """Most requests admitted at once; None = unbounded."""
        return None if self.max_queued < 0 else self.max_ongoing + self.max_queued

    @property
    def waiting(self) -> int:
        """Admitted requests waiting for a running slot."""
        return max(0, self.admitted - self.max_ongoing)

    def try_admit(self) -> bool:
        """Takes a place if one is free; False = refuse the request."""
        if self.limit is not None and self.admitted >= self.limit:
            return False
        self.admitted += 1
        return True

    def release(self) -> None:
        self.admitted -= 1


class AdmissionMiddleware:
    """ASGI middleware: admits POST requests through `admission`; beyond it answers with the
    response `refusal(admission)` builds."""

    def __init__(self, app: ASGIApp, *, admission: Admission, refusal: Callable[[Admission], Response]):
        self.app, self.admission, self.refusal = app, admission, refusal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        if not self.admission.try_admit():
            await self.refusal(self.admission)(scope, receive, send)
            return
        try:
            async with self.admission.slots:
                await self.app(scope, receive, send)
        finally:
            self.admission.release()
