// The conflict dialog: someone else changed an event while you edited it (a manual
// strategy, or a merge whose edits touch one field). It names the event as you knew
// it, says who changed it and when, and shows each field's value before, yours and
// theirs side by side, your own picked to start. app.js opens it on the client's
// "conflict" event (installConflicts).

const $ = (id) => document.getElementById(id);

// What the dialog calls each field, and how it shows a value.
const FIELD_NAMES = { title: "Title", startDate: "Start", endDate: "End", allDay: "All day", location: "Location",
                      description: "Description", attendees: "Attendees", color: "Color", recurrence: "Repeats",
                      timeZone: "Time zone" };

function shownValue(field, value) {
  if (value === undefined || value === null || value === "") return "—";
  if ((field === "startDate" || field === "endDate") && typeof value === "string") {
    return new Date(value).toLocaleString(navigator.language, { dateStyle: "medium", timeStyle: "short" });
  }
  if (field === "allDay") return value ? "yes" : "no";
  if (Array.isArray(value)) return value.join(", ") || "—";
  if (typeof value === "object") return value.rrule || JSON.stringify(value);
  return String(value);
}

/**
 * Wires the dialog to `client` (a SyncClient). `projectId()` is the open project
 * (whose presence names who changed the event); `failed(error)` shows a refusal.
 */
export function installConflicts(client, projectId, failed) {
  let conflict = null;

  /** Who changed the event and when, from the server's version of it. */
  const changedBy = (theirs) => {
    const who = client.presence(projectId()).find((u) => u.id === theirs.updatedBy)?.name || theirs.updatedBy
      || "someone else";
    const when = theirs.updatedAt ? new Date(theirs.updatedAt).toLocaleTimeString(navigator.language, { timeStyle: "short" })
      : null;
    return when ? `${who} at ${when}` : who;
  };

  const open = (c) => {
    if ("resolved" in c && c.resolved) return; // the strategy settled it: nothing to ask
    conflict = c;
    const theirs = c.remoteVersion || {};
    const mine = c.localVersion || {};
    const base = c.base || {};
    // Named as this person knew it (before either edit), not by the other's new title.
    const name = base.title || mine.title || theirs.title || "this event";
    $("conflict-summary").textContent = c.remoteVersion
      ? `“${name}” was changed by ${changedBy(theirs)} while you edited it. Pick, for each field, the value to keep.`
      : `“${name}” was deleted while you edited it.`;
    const fields = c.fields.length ? c.fields : Object.keys(mine);
    $("conflict-fields").replaceChildren(...fields.map((f) => {
      const row = document.createElement("tr");
      const head = document.createElement("th");
      head.scope = "row";
      head.textContent = FIELD_NAMES[f] || f;
      const before = document.createElement("td");
      before.textContent = shownValue(f, base[f]);
      // Each value beside its own choice, in one label; your own edit picked to start.
      const pick = (side, value) => {
        const td = document.createElement("td");
        const label = document.createElement("label");
        label.className = "pick";
        const radio = document.createElement("input");
        radio.type = "radio"; radio.name = `pick-${f}`; radio.value = side; radio.checked = side === "mine";
        label.append(radio, ` ${shownValue(f, value)}`);
        td.append(label);
        return td;
      };
      row.append(head, before, pick("mine", mine[f]), pick("theirs", theirs[f]));
      return row;
    }));
    $("conflict-theirs-head").textContent = c.remoteVersion ? `Theirs (${changedBy(theirs)})` : "Theirs";
    $("conflict").showModal();
  };

  const settle = (e) => {
    const c = conflict;
    conflict = null;
    if (!c) return;
    const choice = e.submitter ? e.submitter.value : "remote";
    if (choice !== "fields") { client.resolve(c, choice).catch(failed); return; }
    const fields = {};
    for (const f of c.fields) {
      const picked = document.querySelector(`input[name="pick-${f}"]:checked`);
      fields[f] = (picked && picked.value === "mine" ? c.localVersion : c.remoteVersion || {})[f];
    }
    client.resolve(c, fields).catch(failed);
  };

  client.addEventListener("conflict", (e) => open(e.detail.conflict));
  $("conflict-form").addEventListener("submit", settle);
}
