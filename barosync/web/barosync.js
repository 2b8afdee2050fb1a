// barosync browser client: one dependency-free ES module (no build step).
//
//   import { SyncClient } from "/client/barosync.js";
//   const client = new SyncClient("ws://127.0.0.1:8080/ws", { token });
//   client.addEventListener("change", (e) => render(client.events("demo")));
//   await client.subscribe("demo");
//   const event = await client.create("demo", { title: "Standup", startDate, endDate });
//
// Wire protocol v1 (docs/protocol.md). The local view of a project is the server's
// state (as of the last seq applied) + own changes the server acked + the queue of
// own changes not acked yet, folded in that order: a refused change simply leaves the
// queue, so the view reverts by construction. The queue lives in IndexedDB (memory
// where IndexedDB is unavailable); every entry has its envelope id from the start, so
// a replay after a reconnect, a reload or another tab is applied once. Tabs of one
// origin share the queue: the tab holding a Web Lock flushes it, BroadcastChannel
// tells the others at once. Full API and events: docs/web-client.md.

/** @typedef {"connecting"|"connected"|"reconnecting"|"offline"|"needs-auth"|"closed"} ConnectionState */

/** Whether the browser says the network is gone (navigator.onLine false). */
const browserOffline = () => !!globalThis.navigator && navigator.onLine === false;
/** @typedef {{id: string, projectId: string, title: string, startDate: string, endDate: string, version: number, [k: string]: any}} CalendarEvent */

// What an HTTP token (RFC 9110), and so a WebSocket subprotocol, may hold: every JWT does.
const SUBPROTOCOL_SAFE = /^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$/;
const DB_VERSION = 2;
const BACKOFF = { initial: 1000, factor: 1.5, max: 30000 };
// Errors after which a queued change stays queued and goes again after `retryAfter`.
const RETRYABLE = new Set(["rate_limited", "storage_full", "storage_failed"]);
const AUTH_CLOSE_CODES = new Set([4001, 4003]);
// Sent at most this many at once; the rest wait for answers.
const MAX_IN_FLIGHT = 32;
// Changes applied within this many ms are acked together, one cumulative ack
// ({projectId, seq}) per project, when the server's hello offers it (docs/protocol.md).
const ACK_INTERVAL_MS = 100; // when the server's hello gives no ackIntervalMs

// The cadence the server asks for (hello.ackIntervalMs), kept between 10 ms and 10 s.
function ackInterval(hello) {
  const ms = hello && hello.ackIntervalMs;
  return Number.isFinite(ms) ? Math.min(10000, Math.max(10, ms)) : ACK_INTERVAL_MS;
}
const CHANGE_TYPES = new Set(["event:created", "event:updated", "event:deleted"]);
const SERVER_FIELDS = new Set(["version", "createdAt", "updatedAt", "createdBy", "updatedBy"]);

/** A change the server refused; `code` is the protocol's error code. */
export class MutationRefused extends Error {
  constructor(code, message, field) {
    super(message);
    this.name = "MutationRefused";
    this.code = code;
    this.field = field;
  }
}

/** The server left a conflict to the user: `conflict` is the conflict:detected payload. */
export class ConflictError extends Error {
  constructor(conflict) {
    super(`conflict on ${conflict.id}: ${(conflict.fields || []).join(", ") || "deleted meanwhile"}`);
    this.name = "ConflictError";
    this.conflict = conflict;
  }
}

export function uuid() {
  return globalThis.crypto && crypto.randomUUID ? crypto.randomUUID()
    : "xxxxxxxx-xxxx-4xxx-yxxx-xxxxxxxxxxxx".replace(/[xy]/g, (c) => {
      const r = (Math.random() * 16) | 0;
      return (c === "x" ? r : (r & 0x3) | 0x8).toString(16);
    });
}

/** Full jitter: a random delay up to 1 s × 1.5^attempt, at most 30 s. */
export function backoffDelay(attempt, random = Math.random) {
  return random() * Math.min(BACKOFF.max, BACKOFF.initial * BACKOFF.factor ** attempt);
}

// -- persistence ------------------------------------------------------------------------

// A project's copy is kept event by event, so a change costs one small write; a change
// acked by the server is stored in the same transaction that removes it from the queue,
// so a reload never finds it in neither place.
//   queue:    envelopeId -> queued change
//   projects: projectId  -> {projectId, seq, dataId}
//   events:   [projectId, id] -> event (with __seq/__deleted while acked ahead of the copy)

class MemoryStorage {
  constructor() { this.kind = "memory"; this.queue = new Map(); this.projects = new Map(); this.events = new Map(); }
  async open() { return this; }
  async allQueued() { return [...this.queue.values()].sort((a, b) => a.seqNo - b.seqNo); }
  async putQueued(item) { this.queue.set(item.envelopeId, item); }
  async loadProject(projectId) {
    const meta = this.projects.get(projectId);
    if (!meta) return undefined;
    return { ...meta, events: [...this.events.values()].filter((e) => e.projectId === projectId) };
  }
  async write({ meta, puts = [], deletes = [], replace = false, dequeue = null }) {
    if (dequeue) this.queue.delete(dequeue);
    if (!meta) return;
    if (replace) for (const [k, e] of this.events) if (e.projectId === meta.projectId) this.events.delete(k);
    for (const id of deletes) this.events.delete(`${meta.projectId}\0${id}`);
    for (const e of puts) this.events.set(`${meta.projectId}\0${e.id}`, { ...e, projectId: meta.projectId });
    this.projects.set(meta.projectId, meta);
  }
  close() {}
}

class IndexedDBStorage {
  constructor(name) { this.kind = "indexeddb"; this.name = name; this.db = null; }

  open() {
    return new Promise((resolve, reject) => {
      const req = indexedDB.open(this.name, DB_VERSION);
      req.onupgradeneeded = () => {
        const db = req.result;
        for (const name of [...db.objectStoreNames]) if (name !== "queue") db.deleteObjectStore(name);
        if (!db.objectStoreNames.contains("queue")) db.createObjectStore("queue", { keyPath: "envelopeId" });
        db.createObjectStore("projects", { keyPath: "projectId" });
        db.createObjectStore("events", { keyPath: ["projectId", "id"] });
      };
      req.onsuccess = () => { this.db = req.result; resolve(this); };
      req.onerror = () => reject(req.error);
      req.onblocked = () => reject(new Error("IndexedDB open blocked"));
    });
  }

  _tx(stores, mode, fn) {
    return new Promise((resolve, reject) => {
      const tx = this.db.transaction(stores, mode);
      let result;
      tx.oncomplete = () => resolve(result);
      tx.onerror = () => reject(tx.error);
      tx.onabort = () => reject(tx.error);
      fn(tx, (value) => { result = value; });
    });
  }

  allQueued() {
    return this._tx("queue", "readonly", (tx, done) => {
      const req = tx.objectStore("queue").getAll();
      req.onsuccess = () => done(req.result.sort((a, b) => a.seqNo - b.seqNo));
    });
  }

  putQueued(item) { return this._tx("queue", "readwrite", (tx) => tx.objectStore("queue").put(item)); }

  loadProject(projectId) {
    return this._tx(["projects", "events"], "readonly", (tx, done) => {
      const meta = tx.objectStore("projects").get(projectId);
      const events = tx.objectStore("events").getAll(IDBKeyRange.bound([projectId], [projectId, []]));
      events.onsuccess = () => done(meta.result ? { ...meta.result, events: events.result } : undefined);
    });
  }

  write({ meta, puts = [], deletes = [], replace = false, dequeue = null }) {
    return this._tx(["queue", "projects", "events"], "readwrite", (tx) => {
      if (dequeue) tx.objectStore("queue").delete(dequeue);
      if (!meta) return;
      const events = tx.objectStore("events");
      if (replace) events.delete(IDBKeyRange.bound([meta.projectId], [meta.projectId, []]));
      for (const id of deletes) events.delete([meta.projectId, id]);
      for (const e of puts) events.put({ ...e, projectId: meta.projectId });
      tx.objectStore("projects").put(meta);
    });
  }

  close() { if (this.db) this.db.close(); this.db = null; }
}

async function openStorage(option, name) {
  if (option && typeof option === "object") return option.open();
  if (option !== "memory" && typeof indexedDB !== "undefined") {
    try { return await new IndexedDBStorage(name).open(); } catch (e) { /* private mode and the like: memory */ }
  }
  return new MemoryStorage();
}

// -- the client ---------------------------------------------------------------------------

export class SyncClient extends EventTarget {
  /**
   * @param {string} url  ws://HOST:PORT/ws (http:// and a bare origin work too)
   * @param {{token: string | (() => string | null | Promise<string | null>), storage?: "indexeddb" | "memory",
   *          name?: string, WebSocket?: typeof WebSocket}} options
   */
  constructor(url, options = {}) {
    super();
    if (!options.token) throw new TypeError("SyncClient needs a token (a string or a function returning one)");
    this.url = wsUrl(url);
    this._tokenSource = options.token;
    this._WebSocket = options.WebSocket || globalThis.WebSocket;
    this._name = options.name || `barosync:${this.url}`;
    /** @type {ConnectionState} */
    this.state = "connecting";
    this.closeCode = null;
    this.closeReason = "";
    this.user = null;
    this.hello = null;
    this.storageKind = null;
    this._token = null;
    this._ws = null;
    this._refreshRef = null;  // the auth:refresh waiting for its ack
    this._attempt = 0;
    this._closed = false;
    this._timers = new Set();
    this._listeners = [];
    this._writes = Promise.resolve(); // the storage writes, one after another (_write)
    this._storing = new Map(); // envelope id -> a change being stored before it is queued
    this._lastEdit = new Map(); // "project\0event" -> the envelope id of this client's last change of it
    this._projects = new Map(); // projectId -> {seq, events: Map, settled: Map, live, wanted, presence: Map, cursors: Map}
    this._queue = new Map(); // envelopeId -> queued item
    this._inflight = new Set();
    this._promises = new Map(); // envelopeId -> {resolve, reject}
    this._subRefs = new Map(); // subscribe envelope id -> projectId
    this._subWaiters = new Map(); // projectId -> [resolve]
    this._pausedUntil = 0;
    this._pingSentAt = null;
    this._ackUpTo = new Map(); // projectId -> newest seq applied and not acked yet
    this._ackTimer = null;
    this._wakeAfterClose = false; // `online` came while an attempt begun offline was failing
    this._cursorTimer = null;
    this._cursorPending = null;
    this._cursorSentAt = 0;
    this._leader = false;
    this._releaseLock = null;
    this._seqNo = Date.now() * 1000;
    this._ready = this._start(options);
  }

  // -- lifecycle ------------------------------------------------------------------------

  async _start(options) {
    this._storage = await openStorage(options.storage, this._name);
    this.storageKind = this._storage.kind;
    this._emit("storage", { kind: this.storageKind });
    for (const item of await this._storage.allQueued()) this._queue.set(item.envelopeId, item);
    if (this._closed) return;
    // A view drawn before the queue was read (right after a reload) shows its changes now.
    for (const projectId of new Set([...this._queue.values()].map((i) => i.projectId))) {
      this._emitChange(projectId, { kind: "queue" });
    }
    this._channel = typeof BroadcastChannel !== "undefined" ? new BroadcastChannel(this._name) : null;
    if (this._channel) this._channel.onmessage = (e) => this._onTabMessage(e.data);
    this._listen(globalThis, "online", () => this._wake());
    // The browser says the network is gone: a socket that looks open is dead or soon
    // will be. Drop it now, and say so now: its close handshake may never finish (or
    // take long on a loaded machine). The `online` event brings an immediate retry.
    this._listen(globalThis, "offline", () => {
      if (this._ws) this._ws.close(1000, "browser offline");
      this._setState("offline");
    });
    if (typeof document !== "undefined") {
      this._listen(document, "visibilitychange", () => { if (document.visibilityState === "visible") this._wake(); });
    }
    // Own presence goes when the page does, not a heartbeat timeout later.
    this._listen(globalThis, "pagehide", () => { if (this._ws) this._ws.close(1000, "page hidden"); });
    this._listen(globalThis, "pageshow", (e) => { if (e.persisted) this._wake(); });
    this._takeLeadership();
    this._notifySync();
    this._connect();
  }

  /** Close the connection, timers, listeners, the lock and the channel; queued changes stay stored. */
  close() {
    if (this._closed) return;
    this._closed = true;
    for (const t of this._timers) clearTimeout(t);
    this._timers.clear();
    this._flushAcks();
    for (const [target, type, fn] of this._listeners) target.removeEventListener(type, fn);
    this._listeners = [];
    if (this._ws) { this._ws.onclose = null; this._ws.close(1000, "client closed"); this._ws = null; }
    if (this._releaseLock) this._releaseLock();
    else if (this._lockAbort) this._lockAbort.abort();
    if (this._channel) { this._channel.close(); this._channel = null; }
    this._ready.then(() => this._storage && this._storage.close());
    for (const { reject } of this._promises.values()) reject(new Error("client closed"));
    this._promises.clear();
    this._setState("closed");
  }

  /** Resolves when the local copy is loaded and a connection attempt has begun. */
  ready() { return this._ready; }

  // -- reading the local view ------------------------------------------------------------

  /** The events of a project as this client sees them: server state + own pending changes. */
  events(projectId) {
    const view = new Map(this._project(projectId).events);
    for (const [id, ev] of this._project(projectId).settled) {
      if (ev.__deleted) view.delete(id);
      else view.set(id, stripped(ev));
    }
    for (const item of this._sortedQueue()) {
      if (item.projectId !== projectId) continue;
      if (item.type === "event:delete") view.delete(item.eventId);
      else if (item.type === "event:create") view.set(item.eventId, { ...item.payload, version: 0, pending: true });
      else if (view.has(item.eventId)) view.set(item.eventId, { ...view.get(item.eventId), ...item.payload, version: view.get(item.eventId).version, pending: true });
    }
    return [...view.values()].map((e) => ({ ...e }));
  }

  /** One event from any subscribed project's local view, or undefined. */
  /**
   * An event by id: in ``projectId`` when given (an event is (project, id): the same id
   * may be in two projects, a calendar app's UID in two calendars), else the first
   * project this client knows that has it.
   */
  get(id, projectId) {
    const where = projectId !== undefined ? [projectId] : [...this._projects.keys()];
    for (const p of where) {
      const found = this._projects.has(p) ? this.events(p).find((e) => e.id === id) : undefined;
      if (found) return found;
    }
    return undefined;
  }

  /** Who is present in a project: [{id, name, avatar, color, lastSeen}]. */
  presence(projectId) { return [...this._project(projectId).presence.values()]; }

  /** The last seq of a project this client applied (null before its first snapshot). */
  lastSeq(projectId) { return this._project(projectId).seq; }

  /** Whether this user may change the project (false: a viewer); null until subscribed. */
  writable(projectId) { return this._project(projectId).writable; }

  /** Changes waiting for the server: count, the oldest one's age (ms) and a status. */
  syncStatus() {
    const items = [...this._queue.values()];
    const oldest = items.reduce((m, i) => Math.min(m, i.createdAt), Infinity);
    const status = items.length === 0 ? "synced" : this.state === "connected" ? "saving" : "offline";
    return { pending: items.length, oldestPendingAge: items.length ? Date.now() - oldest : 0, status };
  }

  // -- subscriptions -----------------------------------------------------------------------

  /** Follow a project; resolves once the local copy has caught up with the server. */
  async subscribe(projectId) {
    await this._ready;
    const p = this._project(projectId);
    p.wanted = true;
    if (p.seq === null) {
      const saved = await this._storage.loadProject(projectId);
      if (saved && p.seq === null && (!this.hello || saved.dataId === this.hello.dataId)) {
        p.seq = saved.seq;
        p.dataId = saved.dataId;
        for (const e of saved.events) {
          if (e.__seq > saved.seq) p.settled.set(e.id, e);
          else if (!e.__deleted) p.events.set(e.id, stripped(e));
        }
        this._emitChange(projectId, { kind: "snapshot" });
      }
    }
    const caughtUp = new Promise((resolve) => {
      const list = this._subWaiters.get(projectId) || [];
      list.push(resolve);
      this._subWaiters.set(projectId, list);
    });
    if (this.state === "connected") this._sendSubscribe(projectId);
    return caughtUp;
  }

  unsubscribe(projectId) {
    const p = this._project(projectId);
    p.wanted = false;
    p.live = false;
    if (this.state === "connected") this._send({ type: "unsubscribe", id: uuid(), payload: { projectId } });
  }

  // -- changes --------------------------------------------------------------------------------

  /** Create an event; resolves with the server's copy once it is on disk. */
  create(projectId, fields) {
    const id = fields.id || uuid();
    return this._enqueue("event:create", projectId, id, { ...clientFields(fields), projectId, id });
  }

  /** Change fields of an event; based on the version this client has. */
  update(id, changes, projectId) {
    const current = this.get(id, projectId);
    if (!current) return Promise.reject(new MutationRefused("not_found", `no event ${id} in a subscribed project`, "id"));
    return this._enqueue("event:update", current.projectId, id,
      { ...clientFields(changes), id, projectId: current.projectId }, current.version);
  }

  /**
   * Bring back an event deleted in its project (an undo), with its id, its fields and
   * its history: it continues one version past its deletion, and everyone who saw it
   * go sees it come back. Queued like any change, so it works offline too.
   */
  restore(event) {
    return this._enqueue("event:create", event.projectId, event.id,
      { ...clientFields(event), projectId: event.projectId, id: event.id, restore: true });
  }

  delete(id, projectId) {
    const current = this.get(id, projectId);
    if (!current) return Promise.reject(new MutationRefused("not_found", `no event ${id} in a subscribed project`, "id"));
    return this._enqueue("event:delete", current.projectId, id, { id, projectId: current.projectId }, current.version);
  }

  /**
   * Settle a conflict the server left to the user: "remote" keeps what is stored,
   * "local" stores this client's version, an object stores those fields.
   */
  async resolve(conflict, choice) {
    const remote = conflict.remoteVersion;
    if (choice === "remote") return remote || undefined;
    const fields = choice === "local" ? (conflict.localVersion || {}) : choice;
    if (!remote) {
      if (conflict.operation === "delete") return undefined;
      // Deleted meanwhile: ids are never reused, so keeping ours makes a new event.
      const { id, ...rest } = fields;
      return this.create(conflict.projectId, rest);
    }
    if (conflict.operation === "delete" && choice === "local") {
      return this._enqueue("event:delete", conflict.projectId, conflict.id,
        { id: conflict.id, projectId: conflict.projectId }, remote.version);
    }
    const changes = {};
    for (const [k, v] of Object.entries(clientFields(fields))) {
      if (JSON.stringify(v) !== JSON.stringify(remote[k])) changes[k] = v;
    }
    return this._enqueue("event:update", conflict.projectId, conflict.id,
      { ...changes, id: conflict.id, projectId: conflict.projectId }, remote.version);
  }

  /** Share the pointer; throttled to the server's cursor rate, the latest position wins. */
  moveCursor(projectId, x, y, elementId) {
    this._cursorPending = { projectId, x, y, ...(elementId !== undefined ? { elementId } : {}) };
    if (this._cursorTimer) return;
    const rate = (this.hello && this.hello.cursorRate) || 20;
    const wait = Math.max(0, this._cursorSentAt + 1000 / rate - Date.now());
    this._cursorTimer = this._later(() => {
      this._cursorTimer = null;
      const c = this._cursorPending;
      this._cursorPending = null;
      if (c && this.state === "connected") {
        this._cursorSentAt = Date.now();
        this._send({ type: "user:cursor", payload: c });
      }
    }, wait);
  }

  async _enqueue(type, projectId, eventId, payload, version) {
    await this._ready;
    if (this._closed) throw new Error("client closed");
    if (version !== undefined) payload = { ...payload, version };
    const item = { envelopeId: uuid(), seqNo: this._seqNo++, type, projectId, eventId, payload, createdAt: Date.now() };
    // An edit of an event this client still has an edit of in the queue is based on
    // that edit, whose version only its ack tells: it waits for it (_flush), and is
    // sent with that version (_settle). Sent at once, it would carry the version both
    // were based on and conflict with this person's own change.
    const key = `${projectId}\0${eventId}`;
    const before = this._lastEdit.get(key);
    if (type !== "event:create" && before && this._waiting(before)) item.after = before;
    this._lastEdit.set(key, item.envelopeId);
    const done = new Promise((resolve, reject) => this._promises.set(item.envelopeId, { resolve, reject }));
    // Stored before it is sent: a tab closed now loses nothing.
    this._storing.set(item.envelopeId, item);
    try {
      await this._storage.putQueued(item);
    } finally {
      this._storing.delete(item.envelopeId);
    }
    // Its predecessor was acked while it was being stored (_rebase): store it as it is now.
    if (item.rebased) {
      delete item.rebased;
      this._storage.putQueued(item).catch(() => {});
    }
    this._queue.set(item.envelopeId, item);
    this._tell({ kind: "queued", item });
    this._emitChange(projectId, { kind: type.slice(6), id: eventId, local: true });
    this._notifySync();
    this._flush();
    return done;
  }

  _sortedQueue() { return [...this._queue.values()].sort((a, b) => a.seqNo - b.seqNo); }

  // -- tabs ----------------------------------------------------------------------------------

  _takeLeadership() {
    if (!(globalThis.navigator && navigator.locks)) { this._leader = true; return; }
    // Exactly one tab of this origin flushes the shared queue: the one holding the lock.
    this._lockAbort = new AbortController();
    navigator.locks.request(`${this._name}:flush`, { signal: this._lockAbort.signal }, () => {
      if (this._closed) return undefined;
      this._leader = true;
      this._emit("leader", { leader: true });
      this._flush();
      return new Promise((resolve) => { this._releaseLock = () => { this._leader = false; resolve(); }; });
    }).catch(() => { /* aborted by close() */ });
  }

  _tell(message) { if (this._channel) this._channel.postMessage(message); }

  async _onTabMessage(m) {
    if (m.kind === "queued") {
      this._queue.set(m.item.envelopeId, m.item);
      this._emitChange(m.item.projectId, { kind: m.item.type.slice(6), id: m.item.eventId, local: true });
      this._notifySync();
      this._flush();
    } else if (m.kind === "settled") {
      this._settle(m.envelopeId, m.outcome, false);
    }
  }

  // -- connection -------------------------------------------------------------------------------

  async _connect() {
    if (this._closed || this._ws) return;
    // While the browser says it is offline nothing is tried: every try would fail and
    // print an error; the `online` event tries at once.
    if (browserOffline()) { this.retryAt = null; this._setState("offline"); return; }
    this._setState(this._attempt === 0 ? "connecting" : "reconnecting");
    let token;
    try {
      token = typeof this._tokenSource === "function" ? await this._tokenSource() : this._tokenSource;
    } catch (e) {
      // The source could not answer (the server restarting, the network gone): that
      // is no verdict on the sign-in, so try again later. Only null means signed out.
      if (!this._closed && !this._ws) this._scheduleReconnect();
      return;
    }
    if (this._closed) return;
    if (!token || (token === this._refusedToken)) { this._needsAuth(4001, "no usable token"); return; }
    this._token = token;
    // The token goes as a subprotocol, not in the URL: a URL is what proxies log and
    // what the console prints when a connection fails (docs/protocol.md, "Connect").
    // (A token a subprotocol cannot carry, from some other auth plugin, goes in the URL.)
    const ws = SUBPROTOCOL_SAFE.test(token)
      ? new this._WebSocket(this.url, ["barosync.v1", `barosync.bearer.${token}`])
      : new this._WebSocket(`${this.url}?token=${encodeURIComponent(token)}`);
    this._ws = ws;
    let opened = false;
    ws.onopen = () => { opened = true; this._wakeAfterClose = false; };
    ws.onmessage = (m) => this._onFrame(m.data);
    ws.onclose = (e) => this._onClose(ws, e.code, e.reason, opened);
  }

  async _onClose(ws, code, reason, opened) {
    if (this._ws !== ws) return;
    this._ws = null;
    this._inflight.clear();
    this._pingSentAt = null;
    this._ackUpTo.clear();
    for (const p of this._projects.values()) { p.live = false; p.presence.clear(); }
    this.closeCode = code;
    this.closeReason = reason;
    if (this._closed) return;
    if (AUTH_CLOSE_CODES.has(code)) { this._refused(code, reason); return; }
    const online = !(globalThis.navigator && navigator.onLine === false);
    if (!opened && online && await this._tokenRefused()) { this._refused(4001, "token refused at the handshake"); return; }
    this._emitPresenceAll();
    this._scheduleReconnect();
  }

  // A browser hides the HTTP status of a refused handshake: ask the REST API instead.
  async _tokenRefused() {
    try {
      const r = await fetch(httpUrl(this.url, "/api/me"), { headers: { Authorization: `Bearer ${this._token}` } });
      return r.status === 401 || r.status === 403;
    } catch (e) {
      return false;
    }
  }

  _refused(code, reason) {
    if (typeof this._tokenSource === "function" && this._token !== this._refusedToken) {
      // A provider may have a fresh token: ask once more, then give up.
      this._refusedToken = this._token;
      this._later(() => this._connect(), 0);
      return;
    }
    this._needsAuth(code, reason);
  }

  _needsAuth(code, reason) {
    this.closeCode = code;
    this.closeReason = reason;
    this._setState("needs-auth");
  }

  /** Try again now (after needs-auth: with a new token from the provider, or `token`). */
  reconnect(token) {
    if (token) this._tokenSource = token;
    this._refusedToken = null;
    this._attempt = 0;
    this._wakeAfterClose = true;  // asked for: at once, not after a backoff step
    if (this._ws) this._ws.close(1000, "reconnect");
    else this._connect();
  }

  _scheduleReconnect() {
    // Offline: no timer at all; the `online` event tries again (no attempts that can
    // only fail, each printing a console error).
    if (browserOffline()) { this._wakeAfterClose = false; this.retryAt = null; this._setState("offline"); return; }
    // The network came back while an attempt begun offline was still failing: that
    // is the `online` event's immediate retry, not one more backoff step.
    const woken = this._wakeAfterClose;
    this._wakeAfterClose = false;
    const delay = woken ? 0 : backoffDelay(this._attempt++);
    this.retryAt = Date.now() + delay;
    this._setState("reconnecting");
    this._reconnectTimer = this._later(() => { this._reconnectTimer = null; this._connect(); }, delay);
  }

  _wake() {
    if (this._closed || this.state === "needs-auth") return;
    this._attempt = 0;  // the network or the page is back: the backoff starts over
    if (this._ws) { this._wakeAfterClose = this._ws.readyState !== 1; return; }
    if (this._reconnectTimer) { clearTimeout(this._reconnectTimer); this._timers.delete(this._reconnectTimer); this._reconnectTimer = null; }
    this._connect();
  }

  _later(fn, ms) {
    const t = setTimeout(() => { this._timers.delete(t); if (!this._closed) fn(); }, ms);
    this._timers.add(t);
    return t;
  }

  _send(message) {
    if (!this._ws || this._ws.readyState !== 1) return false;
    this._ws.send(JSON.stringify({ timestamp: Date.now(), ...message }));
    return true;
  }

  _sendSubscribe(projectId) {
    const p = this._project(projectId);
    const id = uuid();
    this._subRefs.set(id, projectId);
    p.snapshotParts = null;
    // A big snapshot comes in parts of at most the server's message size.
    const payload = { projectId, snapshotParts: true };
    if (p.seq !== null && p.dataId === this.hello.dataId) payload.since = p.seq;
    this._send({ type: "subscribe", id, payload });
  }

  // -- heartbeat: a hidden tab's late timers never kill a live connection -----------------

  _heartbeat() {
    const hb = this.hello.heartbeat || { interval: 30000, timeout: 60000 };
    const interval = Math.min(hb.interval, hb.timeout / 2);
    const tick = () => {
      if (!this._ws) return;
      // Dead only when a ping got no message back for a whole timeout after it was
      // sent. Messages are handled as they come even in a throttled tab, so a late
      // timer finds `_pingSentAt` cleared on a live connection.
      if (this._pingSentAt !== null && Date.now() - this._pingSentAt > hb.timeout / 2) {
        this._ws.close(4000, "heartbeat timeout");
        return;
      }
      if (this._pingSentAt === null) {
        this._pingSentAt = Date.now();
        this._send({ type: "ping" });
      }
      this._hbTimer = this._later(tick, interval);
    };
    this._hbTimer = this._later(tick, interval);
  }

  // Before the token expires, a fresh one from the token source goes to the server
  // (auth:refresh); its ack carries the new expiry, and the next refresh is scheduled
  // from that, for as long as the connection lives.
  _scheduleRefresh(exp = this.hello.tokenExpiresAt) {
    if (!exp || typeof this._tokenSource !== "function") return;
    const ws = this._ws;
    const left = exp - Date.now();
    const wait = Math.max(1000, Math.min(left - 60000, left / 2));
    this._later(async () => {
      let token = null;
      try { token = await this._tokenSource(); } catch (e) { /* keep the current one */ }
      if (token && token !== this._token && this._ws && this._ws === ws) {
        this._token = token;
        this._refreshRef = uuid();
        this._send({ type: "auth:refresh", id: this._refreshRef, payload: { token } });
      }
    }, wait);
  }

  // -- incoming -----------------------------------------------------------------------------------

  _onFrame(data) {
    let msg;
    try { msg = JSON.parse(data); } catch (e) { return; }
    this._pingSentAt = null;
    const items = msg.type === "batch" && Array.isArray(msg.payload) ? msg.payload : [msg];
    for (const m of items) this._onMessage(m);
  }

  _onMessage(msg) {
    const p = msg.payload || {};
    switch (msg.type) {
      case "hello": return this._onHello(msg, p);
      case "ack": return this._onAck(msg, p);
      case "error": return this._onError(p);
      case "conflict:detected": return this._onConflict(p);
      case "sync:snapshot": this._ackServer(msg); return this._onSnapshot(p);
      case "event:created": case "event:updated": case "event:deleted": this._ackServer(msg); return this._onChange(msg, p);
      case "user:joined": return this._onPresence(p, true);
      case "user:left": return this._onPresence(p, false);
      case "user:cursor": return this._emit("cursor", { ...p, projectId: p.projectId || msg.projectId });
      default: return undefined;
    }
  }

  _ackServer(msg) {
    if (!msg.id) return;
    if (this.hello && this.hello.cumulativeAcks && CHANGE_TYPES.has(msg.type)
        && Number.isInteger(msg.seq) && typeof msg.projectId === "string") {
      const acked = this._ackUpTo.get(msg.projectId);
      if (acked === undefined || msg.seq > acked) this._ackUpTo.set(msg.projectId, msg.seq);
      if (this._ackTimer === null) this._ackTimer = this._later(() => this._flushAcks(), ackInterval(this.hello));
      return;
    }
    this._send({ type: "ack", id: msg.id });
  }

  _flushAcks() {
    this._ackTimer = null;
    for (const [projectId, seq] of this._ackUpTo) this._send({ type: "ack", payload: { projectId, seq } });
    this._ackUpTo.clear();
  }

  _onHello(msg, p) {
    const previous = this.hello;
    this.hello = p;
    this.user = p.user;
    this._attempt = 0;
    this._refusedToken = null;
    this.retryAt = null;
    if (previous && previous.dataId !== p.dataId) {
      for (const proj of this._projects.values()) { proj.seq = null; proj.dataId = null; }
    }
    this._setState("connected");
    this._heartbeat();
    this._scheduleRefresh();
    for (const [projectId, proj] of this._projects) if (proj.wanted) this._sendSubscribe(projectId);
    this._flush();
  }

  _onAck(msg, p) {
    const ref = msg.id;
    if (ref && ref === this._refreshRef) {
      this._refreshRef = null;
      if (Number.isFinite(p.expiresAt)) this._scheduleRefresh(p.expiresAt);
      return;
    }
    if (this._subRefs.has(ref)) {
      const projectId = this._subRefs.get(ref);
      this._subRefs.delete(ref);
      const writable = p.writable !== false;  // a server before roles said nothing: all could write
      if (this._project(projectId).writable !== writable) {
        this._project(projectId).writable = writable;
        this._emit("access", { projectId, writable });
      }
      if (p.mode === "changes") this._caughtUpAt(projectId, p.seq);
      return;
    }
    if (this._queue.has(ref)) {
      this._settle(ref, { ok: true, answer: p }, true);
    }
  }

  _caughtUpAt(projectId, seq) {
    const proj = this._project(projectId);
    proj.target = seq;
    this._maybeLive(projectId);
  }

  _maybeLive(projectId) {
    const proj = this._project(projectId);
    if (proj.target === undefined || proj.seq === null || proj.seq < proj.target) return;
    // Every subscribe() waiting is answered at a caught-up point, also when the project
    // was live already: a subscribe() whose first answer came while it was still
    // loading the stored copy (the hello had already subscribed) waits for the next.
    for (const resolve of this._subWaiters.get(projectId) || []) resolve();
    this._subWaiters.delete(projectId);
    if (proj.live) return;
    proj.live = true;
    this._emit("sync", { ...this.syncStatus(), projectId, live: true });
  }

  _onSnapshot(p) {
    const proj = this._project(p.projectId);
    // A big snapshot comes in parts; the state changes once the last one is in.
    if (p.more === true) {
      if (!proj.snapshotParts) proj.snapshotParts = [];
      for (const e of p.events) proj.snapshotParts.push(e);
      return;
    }
    if (proj.snapshotParts) { p = { ...p, events: proj.snapshotParts.concat(p.events) }; proj.snapshotParts = null; }
    proj.seq = p.seq;
    proj.dataId = this.hello.dataId;
    proj.events = new Map(p.events.map((e) => [e.id, e]));
    for (const [id, ev] of proj.settled) if (ev.__seq <= p.seq) proj.settled.delete(id);
    proj.target = p.seq;
    this._write(p.projectId, { replace: true, puts: [...proj.events.values(), ...proj.settled.values()] });
    this._emitChange(p.projectId, { kind: "snapshot" });
    this._maybeLive(p.projectId);
  }

  _onChange(msg, p) {
    const projectId = msg.projectId || p.projectId;
    const proj = this._project(projectId);
    const seq = msg.seq;
    if (proj.seq === null || seq <= proj.seq) return; // before the snapshot, or seen already
    if (seq !== proj.seq + 1) {
      // A gap: ask for what is missing rather than apply out of order.
      proj.live = false;
      this._sendSubscribe(projectId);
      return;
    }
    this._apply(proj, msg.type, p, seq);
    this._write(projectId, msg.type === "event:deleted" ? { deletes: [p.id] } : { puts: [p] });
    this._emitChange(projectId, { kind: msg.type.slice(6), id: p.id, seq, userId: msg.userId, event: msg.type === "event:deleted" ? undefined : p });
    this._maybeLive(projectId);
  }

  _apply(proj, type, p, seq) {
    proj.seq = seq;
    if (type === "event:deleted") proj.events.delete(p.id);
    else proj.events.set(p.id, p);
    const settled = proj.settled.get(p.id);
    if (settled && settled.__seq <= seq) proj.settled.delete(p.id);
  }

  _onError(p) {
    const ref = p.ref;
    if (ref && this._subRefs.has(ref)) {
      const projectId = this._subRefs.get(ref);
      this._subRefs.delete(ref);
      this._project(projectId).wanted = false;
      this._emit("error", { ...p, projectId });
      return;
    }
    if (ref && this._queue.has(ref)) {
      if (RETRYABLE.has(p.code)) {
        // Nothing was stored: keep it, send it again after retryAfter.
        this._inflight.delete(ref);
        const wait = 1000 * (typeof p.retryAfter === "number" ? p.retryAfter : 1);
        this._pausedUntil = Date.now() + Math.min(60000, Math.max(50, wait));
        this._emit("sync", { ...this.syncStatus(), error: p });
        this._later(() => this._flush(), this._pausedUntil - Date.now());
        return;
      }
      this._settle(ref, { ok: false, error: p }, true);
      return;
    }
    this._emit("error", p);
  }

  _onConflict(p) {
    // A conflict the strategy settled (merge, last-write-wins) comes after its ack,
    // which already settled the change: then this only informs.
    if (p.ref && this._queue.has(p.ref)) this._settle(p.ref, { ok: false, conflict: p }, true);
    this._emit("conflict", { conflict: p });
  }

  _onPresence(p, joined) {
    const proj = this._project(p.projectId);
    if (joined) proj.presence.set(p.id, p);
    else { proj.presence.delete(p.id); proj.cursors.delete(p.id); }
    this._emit("presence", { projectId: p.projectId, users: this.presence(p.projectId), user: p, joined });
  }

  _emitPresenceAll() {
    for (const [projectId] of this._projects) this._emit("presence", { projectId, users: [] });
  }

  // -- the queue --------------------------------------------------------------------------

  _flush() {
    if (!this._leader || this.state !== "connected" || Date.now() < this._pausedUntil) return;
    for (const item of this._sortedQueue()) {
      if (this._inflight.size >= MAX_IN_FLIGHT) break;
      if (this._inflight.has(item.envelopeId)) continue;
      if (item.after && this._waiting(item.after)) continue;  // its predecessor's ack first
      this._inflight.add(item.envelopeId);
      this._send({ type: item.type, id: item.envelopeId, payload: item.payload });
    }
  }

  async _settle(envelopeId, outcome, tellOthers) {
    const item = this._queue.get(envelopeId);
    if (!item) return;
    this._queue.delete(envelopeId);
    this._inflight.delete(envelopeId);
    this._rebase(envelopeId, outcome, tellOthers);
    const key = `${item.projectId}\0${item.eventId}`;
    if (this._lastEdit.get(key) === envelopeId) this._lastEdit.delete(key);
    const proj = this._project(item.projectId);
    let change = {};
    if (outcome.ok) {
      const a = outcome.answer;
      const ev = a.event;
      if (a.seq && (proj.seq === null || a.seq > proj.seq)) {
        if (proj.seq !== null && a.seq === proj.seq + 1) {
          this._apply(proj, ev ? "event:updated" : "event:deleted", ev || { id: item.eventId }, a.seq);
          change = ev ? { puts: [ev] } : { deletes: [item.eventId] };
        } else {
          // Acked before this copy reached its seq: shown as acked until it does.
          const settled = ev ? { ...ev, __seq: a.seq } : { id: item.eventId, __deleted: true, __seq: a.seq };
          proj.settled.set(item.eventId, settled);
          change = { puts: [settled] };
        }
      }
    }
    if (tellOthers) {
      // Out of the queue and into the copy in one transaction: a reload finds it in one.
      await this._write(item.projectId, { ...change, dequeue: envelopeId });
      this._tell({ kind: "settled", envelopeId, outcome });
    }
    const waiter = this._promises.get(envelopeId);
    this._promises.delete(envelopeId);
    if (waiter) {
      if (outcome.ok) waiter.resolve(outcome.answer.event ? stripped(outcome.answer.event) : undefined);
      else if (outcome.conflict) waiter.reject(new ConflictError(outcome.conflict));
      else waiter.reject(new MutationRefused(outcome.error.code, outcome.error.message, outcome.error.field));
    }
    this._emitChange(item.projectId, { kind: "settled", id: item.eventId, ok: outcome.ok, local: true });
    this._notifySync();
    this._flush();
  }

  /** Whether a change of this client is still to be acked (queued, or being stored). */
  _waiting(envelopeId) { return this._queue.has(envelopeId) || this._storing.has(envelopeId); }

  /** The edits waiting for this one (_enqueue's `after`): based on its acked version
   *  now; after a refusal or a conflict, on what they were based on (the server then
   *  says what clashes). */
  _rebase(envelopeId, outcome, persist) {
    const version = outcome.ok && outcome.answer && outcome.answer.event ? outcome.answer.event.version : null;
    for (const [id, next] of this._queue) {
      if (next.after !== envelopeId) continue;
      const { after, ...rest } = next;
      const rebased = version === null ? rest : { ...rest, payload: { ...rest.payload, version } };
      this._queue.set(id, rebased);
      if (persist) this._storage.putQueued(rebased).catch(() => {});
    }
    // One still being stored (an undo pressed as the ack came): changed in place,
    // _enqueue queues it so (it would otherwise go with the old version and conflict).
    for (const next of this._storing.values()) {
      if (next.after !== envelopeId) continue;
      delete next.after;
      if (version !== null) next.payload = { ...next.payload, version };
      next.rebased = true;
    }
  }

  // -- bookkeeping ----------------------------------------------------------------------------

  _project(projectId) {
    let p = this._projects.get(projectId);
    if (!p) {
      p = { seq: null, dataId: null, events: new Map(), settled: new Map(), live: false, wanted: false,
            presence: new Map(), cursors: new Map(), target: undefined, writable: null };
      this._projects.set(projectId, p);
    }
    return p;
  }

  _write(projectId, change) {
    const p = this._project(projectId);
    const meta = p.seq === null ? null : { projectId, seq: p.seq, dataId: p.dataId };
    if (!this._storage || (!meta && !change.dequeue)) return Promise.resolve();
    // One after another, in the order asked, and never in the task that asked: a
    // snapshot's thousands of puts would hold the main thread before the page could
    // draw what just arrived.
    const storage = this._storage;
    const run = this._writes.then(() => new Promise((r) => setTimeout(r, 0))).then(() => storage.write({ meta, ...change }));
    this._writes = run.catch(() => {});
    return run.catch((e) => this._emit("error", { code: "storage", message: String(e), ref: null }));
  }

  _setState(state) {
    if (this.state === state && state !== "reconnecting") return;
    this.state = state;
    this._emit("state", { state, code: this.closeCode, reason: this.closeReason, retryAt: this.retryAt || null });
    this._notifySync();
  }

  _notifySync() { this._emit("sync", this.syncStatus()); }

  _emitChange(projectId, detail) { this._emit("change", { projectId, ...detail }); }

  _emit(type, detail) { this.dispatchEvent(new CustomEvent(type, { detail })); }

  _listen(target, type, fn) {
    if (!target || !target.addEventListener) return;
    target.addEventListener(type, fn);
    this._listeners.push([target, type, fn]);
  }
}

function clientFields(fields) {
  const out = {};
  for (const [k, v] of Object.entries(fields || {})) if (!SERVER_FIELDS.has(k) && k !== "pending") out[k] = v;
  return out;
}

function stripped(event) {
  const { __seq, ...rest } = event;
  return rest;
}

function wsUrl(url) {
  const u = new URL(url, globalThis.location ? globalThis.location.href : undefined);
  if (u.protocol === "http:") u.protocol = "ws:";
  if (u.protocol === "https:") u.protocol = "wss:";
  if (u.pathname === "/" || u.pathname === "") u.pathname = "/ws";
  u.search = "";
  return u.toString();
}

function httpUrl(url, path) {
  const u = new URL(url);
  u.protocol = u.protocol === "wss:" ? "https:" : "http:";
  u.pathname = path;
  u.search = "";
  return u.toString();
}
