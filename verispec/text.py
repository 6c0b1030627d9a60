"""Verified token ids in, text out.

Text is held back while it ends in an incomplete UTF-8 sequence, or while its tail could be the
start of a stop string, so a caller never receives text that a later token would change or that
belongs to a stop string.
"""

from __future__ import annotations

import functools
import re

from transformers import PreTrainedTokenizerBase


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""  # decoded so far (cut at a stop string once one is found)
        self.emitted = 0  # characters of `text` already handed out
        self.stopped = False  # a stop string was found
        # Decode a short window of tokens at a time (vLLM's prefix/read offsets), not the whole output.
        self._prefix_offset = 0
        self._read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one verified token; return the text that became final."""
        self.ids.append(token_id)
        self.text += self._decode_new(final=False)
        if self.stop:
            found = [i for i in (self.text.find(s, self.emitted) for s in self.stop) if i >= 0]
            if found:
                self.text = self.text[: min(found)]
                self.stopped = True
                return self._emit(len(self.text))
        return self._emit(len(self.text) - self._stop_prefix_len())

    def flush(self) -> str:
        """The rest of the text, at the end of the request."""
        if not self.stopped:
            self.text += self._decode_new(final=True)
        return self._emit(len(self.text))

    def _emit(self, end: int) -> str:
        delta = self.text[self.emitted : end]
        self.emitted = max(self.emitted, end)
        return delta

    def _stop_prefix_len(self) -> int:
        """Length of the longest unemitted tail that is a proper prefix of a stop string."""
        tail = self.text[self.emitted :]
        for n in range(min(len(tail), max((len(s) for s in self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-n:]) for s in self.stop):
                return n
        return 0

    def _decode_new(self, final: bool) -> str:
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self._prefix_offset : self._read_offset], skip_special_tokens=True)
        full = decode(self.ids[self._prefix_offset :], skip_special_tokens=True)
        if len(full) > len(prefix) and (final or not full.endswith("\ufffd")):
            self._prefix_offset, self._read_offset = self._read_offset, len(self.ids)
            return full[len(prefix) :]
        return ""


def chat_text(tokenizer: PreTrainedTokenizerBase, messages: list[dict], tools: list[dict] | None = None) -> str:
    """A conversation as the model expects it: its chat template applied (with `tools` where the
    template renders them), with the turn of the assistant opened. Raises ValueError where the
    model has no chat template (and whatever the template raises on a conversation it does not take)."""
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("the model has no chat template")
    return tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True, tokenize=False)


def chat_prompt(tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]) -> tuple[str, list[int]]:
    """`chat_text` and its token ids (the template writes the special tokens, so the tokenizer
    adds none), as /v1/chat/completions tokenizes it."""
    text = chat_text(tokenizer, messages)
    return text, tokenizer(text, add_special_tokens=False).input_ids


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: the printable Latin-1
    bytes as themselves, the others as the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


_BYTE_OF_CHAR = _byte_level_alphabet()
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


class TokenBytes:
    """The bytes each token id stands for, in one tokenizer's vocabulary, and its text on its own:
    a byte-level BPE token can be half of a UTF-8 character, so valid UTF-8 reads as text and
    anything else as `bytes:\\xNN..` (as OpenAI writes such tokens)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.byte_level = backend is not None and type(backend.decoder).__name__ == "ByteLevel"
        self.special = set(tokenizer.all_special_ids)

    @functools.cache  # noqa: B019  (one per tokenizer, kept as long as its server)
    def of(self, token: int) -> bytes:
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if piece is None:
            return b""
        if token in self.special:
            return piece.encode()
        if self.byte_level and all(char in _BYTE_OF_CHAR for char in piece):
            return bytes(_BYTE_OF_CHAR[char] for char in piece)
        if found := _BYTE_PIECE.fullmatch(piece):  # sentencepiece's byte fallback
            return bytes([int(found.group(1), 16)])
        if piece.startswith("▁"):  # sentencepiece's word boundary
            return piece.replace("▁", " ").encode()
        return self.tokenizer.decode([token]).encode()

    def text(self, token: int) -> str:
        raw = self.of(token)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


@functools.cache
def token_bytes(tokenizer: PreTrainedTokenizerBase) -> TokenBytes:
    return TokenBytes(tokenizer)
