"""The playground page (`/playground`) in a real browser: Debian's Chromium, driven by Playwright,
against a real `verispec serve` of the demo pair that asks for an API key and has the page turned
on. Where to serve the page at all (`--playground`) is checked in process, without a browser.

`VERISPEC_SCREENSHOT=PATH` saves a picture of the page after a streamed answer (the README's)."""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from tests.serving import ServerProcess
from verispec.config import Settings
from verispec.server.app import create_app
from verispec.server.playground import CONTENT_SECURITY_POLICY

KEY = "playground-test-key"
MODEL = "verispec-demo-code"
PROMPT = "class Stack:\n    def __init__(self):\n"
CHROMIUM = os.environ.get("VERISPEC_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync",
]  # fmt: skip
WAIT_MS = 60_000  # a streamed answer on a busy 2-core machine


@pytest.mark.parametrize(
    ("api_keys", "setting", "served"),
    [
        (None, "auto", True),
        ("k", "auto", False),
        ("k", "on", True),
        (None, "off", False),
        ("k", "off", False),
    ],
)
def test_the_page_is_off_with_api_keys_unless_enabled(api_keys, setting, served):
    app = create_app(Settings(api_keys=api_keys, playground=setting, audit_url="none"))
    client = TestClient(app)  # no lifespan: the routes answer without loading the models
    page = client.get("/playground")
    assert page.status_code == (200 if served else 404)
    root = client.get("/", follow_redirects=False)
    assert root.status_code == (307 if served else 404)
    if served:
        assert root.headers["location"] == "/playground"
        for path in ("/playground", "/playground/playground.js", "/playground/playground.css"):
            assert client.get(path).headers["content-security-policy"] == CONTENT_SECURITY_POLICY


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc = ServerProcess(
        ["--api-keys", KEY, "--playground", "on", "--max-running", "2"],
        log_dir=tmp_path_factory.mktemp("playground"),
    ).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playground tests need Playwright (pip)")
    if not (Path(CHROMIUM).is_file() or shutil.which(CHROMIUM)):
        pytest.skip(f"no browser at {CHROMIUM}: install Debian's chromium (.ci/run does)")
    with sync_api.sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except sync_api.Error as exc:
            pytest.skip(f"Chromium at {CHROMIUM} does not start under Playwright: {str(exc).splitlines()[0]}")
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1000, "height": 700})
    page = context.new_page()
    page.requests = []
    page.on("request", lambda request: page.requests.append(request.url))
    page.problems = []  # policy violations and script errors
    page.on("console", lambda m: "Content Security Policy" in m.text and page.problems.append(m.text))
    page.on("pageerror", lambda exc: page.problems.append(str(exc)))
    page.set_default_timeout(WAIT_MS)
    yield page
    context.close()


def open_page(page, server, key: str = KEY):
    from playwright.sync_api import expect

    response = page.goto(server.url + "/playground")
    assert response.status == 200
    page.fill("#key", key)
    page.locator("#key").dispatch_event("change")
    if key == KEY:
        expect(page.locator("#model")).to_have_text(f"model {MODEL}")
    return response


def record_spans(page) -> None:
    """Every element added to the output, in order: [class, round]."""
    page.evaluate("""() => {
        window.added = [];
        new MutationObserver((changes) => {
            for (const change of changes)
                for (const node of change.addedNodes)
                    if (node.nodeType === 1) window.added.push([node.className, node.dataset.round ?? null]);
        }).observe(document.getElementById("answer"), { childList: true });
    }""")


def generate(page) -> None:
    from playwright.sync_api import expect

    page.click("#generate")
    expect(page.locator("body[data-state=done]")).to_be_attached(timeout=WAIT_MS)


def test_the_page_loads_under_its_policy_and_asks_only_its_own_server(page, server):
    from playwright.sync_api import expect

    response = open_page(page, server)
    assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "default-src 'none'" in CONTENT_SECURITY_POLICY and "script-src 'self'" in CONTENT_SECURITY_POLICY
    expect(page.locator("#proposer option[value=draft]")).to_be_attached()  # the script ran under the policy
    # The demo pair has no chat template, so the page offers no chat.
    expect(page.locator("#endpoint option[value=chat]")).to_be_disabled()
    assert all(url.startswith(server.url) or url.startswith("data:") for url in page.requests), page.requests
    assert not page.problems, page.problems


def test_a_prompt_streams_drafts_then_verdicts_and_ends_with_the_greedy_answer(page, server):
    from playwright.sync_api import expect

    open_page(page, server)
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", "64")
    # Drafts every round: depth auto may find verifier-only cheaper on a busy machine.
    page.select_option("#depth", "4")
    record_spans(page)
    generate(page)

    # The same request, not streamed, verifier only: speculation is exact at any depth.
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 64, "temperature": 0, "top_p": 1, "depth": 0}
    auth = {"Authorization": f"Bearer {KEY}"}
    reply = httpx.post(server.url + "/v1/completions", json=body, headers=auth, timeout=60)
    expected = reply.json()["choices"][0]["text"]
    assert page.locator("#answer").text_content() == expected
    expect(page.locator("#error")).to_be_hidden()

    added = page.evaluate("window.added")
    drafts = [(i, r) for i, (kind, r) in enumerate(added) if kind == "draft"]
    verified = [(i, r) for i, (kind, r) in enumerate(added) if kind in ("accepted", "verifier")]
    assert drafts and verified, added
    assert any(kind == "accepted" for kind, _ in added), added  # the demo draft gets some right
    for index, round_ in drafts:  # each round's drafts show before its verified text
        after = [i for i, r in verified if r == round_]
        assert after and min(after) > index, (round_, added)
    expect(page.locator("#answer .draft")).to_have_count(0)  # every draft turned solid or vanished

    bars = page.locator("#rounds .round")
    assert bars.count() > 0
    assert all(bars.nth(i).get_attribute("data-accepted") is not None for i in range(bars.count()))
    expect(page.locator("#f-proposer")).to_have_text("draft")
    expect(page.locator("#f-acceptance")).to_have_text(re.compile(r"^\d+%$"))
    expect(page.locator("#f-finish")).to_have_text("length")
    assert float(page.locator("#f-per-call").text_content()) >= 1.0
    assert not page.problems, page.problems

    if screenshot := os.environ.get("VERISPEC_SCREENSHOT"):
        page.screenshot(path=screenshot)


def test_a_wrong_key_shows_the_apis_401_message(page, server):
    from playwright.sync_api import expect

    open_page(page, server, key="not-the-key")
    generate(page)
    expect(page.locator("#error")).to_be_visible()
    expect(page.locator("#error")).to_contain_text("Error 401 (invalid_api_key): invalid API key")
    expect(page.locator("#answer")).to_have_text("")


def test_generated_markup_is_shown_as_text(page, server):
    from playwright.sync_api import expect

    markup = "<script>document.title='pwned'</script><img src=x onerror=\"document.title='pwned'\">"
    open_page(page, server)
    page.fill("#prompt", "html = '")
    page.click("details summary")
    # A regular expression the model must follow: the output is this markup, through the real path.
    regex = markup.replace(".", r"\.")  # the model must follow it: the markup comes out of the real path
    page.fill("#extra", json.dumps({"response_format": {"type": "regex", "regex": regex}, "max_tokens": 80}))
    generate(page)
    expect(page.locator("#error")).to_be_hidden()
    assert page.locator("#answer").text_content() == markup
    expect(page.locator("#output script, #output img")).to_have_count(0)
    assert page.title() == "verispec playground"
    assert not page.problems, page.problems
