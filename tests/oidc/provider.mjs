// A real OpenID provider for tests/test_oidc.py: panva's oidc-provider (the certified
// Node.js implementation), installed by `make test` into .venv/node. The test copies
// this file there, so that the import below resolves.
//
//   node provider.mjs CLIENT_SECRET USERS_JSON
//
// prints its issuer once it listens on a free 127.0.0.1 port, then reads barosync's
// redirect URI from stdin (barosync's port is known only once it runs, and it needs
// the issuer first), registers the client with it, and prints "ready". Its
// development login page takes any login name (and any password); USERS_JSON gives
// claims by login name: {"carol": {"name": "Carol", "groups": ["barosync:team:viewer"]}}.
import http from "node:http";
import readline from "node:readline";
import Provider from "oidc-provider";

const [secret, usersJson] = process.argv.slice(2);
const users = JSON.parse(usersJson);
const server = http.createServer((req, res) => { res.statusCode = 503; res.end("not ready"); });

server.listen(0, "127.0.0.1", () => {
  const issuer = `http://127.0.0.1:${server.address().port}`;
  console.log(issuer);
  readline.createInterface({ input: process.stdin }).once("line", (redirectUri) => {
    const provider = new Provider(issuer, {
      clients: [{
        client_id: "barosync", client_secret: secret, redirect_uris: [redirectUri.trim()],
        grant_types: ["authorization_code"], response_types: ["code"], token_endpoint_auth_method: "client_secret_basic",
      }],
      claims: { openid: ["sub"], profile: ["name", "preferred_username"], email: ["email"], groups: ["groups"] },
      scopes: ["openid", "profile", "email", "groups"],
      pkce: { required: () => true },
      features: { devInteractions: { enabled: true } },
      cookies: { keys: ["barosync-test-cookies"] },
      findAccount: async (ctx, id) => ({
        accountId: id,
        claims: async () => ({ sub: `sub-${id}`, preferred_username: id, ...(users[id] || {}) }),
      }),
    });
    server.removeAllListeners("request");
    server.on("request", provider.callback());
    console.log("ready");
  });
});
