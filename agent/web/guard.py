"""The page's guard, an ASGI middleware around the whole application: every request passes here first.

- Body limits: ``web.max_upload_bytes`` for /api/inspect, 4 KiB for anything else, by the declared
  Content-Length and by counting what arrives (chunked bodies), before the application sees a byte.
- A page on loopback answers only to a loopback ``Host:`` (no DNS rebinding from a web site); a POST
  from another origin is refused.
- With a token (``web.token_file``) every path but the probes needs the session cookie that /login
  sets (derived from the token, HttpOnly, SameSite=Strict) or ``Authorization: Bearer TOKEN``.
- Security headers on every answer (CSP without inline script, no framing, no sniffing, no-store).
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Any, Callable

from starlette.responses import JSONResponse, RedirectResponse, Response

from agent.web.settings import WebSettings

SMALL_BODY = 4096
COOKIE = "coilsight_page"
OPEN_PATHS = ("/healthz", "/readyz", "/login", "/static/style.css")
SECURITY_HEADERS = [
    (b"content-security-policy", b"default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                 b"connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'"),
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
    (b"cache-control", b"no-store"),
]
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "[::1]", "::1"}

def same(given: str, expected: str) -> bool:
    """Constant-time comparison of what a request carries (any characters) with a secret."""
    return hmac.compare_digest(given.encode("utf-8", "surrogateescape"), expected.encode("utf-8"))


def session_value(token: str) -> str:
    """The cookie a browser holds after the token form: derived from the token, not the token."""
    return hmac.new(token.encode(), b"coilsight-web-session-v1", hashlib.sha256).hexdigest()


class Guard:
    """ASGI middleware: body limits, the Host check on loopback, the token, security headers."""

    def __init__(self, app: Any, settings: WebSettings):
        self.app = app
        self.s = settings
        self.session = session_value(settings.token) if settings.token else None

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}

        async def send_secure(message: dict) -> None:
            if message["type"] == "http.response.start":
                have = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in have]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        problem = self._refuse(scope, path, headers)
        if problem is not None:
            await problem(scope, receive, send_secure)
            return
        limit = self.s.max_upload_bytes if path == "/api/inspect" else SMALL_BODY
        declared = headers.get("content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > limit):
            await error_response(413, f"request body over {limit} bytes" if declared.isdigit() else "bad Content-Length")(
                scope, receive, send_secure)
            return
        # The whole body is read here, counted, before the app sees a byte of it (chunked bodies too).
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away
            size += len(message.get("body", b""))
            if size > limit:
                await error_response(413, f"request body over {limit} bytes")(scope, receive, send_secure)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        replayed = False

        async def buffered_receive() -> dict:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            return await receive()

        await self.app(scope, buffered_receive, send_secure)

    def _refuse(self, scope: dict, path: str, headers: dict) -> Response | None:
        host = headers.get("host", "")
        name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
        if self.s.loopback and name not in LOOPBACK_HOSTS:
            # a page on loopback answers only to loopback names: no DNS rebinding from a web site
            return error_response(421, f"this page answers on localhost only, not {host!r}")
        if scope["method"] == "POST" and "origin" in headers:
            origin = headers["origin"].split("://", 1)[-1]
            if origin != host:
                return error_response(403, "cross-origin POST refused")
        if self.session is None or path in OPEN_PATHS:
            return None
        cookies = {}
        for part in headers.get("cookie", "").split(";"):
            k, _, v = part.strip().partition("=")
            cookies[k] = v
        bearer = headers.get("authorization", "")
        if same(cookies.get(COOKIE, ""), self.session) or (
                bearer.startswith("Bearer ") and same(bearer[7:], self.s.token or "")):
            return None
        if path == "/" and scope["method"] == "GET":
            return RedirectResponse("/login", status_code=303)
        return error_response(401, "this page needs its access token: open /login")


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"ok": False, "error": message}, status_code=status)
