"""`barosync user …`: people's accounts from a terminal (headless setups, recovery).

create, access, list, disable, enable and reset-password, on the data directory's accounts
(storage/accounts.py). They work while the server runs: a disabled user's open
connections close within a second. A password comes from the terminal (asked twice)
or, with ``--password-stdin``, from the first line of standard input.
"""

from __future__ import annotations

import argparse
import getpass
import sys
from datetime import datetime, timezone
from typing import Callable

from ..config import Config
from ..domain.models import ALL_PROJECTS, OWNER, VIEWER
from ..storage.accounts import AccountError, Accounts


def add_arguments(sub: argparse._SubParsersAction, common: Callable[[argparse.ArgumentParser], None]) -> None:
    user = sub.add_parser("user", help="people's accounts: create, access, list, disable, enable, reset-password")
    user.set_defaults(usage_parser=user)
    actions = user.add_subparsers(dest="user_command", metavar="ACTION")
    create = actions.add_parser("create", help="a new account that signs in to the web calendar")
    common(create)
    create.add_argument("user", metavar="ID", help="the user name people sign in with")
    create.add_argument("--name", help="display name (default: the user name)")
    create.add_argument("--project", action="append", default=[], metavar="P", help="a project to edit (repeatable)")
    create.add_argument("--viewer", action="append", default=[], metavar="P", help="a project to read only (repeatable)")
    create.add_argument("--owner", action="append", default=[], metavar="P",
                        help="a project to own: edit, invite to and manage (repeatable)")
    create.add_argument("--all-projects", action="store_true", help="every project")
    create.add_argument("--admin", action="store_true",
                        help="the team's owner: every project, invites everywhere, the sync inspector")
    create.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    access = actions.add_parser("access", help="set what a user may open (replaces their projects; at once)")
    common(access)
    access.add_argument("user", metavar="ID")
    access.add_argument("--project", action="append", default=[], metavar="P", help="a project to edit (repeatable)")
    access.add_argument("--viewer", action="append", default=[], metavar="P", help="a project to read only (repeatable)")
    access.add_argument("--owner", action="append", default=[], metavar="P",
                        help="a project to own: edit, invite to and manage (repeatable)")
    access.add_argument("--all-projects", action="store_true", help="every project")
    access.add_argument("--admin", action="store_true",
                        help="the team's owner: every project, invites everywhere, the sync inspector")
    listing = actions.add_parser("list", help="the accounts, with their projects and signed-in sessions")
    common(listing)
    for name, text in (("disable", "sign a user out everywhere and refuse their sign-ins"),
                       ("enable", "let a disabled user sign in again"),
                       ("reset-password", "set a new password (signs the user out everywhere)")):
        action = actions.add_parser(name, help=text)
        common(action)
        action.add_argument("user", metavar="ID")
        if name == "reset-password":
            action.add_argument("--password-stdin", action="store_true", help="read the password from standard input")


def run(args: argparse.Namespace, config: Config) -> int:
    from ..core.app import open_log

    store = open_log(config)
    try:
        # The data directory's tables, or with [cluster] postgres the nodes' shared ones.
        accounts = Accounts(store.tables(Accounts.TABLES))
        try:
            return _run(args, accounts)
        except AccountError as e:
            print(f"barosync: {e}", file=sys.stderr)
            return 2
    finally:
        store.close()


def _run(args: argparse.Namespace, accounts: Accounts) -> int:
    command = args.user_command
    if command in ("create", "access"):
        every = args.all_projects or args.admin
        granted = list(dict.fromkeys([*args.project, *args.viewer, *args.owner]))
        roles = {**{p: VIEWER for p in args.viewer}, **{p: OWNER for p in args.owner}}
    if command == "create":
        if not granted and not every:
            print("barosync: user create needs --project, --viewer or --owner P (repeatable), --all-projects or "
                  "--admin", file=sys.stderr)
            return 2
        user = accounts.create(args.user, name=args.name, password=_password(args),
                               projects=ALL_PROJECTS if every else granted, roles=roles or None, admin=args.admin)
        print(f"created {user.id!r} ({user.name}); they sign in at the web calendar's address")
        return 0
    if command == "access":
        accounts.set_access(args.user, projects=ALL_PROJECTS if every else granted, roles=roles or None,
                            admin=args.admin)
        print(f"{args.user!r} may now open: {'every project' if every else ', '.join(granted) or 'nothing'}"
              f"{' as the team owner' if args.admin else ''}; their open tabs follow within a second")
        return 0
    if command == "list":
        users = accounts.list()
        if not users:
            print("no accounts (make one with `barosync user create ID --project P`)")
        for u in users:
            roles = dict(u.roles)
            projects = u.projects if isinstance(u.projects, str) else ", ".join(
                f"{p} ({roles[p]})" if p in roles else p for p in sorted(u.projects))
            sessions = accounts.sessions_of(u.id)
            last = max((s.last_used for s in sessions), default=None)
            seen = datetime.fromtimestamp(last, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC") if last else "never"
            state = "disabled" if u.disabled else f"{len(sessions)} signed-in session(s), last used {seen}"
            if u.admin:
                projects += " (the team's owner)"
            print(f"{u.id:<16} {u.name!r:<24} projects: {projects}; {state}")
        return 0
    if command in ("disable", "enable"):
        accounts.set_disabled(args.user, command == "disable")
        print(f"{args.user!r} {command}d" + ("; signed out everywhere" if command == "disable" else ""))
        return 0
    if command == "reset-password":
        accounts.set_password(args.user, _password(args))
        print(f"new password set for {args.user!r}; signed out everywhere")
        return 0
    args.usage_parser.print_help(sys.stderr)
    return 2


def _password(args: argparse.Namespace) -> str:
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise AccountError("no terminal to ask the password on: pass it on standard input with --password-stdin")
    first = getpass.getpass("password: ")
    if getpass.getpass("again: ") != first:
        raise AccountError("the two passwords differ; nothing was changed")
    return first
