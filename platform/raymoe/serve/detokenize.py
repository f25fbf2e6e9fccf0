"""Incremental detokenization with stop strings, one generated token at a time.

Decoding token by token is wrong for byte-level BPE: a character can span tokens, and a token's
text can depend on its neighbours. As in Hugging Face's TextStreamer and vLLM's detokenizer, we
decode a short window of recent ids and emit only what is new and complete (no trailing U+FFFD).
Stop strings (OpenAI `stop`) end the output *before* the match; text that could still be the start
of a stop string is held back until it is clearly not one, so a stream never shows a half stop.
"""

from __future__ import annotations

from typing import Protocol


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class StopStringDetokenizer:
    """Turns generated ids into text deltas and reports when a stop string appears."""

    def __init__(self, tokenizer: Decoder, stop: list[str] | None = None):
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self._hold_max = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self._prefix_offset = 0  # window start: a few ids of context before the unread ones
        self._read_offset = 0  # ids before this are in `self.text`
        self.text = ""  # decoded so far (may include held-back characters)
        self._emitted = 0  # characters of `text` already returned
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Adds one generated id; returns the text that can be shown now (maybe "")."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        before = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset])
        after = self.tokenizer.decode(self.ids[self._prefix_offset :])
        if len(after) > len(before) and not after.endswith("\ufffd"):
            self.text += after[len(before) :]
            self._prefix_offset = self._read_offset
            self._read_offset = len(self.ids)
        return self._release(final=False)

    def flush(self) -> str:
        """At the end of generation: whatever is still held back (not a stop string after all)."""
        if self.stopped:
            return ""
        if self._read_offset < len(self.ids):
            # Generation ended inside an incomplete character: show it as decoded.
            before = self.tokenizer.decode(self.ids[self._prefix_offset : self._read_offset])
            self.text += self.tokenizer.decode(self.ids[self._prefix_offset :])[len(before) :]
            self._read_offset = len(self.ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        # A match can only end inside the new text, so search from just before it.
        start = max(0, self._emitted - self._hold_max)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            cut = min(hits)
            self.stopped = True
            self.text = self.text[:cut]
            delta, self._emitted = self.text[self._emitted :], len(self.text)
            return delta
        end = len(self.text) if final else len(self.text) - self._held_suffix()
        end = max(end, self._emitted)
        delta, self._emitted = self.text[self._emitted : end], end
        return delta

    def _held_suffix(self) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        for n in range(min(self._hold_max, len(self.text)), 0, -1):
            tail = self.text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0
