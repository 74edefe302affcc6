"""Sending a case for consultation (issue 12, archive.consult): two real `pathpacs serve`
archives on loopback, requester A and consultant B (B with token authentication; A holds an
uploader+viewer token of B as the partner's credential).

A case (pyramid levels, label, overview) goes A -> B and arrives byte-identical, with the
request SR readable by `read_request`, in frozen order; B killed -9 mid-transfer and restarted:
the job completes without re-sending confirmed instances; refusals (401, 409, a full disk) fail
the job with the reason and leave A's data as it was. The CLI and HTTP entry points are checked
for their answers and exit codes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import generate_uid

import factory
from conftest import run_cli
from conformance.bench.peers import start_pathpacs

from archive.consult.documents import read_request

ELE = "1.2.840.10008.1.2.1"
MB = 1 << 20
BAD_TOKEN = "pp_nobody00.not-a-secret"


def _bytes(ds) -> bytes:
    from io import BytesIO

    buf = BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _multipart(parts: list[bytes], bnd: str = "testboundary") -> tuple[bytes, str]:
    body = b"".join(b"--" + bnd.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    return body + b"--" + bnd.encode() + b"--\r\n", f'multipart/related; type="application/dicom"; boundary={bnd}'


def stow(base: str, parts: list[bytes], token: str | None = None) -> requests.Response:
    body, ctype = _multipart(parts)
    headers = {"Content-Type": ctype, "Accept": "application/dicom+json"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return requests.post(base + "/studies", data=body, headers=headers, timeout=60)


def wado_bytes(base: str, study: str, series: str, sop: str, token: str | None = None) -> bytes:
    headers = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    r = requests.get(f"{base}/studies/{study}/series/{series}/instances/{sop}", headers=headers, timeout=60)
    assert r.status_code == 200, (r.status_code, r.text[:200])
    bnd = re.search(r'boundary="?([^";]+)', r.headers["Content-Type"]).group(1).encode()
    chunk = r.content.split(b"--" + bnd)[1]
    return chunk.partition(b"\r\n\r\n")[2][:-2]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def make_case(levels=((2048, 1536), (1024, 768), (512, 384)), *, ts=None, label=True, overview=True,
              patient_id="PCONSULT") -> list[pydicom.Dataset]:
    """One slide: its levels largest first (the natural order), then label and overview."""
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    kw = {"transfer_syntax": ts} if ts else {}
    out = [factory.wsi_instance(study, series, w, h, patient_id=patient_id, seed=i, frame_of_reference=frame,
                                instance_number=i + 1, **kw) for i, (w, h) in enumerate(levels)]
    if label:
        out.append(factory.wsi_instance(study, series, 256, 256, patient_id=patient_id, seed=90, image_type="LABEL",
                                        frame_of_reference=frame, instance_number=90))
    if overview:
        out.append(factory.wsi_instance(study, series, 512, 256, patient_id=patient_id, seed=91,
                                        image_type="OVERVIEW", frame_of_reference=frame, instance_number=91))
    return out


# -- the two archives ------------------------------------------------------------------------------

class ClientCredentialsIdp:
    """An identity provider's machine side on loopback: discovery, JWKS and the token endpoint
    of the OAuth 2.0 client credentials grant (one client), JWTs signed with RS256."""

    CLIENT, SECRET = "hospital-a", "s3cret-of-a"

    def __init__(self) -> None:
        import http.server
        import threading
        import urllib.parse

        import jwt
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.grants: list[dict] = []
        idp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _json(self, body, status=200):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                if self.path == "/.well-known/openid-configuration":
                    self._json({"issuer": idp.issuer, "jwks_uri": idp.issuer + "/jwks",
                                "token_endpoint": idp.issuer + "/token"})
                elif self.path == "/jwks":
                    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(idp.key.public_key()))
                    self._json({"keys": [{**jwk, "kid": "k1", "use": "sig", "alg": "RS256"}]})
                else:
                    self.send_error(404)

            def do_POST(self):  # noqa: N802
                form = dict(urllib.parse.parse_qsl(self.rfile.read(int(self.headers["Content-Length"])).decode()))
                if (self.path != "/token" or form.get("grant_type") != "client_credentials"
                        or form.get("client_id") != idp.CLIENT or form.get("client_secret") != idp.SECRET):
                    self._json({"error": "invalid_client"}, 401)
                    return
                idp.grants.append(form)
                now = int(time.time())
                claims = {"iss": idp.issuer, "aud": "pathpacs", "sub": "hospital-a", "iat": now, "exp": now + 300,
                          "groups": ["partners"]}
                self._json({"access_token": jwt.encode(claims, idp.key, algorithm="RS256", headers={"kid": "k1"}),
                            "token_type": "Bearer", "expires_in": 300})

            def log_message(self, *a):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()


@pytest.fixture(scope="module")
def idp():
    p = ClientCredentialsIdp()
    yield p
    p.httpd.shutdown()


@pytest.fixture(scope="module")
def c(root, idp):
    """A partner that takes OIDC access tokens only (the client credentials of hospital A)."""
    srv = start_pathpacs(root / "C", aet="HOSPC", config_text=(
        f'[auth]\nmode = "oidc"\n[auth.oidc]\nissuer = "{idp.issuer}"\naudience = "pathpacs"\n'
        'role_claim = "groups"\nrole_map = { partners = ["uploader", "viewer"] }\n'))
    yield srv
    srv.stop()

@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("consult")


@pytest.fixture(scope="module")
def b_token(root) -> str:
    res = run_cli("token", "create", "--role", "uploader", "--role", "viewer", "--name", "hospital A",
                  data=root / "B", check=True)
    return res.stdout.strip()


@pytest.fixture(scope="module")
def b_viewer_token(root, b_token) -> str:
    """A token of B that may read but not store."""
    return run_cli("token", "create", "--role", "viewer", "--name", "read only", data=root / "B", check=True).stdout.strip()


@pytest.fixture(scope="module")
def b(root, b_token, b_viewer_token):
    srv = start_pathpacs(root / "B", config_text='[auth]\nmode = "token"\n', aet="HOSPB")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def small_b(root, b_token):
    """A partner whose data is on a 4 MB tmpfs (root only)."""
    if os.geteuid() != 0:
        yield None
        return
    mnt = root / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        yield None
        return
    srv = None
    try:
        srv = start_pathpacs(mnt / "data", aet="HOSPFULL", log_path=root / "small.log")
        yield srv
    finally:
        if srv is not None:
            srv.stop()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


@pytest.fixture(scope="module")
def a(root, b, b_token, b_viewer_token, small_b, c, idp):
    full = (f'[partners.full]\ndicomweb = "{small_b.dicomweb_url}"\n' if small_b is not None else "")
    config = f'''[consultation]
name = "hospA"
institution = "Hospital A"
retry_max_seconds = 30
max_send_mbps = 80

[partners.b]
dicomweb = "{b.dicomweb_url}"
token = "{b_token}"
experts = [{{ id = "li-breast", name = "Li Ming", specialties = ["breast"] }}]

[partners.bad]
dicomweb = "{b.dicomweb_url}"
token = "{BAD_TOKEN}"

[partners.readonly]
dicomweb = "{b.dicomweb_url}"
token = "{b_viewer_token}"

[partners.c]
dicomweb = "{c.dicomweb_url}"
oidc = {{ issuer = "{idp.issuer}", client_id = "{idp.CLIENT}", client_secret = "{idp.SECRET}" }}

[partners.bfile]
dicomweb = "{b.dicomweb_url}"
token_file = "b.token"

{full}'''
    (root / "b.token").write_text(b_token + "\n")  # token_file: relative to the config file's directory
    srv = start_pathpacs(root / "A", config_text=config, aet="HOSPA")
    yield srv
    srv.stop()


def put_case(a, case: list[pydicom.Dataset]) -> dict[str, bytes]:
    parts = [_bytes(ds) for ds in case]
    r = stow(a.dicomweb_url, parts)
    assert r.status_code == 200, r.text
    return {ds.SOPInstanceUID: p for ds, p in zip(case, parts)}


def send(a, **body) -> dict:
    r = requests.post(a.http_url + "/api/consult/send", json=body, timeout=30)
    assert r.status_code == 201, (r.status_code, r.text)
    return r.json()


def job_of(a, job_id: str) -> dict:
    r = requests.get(f"{a.http_url}/api/consult/jobs/{job_id}", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def wait_final(a, job_id: str, timeout: float = 60) -> dict:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        job = job_of(a, job_id)
        if job["state"] in ("done", "failed", "cancelled"):
            return job
        time.sleep(0.2)
    raise AssertionError(f"job {job_id} still {job['state']} after {timeout} s: {job}")


def a_intact(a, originals: dict[str, bytes], case: list[pydicom.Dataset]) -> None:
    for ds in case:
        got = wado_bytes(a.dicomweb_url, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
        assert sha(got) == sha(originals[ds.SOPInstanceUID])


def stored_at(log_text: str) -> int:
    """Instances B's STOW handler stored (its summary line per request)."""
    return sum(int(n) for n in re.findall(r"pathpacs\.dicomweb\.stow: STOW from \S+: (\d+) stored", log_text))


# -- tests -------------------------------------------------------------------------------------

def test_frozen_case_arrives_byte_identical_with_the_request_sr_in_frozen_order(a, b, b_token):
    case = make_case()
    originals = put_case(a, case)
    study = case[0].StudyInstanceUID
    job = send(a, study=study, partner="b", expert="li-breast", question="Margins clear? 切缘阴性?",
               physician="Wang^Wei", priority="frozen")
    assert job["state"] in ("queued", "sending") and job["instances_total"] == len(case) + 1
    job = wait_final(a, job["id"])
    assert job["state"] == "done", job
    assert job["instances_sent"] == len(case) + 1 and job["verified"] == len(case) + 1
    assert job["bytes_sent"] >= sum(len(v) for v in originals.values())
    assert [i["state"] for i in job["items"]] == ["confirmed"] * (len(case) + 1)

    for ds in case:  # every instance byte-identical at B
        got = wado_bytes(b.dicomweb_url, study, ds.SeriesInstanceUID, ds.SOPInstanceUID, b_token)
        assert sha(got) == sha(originals[ds.SOPInstanceUID])

    # the request SR, in the case's study, says everything the request had
    auth = {"Authorization": f"Bearer {b_token}", "Accept": "application/dicom+json"}
    r = requests.get(f"{b.dicomweb_url}/studies/{study}/instances", params={"Modality": "SR"}, headers=auth, timeout=30)
    assert r.status_code == 200, r.text
    (sr,) = r.json()
    sr_series, sr_sop = sr["0020000E"]["Value"][0], sr["00080018"]["Value"][0]
    assert sr_sop == job["request_sr"] and sr_series not in {ds.SeriesInstanceUID for ds in case}
    meta = requests.get(f"{b.dicomweb_url}/studies/{study}/series/{sr_series}/instances/{sr_sop}/metadata",
                        headers=auth, timeout=30).json()[0]
    req = read_request(meta)
    assert req is not None
    assert (req.consultation_id, req.requester, req.institution, req.physician, req.expert, req.priority,
            req.question, req.study_uid) == (job["id"], "hospA", "Hospital A", "Wang^Wei", "li-breast", "frozen",
                                             "Margins clear? 切缘阴性?", study)
    assert meta["00100020"]["Value"] == ["PCONSULT"]  # the case's patient

    # frozen: the request first, then label and overview, then the levels smallest first
    from archive.index import open_index

    idx = open_index(b.data_dir / "index", readonly=True)
    try:
        received = {s: idx.instance(s).received for s in [sr_sop, *originals]}
    finally:
        idx.close()
    label, overview = case[3].SOPInstanceUID, case[4].SOPInstanceUID
    expected = [sr_sop, label, overview, case[2].SOPInstanceUID, case[1].SOPInstanceUID, case[0].SOPInstanceUID]
    times = [received[s] for s in expected]
    assert times == sorted(times), list(zip(expected, times))
    assert received[case[2].SOPInstanceUID] < received[case[0].SOPInstanceUID]
    assert [i["sop"] for i in job["items"]] == expected


def test_kill_b_mid_transfer_the_job_resumes_without_resending_confirmed_instances(a, b, b_token):
    levels = [(1024, 1024)] * 10  # 10 uncompressed levels of 3 MB: about 3 s at max_send_mbps = 80
    case = make_case(levels, ts=ELE, label=False, overview=False, patient_id="PKILL")
    originals = {ds.SOPInstanceUID: _bytes(ds) for ds in case}
    r = stow(a.dicomweb_url, list(originals.values()))
    assert r.status_code == 200, r.text
    before = len(b.log())
    job = send(a, study=case[0].StudyInstanceUID, partner="b")
    end = time.monotonic() + 30
    while True:
        snap = job_of(a, job["id"])
        if sum(i["state"] == "confirmed" for i in snap["items"]) >= 3:
            break
        assert time.monotonic() < end and snap["state"] in ("queued", "sending"), snap
        time.sleep(0.05)
    b.kill9()
    confirmed = {i["sop"] for i in job_of(a, job["id"])["items"] if i["state"] == "confirmed"}
    assert 3 <= len(confirmed) < len(case) + 1
    time.sleep(0.5)
    b.start()
    job = wait_final(a, job["id"])
    assert job["state"] == "done", job
    assert job["verified"] == len(case) + 1
    for item in job["items"]:
        if item["sop"] in confirmed:
            assert item["attempts"] == 1, item  # never sent again
    assert any(i["attempts"] > 1 for i in job["items"])  # the one cut by the kill was retried
    for ds in case:
        got = wado_bytes(b.dicomweb_url, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, b_token)
        assert sha(got) == sha(originals[ds.SOPInstanceUID])
    # B stored each instance once; the one in flight at the kill may have been committed before
    # B died, and is then received twice (the second time as a duplicate of the same bytes)
    assert stored_at(b.log()[before:]) in (len(case) + 1, len(case) + 2)


def test_bad_token_401_fails_the_job_with_the_reason_and_cli_exit_1(a, root):
    case = make_case(((512, 384),), label=False, overview=False, patient_id="P401")
    originals = put_case(a, case)
    res = run_cli("consult", "send", "--study", case[0].StudyInstanceUID, "--to", "bad", "--wait", "--quiet",
                  "--config", str(root / "A.toml"), data=root / "A", timeout=120)
    assert res.returncode == 1, (res.stdout, res.stderr)
    job_id = res.stdout.strip()
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert lines == [f"pathpacs: error: job {job_id} failed: partner bad refused our credentials (401): "
                     "invalid, expired or revoked token"], res.stderr
    job = job_of(a, job_id)
    assert job["state"] == "failed" and "refused our credentials (401)" in job["error"]
    assert job["instances_sent"] == 0
    a_intact(a, originals, case)

    listed = run_cli("consult", "list", "--config", str(root / "A.toml"), data=root / "A")
    assert listed.returncode == 0, listed.stderr
    row = [x for x in listed.stdout.splitlines() if x.startswith(job_id)]
    assert len(row) == 1 and " failed " in row[0] and "(401)" in row[0] and " bad " in row[0]
    as_json = json.loads(run_cli("consult", "list", "--json", "--config", str(root / "A.toml"),
                                 data=root / "A", check=True).stdout)
    mine = [j for j in as_json if j["id"] == job_id]
    assert mine and mine[0]["state"] == "failed" and "lease" not in mine[0]
    done = [j for j in as_json if j["state"] == "done"]
    assert done and all(j["finished"] and j["instances_sent"] == j["instances_total"] for j in done)


def test_a_token_without_the_store_right_403_fails_the_job(a):
    case = make_case(((512, 384),), label=False, overview=False, patient_id="P403")
    originals = put_case(a, case)
    job = wait_final(a, send(a, study=case[0].StudyInstanceUID, partner="readonly")["id"])
    assert job["state"] == "failed" and "(403)" in job["error"] and "store" in job["error"], job["error"]
    assert job["instances_sent"] == 0 and job["items"][0]["attempts"] == 1  # refused: not retried
    a_intact(a, originals, case)


def test_same_uid_other_content_409_fails_the_job_and_a_keeps_its_copy(a, b, b_token):
    case = make_case(((1024, 768),), label=True, overview=False, patient_id="P409")
    originals = put_case(a, case)
    other = factory.wsi_instance(case[0].StudyInstanceUID, case[0].SeriesInstanceUID, 1024, 768,
                                 sop=case[0].SOPInstanceUID, patient_id="P409", seed=77)
    r = stow(b.dicomweb_url, [_bytes(other)], b_token)
    assert r.status_code == 200, r.text
    job = wait_final(a, send(a, study=case[0].StudyInstanceUID, partner="b")["id"])
    assert job["state"] == "failed", job
    assert f"refused instance {case[0].SOPInstanceUID}" in job["error"] and "0x0111" in job["error"], job["error"]
    states = {i["sop"]: i["state"] for i in job["items"]}
    assert states[case[0].SOPInstanceUID] == "failed"
    assert states[job["request_sr"]] == "confirmed"  # sent first, before the conflict
    a_intact(a, originals, case)
    # B still holds its own version
    got = wado_bytes(b.dicomweb_url, case[0].StudyInstanceUID, case[0].SeriesInstanceUID, case[0].SOPInstanceUID,
                     b_token)
    assert sha(got) == sha(_bytes(other))
    # retry: the same refusal, and the confirmed request is not sent again
    r = run_cli("consult", "retry", job["id"], "--config", str(a.config), data=a.data_dir)
    assert r.returncode == 0, r.stderr
    job = wait_final(a, job["id"])
    assert job["state"] == "failed" and "0x0111" in job["error"]
    sr_item = [i for i in job["items"] if i["sop"] == job["request_sr"]][0]
    assert sr_item["attempts"] == 1


def test_full_disk_at_the_partner_fails_the_job_with_507(a, small_b):
    if small_b is None:
        pytest.skip("mounting a 4 MB tmpfs needs root")
    case = make_case(((1536, 1024),), ts=ELE, label=False, overview=False, patient_id="PFULL")
    originals = put_case(a, case)
    assert len(next(iter(originals.values()))) > 4 * MB
    job = wait_final(a, send(a, study=case[0].StudyInstanceUID, partner="full")["id"], timeout=90)
    assert job["state"] == "failed", job
    assert "disk space" in job["error"] and "507" in job["error"] and "gave up after" in job["error"], job["error"]
    a_intact(a, originals, case)


def test_bad_requests_get_clear_answers(a, root):
    case = make_case(((512, 384),), label=False, overview=False, patient_id="PBAD")
    put_case(a, case)
    study = case[0].StudyInstanceUID
    url = a.http_url + "/api/consult/send"
    r = requests.post(url, json={"study": study, "partner": "nope"}, timeout=30)
    assert r.status_code == 404 and "no partner 'nope'" in r.text
    r = requests.post(url, json={"study": study, "partner": "b", "expert": "nobody"}, timeout=30)
    assert r.status_code == 400 and "has no expert 'nobody' (experts: li-breast)" in r.text
    r = requests.post(url, json={"study": study, "partner": "b", "priority": "asap"}, timeout=30)
    assert r.status_code == 400 and "priority" in r.text
    r = requests.post(url, json={"study": "1.2.3.4", "partner": "b"}, timeout=30)
    assert r.status_code == 404 and "study 1.2.3.4 not found" in r.text
    r = requests.post(url, data=b"{not json", headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and "bad consultation request" in r.text
    r = requests.get(a.http_url + "/api/consult/jobs/nosuchjob", timeout=30)
    assert r.status_code == 404
    partners = requests.get(a.http_url + "/api/consult/partners", timeout=30).json()
    assert {p["name"] for p in partners} >= {"b", "bad"} and "token" not in json.dumps(partners)

    cfg = str(root / "A.toml")
    res = run_cli("consult", "send", "--study", study, "--to", "nope", "--config", cfg, data=root / "A")
    assert res.returncode == 2 and res.stderr.strip().startswith("pathpacs: error: no partner 'nope' (partners: ")
    assert len(res.stderr.strip().splitlines()) == 1
    res = run_cli("consult", "send", "--study", study, "--to", "b", "--priority", "asap", "--config", cfg,
                  data=root / "A")
    assert res.returncode == 2 and "invalid choice: 'asap'" in res.stderr
    res = run_cli("consult", "cancel", "nosuchjob", "--config", cfg, data=root / "A")
    assert res.returncode == 2 and "no consultation job 'nosuchjob'" in res.stderr
    # queued without --wait: the job id on stdout, and serve's worker sends it
    res = run_cli("consult", "send", "--study", study, "--to", "b", "--quiet", "--config", cfg, data=root / "A")
    assert res.returncode == 0, res.stderr
    job = wait_final(a, res.stdout.strip())
    assert job["state"] == "done" and job["verified"] == 2
    res = run_cli("consult", "cancel", job["id"], "--config", cfg, data=root / "A")
    assert res.returncode == 2 and f"job {job['id']} is done: nothing to cancel" in res.stderr


def test_send_for_consultation_from_the_study_browser(a, b, b_token, browser):
    case = make_case(((512, 384),), label=False, overview=False, patient_id="PPAGE")
    originals = put_case(a, case)
    study = case[0].StudyInstanceUID
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(a.http_url + "/")
    page.fill("#q-pid", "PPAGE")
    page.click("#go")
    button = page.locator(f'#studies tbody tr[data-study="{study}"] button.send-consult')
    button.wait_for(timeout=15000)
    assert button.inner_text() == "Send for consultation"
    button.click()
    dlg = page.locator("dialog.consult-dialog")
    dlg.locator("select[name=partner]").select_option("b")
    assert dlg.locator("select[name=expert] option").all_inner_texts() == ["(any)", "Li Ming (breast)"]
    dlg.locator("select[name=expert]").select_option("li-breast")
    dlg.locator("select[name=priority]").select_option("urgent")
    dlg.locator("textarea[name=question]").fill("Second opinion on grade")
    dlg.locator("button[type=submit]").click()
    page.wait_for_function("() => document.querySelector('dialog.consult-dialog').dataset.state === 'done'",
                           timeout=30000)
    job_id = dlg.get_attribute("data-job")
    assert f"Job {job_id}: done, 2/2 instances" in dlg.locator(".consult-status").inner_text()
    job = job_of(a, job_id)
    assert (job["study"], job["partner"], job["expert"], job["priority"], job["question"]) == \
        (study, "b", "li-breast", "urgent", "Second opinion on grade")
    got = wado_bytes(b.dicomweb_url, study, case[0].SeriesInstanceUID, case[0].SOPInstanceUID, b_token)
    assert sha(got) == sha(originals[case[0].SOPInstanceUID])
    assert errors == []


def test_deidentified_send_leaves_label_and_overview_out_and_copies_pixels_as_stored(a, b, b_token, root):
    case = make_case(patient_id="PDEID-7731")
    originals = put_case(a, case)
    study = case[0].StudyInstanceUID
    job = wait_final(a, send(a, study=study, partner="b", deidentify=True, question="Grade?")["id"])
    assert job["state"] == "done", job
    assert job["excluded"] == 2 and job["instances_total"] == 4 and job["verified"] == 4
    states = {i["sop"]: (i["state"], i.get("reason")) for i in job["items"]}
    assert states[case[3].SOPInstanceUID] == ("excluded", "LABEL image")
    assert states[case[4].SOPInstanceUID] == ("excluded", "OVERVIEW image")
    new_study = job["partner_study"]
    assert new_study and new_study != study

    auth = {"Authorization": f"Bearer {b_token}", "Accept": "application/dicom+json"}
    r = requests.get(f"{b.dicomweb_url}/studies", params={"StudyInstanceUID": study}, headers=auth, timeout=30)
    assert r.status_code == 200 and r.json() == []  # the original study UID never reached B
    r = requests.get(f"{b.dicomweb_url}/studies/{new_study}/instances", headers=auth, timeout=30)
    got = r.json()
    assert len(got) == 4
    by_class = {}
    for doc in got:
        by_class.setdefault(doc["00080016"]["Value"][0], []).append(doc)
    assert len(by_class[factory.WSI]) == 3 and len(by_class["1.2.840.10008.5.1.4.1.1.88.33"]) == 1
    orig_pixels = {ds.TotalPixelMatrixColumns: ds.PixelData for ds in case[:3]}
    for doc in by_class[factory.WSI]:
        raw = wado_bytes(b.dicomweb_url, new_study, doc["0020000E"]["Value"][0], doc["00080018"]["Value"][0], b_token)
        for identity in (b"PDEID-7731", b"Doe^Jane", study.encode(), b"ACC1"):
            assert identity not in raw
        ds = pydicom.dcmread(__import__("io").BytesIO(raw))
        assert "LABEL" not in ds.ImageType and "OVERVIEW" not in ds.ImageType
        assert ds.PixelData == orig_pixels[ds.TotalPixelMatrixColumns]  # frames as stored, byte for byte
    sr = by_class["1.2.840.10008.5.1.4.1.1.88.33"][0]
    meta = requests.get(f"{b.dicomweb_url}/studies/{new_study}/series/{sr['0020000E']['Value'][0]}/instances/"
                        f"{sr['00080018']['Value'][0]}/metadata", headers=auth, timeout=30).json()[0]
    req = read_request(meta)
    assert req is not None and (req.consultation_id, req.study_uid, req.question) == (job["id"], new_study, "Grade?")
    assert "PDEID-7731" not in json.dumps(meta) and "Doe^Jane" not in json.dumps(meta)
    a_intact(a, originals, case)

    # an instance the profile cannot de-identify refuses the whole send before anything leaves
    sc = factory.secondary_capture(root / "sc.dcm", study=study, patient_id="PDEID-7731")
    assert stow(a.dicomweb_url, [sc.read_bytes()]).status_code == 200
    r = requests.post(a.http_url + "/api/consult/send", json={"study": study, "partner": "b", "deidentify": True},
                      timeout=30)
    assert r.status_code == 400 and "cannot be de-identified" in r.text and "Burned In Annotation" in r.text


def test_kill_a_mid_transfer_the_restarted_sender_takes_the_job_over(a, b, b_token):
    case = make_case([(1024, 1024)] * 8, ts=ELE, label=False, overview=False, patient_id="PKILLA")
    originals = {ds.SOPInstanceUID: _bytes(ds) for ds in case}
    assert stow(a.dicomweb_url, list(originals.values())).status_code == 200
    before = len(b.log())
    job = send(a, study=case[0].StudyInstanceUID, partner="b")
    end = time.monotonic() + 30
    while sum(i["state"] == "confirmed" for i in job_of(a, job["id"])["items"]) < 3:
        assert time.monotonic() < end
        time.sleep(0.05)
    a.kill9()
    from archive.index import open_index

    idx = open_index(a.data_dir / "index", readonly=True)
    try:
        confirmed = {i["sop"] for _, i in idx.records("consult_items", job["id"] + "\0") if i["state"] == "confirmed"}
        assert idx.record("consult", job["id"])["state"] == "sending"
    finally:
        idx.close()
    a.start()
    job = wait_final(a, job["id"])
    assert job["state"] == "done" and job["verified"] == len(case) + 1, job
    assert all(i["attempts"] == 1 for i in job["items"] if i["sop"] in confirmed)
    for ds in case:
        got = wado_bytes(b.dicomweb_url, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, b_token)
        assert sha(got) == sha(originals[ds.SOPInstanceUID])
    assert stored_at(b.log()[before:]) in (len(case) + 1, len(case) + 2)


def test_token_file_is_read_at_each_request(a, b, b_token, root):
    case = make_case(((512, 384),), label=False, overview=False, patient_id="PFILE")
    put_case(a, case)
    job = wait_final(a, send(a, study=case[0].StudyInstanceUID, partner="bfile")["id"])
    assert job["state"] == "done" and job["verified"] == 2, job
    (root / "b.token").write_text(BAD_TOKEN + "\n")  # rotated to a token B does not know
    try:
        other = make_case(((512, 384),), label=False, overview=False, patient_id="PFILE2")
        put_case(a, other)
        job = wait_final(a, send(a, study=other[0].StudyInstanceUID, partner="bfile")["id"])
        assert job["state"] == "failed" and "refused our credentials (401)" in job["error"], job
    finally:
        (root / "b.token").write_text(b_token + "\n")


def test_cli_send_wait_runs_the_job_and_says_so(a, b, b_token, root):
    case = make_case(((512, 384),), label=False, overview=False, patient_id="PWAIT")
    originals = put_case(a, case)
    res = run_cli("consult", "send", "--study", case[0].StudyInstanceUID, "--to", "b", "--expert", "li-breast",
                  "--priority", "urgent", "--wait", "--config", str(root / "A.toml"), data=root / "A", timeout=120)
    assert res.returncode == 0, res.stderr
    job_id = res.stdout.strip()
    assert res.stderr.strip().splitlines()[-1].startswith(f"job {job_id} done: 2 instances, ")
    assert res.stderr.strip().endswith("to b (partner holds 2)")
    got = wado_bytes(b.dicomweb_url, case[0].StudyInstanceUID, case[0].SeriesInstanceUID, case[0].SOPInstanceUID,
                     b_token)
    assert sha(got) == sha(originals[case[0].SOPInstanceUID])


def test_oidc_client_credentials_fetch_a_token_once_and_send(a, c, idp):
    case = make_case(((512, 384),), label=True, overview=False, patient_id="POIDC")
    originals = put_case(a, case)
    job = wait_final(a, send(a, study=case[0].StudyInstanceUID, partner="c")["id"])
    assert job["state"] == "done" and job["verified"] == 3, job
    assert len(idp.grants) == 1  # one token for the whole job, cached until it nears expiry
    r = requests.post(idp.issuer + "/token", data={"grant_type": "client_credentials", "client_id": idp.CLIENT,
                                                   "client_secret": idp.SECRET}, timeout=10)
    token = r.json()["access_token"]
    for ds in case:
        got = wado_bytes(c.dicomweb_url, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, token)
        assert sha(got) == sha(originals[ds.SOPInstanceUID])
