"""Calendars made, renamed and deleted from a calendar app: each is a barosync project
(storage/projects.py), so the web app sees them too, and the rules are the web app's.

- ``MKCALENDAR`` (or an extended ``MKCOL``) at ``/dav/calendars/USER/ID/`` makes
  project ``ID``, named by the body's ``DAV:displayname``; its maker (an account:
  an app password made in the web app, or for an account) is its owner.
- ``PROPPATCH`` of ``DAV:displayname``, Apple's ``calendar-color`` or
  ``CALDAV:calendar-description`` renames, recolors or describes it (its owners),
  all or nothing; other properties are refused (403 in the multistatus). MKCALENDAR
  sets the same three.
- ``DELETE`` of the calendar deletes the project (its owners): closed to everyone at
  once and restorable in the web app for 30 days, its events untouched.
- ``MKCALENDAR`` again at the URL of a deleted calendar, by one of its owners, opens
  it again empty: the old events are deleted as ordinary deletions (each in its
  history), as a calendar app that deletes and makes a calendar expects.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import trio

from . import dav
from .caldav_writes import XML, Answer, Fail
from .dav import APPLE, CALDAV, DAV, DavError, tag
from ..domain.models import Identity, ValidationError, check_id
from ..storage.accounts import AccountError, User
from ..storage.projects import ProjectExists, check_color, check_description, check_name
from ..core.mutations import delete_every_event
from ..wire import protocol
from ..wire.protocol import ProtocolError

if TYPE_CHECKING:
    from ..core.app import App

DISPLAYNAME = tag(DAV, "displayname")
COLOR = tag(APPLE, "calendar-color")
DESCRIPTION = tag(CALDAV, "calendar-description")
# What an app may set on a calendar, and the Projects.update argument each one is.
SETTABLE = {DISPLAYNAME: "name", COLOR: "color", DESCRIPTION: "description"}


class Collections:
    def __init__(self, app: "App") -> None:
        self.app = app

    async def _account(self, identity: Identity) -> User:
        account = await self.app.tables_call(self.app.accounts.get, identity.user_id)
        if account is None:
            raise Fail(403, "calendars are made and deleted by people's accounts: make the app password in the web "
                            "app's Calendar apps dialog (docs/accounts.md)")
        return account

    async def make(self, identity: Identity, project: str, body: bytes) -> Answer:
        account = await self._account(identity)
        try:
            check_id(project, "calendar")
            values, _ = dav.set_properties(body)
        except (ValidationError, DavError) as e:
            raise Fail(400, str(e)) from None
        name = values.get(DISPLAYNAME) or project
        looks = {SETTABLE[k]: v for k, v in values.items() if k in (COLOR, DESCRIPTION)}
        try:
            if looks:  # refused before anything is made
                check_color(looks.get("color", ""))
                check_description(looks.get("description", ""))
            await self.app.make_project(account, name, project_id=project)
        except ProjectExists as e:
            found = await self.app.tables_call(self.app.projects.get, project)
            if found is None or found.deleted is None or not account.may_invite(project):
                raise Fail(405, f"{e}: a new calendar needs a URL of its own",
                           condition="resource-must-be-null") from None
            await self._make_again(identity, project, name)
        except AccountError as e:
            raise Fail(400, str(e)) from None
        if looks:
            await trio.to_thread.run_sync(lambda: self.app.projects.update(project, **looks))
        return 201, b"", b"text/plain", [(b"cache-control", b"no-store")]

    async def _make_again(self, identity: Identity, project: str, name: str) -> None:
        """A calendar made again by an owner at the URL of one they deleted (apps and
        python-caldav's tests do): the project reopens empty, its old events deleted
        as ordinary deletions, so each is still in its history."""
        await trio.to_thread.run_sync(self.app.projects.reopen, project, name)
        try:
            await delete_every_event(self.app, identity, project)
        except ProtocolError as e:
            raise Fail(protocol.http_status(e.code), f"emptying {project!r}: {e.message}") from None

    async def proppatch(self, identity: Identity, project: str, href: str, body: bytes) -> Answer:
        """PROPPATCH: the name, color and description of a calendar its owner may
        change, all or none (RFC 4918 §9.2); anything else is 403 in the answer."""
        try:
            values, named = dav.set_properties(body)
        except DavError as e:
            raise Fail(400, str(e)) from None
        account = await self.app.tables_call(self.app.accounts.get, identity.user_id)
        owner = account is not None and account.may_invite(project)
        # A removed color or description is cleared; the name cannot be removed.
        wanted = {n: values.get(n, "") for n in named if n in SETTABLE and (n in values or n != DISPLAYNAME)}
        refused = [n for n in named if n not in wanted or not owner or not _valid(n, wanted[n])]
        if refused:
            answer = dav.response(href, forbidden=refused, failed=[n for n in named if n not in refused])
            return 207, dav.multistatus([answer]), XML, []
        try:
            await trio.to_thread.run_sync(lambda: self.app.projects.update(
                project, **{SETTABLE[n]: v for n, v in wanted.items()}))
        except AccountError as e:
            raise Fail(409, str(e)) from None
        answer = dav.response(href, [dav.element(n) for n in named])
        return 207, dav.multistatus([answer]), XML, []

    async def remove(self, identity: Identity, project: str) -> Answer:
        if not (await self._account(identity)).may_invite(project):
            raise Fail(403, f"only an owner of {project!r} deletes it", condition="need-privileges")
        try:
            await trio.to_thread.run_sync(self.app.projects.delete, project)
        except AccountError as e:
            raise Fail(409, str(e)) from None
        return 204, b"", b"text/plain", []


def _valid(name: str, value: str) -> bool:
    check = {DISPLAYNAME: check_name, COLOR: check_color, DESCRIPTION: check_description}[name]
    try:
        check(value)
    except AccountError:
        return False
    return True
