"""What the web app refuses, and where Gradio keeps the files that pass through it.

- **Foreign Host headers.** A page on any web site can make the browser send requests to
  ``127.0.0.1:7860`` under its own name ("DNS rebinding": ``evil.example`` first resolves to the
  attacker, then to 127.0.0.1), and then read the answers as its own. The browser always sends
  the name the page used in the ``Host`` header, so the app answers only to the names it is
  reached by: the address it is bound to, the loopback names, and the names given with
  ``--allowed-host``. Bound to every interface (``0.0.0.0``), it also answers to any IP address:
  a rebinding page always uses a name.
- **Password guessing.** With a password set, a client (an IP address) that failed to log in
  ``max_failures`` times within ``window`` seconds is refused until the oldest of those failures
  is that old.
- **Gradio's file cache.** Uploads and downloads (exported packs) go through Gradio's cache:
  it is kept under the data root (``<home>/cache/``), emptied when the app starts and stops,
  and files older than an hour are removed while it runs.

Both checks sit in one pure ASGI middleware (:class:`WebGuard`) that wraps the whole Gradio app:
the page, the API, file downloads and the login route. Starlette's ``TrustedHostMiddleware`` is
not used because it answers "Invalid host header" without saying what to do, and cannot accept
"any IP address" for an app bound to every interface.
"""

from __future__ import annotations

import logging
import math
import os
import re
import shutil
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from engram_app.settings import Settings, is_ip_address

log = logging.getLogger(__name__)

LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})
WILDCARD_ADDRESSES = frozenset({"0.0.0.0", "::", ""})
# Letters, digits, dots, hyphens (a DNS name or an IPv4 address), or an IPv6 address's hex and colons.
_HOST_NAME = re.compile(r"^[a-z0-9.\-_]+$|^[0-9a-f:.]+$")
LOGIN_PATHS = frozenset({"/login", "/login/"})
CACHE_DIR_NAME = "cache"
# Gradio's delete_cache: every 10 minutes, remove the cached files older than an hour.
CACHE_CLEANUP = (600, 3600)


def host_name(header: str | None) -> str | None:
    """The name in a ``Host`` header (``name``, ``name:port``, ``[v6]:port``), lower case; None if malformed."""
    if not header or any(c in header for c in "/?#@\\"):
        return None
    try:
        parts = urlsplit(f"//{header.strip()}")
        parts.port  # noqa: B018 (raises ValueError for a port that is not a number)
    except ValueError:
        return None
    name = (parts.hostname or "").rstrip(".")
    return name if name and _HOST_NAME.match(name) else None


@dataclass(frozen=True)
class HostPolicy:
    """The names the app answers to (see the module docstring for why)."""

    names: frozenset[str]
    any_ip_address: bool = False

    @classmethod
    def for_settings(cls, settings: Settings) -> HostPolicy:
        bound = settings.host.strip("[]").lower()
        wildcard = bound in WILDCARD_ADDRESSES
        names = set(LOOPBACK_NAMES) | set(settings.allowed_hosts)
        if not wildcard:
            names.add(bound)
        return cls(frozenset(names), any_ip_address=wildcard)

    def allows(self, header: str | None) -> bool:
        name = host_name(header)
        if name is None:
            return False
        return name in self.names or (self.any_ip_address and is_ip_address(name))


class LoginLimiter:
    """Failed logins per client in a sliding window; thread-safe (Gradio runs sync routes in threads)."""

    def __init__(self, max_failures: int = 5, window: float = 300.0, clock: Callable[[], float] = time.monotonic):
        self.max_failures = max_failures
        self.window = window
        self.clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._lock = threading.Lock()

    def _recent(self, client: str, now: float) -> deque[float]:
        times = self._failures.get(client, deque())
        while times and now - times[0] >= self.window:
            times.popleft()
        return times

    def retry_after(self, client: str) -> float:
        """Seconds until ``client`` may try again; 0 when it may try now."""
        with self._lock:
            now = self.clock()
            times = self._recent(client, now)
            if len(times) < self.max_failures:
                return 0.0
            return times[-self.max_failures] + self.window - now

    def failed(self, client: str) -> None:
        with self._lock:
            now = self.clock()
            # Forget clients whose failures have all aged out, so the table cannot grow without end.
            for other in [c for c, t in self._failures.items() if not t or now - t[-1] >= self.window]:
                del self._failures[other]
            self._failures.setdefault(client, deque()).append(now)

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._failures.pop(client, None)


def _refusal(text: str, status: int, headers: dict[str, str] | None = None) -> PlainTextResponse:
    return PlainTextResponse(text, status_code=status, headers={"X-Content-Type-Options": "nosniff", **(headers or {})})


class WebGuard:
    """Pure ASGI middleware: refuses foreign Host headers, and login attempts past the limit."""

    def __init__(self, app: ASGIApp, policy: HostPolicy, limiter: LoginLimiter | None = None):
        self.app = app
        self.policy = policy
        self.limiter = limiter
        self._warned: set[str] = set()  # host names already logged (a hostile page may send thousands)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("host")
        if not self.policy.allows(header):
            if scope["type"] == "websocket":  # no HTTP response on a websocket: close it (policy violation)
                self.refuse_host(header)
                await send({"type": "websocket.close", "code": 1008})
                return
            await self.refuse_host(header)(scope, receive, send)
            return
        if self.limiter is not None and scope["type"] == "http" and scope["method"] == "POST" \
                and scope["path"] in LOGIN_PATHS:
            await self.limited_login(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refuse_host(self, header: str | None) -> PlainTextResponse:
        name = host_name(header)
        if name is None:
            return _refusal("Refused: this request has no valid Host header.", 400)
        if name not in self._warned and len(self._warned) < 100:
            self._warned.add(name)
            log.warning("Refused requests for host %r (not an allowed host name; --allowed-host adds one).", name)
        return _refusal(f"Refused: Engram Studio does not answer to the host name {name!r}. If you opened the app "
                        f"by that name yourself, start it with --allowed-host {name} (or ENGRAM_ALLOWED_HOSTS).", 400)

    async def limited_login(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Count the attempt as failed before it runs (a burst of parallel guesses gets no more tries); a
        success clears the count."""
        client = scope["client"][0] if scope.get("client") else "unknown"
        wait = self.limiter.retry_after(client)
        if wait > 0:
            seconds = math.ceil(wait)
            log.warning("Refused a login attempt from %s: too many failed attempts.", client)
            await _refusal(f"Too many failed logins from your address: try again in {seconds} s.", 429,
                           {"Retry-After": str(seconds)})(scope, receive, send)
            return
        self.limiter.failed(client)

        async def watch(message: dict) -> None:
            if message["type"] == "http.response.start" and 200 <= message["status"] < 300:
                self.limiter.succeeded(client)
            await send(message)

        await self.app(scope, receive, watch)


def guard_middleware(settings: Settings) -> Middleware:
    """The :class:`WebGuard` for these settings (the login limit only when a password is set)."""
    limiter = LoginLimiter() if settings.password else None
    return Middleware(WebGuard, policy=HostPolicy.for_settings(settings), limiter=limiter)


def web_cache(settings: Settings) -> Path:
    """Empty ``<home>/cache/`` and make it Gradio's cache (uploads, downloads) for the app built next.

    Gradio reads ``GRADIO_TEMP_DIR`` when a Blocks and its server app are created, so this runs
    before :func:`engram_app.ui.app.build_app`. Emptying it at start removes what a killed app
    left behind (Gradio empties it itself on a clean stop).
    """
    settings.ensure_home()
    cache = settings.home / CACHE_DIR_NAME
    shutil.rmtree(cache, ignore_errors=True)
    cache.mkdir(mode=0o700)
    os.environ["GRADIO_TEMP_DIR"] = str(cache)
    return cache


def discard_uploads(paths: Iterable[str | Path], cache: str | Path) -> None:
    """Delete uploaded files once they are used (imported), when they lie in Gradio's ``cache``
    (the ``GRADIO_CACHE`` of the component they came through).

    Files anywhere else (the bundled examples, a path given through the API) are never touched.
    """
    from gradio.utils import is_in_or_equal

    cache = Path(cache).resolve()
    for path in paths:
        path = Path(path).resolve()
        if path == cache or not is_in_or_equal(str(path), str(cache)):
            continue
        path.unlink(missing_ok=True)
        if path.parent != cache:
            try:
                path.parent.rmdir()  # Gradio keeps each upload in a folder of its own; drop it once empty
            except OSError:
                pass
