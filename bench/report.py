"""The benchmark's report: the headline per scenario and the table printed at the
end, with each figure checked against its target (TARGETS in harness.py).
"""

from __future__ import annotations
from harness import PEERS, SCENARIOS, TARGETS, base_of, disturbed_pct

PEER_LABELS = {"websockets": "asyncio+websockets", "ws": "Node ws"}




def per_delivery(r: dict) -> float | None:
    return r["server_cpu_s"] * 1e6 / r["deliveries"] if r["deliveries"] else None


def headline(sc: str, r: dict) -> str:
    sc = base_of(sc)
    if sc == "fanout":
        return (f"p50 {fmt(r['latency_p50_ms'])} ms, p99 {fmt(r['latency_p99_ms'])} ms, "
                f"{r['deliveries']}/{r['expected_deliveries']} deliveries, in order: {r['in_order']}, "
                f"{fmt(r['server_cpu_us_per_delivery'])} us/delivery")
    if sc == "saturation":
        return (f"{fmt(r['deliveries_per_s'])} deliveries/s, {fmt(r['server_cpu_us_per_delivery'])} us/delivery, "
                f"server CPU {fmt(r['server_cpu_pct'])}%, load CPU {fmt(r['loadgen_cpu_pct'])}%")
    if sc == "capacity":
        return (f"{r['held']} held, {fmt(r['rss_kb_per_conn'])} KB/conn, "
                f"connect all {fmt(r['connect_all_s'])} s")
    if sc == "durable":
        return (f"{fmt(r['acked_per_s'])} acked/s, ack p50 {fmt(r['ack_p50_ms'])} ms, "
                f"p99 {fmt(r['ack_p99_ms'])} ms")
    if sc == "create_cost":
        return (f"{fmt(r['acked_per_s'])} acked/s of {fmt(r['params']['rate_per_s'])} asked, "
                f"{fmt(r['server_cpu_us_per_mutation'])} us of server CPU per create, server CPU {fmt(r['server_cpu_pct'])}%")
    if sc == "snapshot":
        return (f"one subscriber {fmt(r['one_seconds'])} s for {fmt(r['one_events'])} events "
                f"({fmt(r['one_parts'])} parts), {r['params']['joiners']} at once {fmt(r['many_wall_seconds'])} s, "
                f"resume of {fmt(r['resume_changes'])} in {fmt(r['resume_seconds'])} s")
    if sc == "storm":
        return (f"{r['converged']}/{r['clients']} converged, {r['gaps']} gaps, {r['duplicates']} duplicates, "
                f"{r['lost']} lost, {r['applied_twice']} applied twice, {r['acked_mutations']} acked, "
                f"{r['resent']} resent")
    if sc == "cluster_storm":
        return (f"{r['converged']}/{r['clients']} converged over {r['nodes']} nodes, {r['gaps']} gaps, "
                f"{r['duplicates']} duplicates, {r['own_echoes']} own echoes, {r['lost']} lost, "
                f"{r['applied_twice']} applied twice, nodes agree {r['nodes_agree']}, "
                f"killed node's users gone after {fmt(r['presence_gone_s'])} s")
    if sc == "caldav":
        b, p = r["barosync"], r["radicale"]
        return (f"first full sync of {r['events']:,}: {fmt(b['full_seconds'])} s (Radicale {fmt(p['full_seconds'])} s), "
                f"incremental of {r['changes']}: {fmt(b['incremental_seconds'])} s (Radicale {fmt(p['incremental_seconds'])} s), "
                f"after a restart: {fmt(b['restart_full_seconds'])} s (Radicale {fmt(p['restart_full_seconds'])} s)")
    if sc == "hostile":
        return (f"{fmt(r['frames'])} frames, {fmt(r['error_answers'])} error answers, server alive {r['server_alive']}, "
                f"serves afterwards {r['serves_afterwards']}, RSS max +{fmt(r['rss_max_growth_mb'])} MB")
    if sc == "cursors":
        return (f"{fmt(r['cursor_deliveries_per_s'])} cursor deliveries/s, p50 {fmt(r['latency_p50_ms'])} ms, "
                f"p99 {fmt(r['latency_p99_ms'])} ms, server CPU {fmt(r['server_cpu_pct'])}%, "
                f"{fmt(r['server_cpu_us_per_delivery'])} us/delivery, coalesced {fmt(r['coalesced_pct'])}%, "
                f"load CPU {fmt(r['loadgen_cpu_pct'])}%")
    return ""


# ------------------------------------------------------------------ table
def fmt(v, nd: int | None = None) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "NO"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if nd is not None:
            return f"{v:,.{nd}f}"
        a = abs(v)
        if a >= 1000:
            return f"{v:,.0f}"
        if a >= 100:
            return f"{v:.0f}"
        if a >= 10:
            return f"{v:.1f}"
        return f"{v:.2f}"
    return str(v)


ROWS = [
    # scenario, key (dotted path), label
    ("fanout", "latency_p50_ms", "latency p50 (ms)"),
    ("fanout", "latency_p99_ms", "latency p99 (ms)"),
    ("fanout", "latency_max_ms", "latency max (ms)"),
    ("fanout", "deliveries", "deliveries"),
    ("fanout", "expected_deliveries", "expected deliveries"),
    ("fanout", "complete", "all delivered"),
    ("fanout", "in_order", "in seq order"),
    ("fanout", "server_cpu_pct", "server CPU (%)"),
    ("fanout", "server_cpu_us_per_delivery", "server CPU us/delivery"),
    ("fanout", "bytes_per_delivery", "bytes on the wire/delivery"),
    ("fanout", "loadgen_cpu_pct", "load gen CPU (%)"),
    ("saturation", "deliveries_per_s", "deliveries/s"),
    ("saturation", "creates_per_s", "creates acked/s"),
    ("saturation", "server_cpu_us_per_delivery", "server CPU us/delivery"),
    ("saturation", "bytes_per_delivery", "bytes on the wire/delivery"),
    ("saturation", "server_cpu_pct", "server CPU (%)"),
    ("saturation", "latency_ms.p50", "latency p50 (ms)"),
    ("saturation", "latency_ms.p99", "latency p99 (ms)"),
    ("saturation", "complete", "all delivered"),
    ("saturation", "in_order", "in seq order"),
    ("saturation", "loadgen_cpu_pct", "load gen CPU (%)"),
    ("capacity", "held", "connections held"),
    ("capacity", "rss_kb_per_conn", "server RSS per conn (KB)"),
    ("capacity", "rss_after_kb", "server RSS total (KB)"),
    ("capacity", "connect_all_s", "time to connect all (s)"),
    ("capacity", "connects_per_s", "connects/s"),
    ("capacity", "fds_per_conn", "server fds per conn"),
    ("durable", "acked_per_s", "acked mutations/s"),
    ("durable", "ack_p50_ms", "ack latency p50 (ms)"),
    ("durable", "ack_p99_ms", "ack latency p99 (ms)"),
    ("durable", "server_cpu_pct", "server CPU (%)"),
    ("durable", "server_cpu_us_per_mutation", "server CPU us/mutation"),
    ("durable", "server_kernel_us_per_mutation", "  of which in the kernel"),
    ("durable", "storage_kb_per_mutation", "storage written per mutation (KB)"),
    ("durable", "creates_failed", "failed (error answers)"),
    ("durable", "deliveries_per_s", "deliveries/s (to the other writers)"),
    ("durable", "loadgen_cpu_pct", "load gen CPU (%)"),
    ("create_cost", "acked_per_s", "acked creates/s"),
    ("create_cost", "server_cpu_us_per_mutation", "server CPU us/create"),
    ("create_cost", "server_kernel_us_per_mutation", "  of which in the kernel"),
    ("create_cost", "storage_kb_per_mutation", "storage written per create (KB)"),
    ("create_cost", "server_cpu_pct", "server CPU (%)"),
    ("create_cost", "ack_p50_ms", "ack latency p50 (ms)"),
    ("create_cost", "ack_p99_ms", "ack latency p99 (ms)"),
    ("create_cost", "creates_failed", "failed (error answers)"),
    ("snapshot", "fill_seconds", "time to create the events (s)"),
    ("snapshot", "one_seconds", "one subscriber: snapshot (s)"),
    ("snapshot", "one_events", "  events received"),
    ("snapshot", "one_parts", "  parts"),
    ("snapshot", "one_mb", "  MB on the wire"),
    ("snapshot", "one_peak_rss_delta_mb", "  server peak RSS growth (MB)"),
    ("snapshot", "whole_seconds", "one subscriber, one message (s)"),
    ("snapshot", "whole_peak_rss_delta_mb", "  server peak RSS growth (MB)"),
    ("snapshot", "many_wall_seconds", "joiners at once: all done (s)"),
    ("snapshot", "many_p50_seconds", "  p50 per joiner (s)"),
    ("snapshot", "many_complete", "  joiners complete"),
    ("snapshot", "many_mb", "  MB on the wire"),
    ("snapshot", "many_peak_rss_delta_mb", "  server peak RSS growth (MB)"),
    ("snapshot", "rss_after_mb", "server RSS after (MB)"),
    ("snapshot", "resume_seconds", "resume of missed changes (s)"),
    ("snapshot", "resume_changes", "  changes received"),
    ("snapshot", "resume_per_s", "  changes/s"),
    ("snapshot", "resume_gaps", "  gaps"),
    ("storm", "acked_mutations", "mutations acked"),
    ("storm", "resent", "  resent after a reconnect"),
    ("storm", "reconnects", "reconnects"),
    ("storm", "storm_recover_s", "all back after the storm (s)"),
    ("storm", "restart_recover_s", "all back after a restart (s, worst)"),
    ("storm", "gaps", "gaps"),
    ("storm", "duplicates", "duplicates"),
    ("storm", "own_echoes", "own change sent to its writer"),
    ("storm", "lost", "acked changes lost"),
    ("storm", "applied_twice", "mutations applied twice"),
    ("storm", "converged", "clients converged"),
    ("storm", "nothing_lost", "nothing lost"),
    ("storm", "rss_growth_mb", "server RSS growth (MB)"),
    ("cluster_storm", "acked_mutations", "mutations acked (3 nodes)"),
    ("cluster_storm", "resent", "  resent, through another node"),
    ("cluster_storm", "refused", "  refused (PostgreSQL away), resent"),
    ("cluster_storm", "reconnects", "reconnects (each to the next node)"),
    ("cluster_storm", "recover_worst_s", "all back after each step (s, worst)"),
    ("cluster_storm", "gaps", "gaps"),
    ("cluster_storm", "duplicates", "duplicates"),
    ("cluster_storm", "own_echoes", "own change sent to its writer"),
    ("cluster_storm", "lost", "acked changes lost"),
    ("cluster_storm", "applied_twice", "mutations applied twice"),
    ("cluster_storm", "converged", "clients converged"),
    ("cluster_storm", "nodes_agree", "REST on every node agrees"),
    ("cluster_storm", "snapshots_agree", "snapshots from every node agree"),
    ("cluster_storm", "quiet_s", "converged after quiet (s)"),
    ("cluster_storm", "presence_gone_s", "killed node's users gone after (s)"),
    ("cluster_storm", "presence_in_window", "  within the liveness window"),
    ("cluster_storm", "nothing_lost", "nothing lost"),
    ("caldav", "barosync.full_seconds", "first full sync (s)"),
    ("caldav", "radicale.full_seconds", "  Radicale (s)"),
    ("caldav", "full_seconds_ratio", "  barosync / Radicale"),
    ("caldav", "barosync.full_server_cpu_s", "  server CPU (s)"),
    ("caldav", "radicale.full_server_cpu_s", "  Radicale server CPU (s)"),
    ("caldav", "barosync.warm_full_seconds", "full sync again, warm (s)"),
    ("caldav", "radicale.warm_full_seconds", "  Radicale (s)"),
    ("caldav", "warm_full_seconds_ratio", "  barosync / Radicale"),
    ("caldav", "barosync.edit_seconds", "changes by PUT (s)"),
    ("caldav", "radicale.edit_seconds", "  Radicale (s)"),
    ("caldav", "edit_seconds_ratio", "  barosync / Radicale"),
    ("caldav", "barosync.incremental_seconds", "incremental sync (s)"),
    ("caldav", "radicale.incremental_seconds", "  Radicale (s)"),
    ("caldav", "incremental_seconds_ratio", "  barosync / Radicale"),
    ("caldav", "barosync.restart_full_seconds", "full sync after a restart (s)"),
    ("caldav", "radicale.restart_full_seconds", "  Radicale (s)"),
    ("caldav", "restart_full_seconds_ratio", "  barosync / Radicale"),
    ("caldav", "barosync.fresh_put_seconds", "1,000 events PUT one by one (s)"),
    ("caldav", "radicale.fresh_put_seconds", "  Radicale (s)"),
    ("caldav", "fresh_put_seconds_ratio", "  barosync / Radicale"),
    ("caldav", "barosync.after_puts_full_seconds", "then their first full sync (s)"),
    ("caldav", "radicale.after_puts_full_seconds", "  Radicale (s)"),
    ("caldav", "after_puts_full_seconds_ratio", "  barosync / Radicale"),
    ("caldav", "seed_puts_per_s", "seeding PUTs/s (8 connections)"),
    ("caldav", "barosync.rss_growth_mb", "server RSS growth (MB)"),
    ("hostile", "frames", "hostile frames"),
    ("hostile", "frames_per_s", "  per second"),
    ("hostile", "error_answers", "error answers"),
    ("hostile", "closing_frames", "frames that must close"),
    ("hostile", "connections", "connections"),
    ("hostile", "crashes", "crashes"),
    ("hostile", "serves_afterwards", "serves afterwards"),
    ("hostile", "rss_max_growth_mb", "server RSS max growth (MB)"),
    ("cursors", "cursor_deliveries_per_s", "cursor deliveries/s"),
    ("cursors", "server_cpu_pct", "server CPU (%)"),
    ("cursors", "server_cpu_us_per_delivery", "server CPU us/delivery"),
    ("cursors", "latency_p50_ms", "cursor latency p50 (ms)"),
    ("cursors", "latency_p99_ms", "cursor latency p99 (ms)"),
    ("cursors", "latency_max_ms", "cursor latency max (ms)"),
    ("cursors", "latency_from_server_receipt_ms.p50", "  from server receipt p50 (ms)"),
    ("cursors", "latency_from_server_receipt_ms.p99", "  from server receipt p99 (ms)"),
    ("cursors", "cursor_sent", "cursors sent"),
    ("cursors", "sent_per_mover_per_s", "sent per mover (/s)"),
    ("cursors", "uncoalesced_deliveries", "sent x other clients"),
    ("cursors", "cursor_deliveries", "cursor deliveries"),
    ("cursors", "coalesced_pct", "coalesced or not delivered (%)"),
    ("cursors", "received_per_pair_per_s", "per receiver per mover (/s)"),
    ("cursors", "max_received_per_pair_per_s", "  max over pairs (/s)"),
    ("cursors", "throttle_held", "throttle held"),
    ("cursors", "loadgen_cpu_pct", "load gen CPU (%)"),
]


def first_error(r: dict) -> str:
    for line in reversed((r.get("server_log_tail") or "").splitlines()):
        if "rror" in line or "Errno" in line or "Traceback" in line:
            return line.strip()[:240]
    return "see " + str(r.get("server_log") or "the server log")


def getpath(d: dict, path: str):
    for part in path.split("."):
        if not isinstance(d, dict):
            return None
        d = d.get(part)
    return d


def check(sc: str, key: str, v) -> str:
    t = TARGETS.get((sc, key))
    if t is None or v is None:
        return ""
    op, want, label = t
    ok = {"<=": lambda: v <= want, ">=": lambda: v >= want, "==": lambda: v == want,
          "<": lambda: v < want}[op]()
    return f"{label} {'ok' if ok else 'MISS'}"


def table(report: dict) -> str:
    smoke = report["meta"].get("smoke")
    servers = report["servers"]
    b = servers.get("barosync", {})
    peers = [k for k in PEERS if k in servers]
    head = ["figure", "barosync", *(PEER_LABELS[k] for k in peers), *(f"b/{k}" for k in peers), "target"]
    lines = []
    widths = [34, 14, *(14 for _ in peers), *(12 for _ in peers), 22]
    last = len(widths) - 1

    def row(cells) -> str:
        return "  ".join(str(c).ljust(w) if i == 0 else str(c).rjust(w) if i < last else str(c)
                         for i, (c, w) in enumerate(zip(cells, widths)))

    lines.append(row(head))
    lines.append("-" * (sum(widths) + 2 * last))
    for sc in SCENARIOS:
        rb = b.get(sc)
        rps = [servers[k].get(sc) for k in peers]
        if rb is None and all(r is None for r in rps):
            continue
        params = next((r.get("params") for r in (rb, *rps) if r and r.get("params")), None) or {}
        ptxt = ", ".join(f"{k}={v}" for k, v in params.items())
        lines.append(f"[{sc}] {ptxt}")
        named = [("barosync", rb), *zip(peers, rps)]
        for s, r in named:
            if r is not None and r.get("status") != "ok":
                lines.append(f"  {s}: ERROR {r.get('error')}")
        for rsc, key, label in ROWS:
            if rsc != base_of(sc):
                continue
            vb = getpath(rb, key) if rb and rb.get("status") == "ok" else None
            vps = [getpath(r, key) if r and r.get("status") == "ok" else None for r in rps]
            if vb is None and all(v is None for v in vps):
                continue
            ratios = []
            for vp in vps:
                number = isinstance(vb, (int, float)) and isinstance(vp, (int, float)) and not isinstance(vb, bool)
                ratios.append(f"{vb / vp:.2f}x" if number and vp else "")
            lines.append(row(["  " + label, fmt(vb), *(fmt(vp) if r is not None else "n/a" for vp, r in zip(vps, rps)),
                              *ratios, "(full run only)" if smoke and (sc, key) in TARGETS
                              else check(sc, key, vb)]))
        for s, r in named:
            if r and r.get("status") == "ok":
                notes = []
                if r.get("loadgen_bound"):
                    notes.append(f"LOAD GENERATOR WAS THE BOTTLENECK (its CPU {fmt(r['loadgen_cpu_pct'])}%, "
                                 f"peak {fmt(r['loadgen_cpu_pct_peak_1s'])}%)")
                if (r.get("other_cpu_pct") or 0) > disturbed_pct(sc):
                    notes.append(f"other processes used {fmt(r['other_cpu_pct'])}% of a core meanwhile: "
                                 f"figures disturbed, rerun on a quiet machine")
                if r.get("errors"):
                    notes.append(f"{r['errors']} error messages, e.g. {r.get('error_samples', [])[:1]}")
                if r.get("closed_unexpectedly"):
                    notes.append(f"{r['closed_unexpectedly']} connections closed {r.get('close_codes')}")
                if r.get("connect_failures"):
                    notes.append(f"{r['connect_failures']} connects failed {r.get('http_errors')}")
                if r.get("connects_stalled"):
                    notes.append(f"{r['connects_stalled']} connections never completed (gave up after "
                                 f"no progress for 15 s; time to connect counts up to the last success)")
                if not r.get("server_alive", True) or r.get("server_exit_code") not in (0, None):
                    notes.append(f"server exit code {r.get('server_exit_code')} "
                                 f"(alive at end of run: {r.get('server_alive')}): {first_error(r)}")
                if r.get("out_of_order") or r.get("gaps"):
                    notes.append(f"{r.get('out_of_order')} out of order, {r.get('gaps')} gaps")
                if r.get("cursor_out_of_order"):
                    notes.append(f"{r['cursor_out_of_order']} cursors arrived older than one already "
                                 f"received from the same mover")
                if r.get("cursor_with_id"):
                    notes.append(f"{r['cursor_with_id']} user:cursor messages carried an id (they must not)")
                if r.get("cursor_unparsable"):
                    notes.append(f"{r['cursor_unparsable']} user:cursor messages without the mover's x/y/elementId")
                for n_ in notes:
                    lines.append(f"  ! {s}: {n_}")
    return "\n".join(lines)


