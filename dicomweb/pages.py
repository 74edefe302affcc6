"""The built-in pages: a study list with thumbnails at /, and its login.

The page is a static shell: it holds no patient data and needs no credential. Its script
asks /api/whoami, shows a login form when the archive wants a credential (an API token pasted,
or with `auth.oidc.client_id` the identity provider's login: authorization code + PKCE, the
page a public client), keeps it in sessionStorage, sends it as `Authorization: Bearer`, then lists
the studies through our own QIDO-RS and loads each thumbnail with the same header. So the
page sees exactly what the caller's role and scope allow, and nothing else.
"""
from __future__ import annotations

from urllib.parse import urlsplit

from aiohttp import web

PAGE = """<!doctype html><html lang=en><head><meta charset=utf-8><title>pathpacs</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<style>body{font:14px system-ui,sans-serif;margin:2em}table{border-collapse:collapse}
td,th{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}
img{max-width:96px;max-height:96px}#who{float:right;color:#555}#login textarea{width:36em;height:4em}
.err{color:#a00}[hidden]{display:none}</style></head><body>
<div id=who hidden><span id=whoname></span> · <a href=# id=logout>log out</a></div>
<h1>pathpacs</h1>
<form id=login hidden><p>This archive needs a credential: paste an API token
(<code>pathpacs token create --role viewer</code>) or an OIDC access token.</p>
<textarea id=token name=token autocomplete=off spellcheck=false></textarea><br>
<button type=submit>Log in</button> <button type=button id=oidc hidden>Log in with the hospital account</button>
<span id=loginerr class=err></span></form>
<p id=status></p>
<table id=studies hidden><thead><tr><th></th><th>Patient</th><th>Date</th><th>Accession</th>
<th>Description</th><th>Modalities</th><th>Series / instances</th></tr></thead><tbody></tbody></table>
<script>
"use strict";
const KEY = "pathpacs.token";
const $ = (id) => document.getElementById(id);
const auth = () => { const t = sessionStorage.getItem(KEY); return t ? {Authorization: "Bearer " + t} : {}; };
const val = (doc, tag) => ((doc[tag] || {}).Value || []);
const text = (doc, tag) => val(doc, tag).map(String).join("\\\\");
function person(doc) {
  return val(doc, "00100010").map(v => {
    const raw = (v && v.Alphabetic) || "";
    const [family, ...rest] = raw.split("^");
    const given = rest.filter(Boolean).join(" ");
    return family && given ? family + ", " + given : family || given;
  }).join("; ");
}
function cell(row, value) { const td = row.insertCell(); td.textContent = value; return td; }
async function thumbnail(img, url) {
  const r = await fetch(url, {headers: {...auth(), Accept: "image/jpeg"}});
  if (r.ok) img.src = URL.createObjectURL(await r.blob());
}
async function list() {
  const r = await fetch("dicomweb/studies?includefield=00081030&includefield=00201206&limit=500",
                        {headers: {...auth(), Accept: "application/dicom+json"}});
  if (r.status === 401) return showLogin("");
  if (!r.ok) { $("status").textContent = "The archive answered " + r.status + ": " + (await r.text()); return; }
  const studies = r.status === 204 ? [] : await r.json();
  studies.sort((a, b) => text(b, "00080020").localeCompare(text(a, "00080020")));
  $("status").textContent = studies.length + (studies.length === 1 ? " study." : " studies.") +
    " DICOMweb root: /dicomweb.";
  const body = $("studies").tBodies[0];
  body.replaceChildren();
  for (const s of studies) {
    const uid = text(s, "0020000D");
    const row = body.insertRow();
    const img = document.createElement("img");
    img.alt = "";
    row.insertCell().appendChild(img);
    const who = cell(row, person(s));
    who.appendChild(document.createElement("br"));
    const id = document.createElement("small"); id.textContent = text(s, "00100020"); who.appendChild(id);
    cell(row, text(s, "00080020")); cell(row, text(s, "00080050")); cell(row, text(s, "00081030"));
    cell(row, val(s, "00080061").join(","));
    cell(row, text(s, "00201206") + " / " + text(s, "00201208"));
    thumbnail(img, "dicomweb/studies/" + encodeURIComponent(uid) + "/thumbnail?viewport=96,96");
  }
  $("studies").hidden = false;
}
function showLogin(message) {
  $("login").hidden = false; $("studies").hidden = true; $("who").hidden = true;
  $("studies").tBodies[0].replaceChildren();  // nothing of the last user stays in the page
  $("loginerr").textContent = message; $("status").textContent = "";
}
const b64url = (bytes) => btoa(String.fromCharCode(...bytes)).replace(/\\+/g, "-").replace(/\\//g, "_").replace(/=+$/, "");
const here = () => location.origin + location.pathname;
let loginConfig = null;
async function oidcLogin() {
  const cfg = loginConfig.oidc;
  const verifier = b64url(crypto.getRandomValues(new Uint8Array(32)));
  const state = b64url(crypto.getRandomValues(new Uint8Array(16)));
  sessionStorage.setItem("pathpacs.pkce", JSON.stringify({verifier, state}));
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  const u = new URL(cfg.authorization_endpoint);
  u.search = new URLSearchParams({response_type: "code", client_id: cfg.client_id, redirect_uri: here(),
    scope: cfg.scope, state, code_challenge: b64url(new Uint8Array(digest)), code_challenge_method: "S256"});
  location.assign(u.toString());
}
async function oidcReturn() {  // back from the identity provider with ?code=...&state=...
  const p = new URLSearchParams(location.search);
  if (!p.has("code") && !p.has("error")) return null;
  history.replaceState(null, "", location.pathname);
  const saved = JSON.parse(sessionStorage.getItem("pathpacs.pkce") || "null");
  sessionStorage.removeItem("pathpacs.pkce");
  if (p.has("error")) return "The identity provider refused the login: " + p.get("error");
  if (!saved || saved.state !== p.get("state")) return "The login answer did not match this page; try again.";
  const cfg = loginConfig.oidc;
  const r = await fetch(cfg.token_endpoint, {method: "POST",
    headers: {"Content-Type": "application/x-www-form-urlencoded"},
    body: new URLSearchParams({grant_type: "authorization_code", code: p.get("code"), redirect_uri: here(),
                               client_id: cfg.client_id, code_verifier: saved.verifier})});
  if (!r.ok) return "The identity provider refused the login (" + r.status + ").";
  const tok = await r.json();
  sessionStorage.setItem(KEY, tok.access_token);
  return "";
}
async function start() {
  if (loginConfig === null) {
    const c = await fetch("api/login-config");
    loginConfig = c.ok ? await c.json() : {mode: "token", oidc: null};
    $("oidc").hidden = !loginConfig.oidc;
    const failed = loginConfig.oidc ? await oidcReturn() : null;
    if (failed) return showLogin(failed);
  }
  const r = await fetch("api/whoami", {headers: auth()});
  if (r.status === 401) {
    const had = sessionStorage.getItem(KEY);
    sessionStorage.removeItem(KEY);
    return showLogin(had ? "That credential was not accepted: " + (await r.text()) : "");
  }
  if (!r.ok) { $("status").textContent = "The archive answered " + r.status; return; }
  const me = await r.json();
  $("login").hidden = true;
  if (me.via !== "anonymous") {
    $("whoname").textContent = me.name + " (" + me.roles.join(", ") + ")";
    $("who").hidden = false;
  }
  if (!me.rights.includes("read")) {
    $("status").textContent = "Your role (" + me.roles.join(", ") + ") may not view images.";
    return;
  }
  await list();
}
$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  const t = $("token").value.trim();
  if (t) { sessionStorage.setItem(KEY, t); $("token").value = ""; start(); }
});
$("oidc").addEventListener("click", () => oidcLogin());
$("logout").addEventListener("click", (e) => { e.preventDefault(); sessionStorage.removeItem(KEY); showLogin(""); });
start();
</script></body></html>
"""


def add_routes(app: web.Application, arc) -> None:
    authn = arc.sync.authn
    connect: list[str] = []  # the identity provider's token endpoint, which the login script calls

    async def index(request: web.Request) -> web.Response:
        if authn.mode == "oidc" and authn.oidc is not None and authn.oidc.client_id and not connect:
            try:
                cfg = await arc.run(authn.oidc.login_config)
                u = urlsplit(cfg["token_endpoint"])
                connect.append(f"{u.scheme}://{u.netloc}")
            except Exception:  # the page still offers token login; /api/login-config says why
                pass
        csp = (f"default-src 'self'; connect-src 'self' {' '.join(connect)}".rstrip() +
               "; img-src 'self' blob:; script-src 'unsafe-inline'; style-src 'unsafe-inline'")
        return web.Response(text=PAGE, content_type="text/html",
                            headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                     "Content-Security-Policy": csp})

    app.router.add_get("/", index)
