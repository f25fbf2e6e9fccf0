"""The smallest OpenAI API client the jobs need: one JSON POST, its status and its JSON body
(the serve job's smoke request, the demo's load and its final question)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request


def post_json(url: str, body: dict, api_key: str | None, timeout_s: float) -> tuple[int, dict]:
    """(HTTP status, JSON body) of one POST; an HTTP error's status and OpenAI error body."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    if api_key:
        request.add_header("Authorization", f"Bearer {api_key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout_s) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        try:
            return exc.code, json.loads(exc.read())
        except ValueError:
            return exc.code, {"error": {"message": str(exc)}}
