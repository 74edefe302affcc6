"""The page a share link opens: `/share#<token>` (archive.shares).

A static shell, public like the viewer's: it holds no patient data. Its script
(static/share/share.js) takes the token from the URL fragment (which never reaches a server
log or a Referer header), drops it from the address bar and history, keeps it in
sessionStorage where the viewer (viewer/viewer.js) and the study list read their bearer token,
asks /api/whoami which study the link opens and replaces itself with the viewer on it. A link
that has expired or was revoked (401) says so here instead of opening a blank viewer. Words
in English or Simplified Chinese, as the viewer's (Accept-Language or ?lang=).
"""
from __future__ import annotations

import html
from pathlib import Path

from aiohttp import web

from .viewer_text import choose_language

STATIC = Path(__file__).resolve().parent / "static" / "share"
TEXT = {
    "en": {"title": "Shared slide", "opening": "Opening the shared slide…",
           "expired": "This link has expired or was revoked.",
           "expired_help": "Ask whoever sent it for a new link.",
           "missing": "This link is incomplete: it carries no access token. Open the whole link you were sent.",
           "failed": "The shared study cannot be opened: the archive answered"},
    "zh-CN": {"title": "共享切片", "opening": "正在打开共享切片…",
              "expired": "此链接已过期或已被撤销。",
              "expired_help": "请向发送者索取新的链接。",
              "missing": "此链接不完整：缺少访问令牌。请打开收到的完整链接。",
              "failed": "无法打开共享的检查：归档服务器返回"},
}
CSP = "default-src 'none'; script-src 'self'; connect-src 'self'; img-src data:; style-src 'unsafe-inline'; frame-ancestors 'none'"
PAGE = """<!doctype html><html lang="{lang}"><head><meta charset=utf-8><title>{title}</title>
<meta name=viewport content="width=device-width, initial-scale=1"><meta name=referrer content=no-referrer>
<link rel=icon href="data:,"><style>body{{font:16px system-ui,sans-serif;margin:3em auto;max-width:36em;padding:0 1em}}
.err{{color:#a40000}}</style></head><body>
<h1>pathpacs</h1>
<p id=opening role=status>{opening}</p>
<div id=expired hidden><p class=err>{expired}</p><p>{expired_help}</p></div>
<p id=missing class=err hidden>{missing}</p>
<p id=failed class=err hidden data-text="{failed}"></p>
<script src="static/share/share.js"></script></body></html>
"""


def render_page(lang: str) -> str:
    return PAGE.format(lang=lang, **{k: html.escape(v) for k, v in TEXT[lang].items()})


def add_routes(app: web.Application) -> None:
    """GET /share (public: auth.PUBLIC_PATHS) and its script under /static/share/."""
    async def page(request: web.Request) -> web.Response:
        lang = choose_language(request.query.get("lang"), request.headers.get("Accept-Language", ""))
        return web.Response(text=render_page(lang), content_type="text/html",
                            headers={"Cache-Control": "no-store", "X-Frame-Options": "DENY",
                                     "Content-Security-Policy": CSP, "Content-Language": lang,
                                     "Referrer-Policy": "no-referrer", "Vary": "Accept-Language"})

    app.router.add_get("/share", page)
    app.router.add_static("/static/share/", STATIC, append_version=False)
