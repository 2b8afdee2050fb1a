"""Sign-in with the team's identity provider: OpenID Connect's authorization code flow
with PKCE, at ``/auth/oidc/start`` and ``/auth/oidc/callback``.

- ``GET /auth/oidc/start`` sends the browser to the provider (found through its
  discovery document) with a fresh ``state``, ``nonce`` and PKCE verifier; the state
  is also put in a short-lived cookie, so that only the browser that started a
  sign-in can finish it (no one can sign a victim in as themselves).
- ``GET /auth/oidc/callback`` takes the code back to the provider's token endpoint
  (with the client secret and the verifier), checks the ID token's signature against
  the provider's JWKS and its issuer, audience, expiry and nonce, reads the user's
  groups from it or from the userinfo endpoint, and opens a barosync session: the
  same cookie a password sign-in gets. Then it sends the browser to ``/``; a failure
  goes to ``/#signin-error=…``, which the sign-in page shows.

Authlib's OAuth2 client builds the authorization URL and exchanges the code (its
requests session, run in a worker thread); joserfc, Authlib's JOSE library, checks
the ID token. The provider's groups give roles (``group_prefix`` + ``PROJECT:ROLE``,
and ``group_prefix`` + ``admin``: docs/accounts.md).
"""

from __future__ import annotations

import logging
import secrets
import time
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, quote

import attrs
import trio
from authlib.integrations.requests_client import OAuth2Session
from joserfc import jwt
from joserfc.errors import JoseError
from joserfc.jwk import KeySet

from ..config import Config
from ..domain.models import ALL_PROJECTS, ROLES, VIEWER
from ..storage.accounts import AccountError, Accounts, User
from .rest import came_over_https

log = logging.getLogger(__name__)

STATE_COOKIE = "barosync_oidc"
SIGN_IN_TIMEOUT = 600  # seconds between leaving for the provider and coming back
MAX_PENDING = 1000  # sign-ins begun and not finished, at most (each holds ~200 bytes)
METADATA_TTL = 3600.0  # the discovery document and the keys are read again after this
PROVIDER_TIMEOUT = 10.0  # seconds for each request to the provider
ID_TOKEN_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]

Answer = tuple[int, Any, list[tuple[bytes, bytes]]]


class SignInFailed(Exception):
    """What to tell the person on the sign-in page."""


@attrs.frozen
class Pending:
    nonce: str
    verifier: str
    redirect_uri: str
    started: float
    invite: str | None  # an invite's code: the account joins its project once signed in


def groups_access(groups: Any, prefix: str) -> tuple[frozenset[str] | str, dict[str, str], bool] | None:
    """(projects, roles, admin) from the provider's groups; None when no group has the
    prefix (barosync's own invites and members then decide)."""
    if not isinstance(groups, list):
        return None
    mine = [g.removeprefix(prefix) for g in groups if isinstance(g, str) and g.startswith(prefix)]
    if not mine:
        return None
    roles: dict[str, str] = {}
    for group in mine:  # the highest role a group gives wins
        project, _, role = group.rpartition(":")
        if project and role in ROLES:
            roles[project] = max(role, roles.get(project, VIEWER), key=ROLES.index)
    if "admin" in mine:
        return ALL_PROJECTS, roles, True
    return frozenset(roles), roles, False


class OpenIdConnect:
    """The provider's client for one server (config's [oidc])."""

    def __init__(self, config: Config, accounts: Callable[[], Accounts],
                 open_session: Callable[[User, dict[bytes, bytes]], Awaitable[Any]]) -> None:
        assert config.oidc_issuer is not None and config.oidc_client_id is not None
        self.config = config
        self.issuer = config.oidc_issuer.rstrip("/")
        self._accounts = accounts
        self._open_session = open_session
        self._pending: dict[str, Pending] = {}
        self._metadata: tuple[float, dict[str, Any]] | None = None
        self._keys: tuple[float, KeySet] | None = None

    def describe(self) -> dict[str, Any]:
        """What the sign-in page shows (GET /auth/providers)."""
        return {"name": self.config.oidc_name, "start": "/auth/oidc/start"}

    def _client(self, redirect_uri: str) -> OAuth2Session:
        return OAuth2Session(self.config.oidc_client_id, self.config.oidc_client_secret,
                             scope=" ".join(self.config.oidc_scopes), redirect_uri=redirect_uri,
                             code_challenge_method="S256", default_timeout=PROVIDER_TIMEOUT)

    async def start(self, query: str, headers: dict[bytes, bytes]) -> Answer:
        invite = parse_qs(query).get("invite", [None])[0]
        try:
            metadata = await self._discover()
        except SignInFailed as e:
            return _back_to_sign_in(str(e))
        now = time.monotonic()
        self._forget_stale(now)
        if len(self._pending) >= MAX_PENDING:
            return _back_to_sign_in("too many sign-ins under way: try again in a minute")
        state, nonce, verifier = secrets.token_urlsafe(24), secrets.token_urlsafe(24), secrets.token_urlsafe(48)
        redirect_uri = self.config.oidc_redirect_uri or f"{_origin(headers)}/auth/oidc/callback"
        url, _ = self._client(redirect_uri).create_authorization_url(
            metadata["authorization_endpoint"], state=state, nonce=nonce, code_verifier=verifier)
        self._pending[state] = Pending(nonce=nonce, verifier=verifier, redirect_uri=redirect_uri, started=now,
                                       invite=invite)
        # Lax, not Strict: the provider's redirect back is a cross-site navigation.
        cookie = (f"{STATE_COOKIE}={state}; Path=/auth/oidc/; Max-Age={SIGN_IN_TIMEOUT}; HttpOnly; SameSite=Lax"
                  f"{'; Secure' if came_over_https(headers) else ''}")
        return 302, {"location": url}, [(b"location", url.encode()), (b"set-cookie", cookie.encode()),
                                        (b"cache-control", b"no-store")]

    async def callback(self, query: str, headers: dict[bytes, bytes], cookies: dict[str, str]) -> Answer:
        given = {k: v[0] for k, v in parse_qs(query).items()}
        state = given.get("state", "")
        pending = self._pending.pop(state, None)
        forget = (b"set-cookie", f"{STATE_COOKIE}=; Path=/auth/oidc/; Max-Age=0; HttpOnly; SameSite=Lax".encode())
        try:
            if "error" in given:
                raise SignInFailed(f"the identity provider said: {given.get('error_description') or given['error']}")
            if (pending is None or not secrets.compare_digest(cookies.get(STATE_COOKIE, ""), state)
                    or time.monotonic() - pending.started > SIGN_IN_TIMEOUT):
                raise SignInFailed("this sign-in was not started here, or took too long: try again")
            if not given.get("code"):
                raise SignInFailed("the identity provider sent no code back: try again")
            claims = await self._verified_claims(given["code"], pending)
            user = await trio.to_thread.run_sync(self._account, claims, pending.invite)
        except SignInFailed as e:
            log.warning("sign-in with the identity provider failed: %s", e)
            status, body, out = _back_to_sign_in(str(e))
            return status, body, [*out, forget]
        log.info("user %r signed in with the identity provider", user.id)
        _, _, session_headers = await self._open_session(user, headers)
        return 303, {"location": "/"}, [(b"location", b"/"), *session_headers, forget, (b"cache-control", b"no-store")]

    def _forget_stale(self, now: float) -> None:
        for state in [s for s, p in self._pending.items() if now - p.started > SIGN_IN_TIMEOUT]:
            del self._pending[state]

    def _account(self, claims: dict[str, Any], invite: str | None) -> User:
        access = groups_access(claims.get(self.config.oidc_groups_claim), self.config.oidc_group_prefix)
        if invite is not None and access is not None:
            raise SignInFailed("your access comes from your identity provider's groups: ask for a group there, "
                               "not an invite")
        wanted = claims.get("preferred_username") or (claims.get("email") or "").split("@")[0] or claims["sub"]
        name = claims.get("name") or wanted
        try:
            user = self._accounts().federated(self.issuer, claims["sub"], wanted_id=str(wanted), name=str(name),
                                              access=access)
        except AccountError as e:
            raise SignInFailed(str(e)) from None
        if user.disabled:
            raise SignInFailed("this account is disabled: ask the team's owner")
        if invite is not None:
            try:
                user = self._accounts().accept_signed_in(invite, user.id)
            except AccountError as e:
                raise SignInFailed(str(e)) from None
        return user

    async def _verified_claims(self, code: str, pending: Pending) -> dict[str, Any]:
        metadata = await self._discover()

        def exchange() -> tuple[dict[str, Any], dict[str, Any]]:
            client = self._client(pending.redirect_uri)
            token = client.fetch_token(metadata["token_endpoint"], code=code, code_verifier=pending.verifier)
            userinfo: dict[str, Any] = {}
            if metadata.get("userinfo_endpoint"):
                answer = client.get(metadata["userinfo_endpoint"])
                if answer.ok:
                    userinfo = answer.json()
            return dict(token), userinfo

        try:
            token, userinfo = await trio.to_thread.run_sync(exchange)
        except Exception as e:  # the provider's refusal, or the network: both end the sign-in
            raise SignInFailed(f"the identity provider refused the code ({type(e).__name__}: {e})") from None
        id_token = token.get("id_token")
        if not isinstance(id_token, str):
            raise SignInFailed("the identity provider sent no ID token (is \"openid\" among [oidc] scopes?)")
        claims = await self._check_id_token(id_token, pending.nonce)
        if userinfo.get("sub") == claims["sub"]:
            claims = {**userinfo, **claims}  # the ID token wins where both say
        return claims

    async def _check_id_token(self, id_token: str, nonce: str) -> dict[str, Any]:
        for fresh in (False, True):  # a key the provider rotated in: read the JWKS once more
            keys = await self._key_set(fresh)
            try:
                decoded = jwt.decode(id_token, keys, algorithms=ID_TOKEN_ALGORITHMS)
                break
            except JoseError as e:
                if fresh:
                    raise SignInFailed(f"the ID token's signature does not check out ({e.error})") from None
        registry = jwt.JWTClaimsRegistry(leeway=60, iss={"essential": True, "value": self.issuer},
                                         aud={"essential": True, "value": self.config.oidc_client_id},
                                         sub={"essential": True}, exp={"essential": True},
                                         nonce={"essential": True, "value": nonce})
        try:
            registry.validate(decoded.claims)
        except JoseError as e:
            raise SignInFailed(f"the ID token is not for this sign-in ({e.error}: {e.description or ''})") from None
        return dict(decoded.claims)

    async def _discover(self) -> dict[str, Any]:
        now = time.monotonic()
        if self._metadata is not None and now - self._metadata[0] < METADATA_TTL:
            return self._metadata[1]
        metadata = await self._get_json(f"{self.issuer}/.well-known/openid-configuration")
        if metadata.get("issuer", "").rstrip("/") != self.issuer:
            raise SignInFailed(f"the provider's discovery document names another issuer ({metadata.get('issuer')!r}); "
                               "check [oidc] issuer")
        for key in ("authorization_endpoint", "token_endpoint", "jwks_uri"):
            if not isinstance(metadata.get(key), str):
                raise SignInFailed(f"the provider's discovery document has no {key}")
        self._metadata = (now, metadata)
        return metadata

    async def _key_set(self, fresh: bool) -> KeySet:
        now = time.monotonic()
        if not fresh and self._keys is not None and now - self._keys[0] < METADATA_TTL:
            return self._keys[1]
        metadata = await self._discover()
        keys = KeySet.import_key_set(await self._get_json(metadata["jwks_uri"]))
        self._keys = (now, keys)
        return keys

    async def _get_json(self, url: str) -> dict[str, Any]:
        def get() -> dict[str, Any]:
            answer = self._client("").get(url, withhold_token=True)
            answer.raise_for_status()
            return answer.json()

        try:
            found = await trio.to_thread.run_sync(get)
        except Exception as e:
            raise SignInFailed(f"the identity provider cannot be reached ({type(e).__name__}): try again later") from None
        if not isinstance(found, dict):
            raise SignInFailed(f"the identity provider answered {url} with something other than a JSON object")
        return found


def _origin(headers: dict[bytes, bytes]) -> str:
    host = headers.get(b"host", b"").decode("latin-1")
    return f"{'https' if came_over_https(headers) else 'http'}://{host}"


def _back_to_sign_in(message: str) -> Answer:
    location = f"/#signin-error={quote(message, safe='')}"
    return 303, {"location": location}, [(b"location", location.encode()), (b"cache-control", b"no-store")]
