"""`raymoe chat`: an interactive conversation with a model, streamed as it is generated.

    raymoe chat --url http://127.0.0.1:8000          # a served model (OpenAI API, e.g. pipelines.serve)
    raymoe chat --model artifacts/debug              # an artifact loaded in this process, no Ray
    echo "def add(a, b):" | raymoe chat --model artifacts/debug --temperature 0

Each line read is a user turn; the reply streams back and joins the conversation. `/reset` starts
over (keeping --system), `/exit` or Ctrl-D ends. With --model the artifact runs in this process on
the engine and chat template the server uses, without Ray: the same prompt gives the same greedy
reply as `raymoe serve` would.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from typing import Protocol, TextIO


class ChatError(RuntimeError):
    """A turn that could not be answered (server error, conversation longer than the context)."""


class Backend(Protocol):
    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        """Streams the assistant's reply to `messages` as text deltas."""
        ...


class LocalBackend:
    """An artifact on the serving engine in this process: one request at a time, stepped here.

    Args:
        model_path: HF-format artifact directory.
        adapter: a peft adapter directory to apply (its directory name is the adapter's name).
        max_tokens: most tokens per reply (fewer when the context runs out).
        temperature: 0 = greedy.
        seed: sampling seed (None = random).
        num_threads: torch threads (0 = torch's default).
        dtype: the engine's compute dtype (auto = bf16 on CPUs with AMX or AVX512-BF16, else fp32).
    """

    def __init__(
        self,
        model_path: str,
        *,
        adapter: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.7,
        seed: int | None = None,
        num_threads: int = 0,
        dtype: str = "auto",
    ):
        from pathlib import Path

        import torch

        from raymoe.data.chat_tokenizer import ChatTokenizer
        from raymoe.serve.app import load_model
        from raymoe.serve.engine import EngineConfig, EngineCore
        from raymoe.serve.serve_config import ServeConfig

        if num_threads:
            torch.set_num_threads(num_threads)
        adapter_path = Path(adapter).resolve() if adapter else None
        cfg = ServeConfig(
            model_path=model_path,
            lora_dir=str(adapter_path.parent) if adapter_path else "",
            engine=EngineConfig(num_slots=1, own_process=False),
            dtype=dtype,
        )
        self.adapter = adapter_path.name if adapter_path else None
        self.tokenizer = ChatTokenizer.from_dir(model_path)
        self.core = EngineCore(load_model(cfg, [self.adapter] if self.adapter else []), cfg.engine)
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed

    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        from raymoe.serve.detokenize import StopStringDetokenizer
        from raymoe.serve.request import GenerationRequest, InvalidRequestError, SamplingParams

        prompt_ids = self.tokenizer.encode_chat(messages)
        room = self.core.max_seq_len - len(prompt_ids)
        if room < 1:
            raise ChatError(
                f"the conversation is {len(prompt_ids)} tokens, the context {self.core.max_seq_len}: "
                "/reset to start over"
            )
        params = SamplingParams(
            max_tokens=min(self.max_tokens, room),
            temperature=self.temperature,
            seed=self.seed,
            stop_token_ids=self.tokenizer.stop_token_ids,
        )
        request = GenerationRequest(
            request_id=uuid.uuid4().hex, prompt_ids=prompt_ids, params=params, adapter=self.adapter
        )
        try:
            self.core.add_request(request)
        except InvalidRequestError as exc:
            raise ChatError(str(exc)) from None
        detok = StopStringDetokenizer(self.tokenizer)
        try:
            while self.core.has_work():
                for _, event in self.core.step():
                    if event.finish_reason == "stop" and event.token_id in params.stop_token_ids:
                        yield detok.flush()  # an end token ends the text; it is not part of it
                        return
                    delta = detok.add(event.token_id)
                    if event.finish_reason:
                        yield delta + detok.flush()
                        return
                    if delta:
                        yield delta
        finally:
            self.core.abort(request.request_id)  # left early (Ctrl-C): frees the KV slot


class RemoteBackend:
    """A served model over the OpenAI API (`POST /v1/chat/completions`, streamed as SSE).

    Args:
        url: the server (`http://host:port`, with or without a trailing `/v1`).
        api_key: sent as `Authorization: Bearer`; None = none.
        model_id: the served model's name; None = the first one `GET /v1/models` lists.
        max_tokens, temperature, seed: as the API takes them.
        timeout_s: seconds to wait for the server to connect or send the next bytes.
    """

    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model_id: str | None = None,
        max_tokens: int = 256,
        temperature: float = 0.7,
        seed: int | None = None,
        timeout_s: float = 300.0,
    ):
        base = url.rstrip("/")
        self.base = base[: -len("/v1")] if base.endswith("/v1") else base
        self.api_key, self.timeout_s = api_key, timeout_s
        self.max_tokens, self.temperature, self.seed = max_tokens, temperature, seed
        self.model_id = model_id or self._first_model()

    def _open(self, path: str, body: dict | None = None):
        request = urllib.request.Request(
            f"{self.base}{path}",
            data=json.dumps(body).encode() if body else None,
            headers={"Content-Type": "application/json"},
        )
        if self.api_key:
            request.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(request, timeout=self.timeout_s)
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read())["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = exc.reason
            raise ChatError(f"{self.base}{path}: HTTP {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            raise ChatError(f"cannot reach {self.base}: {getattr(exc, 'reason', exc)}") from None

    def _first_model(self) -> str:
        with self._open("/v1/models") as response:
            models = json.loads(response.read()).get("data", [])
        if not models:
            raise ChatError(f"{self.base}/v1/models lists no model")
        return models[0]["id"]

    def reply(self, messages: list[dict[str, str]]) -> Iterator[str]:
        body = {
            "model": self.model_id,
            "messages": messages,
            "stream": True,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.seed is not None:
            body["seed"] = self.seed
        with self._open("/v1/chat/completions", body) as response:
            for raw in response:
                line = raw.decode("utf-8").strip()
                if not line.startswith("data:"):
                    continue  # blank separators, SSE comments
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    raise ChatError(chunk["error"].get("message", str(chunk["error"])))
                for choice in chunk.get("choices", []):
                    if text := (choice.get("delta") or {}).get("content"):
                        yield text


class LineReader(Protocol):
    """Where user turns come from: a text stream, or `_Terminal` (input() with line editing)."""

    def readline(self) -> str: ...


def chat_loop(
    backend: Backend,
    stdin: LineReader,
    stdout: TextIO,
    *,
    system: str = "",
    prompt: str = "",
    stderr: TextIO | None = None,
) -> int:
    """Reads user turns from `stdin` line by line and streams each reply to `stdout`.

    Args:
        backend: what answers.
        stdin: one user turn per line; `/exit` or end of input ends, `/reset` clears the history.
        stdout: replies, each followed by a newline.
        system: a system message opening the conversation ("" = none).
        prompt: written before each read (for a terminal; "" for scripted input).
        stderr: where a failed turn is reported (default sys.stderr); the conversation goes on.

    Returns:
        0.
    """
    stderr = stderr or sys.stderr
    opening = [{"role": "system", "content": system}] if system else []
    messages = list(opening)
    while True:
        stdout.write(prompt)
        stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            line = ""
        if not line:
            if prompt:
                stdout.write("\n")
            return 0
        text = line.rstrip("\r\n")
        if not text.strip():
            continue
        if text.strip() in ("/exit", "/quit"):
            return 0
        if text.strip() == "/reset":
            messages = list(opening)
            continue
        messages.append({"role": "user", "content": text})
        parts: list[str] = []
        try:
            for delta in backend.reply(messages):
                stdout.write(delta)
                stdout.flush()
                parts.append(delta)
        except ChatError as exc:
            print(f"error: {exc}", file=stderr)
            messages.pop()
            continue
        except KeyboardInterrupt:
            stdout.write(" [interrupted]")
        stdout.write("\n")
        stdout.flush()
        messages.append({"role": "assistant", "content": "".join(parts)})


class _Terminal:
    """stdin for a terminal: `input()` (line editing, history) behind `readline()`."""

    def __init__(self, prompt: str):
        self.prompt = prompt

    def readline(self) -> str:
        try:
            return input(self.prompt) + "\n"
        except EOFError:
            return ""


def add_chat_command(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "chat",
        help="chat with a model: a served URL or an artifact loaded here",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--url", metavar="URL", help="a server with the OpenAI API, e.g. http://127.0.0.1:8000")
    where.add_argument("--model", metavar="PATH", help="an HF-format artifact directory to load in this process")
    p.add_argument("--adapter", metavar="DIR", help="with --model: a LoRA adapter directory to apply")
    p.add_argument(
        "--model-id", metavar="NAME", help="with --url: the model name to ask for (default: the server's first model)"
    )
    p.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("RAYMOE_API_KEY"),
        help="with --url: the API key (default: $RAYMOE_API_KEY)",
    )
    p.add_argument("--system", metavar="TEXT", default="", help="a system message opening the conversation")
    p.add_argument("--max-tokens", metavar="N", type=int, default=256, help="most tokens per reply (default 256)")
    p.add_argument("--temperature", metavar="T", type=float, default=0.7, help="0 = greedy (default 0.7)")
    p.add_argument("--seed", metavar="N", type=int, help="sampling seed, for repeatable replies")
    p.add_argument(
        "--threads", metavar="N", type=int, default=0, help="with --model: torch threads (default: torch's choice)"
    )
    p.add_argument(
        "--dtype",
        choices=("auto", "fp32", "bf16"),
        default="auto",
        help="with --model: compute dtype (default auto: bf16 where the CPU has AMX or AVX512-BF16, else fp32)",
    )

    def run(args: argparse.Namespace) -> int:
        if args.max_tokens < 1:
            raise ValueError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        if args.temperature < 0:
            raise ValueError(f"--temperature must be >= 0, got {args.temperature}")
        sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
        try:
            if args.url:
                backend: Backend = RemoteBackend(args.url, api_key=args.api_key, model_id=args.model_id, **sampling)
            else:
                backend = LocalBackend(
                    args.model, adapter=args.adapter, num_threads=args.threads, dtype=args.dtype, **sampling
                )
        except ChatError as exc:
            print(f"raymoe chat: {exc}", file=sys.stderr)
            return 2
        if sys.stdin.isatty():
            import importlib.util

            if importlib.util.find_spec("readline") is not None:
                importlib.import_module("readline")  # gives input() line editing and history
            return chat_loop(backend, _Terminal("> "), sys.stdout, system=args.system)
        return chat_loop(backend, sys.stdin, sys.stdout, system=args.system)

    p.set_defaults(func=run)
