"""Authentication and authorization over HTTP, against a real `pathpacs serve` (issue 10).

Every DICOMweb and admin route refuses without credentials (401) and with a wrong role (403);
scoped tokens see only their studies; revocation and expiry reach every process within
`auth.cache_seconds`; OIDC JWTs are checked against a JWKS served by the test; the three
administrator roles do not combine; `none` refuses a non-loopback listener.
"""
from __future__ import annotations

import base64
import hashlib
import http.server
import io
import json
import os
import threading
import urllib.parse
import time
from pathlib import Path

import pydicom
import pytest
import requests
from hypothesis import HealthCheck, given, settings, strategies as st
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import factory
from conftest import Server, free_port, run_cli

KOS = "1.2.840.10008.5.1.4.1.1.88.59"


def token(data: Path, *args: str) -> str:
    res = run_cli("token", "create", *args, data=data, check=True)
    secret = res.stdout.strip()
    assert secret.startswith("pp_") and len(secret.split(".", 1)[1]) >= 43  # >= 256 bits, urlsafe
    return secret


def bearer(t: str) -> dict:
    return {"Authorization": f"Bearer {t}"}


def _multipart(files: list[bytes]) -> tuple[bytes, str]:
    b = "pathpacs-test-boundary"
    body = b"".join(b"--" + b.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + f + b"\r\n" for f in files)
    return body + b"--" + b.encode() + b"--\r\n", f'multipart/related; type="application/dicom"; boundary={b}'


def kos_bytes(study: str, referenced_sop: str, referenced_class: str) -> bytes:
    """A minimal Key Object Selection document in `study`: a derived object the `ai` role may store."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = KOS, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, generate_uid()
    ds.PatientID, ds.PatientName, ds.Modality = "AUTH-A", "Auth^A", "KO"
    ds.StudyDate, ds.ContentDate, ds.ContentTime, ds.SeriesNumber, ds.InstanceNumber = "20260102", "20260102", "1200", 9, 1
    ds.ValueType = "CONTAINER"
    code = Dataset()
    code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "113000", "DCM", "Of Interest"
    ds.ConceptNameCodeSequence = [code]
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = referenced_class, referenced_sop
    ds.ContentSequence = []
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = KOS, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Two studies (A and B), each a small WSI series."""
    root = tmp_path_factory.mktemp("authdata")
    a = factory.wsi_series(root / "a", patient_id="AUTH-A", accession="ACC-A", levels=((512, 512), (256, 256)))
    b = factory.wsi_series(root / "b", patient_id="AUTH-B", accession="ACC-B", levels=((512, 512), (256, 256)))
    info = {}
    for name, paths in (("a", a), ("b", b)):
        ds = pydicom.dcmread(paths[0], stop_before_pixels=True)
        info[name] = {"study": ds.StudyInstanceUID, "series": ds.SeriesInstanceUID, "sop": ds.SOPInstanceUID,
                      "sop_class": ds.SOPClassUID, "dir": root / name, "paths": paths}
    return info


@pytest.fixture(scope="module")
def srv(tmp_path_factory, corpus):
    tmp = tmp_path_factory.mktemp("authsrv")
    cfg = tmp / "config.toml"
    cfg.write_text('[auth]\nmode = "token"\ncache_seconds = 2\n[http]\nworkers = 2\n')
    s = Server(tmp / "data", free_port(), free_port(), config=cfg).start()
    for name in ("a", "b"):
        run_cli("import", "--quiet", str(corpus[name]["dir"]), data=s.data_dir, check=True)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def tokens(srv, corpus):
    d = srv.data_dir
    return {role: token(d, "--role", role, "--name", f"test {role}")
            for role in ("viewer", "uploader", "ai", "sysadmin", "secadmin", "auditor")} | {
        "scoped": token(d, "--role", "viewer", "--study", corpus["a"]["study"], "--name", "consultant"),
        "scoped_uploader": token(d, "--role", "uploader", "--study", corpus["a"]["study"]),
    }


def routes(c: dict) -> list[tuple[str, str]]:
    s, r, i = c["study"], c["series"], c["sop"]
    S, R, I = f"/dicomweb/studies/{s}", f"/series/{r}", f"/instances/{i}"
    gets = ["/dicomweb/studies", "/dicomweb/series", "/dicomweb/instances", S + "/series", S + "/instances",
            S + R + "/instances", S, S + "/metadata", S + R, S + R + "/metadata", S + R + I, S + R + I + "/metadata",
            S + R + I + "/frames/1", S + R + I + "/frames/1/rendered", S + R + I + "/frames", S + R + I + "/rendered",
            S + R + I + "/thumbnail", S + R + "/thumbnail", S + "/thumbnail", S + R + I + "/bulkdata/00282000"]
    return [("GET", p) for p in gets] + [("POST", "/dicomweb/studies"), ("POST", S)]


def _call(srv, method: str, path: str, headers: dict | None = None, **kw) -> requests.Response:
    h = dict(headers or {})
    if method == "POST" and "data" not in kw:
        body, ctype = _multipart([])
        kw["data"], h["Content-Type"] = body, ctype
    return requests.request(method, srv.http_url + path, headers=h, timeout=30, **kw)


def test_every_route_refuses_without_or_with_a_bad_credential(srv, corpus):
    for method, path in routes(corpus["a"]) + [("GET", "/api/tokens"), ("POST", "/api/tokens"),
                                               ("DELETE", "/api/tokens/0123456789abcdef"), ("GET", "/api/whoami"),
                                               ("DELETE", f"/dicomweb/studies/{corpus['a']['study']}")]:
        r = _call(srv, method, path)
        assert r.status_code == 401, (method, path, r.status_code, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer"), path
        assert "Bearer" in r.text, path
        for bad in ("pp_0123456789abcdef." + "A" * 43, "not-a-token", ""):
            r = _call(srv, method, path, {"Authorization": f"Bearer {bad}" if bad else "Basic dXNlcjpwdw=="})
            assert r.status_code == 401, (method, path, bad, r.status_code)
            assert 'error="invalid_token"' in r.headers["WWW-Authenticate"]


def test_every_route_refuses_a_wrong_role_with_403(srv, corpus, tokens):
    for method, path in routes(corpus["a"]):
        wrong = ("uploader", "auditor", "secadmin") if method == "GET" else ("viewer", "auditor", "secadmin")
        for role in wrong:
            r = _call(srv, method, path, bearer(tokens[role]))
            assert r.status_code == 403, (method, path, role, r.status_code, r.text)
            assert role in r.text and "may not" in r.text
    for role in ("viewer", "uploader", "ai", "sysadmin", "auditor"):
        assert _call(srv, "GET", "/api/tokens", bearer(tokens[role])).status_code == 403, role
    for role in ("viewer", "uploader", "secadmin", "auditor"):
        r = _call(srv, "DELETE", f"/dicomweb/studies/{corpus['a']['study']}", bearer(tokens[role]))
        assert r.status_code == 403, role


def test_the_right_role_is_served(srv, corpus, tokens):
    c = corpus["a"]
    meta = _call(srv, "GET", f"/dicomweb/studies/{c['study']}/series/{c['series']}/instances/{c['sop']}/metadata",
                 bearer(tokens["viewer"])).json()[0]
    icc = meta["00480105"]["Value"][0]["00282000"]["BulkDataURI"]
    for method, path in routes(c):
        if method != "GET":
            continue
        if "/bulkdata/" in path:
            path = icc[len(srv.http_url):]
        for role in ("viewer", "ai", "sysadmin"):
            r = _call(srv, method, path, bearer(tokens[role]))
            assert r.status_code in (200, 204), (path, role, r.status_code, r.text)
    r = _call(srv, "GET", f"/dicomweb/studies/{c['study']}/series/{c['series']}/instances/{c['sop']}/frames/1",
              bearer(tokens["viewer"]) | {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    ds = pydicom.dcmread(c["paths"][0])
    first = pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames))
    assert next(iter(first)) in r.content
    me = _call(srv, "GET", "/api/whoami", bearer(tokens["auditor"])).json()
    assert me["roles"] == ["auditor"] and me["rights"] == ["audit"] and me["via"] == "token"


def test_dicomweb_client_with_a_token(srv, corpus, tokens):
    from dicomweb_client.api import DICOMwebClient

    c = corpus["b"]
    client = DICOMwebClient(url=srv.dicomweb_url, headers=bearer(tokens["viewer"]))
    studies = {s["0020000D"]["Value"][0] for s in client.search_for_studies()}
    assert {corpus["a"]["study"], c["study"]} <= studies
    frames = client.retrieve_instance_frames(c["study"], c["series"], c["sop"], frame_numbers=[2],
                                             media_types=(("application/octet-stream", "*"),))
    ds = pydicom.dcmread(c["paths"][0])
    assert frames[0] == list(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))[1]
    with pytest.raises(requests.HTTPError) as err:
        DICOMwebClient(url=srv.dicomweb_url, headers=bearer(tokens["auditor"])).search_for_studies()
    assert err.value.response.status_code == 403


def test_a_scoped_token_sees_nothing_outside_its_studies(srv, corpus, tokens):
    a, b = corpus["a"], corpus["b"]
    h = bearer(tokens["scoped"]) | {"Accept": "application/dicom+json"}
    studies = _call(srv, "GET", "/dicomweb/studies", h).json()
    assert [s["0020000D"]["Value"][0] for s in studies] == [a["study"]]
    for level in ("series", "instances"):
        got = _call(srv, "GET", f"/dicomweb/{level}", h).json()
        assert got and {d["0020000D"]["Value"][0] for d in got} == {a["study"]}
    for query in (f"StudyInstanceUID={b['study']}", "PatientID=AUTH-B"):
        r = _call(srv, "GET", f"/dicomweb/studies?{query}", h)
        assert r.status_code == 200 and r.json() == [], query
    for method, path in routes(b):
        if method == "GET" and path.startswith(f"/dicomweb/studies/{b['study']}"):
            r = _call(srv, method, path, h)
            assert r.status_code == 404, (path, r.status_code)  # as if it did not exist
    assert _call(srv, "GET", f"/dicomweb/studies/{a['study']}/metadata", h).status_code == 200
    # a scoped uploader cannot store into another study
    body, ctype = _multipart([b["paths"][1].read_bytes()])
    r = _call(srv, "POST", "/dicomweb/studies", bearer(tokens["scoped_uploader"]) | {"Content-Type": ctype,
              "Accept": "application/dicom+json"}, data=body)
    assert r.status_code == 403, r.text
    failed = r.json()["00081198"]["Value"][0]
    assert failed["00081197"]["Value"] == [0x0124]


def test_ai_stores_derived_objects_only(srv, corpus, tokens, tmp_path):
    a = corpus["a"]
    h = bearer(tokens["ai"]) | {"Accept": "application/dicom+json"}
    sc = factory.secondary_capture(tmp_path / "sc.dcm", study=a["study"])
    body, ctype = _multipart([sc.read_bytes()])
    r = _call(srv, "POST", "/dicomweb/studies", h | {"Content-Type": ctype}, data=body)
    assert r.status_code == 403 and r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0x0124]
    kos = kos_bytes(a["study"], a["sop"], a["sop_class"])
    body, ctype = _multipart([kos])
    r = _call(srv, "POST", "/dicomweb/studies", h | {"Content-Type": ctype}, data=body)
    assert r.status_code == 200, r.text
    sop = r.json()["00081199"]["Value"][0]["00081155"]["Value"][0]
    got = _call(srv, "GET", f"/dicomweb/instances?SOPInstanceUID={sop}", h).json()
    assert got[0]["00080016"]["Value"] == [KOS]
    # the uploader stores images
    body, ctype = _multipart([sc.read_bytes()])
    r = _call(srv, "POST", "/dicomweb/studies", bearer(tokens["uploader"]) | {"Content-Type": ctype}, data=body)
    assert r.status_code == 200, r.text


def _fresh(srv, path: str, headers: dict) -> int:
    """One request on a new connection (HTTP workers share the port: the kernel spreads connections)."""
    with requests.Session() as s:
        return s.get(srv.http_url + path, headers={**headers, "Connection": "close"}, timeout=10).status_code


def test_revocation_reaches_every_process_within_10_s(srv, corpus, tokens):
    t = token(srv.data_dir, "--role", "viewer", "--name", "to revoke")
    tid = t[3:19]
    assert all(_fresh(srv, "/dicomweb/studies", bearer(t)) == 200 for _ in range(30))
    # two processes answer on one port (SO_REUSEPORT): 30 new connections reach both, save
    # with odds of 2**-29; the worker logs as "[worker]" (access lines are written in batches:
    # wait for the batch)
    deadline = time.monotonic() + 10
    while not ("2 worker(s)" in srv.log() and "[worker]" in srv.log()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "2 worker(s)" in srv.log() and "[worker]" in srv.log()
    run_cli("token", "revoke", tid, data=srv.data_dir, check=True)
    t0 = time.monotonic()
    while time.monotonic() - t0 < 12:
        codes = [_fresh(srv, "/dicomweb/studies", bearer(t)) for _ in range(30)]
        if set(codes) == {401}:
            break
        time.sleep(0.2)
    elapsed = time.monotonic() - t0
    assert elapsed < 10, elapsed
    time.sleep(0.5)
    assert {_fresh(srv, "/dicomweb/studies", bearer(t)) for _ in range(30)} == {401}
    listed = {x["id"]: x for x in json.loads(run_cli("token", "list", "--json", data=srv.data_dir, check=True).stdout)}
    assert listed[tid]["state"] == "revoked" and "sha256" not in listed[tid] and "secret" not in listed[tid]


def test_an_expired_token_is_refused(srv):
    t = token(srv.data_dir, "--role", "viewer", "--expires", "3s")
    assert _fresh(srv, "/dicomweb/studies", bearer(t)) == 200
    time.sleep(3.5)
    assert {_fresh(srv, "/dicomweb/studies", bearer(t)) for _ in range(10)} == {401}


def test_secadmin_manages_tokens_over_http(srv, tokens):
    h = bearer(tokens["secadmin"])
    r = requests.post(srv.http_url + "/api/tokens", json={"roles": ["viewer"], "expires": "1d", "name": "partner"},
                      headers=h, timeout=10)
    assert r.status_code == 201, r.text
    made = r.json()
    assert made["created_by"] == "test secadmin" and made["secret"].startswith("pp_")
    assert _fresh(srv, "/dicomweb/studies", bearer(made["secret"])) == 200
    listed = requests.get(srv.http_url + "/api/tokens", headers=h, timeout=10).json()
    assert made["id"] in {t["id"] for t in listed} and all("secret" not in t and "sha256" not in t for t in listed)
    r = requests.post(srv.http_url + "/api/tokens", json={"roles": ["sysadmin", "auditor"]}, headers=h, timeout=10)
    assert r.status_code == 400 and "separated duties" in r.text
    r = requests.post(srv.http_url + "/api/tokens", data=b"{not json", headers=h, timeout=10)
    assert r.status_code == 400
    assert requests.delete(srv.http_url + "/api/tokens/ffffffffffffffff", headers=h, timeout=10).status_code == 404
    r = requests.delete(srv.http_url + f"/api/tokens/{made['id']}", headers=h, timeout=10)
    assert r.status_code == 200 and r.json()["state"] == "revoked"
    deadline = time.monotonic() + 10
    while _fresh(srv, "/dicomweb/studies", bearer(made["secret"])) != 401:
        assert time.monotonic() < deadline
        time.sleep(0.2)


def test_administrator_roles_do_not_combine(tmp_path):
    data = tmp_path / "d"
    for pair in (("sysadmin", "auditor"), ("secadmin", "sysadmin"), ("auditor", "secadmin")):
        res = run_cli("token", "create", "--role", pair[0], "--role", pair[1], data=data)
        assert res.returncode == 2 and "separated duties" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    assert run_cli("token", "create", "--role", "viewer", "--role", "uploader", data=data).returncode == 0
    cfg = tmp_path / "c.toml"
    cfg.write_text("[auth]\nallow_combined_admin_roles = true\n")
    res = run_cli("token", "create", "--role", "sysadmin", "--role", "auditor", "--config", str(cfg), data=data)
    assert res.returncode == 0, res.stderr
    cfg.write_text('[auth]\nmode = "oidc"\n[auth.oidc]\nissuer = "http://x"\naudience = "y"\n'
                   'role_map = { ops = ["sysadmin", "secadmin"] }\n')
    res = run_cli("serve", "--config", str(cfg), data=data)
    assert res.returncode == 2 and "auth.oidc.role_map.ops" in res.stderr and "separated duties" in res.stderr


def test_unauthenticated_mode_refuses_a_non_loopback_listener(tmp_path):
    res = run_cli("serve", "--host", "0.0.0.0", "--dicom-port", str(free_port()), "--http-port", str(free_port()),
                  data=tmp_path / "d", timeout=60)
    assert res.returncode == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and 'auth.mode is "none"' in lines[0] and "allow_unauthenticated" in lines[0]
    cfg = tmp_path / "c.toml"
    cfg.write_text("[auth]\nallow_unauthenticated = true\n")
    s = Server(tmp_path / "d2", free_port(), free_port(), config=cfg, extra=["--host", "0.0.0.0"]).start()
    try:
        assert requests.get(s.dicomweb_url + "/studies", timeout=10).status_code in (200, 204)
        assert "authentication is OFF on 0.0.0.0" in s.log()
    finally:
        s.stop()


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(cred=st.text(alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7e), max_size=200),
       scheme=st.sampled_from(["Bearer", "bearer", "Basic", "Token", "", "Bearer  "]))
def test_fuzzed_credentials_are_always_401(srv, corpus, cred, scheme):
    r = requests.get(f"{srv.dicomweb_url}/studies/{corpus['a']['study']}/metadata",
                     headers={"Authorization": f"{scheme} {cred}".strip()}, timeout=10)
    assert r.status_code == 401, (scheme, cred, r.status_code)
    assert "Traceback" not in r.text


# -- OIDC -------------------------------------------------------------------------------------

class _Idp:
    """An identity provider's public side: discovery document and JWKS, served on loopback."""

    def __init__(self) -> None:
        from cryptography.hazmat.primitives.asymmetric import rsa

        self.keys = {"k1": rsa.generate_private_key(public_exponent=65537, key_size=2048)}
        idp = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _json(self, body, status=200):
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.send_header("Access-Control-Allow-Origin", "*")
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self):  # noqa: N802
                path, _, query = self.path.partition("?")
                if path == "/.well-known/openid-configuration":
                    self._json({"issuer": idp.issuer, "jwks_uri": idp.issuer + "/jwks",
                                "authorization_endpoint": idp.issuer + "/authorize",
                                "token_endpoint": idp.issuer + "/token"})
                elif path == "/jwks":
                    idp.jwks_fetches += 1
                    self._json(idp.jwks())
                elif path == "/authorize":  # a user already signed in at the hospital: straight back
                    q = dict(urllib.parse.parse_qsl(query))
                    code = base64.urlsafe_b64encode(os.urandom(12)).decode()
                    idp.codes[code] = q
                    self.send_response(302)
                    self.send_header("Location", q["redirect_uri"] + "?" + urllib.parse.urlencode(
                        {"code": code, "state": q["state"]}))
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                else:
                    self.send_error(404)

            def do_POST(self):  # noqa: N802
                form = dict(urllib.parse.parse_qsl(self.rfile.read(int(self.headers["Content-Length"])).decode()))
                asked = idp.codes.pop(form.get("code", ""), None)
                challenge = base64.urlsafe_b64encode(
                    hashlib.sha256(form.get("code_verifier", "").encode()).digest()).rstrip(b"=").decode()
                if (self.path != "/token" or asked is None or asked["code_challenge_method"] != "S256"
                        or asked["code_challenge"] != challenge or asked["client_id"] != form.get("client_id")
                        or asked["redirect_uri"] != form.get("redirect_uri")):
                    self._json({"error": "invalid_grant"}, 400)
                    return
                idp.logins.append(asked)
                self._json({"access_token": idp.token(sub="dr-zhang"), "token_type": "Bearer", "expires_in": 300})

            def log_message(self, *a):
                pass

        self.jwks_fetches = 0
        self.codes: dict[str, dict] = {}
        self.logins: list[dict] = []
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.issuer = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def jwks(self) -> dict:
        import jwt

        out = []
        for kid, key in self.keys.items():
            jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key()))
            out.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": out}

    def token(self, *, kid: str = "k1", key=None, aud: str = "pathpacs", iss: str | None = None,
              exp: float | None = None, groups=("pathologists",), sub: str = "dr-li", **extra) -> str:
        import jwt

        now = time.time()
        claims = {"iss": iss or self.issuer, "aud": aud, "sub": sub, "iat": int(now),
                  "exp": int(exp if exp is not None else now + 300), "groups": list(groups),
                  "preferred_username": f"{sub}@hospital", **extra}
        return jwt.encode(claims, key or self.keys[kid], algorithm="RS256", headers={"kid": kid})


@pytest.fixture(scope="module")
def idp():
    p = _Idp()
    yield p
    p.httpd.shutdown()


@pytest.fixture(scope="module")
def oidc_srv(tmp_path_factory, corpus, idp):
    tmp = tmp_path_factory.mktemp("oidcsrv")
    cfg = tmp / "config.toml"
    cfg.write_text(f'[auth]\nmode = "oidc"\ncache_seconds = 1\n[auth.oidc]\nissuer = "{idp.issuer}"\n'
                   'audience = "pathpacs"\nrole_claim = "groups"\njwks_cooldown_seconds = 0\n'
                   'client_id = "pathpacs-pages"\n'
                   'role_map = { pathologists = ["viewer"], lab = ["uploader"], ops = ["sysadmin"], '
                   'audit = ["auditor"] }\n')
    s = Server(tmp / "data", free_port(), free_port(), config=cfg).start()
    run_cli("import", "--quiet", str(corpus["a"]["dir"]), data=s.data_dir, check=True)
    yield s
    s.stop()


def test_oidc_tokens_are_checked_against_the_issuer_jwks(oidc_srv, idp, corpus):
    from cryptography.hazmat.primitives.asymmetric import rsa

    url = f"{oidc_srv.dicomweb_url}/studies"
    r = requests.get(url, headers=bearer(idp.token()), timeout=10)
    assert r.status_code == 200 and r.json()[0]["0020000D"]["Value"] == [corpus["a"]["study"]]
    me = requests.get(oidc_srv.http_url + "/api/whoami", headers=bearer(idp.token()), timeout=10).json()
    assert me == {**me, "id": "oidc:dr-li", "name": "dr-li@hospital", "roles": ["viewer"], "via": "oidc"}
    cases = {
        "expired": idp.token(exp=time.time() - 120),
        "another audience": idp.token(aud="someone-else"),
        "another issuer": idp.token(iss="http://evil.example"),
        "does not publish": idp.token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048), kid="k9"),
        "invalid token": idp.token(key=rsa.generate_private_key(public_exponent=65537, key_size=2048)),
    }
    for reason, tok in cases.items():
        r = requests.get(url, headers=bearer(tok), timeout=10)
        assert r.status_code == 401 and reason in r.text, (reason, r.status_code, r.text)
    header = base64.urlsafe_b64encode(b'{"alg":"none","typ":"JWT"}').rstrip(b"=").decode()
    payload = base64.urlsafe_b64encode(json.dumps({"iss": idp.issuer, "aud": "pathpacs", "sub": "x",
                                                   "exp": int(time.time()) + 60, "groups": ["ops"]}).encode()
                                       ).rstrip(b"=").decode()
    assert requests.get(url, headers=bearer(f"{header}.{payload}."), timeout=10).status_code == 401
    # a role the claim does not grant: 403; an unmapped group: no role at all
    assert requests.get(url, headers=bearer(idp.token(groups=["lab"])), timeout=10).status_code == 403
    assert requests.get(url, headers=bearer(idp.token(groups=["visitors"])), timeout=10).status_code == 403
    # separated duties hold for identity-provider roles too
    r = requests.get(url, headers=bearer(idp.token(groups=["ops", "audit"], sub="both")), timeout=10)
    assert r.status_code == 403 and "separated duties" in r.text


def test_oidc_key_rotation_is_picked_up(oidc_srv, idp):
    from cryptography.hazmat.primitives.asymmetric import rsa

    url = f"{oidc_srv.dicomweb_url}/studies"
    before = idp.jwks_fetches
    idp.keys["k2"] = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    r = requests.get(url, headers=bearer(idp.token(kid="k2", sub="rotated")), timeout=10)
    assert r.status_code == 200, r.text
    assert idp.jwks_fetches > before  # the unknown key id made the server refetch the JWKS


def test_api_tokens_work_in_oidc_mode(oidc_srv):
    t = token(oidc_srv.data_dir, "--role", "viewer")
    assert requests.get(f"{oidc_srv.dicomweb_url}/studies", headers=bearer(t), timeout=10).status_code == 200


def test_pages_log_in_through_the_identity_provider(oidc_srv, idp, browser, corpus):
    """Authorization code + PKCE from the page: to the issuer and back, the code exchanged for an
    access token the archive then accepts; the study list follows."""
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(oidc_srv.http_url + "/")
    page.wait_for_selector("#oidc:not([hidden])", timeout=15000)
    page.click("#oidc")
    page.wait_for_selector("#studies tbody tr", timeout=15000)
    assert "ACC-A" in page.inner_text("#studies")
    assert "dr-zhang@hospital (viewer)" in page.inner_text("#who")
    assert page.url == oidc_srv.http_url + "/"  # the code is not left in the address bar
    asked = idp.logins[-1]
    assert asked["client_id"] == "pathpacs-pages" and asked["code_challenge_method"] == "S256"
    assert asked["redirect_uri"] == oidc_srv.http_url + "/" and asked["scope"] == "openid profile"
    # a forged return (state not issued by this page) is refused
    page.evaluate("() => sessionStorage.clear()")
    page.goto(oidc_srv.http_url + "/?code=forged&state=forged")
    page.wait_for_function("() => document.getElementById('loginerr').textContent.includes('did not match')",
                           timeout=15000)
    assert "ACC-A" not in page.content()
    assert errors == []


def test_logins_refusals_and_token_changes_are_audited_and_only_the_auditor_reads_them(srv, corpus, tokens):
    h = bearer(tokens["secadmin"])
    made = requests.post(srv.http_url + "/api/tokens", json={"roles": ["viewer"], "name": "audited"},
                         headers=h, timeout=10).json()
    assert _fresh(srv, "/dicomweb/studies", bearer(made["secret"])) == 200
    requests.delete(srv.http_url + f"/api/tokens/{made['id']}", headers=h, timeout=10)
    assert _fresh(srv, "/dicomweb/studies", {"Authorization": "Bearer pp_0123456789abcdef." + "B" * 43}) == 401
    assert _fresh(srv, "/dicomweb/studies", bearer(tokens["uploader"])) == 403
    for role in ("viewer", "sysadmin", "secadmin"):
        assert _fresh(srv, "/api/audit", bearer(tokens[role])) == 403, role
    deadline = time.monotonic() + 30  # records are written off the request path
    while True:
        r = requests.get(srv.http_url + "/api/audit", params={"limit": "10000"}, headers=bearer(tokens["auditor"]),
                         timeout=30)
        assert r.status_code == 200, r.text
        rows = r.json()
        kinds = {(x["kind"], x.get("detail", {}).get("what") or x.get("detail", {}).get("success")) for x in rows}
        if {("token created", "token created"), ("token revoked", "token revoked"), ("login", True),
                ("login", False), ("forbidden", "forbidden")} <= kinds:
            break
        assert time.monotonic() < deadline, sorted(map(str, kinds))
        time.sleep(0.5)
    created = next(x for x in rows if x["kind"] == "token created" and made["id"] in json.dumps(x))
    assert "secret" not in json.dumps(created) and made["secret"] not in json.dumps(rows)
    assert any(x["kind"] == "login" and x["detail"]["success"] and "audited" in json.dumps(x) for x in rows)
    r = requests.get(srv.http_url + "/api/audit", params={"since": "yesterday-ish"},
                     headers=bearer(tokens["auditor"]), timeout=10)
    assert r.status_code == 400 and "since" in r.text
    # the CLI's verify agrees the chain is intact
    res = run_cli("audit", "verify", data=srv.data_dir)
    assert res.returncode == 0 and "chain intact" in res.stdout + res.stderr
