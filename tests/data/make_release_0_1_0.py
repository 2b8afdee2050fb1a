"""How tests/data/release-0.1.0.tar.gz was made: a data directory as barosync 0.1.0
(LMDB schema 1: an event id unique on the whole server) left it. Run with that release
(commit 85f2db6 or before), then `tar czf release-0.1.0.tar.gz -C DIR data.mdb secret`;
tests/test_identity.py opens it with this one. Not a test: kept to show what is inside."""
import sys
from pathlib import Path
from barosync.config import Config
from barosync.store import Store, Mutation
from barosync.models import new_event, changed_fields

out = Path(sys.argv[1])
config = Config(data_dir=out, map_size=1024 * 1024)
store = Store(out, map_size=config.map_size, config=config)
n = 0
def run(kind, user, project, event_id, **kw):
    global n
    n += 1
    m = Mutation(kind, user_id=user, envelope_id=f"env-{n}", project_id=project, event_id=event_id,
                 reply=lambda *_: None, received_ms=1764900000000 + n * 1000, **kw)
    [o] = store.commit_batch([m])
    assert o.status == "applied", (o.status, o.error)
    return o
def ev(project, id, title, **f):
    return new_event({"projectId": project, "id": id, "title": title, "startDate": "2026-12-07T09:00:00Z",
                      "endDate": "2026-12-07T10:00:00Z", **f}, user_id="alice", now_ms=1764900000000 + n * 1000)
run("create", "alice", "team", "standup", event=ev("team", "standup", "Standup", location="Room 1"))
run("update", "bob", "team", "standup", base_version=1, changes=changed_fields({"title": "Daily standup"}))
run("create", "alice", "team", "gone", event=ev("team", "gone", "Cancelled"))
run("delete", "alice", "team", "gone", base_version=1)
run("create", "bob", "ops", "weekly", event=ev("ops", "weekly", "Weekly", recurrence={"rrule": "FREQ=WEEKLY;COUNT=10"}))
run("update", "bob", "ops", "weekly", base_version=1, changes=changed_fields({"location": "Lab"}))
run("create", "carol", "ops", "retro", event=ev("ops", "retro", "Retro", attendees=["alice", "bob"]))
store.close()
(out / "secret").write_text("legacy-secret-of-release-0.1.0-0123456789abcdef\n")
print("wrote", out)
