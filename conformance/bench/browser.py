"""Study browser benchmark: the page and each answer it asks for, over an index of 100k instances.

The index is written straight from records (conformance.bench.frames._qido_docs: 20,000
studies of 5 instances, records without blobs), then a real `pathpacs serve` answers what the
page at / asks: the page itself, its default QIDO page (limit 25), the summaries of those 25
studies (browser/studies: slides, stain, size, tier), the searches its form makes (name prefix,
a Chinese-name prefix, a date range, a modality, an accession), the next page, and a deep page.
Targets (issue 11): the page and each search under 100 ms.
"""
from __future__ import annotations

import shutil
import time
from pathlib import Path

from conformance.bench.frames import _pathpacs, _qido_docs, _timed_get

TARGET_MS = 100.0
INCLUDE = "includefield=00081030&includefield=00201206"


def _index(data: Path, n_instances: int) -> None:
    from archive import metadata as md
    from archive.index import NewInstance
    from archive.records import InstanceRecord
    from archive.service import Archive

    marker = data / "complete"
    if marker.exists():
        return
    shutil.rmtree(data, ignore_errors=True)
    arc = Archive.open(data)
    news = [NewInstance(InstanceRecord.from_json(rec), [], [], md.dumps(meta), {}, patient, study, series)
            for rec, meta, patient, study, series in _qido_docs(n_instances)]
    arc.index.add_instances(news)  # one transaction (a bench fixture: records without blobs)
    arc.close()
    marker.write_text("ok")


def run(workdir: Path, quick: bool = False) -> list[dict]:
    import requests

    n = 10_000 if quick else 100_000
    data = workdir / "browse-index"
    t = time.perf_counter()
    _index(data, n)
    built = time.perf_counter() - t
    srv = _pathpacs(data, workdir / "pathpacs-browser.log")
    rows: list[dict] = []
    try:
        base, dw = srv.http_url, srv.dicomweb_url
        first = requests.get(f"{dw}/studies?{INCLUDE}&limit=25&offset=0", timeout=60).json()
        uids = "&".join("study=" + s["0020000D"]["Value"][0] for s in first)
        cases = [
            ("the page (/)", f"{base}/"),
            ("its script (static/browser/browser.js)", f"{base}/static/browser/browser.js"),
            ("first page: QIDO studies limit=25", f"{dw}/studies?{INCLUDE}&limit=25&offset=0"),
            ("summaries of those 25 studies (browser/studies)", f"{base}/browser/studies?{uids}"),
            ("next page: offset=25", f"{dw}/studies?{INCLUDE}&limit=25&offset=25"),
            ("name prefix: PatientName=smi*", f"{dw}/studies?{INCLUDE}&PatientName=smi*&limit=25"),
            ("Chinese name prefix (none match): PatientName=王*", f"{dw}/studies?{INCLUDE}&PatientName=%E7%8E%8B*&limit=25"),
            ("date range: StudyDate=20240101-20241231", f"{dw}/studies?{INCLUDE}&StudyDate=20240101-20241231&limit=25"),
            ("modality: ModalitiesInStudy=SM", f"{dw}/studies?{INCLUDE}&ModalitiesInStudy=SM&limit=25"),
            ("accession: AccessionNumber=A00012345", f"{dw}/studies?{INCLUDE}&AccessionNumber=A00012345&limit=25"),
            ("deep page: offset=5000 (walks 5,000 studies)", f"{dw}/studies?{INCLUDE}&limit=25&offset=5000"),
            ("name, no index prefix: PatientName=*P1999* (a scan)", f"{dw}/studies?{INCLUDE}&PatientName=*P1999*&limit=25"),
            ("sorted newest first: browser/search sort=-date limit=25", f"{base}/browser/search?{INCLUDE}&sort=-date&limit=25"),
            ("sorted, next page: sort=-date offset=25", f"{base}/browser/search?{INCLUDE}&sort=-date&limit=25&offset=25"),
            ("sorted name prefix: sort=-date PatientName=smi*", f"{base}/browser/search?{INCLUDE}&sort=-date&PatientName=smi*&limit=25"),
            ("sorted date range: sort=date StudyDate=20240101-20241231", f"{base}/browser/search?{INCLUDE}&sort=date&StudyDate=20240101-20241231&limit=25"),
        ]
        for what, url in cases:
            res = _timed_get(url, 5 if quick else 20)
            rows.append({"benchmark": f"browser at {n // 1000}k instances: {what}", "system": "pathpacs",
                         "value": f"{res['p50_ms']} ms p50", "note": f"min {res['min_ms']} ms; target < {TARGET_MS:.0f} ms: "
                         + ("met" if res["p50_ms"] < TARGET_MS else "MISSED")})
        rows.append({"benchmark": f"browser at {n // 1000}k instances: index written", "system": "pathpacs",
                     "value": f"{built:.1f} s", "note": "records only, one transaction (0 s: kept from an earlier run)"})
    finally:
        srv.stop(timeout=30)
    return rows
