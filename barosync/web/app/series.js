// Recurring events in the editor: the RRULE a "Repeats" choice makes, and what an edit
// of one occurrence, of it and those that follow, or of the whole series changes in
// the event's `recurrence` ({rrule, rdates, exdates, overrides}, docs/protocol.md).
// Plain functions of values; app.js sends what they return. Calendar apps read the
// same recurrence over CalDAV (formats/ical.py writes it as RRULE, EXDATE and
// RECURRENCE-ID overrides).

export const FREQS = ["DAILY", "WEEKLY", "MONTHLY", "YEARLY"];

const pad = (n) => String(n).padStart(2, "0");
/** A Date as iCalendar's UTC stamp: 20261208T090000Z. */
export const utcStamp = (d) => d.toISOString().replace(/[-:]/g, "").replace(/\.\d{3}/, "");
/** A Date's local day as YYYY-MM-DD. */
export const localDay = (d) => `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}`;

/** What the editor shows of an RRULE: {freq, ends ("never", "on", "after"), until
 *  (YYYY-MM-DD), count, simple}; `simple` is false for rules it cannot show whole
 *  (BYDAY, INTERVAL...), which it then leaves as they are unless the choice changes. */
export function ruleParts(rrule) {
  if (!rrule) return { freq: "", ends: "never", until: "", count: 10, simple: true };
  const parts = Object.fromEntries(rrule.split(";").map((p) => p.split("=")));
  const until = parts.UNTIL ? `${parts.UNTIL.slice(0, 4)}-${parts.UNTIL.slice(4, 6)}-${parts.UNTIL.slice(6, 8)}` : "";
  const simple = Object.keys(parts).every((k) => ["FREQ", "UNTIL", "COUNT", "INTERVAL", "WKST"].includes(k))
    && (!parts.INTERVAL || parts.INTERVAL === "1") && FREQS.includes(parts.FREQ);
  return { freq: FREQS.includes(parts.FREQ) ? parts.FREQ : "", ends: parts.COUNT ? "after" : parts.UNTIL ? "on" : "never",
           until, count: parts.COUNT ? Number(parts.COUNT) : 10, simple };
}

/** The RRULE of a choice ({freq, ends, until, count}); null for "does not repeat".
 *  `until` is the last day included, in local time. */
export function ruleOf({ freq, ends, until, count }, allDay) {
  if (!FREQS.includes(freq)) return null;
  let rule = `FREQ=${freq}`;
  if (ends === "after") rule += `;COUNT=${Math.max(1, Math.min(999, Math.trunc(Number(count)) || 1))}`;
  if (ends === "on" && until) {
    rule += `;UNTIL=${allDay ? until.replaceAll("-", "") : utcStamp(new Date(`${until}T23:59:59`))}`;
  }
  return rule;
}

/** The id of the occurrence that starts at `start`, as the server writes them: a
 *  date for an all-day series, else the UTC instant. */
export function occurrenceId(start, allDay) {
  return allDay ? localDay(start) : start.toISOString().replace(/\.\d{3}Z$/, "Z");
}

const before = (rid) => (value) => value < rid;  // ids of one series compare as text

/** This occurrence only: its own fields, kept as an override. */
export function withOverride(rec, rid, f) {
  const whole = (iso) => iso.replace(/\.\d{3}Z$/, "Z");  // as the server and calendar apps write them
  const override = { recurrenceId: rid, startDate: whole(f.startDate), endDate: whole(f.endDate), title: f.title };
  if (f.location) override.location = f.location;
  if (f.description) override.description = f.description;
  if (f.allDay) override.allDay = true;
  return { ...rec, overrides: [...(rec.overrides || []).filter((o) => o.recurrenceId !== rid), override] };
}

/** This occurrence deleted: an EXDATE (and its override gone). */
export function withoutOccurrence(rec, rid) {
  return { ...rec, exdates: [...new Set([...(rec.exdates || []), rid])],
           overrides: (rec.overrides || []).filter((o) => o.recurrenceId !== rid) };
}

/** The series ended just before the occurrence `rid` (this and following: the rest
 *  becomes an event of its own, or is deleted). */
export function endedBefore(rec, rid, allDay) {
  const last = allDay ? localDay(new Date(new Date(`${rid}T00:00:00`) - 86400e3)).replaceAll("-", "")
    : utcStamp(new Date(Date.parse(rid) - 1000));
  const rule = rec.rrule.split(";").filter((p) => !/^(UNTIL|COUNT)=/.test(p)).concat(`UNTIL=${last}`).join(";");
  return { ...rec, rrule: rule, rdates: (rec.rdates || []).filter(before(rid)),
           exdates: (rec.exdates || []).filter(before(rid)),
           overrides: (rec.overrides || []).filter((o) => before(rid)(o.recurrenceId)) };
}

/** The series from the occurrence `rid` on, as the recurrence of a new event that
 *  starts there: a COUNT less the `done` occurrences before it. Its overrides are
 *  dropped (their ids belong to the old times), as other calendars do. */
export function following(rec, rid, done) {
  const count = /(?:^|;)COUNT=(\d+)/.exec(rec.rrule);
  const rule = rec.rrule.split(";").filter((p) => !/^COUNT=/.test(p));
  if (count) rule.push(`COUNT=${Math.max(1, Number(count[1]) - done)}`);
  return { rrule: rule.join(";"), rdates: (rec.rdates || []).filter((x) => x >= rid),
           exdates: (rec.exdates || []).filter((x) => x >= rid), overrides: [] };
}

/** How many occurrences of the series (starting at `start`) come before `at`, through
 *  the rrule library FullCalendar's rrule plugin loads (at most 10,000 counted). */
export function occurrencesBefore(rrule, start, at) {
  const engine = globalThis.rrule;
  if (!engine) return 0;
  const rule = engine.rrulestr(`DTSTART:${utcStamp(start)}\nRRULE:${rrule}`);
  let n = 0;
  rule.all((d) => { if (d < at && n < 10000) { n += 1; return true; } return false; });
  return n;
}
