"""The per-request gate between verified text and the client, and the compiled rules it applies
(`rules.py` reads, checks and compiles the file; `PolicySet.gate()` starts a gate per request).

Verified text arrives in chunks that follow token boundaries, not word boundaries, so a blocked
term can arrive split over two or three chunks. The gate keeps all the text it was fed and releases
only what no rule can still claim: a pattern rule's match is at most `longest` characters long, so
any match that future text can still complete starts within the last `window - 1` characters
(`PatternRule`), and those are held back. A blocking match therefore never leaves, however
the tokens split it, and the text before it does, unchanged.

Each pattern rule is searched from the first start position it has not decided yet, with
`finditer(text, pos)` rather than on a slice, so lookbehinds, `\\b` and `^` see the real preceding
text. A match whose end (plus what the pattern reads past it) touches the end of the text may still
grow or vanish with the next chunk; the gate decides it then, and at `finish()` everything is final.

Checkers see the whole text after every chunk and at the end; they cannot be bounded, so they get
what their rule's `hold_back` asks for, and a violation they report inside text already released
stops the rest. No text ever goes into a log line or an exception: rule names and error types only.
"""

from __future__ import annotations

import logging
import re
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
    position: int  # character offset in the output text where the match starts
    length: int  # the match's length as first seen (0 for a checker: it reports only where)


@dataclass(frozen=True)
class PatternRule:
    """A terms or regex rule, compiled. A match is at most `longest` characters; `lookahead` is how far
    past a match's end the pattern reads (a `\\b`, `$` or `(?=...)`), so a match is final only once
    that much text follows it."""

    index: int  # place in the file
    name: str
    action: Action
    pattern: re.Pattern[str]
    longest: int
    lookahead: int

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
        """Characters the gate keeps back from the client until more text or the end arrives."""
        return max((rule.hold_back for rule in self.rules), default=0)

    @property
    def blocks(self) -> bool:
        return any(rule.action == "block" for rule in self.rules)

    @property
    def needs_hold_back(self) -> bool:
        return self.hold_back > 0

    def gate(self) -> PolicyGate:
        return PolicyGate(self)


class PolicyGate:
    """One request's gate: `feed` each chunk of verified text, send what it returns, then `finish`.

    Not thread-safe; it shares nothing mutable with other gates. Once `violation` is set, nothing
    at or after `violation.position` is ever released and `feed`/`finish` return "".
    """

    def __init__(self, policy: PolicySet):
        self.policy = policy
        self.violation: Violation | None = None
        self.flags: list[Violation] = []
        self.released = 0  # characters handed out so far
        self._hold_back = policy.hold_back
        self._text = ""
        self._next = [0] * len(policy.patterns)  # per pattern rule: the first start not yet decided
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
        else:
            end = len(self._text) if final else len(self._text) - self._hold_back
        if end <= self.released:
            return ""
        out, self.released = self._text[self.released : end], end
        return out

    def _search(self, i: int, rule: PatternRule, final: bool) -> list[Violation]:
        """New matches of one pattern rule, from the first start it has not decided."""
        text, found, pos = self._text, [], self._next[i]
        for match in rule.pattern.finditer(text, pos):
            start, end = match.span()
            if not final and end + rule.settle > len(text):
                pos = start  # more text may lengthen or undo this match: decide it with the next chunk
                break
            found.append(Violation(rule.name, rule.action, start, end - start))
            pos = max(end, start + 1)
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
