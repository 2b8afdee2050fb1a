"""Files the server ships inside the package (and the one-file binary): the web
calendar at ``/`` and ``/app/…``, its service worker at ``/sw.js``, and the browser
client at ``/client/…``. Read through ``importlib.resources`` once each, with an ETag
of their content, so a browser revalidates for a few bytes and never runs stale code.
"""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources
from importlib.resources.abc import Traversable

TYPES = {
    ".html": b"text/html; charset=utf-8",
    ".js": b"text/javascript; charset=utf-8",
    ".mjs": b"text/javascript; charset=utf-8",
    ".css": b"text/css; charset=utf-8",
    ".ts": b"text/plain; charset=utf-8",
    ".md": b"text/plain; charset=utf-8",
    ".txt": b"text/plain; charset=utf-8",
    ".png": b"image/png",
    ".svg": b"image/svg+xml",
}
# Strict for scripts (no inline script, nothing from elsewhere); inline styles are
# allowed because the calendar grid sets element styles as it lays events out.
CSP = (b"default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data:; font-src 'self' data:; "
       b"connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'")
ALIASES = {
    "/": ("app", "index.html"),
    "/admin": ("app", "admin.html"),
    "/sw.js": ("app", "sw.js"),
    "/client/barosync.js": ("barosync.js",),
    "/client/barosync.d.ts": ("barosync.d.ts",),
}


def _find(path: str) -> Traversable | None:
    parts = ALIASES.get(path)
    if parts is None:
        if not path.startswith("/app/"):
            return None
        parts = tuple(path[len("/app/"):].split("/"))
        if any(p in ("", ".", "..") or p.startswith(".") for p in parts):
            return None
        parts = ("app", *parts)
    found = resources.files("barosync").joinpath("web", *parts)
    return found if found.is_file() else None


@lru_cache(maxsize=256)
def load(path: str) -> tuple[bytes, bytes, list[tuple[bytes, bytes]]] | None:
    """(body, content type, headers with its ETag) of a shipped file, or None."""
    found = _find(path)
    if found is None:
        return None
    suffix = "." + found.name.rsplit(".", 1)[-1] if "." in found.name else ""
    content_type = TYPES.get(suffix)
    if content_type is None:
        return None
    body = found.read_bytes()
    etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
    # no-cache: use the copy, but ask first (a 304 costs nothing); nosniff: a file is
    # only ever used as what it says it is.
    headers = [(b"etag", etag), (b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff")]
    if suffix == ".html":
        headers += [(b"content-security-policy", CSP), (b"referrer-policy", b"no-referrer")]
    return body, content_type, headers
