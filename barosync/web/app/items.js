// Tasks and journal entries from a tasks app, as the web calendar shows them. The
// server keeps each one's whole resource, as the app sent it, in `ical`
// (formats/tasks.py); its title and dates are read from it there. Here: which kind an
// item is, whether it has a date to sit on in the grid, and whether a task is done.
// iCalendar content lines start at the beginning of a line (folded ones with a space),
// so a property is found by its name there.

/** "event", "task" or "journal". */
export function itemKind(e) {
  const text = e.ical || "";
  if (!text || /^BEGIN:VEVENT/m.test(text)) return "event";
  if (/^BEGIN:VTODO/m.test(text)) return "task";
  return /^BEGIN:VJOURNAL/m.test(text) ? "journal" : "event";
}

/** Whether a task or journal entry has a date of its own (DTSTART or DUE). */
export const dated = (e) => /^(DUE|DTSTART)[;:]/m.test(e.ical || "");

/** Whether a task is done (STATUS:COMPLETED). */
export const done = (e) => /^STATUS:COMPLETED\r?$/m.test(e.ical || "");

/** What the editor calls an item. */
export const KIND_NAMES = { event: "Event", task: "Task", journal: "Journal entry" };

/** The grid's entry for a task or journal entry (none when it has no date): marked
 *  with its kind, done or not, and never dragged (its dates are the app's). */
export function gridEntry(e, base) {
  const kind = itemKind(e);
  if (!dated(e)) return [];
  const finished = kind === "task" && done(e);
  const mark = kind === "task" ? (finished ? "☑" : "☐") : "✎";
  return [{ ...base, title: `${mark} ${e.title}`, editable: false,
            classNames: [...base.classNames, kind, ...(finished ? ["done"] : [])] }];
}

/** The task list beside the calendar: open tasks first (by date), then done ones. */
export function taskRows(events, open) {
  const tasks = events.filter((e) => itemKind(e) === "task");
  tasks.sort((a, b) => (done(a) - done(b)) || (dated(b) - dated(a)) || a.startDate.localeCompare(b.startDate));
  return tasks.map((t) => {
    const row = document.createElement("li");
    const button = document.createElement("button");
    button.type = "button";
    button.className = done(t) ? "done" : "";
    button.textContent = `${done(t) ? "☑" : "☐"} ${t.title}`;
    button.setAttribute("aria-label", `${t.title}${done(t) ? " (done)" : ""}`);
    button.onclick = () => open(t);
    row.append(button);
    if (dated(t)) {
      const when = document.createElement("small");
      when.textContent = ` ${new Date(t.endDate).toLocaleDateString()}`;
      row.append(when);
    }
    return row;
  });
}
