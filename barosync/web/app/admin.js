// The sync inspector: polls /api/admin/summary once a second and draws it.

const $ = (id) => document.getElementById(id);
const m = location.hash.match(/(?:^#|&)token=([^&]+)/);
if (m) {
  localStorage.setItem("barosync.token", decodeURIComponent(m[1]));
  history.replaceState(null, "", location.pathname);
}
const token = localStorage.getItem("barosync.token");

function cell(text) { const td = document.createElement("td"); td.textContent = text ?? "—"; return td; }
function row(cells) { const tr = document.createElement("tr"); tr.append(...cells); return tr; }
const when = (ms) => (ms ? new Date(ms).toLocaleString() : "—");

async function call(path, method = "GET") {
  const r = await fetch(path, { method, headers: { Authorization: `Bearer ${token}` } });
  if (r.status === 401 || r.status === 403) {
    $("signin").hidden = false;
    $("main").hidden = true;
    $("signin-message").textContent = (await r.json()).message;
    throw new Error("not an admin");
  }
  return r.json();
}

function draw(s) {
  $("server-status").textContent = `${s.server.health} · up ${Math.round(s.server.uptime)} s · ${s.connections.length} connections`;
  $("connections").replaceChildren(...s.connections.map((c) => {
    const close = document.createElement("button");
    close.textContent = "Close";
    close.title = "Close this connection: the client reconnects and resumes";
    close.dataset.session = c.id;
    close.addEventListener("click", () => call(`/api/admin/connections/${encodeURIComponent(c.id)}/close`, "POST").then(refresh));
    const projects = c.projects.map((p) => `${p.id}: ${p.acked} / ${p.delivered} / ${p.head}${p.behind ? ` (${p.behind} behind)` : ""}`).join("; ");
    const tr = row([cell(`${c.name} (${c.user})`), cell(c.origin), cell(when(c.connectedAt)), cell(c.codec), cell(projects),
      cell(c.outboxBytes), cell(c.unacked), cell(when(c.tokenExpiresAt)), cell(`${c.lastHeard} s ago`), cell("")]);
    tr.lastChild.append(close);
    tr.dataset.session = c.id;
    return tr;
  }));
  $("projects").replaceChildren(...s.projects.map((p) => row([cell(p.id), cell(p.head), cell(p.historyFrom), cell(p.subscribers),
    cell(p.present.join(", ")), cell(p.changesPerSecond)])));
  $("server").textContent = JSON.stringify(s.server, null, 2);
}

async function refresh() { draw(await call("/api/admin/summary")); }

async function main() {
  if (!token) {
    $("signin").hidden = false;
    $("main").hidden = true;
    return;
  }
  const me = await call("/api/me");
  $("who").textContent = `${me.user.name} (${me.user.id})`;
  await refresh();
  setInterval(() => refresh().catch(() => {}), 1000);
}

main().catch(() => {});
