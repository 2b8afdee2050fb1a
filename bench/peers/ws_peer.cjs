// The Node bench peer: a minimal `ws` server (what a Node developer would write),
// speaking the same envelope subset as bench/peers/websockets_peer.py:
//
// * `hello` first; `subscribe`/`unsubscribe` -> join/leave the project's room, `ack`;
// * `event:create` -> the project's next `seq`; `event:created` to the rest of the
//   room, `ack` {event, seq} to the sender;
// * `user:cursor` -> to the rest of the room, no `id`, no throttle;
// * `ping` -> `pong`; `ack` is ignored; anything else gets `error`.
//
// With `--durable FILE` a create is first validated and inserted into SQLite
// (better-sqlite3; WAL, synchronous=FULL, so every COMMIT is fsynced) and only
// acked and fanned out after its COMMIT: every create that arrived in one turn of
// the event loop goes into one transaction (setImmediate), the group commit a Node
// developer gets for free. It keeps no idempotency record and no history: it does
// less per create than barosync, which is the point of measuring against it.
//
// Usage: node bench/peers/ws_peer.cjs --port 0 [--host 127.0.0.1] [--durable FILE]
// (NODE_PATH must reach `ws`, and `better-sqlite3` for --durable: `make bench`
// installs both into .venv/node). Prints `listening on http://HOST:PORT`; SIGTERM
// exits at once.
"use strict";

const { WebSocketServer } = require("ws");

function arg(name, fallback) {
  const i = process.argv.indexOf(name);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const host = arg("--host", "127.0.0.1");
const port = Number(arg("--port", "0"));
const durableFile = arg("--durable", null);

const rooms = new Map(); // project -> Set of sockets
const seqs = new Map(); // project -> last seq
let ids = 0;

function room(pid) {
  let r = rooms.get(pid);
  if (r === undefined) {
    r = new Set();
    rooms.set(pid, r);
  }
  return r;
}

function nextSeq(pid) {
  const seq = (seqs.get(pid) || 0) + 1;
  seqs.set(pid, seq);
  return seq;
}

function broadcast(pid, except, msg) {
  const r = rooms.get(pid);
  if (r === undefined) return;
  for (const c of r) if (c !== except && c.readyState === 1) c.send(msg);
}

function created(ws, mid, pid, event, seq) {
  broadcast(pid, ws, JSON.stringify({ type: "event:created", id: `s${++ids}`, seq, projectId: pid,
                                      userId: "peer", payload: event }));
  if (ws.readyState === 1) ws.send(JSON.stringify({ type: "ack", id: mid, payload: { event, seq } }));
}

function invalid(p) {
  if (typeof p.projectId !== "string" || !p.projectId) return "projectId";
  if (typeof p.title !== "string" || !p.title || p.title.length > 500) return "title";
  const start = Date.parse(p.startDate), end = Date.parse(p.endDate);
  if (Number.isNaN(start)) return "startDate";
  if (Number.isNaN(end) || end < start) return "endDate";
  return null;
}

// -- durable mode: better-sqlite3, one transaction per turn of the event loop --------
let store = null;
if (durableFile) {
  const Database = require("better-sqlite3");
  const db = new Database(durableFile);
  db.pragma("journal_mode = WAL");
  db.pragma("synchronous = FULL");
  db.exec("CREATE TABLE IF NOT EXISTS events (project TEXT NOT NULL, id TEXT NOT NULL, seq INTEGER NOT NULL, " +
          "body TEXT NOT NULL, PRIMARY KEY (project, id))");
  const insert = db.prepare("INSERT INTO events (project, id, seq, body) VALUES (?, ?, ?, ?)");
  const pending = [];
  const commit = db.transaction((items) => {
    for (const it of items) insert.run(it.pid, it.event.id, it.seq, it.body);
  });
  function flush() {
    const items = pending.splice(0);
    try {
      commit(items);
    } catch (e) {
      for (const it of items) {
        if (it.ws.readyState === 1) it.ws.send(JSON.stringify({ type: "error", id: `s${++ids}`,
          payload: { code: "internal", message: String(e), ref: it.mid } }));
      }
      return;
    }
    for (const it of items) created(it.ws, it.mid, it.pid, it.event, it.seq);
  }
  store = (ws, mid, pid, event, seq) => {
    if (pending.length === 0) setImmediate(flush);
    pending.push({ ws, mid, pid, event, seq, body: JSON.stringify(event) });
  };
}

const wss = new WebSocketServer({ host, port, backlog: 4096, perMessageDeflate: false });

wss.on("connection", (ws) => {
  const joined = new Set();
  const session = ++ids;
  ws.send(JSON.stringify({ type: "hello", id: `s${++ids}`,
                           payload: { sessionId: `peer-${session}`, server: "ws-peer" } }));
  ws.on("message", (data) => {
    let m;
    try {
      m = JSON.parse(data);
    } catch (e) {
      ws.send(JSON.stringify({ type: "error", id: `s${++ids}`, payload: { code: "bad_message", message: "unparsable" } }));
      return;
    }
    const t = m.type, mid = m.id, payload = m.payload || {};
    if (t === "ack") return;
    if (t === "ping") {
      ws.send(JSON.stringify({ type: "pong", timestamp: m.timestamp }));
    } else if (t === "subscribe" || t === "unsubscribe") {
      const pid = payload.projectId;
      if (t === "subscribe") { room(pid).add(ws); joined.add(pid); } else { room(pid).delete(ws); joined.delete(pid); }
      ws.send(JSON.stringify({ type: "ack", id: mid, payload: { projectId: pid } }));
    } else if (t === "user:cursor") {
      let pid = payload.projectId;
      if (pid === undefined && joined.size === 1) pid = joined.values().next().value;
      if (!joined.has(pid)) return;
      broadcast(pid, ws, JSON.stringify({ type: "user:cursor", projectId: pid, payload: {
        userId: `peer-${session}`, x: payload.x, y: payload.y, elementId: payload.elementId,
        timestamp: Date.now(), projectId: pid } }));
    } else if (t === "event:create") {
      const pid = payload.projectId;
      const event = Object.assign({}, payload);
      if (event.id === undefined) event.id = `ev${++ids}`;
      event.version = 1;
      if (store !== null) {
        const bad = invalid(event);
        if (bad !== null) {
          ws.send(JSON.stringify({ type: "error", id: `s${++ids}`,
                                   payload: { code: "invalid", message: `bad ${bad}`, field: bad, ref: mid } }));
          return;
        }
        // seq taken now, in arrival order; sent after the commit, in the same order
        store(ws, mid, pid, event, nextSeq(pid));
      } else {
        created(ws, mid, pid, event, nextSeq(pid));
      }
    } else {
      ws.send(JSON.stringify({ type: "error", id: `s${++ids}`, payload: { code: "unknown_type", message: String(t), ref: mid } }));
    }
  });
  ws.on("close", () => {
    for (const pid of joined) {
      const r = rooms.get(pid);
      if (r !== undefined) r.delete(ws);
    }
  });
  ws.on("error", () => {});
});

wss.on("listening", () => {
  const a = wss.address();
  process.stdout.write(`listening on http://${a.address}:${a.port}\n`);
});

process.on("SIGTERM", () => process.exit(0));
process.on("SIGINT", () => process.exit(0));
