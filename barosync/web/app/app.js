// The bundled web calendar: FullCalendar's grid on top of the barosync browser client.
// Everything live comes from the client's events; this file only draws them.

import { SyncClient } from "/client/barosync.js";
import qrcode from "/app/vendor/qrcode-generator/qrcode.mjs";
import { installConflicts } from "/app/conflicts.js";
import { gridEntry, itemKind, taskRows } from "/app/items.js";
import { SHORTCUTS, installKeys } from "/app/keys.js";
import { askDelete, installEditor, openEditor, openOccurrence, showEditorError, undoDelete } from "/app/editor.js";

const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "barosync.token";
const ME_KEY = "barosync.me";
const PROJECT_KEY = "barosync.project";
const PROJECTS_KEY = "barosync.projects";
const FULL_MESSAGE = "server storage full — your changes are kept and will be sent";
// How often the project list is read again while the tab is shown.
const PROJECTS_EVERY_MS = 30_000;

let client = null;
let calendar = null;
let projectId = null;
// When this browser last had everything saved and the server's changes in (kept
// across reloads, so an offline reload still says how old its copy is).
let lastSynced = localStorage.getItem("barosync.lastSynced") ? new Date(+localStorage.getItem("barosync.lastSynced")) : null;
let storageFull = false;
let countdown = null;
// What the keyboard's slot cursor works on (keys.js); `selecting` while it moves the
// selection, so FullCalendar's select callback does not open the editor for it.
const keyboard = { selecting: false };
let owns = () => false; // whether this user may invite to, and manage the members of, a project
const refused = new Set(); // projects the server no longer lets this user open
let linked = null; // a lasting token from a sign-in link (no session: no /auth/ requests)
let me = null; // what /api/me said of this user
let deletedProjects = []; // [{id, name, restorableUntil}] this user may restore

// -- sign-in --------------------------------------------------------------------------------

/** A token from the sign-in link's fragment (never sent to any server), kept in this browser. */
function tokenFromLink() {
  const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
  if (m) {
    localStorage.setItem(TOKEN_KEY, decodeURIComponent(m[1]));
    history.replaceState(null, "", location.pathname + location.search);
  }
  return localStorage.getItem(TOKEN_KEY);
}

function showSignin(message) {
  document.body.classList.add("signed-out");
  $("signin").hidden = false;
  $("setup").hidden = true;
  $("main").hidden = true;
  $("signin-message").textContent = message;
  // A failed sign-in with the identity provider comes back as #signin-error=…
  const failed = location.hash.match(/(?:^#|&)signin-error=([^&]+)/);
  if (failed) {
    $("signin-error").textContent = decodeURIComponent(failed[1]);
    history.replaceState(null, "", location.pathname + location.search);
  }
  providers().then((oidc) => {
    if (!oidc) return;
    $("signin-oidc").href = oidc.start;
    $("signin-oidc").textContent = `Sign in with ${oidc.name}`;
    $("signin-oidc").hidden = false;
  });
}

/** The identity provider set up on the server ({name, start}), or null. */
function providers() {
  return fetch("/auth/providers").then((r) => (r.ok ? r.json() : null)).then((found) => found && found.oidc)
    .catch(() => null);
}

async function signOut() {
  if (client) client.close();
  client = null;
  if (!localStorage.getItem(TOKEN_KEY)) await authPost("/auth/signout").catch(() => {});
  for (const key of [TOKEN_KEY, ME_KEY, PROJECTS_KEY]) localStorage.removeItem(key);
  showSignin("Signed out. Sign in again with your user name and password.");
}

// A signed-in session lives in an HttpOnly cookie this script never sees; the access
// tokens minted from it last minutes and are asked for again on every reconnect, so
// no lasting credential is ever in this page's storage or in a URL.
function authRequest(method, path, body) {
  return fetch(path, {
    method, credentials: "same-origin",
    headers: { "X-Barosync-Request": "1", ...(body ? { "Content-Type": "application/json" } : {}) },
    body: body ? JSON.stringify(body) : undefined,
  });
}

const authPost = (path, body) => authRequest("POST", path, body);

/** The JSON answer of an /auth/ request; null after saying why in the element `errorId`. */
async function answered(request, errorId) {
  $(errorId).textContent = "";
  const r = await request.catch(() => null);
  const answer = r ? await r.json().catch(() => ({})) : {};
  if (r && r.ok) return answer;
  $(errorId).textContent = answer.message || (r ? `the server answered HTTP ${r.status}`
                                                 : "cannot reach the server: try again when it is back");
  return null;
}

/** A fresh access token from the session (null: not signed in); throws when offline. */
async function sessionToken() {
  const r = await authPost("/auth/token");
  if (r.status === 401 || r.status === 501) return null;  // 501: a server without accounts (a cluster)
  if (!r.ok) throw new Error(`HTTP ${r.status}`);
  return (await r.json()).token;
}

async function submitSignin(e) {
  e.preventDefault();
  $("signin-submit").disabled = true;
  const signedIn = await answered(
    authPost("/auth/signin", { user: $("signin-user").value.trim(), password: $("signin-password").value }), "signin-error");
  $("signin-submit").disabled = false;
  if (signedIn) location.reload();
}

/** The first run's setup link names the owner; an invite link names a teammate. */
function showSetup(code, invite = false) {
  document.body.classList.add("signed-out");
  $("setup").hidden = false;
  $("signin").hidden = true;
  $("main").hidden = true;
  if (invite) {
    $("setup-title").textContent = "You are invited";
    $("setup-text").textContent = "Pick a user name and a password (or give yours, if you have an account here).";
    $("setup-submit").textContent = "Join";
    // Or join with the team's identity provider: the invite goes along and is used
    // once the provider has signed the person in.
    providers().then((oidc) => {
      if (!oidc) return;
      $("setup-oidc").href = `${oidc.start}?invite=${encodeURIComponent(code)}`;
      $("setup-oidc").textContent = `Join with ${oidc.name}`;
      $("setup-oidc").hidden = false;
    });
  }
  $("setup-form").addEventListener("submit", async (e) => {
    e.preventDefault();
    const form = e.target;
    if (form.password.value !== form.again.value) {
      $("setup-error").textContent = "the two passwords differ";
      return;
    }
    $("setup-submit").disabled = true;
    const made = await answered(authPost(invite ? "/auth/accept" : "/auth/setup", {
      code, user: form.user.value.trim(), name: form.name.value.trim(), password: form.password.value,
    }), "setup-error");
    $("setup-submit").disabled = false;
    if (made) {
      history.replaceState(null, "", location.pathname + location.search);
      location.reload();
    }
  });
}

async function api(path, getToken) {
  const r = await fetch(path, { headers: { Authorization: `Bearer ${await getToken()}` } });
  return { status: r.status, body: r.status < 300 ? await r.json() : null };
}

// -- start ------------------------------------------------------------------------------------

async function main() {
  if ("serviceWorker" in navigator) navigator.serviceWorker.register("/sw.js").catch(() => {});
  $("signin-form").addEventListener("submit", (e) => {
    e.preventDefault();
    localStorage.setItem(TOKEN_KEY, $("signin-token").value.trim());
    location.reload();
  });
  $("password-form").addEventListener("submit", submitSignin);
  $("sign-out").addEventListener("click", signOut);
  const setup = location.hash.match(/(?:^#|&)(setup|invite)=([^&]+)/);
  if (setup) return showSetup(decodeURIComponent(setup[2]), setup[1] === "invite");
  // A lasting token from a sign-in link (or an application's own), else the session's.
  linked = tokenFromLink();
  const token = linked ? () => localStorage.getItem(TOKEN_KEY) : sessionToken;
  try {
    const found = await api("/api/me", async () => {
      const t = await token();
      if (t === null) throw new Error("signed out");
      return t;
    });
    if (found.status === 401 || found.status === 403) {
      localStorage.removeItem(TOKEN_KEY);
      return showSignin("This sign-in link is expired or was refused: sign in with your password, or ask for a new link.");
    }
    me = found.body;
    localStorage.setItem(ME_KEY, JSON.stringify(me));
  } catch (e) {
    if (e.message === "signed out") return showSignin("Sign in with your user name and password.");
    me = JSON.parse(localStorage.getItem(ME_KEY) || "null"); // offline: what we knew
  }
  if (!me) return showSignin("Cannot reach the server to sign in; try again when it is back.");
  $("who").textContent = `${me.user.name} (${me.user.id})`;
  // Inviting needs a signed-in session (the owner made at setup, or a project's owner:
  // the server says no to anyone else).
  owns = (id) => !linked && (me.admin || (me.roles || {})[id] === "owner");
  $("apps").hidden = $("manage-projects").hidden = !!linked;  // made from a signed-in session
  $("connect-user").value = me.user.id;
  const projects = await projectList(token);
  start(token, projects);
}

/** The projects to pick from, [{id, name}]: a signed-in session's by name, with the
 * deleted ones it may restore (/auth/projects); a token's by id. */
async function projectList(token) {
  let projects = null;
  try {
    if (!linked) {
      const r = await fetch("/auth/projects", { credentials: "same-origin" });
      if (!r.ok) throw new Error(`${r.status}`);
      const found = await r.json();
      projects = found.projects;
      deletedProjects = found.deleted;
      me.roles = Object.fromEntries(projects.map((p) => [p.id, p.role]));
    } else {
      const ids = Array.isArray(me.projects) ? me.projects : (await api("/api/projects", token)).body.projects.map((p) => p.id);
      projects = ids.map((id) => ({ id, name: id }));
    }
    localStorage.setItem(PROJECTS_KEY, JSON.stringify(projects));
  } catch (e) {
    projects = JSON.parse(localStorage.getItem(PROJECTS_KEY) || "[]").map((p) => (typeof p === "string" ? { id: p, name: p } : p));
  }
  return projects.length || !linked ? projects : [{ id: "demo", name: "demo" }];
}

/** The open project's color, as a calendar app set it (events without one of their
 *  own take it); FullCalendar's default where it has none. */
function projectColor() {
  const option = [...$("project").options].find((o) => o.value === projectId);
  return option?.dataset.color || undefined;
}

/** The project list again (a calendar app may have made, renamed or recolored one):
 *  when the tab comes back into view, after a reconnect, and every PROJECTS_EVERY_MS
 *  while it is shown. The open project stays open. */
async function refreshProjects(token) {
  if (document.hidden || !client) return;
  const projects = await projectList(token);
  const shown = () => [...$("project").options].map((o) => `${o.value}:${o.text}:${o.dataset.color}`).join("|");
  const before = shown();
  const chosen = fillPicker(projects, projectId);
  if (chosen !== projectId && chosen) switchProject(chosen);  // the open one is gone
  else if (before !== shown() && calendar) calendar.refetchEvents();
}

/** A project's name as the picker shows it (its id where it has none). */
function projectName(id) {
  const option = [...$("project").options].find((o) => o.value === id);
  return option ? option.text : id;
}

function fillPicker(projects, wanted) {
  const picker = $("project");
  picker.replaceChildren(...projects.map((p) => {
    const option = new Option(p.name, p.id);
    if (p.color) option.dataset.color = p.color.slice(0, 7);  // #RRGGBB(AA): the grid takes #RRGGBB
    return option;
  }));
  const ids = projects.map((p) => p.id);
  picker.value = ids.includes(wanted) ? wanted : (ids[0] || "");
  return picker.value;
}

function start(token, projects) {
  const picker = $("project");
  fillPicker(projects, localStorage.getItem(PROJECT_KEY));
  picker.addEventListener("change", () => switchProject(picker.value));

  client = new SyncClient(location.origin, { token });
  client.addEventListener("state", showConnection);
  client.addEventListener("state", () => { if (client.state === "connected") refreshProjects(token); });
  document.addEventListener("visibilitychange", () => refreshProjects(token));
  setInterval(() => refreshProjects(token), PROJECTS_EVERY_MS);
  client.addEventListener("sync", (e) => showSync(e.detail));
  client.addEventListener("change", (e) => { if (e.detail.projectId === projectId && calendar) calendar.refetchEvents(); });
  client.addEventListener("presence", (e) => { if (e.detail.projectId === projectId) showPresence(); });
  client.addEventListener("cursor", (e) => { if (e.detail.projectId === projectId) showCursor(e.detail); });
  installConflicts(client, () => projectId, showEditorError);
  installEditor({ client, projectId: () => projectId, writable });
  client.addEventListener("access", (e) => { if (e.detail.projectId === projectId) showAccess(); });
  client.addEventListener("error", (e) => {
    // A subscribe refused: this user may no longer open the project (removed from it).
    if (e.detail.code !== "forbidden" || !e.detail.projectId) return;
    refused.add(e.detail.projectId);
    if (e.detail.projectId === projectId) { calendar.refetchEvents(); showAccess(); }
  });

  // A phone's screen shows a day (a week's seven columns would be a few pixels each),
  // and a long press of 300 ms picks an event up to drag it (FullCalendar's touch).
  const narrow = window.matchMedia("(max-width: 700px)").matches;
  calendar = new FullCalendar.Calendar($("calendar"), {
    initialView: narrow ? "timeGridDay" : "timeGridWeek",
    headerToolbar: narrow ? { left: "prev,next", center: "title", right: "timeGridDay,dayGridMonth" }
      : { left: "prev,next today", center: "title", right: "dayGridMonth,timeGridWeek,timeGridDay" },
    longPressDelay: 300,
    // The browser's language and region: dates, 12- or 24-hour times (the same in the
    // axis and on events) and the first day of the week.
    locale: navigator.language,
    firstDay: firstDayOfWeek(),
    eventTimeFormat: TIME_FORMAT,
    slotLabelFormat: TIME_FORMAT,
    datesSet: () => { mendAccessibility(); scrollToMorning(); },
    viewDidMount: () => mendAccessibility(),
    selectable: true,
    editable: true,
    nowIndicator: true,
    // The grid grows with its hours and the page scrolls: a scrolling box inside
    // FullCalendar's table could not take keyboard focus without breaking its roles.
    contentHeight: "auto",
    events: (info, success) => {
      const all = !projectId || refused.has(projectId) ? [] : client.events(projectId);
      showTasks(all);
      // Only what can show in the range drawn (a series may reach it from before):
      // FullCalendar parses every event it is given, a project may hold 10,000.
      const from = info.start.toISOString();
      const to = info.end.toISOString();
      success(all.filter((e) => e.recurrence || (e.startDate < to && e.endDate >= from)).flatMap(toCalendar));
    },
    select: (info) => {
      if (!keyboard.selecting) openEditor(null, { startDate: info.start.toISOString(), endDate: info.end.toISOString(), allDay: info.allDay });
    },
    unselectAuto: false,
    eventClick: (info) => openOccurrence(info.event),
    // Events take focus (Tab) and open with Enter; keys.js finds one by its id.
    eventInteractive: true,
    eventDidMount: (info) => { info.el.dataset.eventId = info.event.id; },
    eventDrop: (info) => moved(info),
    eventResize: (info) => moved(info),
  });
  calendar.render();
  $("calendar-wrap").addEventListener("mousemove", (e) => {
    const box = $("calendar-wrap").getBoundingClientRect();
    client.moveCursor(projectId, (e.clientX - box.left) / box.width, (e.clientY - box.top) / box.height, "calendar");
  });
  $("new-event").addEventListener("click", () => {
    // The next full hour, kept on today (late at night: today's last hour).
    const now = new Date();
    const startAt = new Date(now);
    startAt.setMinutes(0, 0, 0);
    startAt.setHours(Math.min(now.getHours() + 1, 23));
    openEditor(null, { startDate: startAt.toISOString(), endDate: new Date(+startAt + 3600000).toISOString(), allDay: false });
  });
  Object.assign(keyboard, {
    calendar,
    newEvent: (start, end, allDay) => openEditor(null, { startDate: start.toISOString(), endDate: end.toISOString(), allDay }),
    askDelete: (id) => askDelete(client.get(id, projectId)),
    undo: () => undoDelete(),
    help: () => $("help").showModal(),
    announce: (text) => { $("announce").textContent = text; },
    canWrite: () => writable(),
  });
  installKeys(keyboard);
  $("help-list").replaceChildren(...SHORTCUTS.map(([keys, what]) => {
    const row = document.createElement("tr");
    const k = document.createElement("th");
    k.scope = "row";
    k.textContent = keys;
    const w = document.createElement("td");
    w.textContent = what;
    row.append(k, w);
    return row;
  }));
  $("help-close").addEventListener("click", () => $("help").close());
  $("keys-help").addEventListener("click", () => $("help").showModal());
  $("invite").addEventListener("click", () => {
    $("invite-project").textContent = projectName(projectId);
    $("invite-link").value = "";
    $("invite-error").textContent = "";
    $("inviting").showModal();
  });
  $("invite-close").addEventListener("click", () => $("inviting").close());
  $("invite-make").addEventListener("click", makeInvite);
  $("members").addEventListener("click", async () => {
    $("members-project").textContent = projectName(projectId);
    $("membership").showModal();
    await showMembers(fetch(`/auth/members/${encodeURIComponent(projectId)}`, { credentials: "same-origin" }));
  });
  $("members-close").addEventListener("click", () => $("membership").close());
  $("apps").addEventListener("click", openConnect);
  $("connect-close").addEventListener("click", () => $("connect").close());
  $("connect-make").addEventListener("click", makeAppPassword);
  $("connect-make-feed").addEventListener("click", makeFeed);
  $("manage-projects").addEventListener("click", openProjects);
  $("projects-close").addEventListener("click", () => $("projects-dialog").close());
  $("project-create").addEventListener("click", createProject);
  $("project-rename-save").addEventListener("click", renameProject);
  $("project-delete").addEventListener("click", deleteProject);
  if (picker.value) switchProject(picker.value);
  else showNoProject();
}

function showNoProject() {
  $("read-only").hidden = false;
  $("read-only").textContent = "No project yet: make one under Projects";
  $("new-event").hidden = true;
}

function switchProject(id) {
  if (!id) { projectId = null; calendar.refetchEvents(); return showNoProject(); }
  if (projectId) client.unsubscribe(projectId);
  projectId = id;
  localStorage.setItem(PROJECT_KEY, id);
  $("cursors").replaceChildren();
  client.subscribe(id).then(() => { synced(); showSync(client.syncStatus()); });
  calendar.refetchEvents();
  showPresence();
  showAccess();
  $("invite").hidden = $("members").hidden = !owns(id);
}

// -- projects: made, renamed, deleted (restorable for 30 days) by their owners ---------------

async function openProjects() {
  $("projects-error").textContent = "";
  $("project-new-name").value = "";
  await showProjects();
  $("projects-dialog").showModal();
}

async function showProjects(wanted = projectId) {
  const projects = await projectList(null);
  const chosen = fillPicker(projects, wanted);
  if (chosen !== projectId || refused.has(chosen)) { refused.delete(chosen); switchProject(chosen); }
  const current = projects.find((p) => p.id === projectId);
  $("project-this").hidden = !current || !owns(projectId);
  $("project-rename").value = current ? current.name : "";
  $("project-delete").textContent = "Delete…";
  const list = $("projects-deleted");
  list.replaceChildren();
  for (const p of deletedProjects) {
    const item = document.createElement("li");
    const restore = document.createElement("button");
    restore.type = "button";
    restore.textContent = "Restore";
    restore.addEventListener("click", async () => {
      if (await answered(authPost(`/auth/projects/${encodeURIComponent(p.id)}/restore`, {}), "projects-error")) {
        await showProjects(p.id);
      }
    });
    item.append(`${p.name} (until ${new Date(p.restorableUntil * 1000).toLocaleDateString()}) `, restore);
    list.append(item);
  }
}

async function createProject() {
  const made = await answered(authPost("/auth/projects", { name: $("project-new-name").value.trim() }), "projects-error");
  if (!made) return;
  // The connection's token does not name the new project yet: reconnect with a new one.
  client.reconnect();
  $("project-new-name").value = "";
  await showProjects(made.project.id);
}

async function renameProject() {
  const path = `/auth/projects/${encodeURIComponent(projectId)}`;
  if (await answered(authPost(path, { name: $("project-rename").value.trim() }), "projects-error")) await showProjects();
}

async function deleteProject() {
  const button = $("project-delete");
  if (button.textContent === "Delete…") {
    // Asked once more, in place: it closes the project for everyone in it.
    button.textContent = `Delete it for everyone (restorable for 30 days)`;
    return;
  }
  const gone = projectId;
  if (await answered(authRequest("DELETE", `/auth/projects/${encodeURIComponent(gone)}`), "projects-error")) {
    client.unsubscribe(gone);
    projectId = null;
    await showProjects(null);
  }
}

/** A viewer's calendar: nothing to select, drag or save (the server refuses it too). */
function writable() { return !refused.has(projectId) && client.writable(projectId) !== false; }

function showAccess() {
  const can = writable();
  calendar.setOption("selectable", can);
  calendar.setOption("editable", can);
  $("new-event").hidden = !can;
  $("read-only").hidden = can;
  $("read-only").textContent = refused.has(projectId) ? "No access to this project" : "View only";
}

// -- calendar apps: app passwords and feeds, made by the user -------------------------------

async function openConnect() {
  $("connect-server").value = `${location.origin}/dav/`;
  for (const id of ["connect-password", "connect-feed", "connect-name"]) $(id).value = "";
  $("connect-error").textContent = "";
  $("connect-qr-box").hidden = true;
  $("connect").showModal();
  await Promise.all([listAppPasswords(), listFeeds(), listSessions()]);
}

/** The browsers and devices this user is signed in on; any but this one can be signed out. */
async function listSessions() {
  const r = await fetch("/auth/sessions", { credentials: "same-origin" }).catch(() => null);
  if (!r || !r.ok) return;
  $("connect-sessions").replaceChildren(...(await r.json()).sessions.map((s) => {
    const text = `${s.device.slice(0, 80)} (last used ${new Date(s.lastUsed * 1000).toLocaleString()})`;
    if (s.current) {
      const item = document.createElement("li");
      item.textContent = `${text}: this browser`;
      return item;
    }
    return revocable(text, `/auth/sessions/${encodeURIComponent(s.id)}`, listSessions);
  }));
}

/** One item of a list with a Revoke button that DELETEs `path`, then lists again. */
function revocable(text, path, relist) {
  const item = document.createElement("li");
  const revoke = document.createElement("button");
  revoke.type = "button";
  revoke.textContent = "Revoke";
  revoke.addEventListener("click", async () => {
    await answered(authRequest("DELETE", path), "connect-error");
    await relist();
  });
  item.append(text, " ", revoke);
  return item;
}

async function listFeeds() {
  const r = await fetch("/auth/feeds", { credentials: "same-origin" }).catch(() => null);
  if (!r || !r.ok) return;
  $("connect-feeds").replaceChildren(...(await r.json()).feeds.map((f) => revocable(
    `Feed of ${projectName(f.project)} (made ${new Date(f.created * 1000).toLocaleDateString()})`,
    `/auth/feeds/${encodeURIComponent(f.id)}`, listFeeds)));
}

/** The CalDAV address with the user name and app password in it, as a QR code. */
function showQr(user, password) {
  const address = new URL("/dav/", location.origin);
  address.username = user;
  address.password = password;
  const code = qrcode(0, "M");
  code.addData(address.href);
  code.make();
  $("connect-qr").innerHTML = code.createSvgTag({ cellSize: 4, margin: 4 });
  $("connect-qr-box").hidden = false;
}

async function listAppPasswords() {
  const r = await fetch("/auth/app-passwords", { credentials: "same-origin" }).catch(() => null);
  if (!r || !r.ok) return;
  $("connect-list").replaceChildren(...(await r.json()).appPasswords.map((p) => revocable(
    `${p.name} (made ${new Date(p.created * 1000).toLocaleDateString()})`,
    `/auth/app-passwords/${encodeURIComponent(p.id)}`, listAppPasswords)));
}

async function makeAppPassword() {
  const made = await answered(authPost("/auth/app-passwords", { name: $("connect-name").value.trim() }), "connect-error");
  if (!made) return;
  $("connect-password").value = made.password;
  $("connect-password").select();
  showQr(made.user, made.password);
  await listAppPasswords();
}

async function makeFeed() {
  const made = await answered(authPost("/auth/feeds", { project: projectId }), "connect-error");
  if (!made) return;
  $("connect-feed").value = location.origin + made.url;
  await listFeeds();
}

// -- members: an owner changes a role or takes the project away (at once, everywhere) -------

async function showMembers(request) {
  const answer = await answered(request, "members-error");
  if (!answer) return;
  const rows = answer.members.map((m) => {
    const row = document.createElement("tr");
    row.dataset.user = m.id;
    const role = document.createElement("select");
    role.setAttribute("aria-label", `Role of ${m.name}`);
    for (const r of ["viewer", "editor", "owner"]) role.append(new Option(r, r, false, r === m.role));
    role.addEventListener("change", () => setMember(m.id, role.value));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.textContent = "Remove";
    remove.disabled = m.everyProject;  // has every project: the command line changes that
    remove.addEventListener("click", () => setMember(m.id, null));
    const who = document.createElement("td");
    who.textContent = `${m.name} (${m.id})`;
    const cells = [who, document.createElement("td"), document.createElement("td")];
    cells[1].append(role);
    cells[2].append(remove);
    row.append(...cells);
    return row;
  });
  $("members-list").replaceChildren(...rows);
}

async function setMember(user, role) {
  await showMembers(authPost(`/auth/members/${encodeURIComponent(projectId)}`, { user, role }));
}

async function makeInvite() {
  const answer = await answered(authPost("/auth/invites", { project: projectId, role: $("invite-role").value }),
                                "invite-error");
  if (!answer) return;
  $("invite-link").value = location.origin + answer.link;
  $("invite-link").select();
}

// -- the grid ------------------------------------------------------------------------------

const TIME_FORMAT = { hour: "numeric", minute: "2-digit" };
// FullCalendar's own blue carries white text at 3.6:1; this one at 5.9:1 (WCAG AA).
const DEFAULT_EVENT_COLOR = "#2b63b8";

/** The locale's first day of the week (Intl's weekInfo: 1 Monday .. 7 Sunday; FullCalendar: 0 Sunday). */
function firstDayOfWeek() {
  try {
    const locale = new Intl.Locale(navigator.language);
    const info = locale.getWeekInfo?.() || locale.weekInfo;
    if (info?.firstDay) return info.firstDay % 7;
  } catch { /* an unknown language tag: FullCalendar's default */ }
  return undefined;
}

/** Black or white text, whichever reads better on a background #RRGGBB (WCAG's contrast). */
function readableOn(hex) {
  const m = /^#?([0-9a-f]{6})/i.exec(hex || "");
  if (!m) return undefined;
  const [r, g, b] = [0, 2, 4].map((i) => parseInt(m[1].slice(i, i + 2), 16) / 255)
    .map((c) => (c <= 0.03928 ? c / 12.92 : ((c + 0.055) / 1.055) ** 2.4));
  const light = 0.2126 * r + 0.7152 * g + 0.0722 * b;
  return 1.05 / (light + 0.05) >= (light + 0.05) / 0.05 ? "#fff" : "#111";
}

/** The page scrolled to 8:00 the first time a time grid shows (the grid is as tall as
 *  its hours, so the page scrolls rather than a box inside it). */
let scrolledToMorning = false;
function scrollToMorning() {
  const slot = document.querySelector('#calendar .fc-timegrid-slot[data-time="08:00:00"]');
  if (scrolledToMorning || !slot) return;
  scrolledToMorning = true;
  // After the layout FullCalendar is still making in this callback.
  requestAnimationFrame(() => window.scrollTo({ top: slot.getBoundingClientRect().top + window.scrollY - 120 }));
}

/** What FullCalendar's markup lacks for screen readers: its arrow icons are
 *  decoration (their buttons are labelled). */
function mendAccessibility() {
  for (const icon of document.querySelectorAll("#calendar .fc-icon")) icon.setAttribute("aria-hidden", "true");
}

// One event, or a recurring event's series (FullCalendar's rrule plugin expands it)
// plus each overridden occurrence on its own.
function toCalendar(e) {
  const base = {
    id: e.id, title: e.title, start: e.startDate, end: e.endDate, allDay: !!e.allDay,
    backgroundColor: e.color || projectColor() || DEFAULT_EVENT_COLOR,
    borderColor: e.color || projectColor() || DEFAULT_EVENT_COLOR,
    textColor: readableOn(e.color || projectColor() || DEFAULT_EVENT_COLOR),
    classNames: e.pending ? ["pending"] : [],
  };
  if (itemKind(e) !== "event") return gridEntry(e, base);
  const rec = e.recurrence;
  if (!rec || !window.FullCalendar?.RRule) return [base];
  const stamp = (s) => (e.allDay ? s.slice(0, 10).replaceAll("-", "")
    : new Date(s).toISOString().replace(/[-:]/g, "").replace(/\.\d{3}/, ""));
  const overrides = rec.overrides || [];
  const lines = [`DTSTART:${stamp(e.startDate)}`];
  if (rec.rrule) lines.push(`RRULE:${rec.rrule}`);
  if (rec.rdates?.length) lines.push(`RDATE:${rec.rdates.map(stamp).join(",")}`);
  const skipped = [...(rec.exdates || []), ...overrides.map((o) => o.recurrenceId)];
  if (skipped.length) lines.push(`EXDATE:${skipped.map(stamp).join(",")}`);
  // Dragging one occurrence would move the whole series: a series is edited in the
  // editor (or in a calendar app), not by drag and drop.
  const series = { ...base, start: undefined, end: undefined, rrule: lines.join("\n"),
                   duration: Math.max(0, new Date(e.endDate) - new Date(e.startDate)), editable: false,
                   classNames: [...base.classNames, "recurring"] };
  return [series, ...overrides.map((o) => ({
    ...base, title: o.title || e.title, start: o.startDate, end: o.endDate, allDay: o.allDay ?? !!e.allDay,
    editable: false, classNames: [...base.classNames, "recurring"], extendedProps: { recurrenceId: o.recurrenceId },
  }))];
}

/** The project's tasks beside the calendar (hidden while it has none). */
function showTasks(events) {
  const rows = taskRows(events, (task) => openEditor(client.get(task.id, task.projectId)));
  $("tasks-list").replaceChildren(...rows);
  $("tasks").hidden = rows.length === 0;
}

function moved(info) {
  const changes = { startDate: info.event.start.toISOString(), allDay: info.event.allDay,
                    endDate: (info.event.end || new Date(+info.event.start + 3600000)).toISOString() };
  client.update(info.event.id, changes, projectId).catch(() => calendar.refetchEvents());
}

// -- presence and cursors ---------------------------------------------------------------------

function initials(name) { return name.split(/\s+/).map((w) => w[0] || "").join("").slice(0, 2).toUpperCase(); }

function showPresence() {
  const users = client.presence(projectId);
  $("presence").replaceChildren(...users.map((u) => {
    const li = document.createElement("li");
    li.textContent = initials(u.name || u.id);
    li.title = u.name || u.id;
    li.dataset.user = u.id;
    li.style.background = u.color;
    return li;
  }));
  for (const el of [...$("cursors").children]) if (!users.some((u) => u.id === el.dataset.user)) el.remove();
}

function showCursor(c) {
  if (client.user && c.userId === client.user.id) return;
  const user = client.presence(projectId).find((u) => u.id === c.userId);
  let el = [...$("cursors").children].find((x) => x.dataset.user === c.userId);
  if (!el) {
    el = document.createElement("div");
    el.className = "cursor";
    el.dataset.user = c.userId;
    $("cursors").append(el);
  }
  el.textContent = user ? user.name : c.userId;
  el.style.background = user ? user.color : "#555";
  el.style.left = `${c.x * 100}%`;
  el.style.top = `${c.y * 100}%`;
}

// -- status ---------------------------------------------------------------------------------------

function showConnection() {
  const el = $("connection");
  clearInterval(countdown);
  el.dataset.state = client.state;
  const text = () => {
    if (client.state === "reconnecting" && client.retryAt) {
      return `reconnecting in ${Math.max(0, Math.ceil((client.retryAt - Date.now()) / 1000))} s`;
    }
    return { "needs-auth": "sign in again", closed: "signed out" }[client.state] || client.state;
  };
  el.textContent = text();
  if (client.state === "reconnecting") countdown = setInterval(() => { el.textContent = text(); }, 1000);
  if (client.state === "needs-auth") {
    showSignin("You were signed out (or your sign-in link expired): sign in again.");
  }
}

function synced() {
  lastSynced = new Date();
  localStorage.setItem("barosync.lastSynced", String(+lastSynced));
}

function showSync(s) {
  const el = $("sync");
  if (s.error && s.error.code === "storage_full") storageFull = true;
  if (s.pending === 0) storageFull = false;
  if (s.pending === 0 && client?.state === "connected") synced();
  if (storageFull) el.dataset.full = "";
  else delete el.dataset.full;
  const today = lastSynced && lastSynced.toDateString() === new Date().toDateString();
  const when = lastSynced ? ` · last synced ${today ? lastSynced.toLocaleTimeString() : lastSynced.toLocaleString()}` : "";
  el.textContent = storageFull ? `${s.pending} waiting · ${FULL_MESSAGE}`
    : s.pending ? `${s.pending} change${s.pending === 1 ? "" : "s"} waiting${when}` : `all changes saved${when}`;
}

main();
