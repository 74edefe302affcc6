// The study browser at / (dicomweb/pages.py): login, QIDO search (browser/search: sorted by date) with limit/offset paging,
// per-study slides from browser/studies, English / Simplified Chinese. No framework, no build.
"use strict";
const KEY = "pathpacs.token", LANG_KEY = "pathpacs.lang";
const $ = (id) => document.getElementById(id);
const TEXT = JSON.parse($("text").textContent);
let lang = localStorage.getItem(LANG_KEY) || document.documentElement.lang;
if (!TEXT[lang]) lang = "en";
const t = (k, vars) => {
  let s = (TEXT[lang] || TEXT.en)[k] || TEXT.en[k] || k;
  for (const [n, v] of Object.entries(vars || {})) s = s.replace("{" + n + "}", v);
  return s;
};
function applyLanguage() {
  document.documentElement.lang = lang;
  document.title = t("title");
  for (const el of document.querySelectorAll("[data-t]")) el.textContent = t(el.dataset.t);
  for (const el of document.querySelectorAll("[data-ph]")) el.placeholder = t(el.dataset.ph);
  $("lang").value = lang;
}
const auth = () => { const tok = sessionStorage.getItem(KEY); return tok ? {Authorization: "Bearer " + tok} : {}; };
const val = (doc, tag) => ((doc[tag] || {}).Value || []);
const text = (doc, tag) => val(doc, tag).map(String).join("\\");
function person(doc) {
  return val(doc, "00100010").map(v => {
    const raw = (v && (v.Alphabetic || v.Ideographic)) || "";
    const [family, ...rest] = raw.split("^");
    const given = rest.filter(Boolean).join(" ");
    let name = family && given ? family + ", " + given : family || given;
    if (v && v.Alphabetic && v.Ideographic) name += " (" + v.Ideographic.replace(/\^/g, "") + ")";
    return name;
  }).join("; ");
}
function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(n < 10 ? 1 : 0) : String(n)) + " " + units[i];
}
function cell(row, value, cls) { const td = row.insertCell(); td.textContent = value; if (cls) td.className = cls; return td; }
async function thumbnail(img, url) {
  const r = await fetch(url, {headers: {...auth(), Accept: "image/jpeg"}});
  if (r.ok) img.src = URL.createObjectURL(await r.blob());
}

// -- search and paging --------------------------------------------------------------------
const state = {offset: 0, size: 25, params: null, last: null};
function dicomDate(v) { return v ? v.replace(/-/g, "") : ""; }
function queryParams() {
  const p = new URLSearchParams();
  let name = $("q-name").value.trim();
  if (name && !/[*?]/.test(name)) name += "*";  // a typed name is a prefix: "wang" finds Wang^Xiaodong
  if (name) p.set("PatientName", name);
  if ($("q-pid").value.trim()) p.set("PatientID", $("q-pid").value.trim());
  if ($("q-acc").value.trim()) p.set("AccessionNumber", $("q-acc").value.trim());
  const from = dicomDate($("q-from").value), to = dicomDate($("q-to").value);
  if (from || to) p.set("StudyDate", from === to ? from : from + "-" + to);
  if ($("q-mod").value) p.set("ModalitiesInStudy", $("q-mod").value);
  return p;
}
async function list() {
  const p = new URLSearchParams(state.params);
  p.append("includefield", "00081030");
  p.append("includefield", "00201206");
  p.set("limit", String(state.size));
  p.set("offset", String(state.offset));
  // QIDO (PS3.18) has no sort parameter: browser/search is our QIDO study search sorted by study
  // date and time over the whole result, limit and offset applied after sorting (dicomweb/pages.py).
  p.set("sort", $("q-sort").value === "asc" ? "date" : "-date");
  const r = await fetch("browser/search?" + p.toString(), {headers: {...auth(), Accept: "application/dicom+json"}});
  if (r.status === 401) return showLogin("");
  if (!r.ok) { $("status").textContent = t("answered") + " " + r.status + ": " + (await r.text()); return; }
  const studies = r.status === 204 ? [] : await r.json();
  const more = (r.headers.get("Warning") || "").includes("additional results");
  state.last = {studies, more};
  render(studies, more);
  if (studies.length) await summaries(studies);
  document.body.dataset.answers = String(++answers);  // a page complete: tests wait for this
}
let answers = 0;
function render(studies, more) {
  const first = state.offset + 1, n = studies.length;
  $("status").textContent = n === 0 ? (state.offset ? "" : t("none")) :
    (n === 1 && state.offset === 0 && !more ? t("one_study") : t("n_studies", {n: state.offset ? first + "–" + (state.offset + n) : n})) +
    (more ? " " + t("more") : "");
  const body = $("studies").tBodies[0];
  body.replaceChildren();
  for (const s of studies) {
    const uid = text(s, "0020000D");
    const row = body.insertRow();
    row.dataset.study = uid;
    const thumbs = row.insertCell();
    thumbs.className = "thumbs";
    const who = cell(row, person(s));
    who.className = "patient";
    who.appendChild(document.createElement("br"));
    const id = document.createElement("small"); id.textContent = text(s, "00100020"); who.appendChild(id);
    cell(row, text(s, "00080020"), "date"); cell(row, text(s, "00080050"), "accession");
    cell(row, text(s, "00081030")); cell(row, val(s, "00080061").join(","), "modalities");
    cell(row, "", "count num"); cell(row, "", "stain"); cell(row, "", "size num");
    const avail = text(s, "00080056");
    cell(row, t(avail) || avail, "storage " + avail);
    const open = row.insertCell().appendChild(document.createElement("a"));
    open.href = "viewer?study=" + encodeURIComponent(uid);
    open.textContent = t("open"); open.dataset.t = "open";
  }
  $("studies").hidden = n === 0;
  $("pager").hidden = n === 0 && state.offset === 0;
  $("prev").disabled = state.offset === 0;
  $("next").disabled = !more;
  $("pageno").textContent = t("page", {n: Math.floor(state.offset / state.size) + 1});
}
async function summaries(studies) {
  const p = new URLSearchParams();
  for (const s of studies) p.append("study", text(s, "0020000D"));
  const r = await fetch("browser/studies?" + p.toString(), {headers: auth()});
  if (!r.ok) return;
  const body = $("studies").tBodies[0];
  for (const sum of await r.json()) {
    const row = [...body.rows].find(x => x.dataset.study === sum.study);
    if (!row) continue;
    const thumbs = row.querySelector(".thumbs");
    for (const slide of sum.slides) {
      const a = document.createElement("a");
      a.href = "viewer?study=" + encodeURIComponent(sum.study) + "&series=" + encodeURIComponent(slide.series);
      a.title = (slide.description || slide.series) + (slide.stain.length ? " · " + slide.stain.join(", ") : "");
      const img = document.createElement("img");
      img.alt = slide.stain.join(", ");
      a.appendChild(img); thumbs.appendChild(a);
      thumbnail(img, "dicomweb/studies/" + encodeURIComponent(sum.study) + "/series/" +
                encodeURIComponent(slide.series) + "/thumbnail?viewport=96,96");
    }
    if (!sum.slides.length) {  // not a slide study: its study-level thumbnail
      const img = document.createElement("img"); img.alt = ""; thumbs.appendChild(img);
      thumbnail(img, "dicomweb/studies/" + encodeURIComponent(sum.study) + "/thumbnail?viewport=96,96");
    }
    row.querySelector(".count").textContent = String(sum.slides.length);
    row.querySelector(".stain").textContent = [...new Set(sum.slides.flatMap(x => x.stain))].join(", ");
    row.querySelector(".size").textContent = bytes(sum.bytes);
    const st = row.querySelector(".storage");
    st.textContent = Object.keys(sum.tiers).sort().join(", ") + " · " + t(sum.availability);
    st.className = "storage " + sum.availability;
    st.dataset.availability = sum.availability;
  }
}
function search(e) {
  if (e) e.preventDefault();
  state.params = queryParams().toString();
  state.size = parseInt($("q-size").value, 10) || 25;
  state.offset = 0;
  return list();
}

// -- login ----------------------------------------------------------------------------------
function showLogin(message) {
  $("login").hidden = false; $("studies").hidden = true; $("who").hidden = true;
  $("search").hidden = true; $("pager").hidden = true;
  $("studies").tBodies[0].replaceChildren();  // nothing of the last user stays in the page
  $("loginerr").textContent = message; $("status").textContent = "";
}
const b64url = (bytes) => btoa(String.fromCharCode(...bytes)).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
const here = () => location.origin + location.pathname;
let loginConfig = null;
async function oidcLogin() {
  const cfg = loginConfig.oidc;
  const verifier = b64url(crypto.getRandomValues(new Uint8Array(32)));
  const st = b64url(crypto.getRandomValues(new Uint8Array(16)));
  sessionStorage.setItem("pathpacs.pkce", JSON.stringify({verifier, state: st}));
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier));
  const u = new URL(cfg.authorization_endpoint);
  u.search = new URLSearchParams({response_type: "code", client_id: cfg.client_id, redirect_uri: here(),
    scope: cfg.scope, state: st, code_challenge: b64url(new Uint8Array(digest)), code_challenge_method: "S256"});
  location.assign(u.toString());
}
async function oidcReturn() {  // back from the identity provider with ?code=...&state=...
  const p = new URLSearchParams(location.search);
  if (!p.has("code") && !p.has("error")) return null;
  history.replaceState(null, "", location.pathname);
  const saved = JSON.parse(sessionStorage.getItem("pathpacs.pkce") || "null");
  sessionStorage.removeItem("pathpacs.pkce");
  if (p.has("error")) return t("idp_refused") + ": " + p.get("error");
  if (!saved || saved.state !== p.get("state")) return t("state_mismatch");
  const cfg = loginConfig.oidc;
  const r = await fetch(cfg.token_endpoint, {method: "POST",
    headers: {"Content-Type": "application/x-www-form-urlencoded"},
    body: new URLSearchParams({grant_type: "authorization_code", code: p.get("code"), redirect_uri: here(),
                               client_id: cfg.client_id, code_verifier: saved.verifier})});
  if (!r.ok) return t("idp_refused") + " (" + r.status + ").";
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
    return showLogin(had ? t("not_accepted") + " " + (await r.text()) : "");
  }
  if (!r.ok) { $("status").textContent = t("answered") + " " + r.status; return; }
  const me = await r.json();
  $("login").hidden = true;
  if (me.via !== "anonymous") {
    $("whoname").textContent = me.name + " (" + me.roles.join(", ") + ")";
    $("who").hidden = false;
  }
  if (!me.rights.includes("read")) {
    $("status").textContent = t("may_not_view", {roles: me.roles.join(", ")});
    return;
  }
  $("search").hidden = false;
  await search();
}
$("login").addEventListener("submit", (e) => {
  e.preventDefault();
  const tok = $("token").value.trim();
  if (tok) { sessionStorage.setItem(KEY, tok); $("token").value = ""; start(); }
});
$("oidc").addEventListener("click", () => oidcLogin());
$("logout").addEventListener("click", (e) => { e.preventDefault(); sessionStorage.removeItem(KEY); showLogin(""); });
$("search").addEventListener("submit", search);
$("search").addEventListener("reset", () => setTimeout(search, 0));
$("q-sort").addEventListener("change", () => {
  $("datehead").setAttribute("aria-sort", $("q-sort").value === "asc" ? "ascending" : "descending");
  if (state.last) { state.offset = 0; list(); }
});
$("datehead").addEventListener("click", () => {  // the date column sorts the whole result, as the select does
  $("q-sort").value = $("q-sort").value === "asc" ? "desc" : "asc";
  $("q-sort").dispatchEvent(new Event("change"));
});
$("prev").addEventListener("click", () => { state.offset = Math.max(0, state.offset - state.size); list(); });
$("next").addEventListener("click", () => { state.offset += state.size; list(); });
$("lang").addEventListener("change", () => {
  lang = $("lang").value; localStorage.setItem(LANG_KEY, lang); applyLanguage();
  if (state.last) list();
});
applyLanguage();
start();
