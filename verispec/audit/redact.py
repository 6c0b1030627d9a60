"""Redaction: the one choke point every audit record passes before it reaches a sink.

Prompts and outputs carry what users paste: e-mail addresses, phone numbers, card numbers, keys.
Every text field of an audit record goes through `Redactor.redact` once, before the record is
handed to any sink (database, log line, trace span). One choke point, not a filter per sink,
because a sink added later (a new exporter, a debug log) must not be able to forget it, and
because a single place is the only place a test can prove that nothing planted survives.

Recognized (each finding becomes a placeholder in "redact" mode):

- EMAIL: addresses, local part up to a domain with a top-level label.
- PHONE: `phonenumbers` (Google's libphonenumber) finds numbers that are valid for their region:
  international (+CC ...) anywhere, national formats as written in the US, GB, DE and FR.
- CREDIT_CARD: 13-19 digits, in one block or grouped as cards are printed (4-4-4-4, 4-6-5, split
  by spaces or dashes), starting with an issuer's digits (2221-2720, 3-6) and passing the Luhn
  checksum (so an arbitrary 16-digit ID is left alone, 9 times in 10).
- IP_ADDRESS: IPv4 and IPv6, each candidate validated by `ipaddress`.
- SECRET: provider keys by their prefix (OpenAI/Anthropic `sk-`, Stripe `sk_live_`, AWS
  `AKIA`/`ASIA`, GitHub `ghp_`/`github_pat_`, Slack `xox?-`, Hugging Face `hf_`, Google `AIza`),
  JWTs, PEM private key blocks, `Bearer <token>`, credentials in URLs (`scheme://USER:PASS@host`) and
  the value of `password=`, `api_key:`, `secret=`, `token=`-style assignments (code, env, JSON, YAML).
- CUSTOM: the operator's own regular expressions (employee IDs, ticket numbers, ...).

Overlapping findings merge into one span, labelled with the kind of the longest one.

Modes: "redact" puts placeholders in; "hash" keeps only an HMAC-SHA256 of the whole text (equal
texts stay linkable, nothing is readable; the key stops a dictionary attack on short values such as
phone numbers); "none" keeps the text, for operators who opt out explicitly.

Limits: this is pattern matching, not understanding. It cannot catch names, postal addresses,
dates of birth, or free-form secrets ("my password is hunter2", a key pasted with no prefix and no
`key=` before it); national phone formats outside the four regions are missed; any 13-19 digit
number passing Luhn is taken for a card. Where privacy matters more than reading prompts back,
use "hash".
"""

from __future__ import annotations

import bisect
import hashlib
import hmac
import ipaddress
import itertools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Literal, get_args

import phonenumbers

from verispec.errors import UserError

Mode = Literal["redact", "hash", "none"]


@dataclass(frozen=True)
class Finding:
    kind: str  # EMAIL, PHONE, CREDIT_CARD, IP_ADDRESS, SECRET or CUSTOM
    start: int
    end: int  # exclusive


# When two findings of equal length overlap, the earlier kind here names the merged span.
KINDS = ("SECRET", "CREDIT_CARD", "EMAIL", "IP_ADDRESS", "PHONE", "CUSTOM")
_RANK = {kind: i for i, kind in enumerate(KINDS)}

# --- e-mail -----------------------------------------------------------------------------------
# The lookbehind makes each run of local-part characters start once, so the scan stays linear.
_EMAIL = re.compile(r"(?<![\w.%+-])[\w.%+-]+@(?:[^\W_](?:[\w-]{0,61}[^\W_])?\.)+[^\W\d_]{2,63}(?![\w-])")
_USERINFO = re.compile(r"//[^\s/@]*\Z")  # "scheme://user:pass@host": credentials (a secret), not a mailbox


def _emails(text: str) -> Iterator[Finding]:
    if "@" not in text:
        return
    for m in _EMAIL.finditer(text):
        if not _USERINFO.search(text, max(0, m.start() - 256), m.start()):
            yield Finding("EMAIL", m.start(), m.end())


# --- phone ------------------------------------------------------------------------------------
# The matcher parses every digit string it meets: slow on prose with numbers in it. So it only sees
# spans that look like phone numbers (digits with at most three separators between them, seven
# digits at least: no valid number in these regions is shorter) and that no other recognizer took,
# each in the regions that can read it: written nationally, GB, DE and FR numbers start with the
# trunk prefix 0 and US numbers never do; +CC numbers read the same in any region.
_PHONE_SPAN = re.compile(r"(?<![\w+])\+?\(?[0-9](?:[\s().\-/]{0,3}[0-9])+")
_TRUNK_ZERO = re.compile(r"\(?0")
_DECIMAL = re.compile(r"\d+[.,]\d+")  # "0.123456789" is valid as a FR number, and is a decimal


class _Cover:
    """Whether a span lies inside one of some findings, in O(log n) a question (a prompt full of
    addresses must not make redaction quadratic)."""

    def __init__(self, findings: list[Finding]):
        spans = sorted((f.start, f.end) for f in findings)
        self.starts = [start for start, _ in spans]
        self.reach = list(itertools.accumulate((end for _, end in spans), max))

    def covers(self, start: int, end: int) -> bool:
        i = bisect.bisect_right(self.starts, start) - 1
        return i >= 0 and self.reach[i] >= end


def _phones(text: str, taken: list[Finding]) -> Iterator[Finding]:
    cover = _Cover(taken)
    for span in _PHONE_SPAN.finditer(text):
        if sum(ch.isdigit() for ch in span.group()) < 7:
            continue
        if cover.covers(span.start(), span.end()):
            continue  # a card, an IP address, part of a key
        regions = ("GB", "DE", "FR") if _TRUNK_ZERO.match(span.group()) else ("US",)
        # One character of context each side: the matcher rejects a number glued to a letter.
        offset = max(0, span.start() - 1)
        window = text[offset : span.end() + 1]
        for region in regions:
            # VALID, not POSSIBLE: POSSIBLE takes versions (3.11.7), dates and bare counts for numbers.
            for match in phonenumbers.PhoneNumberMatcher(
                window, region, leniency=phonenumbers.Leniency.VALID
            ):
                if not _DECIMAL.fullmatch(match.raw_string):
                    yield Finding("PHONE", offset + match.start, offset + match.end)


# --- credit card ------------------------------------------------------------------------------
# Runs of digit groups joined by one space or dash; [0-9], not \d, so that Luhn sees ASCII digits.
_DIGIT_RUN = re.compile(r"(?<![\w.])[0-9]+(?:[ -][0-9]+)*(?!\w)")
_DIGIT_GROUP = re.compile(r"[0-9]+")
# Issuers' first digits: Amex, Diners, JCB 3; Visa 4; Mastercard 5 and 2221-2720; Discover, UnionPay 6.
_ISSUER = re.compile(r"[3-6]|2(?:22[1-9]|2[3-9][0-9]|[3-6][0-9]{2}|7[01][0-9]|720)")


def _luhn(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _card_shaped(lengths: list[int]) -> bool:
    """Group lengths as cards are written: one block, 4-4-4-4(-3), or Amex/Diners 4-6-5 and 4-6-4."""
    if not 13 <= sum(lengths) <= 19:
        return False
    if len(lengths) == 1:
        return True
    if lengths[0] != 4:
        return False
    return lengths[1:] in ([6, 4], [6, 5]) or (all(n == 4 for n in lengths[1:-1]) and lengths[-1] <= 4)


def _cards(text: str) -> Iterator[Finding]:
    for run in _DIGIT_RUN.finditer(text):
        groups = [
            (m.start() + run.start(), m.end() + run.start()) for m in _DIGIT_GROUP.finditer(run.group())
        ]
        i = 0
        while i < len(groups):
            # The longest card that starts at group i; a number before or after it is no part of it.
            for j in range(min(len(groups), i + 5) - 1, i - 1, -1):
                digits = "".join(text[start:end] for start, end in groups[i : j + 1])
                if (
                    _card_shaped([end - start for start, end in groups[i : j + 1]])
                    and _ISSUER.match(digits)
                    and _luhn(digits)
                ):
                    yield Finding("CREDIT_CARD", groups[i][0], groups[j][1])
                    i = j
                    break
            i += 1


# --- IP addresses -----------------------------------------------------------------------------
_IPV4 = re.compile(r"(?<![\w.])(?:[0-9]{1,3}\.){3}[0-9]{1,3}(?!\w|\.[0-9])")
# Candidates hold two colons at least; the run is possessive (no backtracking into a prefix that
# happens to parse). `ipaddress` decides, so a time of day (12:30:45) or a MAC address is dropped.
_IPV6 = re.compile(r"(?<![\w:.])(?=[0-9A-Fa-f.]*+:[0-9A-Fa-f.]*+:)[0-9A-Fa-f:.]++(?!\w)")
_HEX = re.compile(r"[0-9A-Fa-f]")


def _ips(text: str) -> Iterator[Finding]:
    for m in _IPV4.finditer(text):
        try:
            ipaddress.IPv4Address(m.group())  # rejects 999.1.1.1 and leading zeros
        except ValueError:
            continue
        yield Finding("IP_ADDRESS", m.start(), m.end())
    for m in _IPV6.finditer(text):
        candidate = m.group().rstrip(".")  # a full stop ending the sentence
        # Four hex digits at least: Python's x[1::2] and a bare "::" are valid IPv6, and not addresses.
        if len(_HEX.findall(candidate)) < 4:
            continue
        try:
            ipaddress.IPv6Address(candidate)
        except ValueError:
            continue
        yield Finding("IP_ADDRESS", m.start(), m.start() + len(candidate))


# --- secrets ----------------------------------------------------------------------------------
# Keys that announce themselves, redacted whole. One alternation: one pass over the text.
_TOKEN = re.compile(
    r"""(?x)
      (?<![\w-])sk-[A-Za-z0-9_-]{20,}                         # OpenAI (sk-, sk-proj-), Anthropic (sk-ant-)
    | (?<!\w)[rs]k_(?:live|test)_[A-Za-z0-9]{16,}             # Stripe
    | (?<![A-Za-z0-9])(?:AKIA|ASIA)[0-9A-Z]{16}(?![A-Za-z0-9])  # AWS access key ID
    | (?<!\w)gh[pousr]_[A-Za-z0-9]{20,}                       # GitHub classic
    | (?<!\w)github_pat_[A-Za-z0-9_]{20,}                     # GitHub fine-grained
    | (?<![\w-])xox[baprs]-[A-Za-z0-9-]{10,}                  # Slack
    | (?<!\w)hf_[A-Za-z0-9]{30,}                              # Hugging Face
    | (?<![\w-])AIza[0-9A-Za-z_-]{35}                         # Google API key
      # JWT: base64url of '{"' is "eyJ"; header, payload, signature (empty when alg is none).
    | (?<![\w-])eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]*
      # PEM private key: base64 lines and headers (Proc-Type: ...) up to the END line, or, cut off,
      # up to the first character that base64 does not use.
    | -----BEGIN[A-Z0-9\ ]*PRIVATE\ KEY[A-Z\ ]*-----
      (?:[A-Za-z0-9+/=]++|[\w-]+:[^\n]*+|\s++)*+
      (?:-----END[A-Z0-9\ ]*PRIVATE\ KEY[A-Z\ ]*-----)?
    """
)
# Credentials after a marker: only the group "v" is redacted, the marker keeps the record readable.
_MARKED = [
    # Bearer token: one digit at least, so that "Bearer authentication" in prose stays.
    re.compile(r"(?i)\bbearer\s+(?P<v>(?=[A-Za-z._~+/-]*[0-9])[A-Za-z0-9._~+/-]{8,}=*)"),
    # URL userinfo, scheme://USER:PASS@host or scheme://TOKEN@host: credentials either way.
    re.compile(r"(?i)\b[a-z][a-z0-9+.-]*://(?P<v>[^\s/@]+)@"),
]
# `name = value`, `"name": "value"`, `NAME=value`, `--name=value`, `name: value`, and JSON inside a
# JSON string (`\"name\": \"value\"`). The name may carry a prefix (db_password, OPENAI_API_KEY,
# x-api-key) but must end at the keyword: max_tokens, token_count and password_hash are not secrets.
_ASSIGNMENT = re.compile(
    r"""(?ix)
    (?<![^\W_])  # the keyword starts the name, or follows its prefix's _ or -
    (?P<name>password|passwd|passphrase|pwd|secret|token|api[_-]?key|apikey|access[_-]?key
       |secret[_-]?key|private[_-]?key|credentials?|authorization)
    (?![\w-])
    (?:\\?["'])?\s*(?:=>|:=|=|:)\s*
    (?:(?:bearer|basic|token)\s+)?  # an Authorization header's scheme
    (?: \\"(?P<escaped>(?:[^"\\\n]|\\[^"\n])+)\\"
      | "(?P<double>(?:[^"\\\n]|\\.)+)"
      | '(?P<single>(?:[^'\\\n]|\\.)+)'
      | (?P<bare>[^\s"',;&)}\]\\]+)
    )
    """
)
_VALUE_GROUPS = ("escaped", "double", "single", "bare")
_NOT_A_VALUE = {"null", "none", "true", "false", "nil", "undefined"}


def _secrets(text: str) -> Iterator[Finding]:
    for m in _TOKEN.finditer(text):
        yield Finding("SECRET", m.start(), m.end())
    for pattern in _MARKED:
        for m in pattern.finditer(text):
            yield Finding("SECRET", m.start("v"), m.end("v"))
    for m in _ASSIGNMENT.finditer(text):
        group = next(g for g in _VALUE_GROUPS if m.group(g) is not None)
        value = m.group(group)
        if value.lower() in _NOT_A_VALUE:
            continue
        if m.group("name").lower() == "token" and value.isdigit():
            continue  # in an inference server's text, token=50256 is a token id
        yield Finding("SECRET", m.start(group), m.end(group))


def _weight(f: Finding) -> tuple[int, int]:
    return f.end - f.start, -_RANK[f.kind]


def _merge(found: list[Finding]) -> list[Finding]:
    """Overlapping findings as one span each, named after the longest finding inside it."""
    found.sort(key=lambda f: (f.start, -f.end))
    merged: list[Finding] = []
    names: list[Finding] = []  # per merged span, the finding that names it
    for f in found:
        if merged and f.start < merged[-1].end:
            if _weight(f) > _weight(names[-1]):
                names[-1] = f
            merged[-1] = Finding(names[-1].kind, merged[-1].start, max(merged[-1].end, f.end))
        else:
            merged.append(f)
            names.append(f)
    return merged


class Redactor:
    """Finds personal data and secrets in text and replaces, hashes or keeps it (see the module doc)."""

    def __init__(
        self,
        mode: Mode = "redact",
        extra_patterns: Sequence[str] = (),
        hash_key: bytes | None = None,
    ):
        if mode not in get_args(Mode):
            raise UserError(f"redaction mode {mode!r} is unknown; use one of {', '.join(get_args(Mode))}")
        self.mode = mode
        self.hash_key = hash_key
        self.extra: list[re.Pattern[str]] = []
        for pattern in extra_patterns:
            try:
                self.extra.append(re.compile(pattern))
            except re.error as e:
                raise UserError(
                    f"redaction pattern {pattern!r} is not a valid regular expression: {e}"
                ) from e

    def findings(self, text: str) -> list[Finding]:
        """What would be redacted: non-overlapping spans, in order."""
        found = [*_secrets(text), *_cards(text), *_ips(text), *_emails(text)]
        found += list(_phones(text, taken=found))  # last: it skips what the others took
        return _merge(found + self._custom(text))

    def identifier_findings(self, identifier: str) -> list[Finding]:
        """What makes an identifier a client chose (its `x-request-id`) unfit to keep: a secret, an
        e-mail address or a match of the operator's own patterns. Not the phone, card and IP
        detectors: IDs are runs of digits, dots and dashes by nature, and those would take many for
        personal data (`oc-0522946802` reads as a phone number, `build-1.2.3.4` as an address)."""
        return _merge([*_secrets(identifier), *_emails(identifier), *self._custom(identifier)])

    def _custom(self, text: str) -> list[Finding]:
        return [
            Finding("CUSTOM", m.start(), m.end()) for pattern in self.extra for m in pattern.finditer(text) if m.end() > m.start()
        ]

    def redact(self, text: str | None) -> str | None:
        if text is None or self.mode == "none":
            return text
        if self.mode == "hash":
            return self._digest(text)
        pieces = []
        at = 0
        for f in self.findings(text):
            pieces += [text[at : f.start], f"<{f.kind}>"]
            at = f.end
        pieces.append(text[at:])
        return "".join(pieces)

    def _digest(self, text: str) -> str:
        data = text.encode()
        if self.hash_key is None:
            return "sha256:" + hashlib.sha256(data).hexdigest()
        return "sha256:" + hmac.new(self.hash_key, data, hashlib.sha256).hexdigest()
