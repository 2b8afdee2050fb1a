"""How a calendar app signs in to CalDAV: HTTP Basic with an app password
(app_passwords.py), refused over plain HTTP off loopback, limited per user name, and
for an app password made in the web app, the account's access as it is now.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import logging
import math
from typing import TYPE_CHECKING

import attrs
import trio

from ..domain.models import Identity
from ..domain.ratelimit import Limiter
from ..wire import protocol
from .app_passwords import Verifier, identity as app_identity
from .caldav_writes import Fail

if TYPE_CHECKING:
    from ..core.app import App

log = logging.getLogger("barosync.calendars.caldav")

SCRYPT_CHECKS = 2  # password checks running at once
SIGN_IN_FAILURE_BURST = 10
SIGN_IN_FAILURE_RATE = 0.2  # per second, once the burst is spent


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class AppPasswordSignIn:
    def __init__(self, app: "App") -> None:
        self.app = app
        self.verifier = Verifier(app.config.data_dir)
        # scrypt takes ~16 MiB and ~50 ms per check: a burst of wrong passwords must
        # not take the server's memory with it.
        self._scrypt = trio.CapacityLimiter(SCRYPT_CHECKS)
        # Failed sign-ins per user name: a burst, then one every few seconds, so
        # guessing (or keeping a core busy with scrypt) gets nowhere fast.
        self._failed = Limiter(SIGN_IN_FAILURE_RATE, SIGN_IN_FAILURE_BURST)

    def secure(self, headers: dict[bytes, bytes]) -> bool:
        config = self.app.config
        if is_loopback(config.host):
            return True
        header = config.caldav_tls_header
        return bool(header) and headers.get(header.lower().encode(), b"").strip().lower() == b"https"

    async def identity(self, headers: dict[bytes, bytes]) -> Identity:
        """Who the request's Basic credentials sign in; Fail (401, 403, 429) says why not."""
        if not self.secure(headers):
            header = self.app.config.caldav_tls_header
            why = (f"the proxy did not send {header}: https" if header
                   else "set [caldav] tls_header to the header your TLS proxy sets (e.g. X-Forwarded-Proto)")
            raise Fail(403, "CalDAV sign-in is refused over plain HTTP: this server listens on a non-loopback "
                            f"address without TLS, so the app password would cross the network readable. "
                            f"Put barosync behind a TLS proxy ({why}), or listen on 127.0.0.1.")
        challenge = [(b"www-authenticate", b'Basic realm="barosync", charset="UTF-8"')]
        auth = headers.get(b"authorization", b"")
        if auth[:6].lower() != b"basic ":
            raise Fail(401, "sign in with your user name and an app password "
                            "(`barosync token create --user USER --app-password`)", headers=challenge)
        try:
            user, _, password = base64.b64decode(auth[6:].strip(), validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            raise Fail(401, "malformed Basic credentials", headers=challenge) from None
        now = trio.current_time()
        wait = self._failed.refused(user, now)
        if wait is not None:
            raise Fail(429, f"too many failed sign-ins for {user!r}: try again in {math.ceil(wait)} s",
                       headers=[protocol.retry_after_header(wait)])
        entry, known = self.verifier.lookup(user, password)
        if entry is None or not (known or await trio.to_thread.run_sync(self.verifier.check, entry, password,
                                                                         limiter=self._scrypt)):
            self._failed.take(user, now)
            log.warning("CalDAV sign-in failed for user %r (wrong name or app password, or revoked)", user)
            raise Fail(401, "wrong user name or app password (or it was revoked)", headers=challenge)
        identity = app_identity(entry)
        if entry.get("account"):
            account = await self.app.tables_call(self.app.accounts.get, identity.user_id)
            if account is None or account.disabled:
                raise Fail(401, "this app password's account is disabled or gone", headers=challenge)
            identity = attrs.evolve(identity, projects=account.projects, roles=account.roles)
        refused = self.app.request_refused(identity)
        if refused is not None:
            message, wait = refused
            raise Fail(429, message, headers=[protocol.retry_after_header(wait)])
        return identity
