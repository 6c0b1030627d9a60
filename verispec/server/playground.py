"""The playground: a web page at `/playground` that streams a completion with `provisional: true`,
so that speculation shows: each round's drafts in a muted style as soon as they are proposed,
turning solid or vanishing at the verifier's verdict, with a strip of proposed and accepted counts
per round and the request's figures.

The page is three static files shipped in the package (`static/`), with no build step and no
third-party requests. It calls the server's own OpenAI endpoints with the API key its user types;
`/playground/info` (behind the same key) tells it the model's name, whether the model has a chat
template and which proposers a request may pin. The page escapes generated text by construction
(it only ever sets `textContent`), and every response of the page carries a Content-Security-Policy
that allows this origin's script, styles and connections, and nothing else.

`--playground auto` (the default) serves it unless API keys are configured; `on` and `off` decide
regardless.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from importlib import resources

from fastapi import APIRouter, Depends, Request
from fastapi.responses import RedirectResponse, Response

from verispec.server.auth import KeyRing
from verispec.server.serving import Serving

CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",
}
_FILES = {  # path under /playground: (file in static/, media type)
    "": ("playground.html", "text/html; charset=utf-8"),
    "playground.js": ("playground.js", "text/javascript; charset=utf-8"),
    "playground.css": ("playground.css", "text/css; charset=utf-8"),
}


def playground_enabled(setting: str, keys: KeyRing) -> bool:
    """`--playground`: on, off, or auto (on unless the server asks for API keys)."""
    return setting == "on" or (setting == "auto" and not keys.enabled)


Authorize = Callable[[Request], Awaitable[str]]


def playground_routes(*, serving: Serving, model_name: str, authorize: Authorize) -> APIRouter:
    router = APIRouter(include_in_schema=False)  # a page, not part of the API
    static = resources.files("verispec.server") / "static"
    pages = {path: (static.joinpath(name).read_bytes(), media) for path, (name, media) in _FILES.items()}

    def page(path: str) -> Response:
        body, media = pages[path]
        return Response(body, media_type=media, headers=_HEADERS)

    @router.get("/")
    async def root() -> Response:
        return RedirectResponse("/playground", status_code=307)

    @router.get("/playground")
    async def playground() -> Response:
        return page("")

    @router.get("/playground/playground.js")
    async def script() -> Response:
        return page("playground.js")

    @router.get("/playground/playground.css")
    async def styles() -> Response:
        return page("playground.css")

    @router.get("/playground/info")
    async def info(key_id: str = Depends(authorize)) -> dict:
        """What the page offers: chat only where the model has a chat template, the proposers a
        request may pin (`proposer`), and the one an unpinned request gets (None: chosen per
        request, by the bandit or the canary's split)."""
        service = serving.ready()
        choice = service.router
        per_request = choice.bandit is not None or choice.canary is not None
        return {
            "model": model_name,
            "chat": bool(getattr(service.tokenizer, "chat_template", None)),
            "proposers": sorted(choice.proposers),
            "default_proposer": None if per_request else choice.current,
        }

    return router
