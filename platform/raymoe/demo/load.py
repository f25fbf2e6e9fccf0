"""The demo's short load through the OpenAI API: a clean traffic window, then a shifted one.

Prompts are cut from the shipped corpus (`raymoe.serve.debug_traffic.corpus_prompts`): the clean
window from one source the model was trained on (Python code by default), the shifted one from the
other (English prose), which differs in tokens, lengths and routing. Each window is exactly
`requests_per_window` requests, the app's `traffic.window_requests`, so the request that fills it
seals it: the app writes one Parquet window file per phase, and the shifted phase starts only when
the clean one has been written.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from raymoe.config import require, require_positive
from raymoe.serve.openai_client import post_json


@dataclass(kw_only=True)
class LoadConfig:
    """How many requests the demo sends, how, and from which corpus each window's prompts come."""

    # Requests per window; the serving app's traffic.window_requests is set to it.
    requests_per_window: int = 24
    # Requests in flight at once (client threads).
    concurrency: int = 4
    # Generated tokens per request (sampled at `temperature`, seeded per request).
    max_tokens: int = 16
    # Sampling temperature of every request (0 = greedy).
    temperature: float = 1.0
    # The shipped corpus source the clean window's prompts are cut from (data/corpus/<clean>.jsonl.gz).
    clean: Literal["code", "prose"] = "code"
    # The source of the shifted window's prompts; must differ from `clean`.
    shifted: Literal["code", "prose"] = "prose"
    # Prompts are a random stretch of a corpus file cut to at most this many characters (and
    # shorter still when their tokens would not leave max_tokens of the model's context).
    max_prompt_chars: int = 320
    # Seeds which corpus stretches become prompts, and each request's sampling.
    seed: int = 0
    # Seconds a request, and then the app's window file, may take.
    timeout_s: float = 120.0

    def __post_init__(self) -> None:
        require(self.requests_per_window >= 2, f"load.requests_per_window must be >= 2, got {self.requests_per_window}")
        require(self.concurrency >= 1, f"load.concurrency must be >= 1, got {self.concurrency}")
        require(self.max_tokens >= 1, f"load.max_tokens must be >= 1, got {self.max_tokens}")
        require(self.temperature >= 0, f"load.temperature must be >= 0, got {self.temperature}")
        require(
            self.clean != self.shifted,
            f"load.shifted={self.shifted!r} must differ from load.clean={self.clean!r}: "
            "the drift stage looks for the shift between them",
        )
        require(self.max_prompt_chars >= 16, f"load.max_prompt_chars must be >= 16, got {self.max_prompt_chars}")
        require_positive("load", self, "timeout_s")


def window_prompts(
    kind: str,
    num: int,
    seed: int,
    max_chars: int,
    max_tokens: int | None = None,
    encode: Callable[[str], list[int]] | None = None,
) -> list[str]:
    """`num` corpus prompts of `kind`, each at most `max_chars` characters and, given `encode`,
    at most `max_tokens` tokens (cut by a fifth until they fit)."""
    from raymoe.serve.debug_traffic import corpus_prompts

    prompts = []
    for text in corpus_prompts(kind, num, seed):
        text = text[:max_chars]
        while encode is not None and max_tokens is not None and len(text) > 1 and len(encode(text)) > max_tokens:
            text = text[: len(text) * 4 // 5]
        prompts.append(text)
    return prompts


def send_window(
    base_url: str,
    model_id: str,
    api_key: str | None,
    prompts: list[str],
    cfg: LoadConfig,
    seed: int,
    on_done: Callable[[], None],
) -> dict:
    """Sends `prompts` as completions, `cfg.concurrency` at a time; returns counts and latencies.

    Raises:
        RuntimeError: a request was not answered 200 (the window would not fill), with its error.
    """

    def one(i: int) -> tuple[int, dict, float]:
        start = time.perf_counter()
        status, reply = post_json(
            f"{base_url}/v1/completions",
            {
                "model": model_id,
                "prompt": prompts[i],
                "max_tokens": cfg.max_tokens,
                "temperature": cfg.temperature,
                "seed": seed + i,
            },
            api_key,
            cfg.timeout_s,
        )
        on_done()
        return status, reply, time.perf_counter() - start

    with ThreadPoolExecutor(max_workers=cfg.concurrency) as pool:
        results = list(pool.map(one, range(len(prompts))))
    failed = [(status, reply) for status, reply, _ in results if status != 200]
    if failed:
        status, reply = failed[0]
        raise RuntimeError(
            f"{len(failed)} of {len(prompts)} requests failed; the first with HTTP {status}: "
            f"{reply.get('error', reply)}"
        )
    latencies = sorted(seconds for *_, seconds in results)
    return {
        "requests": len(prompts),
        "p50_s": latencies[len(latencies) // 2],
        "completion_tokens": sum(r["usage"]["completion_tokens"] for _, r, _ in results),
        "first": {"prompt": prompts[0], "text": results[0][1]["choices"][0]["text"]},
    }


def wait_for_window(traffic_dir: str | Path, known: set[Path], timeout_s: float) -> Path:
    """The first window file in `traffic_dir` not in `known`, once the app has written it.

    Raises:
        TimeoutError: none appeared within `timeout_s`.
    """
    from raymoe.monitor.traffic_windows import list_windows

    deadline = time.monotonic() + timeout_s
    while True:
        new = [p for p in list_windows(traffic_dir) if p not in known] if Path(traffic_dir).is_dir() else []
        if new:
            return new[0]
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"no new traffic window in {traffic_dir} within {timeout_s:g} s after the "
                "window's last request (is app.traffic.window_requests the load's "
                "requests_per_window?)"
            )
        time.sleep(0.2)


def drive_load(
    base_url: str,
    model_id: str,
    api_key: str | None,
    cfg: LoadConfig,
    *,
    traffic_dir: str | Path,
    windows_dir: str | Path,
    encode: Callable[[str], list[int]],
    max_prompt_tokens: int,
    on_request: Callable[[], None] = lambda: None,
) -> dict:
    """The clean window, then the shifted one; each sealed window is copied into `windows_dir`.

    Args:
        base_url: the app's URL without /v1 (e.g. http://127.0.0.1:8000).
        model_id: the served model's name.
        api_key: sent as a bearer token when set.
        cfg: the load.
        traffic_dir: the app's traffic.output_dir (where it writes the windows).
        windows_dir: emptied first; receives the clean window, then the shifted one (what the
            drift and rebalance stages read).
        encode: the served tokenizer, to keep prompts inside the context.
        max_prompt_tokens: the most prompt tokens that leave room for max_tokens.
        on_request: called once per finished request (the progress bar).

    Returns:
        Per window: its corpus kind, request counts, latency and the copied window file.
    """
    from raymoe.monitor.traffic_windows import list_windows

    windows_dir = Path(windows_dir)
    shutil.rmtree(windows_dir, ignore_errors=True)
    windows_dir.mkdir(parents=True)
    known = set(list_windows(traffic_dir)) if Path(traffic_dir).is_dir() else set()
    out = {}
    for phase, kind, offset in (("clean", cfg.clean, 0), ("shifted", cfg.shifted, 1000)):
        prompts = window_prompts(
            kind, cfg.requests_per_window, cfg.seed + offset, cfg.max_prompt_chars, max_prompt_tokens, encode
        )
        sent = send_window(base_url, model_id, api_key, prompts, cfg, cfg.seed + offset, on_request)
        window = wait_for_window(traffic_dir, known, cfg.timeout_s)
        known.add(window)
        copy = windows_dir / window.name
        shutil.copyfile(window, copy)
        out[phase] = {"kind": kind, **sent, "window": str(copy)}
    return out
