"""The per-request gate between verified text and the client, and the compiled rules it applies
(`rules.py` reads, checks and compiles the file; `PolicySet.gate()` starts a gate per request).

Verified text arrives in chunks that follow token boundaries, not word boundaries, so a blocked
term can arrive split over two or three chunks. The gate keeps all the text it was fed and releases
only what no rule can still claim: a pattern rule's match is at most `longest` characters long, so
any match that future text can still complete starts within the last `window - 1` characters
(`PatternRule`), and those are held back. A blocking match therefore never leaves, however
the tokens split it, and the text before it does, unchanged.

Pattern rules match normalised text unless a rule turns it off (`normalise: false`): each character
in its compatibility form (NFKC: a fullwidth letter is the letter, a no-break space a space) with
combining marks dropped, invisible format and control characters dropped, any run of whitespace one
space, and, for a case-insensitive terms rule, case-folded. A term goes through the same steps, so
"BEGIN RSA" also matches it written with a no-break space, a soft hyphen or a line break. Normalisation works one character at a time (only a run of
spaces looks back, at the previous character), so the normalised text only ever grows at its end,
the same however the text is cut; each normalised character remembers the character it came from
(`_View.origin`), so windows and hold-back count normalised characters while what is released, and
where a match is reported, are the original text and its offsets.

Rules can also see the end of the prompt (`gate(context=prompt)`): a match that starts in the
prompt and reaches into the output blocks from the output's first character; one wholly inside
the prompt is the client's own text and is ignored; the prompt itself is never released. A regex
anchored with `^` or `\\A` is anchored to the output and sees no prompt.

Each pattern rule is searched from the first start position it has not decided yet, with
`finditer(text, pos)` rather than on a slice, so lookbehinds, `\\b` and `^` see the real preceding
text. A match whose end (plus what the pattern reads past it) touches the end of the text may still
grow or vanish with the next chunk; the gate decides it then, and at `finish()` everything is final.

Checkers see the whole output as written after every chunk and at the end (no prompt, no
normalisation); they cannot be bounded, so they get what their rule's `hold_back` asks for, and a
violation they report inside text already released stops the rest. No text ever goes into a log
line or an exception: rule names and error types only.
"""

from __future__ import annotations

import functools
import logging
import re
import unicodedata
from array import array
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

log = logging.getLogger(__name__)

Action = Literal["block", "flag"]
Checker = Callable[[str], "int | bool | None"]


@dataclass(frozen=True)
class Violation:
    """A rule's finding in the output text."""

    rule: str
    action: str  # block: the response stops before `position`; flag: let through, counted
    position: int  # character offset in the output text (as written) where the match starts; 0 if it starts in the prompt
    length: int  # the match's length in the output as first seen (0 for a checker: it reports only where)


@dataclass(frozen=True)
class PatternRule:
    """A terms or regex rule, compiled. A match is at most `longest` characters; `lookahead` is how far
    past a match's end the pattern reads (a `\\b`, `$` or `(?=...)`), so a match is final only once
    that much text follows it; `behind`, how far before its start (a `\\b` or `(?<=...)`). Lengths
    count characters of the text the rule searches: normalised unless `normalise` is off."""

    index: int  # place in the file
    name: str
    action: Action
    pattern: re.Pattern[str]
    longest: int
    lookahead: int
    normalise: bool = True  # search normalised text (see the module's docstring), else the text as written
    fold: bool = False  # normalised text case-folded too (a case-insensitive terms rule)
    behind: int = 0
    anchored: bool = False  # a `^` or `\\A`: anchored to the output's start, so it is shown no prompt

    @property
    def settle(self) -> int:
        """Characters past a match's end the gate waits for before it takes the match as final. A flag
        waits at least one, so a match still growing at the end of the text is counted once, whole."""
        return self.lookahead if self.action == "block" else max(self.lookahead, 1)

    @property
    def window(self) -> int:
        """A match that more text can still create or change starts within the last `window - 1` characters."""
        return self.longest + self.settle

    @property
    def hold_back(self) -> int:
        return self.window - 1 if self.action == "block" else 0


@dataclass(frozen=True)
class CheckerRule:
    """A checker function: `check(text_so_far)` returns None or False (pass), True (a violation at 0),
    or the offset where a violation starts. It cannot say how long a violation is."""

    index: int
    name: str
    action: Action
    check: Checker
    wants: int  # the rule's hold_back
    on_error: str  # block: an error counts as a finding of this rule; allow: logged only

    @property
    def hold_back(self) -> int:
        return self.wants if self.action == "block" else 0


@dataclass(frozen=True)
class PolicySet:
    """A compiled rules file: immutable and shared by every request; each request gets its own `gate()`."""

    patterns: tuple[PatternRule, ...]
    checkers: tuple[CheckerRule, ...]
    source: str = ""

    @property
    def rules(self) -> tuple[PatternRule | CheckerRule, ...]:
        """All rules in file order (each has `name`, `action` and `hold_back`)."""
        return tuple(sorted((*self.patterns, *self.checkers), key=lambda rule: rule.index))

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(rule.name for rule in self.rules)

    @property
    def hold_back(self) -> int:
        """Characters the gate keeps back from the client until more text or the end arrives (of the
        text its rules search, normalised for most: invisible characters among them are held too)."""
        return max((rule.hold_back for rule in self.rules), default=0)

    @property
    def blocks(self) -> bool:
        return any(rule.action == "block" for rule in self.rules)

    @property
    def needs_hold_back(self) -> bool:
        return self.hold_back > 0

    @property
    def context(self) -> int:
        """Characters (normalised) of the prompt's end a match reaching into the output can start in or read."""
        return max((rule.longest - 1 + rule.behind for rule in self.patterns if not rule.anchored), default=0)

    def gate(self, context: str = "") -> PolicyGate:
        """A gate for one response; `context` is the prompt (or its end: the gate keeps only the last
        `self.context` characters it needs, counted after normalisation, and never releases them)."""
        return PolicyGate(self, context)


class PolicyGate:
    """One request's gate: `feed` each chunk of verified text, send what it returns, then `finish`.

    Not thread-safe; it shares nothing mutable with other gates. Once `violation` is set, nothing
    at or after `violation.position` is ever released and `feed`/`finish` return "".
    """

    def __init__(self, policy: PolicySet, context: str = ""):
        self.policy = policy
        self.violation: Violation | None = None
        self.flags: list[Violation] = []
        self.released = 0  # characters of the output handed out so far
        self._text = ""  # the output as fed
        tail = _tail(context, policy.context)
        views: dict[tuple[bool, bool, bool], _View] = {}  # rules that search the same text share it
        self._view_of: list[_View] = []  # per pattern rule
        for rule in policy.patterns:
            key = (rule.normalise, rule.fold, bool(tail) and not rule.anchored)
            if key not in views:
                views[key] = _View(rule.normalise, rule.fold, tail if key[2] else "")
            self._view_of.append(views[key])
        self._views = tuple(views.values())
        self._holds = [  # per view: the normalised characters its blocking rules hold back
            (view, max(rule.hold_back for rule, of in zip(policy.patterns, self._view_of, strict=True) if of is view))
            for view in self._views
        ]
        self._checker_hold = max((rule.hold_back for rule in policy.checkers), default=0)
        self._next = [0] * len(policy.patterns)  # per pattern rule: the first start (in its view) not yet decided
        self._seen: set[tuple[str, int]] = set()  # flags already reported
        self._failed: set[str] = set()  # checkers whose error has been counted as a flag
        self._finished = False

    def feed(self, text: str) -> str:
        """Append newly verified text; return what may go to the client now ("" if nothing)."""
        if self.violation is not None:
            return ""
        if self._finished:
            raise RuntimeError("PolicyGate.feed() after finish()")
        if not text:
            return ""
        self._text += text
        for view in self._views:
            view.feed(text)
        return self._advance(final=False)

    def finish(self) -> str:
        """The response ended normally: decide everything held and return the rest, unless it is blocked."""
        if self._finished or self.violation is not None:
            self._finished = True
            return ""
        self._finished = True
        return self._advance(final=True)

    @property
    def held(self) -> int:
        """Characters fed but not released (after a violation the gate keeps no more text)."""
        return len(self._text) - self.released

    def _advance(self, final: bool) -> str:
        found = [v for i, rule in enumerate(self.policy.patterns) for v in self._search(i, rule, final)]
        found += [v for rule in self.policy.checkers for v in self._check(rule)]
        first = min((v for v in found if v.action == "block"), key=lambda v: v.position, default=None)
        for v in found:
            if v.action == "flag" and (first is None or v.position < first.position) and (v.rule, v.position) not in self._seen:
                self._seen.add((v.rule, v.position))
                self.flags.append(v)
        if first is not None:
            self.violation = first
            end = first.position
        elif final:
            end = len(self._text)
        else:
            # Any match still to come starts in the last `hold` characters of its view, so at or after
            # the original character the first of them came from; invisible characters before it may go.
            end = len(self._text) - self._checker_hold
            for view, hold in self._holds:
                if hold:
                    end = min(end, view.origin(max(len(view.text) - hold, 0)))
        if end <= self.released:
            return ""
        out, self.released = self._text[self.released : end], end
        return out

    def _search(self, i: int, rule: PatternRule, final: bool) -> list[Violation]:
        """New matches of one pattern rule, from the first start it has not decided."""
        view = self._view_of[i]
        text, found, pos = view.text, [], self._next[i]
        for match in rule.pattern.finditer(text, pos):
            start, end = match.span()
            if not final and end + rule.settle > len(text):
                pos = start  # more text may lengthen or undo this match: decide it with the next chunk
                break
            pos = max(end, start + 1)
            first, last = max(view.origin(start), 0), view.origin(end - 1) + 1
            if last <= 0:
                continue  # wholly inside the prompt: the client's own text
            found.append(Violation(rule.name, rule.action, first, last - first))
            if rule.action == "block":
                break  # the gate stops at the first block
        else:
            # Starts before this one are decided: a match there would end, settle included, inside the text.
            pos = max(pos, len(text) + 1 - rule.window)
        self._next[i] = pos
        return found

    def _check(self, rule: CheckerRule) -> list[Violation]:
        text = self._text
        try:
            result = rule.check(text)
        except Exception as exc:  # the checker's own bug or outage; its message may quote the text
            return self._checker_failed(rule, f"raised {type(exc).__name__}")
        if result is None or result is False:
            return []
        if result is True:
            return [Violation(rule.name, rule.action, 0, 0)]
        if isinstance(result, int) and 0 <= result <= len(text):
            return [Violation(rule.name, rule.action, result, 0)]
        return self._checker_failed(rule, f"returned a {type(result).__name__} that is not None, a bool or an offset into the text")

    def _checker_failed(self, rule: CheckerRule, what: str) -> list[Violation]:
        """on_error block: the failure counts as a finding of the rule at the first unreleased
        character (a block rule fails closed, a flag rule is flagged once); allow: logged only."""
        log.warning("policy checker %s %s; on_error=%s", rule.name, what, rule.on_error, extra={"policy_rule": rule.name})
        if rule.on_error == "allow" or (rule.action == "flag" and rule.name in self._failed):
            return []
        self._failed.add(rule.name)
        return [Violation(rule.name, rule.action, self.released, 0)]


# -- normalised text ---------------------------------------------------------------------------------------

# Letters by their category that show as nothing: the Hangul fillers. Dropped like format characters.
_BLANK = frozenset("\u115f\u1160\u3164\uffa0")
_MARKS = ("Mn", "Me")


def normalise(text: str, fold: bool = False) -> str:
    """`text` as the gate matches it (what a rule's terms go through); see the module's docstring."""
    view = _View(True, fold, "")
    view.feed(text)
    return view.text


def normalise_pattern(source: str) -> str:
    """A regex's non-ASCII characters normalised like text, so that a literal 'é' or no-break space in
    it still matches; ASCII (the regex syntax, escapes and spaces) is left as written."""
    return "".join(char if char.isascii() else _normal_char(char, False) for char in source)


@functools.lru_cache(maxsize=8192)
def _normal_char(char: str, fold: bool) -> str:
    """One character's normalised form: " " for any space, "" for an invisible one, else its NFKC form
    without combining marks ('É', 'E' + U+0301 and a fullwidth 'Ｅ' are all 'E'), case-folded if `fold`.
    Character by character, so that text normalises the same however it is cut."""
    if char.isspace():
        return " "
    if char in _BLANK or unicodedata.category(char) in ("Cf", "Cc"):
        return ""
    text = _unmarked(char)
    if fold:
        text = _unmarked(text.casefold())
    return "".join(" " if c.isspace() else c for c in text)  # e.g. a spacing diaeresis is a space and a mark


def _unmarked(text: str) -> str:
    """NFKD, combining marks dropped, recomposed (NFC: a Hangul syllable stays one character)."""
    parts = unicodedata.normalize("NFKD", text)
    kept = "".join(c for c in parts if not (unicodedata.combining(c) or unicodedata.category(c) in _MARKS))
    return unicodedata.normalize("NFC", kept)


class _View:
    """The text a group of pattern rules searches: the prompt's tail, then the output, normalised or as
    written. `origin(i)` is the offset in the output of the character `text[i]` came from (negative
    inside the tail); `origin(len(text))` is the end of what was fed."""

    def __init__(self, normalise: bool, fold: bool, context: str):
        self.normalise, self.fold = normalise, fold
        self.text = ""
        self._where = array("q")  # normalised only: per character of text, its origin
        self._space = False  # the text ends in a space: more whitespace adds nothing
        self._start = self._fed = -len(context)
        self.feed(context)

    def feed(self, raw: str) -> None:
        if not raw:
            return
        base, self._fed = self._fed, self._fed + len(raw)
        if not self.normalise:
            self.text += raw
        elif raw.isascii() and raw.isprintable() and "  " not in raw and not (self._space and raw[0] == " "):
            self.text += raw.lower() if self.fold else raw  # the common case: every character stays itself
            self._where.extend(range(base, base + len(raw)))
            self._space = raw[-1] == " "
        else:
            out, where, space = [], self._where, self._space
            for at, char in enumerate(raw, base):
                for c in _normal_char(char, self.fold):
                    if c == " " and space:
                        continue
                    space = c == " "
                    out.append(c)
                    where.append(at)
            self._space = space
            self.text += "".join(out)

    def origin(self, i: int) -> int:
        if i >= len(self.text):
            return self._fed
        return self._where[i] if self.normalise else self._start + i


def _tail(prompt: str, need: int) -> str:
    """The end of the prompt holding more than `need` characters both as written and normalised (a
    run of spaces counted once), or the whole prompt; at most 64 per character needed, so a prompt
    padded with invisible characters costs little."""
    if not prompt or need <= 0:
        return ""
    at, stop, written, normal, space = len(prompt), max(len(prompt) - 64 * (need + 1), 0), 0, 0, False
    while at > stop and (written <= need or normal <= need):
        at -= 1
        written += 1
        char = _normal_char(prompt[at], False)
        if char == " ":
            normal += not space
        elif char:
            normal += len(char)
        space = char == " " or (space and not char)
    return prompt[at:]
