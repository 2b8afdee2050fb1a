"""The PostgreSQL log's tables, and the migration of an older release's (pg_store.py
uses them; ``prepare`` runs once per node start).

Tables (``barosync_`` prefix):

- ``heads``     project -> seq
- ``events``    (project, id) -> the event's JSON (current state; deleted events absent)
- ``index``     id -> project (kept after a delete until its deletion leaves the history)
- ``changelog`` (project, seq) -> event id, version, time, the change message JSON as fanned out
- ``idem``      (user, envelope id) -> project, seq, the original answer
- ``tables``    (tbl, key) -> value: accounts, sessions, invites, feeds and projects
                (tables.py, pg_tables.py)
- ``meta``      key -> value (``data_id``: the history's id, which clients compare; a
                restored database gets a new one, see docs/cluster.md; ``schema``)
"""

from __future__ import annotations

import logging
import uuid
from typing import Any

from ..config import Config, ConfigError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 2
# Schema 1 (release 0.1.0) -> 2: an event is (project, id), so an id may be in
# several projects. One transaction, under the schema lock: all or nothing.
MIGRATE_FROM_1 = """
ALTER TABLE barosync_index DROP CONSTRAINT barosync_index_pkey;
ALTER TABLE barosync_index ADD PRIMARY KEY (id, project);
DROP INDEX IF EXISTS barosync_changelog_versions;
CREATE INDEX IF NOT EXISTS barosync_changelog_event_versions ON barosync_changelog (project, event_id, version);
UPDATE barosync_meta SET value = '2' WHERE key = 'schema';
"""

SCHEMA = """
CREATE TABLE IF NOT EXISTS barosync_meta (key text PRIMARY KEY, value text NOT NULL);
CREATE TABLE IF NOT EXISTS barosync_heads (project text PRIMARY KEY, seq bigint NOT NULL);
CREATE TABLE IF NOT EXISTS barosync_events (project text NOT NULL, id text NOT NULL, body bytea NOT NULL,
    PRIMARY KEY (project, id));
CREATE TABLE IF NOT EXISTS barosync_index (id text NOT NULL, project text NOT NULL, PRIMARY KEY (id, project));
CREATE TABLE IF NOT EXISTS barosync_changelog (project text NOT NULL, seq bigint NOT NULL, event_id text NOT NULL,
    version bigint NOT NULL, ts bigint NOT NULL, change bytea NOT NULL, PRIMARY KEY (project, seq));
CREATE INDEX IF NOT EXISTS barosync_changelog_event_versions ON barosync_changelog (project, event_id, version);
CREATE TABLE IF NOT EXISTS barosync_idem (user_id text NOT NULL, envelope_id text NOT NULL, project text NOT NULL,
    seq bigint, answer bytea NOT NULL, PRIMARY KEY (user_id, envelope_id));
CREATE INDEX IF NOT EXISTS barosync_idem_by_seq ON barosync_idem (project, seq);
CREATE TABLE IF NOT EXISTS barosync_tables (tbl text NOT NULL, key bytea NOT NULL, value bytea NOT NULL,
    PRIMARY KEY (tbl, key));
"""


def prepare(conn: Any, config: Config) -> str:
    """Create the tables (or migrate schema 1) under an advisory lock, so one node
    does it at a time; returns the history's id (``data_id``)."""
    conn.execute("SELECT pg_advisory_lock(727274)")
    try:
        conn.execute(SCHEMA)
        found = conn.execute("SELECT value FROM barosync_meta WHERE key = 'schema'").fetchone()
        if found is None:
            conn.execute("INSERT INTO barosync_meta VALUES ('schema', %s), ('data_id', %s) ON CONFLICT DO NOTHING",
                         (str(SCHEMA_VERSION), uuid.uuid4().hex))
        elif int(found[0]) == 1:
            with conn.transaction():
                conn.execute(MIGRATE_FROM_1)
            log.warning("migrated the PostgreSQL log from schema 1 to %d: events are (project, id) now", SCHEMA_VERSION)
        elif int(found[0]) != SCHEMA_VERSION:
            raise ConfigError(config.source, "[cluster] postgres",
                              f"the database holds barosync schema {found[0]}; this barosync reads {SCHEMA_VERSION}")
        return conn.execute("SELECT value FROM barosync_meta WHERE key = 'data_id'").fetchone()[0]
    finally:
        conn.execute("SELECT pg_advisory_unlock(727274)")
