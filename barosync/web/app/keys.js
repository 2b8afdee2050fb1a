// The web calendar without a mouse: shortcuts as Google Calendar's (c create, j/k next
// and previous, t today, d/w/m views, ? help), a slot cursor moved with the arrow keys
// (Shift widens it) that Enter opens as a new event, and the undo of a deletion (z).
// Events are focusable (FullCalendar's eventInteractive): Tab reaches them, Enter opens
// one, Delete asks, then deletes with an undo.

export const SHORTCUTS = [
  ["c", "new event (at the slot cursor, or the next hour)"],
  ["← → ↑ ↓", "move the slot cursor (a day, half an hour; a week in the month view)"],
  ["Shift + arrows", "make the cursor a longer range"],
  ["Enter", "open the cursor's range as a new event, or the focused event"],
  ["Tab", "from event to event"],
  ["Delete", "delete the focused event (asks first; z undoes)"],
  ["j or n / k or p", "next / previous week, day or month"],
  ["t", "today"],
  ["d / w / m", "day, week or month view"],
  ["z or Ctrl+Z", "undo the last deletion"],
  ["Ctrl+Enter", "save, in the editor (Enter does too, outside the description)"],
  ["?", "this help"],
  ["Esc", "close a dialog, or clear the cursor"],
];

const HALF_HOUR = 30 * 60 * 1000;
const DAY = 24 * 60 * 60 * 1000;

/** Whether a key press belongs to a text field or a dialog rather than to the calendar. */
function typing(e) {
  const t = e.target;
  return t instanceof HTMLElement && (t.isContentEditable || ["INPUT", "TEXTAREA", "SELECT"].includes(t.tagName)
    || t.closest("dialog[open]") !== null);
}

/**
 * Installs the shortcuts. `app` gives what they act on: calendar (FullCalendar),
 * newEvent(start, end, allDay), openEvent(id), askDelete(id), undo(), help(),
 * announce(text) (a polite live region), canWrite().
 */
export function installKeys(app) {
  let cursor = null; // {start: Date, end: Date, allDay}
  const calendar = app.calendar;

  const monthView = () => calendar.view.type === "dayGridMonth";
  const show = () => {
    if (!cursor) { calendar.unselect(); return; }
    app.selecting = true;  // FullCalendar calls `select`: not a mouse selection to open
    calendar.select({ start: cursor.start, end: cursor.end, allDay: cursor.allDay });
    app.selecting = false;
    app.announce(`${describe(cursor)} selected; Enter makes an event`);
  };
  const describe = (c) => {
    const day = new Intl.DateTimeFormat(navigator.language, { weekday: "long", day: "numeric", month: "long" });
    const time = new Intl.DateTimeFormat(navigator.language, { hour: "numeric", minute: "2-digit" });
    return c.allDay ? day.format(c.start)
      : `${day.format(c.start)}, ${time.format(c.start)} to ${time.format(c.end)}`;
  };
  const start = () => {
    const now = new Date();
    const view = calendar.view;
    const inView = now >= view.activeStart && now < view.activeEnd ? now : new Date(view.activeStart);
    if (monthView()) {
      const day = new Date(inView.getFullYear(), inView.getMonth(), inView.getDate());
      return { start: day, end: new Date(+day + DAY), allDay: true };
    }
    const at = new Date(Math.ceil(+inView / HALF_HOUR) * HALF_HOUR);
    if (+inView === +view.activeStart) at.setHours(9, 0, 0, 0);
    return { start: at, end: new Date(+at + HALF_HOUR), allDay: false };
  };
  const move = (key, widen) => {
    if (!cursor) { cursor = start(); show(); return; }
    const step = monthView() ? { ArrowLeft: -DAY, ArrowRight: DAY, ArrowUp: -7 * DAY, ArrowDown: 7 * DAY }[key]
      : { ArrowLeft: -DAY, ArrowRight: DAY, ArrowUp: -HALF_HOUR, ArrowDown: HALF_HOUR }[key];
    const unit = monthView() ? DAY : HALF_HOUR;
    if (widen) {
      const end = new Date(+cursor.end + step);
      if (end > cursor.start) cursor = { ...cursor, end };
    } else {
      const length = Math.max(unit, Math.min(+cursor.end - +cursor.start, unit));
      const first = new Date(+cursor.start + step);
      cursor = { ...cursor, start: first, end: new Date(+first + length) };
    }
    if (cursor.start < calendar.view.activeStart) calendar.prev();
    else if (cursor.start >= calendar.view.activeEnd) calendar.next();
    show();
  };

  document.addEventListener("keydown", (e) => {
    if (e.defaultPrevented || e.altKey || e.metaKey) return;
    const inDialog = e.target instanceof HTMLElement && e.target.closest("dialog[open]");
    if (inDialog && e.ctrlKey && e.key === "Enter" && inDialog.id === "editor") {
      e.preventDefault();
      inDialog.querySelector("#editor-save")?.click();
      return;
    }
    if (e.ctrlKey && e.key.toLowerCase() === "z" && !typing(e)) { e.preventDefault(); app.undo(); return; }
    if (e.ctrlKey || typing(e)) return;
    const focusedEvent = e.target instanceof HTMLElement ? e.target.closest(".fc-event") : null;
    if (focusedEvent && (e.key === "Delete" || e.key === "Backspace")) {
      const id = focusedEvent.dataset.eventId;
      if (id && app.canWrite()) { e.preventDefault(); app.askDelete(id); }
      return;
    }
    if (e.key.startsWith("Arrow")) {
      e.preventDefault();
      move(e.key, e.shiftKey);
      return;
    }
    const actions = {
      "?": () => app.help(),
      c: () => { const c = cursor || start(); if (app.canWrite()) app.newEvent(c.start, c.end, c.allDay); },
      Enter: () => { if (cursor && !focusedEvent && app.canWrite()) app.newEvent(cursor.start, cursor.end, cursor.allDay); },
      Escape: () => { cursor = null; show(); },
      j: () => calendar.next(), n: () => calendar.next(), k: () => calendar.prev(), p: () => calendar.prev(),
      t: () => calendar.today(),
      d: () => calendar.changeView("timeGridDay"), w: () => calendar.changeView("timeGridWeek"),
      m: () => calendar.changeView("dayGridMonth"),
      z: () => app.undo(),
    };
    const act = actions[e.key];
    if (act && !(e.key === "Enter" && focusedEvent)) { e.preventDefault(); act(); }
  });
}
