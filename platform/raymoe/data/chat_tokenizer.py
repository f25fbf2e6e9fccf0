"""The artifact's tokenizer for serving and fine-tuning: encode, decode, chat template, end tokens.

Reads the Hugging Face files beside the weights (`tokenizer.json`, `tokenizer_config.json`) with
`tokenizers` and renders `chat_template` with Jinja2 in a sandbox, the way
`transformers.PreTrainedTokenizerBase.apply_chat_template` does, without needing transformers
at serving time.
"""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer

# Used when the artifact ships no chat template: ChatML, as raymoe's tokenizer writes it.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _raise(message: str):
    raise jinja2.exceptions.TemplateError(message)


class ChatTokenizer:
    """Wraps a `tokenizers.Tokenizer` with the settings from tokenizer_config.json."""

    def __init__(self, tokenizer: Tokenizer, config: dict):
        self.tokenizer = tokenizer
        self.config = config
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self._template = env.from_string(config.get("chat_template") or DEFAULT_CHAT_TEMPLATE)
        self.eos_token = self._token_text(config.get("eos_token"))
        self.bos_token = self._token_text(config.get("bos_token"))
        # Generation ends at EOS and, for chat, at the end-of-turn marker when there is one.
        ends = [self.eos_token, "<|im_end|>"]
        self.stop_token_ids = sorted({i for t in ends if t and (i := tokenizer.token_to_id(t)) is not None})

    @classmethod
    def from_dir(cls, path: str | Path) -> ChatTokenizer:
        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {str(path)!r}")
        config_file = path / "tokenizer_config.json"
        config = json.loads(config_file.read_text()) if config_file.is_file() else {}
        return cls(Tokenizer.from_file(str(file)), config)

    @staticmethod
    def _token_text(token) -> str | None:
        return token.get("content") if isinstance(token, dict) else token

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def render_messages(self, messages: list[dict[str, str]], add_generation_prompt: bool) -> str:
        """The chat template applied to `messages` (role/content dicts).

        The same render call as transformers' `apply_chat_template(..., tokenize=False)`.
        `add_generation_prompt=True` appends the opening of an assistant turn (a prompt to
        complete); False renders the conversation as it stands (a fine-tuning target).
        """
        return self._template.render(
            messages=messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token or "",
            eos_token=self.eos_token or "",
        )

    def render_chat(self, messages: list[dict[str, str]]) -> str:
        """The prompt text for `messages` (role/content dicts), ending with the assistant turn."""
        return self.render_messages(messages, add_generation_prompt=True)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        return self.encode(self.render_chat(messages))
