"""OpenAI error JSON for the HTTP API: `APIError` (answered as `{"error": {"message", "type",
"param", "code"}}`), the retryable 429/503 refusals with Retry-After, and FastAPI's request
validation failures mapped to a 400 naming the field (instead of its 422).
"""

from __future__ import annotations

import json

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from raymoe.serve import openai_schemas as oai
from raymoe.serve.admission import Admission


class APIError(Exception):
    """An error answered as OpenAI error JSON."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers

    def response(self) -> JSONResponse:
        error = oai.ErrorBody(message=self.message, type=self.type, param=self.param, code=self.code)
        return JSONResponse(oai.ErrorResponse(error=error).model_dump(), status_code=self.status, headers=self.headers)


def come_back_later(status: int, message: str, retry_after_s: int, code: str | None = None) -> APIError:
    """A 429 or 503 the client should retry: OpenAI's error type for the status, with Retry-After."""
    type_ = "rate_limit_error" if status == 429 else "server_error"
    code = code or ("rate_limit_exceeded" if status == 429 else None)
    return APIError(status, message, type_, code=code, headers={"Retry-After": str(retry_after_s)})


def overloaded(admission: Admission, status: int, retry_after_s: int) -> APIError:
    """The answer to a request beyond what the replica admits (`status` is 429 or 503)."""
    return come_back_later(
        status,
        f"server busy: {admission.admitted} requests admitted on this replica "
        f"({admission.max_ongoing} running + {admission.waiting} queued, the most it takes); "
        f"retry after {retry_after_s} s",
        retry_after_s,
        code="rate_limit_exceeded" if status == 429 else "server_overloaded",
    )


# Pydantic adds the union member to an error's location (prompt.str, prompt.list[int]).
_TYPE_NAMES = {"str", "int", "float", "bool"}
_TYPE_PREFIXES = ("list[", "dict[", "function-", "constrained-", "literal[")


def _field_name(loc: tuple) -> str:
    parts = [str(p) for p in loc if p != "body"]
    kept = [p for p in parts if p not in _TYPE_NAMES and not p.startswith(_TYPE_PREFIXES)]
    return ".".join(kept) or "body"


def validation_error(exc: RequestValidationError) -> APIError:
    """FastAPI's request validation failure as a 400 naming the first bad field and its value."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request"}
    # A union field fails once per member; the deepest failure is the member the input meant.
    same_field = [e for e in errors if tuple(e.get("loc", ()))[:2] == tuple(first.get("loc", ()))[:2]]
    first = max(same_field or [first], key=lambda e: len(e.get("loc", ())))
    if first.get("type") == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first.get('msg')}", code="invalid_json")
    name = _field_name(tuple(first.get("loc", ())))
    if name == "body":
        return APIError(400, "request body must be a JSON object", code="invalid_value")
    value = first.get("input")
    shown = "" if isinstance(value, dict) else f" (got {json.dumps(value, default=str)[:80]})"
    return APIError(400, f"{name}: {first.get('msg')}{shown}", param=name, code="invalid_value")
