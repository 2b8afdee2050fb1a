"""The `barosync` command line."""

from __future__ import annotations

import argparse
import errno
import ipaddress
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Sequence
from urllib.parse import quote

import lmdb
import trio

from .. import __version__
from ..hooks.auth import DEFAULT_TTL, FEED_TTL, create_token
from ..config import Config, ConfigError, ensure_secret, load_config
from ..domain.models import ALL_PROJECTS, VIEWER
from ..hooks.plugins import PluginError
from ..engine.writer import StorageError


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="PATH", help="TOML config file (see config.example.toml)")
    p.add_argument("--data", metavar="DIR", help="data directory (default ./barosync-data)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="barosync", description="Real-time sync server for team calendars.")
    parser.add_argument("--version", action="version", version=f"barosync {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the server")
    _common(serve)
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on; 0 picks a free one (default 8080)")
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    serve.add_argument("--no-browser-link", action="store_true",
                       help="do not print the owner's sign-in link (printed on a data directory's first start, "
                            "when listening on loopback)")
    serve.add_argument("--sign-in-link", action="store_true",
                       help="print a new sign-in link for the owner (on loopback), even if one was printed before")

    token = sub.add_parser("token", help="mint access tokens")
    token.set_defaults(usage_parser=token)
    token_sub = token.add_subparsers(dest="token_command", metavar="ACTION")
    create = token_sub.add_parser("create", help="print a signed token for a user")
    _common(create)
    create.add_argument("--user", required=True, metavar="ID", help="user id (the token's sub)")
    create.add_argument("--name", help="display name (default: the user id)")
    create.add_argument("--project", action="append", default=[], metavar="P", help="a project the token may access (repeatable)")
    create.add_argument("--all-projects", action="store_true", help="the token may access every project")
    create.add_argument("--viewer", action="append", default=[], metavar="P",
                        help="a project the token may read but not change (repeatable; other projects: editor)")
    create.add_argument("--ttl", type=int, metavar="SECONDS",
                        help=f"lifetime (default {DEFAULT_TTL}; a --feed URL: {FEED_TTL}, i.e. until revoked)")
    create.add_argument("--link", action="store_true", help="print a sign-in link for the web calendar instead of the bare token")
    create.add_argument("--admin", action="store_true", help="the token may open the sync inspector (/admin)")
    create.add_argument("--feed", action="store_true",
                        help="a feed-only token: it opens the read-only ICS feed of its projects and nothing else; "
                             "prints the feed's URL (with --url, or the configured address)")
    create.add_argument("--app-password", action="store_true",
                        help="an app password for calendar apps (CalDAV, HTTP Basic): prints the user name and a long "
                             "random password; only its hash is kept (--name labels it, e.g. \"Alice's phone\")")
    create.add_argument("--url", metavar="URL", help="the server's address in the link (default: http://HOST:PORT from the config)")

    listing = token_sub.add_parser("list", help="list the app passwords (access tokens are not stored, so not listed)")
    _common(listing)
    listing.add_argument("--user", metavar="ID", help="only this user's")

    revoke = token_sub.add_parser("revoke", help="refuse a token or app password from now on")
    _common(revoke)
    revoke.add_argument("token", metavar="TOKEN", help="the token or its id (the jti claim); or an app password or its id (ap…)")

    status = sub.add_parser("status", help="the sync inspector's summary in the terminal (needs an admin token)")
    _common(status)
    status.add_argument("--url", help="the server (default: http://HOST:PORT from the config)")
    status.add_argument("--token", default=os.environ.get("BAROSYNC_TOKEN"),
                        help="an admin token (`barosync token create --admin`; default: $BAROSYNC_TOKEN)")
    status.add_argument("--json", action="store_true", help="print the whole summary as JSON")

    # Data-directory operations (barosync/storage/ops.py, docs/operations.md).
    backup = sub.add_parser("backup", help="consistent hot copy of the data directory into DEST (safe while serving)")
    backup.add_argument("dest", metavar="DEST", help="a new or empty directory for the backup")
    _common(backup)
    restore = sub.add_parser("restore", help="restore a backup into an empty or new data directory")
    restore.add_argument("src", metavar="SRC", help="a directory written by `barosync backup`")
    restore.add_argument("--force", action="store_true", help="restore even when check finds problems in the backup")
    _common(restore)
    check = sub.add_parser("check", help="verify the data directory (safe while serving); exit 1 on problems")
    _common(check)

    # People's accounts (cli/users.py, docs/accounts.md).
    from .users import add_arguments as add_user_arguments

    add_user_arguments(sub, _common)

    # Client commands (barosync/watch.py, docs/client.md).
    from .watch import add_import_arguments, add_watch_arguments

    add_watch_arguments(sub.add_parser("watch", help="print a project's live changes, presence and connection state"))
    add_import_arguments(sub.add_parser("import", help="upload a JSON list of events (resumable, with a progress bar)"))
    return parser


def _config(args: argparse.Namespace) -> Config:
    config = load_config(args.config)
    return config.with_overrides(
        data_dir=Path(args.data) if getattr(args, "data", None) else None,
        host=getattr(args, "host", None),
        port=getattr(args, "port", None),
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "token" and args.token_command == "create":
            return _token_create(args)
        if args.command == "token" and args.token_command == "revoke":
            return _token_revoke(args)
        if args.command == "token" and args.token_command == "list":
            return _token_list(args)
        if args.command == "status":
            return _status(args)
        if args.command == "user":
            from .users import run as run_user

            return run_user(args, _config(args))
        if args.command in ("watch", "import"):
            from .watch import import_main, watch_main

            return watch_main(args) if args.command == "watch" else import_main(args)
        if args.command in ("backup", "restore", "check"):
            from ..storage import ops

            return ops.run(args.command, args, _config(args))
    except ConfigError as e:
        print(f"barosync: config error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"barosync: {e.strerror or e}: {getattr(e, 'filename', '') or ''}".rstrip(": "), file=sys.stderr)
        return 1
    # A missing command or action is a usage error: help on stderr, exit 2 (parsing
    # "token --help" here used to exit 0).
    getattr(args, "usage_parser", parser).print_help(sys.stderr)
    return 2


def _token_create(args: argparse.Namespace) -> int:
    # A viewer's project is one of the token's projects too.
    args.project = list(dict.fromkeys([*args.project, *args.viewer]))
    if not args.project and not args.all_projects:
        print("barosync: token create needs --project P or --viewer P (repeatable), or --all-projects", file=sys.stderr)
        return 2
    if args.app_password:
        return _app_password_create(args)
    if args.ttl is None:
        # A calendar app's subscription must not stop the next day: a feed lasts
        # until `barosync token revoke` (its jti) turns it off.
        args.ttl = FEED_TTL if args.feed else DEFAULT_TTL
    if args.ttl <= 0:
        print("barosync: --ttl must be a positive number of seconds", file=sys.stderr)
        return 2
    config = _config(args)
    secret = ensure_secret(config)
    projects = ALL_PROJECTS if args.all_projects else args.project
    if args.feed and (args.all_projects or len(args.project) != 1 or args.admin or args.link):
        print("barosync: a feed token is for one --project P (and neither --admin nor --link)", file=sys.stderr)
        return 2
    token = create_token(secret, user_id=args.user, name=args.name, projects=projects, ttl=args.ttl,
                         admin=True if args.admin else None, scope="feed" if args.feed else None,
                         roles=_roles(args))
    base = (args.url or f"http://{config.host}:{config.port}").rstrip("/")
    if args.feed:
        print(f"{base}/ics/{quote(args.project[0], safe='')}.ics?token={token}")
    else:
        print(sign_in_link(base, token) if args.link else token)
    return 0


def _roles(args: argparse.Namespace) -> dict[str, str] | None:
    return {p: VIEWER for p in args.viewer} or None


def _status(args: argparse.Namespace) -> int:
    import json
    import urllib.error
    import urllib.request

    if not args.token:
        print("barosync: status needs an admin token: --token T or $BAROSYNC_TOKEN (`barosync token create --admin`)",
              file=sys.stderr)
        return 2
    config = _config(args)
    base = (args.url or f"http://{config.host}:{config.port}").rstrip("/")
    request = urllib.request.Request(base + "/api/admin/summary", headers={"Authorization": f"Bearer {args.token}"})
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            found = json.loads(response.read())
    except urllib.error.HTTPError as e:
        print(f"barosync: status: {base} answered {e.code}: {json.loads(e.read()).get('message', '')}", file=sys.stderr)
        return 1
    except OSError as e:
        print(f"barosync: status: cannot reach {base} ({getattr(e, 'reason', e)}); is the server running? (--url)", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    server = found["server"]
    lmdb = server.get("lmdb")
    storage = (f"LMDB {lmdb['usedBytes'] / 2**20:.1f} of {lmdb['mapBytes'] / 2**20:.0f} MiB" if lmdb
               else f"log in {server.get('storage', '?')}")
    print(f"barosync {server['version']} at {base}: {server['health']}, up {server['uptime']:.0f} s, {storage}, "
          f"plugins: {', '.join(p['name'] for p in server['plugins'])}")
    print(f"{len(found['projects'])} projects:")
    for p in found["projects"]:
        rate = f", {p['changesPerSecond']}/s" if p["changesPerSecond"] else ""
        print(f"  {p['id']}: seq {p['head']} (history from {p['historyFrom']}), {p['subscribers']} subscribers, "
              f"present: {', '.join(p['present']) or '-'}{rate}")
    print(f"{len(found['connections'])} connections:")
    for c in found["connections"]:
        projects = "; ".join(f"{p['id']} acked {p['acked']}/{p['head']}" for p in c["projects"]) or "no subscriptions"
        print(f"  {c['id']} {c['user']} via {c['codec']}: {projects}; outbox {c['outboxBytes']} B, "
              f"{c['unacked']} unacked, heard {c['lastHeard']} s ago")
    return 0


def _app_password_create(args: argparse.Namespace) -> int:
    from ..calendars import app_passwords

    if args.feed or args.admin or args.link:
        print("barosync: an app password is for calendar apps: leave out --feed, --admin and --link", file=sys.stderr)
        return 2
    config = _config(args)
    try:
        password, entry = app_passwords.create(config.data_dir, user_id=args.user, name=args.name,
                                               projects=ALL_PROJECTS if args.all_projects else args.project,
                                               roles=_roles(args))
    except app_passwords.AppPasswordError as e:
        print(f"barosync: {e}", file=sys.stderr)
        return 2
    _per_node_note(config, app_passwords.FILE)
    base = (args.url or f"http://{config.host}:{config.port}").rstrip("/")
    print(f"server:    {base}/dav/  (apps that ask for a CalDAV account; some find it from {base} alone)")
    print(f"user name: {entry['user']}")
    print(f"password:  {password}")
    print(f"(id {entry['id']}, \"{entry['name']}\"; shown once: only its hash is kept. "
          f"`barosync token revoke {entry['id']}` turns it off.)")
    return 0


def _token_list(args: argparse.Namespace) -> int:
    from datetime import datetime, timezone

    from ..calendars import app_passwords

    config = _config(args)
    found = [e for e in app_passwords.listing(config.data_dir) if args.user in (None, e["user"])]
    if not found:
        print("no app passwords (make one with `barosync token create --user U --project P --app-password`)")
        return 0
    for e in found:
        created = datetime.fromtimestamp(e["created"], tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        projects = e["projects"] if isinstance(e["projects"], str) else ", ".join(
            f"{p} (viewer)" if e["roles"].get(p) == VIEWER else p for p in e["projects"])
        print(f"{e['id']}  {e['user']:<16} {e['name']!r:<28} {created}  projects: {projects}")
    return 0


def _token_revoke(args: argparse.Namespace) -> int:
    from ..calendars import app_passwords
    from ..hooks.auth import revoke, token_id

    if args.token.startswith(("ap", app_passwords.PREFIX)) and args.token.count(".") != 2:
        gone = app_passwords.revoke(_config(args).data_dir, args.token)
        if gone is not None:
            print(f"revoked app password {gone['id']} ({gone['user']}, {gone['name']!r})")
            _per_node_note(_config(args), app_passwords.FILE)
            return 0
        if args.token.startswith(app_passwords.PREFIX):
            print("barosync: no such app password (see `barosync token list`)", file=sys.stderr)
            return 2
    jti = token_id(args.token) if args.token.count(".") == 2 else args.token
    if not jti:
        print("barosync: that is neither a token nor a token id (tokens made before ids existed cannot be revoked; "
              "change [auth] secret to refuse every token)", file=sys.stderr)
        return 2
    config = _config(args)
    revoke(config.data_dir, jti)
    print(f"revoked token {jti}")
    _per_node_note(config, "revoked-tokens")
    return 0


def _per_node_note(config: Config, name: str) -> None:
    """Several nodes keep these files each in their own data directory."""
    if config.cluster_postgres:
        print(f"barosync: note: this changed {config.data_dir / name} on this node only; copy it to every node's "
              "data directory (docs/cluster.md)", file=sys.stderr)


def sign_in_link(base_url: str, token: str) -> str:
    """The web calendar with a token in the fragment: browsers never send a fragment
    to the server, so the token stays out of every access log."""
    return f"{base_url.rstrip('/')}/#token={token}"


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


# The owner's link printed by `barosync serve` on loopback lasts this long.
OWNER_LINK_TTL = 7 * 24 * 3600
# In the data directory once `serve` has printed the owner's link.
LINK_SHOWN = "sign-in-link-shown"


def _serve(args: argparse.Namespace) -> int:
    if args.port is not None and not 0 <= args.port <= 65535:
        print("barosync: --port must be from 0 to 65535", file=sys.stderr)
        return 2
    config = _config(args)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        link = "always" if args.sign_in_link else "first" if not args.no_browser_link and config.browser_link else "never"
        trio.run(_serve_until_signal, config, link)
    except KeyboardInterrupt:
        pass
    except (OSError, lmdb.Error, ConfigError, PluginError, StorageError, BaseExceptionGroup) as raised:
        # Problems surface from inside the trio nursery, wrapped in groups.
        if (found := _leaf(raised, (ConfigError,))) is not None:
            print(f"barosync: config error: {found}", file=sys.stderr)
            return 2
        if (found := _leaf(raised, (PluginError,))) is not None:
            print(f"barosync: plugin error: {found}", file=sys.stderr)
            return 2
        if (found := _leaf(raised, (StorageError, lmdb.Error))) is not None:
            print(f"barosync: {found} (check free disk space and permissions of {config.data_dir}; "
                  "`barosync check` verifies the data)", file=sys.stderr)
            return 1
        e = _leaf(raised, (OSError,))
        if e is None:
            raise
        if getattr(e, "errno", None) in (errno.EADDRINUSE, errno.EACCES, errno.EADDRNOTAVAIL):
            print(f"barosync: cannot listen on {config.host}:{config.port}: {e.strerror} "
                  "(another server on that port? try --port 0 or another --port)", file=sys.stderr)
        else:
            print(f"barosync: {e} (data in {config.data_dir})", file=sys.stderr)
        return 1
    return 0


async def _serve_until_signal(config: Config, link: str = "first") -> None:
    """Serve until SIGTERM or SIGINT. ``link``: print the owner's sign-in link on
    loopback "always", on the data directory's "first" start only (the link is a
    credential: under systemd stdout goes to the journal), or "never"."""
    from ..transports.server import serve

    log = logging.getLogger("barosync")
    # The receiver stays open until the server has finished: a second SIGTERM (from
    # systemd and the one-file launcher both, or Ctrl-C twice) must not fall back to
    # the default handler and kill a server that is closing cleanly.
    with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
        async with trio.open_nursery() as nursery:

            async def run(task_status: trio.TaskStatus = trio.TASK_STATUS_IGNORED) -> None:
                await serve(config, task_status=task_status)
                nursery.cancel_scope.cancel()  # done: stop listening for signals

            app = await nursery.start(run)
            print(f"listening on http://{config.host}:{app.port}", flush=True)
            shown = config.data_dir / LINK_SHOWN
            if app.setup_code is not None and link != "never":
                # No account yet: the one-time link that names the owner (useless once used).
                print(f"open http://{config.host}:{app.port}/#setup={app.setup_code}", flush=True)
                log.info("no account yet: the link above names the owner, once (or `barosync user create ID "
                         "--all-projects`)")
                shown.touch(mode=0o600)
            elif link == "always" and _is_loopback(config.host):
                # Only on loopback (the Jupyter convention): whoever can read this
                # terminal could reach the server anyway.
                token = create_token(app.config.secret or "", user_id="owner", name="Owner", projects=ALL_PROJECTS,
                                     ttl=OWNER_LINK_TTL)
                print(f"open {sign_in_link(f'http://{config.host}:{app.port}', token)}", flush=True)
                shown.touch(mode=0o600)
            elif link == "first" and _is_loopback(config.host):
                log.info("people sign in with their accounts (`barosync user list`); "
                         "`barosync serve --sign-in-link` prints a token link for the owner")
            async for _ in signals:
                if app.stopping:
                    log.info("already shutting down")
                    continue
                log.info("shutting down: closing connections with 1001")
                app.stop()


def _leaf(error: BaseException, kinds: tuple[type[BaseException], ...]) -> BaseException | None:
    """The first exception of one of ``kinds`` inside (nested) exception groups."""
    if isinstance(error, kinds):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            found = _leaf(inner, kinds)
            if found is not None:
                return found
    return None
