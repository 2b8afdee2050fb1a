"""Files the server ships inside the package (and the one-file binary): the browser
client at ``/client/…``. Read through ``importlib.resources`` once, with an ETag of
their content, so a browser revalidates for a few bytes and never runs stale code."""

from __future__ import annotations

import hashlib
from functools import lru_cache
from importlib import resources

# path -> (file in barosync/web, content type)
FILES = {
    "/client/barosync.js": ("barosync.js", b"text/javascript; charset=utf-8"),
    "/client/barosync.d.ts": ("barosync.d.ts", b"text/plain; charset=utf-8"),
}


@lru_cache(maxsize=None)
def load(path: str) -> tuple[bytes, bytes, bytes] | None:
    """(body, content type, ETag) of a shipped file, or None."""
    found = FILES.get(path)
    if found is None:
        return None
    name, content_type = found
    body = resources.files("barosync").joinpath("web", name).read_bytes()
    etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
    return body, content_type, etag


def headers(etag: bytes) -> list[tuple[bytes, bytes]]:
    # no-cache: use the copy, but ask first (a 304 costs nothing); nosniff: a script
    # is only ever run as what it says it is.
    return [(b"etag", etag), (b"cache-control", b"no-cache"), (b"x-content-type-options", b"nosniff")]
