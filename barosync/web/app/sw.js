// The web calendar's service worker (served at /sw.js so that it controls "/"): keeps
// the app shell so a reload without network opens the calendar with its local copy and
// queue (which live in IndexedDB, not here). Network first, so a new version is used as
// soon as the server is reachable; the cache answers only when it is not.

const CACHE = "barosync-app-v9";
const SHELL = ["/", "/app/app.js", "/app/items.js", "/app/keys.js", "/app/series.js", "/app/conflicts.js", "/app/editor.js", "/app/app.css", "/app/vendor/fullcalendar/index.global.min.js",
               "/app/vendor/rrule/rrule.min.js", "/app/vendor/fullcalendar-rrule/index.global.min.js", "/client/barosync.js",
               "/app/vendor/qrcode-generator/qrcode.mjs"];

self.addEventListener("install", (event) => {
  event.waitUntil(caches.open(CACHE).then((cache) => cache.addAll(SHELL)).then(() => self.skipWaiting()));
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches.keys()
      .then((keys) => Promise.all(keys.filter((k) => k !== CACHE).map((k) => caches.delete(k))))
      .then(() => self.clients.claim()),
  );
});

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || url.origin !== location.origin) return;
  const shell = event.request.mode === "navigate" ? "/" : url.pathname;
  if (!SHELL.includes(shell)) return; // the API and the WebSocket go to the network as they are
  event.respondWith(
    fetch(event.request)
      .then((response) => {
        if (response.ok) {
          const copy = response.clone();
          caches.open(CACHE).then((cache) => cache.put(shell, copy));
        }
        return response;
      })
      .catch(() => caches.match(shell).then((hit) => hit || Response.error())),
  );
});
