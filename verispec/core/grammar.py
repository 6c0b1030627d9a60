"""Constraints on generated tokens for one request: any JSON object, a JSON schema, a regex, a Lark grammar.

The engine is llguidance (docs/grammar-engines.md has the measurements): an Earley parser over a lazily
built lexer, a few microseconds to tens of microseconds per mask on this project's vocabularies, and
explicit fuel limits, so that a hostile spec fails in milliseconds with an error instead of a hang.

`compile_constraint` turns a request's spec into a `Constraint` (shareable, immutable); `Constraint.start`
gives each request its own `Matcher`, which follows the accepted tokens. A speculative round asks the
matcher for the masks at every draft position at once (`masks_for`), leaving its state untouched; the
engine then `advance`s by the tokens it keeps. Rolled-back tokens cost nothing to undo (`rollback`).

A constraint is compiled with the tokenizer's EOS as its end (so that one compiled constraint serves every
request of a format); each request's matcher ends on all of the request's stop tokens as well (a model's
second end-of-turn id, a client's `stop_token_ids`). Under a format a stop token means the end and nothing
else: every one is allowed exactly where the output may end, and nowhere else, not even where the grammar
would take the same token as text.

A spec that is invalid, too large or too costly raises `UserError`. llguidance builds lexer states as
tokens arrive, so a spec can also run out of fuel mid-request: the matcher then raises `UserError` too.
"""

from __future__ import annotations

import itertools
import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

from verispec.errors import UserError

if TYPE_CHECKING:
    from verispec.config import ResponseFormat

KINDS = ("json_object", "json_schema", "regex", "grammar")
MAX_SPEC_BYTES = 64 * 1024  # a schema (as JSON), a regex or a grammar
MAX_SCHEMA_DEPTH = 32  # nesting of the schema document itself (dicts and lists): 15 levels of properties
# JSON is written as Python's json.dumps writes it: ", " and ": " and no other whitespace. Fixed
# separators let the grammar force whole keys (`{"name": "` is one forced run: on a 4-key object,
# 17 of 30 tokens are forced, against 6 with free whitespace) and leave a small model no newline
# loop to fall into.
# llguidance refuses \uXXXX escapes of printable characters by default; json.dumps writes every
# non-ASCII character that way, so models have seen them everywhere.
JSON_FORMAT = {
    "whitespace_flexible": False,
    "item_separator": ", ",
    "key_separator": ": ",
    "json_allow_general_unicode_escapes": True,
}
CACHED_PER_TOKENIZER = 256  # compiled constraints kept per tokenizer (`compiled`), least recently used out


def _limits() -> llguidance.LLParserLimits:
    """llguidance's resource limits: tighter than the library's where a hostile spec could make one
    request cost seconds to minutes (docs/grammar-engines.md), the library's elsewhere."""
    return llguidance.LLParserLimits(
        max_grammar_size=200_000,  # symbols in the compiled grammar; a 64 KiB schema stays well under
        max_lexer_states=50_000,  # the library's 250,000 would allow ~0.5 GB per request
        initial_lexer_fuel=1_000_000,  # ~20 ms to build the lexer (the library's)
        step_lexer_fuel=200_000,  # ~14 ms of lexer work per mask at most (the library's)
        # Earley items: the library's 2,000 per row and 50,000 per mask let the ambiguous grammar
        # `s: s s | "a"` run 130 s (cubic) before failing; 500 and 20,000 stop it in 0.6 s. Left and
        # right recursion over 2,000 repetitions and JSON nested 300 deep stay far below them.
        max_items_in_row=500,
        step_max_items=20_000,
        verbose_errors=False,  # one-line errors, without parser state dumps
    )


_TOKENIZERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_TOKENIZERS_LOCK = threading.Lock()


def _llg_tokenizer(tokenizer: PreTrainedTokenizerBase, eos_ids: tuple[int, ...]) -> llguidance.LLTokenizer:
    """llguidance's view of `tokenizer` (its token trie): ~0.05 s for 8k tokens, ~0.4 s for 49k, so it is
    built once per tokenizer object and end-of-sequence set, and dropped with the tokenizer."""
    with _TOKENIZERS_LOCK:
        per_eos = _TOKENIZERS.setdefault(tokenizer, {})
        if eos_ids not in per_eos:
            try:
                per_eos[eos_ids] = llguidance.hf.from_tokenizer(tokenizer, eos_token=list(eos_ids))
            except ValueError as exc:  # "Only fast tokenizers are supported"
                raise UserError(f"structured outputs need a fast (tokenizers) tokenizer: {exc}") from None
        return per_eos[eos_ids]


def _first_lines(message: str) -> str:
    """llguidance's error text in one line: its source excerpts (`1 | ...`, `^`) and markers dropped."""
    lines = [ln.strip() for ln in message.replace("<non-verbose/>", "").splitlines()]
    keep = [ln for ln in lines if ln and not ln.startswith("^") and not re.match(r"\d+ \|", ln)]
    return "; ".join(keep)[:300]


def _schema_depth_exceeds(schema: object, limit: int) -> bool:
    """True if `schema` nests dicts and lists deeper than `limit` (iterative: a hostile document may be
    deeper than Python's recursion limit)."""
    stack = [(schema, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict | list):
            if depth > limit:
                return True
            stack.extend((child, depth + 1) for child in (node.values() if isinstance(node, dict) else node))
    return False


def _grammar_text(kind: str, spec: object) -> str:
    """The llguidance grammar for a request's `response_format` (or regex / Lark extension)."""
    if kind not in KINDS:
        raise UserError(f"unknown constraint kind {kind!r}; expected one of {', '.join(KINDS)}")
    if kind == "json_object":
        spec = {"type": "object"}  # OpenAI's json_object: any JSON object
    if kind in ("json_object", "json_schema"):
        if not isinstance(spec, dict):
            raise UserError(f"a JSON schema must be a JSON object, not {type(spec).__name__}")
        if _schema_depth_exceeds(spec, MAX_SCHEMA_DEPTH):
            raise UserError(
                f"the JSON schema document nests deeper than {MAX_SCHEMA_DEPTH} levels of objects and arrays "
                "(an object property costs two); flatten it or use $defs and $ref"
            )
        text = json.dumps(spec)
        if len(text.encode()) > MAX_SPEC_BYTES:
            raise UserError(f"the JSON schema is {len(text.encode())} bytes; the limit is {MAX_SPEC_BYTES}")
        return llguidance.LLMatcher.grammar_from_json_schema(text, overrides=JSON_FORMAT)
    if not isinstance(spec, str) or not spec:
        raise UserError(f"a {kind} must be a non-empty string")
    if len(spec.encode()) > MAX_SPEC_BYTES:
        raise UserError(f"the {kind} is {len(spec.encode())} bytes; the limit is {MAX_SPEC_BYTES}")
    if kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(spec)
    return llguidance.LLMatcher.grammar_from_lark(spec)


def compile_constraint(
    kind: str,
    spec: object,
    tokenizer: PreTrainedTokenizerBase,
    vocab_size: int,
    eos_ids: Sequence[int] | None = None,
) -> Constraint:
    """Compile a request's constraint for `tokenizer`, with masks of `vocab_size` (the model's rows).

    kind: "json_object" (spec ignored: any JSON object), "json_schema" (spec: the schema, a dict; honoured
    as written: OpenAI strict mode's `additionalProperties: false` and `required` are the caller's to
    send), "regex" (spec: a regex the whole output must match) or "grammar" (spec: a Lark grammar,
    llguidance's dialect). eos_ids: the tokens that end generation (default: the tokenizer's EOS); the
    masks allow them exactly where the output may end. Raises UserError for an invalid, too large or too
    costly spec, in bounded time (milliseconds for everything tested; see docs/grammar-engines.md).
    """
    eos = tuple(eos_ids) if eos_ids is not None else (tokenizer.eos_token_id,)
    if not eos or any(t is None or not 0 <= t < vocab_size for t in eos):
        raise UserError(f"structured outputs need end-of-sequence token ids within the vocabulary, got {eos}")
    grammar = _grammar_text(kind, spec)
    llg_tokenizer = _llg_tokenizer(tokenizer, eos)
    matcher = llguidance.LLMatcher(llg_tokenizer, grammar, log_level=0, limits=_limits())
    if not matcher.is_error():
        # The first mask builds the lexer's initial states: a spec too costly for the fuel fails here,
        # at compile time, rather than in the request's first step.
        words = _Words(llg_tokenizer.vocab_size)  # named: the buffer must outlive the call
        matcher.unsafe_compute_mask_ptr(*words.pointer())
    if matcher.is_error():
        raise UserError(f"invalid {kind.replace('_', ' ')}: {_first_lines(matcher.get_error())}")
    return Constraint(kind, grammar, vocab_size, eos, llg_tokenizer.vocab_size, matcher)


_COMPILED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def compiled(
    response_format: ResponseFormat, tokenizer: PreTrainedTokenizerBase, vocab_size: int
) -> Constraint:
    """`compile_constraint` for a request's `response_format`, cached: equal formats (`ResponseFormat.key`)
    for the same tokenizer share one Constraint, so the server can compile off the engine's thread and
    the engine find it done. Errors are not cached (a bad spec fails in milliseconds)."""
    kind, spec = response_format.key()
    key = (kind, spec, vocab_size)
    with _TOKENIZERS_LOCK:
        cache = _COMPILED.setdefault(tokenizer, OrderedDict())
        if key in cache:
            cache.move_to_end(key)
            return cache[key]
    if kind == "json_schema":
        spec = json.loads(spec)
    constraint = compile_constraint(kind, spec, tokenizer, vocab_size)  # outside the lock: ms to 100s of ms
    with _TOKENIZERS_LOCK:
        cache[key] = constraint
        while len(cache) > CACHED_PER_TOKENIZER:
            cache.popitem(last=False)
    return constraint


def _forget(constraint: Constraint) -> None:
    with _TOKENIZERS_LOCK:
        for cache in _COMPILED.values():
            for key in [k for k, v in cache.items() if v is constraint]:
                del cache[key]


@dataclass(frozen=True)
class Constraint:
    """A compiled constraint: immutable, shareable across requests with the same spec and tokenizer."""

    kind: str
    grammar: str  # llguidance's grammar text (JSON), e.g. for logs and caches
    vocab_size: int  # the model's: mask width
    eos_ids: tuple[int, ...]
    tokenizer_vocab: int  # llguidance's: mask bits it computes (padded or cut to vocab_size)
    _initial: llguidance.LLMatcher = field(repr=False)  # at the start, lexer warmed; copied per request

    def start(self, stop_ids: Iterable[int] = ()) -> Matcher:
        """A fresh matcher for one request, at the start of its output, that ends on `stop_ids` (the
        request's stop tokens, within the model's vocabulary) as it ends on the constraint's EOS."""
        return Matcher(self, self._initial.deep_copy(), stop_ids)


class _Words:
    """llguidance's mask buffers, one row per position: one bit per tokenizer token, in int32 words."""

    def __init__(self, n_tokens: int, rows: int = 1):
        self.array = np.zeros((rows, (n_tokens + 31) // 32), dtype=np.int32)
        self._base = self.array.ctypes.data  # cached: the lookup costs as much as a small mask
        self._row_bytes = self.array.shape[1] * 4

    def pointer(self, row: int = 0) -> tuple[int, int]:
        return self._base + row * self._row_bytes, self._row_bytes

    def allows(self, row: int, token: int) -> bool:
        return bool((int(self.array[row, token >> 5]) >> (token & 31)) & 1)

    def bools(self, width: int) -> np.ndarray:
        """(rows, width) bool: the bits, little-endian within each word, cut or padded with False."""
        bits = np.unpackbits(self.array.view(np.uint8), axis=1, bitorder="little").view(np.bool_)
        if width <= bits.shape[1]:
            return np.ascontiguousarray(bits[:, :width])
        out = np.zeros((len(bits), width), dtype=np.bool_)
        out[:, : bits.shape[1]] = bits
        return out


class Matcher:
    """One request's position in its constraint. Follows accepted tokens only; drafts are explored with
    `masks_for`, which leaves the state as it found it.

    Its end tokens (`end_ids`: the constraint's EOS and the request's stop tokens) are allowed exactly
    where the output may end; taking one there is taking llguidance's EOS."""

    def __init__(self, constraint: Constraint, matcher: llguidance.LLMatcher, stop_ids: Iterable[int] = ()):
        self.constraint = constraint
        self._m = matcher
        self.end_ids = frozenset(constraint.eos_ids) | frozenset(stop_ids)
        if any(not 0 <= t < constraint.vocab_size for t in self.end_ids):
            raise ValueError(f"end token ids {sorted(self.end_ids)} must lie within the vocabulary ({constraint.vocab_size})")
        self._ends = np.array(sorted(self.end_ids))
        self._eos = list(constraint.eos_ids)  # the ends llguidance knows: its mask sets them where it may end
        self._words = _Words(constraint.tokenizer_vocab)
        self._consumed = 0  # tokens taken (EOS included): the most `rollback` can undo
        # EOS tokens taken after the grammar was complete: llguidance accepts them without recording
        # them (its rollback would undo an earlier token instead), so they are counted here only.
        self._unrecorded = 0

    def _check(self) -> None:
        """A matcher that ran out of fuel mid-request is dead: say so as the request's error. Its
        constraint leaves the cache: requests of one constraint share its lexer's states and their
        budget, so a later request of the same format starts from a fresh compile instead."""
        if self._m.is_error():
            _forget(self.constraint)
            raise UserError(f"the {self.constraint.kind.replace('_', ' ')} is too costly to follow at output "
                            f"token {self._consumed}: {_first_lines(self._m.get_error())}")  # fmt: skip

    def _fill(self, words: _Words, row: int = 0) -> None:
        self._m.unsafe_compute_mask_ptr(*words.pointer(row))
        self._check()

    def _rows(self, words: _Words, rows: int) -> tuple[np.ndarray, int | None]:
        """`words` as (R, V) bool, in its first `rows` rows the end tokens set where the output may end
        and cleared elsewhere, and the first of those rows that allows no token at all (None if none)."""
        bools = words.bools(self.constraint.vocab_size)
        filled = bools[:rows]
        filled[:, self._ends] = filled[:, self._eos].any(axis=1)[:, None]
        empty = ~filled.any(axis=1)
        return bools, (int(empty.argmax()) if empty.any() else None)

    def _no_token(self, words: _Words, row: int) -> UserError:
        """The error for row `row`, which allows no token: llguidance's own mask was empty, or held
        nothing but stop tokens, which the grammar wants as text where the output cannot end."""
        kind, at = self.constraint.kind.replace("_", " "), self._consumed + row
        if not words.bools(self.constraint.vocab_size)[row].any():
            return UserError(f"the {kind} allows no token at output token {at}")
        stops = sorted(self.end_ids - set(self._eos))
        return UserError(
            f"the {kind} needs one of the request's stop tokens {stops} as text at output token {at}, where a "
            "stop token may only end the output; leave it out of stop_token_ids or change the format"
        )

    def allowed(self) -> torch.Tensor:
        """(V,) bool: the tokens allowed next. End tokens are set exactly where the output may end;
        ids past the tokenizer's vocabulary (model padding rows) are False. Raises UserError where no
        token at all may come (`_no_token`)."""
        self._fill(self._words)
        bools, empty = self._rows(self._words, 1)
        if empty is not None:
            raise self._no_token(self._words, 0)
        return torch.from_numpy(bools[0])

    def allows(self, token: int) -> bool:
        """Whether `token` may come next, without computing a whole mask."""
        if token in self.end_ids:  # as the mask has it: llguidance's validate refuses EOS
            return self._m.is_accepting()  # once the grammar is complete
        if not 0 <= token < self.constraint.tokenizer_vocab:  # llguidance errors out on those
            return False
        ok = self._m.validate_tokens([token]) == 1
        self._check()
        return ok

    def _take(self, token: int) -> bool:
        """Take one token if it is allowed; False (and no change) if not."""
        if token in self.end_ids:
            if not self._m.is_accepting():
                return False
            if self._m.is_stopped():
                self._unrecorded += 1
            elif not self._m.consume_token(self._eos[0]):
                self._check()
                raise RuntimeError(f"llguidance refused EOS {self._eos[0]} in an accepting state")
        elif not (0 <= token < self.constraint.tokenizer_vocab and self._m.try_consume_tokens([token]) == 1):
            self._check()
            return False
        self._consumed += 1
        return True

    def advance(self, tokens: Sequence[int]) -> None:
        """Take the accepted `tokens` (each allowed where it stands; a disallowed one is a caller's bug,
        raised as ValueError with the state left as it was before `tokens`)."""
        for i, token in enumerate(tokens):
            if not self._take(token):
                self.rollback(i)
                raise ValueError(f"token {token} (at {i} of {list(tokens)}) is not allowed by the constraint")

    def rollback(self, n: int) -> None:
        """Undo the last `n` taken tokens (any number up to all of them: llguidance keeps the history)."""
        if not 0 <= n <= self._consumed:
            raise ValueError(f"cannot roll back {n} tokens: the matcher holds {self._consumed}")
        unrecorded = min(n, self._unrecorded)  # they are the last ones taken: nothing follows EOS
        if n > unrecorded:
            self._m.rollback(n - unrecorded)
            self._check()
        self._unrecorded -= unrecorded
        self._consumed -= n

    def forced(self) -> list[int]:
        """The tokens the constraint forces next, whatever the model says (e.g. the rest of a fixed key),
        for a jump-forward proposal; [] if none. Tokenized so as not to split a token the model would
        write whole: llguidance holds back a last token that could still merge with what follows. Cut
        before a stop token: one the grammar forces is text, where the output cannot end."""
        tokens = self._m.compute_ff_tokens()
        self._check()
        return list(itertools.takewhile(lambda t: t not in self.end_ids, tokens))

    @property
    def done(self) -> bool:
        """Whether the output is complete: nothing but an end token may follow (or one was taken)."""
        return self._m.is_stopped() and not self._m.is_error()

    def masks_for(self, drafts: Sequence[int]) -> tuple[torch.Tensor, int]:
        """Masks for a speculative round: ((k+1, V) bool, n). Row j is `allowed()` after drafts[:j], for j
        up to n, the number of leading drafts that are themselves allowed (and lead to a row that allows
        some token); rows past n are all True (the verifier keeps nothing there: row n already refuses
        drafts[n]; True keeps softmax finite). The matcher's state is the same afterwards. Raises
        UserError where row 0 allows no token (`allowed`) or the matcher fails (`_check`)."""
        words = _Words(self.constraint.tokenizer_vocab, rows=len(drafts) + 1)
        n = 0
        try:
            self._fill(words, 0)
            for token in drafts:
                if not self._in_mask(words, n, token):
                    break
                if not self._take(token):
                    raise RuntimeError(f"llguidance refused token {token} that its own mask allowed")
                n += 1
                self._fill(words, n)
        finally:
            if not self._m.is_error():
                self.rollback(n)
        masks, empty = self._rows(words, n + 1)
        if empty == 0:
            raise self._no_token(words, 0)
        if empty is not None:  # drafts[empty - 1] leads where no token may follow: no draft for the verifier
            n = empty - 1
        masks[n + 1 :] = True
        return torch.from_numpy(masks), n

    def _in_mask(self, words: _Words, row: int, token: int) -> bool:
        """Whether row `row` of llguidance's masks allows `token`, an end token where it may end."""
        if token in self.end_ids:
            return any(words.allows(row, eos) for eos in self._eos)
        return 0 <= token < self.constraint.tokenizer_vocab and words.allows(row, token)
