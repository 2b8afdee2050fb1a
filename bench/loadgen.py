"""barosync bench load generator: many WebSocket clients in one epoll loop.

A deliberately minimal RFC 6455 client over raw non-blocking sockets, so that the
benchmark measures the server and not the client:

* one ``select.epoll`` loop, one ``recv`` per readable socket per turn, every frame in
  the buffer parsed at once, and everything the client has to say back (acks, new
  creates) joined into a single ``send``;
* client frames are masked (the mask bit is set, as RFC 6455 requires) with the
  all-zero key, so the payload goes out unchanged and masking costs nothing;
* messages are parsed with orjson.

Clients behave like the seed browser client: they ack (``{"type":"ack","id":…}``)
every server message that carries an ``id`` and is not an ``ack`` or ``pong``, answer
WebSocket pings, and send a JSON ``ping`` every ``ping_interval`` seconds.

It is driven by ``bench/run.py``: the configuration is one JSON argument; progress
and results are JSON lines on stdout; commands come as lines on stdin:

* it connects and subscribes every client, then prints ``{"event": "ready", …}``;
* ``go`` starts the measured phase (writers write for ``duration`` seconds, then it
  drains) and ends with ``{"event": "done", …}``;
* ``quit`` (or EOF) closes everything and exits.

Cursor movers (group ``mode: "cursor"``, the presence scenario) send
``{"type":"user:cursor","payload":{"projectId":P,"x":MOVER,"y":N,"elementId":"T"}}``
at ``rate`` per second with no ``id`` (cursors are never acked): ``x`` is the mover's
index, ``y`` its running count and ``elementId`` the send time (CLOCK_REALTIME ns,
shared by every client of the process), so each receiver gets the latency and can
count, per mover, how many of the cursors sent reached it (the rest were coalesced
by the server's per-user throttle) and whether they came in order.
"""

from __future__ import annotations

import base64
import collections
import errno
import os
import resource
import select
import socket
import struct
import sys
import time
import zlib

import orjson

loads = orjson.loads
dumps = orjson.dumps
monotonic_ns = time.monotonic_ns
time_ns = time.time_ns
# Kernel receive timestamps (CLOCK_REALTIME) on every socket: the latency of a
# delivery is "kernel received it" minus "writer sent it", so the time this process
# takes to get round to reading a socket is not counted against the server.
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
_unpack_ts = struct.Struct("@qq").unpack_from
# how a cursor envelope starts on the wire (barosync and the peer both encode it so)
CURSOR_MARK = b'"type":"user:cursor"'

EPOLLIN = select.EPOLLIN
EPOLLOUT = select.EPOLLOUT
EPOLLERR = select.EPOLLERR | select.EPOLLHUP

MASK0 = b"\0\0\0\0"
# Header of a masked FIN text frame, by payload length (< 126).
_HDR_SMALL = [bytes((0x81, 0x80 | n)) + MASK0 for n in range(126)]
WS_KEY = base64.b64encode(b"barosync-bench!!").decode()

CONNECTING, HANDSHAKE, OPEN, CLOSED = range(4)

# Latency samples (µs) kept per process; beyond this we keep every k-th one.
MAX_SAMPLES = 400_000


def text_frame(payload: bytes) -> bytes:
    n = len(payload)
    if n < 126:
        return _HDR_SMALL[n] + payload
    if n < 65536:
        return b"\x81\xfe" + n.to_bytes(2, "big") + MASK0 + payload
    return b"\x81\xff" + n.to_bytes(8, "big") + MASK0 + payload


def ctrl_frame(opcode: int, payload: bytes = b"") -> bytes:
    return bytes((0x80 | opcode, 0x80 | len(payload))) + MASK0 + payload


def ack_frame(mid) -> bytes:
    return text_frame(b'{"type":"ack","id":' + dumps(mid) + b"}")


def uuidish(prefix: int, n: int) -> str:
    """A cheap, unique, UUID-shaped string (valid UUID syntax)."""
    return f"{prefix:08x}-0000-4000-8000-{n:012x}"


def emit(obj) -> None:
    sys.stdout.buffer.write(dumps(obj) + b"\n")
    sys.stdout.buffer.flush()


def progress(msg: str) -> None:
    emit({"event": "progress", "msg": msg})


def cpu_seconds() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


class Samples:
    """Latency samples in µs with exact count/max and a bounded sample list."""

    __slots__ = ("values", "count", "max", "stride", "_skip")

    def __init__(self) -> None:
        self.values: list[int] = []
        self.count = 0
        self.max = 0
        self.stride = 1
        self._skip = 0

    def add(self, us: int) -> None:
        self.count += 1
        if us > self.max:
            self.max = us
        if self.stride == 1:
            self.values.append(us)
            if len(self.values) >= MAX_SAMPLES:
                self.values = self.values[::2]
                self.stride = 2
        else:
            self._skip += 1
            if self._skip >= self.stride:
                self._skip = 0
                self.values.append(us)
                if len(self.values) >= MAX_SAMPLES:
                    self.values = self.values[::2]
                    self.stride *= 2

    def export(self) -> dict:
        return {"count": self.count, "max": self.max, "stride": self.stride, "values": self.values}


class Client:
    __slots__ = (
        "idx", "sock", "fd", "state", "rbuf", "wbuf", "frag", "project", "token",
        "writer", "mode", "window", "rate", "next_send", "inflight", "sub_id",
        "subscribed", "last_seq", "attempts", "next_ping", "t_start",
        "mover", "cur_count", "cur_last", "ack_upto", "ack_due", "count_only", "tail", "subscribe",
    )

    def __init__(self, idx: int, project: str, token: str, writer: bool, mode: str,
                 window: int, rate: float) -> None:
        self.idx = idx
        self.sock: socket.socket | None = None
        self.fd = -1
        self.state = CLOSED
        self.rbuf = b""
        self.wbuf: bytearray | None = None
        self.frag: list[bytes] | None = None
        self.project = project
        self.token = token
        self.writer = writer
        self.mode = mode
        self.window = window
        self.rate = rate
        self.next_send = 0
        self.inflight: dict[str, int] = {}
        self.sub_id = ""
        self.subscribed = False
        self.last_seq = -1
        self.attempts = 0
        self.next_ping = 0
        self.t_start = 0
        self.mover = -1  # cursor movers: the global mover index (sent as x)
        # cursors received, per mover index: how many, and the last count (y) seen
        self.cur_count: list[int] | None = None
        self.cur_last: list[int] | None = None
        # cumulative acks: newest (project, seq) received and not acked, and when to
        self.ack_upto: tuple[str, int] | None = None
        self.ack_due = 0
        # cursor scenario, receivers outside the sample: once running, count cursors in
        # the raw bytes (no frame or JSON parsing) so one load process can take ~2M/s
        self.count_only = False
        self.tail = b""
        self.subscribe = True  # False: a writer that never subscribes (ready at once)


class LoadGen:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.host = cfg["host"]
        self.port = cfg["port"]
        self.proc_id = int(cfg.get("proc_id", 0))
        self.connect_window = int(cfg.get("connect_window", 200))
        self.ping_interval_ns = int(float(cfg.get("ping_interval", 15.0)) * 1e9)
        self.duration_ns = int(float(cfg.get("duration", 0)) * 1e9)
        self.drain_idle_ns = int(float(cfg.get("drain_idle", 0.5)) * 1e9)
        self.drain_max_ns = int(float(cfg.get("drain_max", 10.0)) * 1e9)
        self.setup_timeout_ns = int(float(cfg.get("setup_timeout", 120.0)) * 1e9)
        # give up on the connections still pending once none has got through for this long
        self.setup_stall_ns = int(float(cfg.get("setup_stall", 15.0)) * 1e9)
        self.t_last_subscribed = 0
        self.stalled = 0
        self.ack = bool(cfg.get("ack", True))  # False only for the --no-acks diagnosis
        # "id": one ack per message, as the seed client; "upto": our clients' cumulative
        # ack, {"projectId", "seq"}, at most every ack_interval (ids of non-changes as "id")
        self.ack_mode = str(cfg.get("ack_mode", "id"))
        # (the server's hello may ask for another cadence: ackIntervalMs, below)
        self.ack_interval_ns = int(float(cfg.get("ack_interval", 0.1)) * 1e9)
        self.ack_pending: collections.deque[Client] = collections.deque()
        # Wire codec asked for at the handshake (barosync's ?codec=): json, batch, deflate.
        self.codec = str(cfg.get("codec", "json"))
        self.bytes_in = 0
        self.ep = select.epoll()
        self.rbuf = bytearray(262144)
        self.rmv = memoryview(self.rbuf)
        self.rbufs = [self.rmv]
        self.by_fd: dict[int, Client] = {}
        self.clients: list[Client] = []
        self.counter = 0
        self.prefix = (self.proc_id + 1) * 0x01000000
        for g in cfg["groups"]:
            for _ in range(int(g["count"])):
                self.clients.append(Client(
                    len(self.clients), g["project"], g["token"], bool(g.get("writer")),
                    g.get("mode", "window"), int(g.get("window", 1)), float(g.get("rate", 0.0)),
                ))
                if g.get("mode") == "cursor":
                    self.clients[-1].mover = int(g["mover"])
                self.clients[-1].count_only = bool(g.get("count_only"))
                self.clients[-1].subscribe = g.get("subscribe", True) is not False
        self.writers = [c for c in self.clients if c.writer]
        # cursors (presence scenario): movers across all load processes
        self.movers_total = int(cfg.get("movers_total", 0))
        self.cursor_sent_by_mover: dict[int, int] = {}
        self.cursor_sent = 0
        self.cursor_deliveries = 0
        self.cursor_counted = 0  # of which counted in raw bytes (receivers outside the sample)
        self.cursor_out_of_order = 0
        self.cursor_with_id = 0
        self.cursor_unparsable = 0
        # phase: "setup" -> "ready" -> "run" -> "drain" -> "done"
        self.phase = "setup"
        self.sent_times: dict[str, int] = {}
        # figures
        self.connect_failures = 0
        self.http_errors: dict[str, int] = {}
        self.closed_unexpectedly = 0
        self.close_codes: dict[str, int] = {}
        self.errors = 0
        self.error_samples: list = []
        self.deliveries = 0
        self.out_of_order = 0
        self.gaps = 0
        self.latency = Samples()
        # the same, measured to when epoll told this process (diagnosis: the gap
        # between the two is this process's own lag)
        self.latency_read = Samples()
        # Cursors: from the server's receipt (its `timestamp`, ms) to ours, so the load
        # generator's own delay in sending is not counted against the server.
        self.latency_server = Samples()
        self.poll_rt = 0
        self.ack_latency = Samples()
        self.creates_sent = 0
        self.creates_acked = 0
        self.creates_failed = 0
        self.msgs_in = 0
        self.acks_out = 0
        self.other_types: dict[str, int] = {}
        self.t_first_connect = 0
        self.t_all_subscribed = 0
        self.t_go = 0
        self.t_write_end = 0
        self.t_last_rx = 0
        self.t_last_delivery = 0
        self.cpu_go = 0.0
        self.cpu_samples: list[float] = []
        self.subscribed_count = 0
        self.setup_pending: list[Client] = []
        self.in_setup = 0
        self.stdin_buf = b""
        self.quit = False

    # ---------------------------------------------------------------- helpers
    def next_id(self) -> str:
        self.counter += 1
        return uuidish(self.prefix, self.counter)

    def send(self, c: Client, data: bytes) -> None:
        if c.state == CLOSED:
            return
        if c.wbuf:
            c.wbuf += data
            return
        try:
            k = c.sock.send(data)
        except (BlockingIOError, InterruptedError):
            k = 0
        except OSError:
            self.lost(c)
            return
        if k < len(data):
            c.wbuf = bytearray(data[k:])
            self.ep.modify(c.fd, EPOLLIN | EPOLLOUT)

    def flush(self, c: Client) -> None:
        try:
            k = c.sock.send(c.wbuf)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.lost(c)
            return
        del c.wbuf[:k]
        if not c.wbuf:
            c.wbuf = None
            self.ep.modify(c.fd, EPOLLIN)

    def close(self, c: Client) -> None:
        if c.sock is not None:
            try:
                self.ep.unregister(c.fd)
            except (OSError, ValueError):
                pass
            self.by_fd.pop(c.fd, None)
            c.sock.close()
            c.sock = None
        c.state = CLOSED

    def lost(self, c: Client, code: int | None = None) -> None:
        was_setup = not c.subscribed
        if c.state != CLOSED and not self.quit:
            if was_setup and c.attempts < 5 and code is None:
                # refused / reset during setup (e.g. backlog overflow): retry
                self.close(c)
                self.in_setup -= 1
                self.setup_pending.append(c)
                return
            self.closed_unexpectedly += 1
            if code is not None:
                k = str(code)
                self.close_codes[k] = self.close_codes.get(k, 0) + 1
            if was_setup:
                self.in_setup -= 1
                self.connect_failures += 1
        self.close(c)

    # ---------------------------------------------------------------- setup
    def start_connect(self, c: Client) -> None:
        c.attempts += 1
        s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        s.setblocking(False)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        c.sock = s
        c.fd = s.fileno()
        c.state = CONNECTING
        c.rbuf = b""
        c.wbuf = None
        c.t_start = monotonic_ns()
        if not self.t_first_connect:
            self.t_first_connect = c.t_start
        self.by_fd[c.fd] = c
        self.in_setup += 1
        err = s.connect_ex((self.host, self.port))
        if err not in (0, errno.EINPROGRESS):
            self.ep.register(c.fd, EPOLLOUT)
            self.lost(c)
            return
        self.ep.register(c.fd, EPOLLOUT)

    def on_connected(self, c: Client) -> None:
        err = c.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self.lost(c)
            return
        c.state = HANDSHAKE
        self.ep.modify(c.fd, EPOLLIN)
        req = (
            f"GET /ws?token={c.token}{'' if self.codec == 'json' else '&codec=' + self.codec} HTTP/1.1\r\n"
            f"Host: {self.host}:{self.port}\r\n"
            f"Upgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {WS_KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
        self.send(c, req)

    def on_handshake(self, c: Client, data: bytes) -> bytes | None:
        buf = c.rbuf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            c.rbuf = buf
            return None
        status = buf[: buf.find(b"\r\n")].decode("latin-1")
        parts = status.split(" ", 2)
        if len(parts) < 2 or parts[1] != "101":
            code = parts[1] if len(parts) > 1 else "?"
            self.http_errors[code] = self.http_errors.get(code, 0) + 1
            c.attempts = 99  # no retry for an HTTP refusal
            self.lost(c, code=int(code) if code.isdigit() else 0)
            return None
        c.state = OPEN
        c.rbuf = b""
        c.sub_id = self.next_id()
        c.next_ping = monotonic_ns() + self.ping_interval_ns + (c.idx * 7919) % max(1, self.ping_interval_ns)
        if not c.subscribe:
            self.on_subscribed(c)
            return buf[end + 4:]
        self.send(c, text_frame(dumps({
            "type": "subscribe", "id": c.sub_id, "payload": {"projectId": c.project},
            "timestamp": time.time_ns() // 1_000_000,
        })))
        return buf[end + 4:]

    def on_subscribed(self, c: Client) -> None:
        c.subscribed = True
        self.in_setup -= 1
        self.subscribed_count += 1
        self.t_last_subscribed = monotonic_ns()
        if self.subscribed_count == len(self.clients):
            self.t_all_subscribed = self.t_last_subscribed

    # ---------------------------------------------------------------- writing
    def make_create(self, c: Client, now: int) -> bytes:
        """``now`` is CLOCK_REALTIME ns: the send time latencies are measured from."""
        env_id = self.next_id()
        ev_id = self.next_id()
        self.sent_times[ev_id] = now
        c.inflight[env_id] = now
        self.creates_sent += 1
        return text_frame(dumps({
            "type": "event:create", "id": env_id, "timestamp": time.time_ns() // 1_000_000,
            "payload": {
                "projectId": c.project, "id": ev_id, "title": "bench",
                "description": str(now),
                "startDate": "2026-01-01T10:00:00Z", "endDate": "2026-01-01T11:00:00Z",
            },
        }))

    def make_cursor(self, c: Client, now: int) -> bytes:
        """A ``user:cursor`` with no ``id``; ``now`` (CLOCK_REALTIME ns) goes in
        ``elementId``, the mover's index in ``x`` and its running count in ``y``."""
        n = self.cursor_sent_by_mover.get(c.mover, 0) + 1
        self.cursor_sent_by_mover[c.mover] = n
        self.cursor_sent += 1
        return text_frame(b'{"type":"user:cursor","payload":{"projectId":%s,"x":%d,"y":%d,"elementId":"%d"}}'
                          % (dumps(c.project), c.mover, n, now))

    def top_up(self, c: Client, out: list) -> None:
        """Fill a window writer's window (only while the run phase lasts)."""
        if self.phase != "run" or c.mode != "window" or c.state != OPEN:
            return
        n = c.window - len(c.inflight)
        if n > 0:
            now = time_ns()
            for _ in range(n):
                out.append(self.make_create(c, now))

    # ---------------------------------------------------------------- reading
    def on_readable(self, c: Client, now: int) -> None:
        """``now`` (monotonic) is when epoll reported the socket readable. Latencies use
        the kernel's receive timestamp of the data instead (CLOCK_REALTIME), which is
        free of the time this process spends on other sockets first."""
        try:
            # Into one preallocated buffer: recvmsg(262144) would allocate (and, above
            # glibc's mmap threshold, mmap and unmap) 256 KB per call, ~14 us each.
            k, anc, _flags, _addr = c.sock.recvmsg_into(self.rbufs, 64)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            self.lost(c)
            return
        self.bytes_in += k
        if not k:
            self.lost(c)
            return
        data = self.rmv[:k].tobytes()
        self.t_last_rx = now
        if c.count_only and c.state == OPEN and c.subscribed and self.phase in ("run", "drain"):
            buf = c.tail + data
            found = buf.count(CURSOR_MARK)
            c.tail = buf[-(len(CURSOR_MARK) - 1):]
            if found:
                self.cursor_deliveries += found
                self.cursor_counted += found
                self.t_last_delivery = now
            return
        if anc:
            sec, nsec = _unpack_ts(anc[0][2])
            rx = sec * 1_000_000_000 + nsec
        else:
            rx = time_ns()
        if c.state == HANDSHAKE:
            data = self.on_handshake(c, data)
            if not data:
                return
            buf = data
        elif c.rbuf:
            buf = c.rbuf + data
        else:
            buf = data
        out: list[bytes] = []
        pos = 0
        n = len(buf)
        while n - pos >= 2:
            b1 = buf[pos + 1]
            ln = b1 & 0x7F
            hl = 2
            if ln == 126:
                if n - pos < 4:
                    break
                ln = (buf[pos + 2] << 8) | buf[pos + 3]
                hl = 4
            elif ln == 127:
                if n - pos < 10:
                    break
                ln = int.from_bytes(buf[pos + 2:pos + 10], "big")
                hl = 10
            if b1 & 0x80:  # a masked server frame would be a protocol error; cope anyway
                hl += 4
            end = pos + hl + ln
            if end > n:
                break
            b0 = buf[pos]
            if b1 & 0x80:
                key = buf[pos + hl - 4:pos + hl]
                payload = bytes(b ^ key[i & 3] for i, b in enumerate(buf[pos + hl:end]))
            else:
                payload = buf[pos + hl:end]
            pos = end
            op = b0 & 0x0F
            if op <= 2:
                if not b0 & 0x80:  # fragment
                    if c.frag is None:
                        c.frag = []
                    c.frag.append(payload)
                    continue
                if op == 0 and c.frag is not None:
                    c.frag.append(payload)
                    payload = b"".join(c.frag)
                    c.frag = None
                if op == 2:
                    payload = zlib.decompress(payload)  # the deflate codec's binary frames
                self.on_message(c, payload, now, rx, out)
            elif op == 9:
                out.append(ctrl_frame(0xA, payload[:125]))
            elif op == 8:
                code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                self.send(c, ctrl_frame(0x8, payload[:2]))
                self.lost(c, code=code)
                return
        c.rbuf = buf[pos:] if pos < n else b""
        if c.writer and c.state == OPEN:
            self.top_up(c, out)
        if out and c.state != CLOSED:
            self.send(c, out[0] if len(out) == 1 else b"".join(out))

    def on_message(self, c: Client, payload: bytes, now: int, rx: int, out: list) -> None:
        self.msgs_in += 1
        try:
            m = loads(payload)
            t = m.get("type")
        except Exception:
            self.errors += 1
            if len(self.error_samples) < 5:
                self.error_samples.append({"unparsable": payload[:200].decode("utf-8", "replace")})
            return
        if t == "batch":  # batch and deflate codecs: several envelopes in one frame
            self.msgs_in -= 1
            for item in m.get("payload") or ():
                self.on_message(c, dumps(item), now, rx, out)
            return
        mid = m.get("id")
        if t == "hello" and self.ack_mode == "upto":
            ms = (m.get("payload") or {}).get("ackIntervalMs")
            if type(ms) is int and ms > 0:  # our clients ack at the cadence the server asks
                self.ack_interval_ns = ms * 1_000_000
        if t == "user:cursor":
            if mid is not None:
                self.cursor_with_id += 1  # cursors must carry no id (and are not acked)
            if self.phase == "setup":
                return
            p = m.get("payload")
            try:
                mover = p["x"]
                n = p["y"]
                t0 = int(p["elementId"])
                if type(mover) is float:
                    mover, n = int(mover), int(n)
                counts = c.cur_count
                if counts is None:
                    counts = c.cur_count = [0] * self.movers_total
                    c.cur_last = [0] * self.movers_total
                counts[mover] += 1
            except (TypeError, ValueError, KeyError, IndexError):
                self.cursor_unparsable += 1
                return
            if n <= c.cur_last[mover]:
                self.cursor_out_of_order += 1
            else:
                c.cur_last[mover] = n
            self.cursor_deliveries += 1
            self.t_last_delivery = now
            self.latency.add((rx - t0) // 1000)
            self.latency_read.add((self.poll_rt - t0) // 1000)
            stamp = p.get("timestamp")
            if type(stamp) is int:
                self.latency_server.add(max(0, (rx - stamp * 1_000_000) // 1000))
            return
        if t == "event:created":
            seq = m.get("seq")
            if self.ack_mode == "upto" and self.ack and type(seq) is int:
                if c.ack_upto is None:
                    c.ack_due = now + self.ack_interval_ns
                    self.ack_pending.append(c)
                c.ack_upto = (m.get("projectId"), seq)
                mid = None  # acked cumulatively by flush_acks()
            if seq is not None:
                if seq <= c.last_seq:
                    self.out_of_order += 1
                elif c.last_seq >= 0 and seq != c.last_seq + 1 and not c.writer:
                    self.gaps += 1
                c.last_seq = seq
            if self.phase != "setup":
                self.deliveries += 1
                self.t_last_delivery = now
                p = m.get("payload")
                if p:
                    t0 = self.sent_times.get(p.get("id"))
                    if t0 is None:
                        try:
                            t0 = int(p.get("description"))
                        except (TypeError, ValueError):
                            t0 = None
                    if t0 is not None:
                        self.latency.add((rx - t0) // 1000)
                        self.latency_read.add((self.poll_rt - t0) // 1000)
        elif t == "ack":
            if mid is None:
                return
            t0 = c.inflight.pop(mid, None)
            if t0 is not None:
                self.creates_acked += 1
                self.ack_latency.add((rx - t0) // 1000)
                p = m.get("payload")
                if p:
                    seq = p.get("seq")
                    if isinstance(seq, int) and seq > c.last_seq:
                        c.last_seq = seq
            elif mid == c.sub_id and not c.subscribed:
                self.on_subscribed(c)
            return
        elif t == "pong":
            return
        elif t == "error":
            self.errors += 1
            p = m.get("payload") or {}
            if len(self.error_samples) < 5:
                self.error_samples.append(p)
            ref = p.get("ref") if isinstance(p, dict) else None
            if ref is not None:
                if c.inflight.pop(ref, None) is not None:
                    self.creates_failed += 1
                elif ref == c.sub_id and not c.subscribed:
                    self.connect_failures += 1
                    self.in_setup -= 1
                    c.subscribed = True  # give up on this one; do not wait forever
        elif t == "sync:snapshot":
            p = m.get("payload") or {}
            seq = p.get("seq")
            if isinstance(seq, int) and seq > c.last_seq:
                c.last_seq = seq
        else:
            self.other_types[t] = self.other_types.get(t, 0) + 1
        if mid is not None and self.ack:
            out.append(ack_frame(mid))
            self.acks_out += 1

    def flush_acks(self, now: int) -> None:
        pending = self.ack_pending
        while pending and pending[0].ack_due <= now:
            c = pending.popleft()
            if c.ack_upto is not None and c.state == OPEN:
                project, seq = c.ack_upto
                self.send(c, text_frame(b'{"type":"ack","payload":{"projectId":' + dumps(project) + b',"seq":%d}}' % seq))
                self.acks_out += 1
            c.ack_upto = None

    # ---------------------------------------------------------------- commands
    def on_stdin(self) -> None:
        try:
            data = os.read(0, 4096)
        except BlockingIOError:
            return
        if not data:
            self.quit = True
            return
        self.stdin_buf += data
        while b"\n" in self.stdin_buf:
            line, self.stdin_buf = self.stdin_buf.split(b"\n", 1)
            cmd = line.strip().decode()
            if cmd == "go":
                self.start_run()
            elif cmd == "quit":
                self.quit = True

    def start_run(self) -> None:
        now = monotonic_ns()
        self.t_go = now
        self.t_write_end = now + self.duration_ns
        self.cpu_go = cpu_seconds()
        self.cpu_samples = []
        self._cpu_tick = (now, self.cpu_go)
        self.phase = "run"
        for c in self.writers:
            if c.state != OPEN:
                continue
            if c.mode == "rate":
                c.next_send = now
            elif c.mode == "cursor":
                # spread the movers over one interval, as independent users would be
                c.next_send = now + int(1e9 / c.rate * ((c.mover * 0.618034) % 1.0))
            else:
                out: list[bytes] = []
                self.top_up(c, out)
                if out:
                    self.send(c, b"".join(out))

    def ready_report(self) -> dict:
        return {
            "event": "ready",
            "proc_id": self.proc_id,
            "clients": len(self.clients),
            "subscribed": self.subscribed_count,
            "connect_failures": self.connect_failures,
            "http_errors": self.http_errors,
            "t_first_connect": self.t_first_connect,
            "t_all_subscribed": self.t_all_subscribed or self.t_last_subscribed or monotonic_ns(),
            "stalled": self.stalled,
            "open": sum(1 for c in self.clients if c.state == OPEN),
        }

    def cursor_pairs(self) -> dict:
        """Per mover: cursors received summed over this process's receivers, and the
        most any one receiver got from it (run.py compares those with what was sent)."""
        if not self.movers_total:
            return {}
        got = [0] * self.movers_total
        most = [0] * self.movers_total
        for c in self.clients:
            if c.cur_count is None:
                continue
            for i, k in enumerate(c.cur_count):
                got[i] += k
                if k > most[i]:
                    most[i] = k
        sampled = [c for c in self.clients if not c.count_only and c.state == OPEN]
        return {"cursor_received_by_mover": got, "cursor_max_pair_by_mover": most,
                "cursor_receivers": sum(1 for c in self.clients if c.state == OPEN),
                "cursor_sampled_receivers": len(sampled),
                # (receiver, mover) pairs in the sample: a mover gets no cursor of its own
                "cursor_sampled_pairs": sum(self.movers_total - (1 if c.mover >= 0 else 0) for c in sampled),
                "cursor_counted": self.cursor_counted}

    def done_report(self) -> dict:
        cpu = cpu_seconds() - self.cpu_go
        end = max(self.t_last_rx, self.t_write_end if self.duration_ns else self.t_go)
        wall = max(1e-9, (end - self.t_go) / 1e9)
        return {
            "event": "done",
            "proc_id": self.proc_id,
            "clients": len(self.clients),
            "writers": len(self.writers),
            "open": sum(1 for c in self.clients if c.state == OPEN),
            "t_go": self.t_go,
            "t_write_end": self.t_write_end,
            "t_last_rx": self.t_last_rx,
            "t_last_delivery": self.t_last_delivery,
            "deliveries": self.deliveries,
            "out_of_order": self.out_of_order,
            "gaps": self.gaps,
            "latency_us": self.latency.export(),
            "latency_read_us": self.latency_read.export(),
            "latency_server_us": self.latency_server.export(),
            "ack_latency_us": self.ack_latency.export(),
            "creates_sent": self.creates_sent,
            "creates_acked": self.creates_acked,
            "creates_failed": self.creates_failed,
            "creates_unacked": sum(len(c.inflight) for c in self.clients),
            "msgs_in": self.msgs_in,
            "bytes_in": self.bytes_in,
            "acks_out": self.acks_out,
            "errors": self.errors,
            "error_samples": self.error_samples,
            "closed_unexpectedly": self.closed_unexpectedly,
            "close_codes": self.close_codes,
            "other_types": self.other_types,
            "cursor_sent": self.cursor_sent,
            "cursor_sent_by_mover": {str(k): v for k, v in self.cursor_sent_by_mover.items()},
            "cursor_deliveries": self.cursor_deliveries,
            "cursor_out_of_order": self.cursor_out_of_order,
            "cursor_with_id": self.cursor_with_id,
            "cursor_unparsable": self.cursor_unparsable,
            **self.cursor_pairs(),
            "cpu_s": cpu,
            "wall_s": wall,
            "cpu_pct": 100.0 * cpu / wall,
            "cpu_pct_peak_1s": max(self.cpu_samples) if self.cpu_samples else 100.0 * cpu / wall,
        }

    # ---------------------------------------------------------------- loop
    def run(self) -> None:
        os.set_blocking(0, False)
        self.ep.register(0, EPOLLIN)
        self.setup_pending = list(reversed(self.clients))
        t_setup_start = monotonic_ns()
        last_progress = t_setup_start
        ep_poll = self.ep.poll
        by_fd = self.by_fd
        ping_check = t_setup_start + 1_000_000_000
        while not self.quit:
            now = monotonic_ns()
            # ---- phase bookkeeping
            if self.phase == "setup":
                while self.setup_pending and self.in_setup < self.connect_window:
                    self.start_connect(self.setup_pending.pop())
                if self.in_setup <= 0 and not self.setup_pending:
                    self.phase = "ready"
                    emit(self.ready_report())
                elif (now - t_setup_start > self.setup_timeout_ns
                      or now - max(self.t_last_subscribed, t_setup_start) > self.setup_stall_ns):
                    for c in self.clients:
                        if not c.subscribed and c.state != CLOSED:
                            self.stalled += 1
                            self.close(c)
                    self.stalled += len(self.setup_pending)
                    self.setup_pending = []
                    self.in_setup = 0
                    self.phase = "ready"
                    progress(f"setup stalled or timed out: {self.subscribed_count}/{len(self.clients)} "
                             f"subscribed, gave up on {self.stalled}")
                    emit(self.ready_report())
                elif now - last_progress > 1_000_000_000:
                    last_progress = now
                    progress(f"{self.subscribed_count}/{len(self.clients)} subscribed")
            elif self.phase in ("run", "drain"):
                tick_t, tick_cpu = self._cpu_tick
                if now - tick_t >= 1_000_000_000:
                    cpu = cpu_seconds()
                    self.cpu_samples.append(100.0 * (cpu - tick_cpu) / ((now - tick_t) / 1e9))
                    self._cpu_tick = (now, cpu)
                if self.phase == "run":
                    if now >= self.t_write_end:
                        self.phase = "drain"
                    else:
                        for c in self.writers:
                            if c.mode == "rate" and c.state == OPEN and now >= c.next_send:
                                out = []
                                t_send = time_ns()
                                while now >= c.next_send:
                                    out.append(self.make_create(c, t_send))
                                    c.next_send += int(1e9 / c.rate)
                                self.send(c, b"".join(out))
                            elif c.mode == "cursor" and c.state == OPEN and now >= c.next_send:
                                # a late tick sends one cursor (the newest position), as
                                # a browser's mousemove would, and keeps the schedule
                                step = int(1e9 / c.rate)
                                while now >= c.next_send:
                                    c.next_send += step
                                self.send(c, self.make_cursor(c, time_ns()))
                if self.phase == "drain":
                    idle = now - max(self.t_last_rx, self.t_write_end)
                    unacked = any(c.inflight for c in self.writers if c.state == OPEN)
                    if (idle >= self.drain_idle_ns and not unacked) or now - self.t_write_end > self.drain_max_ns:
                        self.phase = "done"
                        emit(self.done_report())
            if now >= ping_check:
                ping_check = now + 1_000_000_000
                for c in self.clients:
                    if c.state == OPEN and now >= c.next_ping:
                        c.next_ping = now + self.ping_interval_ns
                        self.send(c, text_frame(b'{"type":"ping","timestamp":%d}' % (time.time_ns() // 1_000_000)))
            if self.ack_pending:
                self.flush_acks(now)
            # ---- timeout for the poll
            timeout = 0.05
            if self.ack_pending:
                timeout = min(timeout, max(0.0, (self.ack_pending[0].ack_due - now) / 1e9))
            if self.phase == "run":
                for c in self.writers:
                    if c.mode == "rate" or c.mode == "cursor":
                        timeout = min(timeout, max(0.0, (c.next_send - now) / 1e9))
            events = ep_poll(timeout, 1024)
            now = monotonic_ns()
            self.poll_rt = time_ns()
            for fd, ev in events:
                if fd == 0:
                    self.on_stdin()
                    continue
                c = by_fd.get(fd)
                if c is None:
                    continue
                if c.state == CONNECTING:
                    if ev & (EPOLLOUT | EPOLLERR):
                        self.on_connected(c)
                    continue
                if ev & EPOLLOUT and c.wbuf:
                    self.flush(c)
                    if c.state == CLOSED:
                        continue
                if ev & (EPOLLIN | EPOLLERR):
                    self.on_readable(c, now)
        for c in self.clients:
            if c.sock is not None:
                c.sock.close()


def raise_nofile() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    cfg = loads(sys.argv[1])
    raise_nofile()
    LoadGen(cfg).run()


if __name__ == "__main__":
    main()
