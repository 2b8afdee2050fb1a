"""The LMDB store without sockets: group commit, idempotency, history, map growth."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import trio

from barosync.config import Config
from barosync.domain.models import new_event
from barosync.storage.store import Mutation, Outcome, Store, now_ms
from barosync.core.app import open_log
from barosync.engine.writer import Writer

from conftest import event_payload


def create(store_user: str, n: int, project: str = "p1", *, at: int | None = None, **fields: Any) -> Mutation:
    received = at if at is not None else now_ms()
    event = new_event(event_payload(project, title=f"e{n}", **fields), user_id=store_user, now_ms=received)
    return Mutation(
        "create", user_id=store_user, envelope_id=f"env-{n}", project_id=project, event_id=event.id,
        event=event, received_ms=received,
    )


class Answers:
    """A writer.Sender that keeps the outcomes it hears, in order."""

    def __init__(self) -> None:
        self.outcomes: list[Outcome] = []

    def answer(self, m: Mutation, outcome: Outcome) -> None:
        self.outcomes.append(outcome)


def open_store(path: Path, **config: Any) -> Store:
    cfg = Config(data_dir=path, **config)
    store = open_log(cfg)
    assert isinstance(store, Store)
    return store


def test_one_batch_one_transaction_with_seqs_in_order(tmp_path):
    store = open_store(tmp_path)
    outcomes = store.commit_batch([create("alice", n) for n in range(5)])
    assert [o.status for o in outcomes] == ["applied"] * 5
    assert [o.seq for o in outcomes] == [1, 2, 3, 4, 5]
    assert store.current_seq("p1") == 5
    assert [orjson.loads(c)["seq"] for c in store.changes_since("p1", 2)] == [3, 4, 5]


def test_duplicate_envelope_in_one_batch_is_applied_once(tmp_path):
    store = open_store(tmp_path)
    first, second = store.commit_batch([create("alice", 1), create("alice", 1)])
    assert first.status == "applied" and second.status == "replayed"
    assert second.answer == first.answer
    assert store.current_seq("p1") == 1


def test_changes_since_answers_none_when_it_cannot_replay(tmp_path):
    store = open_store(tmp_path, history_max_changes=3)
    store.commit_batch([create("alice", n) for n in range(6)])
    assert store.changes_since("p1", 6) == []
    assert store.changes_since("p1", 7) is None  # ahead of the project
    assert [orjson.loads(c)["seq"] for c in store.changes_since("p1", 3)] == [4, 5, 6]
    assert store.changes_since("p1", 2) is None  # seq 3 was pruned by the count limit
    assert store.changes_since("other", 0) == []


def test_prune_forgets_old_history_and_its_idempotency_records(tmp_path):
    store = open_store(tmp_path, history_retention=60)
    old = now_ms() - 3_600_000
    store.commit_batch([create("alice", n, at=old) for n in range(3)])
    store.commit_batch([create("alice", n) for n in range(3, 5)])
    assert store.prune(now_ms=now_ms()) == 3
    assert store.changes_since("p1", 0) is None
    assert [orjson.loads(c)["seq"] for c in store.changes_since("p1", 3)] == [4, 5]
    # The events themselves stay; only history goes.
    assert len(store.snapshot("p1")[1]) == 5
    # A retry of a forgotten create is no longer an idempotent replay, but event ids
    # are never reused, so it cannot duplicate the event.
    (retry,) = store.commit_batch([create("alice", 0, at=old)])
    assert retry.status in ("applied", "error")
    (recent,) = store.commit_batch([create("alice", 4)])
    assert recent.status == "replayed"


def test_map_grows_under_a_burst_past_its_initial_size(tmp_path):
    async def main() -> list[Outcome]:
        store = open_store(tmp_path, map_size=1024 * 1024)
        replies = Answers()
        writer = Writer(store, lambda batch: [sender.answer(m, o) for m, sender, o in batch])
        async with trio.open_nursery() as nursery:
            await nursery.start(writer.run)
            for n in range(400):
                await writer.submit(create("alice", n, description="x" * 8000), replies)
            writer.close()
        assert store.map_usage()[1] > 1024 * 1024
        store.close()
        return replies.outcomes

    replies = trio.run(main)
    assert [o.status for o in replies] == ["applied"] * 400
    assert [o.seq for o in replies] == list(range(1, 401))
    reopened = open_store(tmp_path, map_size=1024 * 1024)
    assert reopened.current_seq("p1") == 400


def test_count_pruning_forgets_the_idempotency_records_of_forgotten_changes(tmp_path):
    store = open_store(tmp_path, history_max_changes=2)
    store.commit_batch([create("alice", n) for n in range(4)])
    (old,) = store.commit_batch([create("alice", 0)])
    (recent,) = store.commit_batch([create("alice", 3)])
    assert recent.status == "replayed"
    assert old.status != "replayed"  # its record went with its change
    with store.env.begin() as txn:
        assert sum(1 for _ in txn.cursor(db=store.idem)) == sum(1 for _ in txn.cursor(db=store.idem_by_seq))


def test_an_id_deleted_before_the_history_is_forgotten_with_it(tmp_path):
    """The id index stays bounded by the retention: a deletion that left the history
    takes its id along, while live events and recent deletions keep theirs."""
    store = open_store(tmp_path, history_retention=60)
    old = now_ms() - 3_600_000
    kept, gone, recent = (create("alice", n, at=old) for n in range(3))
    store.commit_batch([kept, gone, recent])

    def delete(m: Mutation, n: int, at: int) -> Mutation:
        return Mutation("delete", user_id="alice", envelope_id=f"del-{n}", project_id="p1", event_id=m.event_id,
                        base_version=1, received_ms=at)

    store.commit_batch([delete(gone, 1, old)])
    store.commit_batch([delete(recent, 2, now_ms())])
    store.prune(now_ms=now_ms())
    assert store.projects_of(kept.event_id) == ["p1"]  # alive: its id stays
    assert store.projects_of(recent.event_id) == ["p1"]  # deleted within the history: still refused
    assert store.projects_of(gone.event_id) == []  # deleted before it: forgotten
    (again,) = store.commit_batch([create("bob", 9, id=gone.event_id)])
    assert again.status == "applied"
    (refused,) = store.commit_batch([create("bob", 10, id=recent.event_id)])
    assert refused.status == "error" and refused.error.code == "exists"
