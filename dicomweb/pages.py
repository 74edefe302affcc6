"""The built-in pages: the study browser at /, and its login.

The page is a shell: it holds no patient data and needs no credential. Its script
(static/browser/browser.js) asks /api/whoami, shows a login form when the archive wants a
credential (an API token pasted, or with `auth.oidc.client_id` the identity provider's login:
authorization code + PKCE, the page a public client), keeps it in sessionStorage, sends it as
`Authorization: Bearer`, then searches the studies through our own QIDO-RS (limit/offset
paging) and asks `browser/studies` for what QIDO does not return (each slide's stain, bytes,
tier: `archive.browse`). Thumbnails load with the same header. So the page sees exactly what
the caller's role and scope allow, and nothing else. Its words are English or Simplified
Chinese from Accept-Language (`browser_text`), with a switch remembered in localStorage.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from urllib.parse import urlsplit

from aiohttp import web

from archive import browse

from . import auditing, browser_text, qido
from .common import HttpError, base_url

STATIC = Path(__file__).resolve().parent / "static" / "browser"

PAGE = """<!doctype html><html lang="{lang}"><head><meta charset=utf-8><title>{t[title]}</title>
<meta name=viewport content="width=device-width, initial-scale=1">
<link rel=stylesheet href="static/browser/browser.css"></head><body>
<div id=who hidden><span id=whoname></span> · <a href=# id=logout data-t=logout>{t[logout]}</a></div>
<div id=langbox><label><span data-t=language>{t[language]}</span>
<select id=lang><option value=en>English</option><option value=zh-CN>简体中文</option></select></label></div>
<h1>pathpacs</h1>
<form id=login hidden><p data-t=login_intro>{t[login_intro]}</p>
<textarea id=token name=token autocomplete=off spellcheck=false></textarea><br>
<button type=submit data-t=login>{t[login]}</button> <button type=button id=oidc hidden data-t=login_oidc>{t[login_oidc]}</button>
<span id=loginerr class=err></span></form>
<form id=search hidden>
<label><span data-t=name>{t[name]}</span> <input id=q-name name=name data-ph=name_hint placeholder="{t[name_hint]}"></label>
<label><span data-t=pid>{t[pid]}</span> <input id=q-pid name=pid size=12></label>
<label><span data-t=accession>{t[accession]}</span> <input id=q-acc name=accession size=12></label>
<label><span data-t=date_from>{t[date_from]}</span> <input id=q-from name=from type=date></label>
<label><span data-t=date_to>{t[date_to]}</span> <input id=q-to name=to type=date></label>
<label><span data-t=modality>{t[modality]}</span> <select id=q-mod name=modality>
<option value="" data-t=any>{t[any]}</option><option>SM</option><option>ANN</option><option>SR</option>
<option>OT</option><option>XC</option><option>GM</option></select></label>
<label><span data-t=page_size>{t[page_size]}</span> <select id=q-size name=size>
<option>10</option><option selected>25</option><option>50</option><option>100</option></select></label>
<label><span data-t=sort>{t[sort]}</span> <select id=q-sort name=sort>
<option value=desc data-t=newest>{t[newest]}</option><option value=asc data-t=oldest>{t[oldest]}</option></select></label>
<button type=submit id=go data-t=search>{t[search]}</button> <button type=reset id=clear data-t=clear>{t[clear]}</button>
</form>
<p id=status></p>
<table id=studies hidden><thead><tr><th data-t=slides>{t[slides]}</th><th data-t=patient>{t[patient]}</th>
<th id=datehead class=sortable aria-sort=descending data-t=date>{t[date]}</th><th data-t=accession>{t[accession]}</th><th data-t=description>{t[description]}</th>
<th data-t=modalities>{t[modalities]}</th><th data-t=count>{t[count]}</th><th data-t=stain>{t[stain]}</th>
<th data-t=size>{t[size]}</th><th data-t=storage>{t[storage]}</th><th></th></tr></thead><tbody></tbody></table>
<nav id=pager hidden><button type=button id=prev data-t=prev>{t[prev]}</button>
<span id=pageno></span> <button type=button id=next data-t=next>{t[next]}</button>
<small id=ordernote data-t=order_note>{t[order_note]}</small></nav>
<script type=application/json id=text>{text}</script>
<script src="static/browser/browser.js"></script>
<script src="static/browser/inbox.js"></script>
<script src="static/browser/consult.js"></script></body></html>
"""

_TEXT_JSON = html.escape(json.dumps(browser_text.TEXT, ensure_ascii=False), quote=False)
_PAGES = {lang: PAGE.format(lang=lang, t={k: html.escape(v) for k, v in browser_text.TEXT[lang].items()},
                            text=_TEXT_JSON)
          for lang in browser_text.LANGUAGES}


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
               "; img-src 'self' blob:; script-src 'self'; style-src 'self'")
        lang = browser_text.choose(request.headers.get("Accept-Language"))
        return web.Response(text=_PAGES[lang], content_type="text/html",
                            headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                     "Content-Security-Policy": csp, "Content-Language": lang,
                                     "Vary": "Accept-Language"})

    async def summaries(request: web.Request) -> web.Response:
        """GET browser/studies?study=UID&study=UID...: what the browser shows of each study
        beyond QIDO (archive.browse); studies `who` may not see are left out."""
        uids = [u.strip() for v in request.query.getall("study", []) for u in v.split(",") if u.strip()]
        who, address, _ = auditing.caller(request)
        about = uids[0][:64] if len(uids) == 1 else None  # one study: its record is found by --study
        try:  # audited as QIDO is (a query event: who, what was asked, how many answered)
            if not uids:
                raise HttpError(400, "name at least one study: browser/studies?study=UID")
            if len(uids) > browse.MAX_STUDIES:
                raise HttpError(400, f"at most {browse.MAX_STUDIES} studies per request, not {len(uids)}")
            found = await arc.run(lambda: browse.as_json(browse.study_summaries(arc.sync, uids, who)))
        except Exception as exc:
            arc.sync.audit.queried(who, "STUDY", request.query_string, address, "", 0, study=about, via="browser",
                                   outcome="minor failure", reason=str(exc)[:200])
            raise
        arc.sync.audit.queried(who, "STUDY", request.query_string, address, "", len(found), study=about, via="browser")
        return web.json_response(found, headers={"Cache-Control": "no-store"})

    async def search(request: web.Request) -> web.Response:
        """GET browser/search?<QIDO study keys>&sort=-date|date&limit=&offset=: a QIDO-RS study
        search (same keys, matching, return attributes and DICOM JSON) sorted by study date
        and time over the whole result, limit and offset applied after sorting. QIDO itself
        has no sort (PS3.18); this is the browser's, audited as QIDO is (via=browser)."""
        params = [(k, v) for k, v in request.query.items() if k != "sort"]
        sort = request.query.get("sort", "-date")
        who, address, _ = auditing.caller(request)
        audit = arc.sync.audit
        cfg = arc.sync.config
        base = base_url(request)
        try:
            if sort not in browse.SORTS:
                raise HttpError(400, f"sort must be one of {', '.join(browse.SORTS)}, not {sort[:40]!r}")
            docs, more, clamped = await arc.search_run(
                qido.search, arc.sync, "STUDY", params, retrieve_aet=cfg.aet, max_results=cfg.max_results,
                who=who, order=sort)
        except Exception as exc:
            audit.queried(who, "STUDY", request.query_string, address, "", 0, via="browser",
                          outcome="minor failure", reason=str(exc)[:200])
            raise
        audit.queried(who, "STUDY", request.query_string, address, "", len(docs), via="browser")
        warnings = []
        if clamped is not None:
            warnings.append(f'299 pathpacs "limit reduced to http.max_results ({clamped})"')
        if more:
            warnings.append('299 pathpacs "There are additional results that can be requested"')
        headers = {"Cache-Control": "no-store", "Content-Type": "application/dicom+json"}
        if warnings:
            headers["Warning"] = ", ".join(warnings)
        return web.Response(body=qido.encode_json(docs, base), headers=headers)

    app.router.add_get("/", index)
    app.router.add_get("/browser/studies", summaries)
    app.router.add_get("/browser/search", search)
    app.router.add_static("/static/browser/", STATIC, append_version=False)
