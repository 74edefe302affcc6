"""The built-in pages: a study list with thumbnails at / (answers from the index only)."""
from __future__ import annotations

import asyncio
import html

from aiohttp import web

from archive.metadata import string_values

from . import auditing


def _v(doc: dict, tag: str) -> str:
    return html.escape("\\".join(string_values(doc.get(tag))))


def _name(doc: dict) -> str:
    """A person name as people write it: 'Family, Given Middle' (DICOM stores Family^Given^Middle)."""
    names = []
    for raw in string_values(doc.get("00100010")):
        family, _, rest = raw.partition("^")
        given = " ".join(p for p in rest.split("^") if p)
        names.append(f"{family}, {given}" if family and given else family or given)
    return html.escape("; ".join(names))


def add_routes(app: web.Application, arc) -> None:
    def newest_studies() -> list:
        studies = list(arc.sync.studies())
        studies.sort(key=lambda s: s.updated, reverse=True)
        return studies

    async def index(request: web.Request) -> web.Response:
        rows = []
        # a scan of every study: off the event loop (the study browser issue replaces it with QIDO)
        studies = await arc.run(newest_studies)
        who, address, _ = auditing.caller(request)  # the list shows patient names and IDs: audited
        arc.sync.audit.queried(who, "STUDY", "study list page", address, "", min(len(studies), 500), via="pages")
        for rec in studies[:500]:
            a = rec.attrs
            u = html.escape(rec.uid)
            rows.append(
                f"<tr><td><a href='dicomweb/studies/{u}/thumbnail?viewport=512,512'>"
                f"<img loading=lazy src='dicomweb/studies/{u}/thumbnail?viewport=96,96' alt=''></a></td>"
                f"<td>{_name(a)}<br><small>{_v(a, '00100020')}</small></td>"
                f"<td>{_v(a, '00080020')}</td><td>{_v(a, '00080050')}</td><td>{_v(a, '00081030')}</td>"
                f"<td>{html.escape(','.join(rec.modalities))}</td>"
                f"<td>{rec.n_series} / {rec.n_instances}</td>"
                f"<td><a href='dicomweb/studies/{u}/series'>series</a> · "
                f"<a href='dicomweb/studies/{u}/metadata'>metadata</a></td></tr>")
        body = f"""<!doctype html><html><head><meta charset=utf-8><title>pathpacs</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em}}table{{border-collapse:collapse}}
td,th{{padding:4px 10px;border-bottom:1px solid #ddd;text-align:left;vertical-align:middle}}
img{{max-width:96px;max-height:96px}}</style></head><body>
<h1>pathpacs</h1><p>{len(studies)} {"study" if len(studies) == 1 else "studies"}. DICOMweb root: <code>/dicomweb</code>.</p>
<table><tr><th></th><th>Patient</th><th>Date</th><th>Accession</th><th>Description</th>
<th>Modalities</th><th>Series / instances</th><th></th></tr>
{''.join(rows)}</table></body></html>"""
        return web.Response(text=body, content_type="text/html")

    app.router.add_get("/", index)
