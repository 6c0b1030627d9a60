"""Redaction: planted PII and secrets never survive; ordinary text passes untouched."""

import hashlib
import hmac
import re
import time

import pytest

from verispec.audit.redact import Finding, Redactor
from verispec.errors import UserError

# Fake keys are assembled from pieces so that secret scanners do not flag this file.
OPENAI_KEY = "sk-" + "proj-" + "Xq7vB2nR9tLm4KpW8sYz3HcD6fGj1aE5uQ0o"
ANTHROPIC_KEY = "sk-" + "ant-api03-" + "Zr8Nw2Kq5Lx9Vb3Hm7Tc1Fy6Pd4Gs0Ju"
AWS_KEY_ID = "AKIA" + "IOSFODNN7EXAMPLE"  # AWS's documented example ID
GITHUB_TOKEN = "ghp_" + "a1B2c3D4e5F6g7H8i9J0" + "k1L2m3N4o5P6"
GITHUB_PAT = "github_pat_" + "11ABCDEFG0123456789_" + "abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOP"
SLACK_TOKEN = "xoxb-" + "1234567890-1234567890123-" + "AbCdEfGhIjKlMnOpQrStUvWx"
HF_TOKEN = "hf_" + "AbCdEfGhIjKlMnOpQrStUvWxYz01234567"
JWT = (
    "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9"
    + ".eyJzdWIiOiIxMjM0NTY3ODkwIiwibmFtZSI6IkpvaG4gRG9lIiwiaWF0IjoxNTE2MjM5MDIyfQ"
    + ".SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c"
)
PEM_BODY = (
    "MIIEowIBAAKCAQEAu1SU1LfVLPHCozMxH2Mo4lgOEePzNm0tRgeLezV6ffAt0gun",
    "VTLw7onLRnrq0/IzW7yWR7QkrmBL7jTKEn5u+qKhbwKfBstIs+bMY2Zkp18gnTxK",
)
PEM = "-----BEGIN RSA " + "PRIVATE KEY-----\n" + "\n".join(PEM_BODY) + "\n-----END RSA " + "PRIVATE KEY-----"

# (text, the planted values that must not survive, the placeholder that must appear)
PLANTED = {
    "email": [
        ("# TODO(jane.doe@example.com): drop this retry once the proxy is fixed", ["jane.doe@example.com"]),
        (
            '{"user": {"id": 17, "email": "j.smith+billing@mail.example.co.uk"}}',
            ["j.smith+billing@mail.example.co.uk"],
        ),
        ("2024-05-01T12:00:03Z INFO login ok user=ops-team@corp.example.org", ["ops-team@corp.example.org"]),
        (
            "Write a polite reply to jürgen.müller@beispiel.de about the late invoice.",
            ["jürgen.müller@beispiel.de"],
        ),
        ('<a href="mailto:support@example.io">support</a>', ["support@example.io"]),
    ],
    "phone": [
        ("Call me at +1 (415) 555-0132 tomorrow morning.", ["+1 (415) 555-0132", "555-0132"]),
        ("2024-05-01 WARN sms failed callback_number=415-555-0132 retry=3", ["415-555-0132"]),
        ('{"name": "London office", "phone": "+44 20 7946 0958"}', ["+44 20 7946 0958", "7946 0958"]),
        ("# Berlin support line: +49 30 901820 (weekdays only)", ["+49 30 901820", "901820"]),
        ("Réservez au +33 1 42 68 53 00 ou au 01 42 68 53 00.", ["42 68 53 00"]),
        ("Ring the front desk on 020 7946 0958 or (415) 555-0199.", ["7946 0958", "555-0199"]),
        ('<a href="tel:+12025550173">call</a>', ["+12025550173", "2025550173"]),
    ],
    "credit_card": [
        ("My card is 4111 1111 1111 1111, exp 12/27, can you check the charge?", ["4111 1111 1111 1111"]),
        ("2024-05-01 ERROR payment declined card=5555-5555-5555-4444 amount=12.50", ["5555-5555-5555-4444"]),
        ('{"card_number": "378282246310005", "cvc": "123"}', ["378282246310005"]),
        ("Amex as printed: 3782 822463 10005.", ["3782 822463 10005", "822463"]),
        ('test_card = "6011111111111117"  # Discover, from the sandbox docs', ["6011111111111117"]),
        ("Mastercard 2-series: 2223 0031 2200 3222", ["2223 0031 2200 3222"]),
    ],
    "ip_address": [
        ("2024-05-01 INFO connect from 10.0.0.12:51234 accepted", ["10.0.0.12"]),
        ('{"client_ip": "192.168.1.20", "status": 200}', ["192.168.1.20"]),
        ("The server listens on 2001:db8:85a3::8a2e:370:7334 now.", ["2001:db8:85a3::8a2e:370:7334"]),
        ('BASE_URL = "http://[2001:db8::1]:8080/v1"  # staging', ["2001:db8::1"]),
        (
            "link-local fe80::1ff:fe23:4567:890a%eth0, mapped ::ffff:192.0.2.128",
            ["fe80::1ff:fe23:4567:890a", "192.0.2.128"],
        ),
        ("Why does ping to 203.0.113.7 time out?", ["203.0.113.7"]),
    ],
    "secret": [
        (f'client = OpenAI(api_key="{OPENAI_KEY}")', [OPENAI_KEY, OPENAI_KEY[10:]]),
        (f"export ANTHROPIC_API_KEY={ANTHROPIC_KEY}", [ANTHROPIC_KEY]),
        (f"Here is my key, why does it fail? {OPENAI_KEY}", [OPENAI_KEY]),
        (f"[default]\naws_access_key_id = {AWS_KEY_ID}\n", [AWS_KEY_ID]),
        (f"git clone https://{GITHUB_TOKEN}@github.com/acme/app.git", [GITHUB_TOKEN]),
        (f"GH_TOKEN: {GITHUB_PAT}", [GITHUB_PAT]),
        (f'slack = WebClient(token="{SLACK_TOKEN}")', [SLACK_TOKEN]),
        (f"huggingface-cli login --token {HF_TOKEN}", [HF_TOKEN]),
        (
            'curl -H "Authorization: Bearer abc123def456ghi789jkl" https://api.example.com',
            ["abc123def456ghi789jkl"],
        ),
        (f"2024-05-01 DEBUG auth header={JWT[:20]}... full: {JWT}", [JWT, JWT.split(".")[1]]),
        (f"Can you tell what is wrong with this key?\n{PEM}\nThanks!", list(PEM_BODY)),
        (f"-----BEGIN OPENSSH PRIVATE KEY-----\n{PEM_BODY[0]}\n(cut off)", [PEM_BODY[0]]),
        ("2024-05-01 ERROR db connect failed: password=hunter2 user=app", ["hunter2"]),
        ('{"api_key": "k-12345-abcdef", "model": "tiny"}', ["k-12345-abcdef"]),
        ("database:\n  host: db.internal\n  secret: s3cr3tValue!\n", ["s3cr3tValue!"]),
        ("requests.get(url, params={'token': 'tok_abc123XYZ'})", ["tok_abc123XYZ"]),
        ("DATABASE_URL=postgres://app:Pa55word@db.internal:5432/prod", ["Pa55word"]),
        ('log: {"body": "{\\"client_secret\\": \\"cs-9f8e7d\\", \\"n\\": 1}"}', ["cs-9f8e7d"]),
        ("./deploy --db-password='correct horse battery' --verbose", ["correct horse battery", "horse"]),
        ("X-API-Key: live_0f3a9c77b2", ["live_0f3a9c77b2"]),
    ],
}
PLACEHOLDER = {
    "email": "<EMAIL>",
    "phone": "<PHONE>",
    "credit_card": "<CREDIT_CARD>",
    "ip_address": "<IP_ADDRESS>",
    "secret": "<SECRET>",
}
CASES = [
    pytest.param(kind, text, planted, id=f"{kind}-{i}")
    for kind, cases in PLANTED.items()
    for i, (text, planted) in enumerate(cases)
]

UNTOUCHED = [
    "The answer is 42, and the total came to 1234567 tokens.",
    "Python 3.11.7 with torch 2.13.0 and transformers 5.0.1",
    "Released on 2024-01-15 at 12:30:45, see 12/31/2024.",
    "order 4111 1111 1111 1112 shipped",  # card-shaped, fails Luhn
    "id=4111111111111112",  # 16 digits, fails Luhn
    "ticket 1234 5678 9012 3456",  # 16 digits, fails Luhn
    "x = 1234\ny = x * 2\nprint(x[1::2], y)",
    "for (std::size_t i = 0; i < n; ++i) {}",
    '{"max_tokens": 256, "temperature": 0.7, "top_p": 0.95, "seed": 123456789}',
    "token=50256 token_count=12 tokens: 512 num_tokens = 3",
    "the bearer of bad news; Bearer authentication is described in RFC 6750",
    "MAC 00:1a:2b:3c:4d:5e, timestamp 1700000000, pi 3.14159265358979",
    "The password is stored hashed; rotate the secret monthly.",
    "see https://example.com/docs#section-2 and @decorator usage",
    "firmware v1.2.3.4, price $1,234,567.89, 0.123456789",
    "short sk-abc and AKIA123 are not keys",
]


@pytest.fixture(scope="module")
def redactor():
    return Redactor()


@pytest.mark.parametrize("kind, text, planted", CASES)
def test_planted_values_never_survive(redactor, kind, text, planted):
    out = redactor.redact(text)
    for value in planted:
        assert value not in out, f"{value!r} survived: {out!r}"
    assert PLACEHOLDER[kind] in out


@pytest.mark.parametrize("text", UNTOUCHED)
def test_ordinary_text_is_untouched(redactor, text):
    assert redactor.findings(text) == []
    assert redactor.redact(text) == text


def test_secret_assignment_keeps_the_name(redactor):
    assert redactor.redact("password=hunter2 user=app") == "password=<SECRET> user=app"
    assert redactor.redact('{"api_key": "abc123"}') == '{"api_key": "<SECRET>"}'
    assert redactor.redact("Authorization: Bearer abc123def456") == "Authorization: Bearer <SECRET>"


def test_context_around_findings_is_kept(redactor):
    text = "Mail jane@example.com or call +1 (415) 555-0132; card 4111 1111 1111 1111."
    assert redactor.redact(text) == "Mail <EMAIL> or call <PHONE>; card <CREDIT_CARD>."


def test_every_kind_at_once():
    text = "\n".join(text for cases in PLANTED.values() for text, _ in cases)
    text += "\nbadge EMP-004217 for the visitor"
    out = Redactor(extra_patterns=[r"EMP-\d{6}"]).redact(text)
    planted = [value for cases in PLANTED.values() for _, values in cases for value in values]
    survivors = [value for value in planted + ["EMP-004217"] if value in out]
    assert survivors == []
    for placeholder in [*PLACEHOLDER.values(), "<CUSTOM>"]:
        assert placeholder in out


def test_findings_are_sorted_and_disjoint(redactor):
    text = "\n".join(text for cases in PLANTED.values() for text, _ in cases)
    found = redactor.findings(text)
    assert all(isinstance(f, Finding) for f in found)
    assert all(a.end <= b.start for a, b in zip(found, found[1:], strict=False))
    assert {f.kind for f in found} == {"EMAIL", "PHONE", "CREDIT_CARD", "IP_ADDRESS", "SECRET"}


def test_overlapping_findings_merge_and_the_longest_names_them():
    # The custom pattern covers part of the address: one span, named after the longer finding.
    redactor = Redactor(extra_patterns=[r"jane\.doe"])
    assert redactor.findings("to jane.doe@example.com!") == [Finding("EMAIL", 3, 23)]
    assert redactor.redact("to jane.doe@example.com!") == "to <EMAIL>!"
    # A custom pattern longer than the address wins, and nothing of either survives.
    redactor = Redactor(extra_patterns=[r"contact: \S+"])
    assert redactor.redact("contact: jane.doe@example.com") == "<CUSTOM>"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("badge EMP-004217 checked in", "badge <CUSTOM> checked in"),
        ('{"employee": "EMP-123456", "desk": 12}', '{"employee": "<CUSTOM>", "desk": 12}'),
        ("EMP-12345 has five digits only", "EMP-12345 has five digits only"),
    ],
)
def test_extra_patterns(text, expected):
    assert Redactor(extra_patterns=[r"EMP-\d{6}\b"]).redact(text) == expected


def test_extra_pattern_that_matches_empty_is_ignored():
    assert Redactor(extra_patterns=[r"x*"]).redact("abc") == "abc"


def test_bad_extra_pattern_is_a_user_error():
    with pytest.raises(UserError, match="not a valid regular expression"):
        Redactor(extra_patterns=["EMP-(\\d"])


def test_unknown_mode_is_a_user_error():
    with pytest.raises(UserError, match="mode"):
        Redactor(mode="mask")  # type: ignore[arg-type]


def test_hash_mode_is_deterministic_keyed_and_keeps_no_plaintext():
    text = "Call +1 (415) 555-0132 or mail jane.doe@example.com"
    keyed = Redactor(mode="hash", hash_key=b"k1")
    out = keyed.redact(text)
    assert re.fullmatch(r"sha256:[0-9a-f]{64}", out)
    assert out == keyed.redact(text)
    assert out == "sha256:" + hmac.new(b"k1", text.encode(), hashlib.sha256).hexdigest()
    assert out != Redactor(mode="hash", hash_key=b"k2").redact(text)
    assert out != keyed.redact(text + " ")
    for value in ["555-0132", "jane.doe", "example.com"]:
        assert value not in out


def test_hash_mode_without_key_is_plain_sha256():
    assert Redactor(mode="hash").redact("abc") == "sha256:" + hashlib.sha256(b"abc").hexdigest()


def test_none_mode_keeps_the_text():
    text = "mail jane.doe@example.com, password=hunter2"
    assert Redactor(mode="none").redact(text) == text


@pytest.mark.parametrize("mode", ["redact", "hash", "none"])
def test_none_passes_through(mode):
    assert Redactor(mode=mode).redact(None) is None


def test_empty_text(redactor):
    assert redactor.redact("") == ""
    assert redactor.findings("") == []


@pytest.mark.parametrize(
    "text",
    [
        "a" * 20_000 + "@",
        "a@" + "b" * 20_000,
        "1 " * 10_000,
        "1." * 10_000,
        ":" * 10_000 + "1",
        "password=" * 2_000,
        "-----BEGIN RSA PRIVATE KEY-----" * 500,
        "x_" * 10_000,
    ],
    ids=[
        "local-part",
        "domain",
        "digit-wall",
        "dotted",
        "colons",
        "assignments",
        "pem-headers",
        "underscores",
    ],
)
def test_pathological_inputs_finish_quickly(redactor, text):
    # A regular expression that backtracks would take seconds to minutes on these.
    start = time.perf_counter()
    redactor.redact(text)
    assert time.perf_counter() - start < 2.0


def test_the_cover_of_findings_answers_as_the_quadratic_scan_did():
    """`_phones` skips spans inside earlier findings; the bisect answers exactly as checking each finding."""
    import random

    from verispec.audit.redact import Finding, _Cover

    rng = random.Random(5)
    for _ in range(200):
        findings = []
        for _ in range(rng.randrange(0, 12)):
            start = rng.randrange(0, 100)
            findings.append(Finding("EMAIL", start, start + rng.randrange(1, 30)))
        cover = _Cover(findings)
        for _ in range(30):
            start = rng.randrange(0, 110)
            end = start + rng.randrange(1, 20)
            assert cover.covers(start, end) == any(f.start <= start and end <= f.end for f in findings)


@pytest.mark.parametrize(
    "identifier, kinds",
    [
        ("oc-0522946802", []),  # a phone number to the phone detector; an ID here
        ("4111111111111111", []),  # a card number by Luhn
        ("build-10.1.2.3", []),  # an IP address
        ("sk-proj-" + "Zq7" * 12, ["SECRET"]),
        ("AKIAIOSFODNN7EXAMPLE", ["SECRET"]),
        ("EMP-123456", ["CUSTOM"]),  # the operator's own pattern
    ],
)
def test_identifiers_are_checked_for_secrets_emails_and_custom_patterns_only(identifier, kinds):
    redactor = Redactor(extra_patterns=[r"EMP-\d{6}"])
    assert [f.kind for f in redactor.identifier_findings(identifier)] == kinds
    assert [f.kind for f in redactor.identifier_findings("mallory@example.com")] == ["EMAIL"]
