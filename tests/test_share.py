"""Share links (archive.shares, dicomweb/share.py): a URL that opens one study in the built-in
viewer and whose token is a Bearer token for any DICOMweb client.

One real `pathpacs serve` (auth.mode = "token") for the module, two stored studies; links are
made with the CLI as an administrator would. The link is opened in Debian chromium, used with
dicomweb-client, its QR code decoded with zbarimg (Debian zbar-tools), expired, revoked.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import time

import pydicom
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom.encaps import generate_frames

import factory
from conftest import free_port, need, run_cli
from conformance.bench.peers import start_pathpacs
from test_consent import quick
from test_viewer import Page, assert_shows
from test_viewer_browser import _decoded_levels, complete_wsi

LEVELS = ((1024, 768), (512, 384))
EXPIRED = "This link has expired or was revoked."


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A token-mode archive holding study A (a two-level slide) and study B (another patient)."""
    root = tmp_path_factory.mktemp("share")
    a = factory.wsi_series(root / "a", levels=LEVELS, tile=256)
    complete_wsi(a)
    b = factory.wsi_series(root / "b", levels=((512, 384),), tile=256, patient_id="P9")
    port = free_port()
    config = (f'[auth]\nmode = "token"\n[audit]\nflush_seconds = 1\n'
              f'[consultation]\npublic_url = "http://127.0.0.1:{port}"\n')
    srv = start_pathpacs(root / "data", config_text=config, http_port=port)
    try:
        for folder in ("a", "b"):
            run_cli("import", "--quiet", str(root / folder), "--config", str(srv.config), data=srv.data_dir,
                    check=True)
        hdr = pydicom.dcmread(a[0], stop_before_pixels=True)
        yield {"srv": srv, "root": root, "a": a, "study": hdr.StudyInstanceUID, "series": hdr.SeriesInstanceUID,
               "sop": hdr.SOPInstanceUID, "other": pydicom.dcmread(b[0], stop_before_pixels=True).StudyInstanceUID}
    finally:
        srv.stop()


def cli(site, *args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, "--config", str(site["srv"].config), data=site["srv"].data_dir)


def share(site, *args: str) -> dict:
    res = quick(site, "share", "--json", *args)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def token_of(url: str) -> str:
    return url.split("#", 1)[1]


def client(site, token: str) -> DICOMwebClient:
    return DICOMwebClient(site["srv"].dicomweb_url, headers={"Authorization": f"Bearer {token}"})


def status_of(fn) -> int:
    try:
        fn()
    except requests.HTTPError as exc:
        return exc.response.status_code
    return 200


def frames_status(site, token: str) -> int:
    url = (f"{site['srv'].dicomweb_url}/studies/{site['study']}/series/{site['series']}/instances/"
           f"{site['sop']}/frames/1")
    return requests.get(url, headers={"Authorization": f"Bearer {token}", "Accept": "multipart/related; "
                                      "type=\"application/octet-stream\"; transfer-syntax=*"}, timeout=10).status_code


def wait_refused(site, token: str, limit: float = 10.0) -> float:
    """Seconds until the token is refused (401), asserting it happens within `limit`."""
    t0 = time.monotonic()
    while True:
        code = frames_status(site, token)
        elapsed = time.monotonic() - t0
        if code == 401:
            return elapsed
        assert code == 200, code
        assert elapsed < limit, f"still accepted {elapsed:.1f} s after revocation"
        time.sleep(0.25)


def test_link_opens_the_viewer_in_chromium_and_its_qr_decodes(site, browser, tmp_path):
    qr = tmp_path / "link.png"
    d = share(site, "--study", site["study"], "--expires", "1h", "--qr", str(qr))
    url = d["url"]
    assert url.startswith(f"{site['srv'].http_url}/share#pp_") and d["permissions"] == ["read"]
    assert d["study"] == site["study"] and d["state"] == "active" and not d["deidentify"]
    # the QR code, decoded by a real decoder, is the link
    need("zbarimg")
    out = subprocess.run([shutil.which("zbarimg"), "--quiet", "--raw", str(qr)], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == url, out

    p = Page(browser, site["srv"], tmp_path)  # a fresh browser: no login, only the link
    sent: list[dict] = []
    p.page.on("request", lambda r: sent.append({"url": r.url, **r.headers}) if r.url.startswith(p.base) else None)
    resp = p.page.goto(url)
    assert resp is not None and resp.status == 200
    p.page.wait_for_url("**/viewer?study=*", timeout=15000)
    p.wait_rendered()
    assert_shows(p, "share", _decoded_levels(site["a"]))
    p.clean()
    token = token_of(url)
    # the token never travels in a URL (nor a Referer): only in the Authorization header
    assert token not in p.page.url and all(token not in r["url"] and token not in r.get("referer", "") for r in sent)
    assert p.frames and all(h.get("authorization") == f"Bearer {token}" for _, _, h in p.frames)
    assert token not in site["srv"].log()


def test_token_is_a_bearer_token_for_dicomweb_client_in_its_study_only(site):
    token = token_of(share(site, "--study", site["study"], "--expires", "1h")["url"])
    c = client(site, token)
    found = c.search_for_studies()
    assert [s["0020000D"]["Value"][0] for s in found] == [site["study"]]
    assert c.search_for_studies(search_filters={"StudyInstanceUID": site["other"]}) == []
    series = c.search_for_series(site["study"])
    assert [s["0020000E"]["Value"][0] for s in series] == [site["series"]]
    assert len(c.retrieve_series_metadata(site["study"], site["series"])) == len(LEVELS)
    got = c.retrieve_instance_frames(site["study"], site["series"], site["sop"], [1, 2],
                                     media_types=(("application/octet-stream", "*"),))
    stored = pydicom.dcmread(site["a"][0])
    expected = list(generate_frames(stored.PixelData, number_of_frames=stored.NumberOfFrames))
    assert got == expected[:2]
    # another study: as if it did not exist
    assert status_of(lambda: c.search_for_series(site["other"])) == 404
    assert status_of(lambda: c.retrieve_study_metadata(site["other"])) == 404
    # view only: no whole instance, series or study; never STOW, DELETE or administration
    assert status_of(lambda: c.retrieve_instance(site["study"], site["series"], site["sop"])) == 403
    assert status_of(lambda: c.retrieve_study(site["study"])) == 403
    assert status_of(lambda: c.store_instances([stored])) == 403
    h = {"Authorization": f"Bearer {token}"}
    base = site["srv"].http_url
    assert requests.delete(f"{base}/dicomweb/studies/{site['study']}", headers=h, timeout=10).status_code == 403
    assert requests.get(f"{base}/api/tokens", headers=h, timeout=10).status_code == 403
    assert requests.get(f"{base}/api/audit", headers=h, timeout=10).status_code == 403
    me = requests.get(f"{base}/api/whoami", headers=h, timeout=10).json()
    assert me["via"] == "share" and me["studies"] == [site["study"]] and me["rights"] == ["read"]
    assert me["deidentified"] is False


def test_download_permission_retrieves_whole_instances(site):
    d = share(site, "--study", site["study"], "--permissions", "read,download")
    assert d["permissions"] == ["read", "download"]
    c = client(site, token_of(d["url"]))
    inst = c.retrieve_instance(site["study"], site["series"], site["sop"])
    assert inst.SOPInstanceUID == site["sop"]
    assert inst.PixelData == pydicom.dcmread(site["a"][0]).PixelData
    assert status_of(lambda: c.store_instances([inst])) == 403
    assert status_of(lambda: c.retrieve_study(site["other"])) == 404


def test_deidentify_sets_the_principals_flag(site):
    d = share(site, "--study", site["study"], "--deidentify")
    assert d["deidentify"] is True
    me = requests.get(f"{site['srv'].http_url}/api/whoami",
                      headers={"Authorization": f"Bearer {token_of(d['url'])}"}, timeout=10).json()
    assert me["deidentified"] is True and me["studies"] == [site["study"]]


def test_expired_link_answers_401_and_the_page_says_so(site, browser, tmp_path):
    d = share(site, "--study", site["study"], "--expires", "2s")
    token = token_of(d["url"])
    assert frames_status(site, token) == 200
    time.sleep(2.5)
    assert frames_status(site, token) == 401
    listed = {x["id"]: x for x in json.loads(quick(site, "share", "list", "--json", "--study", site["study"]).stdout)}
    assert listed[d["id"]]["state"] == "expired"
    p = Page(browser, site["srv"], tmp_path)
    p.page.goto(d["url"])
    p.page.wait_for_selector("#expired", state="visible", timeout=15000)
    assert EXPIRED in p.page.inner_text("body")
    assert "/share" in p.page.url and "#" not in p.page.url


def test_revoked_link_is_refused_within_10_seconds(site):
    d = share(site, "--study", site["study"])
    token = token_of(d["url"])
    assert frames_status(site, token) == 200  # cached by the server from now on
    res = cli(site, "share", "revoke", d["id"])
    assert res.returncode == 0, res.stderr
    assert wait_refused(site, token) <= 10
    listed = {x["id"]: x for x in json.loads(quick(site, "share", "list", "--json").stdout)}
    assert listed[d["id"]]["state"] == "revoked" and listed[d["id"]]["revoked"]
    assert quick(site, "share", "revoke", d["id"]).returncode == 0  # twice: the first time stays
    again = {x["id"]: x for x in json.loads(quick(site, "share", "list", "--json").stdout)}
    assert again[d["id"]]["revoked"] == listed[d["id"]]["revoked"]


def test_viewer_says_when_the_link_was_revoked_while_open(site, browser, tmp_path):
    d = share(site, "--study", site["study"])
    p = Page(browser, site["srv"], tmp_path)
    p.page.goto(d["url"])
    p.page.wait_for_url("**/viewer?study=*", timeout=15000)
    p.wait_rendered()
    assert cli(site, "share", "revoke", d["id"]).returncode == 0
    wait_refused(site, token_of(d["url"]))
    p.page.reload()
    p.page.wait_for_function("() => window.ppViewer && window.ppViewer.status === 'error'", timeout=30000)
    assert p.page.inner_text("#status") == EXPIRED


def test_creation_use_and_revocation_are_in_the_audit_trail(site):
    d = share(site, "--study", site["study"], "--name", "Dr Wang, tertiary")
    token = token_of(d["url"])
    c = client(site, token)
    c.search_for_series(site["study"])
    c.retrieve_instance_frames(site["study"], site["series"], site["sop"], [1],
                               media_types=(("application/octet-stream", "*"),))
    assert quick(site, "share", "revoke", d["id"]).returncode == 0
    user = f"share:{d['id']}"
    deadline = time.monotonic() + 15
    while True:  # reads are aggregated and flushed every audit.flush_seconds (1 s here)
        res = quick(site, "audit", "list", "--format", "json", "--study", site["study"])
        events = [json.loads(line) for line in res.stdout.splitlines() if line.strip()]
        mine = [e for e in events if any(p.get("user_id") == user for p in e.get("participants", []))
                or e.get("detail", {}).get("share") == d["id"]]
        kinds = {e["kind"] for e in mine}
        if {"share created", "queried", "retrieved", "share revoked"} <= kinds or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert {"share created", "queried", "retrieved", "share revoked"} <= kinds, kinds
    created = next(e for e in mine if e["kind"] == "share created")
    assert created["detail"]["permissions"] == "read" and created["detail"]["study"] == site["study"]
    read = next(e for e in mine if e["kind"] == "retrieved")
    assert read["detail"]["frames"] >= 1
    assert any(p.get("user_name") == "Dr Wang, tertiary" for p in read["participants"])
    table = cli(site, "audit", "list", "--user", user).stdout
    assert "retrieved" in table and "queried" in table


@pytest.mark.parametrize("args, message", [
    (["--permissions", "write"], "unknown permission 'write'"),
    (["--expires", "soon"], "--expires 'soon'"),
    (["--qr", "link.jpg"], "give a .png file name"),
])
def test_bad_share_arguments_are_one_line(site, args, message):
    res = cli(site, "share", "--study", site["study"], *args)
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, res.stderr
    assert res.stdout == ""


def test_unknown_study_and_link_are_one_line(site):
    res = cli(site, "share", "--study", "1.2.3.4.5")
    assert res.returncode == 2 and res.stderr.strip() == "pathpacs: error: study 1.2.3.4.5 is not in this archive"
    res = cli(site, "share", "revoke", "0123456789abcdef")
    assert res.returncode == 2 and "no share link 0123456789abcdef" in res.stderr
    res = cli(site, "share", "--study", "not a uid")
    assert res.returncode == 2 and "is not a valid UID" in res.stderr
