// The event editor: a new event, an event, a task's text, or one occurrence of a
// series (this one, this and the following, or all of them: series.js says what each
// changes); deletion with an undo (the toast, or z), and a question first when it
// comes from the keyboard. app.js opens it (installEditor gives it the client).

import { KIND_NAMES, itemKind } from "/app/items.js";
import {
  endedBefore, following, occurrenceId, occurrencesBefore, ruleOf, ruleParts, withOverride, withoutOccurrence,
} from "/app/series.js";

const $ = (id) => document.getElementById(id);
// The colour input shows this for an event with none; it is sent only when changed.
export const DEFAULT_COLOR = "#4363d8";
// How long a deletion can be undone from its toast.
const UNDO_MS = 8000;

let ctx = null; // {client, projectId(), writable()}: installEditor's
let editing = null; // the event open in the editor (null: a new one)
let occurrence = null; // {rid, start, end}: the occurrence of a series open in the editor
let undoLast = null; // what z (or the toast's Undo) does: bring back what was deleted
let toastTimer = null;

/** Wires the editor, the delete question and the toast to `context`: {client (a
 *  SyncClient), projectId() (the open project), writable() (may this user change it)}. */
export function installEditor(context) {
  ctx = context;
  const form = $("editor-form");
  form.addEventListener("submit", saveEditor);
  for (const name of ["freq", "ends"]) form[name].addEventListener("change", showRepeat);
  for (const radio of form.scope) radio.addEventListener("change", () => showRepeatFor());
  $("editor-cancel").addEventListener("click", () => $("editor").close());
  $("editor-delete").addEventListener("click", deleteEditing);
  $("confirm-delete-cancel").addEventListener("click", () => $("confirm-delete").close());
}

const pad = (n) => String(n).padStart(2, "0");
const toLocalInput = (iso) => {
  const d = new Date(iso);
  return `${d.getFullYear()}-${pad(d.getMonth() + 1)}-${pad(d.getDate())}T${pad(d.getHours())}:${pad(d.getMinutes())}`;
};

/** An event clicked (or opened with Enter) on the grid: one of a series opens as that
 *  occurrence, with the choice of what an edit changes. */
export function openOccurrence(shown) {
  const event = ctx.client.get(shown.id, ctx.projectId());
  if (!event?.recurrence || !shown.start) { openEditor(event); return; }
  const rid = shown.extendedProps?.recurrenceId || occurrenceId(shown.start, !!event.allDay);
  const length = Date.parse(event.endDate) - Date.parse(event.startDate);
  openEditor(event, {}, { rid, start: shown.start, end: shown.end || new Date(+shown.start + length) });
}

export function openEditor(event, draft = {}, occ = null) {
  editing = event || null;
  occurrence = occ;
  const override = occ && (event.recurrence?.overrides || []).find((o) => o.recurrenceId === occ.rid);
  const source = occ ? { ...event, ...(override || {}), startDate: occ.start.toISOString(),
                         endDate: occ.end.toISOString() } : event || draft;
  const form = $("editor-form");
  $("editor-scope").hidden = !occ;
  form.scope.value = "one";
  const rule = ruleParts(event?.recurrence?.rrule);
  form.freq.value = rule.freq;
  form.ends.value = rule.ends;
  form.until.value = rule.until;
  form.count.value = rule.count;
  $("editor-repeat-note").hidden = rule.simple;
  showRepeat();
  form.title.value = source.title || "";
  form.allDay.checked = !!source.allDay;
  form.start.value = toLocalInput(source.startDate);
  form.end.value = toLocalInput(source.endDate);
  form.location.value = source.location || "";
  form.description.value = source.description || "";
  form.attendees.value = (source.attendees || []).join(", ");
  form.color.value = source.color || DEFAULT_COLOR;
  const can = ctx.writable();
  // A task's or journal entry's dates and status are its app's: the editor changes
  // its text only (the server writes it back into what the app stored).
  const kind = event ? itemKind(event) : "event";
  for (const name of ["allDay", "start", "end", "attendees", "color"]) form[name].disabled = kind !== "event";
  $("editor-app-note").hidden = kind === "event";
  showRepeatFor(kind);
  $("editor-title").textContent = !can ? KIND_NAMES[kind] : event ? `Edit ${KIND_NAMES[kind].toLowerCase()}`
    : "New event";
  $("editor-fields").disabled = !can;
  $("editor-save").hidden = !can;
  $("editor-cancel").textContent = can ? "Cancel" : "Close";
  $("editor-delete").hidden = !event || !can;
  $("editor-error").textContent = "";
  $("editor").showModal();
  if (can) form.title.focus();
  else $("editor-cancel").focus();
}

/** Repeats belongs to events, and not to one occurrence of a series. */
function showRepeatFor(kind = editing ? itemKind(editing) : "event") {
  $("editor-repeat").hidden = kind !== "event" || (!!occurrence && $("editor-form").scope.value === "one");
}

/** The Repeats controls shown as far as the choice goes. */
function showRepeat() {
  const form = $("editor-form");
  for (const el of document.querySelectorAll("[data-when-repeats]")) el.hidden = !form.freq.value;
  for (const el of document.querySelectorAll("[data-when-ends]")) {
    el.hidden = !form.freq.value || form.ends.value !== el.dataset.whenEnds;
  }
}

const repeatChoice = (form) => ({ freq: form.freq.value, ends: form.ends.value, until: form.until.value,
                                  count: form.count.value });

/** Whether the Repeats choice differs from the event's rule (an unchanged choice
 *  keeps a rule the editor cannot show whole). */
function repeatChanged(form, event) {
  const was = ruleParts(event?.recurrence?.rrule);
  const now = repeatChoice(form);
  return now.freq !== was.freq || (now.freq && (now.ends !== was.ends || (now.ends === "on" && now.until !== was.until)
    || (now.ends === "after" && Number(now.count) !== was.count)));
}

/** What the form says, as event fields (optional ones left out when empty). */
function formFields(form) {
  return {
    title: form.title.value.trim(), allDay: form.allDay.checked,
    startDate: new Date(form.start.value).toISOString(), endDate: new Date(form.end.value).toISOString(),
    location: form.location.value || null, description: form.description.value || null, color: form.color.value,
    attendees: form.attendees.value.split(",").map((a) => a.trim()).filter(Boolean),
  };
}

/**
 * Only what the user changed in the editor: a save never rewrites a field they did not
 * touch (it could collide with someone else's edit of it and ask them about a conflict
 * that does not exist). Compared as the form shows each field.
 */
function changedFields(form, event) {
  const was = {
    title: event.title || "", allDay: !!event.allDay,
    start: toLocalInput(event.startDate), end: toLocalInput(event.endDate),
    location: event.location || "", description: event.description || "",
    color: event.color || DEFAULT_COLOR, attendees: (event.attendees || []).join(", "),
  };
  const now = formFields(form);
  const changes = {};
  if (form.title.value.trim() !== was.title) changes.title = now.title;
  if (now.allDay !== was.allDay) changes.allDay = now.allDay;
  if (form.start.value !== was.start || now.allDay !== was.allDay) changes.startDate = now.startDate;
  if (form.end.value !== was.end || now.allDay !== was.allDay) changes.endDate = now.endDate;
  if (form.location.value !== was.location) changes.location = now.location;
  if (form.description.value !== was.description) changes.description = now.description;
  if (form.color.value !== was.color) changes.color = now.color;
  if (now.attendees.join(", ") !== was.attendees) changes.attendees = now.attendees;
  return changes;
}

function saveEditor(e) {
  const form = $("editor-form");
  const fields = formFields(form);
  if (fields.endDate < fields.startDate) {
    e.preventDefault();
    $("editor-error").textContent = "The end is before the start.";
    return;
  }
  if (!editing) {
    const { color, location: where, description, ...rest } = fields;
    const rule = ruleOf(repeatChoice(form), fields.allDay);
    const draft = { ...rest, ...(where ? { location: where } : {}), ...(description ? { description } : {}),
                    ...(color !== DEFAULT_COLOR ? { color } : {}), ...(rule ? { recurrence: { rrule: rule } } : {}) };
    ctx.client.create(ctx.projectId(), draft).catch(showEditorError);
    return;
  }
  if (occurrence) { saveOccurrence(form, fields); return; }
  const changes = changedFields(form, editing);
  if (repeatChanged(form, editing)) {
    const rule = ruleOf(repeatChoice(form), fields.allDay);
    changes.recurrence = rule ? { ...(editing.recurrence || {}), rrule: rule } : null;
  }
  if (Object.keys(changes).length) ctx.client.update(editing.id, changes, editing.projectId).catch(showEditorError);
}

/** An occurrence of a series saved: as that occurrence alone (an override), as the
 *  start of a new series that the old one now ends before, or as the whole series
 *  (what changed in this occurrence, applied to every one: times shifted alike). */
function saveOccurrence(form, fields) {
  const e = editing;
  const occ = occurrence;
  const rec = e.recurrence;
  const scope = form.scope.value;
  const done = (p) => p.catch(showEditorError);
  if (scope === "one") {
    done(ctx.client.update(e.id, { recurrence: withOverride(rec, occ.rid, fields) }, e.projectId));
    return;
  }
  const first = occ.rid === occurrenceId(new Date(e.startDate), !!e.allDay);
  const ruleNow = repeatChanged(form, e) ? ruleOf(repeatChoice(form), fields.allDay) : rec.rrule;
  if (scope === "all" || first) {
    const shown = { ...e, startDate: occ.start.toISOString(), endDate: occ.end.toISOString() };
    const changes = changedFields(form, shown);
    if ("startDate" in changes) changes.startDate = new Date(Date.parse(e.startDate) + Date.parse(fields.startDate) - +occ.start).toISOString();
    if ("endDate" in changes) changes.endDate = new Date(Date.parse(e.endDate) + Date.parse(fields.endDate) - +occ.end).toISOString();
    if (ruleNow !== rec.rrule) changes.recurrence = ruleNow ? { ...rec, rrule: ruleNow } : null;
    if (Object.keys(changes).length) done(ctx.client.update(e.id, changes, e.projectId));
    return;
  }
  const rest = following(rec, occ.rid, occurrencesBefore(rec.rrule, new Date(e.startDate), occ.start));
  if (ruleNow !== rec.rrule) rest.rrule = ruleNow;
  const { color, ...more } = fields;
  done(ctx.client.update(e.id, { recurrence: endedBefore(rec, occ.rid, !!e.allDay) }, e.projectId));
  done(ctx.client.create(e.projectId, { ...more, ...(color !== DEFAULT_COLOR ? { color } : {}),
                                    ...(rest.rrule ? { recurrence: rest } : {}) }));
}

/** Delete is never a default button: a click only, then a few seconds to undo it. */
function deleteEditing() {
  const gone = editing;
  const occ = occurrence;
  const scope = $("editor-form").scope.value;
  $("editor").close();
  if (!gone) return;
  if (!occ || scope === "all" || (scope === "following" && occ.rid === occurrenceId(new Date(gone.startDate), !!gone.allDay))) {
    deleteEvent(gone);
    return;
  }
  // One occurrence (an EXDATE), or it and the following (the series ends before it).
  const was = gone.recurrence;
  const now = scope === "one" ? withoutOccurrence(was, occ.rid) : endedBefore(was, occ.rid, !!gone.allDay);
  ctx.client.update(gone.id, { recurrence: now }, gone.projectId).catch(showEditorError);
  // Queued after the deletion, the undo is based on its version (barosync.js waits
  // for the deletion's ack), even when pressed at once.
  undoLast = () => ctx.client.update(gone.id, { recurrence: was }, gone.projectId).catch(showEditorError);
  showUndo(scope === "one" ? `Deleted one “${gone.title}”.` : `Deleted “${gone.title}” from this one on.`);
}

/** From the keyboard (Delete on a focused event): asked first, Cancel the default. */
export function askDelete(event) {
  if (!event) return;
  $("confirm-delete-text").textContent = `Delete “${event.title}”? z undoes it.`;
  $("confirm-delete-ok").onclick = () => { $("confirm-delete").close(); deleteEvent(event); };
  $("confirm-delete").showModal();
  $("confirm-delete-cancel").focus();
}

function deleteEvent(event) {
  ctx.client.delete(event.id, event.projectId).catch(showEditorError);
  // Back with its id, fields and history, for everyone who saw it go; queued like
  // any change, so it works offline too.
  undoLast = () => ctx.client.restore(event).catch(showEditorError);
  showUndo(`Deleted “${event.title}”.`);
}

export function undoDelete() {
  const undo = undoLast;
  if (!undo) return;
  undoLast = null;
  hideToast();
  undo();
  $("announce").textContent = "Brought back.";
}

function showUndo(text) {
  clearTimeout(toastTimer);
  $("toast-text").textContent = text;
  $("toast").hidden = false;
  $("toast-undo").onclick = undoDelete;
  toastTimer = setTimeout(hideToast, UNDO_MS);
}

function hideToast() {
  clearTimeout(toastTimer);
  $("toast").hidden = true;
  $("toast-undo").onclick = null;
}

export function showEditorError(error) {
  if (error.name === "ConflictError") return; // the conflict dialog takes it
  alert(`The server refused the change: ${error.message}`);
}

