"""The Guard: what every request passes before any route runs, and what every response gets.

It refuses a request whose Host header is not one of the server's names (DNS rebinding),
whose Origin is another site (a browser's cross-site POST), or whose body exceeds 64 KiB
(counted as it arrives, chunked or not). Every response, the Guard's own refusals included,
carries nosniff, X-Frame-Options and Referrer-Policy.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from starlette.datastructures import Headers

from t2v.serve.schemas import error_response

MAX_BODY = 64 * 1024
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
_DEFAULT_PORT = {"http": 80, "https": 443}


def hostname(host: str) -> str:
    """The name in a Host header, lower-case, without port or IPv6 brackets."""
    if host.startswith("["):  # [::1]:8000
        return host[1:].partition("]")[0].lower()
    return (host.rpartition(":")[0] if host.count(":") == 1 else host).lower()


def _origin_tuple(url: str) -> tuple[str, str | None, int | None]:
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port or _DEFAULT_PORT.get(parts.scheme)


def same_origin(origin: str, ours: list[str]) -> bool:
    """Whether `origin` is one of the server's own origins (scheme, host and port)."""
    try:
        return _origin_tuple(origin) in [_origin_tuple(url) for url in ours]
    except ValueError:  # a malformed port
        return False


class Guard:
    """ASGI middleware: Host and Origin checks, the body cap, and headers for every response.

    `public_urls` are origins the page is also served from behind a proxy (say
    https://t2v.example.org), as `--public-url` gives them: a browser there sends that Origin
    while the request reaches this server as plain http.
    """

    def __init__(self, app, allowed_hosts: frozenset[str], public_urls: tuple[str, ...] = ()):
        self.app, self.allowed_hosts, self.public_urls = app, allowed_hosts, public_urls

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        headers = Headers(scope=scope)
        host, origin = headers.get("host", ""), headers.get("origin")
        refusal = None
        if hostname(host) not in self.allowed_hosts:
            refusal = error_response(
                403,
                f"The Host '{host[:100]}' is not a name of this server; add it"
                " with --allowed-host if it should be.",
            )
        elif origin is not None and not same_origin(
            origin, [f"{scope['scheme']}://{host}", *self.public_urls]
        ):
            refusal = error_response(
                403,
                f"Requests from the web origin '{origin[:100]}' are refused;"
                " use the page this server serves (behind a proxy, name its address"
                " with --public-url).",
            )
        elif not headers.get("content-length", "0").isdigit():
            refusal = error_response(422, "The Content-Length header is not a number.")
        elif int(headers.get("content-length", "0")) > MAX_BODY:
            refusal = _too_large()
        if refusal is not None:
            return await refusal(scope, receive, send_with_headers)

        body, more = bytearray(), True
        while more:  # read it all (it is small), counting what arrives, not what was declared
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > MAX_BODY:
                return await _too_large()(scope, receive, send_with_headers)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send_with_headers)


def _too_large():
    return error_response(
        422, f"The request body is over {MAX_BODY // 1024} KiB; send a shorter prompt."
    )
