"""Receiving and answering consultations (issue 12): the inbox, accept / decline / answer, the
opinion SR back at the requester under the original UIDs, the report, and the viewer's panel.

Two real `pathpacs serve` archives on loopback: A (requester) and B (consultant), each with
token auth and the other as a partner holding a token of it. A sends a de-identified case to B
(`pathpacs consult send`); B's notify_command writes the case's environment to a file, B's
webhook posts to a small aiohttp server of the test. Answers travel back through B's consultation
worker by STOW-RS to A, which maps them back into the original study.
"""
from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pydicom
import pytest
from aiohttp import web
from dicomweb_client.api import DICOMwebClient

import factory
from conftest import Server, free_port, run_cli
from archive.consult.documents import read_request
from archive.consult.opinion import read_opinion

DCIODVFY = shutil.which("dciodvfy")
QUESTION = "Invasive ductal carcinoma? Please grade."


class Hook:
    """A webhook receiver: an aiohttp server on its own loop and thread."""

    def __init__(self) -> None:
        self.port = free_port()
        self.received: list[dict] = []
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        threading.Thread(target=self._run, daemon=True).start()
        assert self._ready.wait(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def post(request: web.Request) -> web.Response:
            self.received.append({"type": request.content_type, "body": await request.json()})
            return web.Response(text="ok")

        app = web.Application()
        app.router.add_post("/hook", post)
        runner = web.AppRunner(app)
        self._loop.run_until_complete(runner.setup())
        self._loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self._ready.set()
        self._loop.run_forever()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"


def _token(data: Path, *roles: str, name: str) -> str:
    args = ["token", "create", "--name", name]
    for r in roles:
        args += ["--role", r]
    return run_cli(*args, data=data, check=True).stdout.strip()


def _config(name: str, partner: str, partner_port: int, token_file: Path, extra: str = "") -> str:
    return f"""
[auth]
mode = "token"
cache_seconds = 0

[consultation]
name = "{name}"
institution = "{name} hospital"
retry_max_seconds = 5
{extra}

[partners.{partner}]
dicomweb = "http://127.0.0.1:{partner_port}/dicomweb"
token_file = "{token_file}"
timeout = 20
experts = [{{ id = "li-breast", name = "Li Ming", specialties = ["breast"] }}]
"""


def _wait(what, fn, timeout: float = 60.0, every: float = 0.3):
    end = time.monotonic() + timeout
    last = None
    while time.monotonic() < end:
        last = fn()
        if last:
            return last
        time.sleep(every)
    raise AssertionError(f"timed out waiting for {what}: last {last!r}")


def _json(srv: Server, path: str, token: str, body: dict | None = None) -> tuple[int, object]:
    req = urllib.request.Request(srv.http_url + path, method="POST" if body is not None else "GET",
                                 data=json.dumps(body).encode() if body is not None else None,
                                 headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    from test_viewer_browser import complete_wsi

    tmp = tmp_path_factory.mktemp("consult")
    slides = factory.wsi_series(tmp / "case", levels=((1024, 768), (512, 384)), tile=256, patient_id="PAT-77",
                                patient_name="Zhang^San")
    complete_wsi(slides)
    study = pydicom.dcmread(slides[0], stop_before_pixels=True).StudyInstanceUID
    data_a, data_b = tmp / "a", tmp / "b"
    # tokens first (each archive's token for the other), then the configurations with the ports
    a_for_b = _token(data_a, "uploader", "viewer", name="partner hospB")
    b_for_a = _token(data_b, "uploader", "viewer", name="partner hospA")
    a_admin = _token(data_a, "viewer", "uploader", name="test")
    b_user = _token(data_b, "viewer", "uploader", name="consultant Li")
    (tmp / "a-to-b.token").write_text(b_for_a)
    (tmp / "b-to-a.token").write_text(a_for_b)
    ports = {k: (free_port(), free_port()) for k in "ab"}
    notified = tmp / "notified.env"
    hook = Hook()
    notify = f"notify_command = 'sh -c \"env | grep ^PATHPACS_CONSULT_ > {notified}\"'\nwebhook = \"{hook.url}\""
    cfg_a = tmp / "a.toml"
    cfg_b = tmp / "b.toml"
    cfg_a.write_text(_config("hospA", "hospB", ports["b"][1], tmp / "a-to-b.token"))
    cfg_b.write_text(_config("hospB", "hospA", ports["a"][1], tmp / "b-to-a.token", notify))
    run_cli("import", "--quiet", str(tmp / "case"), "--config", str(cfg_a), data=data_a, check=True)
    a = Server(data_a, ports["a"][0], ports["a"][1], config=cfg_a).start()
    b = Server(data_b, ports["b"][0], ports["b"][1], config=cfg_b).start()
    yield {"a": a, "b": b, "cfg_a": cfg_a, "cfg_b": cfg_b, "study": study, "slides": slides, "tmp": tmp,
           "a_token": a_admin, "b_token": b_user, "hook": hook, "notified": notified}
    a.stop()
    b.stop()


def _send(pair, question: str = QUESTION, priority: str = "urgent") -> str:
    res = run_cli("consult", "send", "--study", pair["study"], "--to", "hospB", "--deidentify", "--question", question,
                  "--priority", priority, "--physician", "Wang^Wei", "--expert", "li-breast", "--quiet",
                  "--config", str(pair["cfg_a"]), data=pair["a"].data_dir, check=True)
    job = res.stdout.strip().split()[-1]
    _wait("the job done", lambda: _job(pair, job).get("state") in ("done", "failed"), 90)
    assert _job(pair, job)["state"] == "done", _job(pair, job)
    return job


def _job(pair, job_id: str) -> dict:
    """A's job record (SEND's /api/consult/jobs/ID: the same record `consult list --json` prints)."""
    status, job = _json(pair["a"], f"/api/consult/jobs/{job_id}", pair["a_token"])
    assert status == 200, job
    return job  # type: ignore[return-value]


def _inbox(pair) -> list[dict]:
    status, cases = _json(pair["b"], "/api/consult/inbox", pair["b_token"])
    assert status == 200, cases
    return cases  # type: ignore[return-value]


def _inbox_cli(pair) -> list[dict]:
    res = run_cli("consult", "inbox", "--json", "--config", str(pair["cfg_b"]), data=pair["b"].data_dir, check=True)
    return json.loads(res.stdout)


def _b(pair, *args: str) -> subprocess.CompletedProcess:
    return run_cli("consult", *args, "--config", str(pair["cfg_b"]), data=pair["b"].data_dir)


def _client(srv: Server, token: str) -> DICOMwebClient:
    return DICOMwebClient(srv.dicomweb_url, headers={"Authorization": f"Bearer {token}"})


def _answers_at_a(pair) -> list[pydicom.Dataset]:
    """Every consultation answer SR in A's ORIGINAL study, retrieved by WADO."""
    c = _client(pair["a"], pair["a_token"])
    out = []
    for inst in c.search_for_instances(study_instance_uid=pair["study"], search_filters={"Modality": "SR"}):
        ds = c.retrieve_instance(pair["study"], inst["0020000E"]["Value"][0], inst["00080018"]["Value"][0])
        if read_opinion(ds) is not None:
            out.append(ds)
    return out


@pytest.fixture(scope="module")
def case(pair):
    job = _send(pair)
    rec = _wait("the case in B's inbox", lambda: next((c for c in _inbox(pair) if c["id"] == job), None))
    return {"job": job, "rec": rec}


def test_request_arrives_in_the_inbox_with_notifications(pair, case):
    rec = case["rec"]
    assert (rec["requester"], rec["partner"], rec["unknown_partner"]) == ("hospA", "hospA", False)
    assert (rec["question"], rec["priority"], rec["expert"], rec["state"]) == (QUESTION, "urgent", "li-breast", "new")
    assert rec["institution"] == "hospA hospital" and rec["physician"].startswith("Wang")
    assert rec["study"] != pair["study"]  # de-identified: B has its own UIDs for the case
    # the list, as JSON and text from the CLI and over HTTP (a foreign token is refused)
    assert [c for c in _inbox_cli(pair) if c["id"] == case["job"]] == [rec]
    text = _b(pair, "inbox")
    assert text.returncode == 0 and case["job"] in text.stdout and "urgent" in text.stdout
    status, cases = _json(pair["b"], "/api/consult/inbox", pair["b_token"])
    assert status == 200 and [c["id"] for c in cases if c["id"] == case["job"]] == [case["job"]]
    status, one = _json(pair["b"], f"/api/consult/inbox/{case['job']}", pair["b_token"])
    assert status == 200 and one["question"] == QUESTION
    assert _json(pair["b"], "/api/consult/inbox", pair["a_token"])[0] == 401
    # notify_command ran with the case's fields; the webhook got the case as JSON
    env = dict(line.split("=", 1) for line in
               _wait("notify_command's file", lambda: pair["notified"].exists() and pair["notified"].read_text()).splitlines())
    assert env["PATHPACS_CONSULT_ID"] == case["job"] and env["PATHPACS_CONSULT_QUESTION"] == QUESTION
    assert (env["PATHPACS_CONSULT_PRIORITY"], env["PATHPACS_CONSULT_PARTNER"]) == ("urgent", "hospA")
    hooks = _wait("the webhook", lambda: [h for h in pair["hook"].received if h["body"]["case"]["id"] == case["job"]])
    assert hooks[0]["type"] == "application/json" and hooks[0]["body"]["event"] == "consultation received"
    assert hooks[0]["body"]["case"]["study"] == rec["study"]


def test_bad_input_gets_one_line(pair, case):
    res = _b(pair, "accept", "no-such-case")
    assert res.returncode == 1 and res.stderr.strip().count("\n") == 0 and "no consultation no-such-case" in res.stderr
    res = _b(pair, "answer", case["job"])
    assert res.returncode == 2 and "--text or --file" in res.stderr
    res = _b(pair, "report", "--month", "2026-13")
    assert res.returncode == 2 and "is not YYYY-MM" in res.stderr
    status, body = _json(pair["b"], f"/api/consult/inbox/{case['job']}/decline", pair["b_token"], {"reason": " "})
    assert status == 400 and "needs a reason" in body
    status, body = _json(pair["b"], f"/api/consult/inbox/{case['job']}/answer", pair["b_token"],
                         {"text": "x", "regions": [{"sop_instance_uid": "1.2.3", "points": [[1, 2]], "graphic_type": "POINT"}]})
    assert status == 400 and "not an instance of the case" in body


def test_answer_with_a_region_arrives_at_a_in_the_original_study(pair, case):
    rec = case["rec"]
    res = _b(pair, "accept", case["job"])
    assert res.returncode == 0 and "hospA is told" in res.stderr, res.stderr
    accepted = next(c for c in _inbox(pair) if c["id"] == case["job"])
    assert accepted["state"] == "accepted" and accepted["accept_sop"]
    # A learns it at once (an acceptance notice SR, mapped back like any answer)
    job = _wait("accepted at A", lambda: (j := _job(pair, case["job"])).get("answer_state") == "accepted" and j, 60)
    assert job["accepted"] and not job.get("answered")
    status, again = _json(pair["b"], f"/api/consult/inbox/{case['job']}/accept", pair["b_token"], {})
    assert status == 200 and again["accept_sop"] == accepted["accept_sop"]  # told once
    # the base slide at B (its de-identified UID) carries the region
    cb = _client(pair["b"], pair["b_token"])
    vols = [i for i in cb.search_for_instances(study_instance_uid=rec["study"], search_filters={"Modality": "SM"},
                                               fields=["00480006"])]
    base_b = max(vols, key=lambda i: i["00480006"]["Value"][0])["00080018"]["Value"][0]
    base_a = pydicom.dcmread(pair["slides"][0], stop_before_pixels=True).SOPInstanceUID
    assert base_b != base_a
    regions = pair["tmp"] / "regions.json"
    regions.write_text(json.dumps([{"sop_instance_uid": base_b, "graphic_type": "POLYLINE", "label": "tumour",
                                    "points": [[100, 120], [400, 120], [400, 300]]}]))
    text = "Invasive ductal carcinoma, Nottingham grade 2."
    res = _b(pair, "answer", case["job"], "--text", text, "--regions", str(regions), "--consultant", "Li Ming")
    assert res.returncode == 0, res.stderr
    after = next(c for c in _inbox(pair) if c["id"] == case["job"])
    assert after["state"] == "answered" and after["answer_sop"] and after["accepted"] <= after["answered"]
    case["answer_sop"] = after["answer_sop"]
    # at A: the SR is in the ORIGINAL study; its region names A's original slide
    found = _wait("the opinion at A", lambda: [d for d in _answers_at_a(pair)
                                               if read_opinion(d).consultation_id == case["job"]
                                               and read_opinion(d).kind == "answered"], 60)
    sr = found[0]
    op = read_opinion(sr)
    assert sr.StudyInstanceUID == pair["study"] and op.text == text and op.consultant == "Li Ming"
    assert [(r.sop_instance_uid, r.graphic_type, r.label, r.points) for r in op.regions] == \
        [(base_a, "POLYLINE", "tumour", ((100.0, 120.0), (400.0, 120.0), (400.0, 300.0)))]
    assert (str(sr.PatientName), sr.PatientID) == ("Zhang^San", "PAT-77")  # identity of the original case
    evidence = {r.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
                for se in s.ReferencedSeriesSequence for r in se.ReferencedSOPSequence}
    assert base_a in evidence and base_b not in evidence
    # every UID in the document is one A has (or the SR's own): nothing of B's mapping is left
    b_study = rec["study"]
    assert b_study not in sr.to_json() and base_b not in sr.to_json()
    if DCIODVFY:
        path = pair["tmp"] / "opinion-at-a.dcm"
        sr.save_as(path, enforce_file_format=True)
        out = subprocess.run([DCIODVFY, "-new", str(path)], capture_output=True, text=True)
        errors = [l for l in (out.stdout + out.stderr).splitlines() if l.startswith("Error")]
        assert not errors, out.stderr
    else:
        pytest.fail("dciodvfy is not installed (make test installs it with apt-get)")
    # A's job knows the answer
    job = _wait("the job answered", lambda: (j := _job(pair, case["job"])).get("answer_state") == "answered" and j)
    assert job["answer_sop"] == sr.SOPInstanceUID and job["accepted"] <= job["answered"]
    # a second answer is refused
    res = _b(pair, "answer", case["job"], "--text", "again")
    assert res.returncode == 1 and "already answered" in res.stderr


def test_decline_reason_arrives_at_a(pair, case):
    job = _send(pair, question="Second opinion on margins", priority="routine")
    _wait("the second case in B's inbox", lambda: any(c["id"] == job for c in _inbox(pair)))
    status, rec = _json(pair["b"], f"/api/consult/inbox/{job}/decline", pair["b_token"],
                        {"reason": "Outside my specialty: please ask the soft tissue service."})
    assert status == 200 and rec["state"] == "declined", rec
    got = _wait("the decline at A", lambda: (j := _job(pair, job)).get("answer_state") == "declined" and j, 60)
    assert got["decline_reason"] == "Outside my specialty: please ask the soft tissue service."
    declines = [d for d in _answers_at_a(pair) if read_opinion(d).consultation_id == job]
    assert len(declines) == 1 and read_opinion(declines[0]).declined == got["decline_reason"]
    assert declines[0].StudyInstanceUID == pair["study"]
    res = _b(pair, "accept", job)
    assert res.returncode == 1 and "already declined" in res.stderr
    # the second send carried A's copy of the first answer (it is in the case now): at B it is
    # no answer of the first case, which keeps its own
    first = next(c for c in _inbox(pair) if c["id"] == case["job"])
    assert (first["state"], first["answer_sop"]) == ("answered", case["answer_sop"])


def test_report_counts_and_turnaround(pair, case):
    # after the answer and the decline (module order)
    jobs = json.loads(run_cli("consult", "list", "--json", "--config", str(pair["cfg_a"]), data=pair["a"].data_dir,
                              check=True).stdout)
    assert sum(1 for j in jobs if j.get("answer_state") in ("answered", "declined")) == 2
    res = run_cli("consult", "report", "--json", "--config", str(pair["cfg_a"]), data=pair["a"].data_dir, check=True)
    rows = [r for r in json.loads(res.stdout) if r["role"] == "requester" and r["partner"] == "hospB"]
    assert len(rows) == 1
    r = rows[0]
    assert (r["cases"], r["accepted"], r["declined"], r["answered"]) == (r["cases"], r["accepted"], 1, 1)
    assert r["cases"] >= 2 and r["accepted"] >= 1
    assert r["requested_to_answered_min"]["median"] is not None and r["requested_to_answered_min"]["median"] >= 0
    assert r["instances"] > 0 and r["bytes"] > 0
    res = run_cli("consult", "report", "--json", "--config", str(pair["cfg_b"]), data=pair["b"].data_dir, check=True)
    rows = [r for r in json.loads(res.stdout) if r["role"] == "consultant" and r["partner"] == "hospA"]
    assert len(rows) == 1 and rows[0]["declined"] == 1 and rows[0]["answered"] == 1
    assert rows[0]["accepted_to_answered_min"]["p90"] is not None
    month = rows[0]["month"]
    res = run_cli("consult", "report", "--month", month, "--config", str(pair["cfg_b"]), data=pair["b"].data_dir,
                  check=True)
    assert "hospA" in res.stdout and "consultant" in res.stdout
    none = run_cli("consult", "report", "--json", "--month", "1999-01", "--config", str(pair["cfg_b"]),
                   data=pair["b"].data_dir, check=True)
    assert json.loads(none.stdout) == []


def test_viewer_shows_the_question_and_sends_the_opinion(pair, browser):
    """Chromium at B: the study browser lists the case, the viewer shows its question; the
    consultant draws a point, writes the opinion and sends it: it arrives at A on A's slide."""
    from test_viewer import Page

    question = "Frozen section: margin involved?"
    job = _send(pair, question=question, priority="frozen")
    rec = _wait("the case in B's inbox", lambda: next((c for c in _inbox(pair) if c["id"] == job), None))
    b = pair["b"]
    home = Page(browser, b, pair["tmp"], token=pair["b_token"])  # the study browser (its favicon is a 404)
    home.page.goto(b.http_url + "/")
    home.page.wait_for_selector(f"#inbox tr[data-case='{job}']", timeout=30000)
    row = home.page.locator(f"#inbox tr[data-case='{job}']").inner_text()
    assert question in row and "frozen" in row and "hospA" in row
    link = home.page.get_attribute(f"#inbox tr[data-case='{job}'] a", "href")
    assert link == f"viewer?study={rec['study']}&consult={job}"
    assert home.errors == []
    home.context.close()
    p = Page(browser, b, pair["tmp"], token=pair["b_token"])
    p.open(link.split("?", 1)[1])
    p.wait_rendered()
    p.page.wait_for_function("() => window.ppConsult && window.ppConsult.status === 'shown'", timeout=30000)
    assert p.page.inner_text("#consult-question") == question
    assert p.page.inner_text("#consult-from") == "hospA" and p.page.inner_text("#consult-priority") == "frozen"
    box = p.page.locator("#viewport").bounding_box()
    p.page.fill("#mark-label", "margin")
    p.page.click("[data-mark=point]")
    p.page.mouse.click(round(box["x"] + box["width"] / 2), round(box["y"] + box["height"] / 2))
    p.page.wait_for_function("() => window.ppViewer.marks.length === 1")
    text = "Margin free of tumour (2 mm)."
    p.page.fill("#consult-opinion", text)
    p.page.click("#consult-send")
    p.page.wait_for_function("() => ['done', 'error'].includes(window.ppConsult.status)", timeout=30000)
    st = p.page.evaluate("() => window.ppConsult")
    assert st["status"] == "done" and st["case"]["state"] == "answered", p.debug() + str(st)
    assert p.page.inner_text("#consult-state") == "answered"
    assert p.page.is_disabled("#consult-send")
    found = _wait("the viewer's opinion at A", lambda: [d for d in _answers_at_a(pair)
                                                         if read_opinion(d).consultation_id == job], 60)
    op = read_opinion(found[0])
    base_a = pydicom.dcmread(pair["slides"][0], stop_before_pixels=True)
    assert op.text == text and found[0].StudyInstanceUID == pair["study"]
    [region] = op.regions
    assert (region.sop_instance_uid, region.graphic_type, region.label) == (base_a.SOPInstanceUID, "POINT", "margin")
    (col, row), = region.points
    assert 0 <= col <= base_a.TotalPixelMatrixColumns and 0 <= row <= base_a.TotalPixelMatrixRows
    p.clean()
    # at A, the original case in the viewer shows the answers that came back (read-only)
    q = Page(browser, pair["a"], pair["tmp"], token=pair["a_token"])
    q.open(f"study={pair['study']}")
    q.wait_rendered()
    q.page.wait_for_function("() => window.ppConsult && window.ppConsult.status !== 'loading'", timeout=30000)
    docs = q.page.evaluate("() => window.ppConsult.documents")
    assert {d["id"]: d.get("text") for d in docs if d["kind"] == "opinion"}[job] == text, docs
    assert any(d.get("declined") == "Outside my specialty: please ask the soft tissue service." for d in docs), docs
    assert text in q.page.inner_text("#consult") and q.page.locator("#consult-send").count() == 0
    q.clean()


def test_an_opinion_stored_by_any_dicom_client_is_sent_back(pair):
    """A consultant's own SR software stores the opinion by STOW (highdicom here): B treats it
    as the written opinion and sends it back; it joins A's original case."""
    from archive.consult.opinion import opinion_sr

    job = _send(pair, question="Any DICOM client", priority="routine")
    rec = _wait("the case in B's inbox", lambda: next((c for c in _inbox(pair) if c["id"] == job), None))
    cb = _client(pair["b"], pair["b_token"])
    srs = [cb.retrieve_instance(rec["study"], i["0020000E"]["Value"][0], i["00080018"]["Value"][0])
           for i in cb.search_for_instances(study_instance_uid=rec["study"], search_filters={"Modality": "SR"})]
    [request] = [d for d in srs if read_request(d) is not None]  # (A's earlier answers travel with the case)
    sr = opinion_sr([request], consultation_id=job, consultant="Chen^Hua", text="Reactive changes only.",
                    request=request)
    cb.store_instances([sr])
    got = _wait("the STOW'd opinion at A", lambda: (j := _job(pair, job)).get("answer_state") == "answered" and j, 60)
    assert got["consultant"] == "Chen Hua"
    [at_a] = [d for d in _answers_at_a(pair) if read_opinion(d).consultation_id == job]
    op = read_opinion(at_a)
    assert op.text == "Reactive changes only." and at_a.StudyInstanceUID == pair["study"]
    assert op.request_sop_uid == _job(pair, job)["request_sr"]  # the request reference, mapped back
    assert next(c for c in _inbox(pair) if c["id"] == job)["state"] == "answered"


def test_request_from_an_unknown_requester_is_flagged(pair):
    """A request whose REQUESTER names no [partners.*]: in the inbox, flagged; its answer is
    stored but cannot be sent automatically (the case says so)."""
    from pydicom.uid import generate_uid

    from archive.consult.documents import request_sr

    header = pydicom.dcmread(pair["slides"][1], stop_before_pixels=True)
    header.StudyInstanceUID = generate_uid()  # a case of its own at B
    header.SeriesInstanceUID, header.SOPInstanceUID = generate_uid(), generate_uid()
    sr = request_sr(header, consultation_id="walk-in-1", requester="county7", question="Lymphoma?")
    path = pair["tmp"] / "walk-in.dcm"
    sr.save_as(path, enforce_file_format=True)
    # by `pathpacs import` (a short-lived process): its notifications still run before it exits
    run_cli("import", "--quiet", str(path), "--config", str(pair["cfg_b"]), data=pair["b"].data_dir, check=True)
    assert "PATHPACS_CONSULT_ID=walk-in-1\n" in pair["notified"].read_text()
    assert [h for h in pair["hook"].received if h["body"]["case"]["id"] == "walk-in-1"]
    rec = next(c for c in _inbox(pair) if c["id"] == "walk-in-1")
    assert (rec["partner"], rec["unknown_partner"], rec["requester"]) == (None, True, "county7")
    assert "unknown partner" in rec["note"]
    assert "county7 (unknown partner)" in _b(pair, "inbox").stdout
    res = _b(pair, "answer", "walk-in-1", "--text", "Needs immunohistochemistry.")
    assert res.returncode == 0 and "unknown partner" in res.stderr
    after = next(c for c in _inbox(pair) if c["id"] == "walk-in-1")
    assert after["state"] == "answered" and after["answer_job"] is None
    res = _b(pair, "decline", "walk-in-1", "--reason", "too late")
    assert res.returncode == 1 and res.stderr.strip() == "pathpacs: error: consultation walk-in-1 is already answered"


def test_report_turnaround_is_exact(tmp_path):
    """Median and p90 (nearest rank) of known times, per month, partner and role."""
    from archive.config import Config
    from archive.consult.report import report
    from archive.service import Archive

    cfg = Config()
    cfg.data_dir = tmp_path / "data"
    with Archive(cfg) as arc:
        for n, minutes in enumerate([10, 20, 30, 40, 50, 60, 70, 80, 90, 100]):
            arc.index.put_record("consult", f"j{n}", {
                "id": f"j{n}", "kind": "request", "partner": "hospB", "created": "2026-11-03T08:00:00.000Z",
                "accepted": "2026-11-03T08:05:00.000Z", "answered": f"2026-11-03T{8 + (5 + minutes) // 60:02d}:"
                f"{(5 + minutes) % 60:02d}:00.000Z", "answer_state": "answered", "bytes_sent": 1000,
                "instances_sent": 3})
        arc.index.put_record("consult", "jd", {"id": "jd", "kind": "request", "partner": "hospB",
                                               "created": "2026-12-01T00:00:00Z", "declined": "2026-12-01T01:00:00Z",
                                               "answer_state": "declined", "bytes_sent": 5, "instances_sent": 1})
        arc.index.put_record("consult", "ans", {"id": "ans", "kind": "answer", "partner": "hospB",
                                                "created": "2026-11-04T00:00:00Z"})  # an answer job: not a case
        arc.index.put_record("inbox", "c1", {"id": "c1", "partner": None, "requester": "county7", "study": None,
                                             "received": "2026-11-05T10:00:00+00:00", "state": "new"})
        rows = report(arc)
        nov = report(arc, "2026-11")
    by = {(r["month"], r["partner"], r["role"]): r for r in rows}
    assert set(by) == {("2026-11", "hospB", "requester"), ("2026-12", "hospB", "requester"),
                       ("2026-11", "unknown:county7", "consultant")}
    r = by[("2026-11", "hospB", "requester")]
    assert (r["cases"], r["accepted"], r["declined"], r["answered"]) == (10, 10, 0, 10)
    assert r["requested_to_accepted_min"] == {"median": 5.0, "p90": 5.0}
    assert r["accepted_to_answered_min"] == {"median": 55.0, "p90": 90.0}
    assert r["requested_to_answered_min"] == {"median": 60.0, "p90": 95.0}
    assert (r["bytes"], r["instances"]) == (10000, 30)
    d = by[("2026-12", "hospB", "requester")]
    assert (d["cases"], d["declined"], d["answered"], d["requested_to_answered_min"]["median"]) == (1, 1, 0, None)
    assert [x["month"] for x in nov] == ["2026-11", "2026-11"]


def test_plain_case_answer_is_stored_as_it_came_and_the_case_can_go_again(pair):
    """Without de-identification nothing needs mapping: A stores the answer with B's very bytes,
    so sending the case (which now holds the answer) to B again is no conflict there."""
    import hashlib

    def plain() -> str:
        res = run_cli("consult", "send", "--study", pair["study"], "--to", "hospB", "--question", "plain",
                      "--quiet", "--config", str(pair["cfg_a"]), data=pair["a"].data_dir, check=True)
        job = res.stdout.strip().split()[-1]
        _wait("the plain job", lambda: _job(pair, job).get("state") in ("done", "failed"), 90)
        return job

    job = plain()
    assert _job(pair, job)["state"] == "done", _job(pair, job)
    rec = _wait("the plain case in B's inbox", lambda: next((c for c in _inbox(pair) if c["id"] == job), None))
    assert rec["study"] == pair["study"]
    assert _b(pair, "answer", job, "--text", "Plain answer.").returncode == 0
    _wait("the plain answer at A", lambda: _job(pair, job).get("answer_state") == "answered", 60)
    sop = next(c for c in _inbox(pair) if c["id"] == job)["answer_sop"]
    assert _job(pair, job)["answer_sop"] == sop

    def sha(srv: Server, token: str) -> str:
        c = _client(srv, token)
        [inst] = c.search_for_instances(study_instance_uid=pair["study"], search_filters={"SOPInstanceUID": sop})
        ds = c.retrieve_instance(pair["study"], inst["0020000E"]["Value"][0], sop)
        return hashlib.sha256(ds.to_json().encode()).hexdigest()

    assert sha(pair["a"], pair["a_token"]) == sha(pair["b"], pair["b_token"])
    again = plain()
    assert _job(pair, again)["state"] == "done", _job(pair, again)
    # the first consultation's opinion (and acceptance) stayed at A: a case sent again carries none
    assert _job(pair, again)["excluded"] >= 1, _job(pair, again)
