"""Bounded property-based fuzzing of the HTTP side against one real `pathpacs serve` (loopback).

Random and mutated input to QIDO parameters, Accept headers, frame lists, rendered/thumbnail
parameters and STOW bodies. For every case: no 500 (nor any 5xx: the server holds no damaged
data), no traceback in the answer, the process alive. At the end: RSS under 1 GB, no
traceback in the server log, nothing left in staging. The server holds one small WSI series
(two levels) and one SC image, with `auth.mode = "token"` (every request carries a valid token,
so the auth middleware runs on every fuzzed request). Budget: well under 90 s on 2 cores.
"""
from __future__ import annotations

import http.client
import json
import string
import urllib.parse
from pathlib import Path

import psutil
import pydicom
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

import factory
from conftest import Server, free_port, run_cli

FUZZ = settings(max_examples=300, deadline=None, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
MB = 1 << 20


# -- server and data ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def srv(tmp_path_factory) -> Server:
    root = tmp_path_factory.mktemp("fuzz")
    cfg = root / "config.toml"
    cfg.write_text('[auth]\nmode = "token"\n')  # the auth middleware sees every fuzzed request too
    s = Server(root / "data", free_port(), free_port(), config=cfg).start()
    s.token = run_cli("token", "create", "--role", "viewer", "--role", "uploader", "--name", "fuzz",  # type: ignore[attr-defined]
                      data=s.data_dir, check=True).stdout.strip()
    study, series = generate_uid(), generate_uid()
    levels = factory.wsi_series(root / "wsi", study=study, series=series, levels=((512, 384), (256, 192)),
                                patient_id="PF1", patient_name="Fuzz^Fiona")
    sc = factory.secondary_capture(root / "sc.dcm", patient_id="PF2", patient_name="Other^Otto")
    odd = factory.secondary_capture(root / "odd.dcm", patient_id="PF3\x01", study_description="x\x0b\x7f<&>\"")
    ds = pydicom.dcmread(odd)  # values XML cannot hold as-is, UTF-8 names
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PatientName = "Ödön\x1b^Ünal\U0001f600"
    ds.save_as(odd, enforce_file_format=True)
    files = levels + [sc, odd]
    body, ct = _multipart([f.read_bytes() for f in files], "fuzzboundary")
    status, _, resp = request(s, "POST", "/dicomweb/studies", [("Content-Type", ct)], body)
    assert status == 200, resp
    s.files = {"levels": levels, "sc": sc}  # type: ignore[attr-defined]
    yield s
    s.stop()


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _inst(srv: Server, path: Path) -> str:
    st_, se, sop = _uids(path)
    return f"/dicomweb/studies/{st_}/series/{se}/instances/{sop}"


def _multipart(parts: list[bytes], bnd: str) -> tuple[bytes, str]:
    b = bnd.encode()
    body = b"".join(b"--" + b + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    return body + b"--" + b + b"--\r\n", f'multipart/related; type="application/dicom"; boundary={bnd}'


def request(srv: Server, method: str, path: str, headers: list[tuple[str, str | bytes]] = (),
            body: bytes | None = None) -> tuple[int, dict[str, str], bytes]:
    """One request on a fresh connection; header values may be raw bytes."""
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=60)
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        if getattr(srv, "token", None) and not any(k.lower() == "authorization" for k, _ in headers):
            conn.putheader("Authorization", f"Bearer {srv.token}")
        for k, v in headers:
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def check(srv: Server, status: int, body: bytes, what) -> None:
    assert srv.proc.poll() is None, f"server died on {what!r}\n{srv.log()[-3000:]}"
    assert status < 500, (status, what, body[:300])
    assert b"Traceback" not in body, (what, body[:300])


# -- QIDO parameters ---------------------------------------------------------------------------

KEYWORDS = ["PatientName", "PatientID", "StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy",
            "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "Modality", "StudyDescription",
            "SeriesNumber", "InstanceNumber", "ReferringPhysicianName", "PatientBirthDate", "SOPClassUID",
            "SeriesDate", "AcquisitionDateTime", "ImageType", "NumberOfFrames", "TotalPixelMatrixColumns",
            "OpticalPathSequence.OpticalPathIdentifier", "ReferencedSeriesSequence.SeriesInstanceUID",
            "OpticalPathSequence", "PixelData", "00100010", "0020000D", "00080020", "0008103E", "00480006",
            "(0010,0020)", "0010,0010", "7FE00010", "FFFFFFFF", "00000000", "limit", "offset", "fuzzymatching",
            "includefield", "orderby", "LIMIT", "Offset", "IncludeField", "FuzzyMatching"]
VALUES = ["", "*", "?", "**", "-", "--", "20260102", "2026-", "-20261231", "20260101-20260102", "2026",
          "101500", "10:15", "101500.123456", "20260102101500+0100", "1.2.3", "1.2.3,1.2.4", "1.2.3\\1.2.4",
          "9" * 25, "-1", "0", "1", "1e9", "all", "true", "false", "maybe", "\u0661\u0662", "1_0", "SM", "sm",
          "Fuzz^Fiona", "fuzz*", "*" * 30 + "x", "?" * 64, "Doe^Jane^^^", "=", "\\", ",", "9223372036854775807",
          "1" + "0" * 30, "NaN", "inf", "\x00", "\ufffd", "\U0001f600", "all,PatientName"]
key_st = st.one_of(st.sampled_from(KEYWORDS), st.sampled_from(KEYWORDS), st.sampled_from(KEYWORDS),
                   st.text(max_size=20))  # mostly real keys: unknown ones stop at the first 400
value_st = st.one_of(st.sampled_from(VALUES), st.text(max_size=30),
                     st.text(alphabet="*?abAB^ -0123456789.,\\", max_size=40),
                     st.integers(-(2**70), 2**70).map(str), st.text(min_size=1000, max_size=1100))


@FUZZ
@given(data=st.data(), params=st.lists(st.tuples(key_st, value_st), max_size=6),
       xml=st.booleans())
def test_fuzz_qido_parameters(srv, data, params, xml):
    st_, se, _ = _uids(srv.files["levels"][0])
    path = data.draw(st.sampled_from([
        "/dicomweb/studies", "/dicomweb/series", "/dicomweb/instances", f"/dicomweb/studies/{st_}/series",
        f"/dicomweb/studies/{st_}/instances", f"/dicomweb/studies/{st_}/series/{se}/instances",
        "/dicomweb/studies/1.2.3/series", f"/dicomweb/studies/{st_}/series/1.2.3/instances"]))
    query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
    headers = [("Accept", 'multipart/related; type="application/dicom+xml"')] if xml else []
    status, hdrs, body = request(srv, "GET", f"{path}?{query}", headers)
    check(srv, status, body, (path, params))
    if status == 200 and not xml:
        assert isinstance(json.loads(body), list)
    if status == 200 and xml:
        _well_formed_parts(hdrs, body)


def _well_formed_parts(hdrs: dict, body: bytes) -> None:
    import xml.etree.ElementTree as ET

    bnd = hdrs["content-type"].split("boundary=")[1].strip('"').encode()
    for chunk in body.split(b"--" + bnd)[1:-1]:
        ET.fromstring(chunk.partition(b"\r\n\r\n")[2][:-2])


segment = st.one_of(st.text(max_size=20), st.text(alphabet="0123456789.", min_size=1, max_size=80),
                    st.text(alphabet="0123456789.", min_size=500, max_size=700), st.sampled_from(["..", ".", "%", "1.2.3"]))


@FUZZ
@given(data=st.data(), a=segment, b=segment, c=segment)
def test_fuzz_resource_paths(srv, data, a, b, c):
    """Random study/series/instance UIDs (long, non-ASCII, dots only...) in every WADO route."""
    st_, se, sop = _uids(srv.files["levels"][0])
    a, b, c = (data.draw(st.sampled_from([x, real])) for x, real in ((a, st_), (b, se), (c, sop)))
    q = [urllib.parse.quote(x, safe="") or "x" for x in (a, b, c)]
    tail = data.draw(st.sampled_from(["", "/metadata", "/frames/1", "/frames", "/rendered", "/thumbnail",
                                      "/bulkdata/00480105/0/00282000", "/frames/1/rendered"]))
    level = data.draw(st.sampled_from([1, 2, 3]))
    path = "/dicomweb/studies/" + "/".join(p for p in (q[0], level > 1 and f"series/{q[1]}",
                                                        level > 2 and f"instances/{q[2]}") if p)
    if level < 3 and tail not in ("", "/metadata", "/thumbnail"):
        tail = data.draw(st.sampled_from(["", "/metadata", "/thumbnail", "/series", "/instances"]))
    status, _, body = request(srv, "GET", path + tail)
    check(srv, status, body, path + tail)


RAW_QUERY = st.text(alphabet=string.ascii_letters + string.digits + "%=&*?+,.-_~!$'()/:;@[]^\\|{}\"<>`", max_size=80)


@FUZZ
@given(raw=RAW_QUERY)
def test_fuzz_qido_raw_query_strings(srv, raw):
    """Query strings as sent, not as a client library would encode them: bad percent
    escapes (%zz, %FF, a lone %), '+', repeated and empty names."""
    status, _, body = request(srv, "GET", "/dicomweb/studies?" + raw)
    check(srv, status, body, raw)


# -- Accept headers -----------------------------------------------------------------------------

TYPES = ["*/*", "application/*", "image/*", "application/dicom", "application/dicom+json", "application/dicom+xml",
         "application/json", "multipart/related", "image/jpeg", "image/png", "image/gif", "image/jp2", "image/jls",
         "image/x-jls", "application/octet-stream", "text/html", "*", "", "image/", "/", "a/b/c", "IMAGE/JPEG"]
TS = ["*", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2",
      "1.2.840.10008.1.2.5", "", "x", "1.2.840.10008.1.2.1.99"]
QS = ["0", "1", "0.5", "0.001", "1.000", "-1", "2", "abc", "", "1.0001", ".5", "0.", "1e-3", "0.0000", "NaN"]
PRINTABLE = "".join(chr(c) for c in range(0x20, 0x7f))
token = st.text(alphabet=string.ascii_letters + string.digits + "!#$%&'*+-.^_`|~/", max_size=12)
param_st = st.one_of(
    st.tuples(st.just("q"), st.one_of(st.sampled_from(QS), st.floats(allow_nan=True).map(str))),
    st.tuples(st.just("type"), st.sampled_from(TYPES).map(lambda t: f'"{t}"') | st.sampled_from(TYPES)),
    st.tuples(st.sampled_from(["transfer-syntax", "Transfer-Syntax"]), st.sampled_from(TS)),
    st.tuples(token, st.one_of(token, st.text(alphabet=PRINTABLE, max_size=10).map(lambda t: f'"{t}"'))),
)
range_st = st.builds(lambda t, ps, sp: t + "".join(f";{sp}{k}={v}" for k, v in ps),
                     st.one_of(st.sampled_from(TYPES), token), st.lists(param_st, max_size=4),
                     st.sampled_from(["", " ", "  "]))
accept_st = st.one_of(
    st.lists(range_st, min_size=1, max_size=5).map(", ".join),
    st.lists(range_st, min_size=1, max_size=5).map(", ".join),
    st.lists(range_st, min_size=60, max_size=70).map(",".join),  # around MAX_MEDIA_RANGES
    st.text(alphabet=PRINTABLE + "\t", max_size=60),
    st.text(max_size=60).map(lambda s: s.encode("utf-8", "surrogatepass")),  # non-ASCII: 400
    st.binary(max_size=60),
).map(lambda v: (v if isinstance(v, bytes) else v.encode("utf-8")).replace(b"\r", b"").replace(b"\n", b""))


def _endpoints(srv: Server) -> list[tuple[str, str]]:
    lvl, small = srv.files["levels"]
    st_, se, _ = _uids(lvl)
    i, s = _inst(srv, lvl), _inst(srv, srv.files["sc"])
    return [("GET", "/dicomweb/studies"), ("GET", f"/dicomweb/studies/{st_}/series/{se}/instances"),
            ("GET", f"{i}/frames/1"), ("GET", f"{i}/frames/2,1"), ("GET", f"{i}/frames"), ("GET", f"{s}/frames/1"),
            ("GET", f"{i}/metadata"), ("GET", f"/dicomweb/studies/{st_}/metadata"), ("GET", i), ("GET", s),
            ("GET", f"/dicomweb/studies/{st_}/series/{se}"), ("GET", f"{_inst(srv, small)}/rendered"),
            ("GET", f"{s}/rendered"), ("GET", f"{i}/frames/1/rendered"), ("GET", f"/dicomweb/studies/{st_}/thumbnail"),
            ("GET", f"{i}/bulkdata/00480105/0/00282000"), ("POST", "/dicomweb/studies"), ("GET", "/")]


@FUZZ
@given(data=st.data(), accept=accept_st)
def test_fuzz_accept_headers(srv, data, accept):
    method, path = data.draw(st.sampled_from(_endpoints(srv)))
    headers: list[tuple[str, str | bytes]] = [("Accept", accept)]
    body = None
    if method == "POST":
        body, ct = _multipart([srv.files["sc"].read_bytes()], "acceptfuzz")
        headers.append(("Content-Type", ct))
    status, _, resp = request(srv, method, path, headers, body)
    check(srv, status, resp, (path, accept))


# -- frame lists ---------------------------------------------------------------------------------

frames_st = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="0123456789,-_ +.\u0661\u0662\u0966e", min_size=1, max_size=40),
    st.lists(st.integers(-5, 2**40), min_size=1, max_size=20).map(lambda xs: ",".join(map(str, xs))),
    st.lists(st.integers(1, 4), min_size=1020, max_size=1030).map(lambda xs: ",".join(map(str, xs))),
    st.lists(st.integers(0, 13), min_size=1, max_size=12).map(lambda xs: ",".join(map(str, xs))),
)


@FUZZ
@given(data=st.data(), frames=frames_st)
def test_fuzz_frame_lists(srv, data, frames):
    base = data.draw(st.sampled_from([_inst(srv, srv.files["levels"][0]), _inst(srv, srv.files["sc"])]))
    tail = data.draw(st.sampled_from(["", "/rendered"]))
    accept = data.draw(st.sampled_from([None, "*/*", 'multipart/related; type="application/octet-stream"; transfer-syntax=*',
                                        "image/jpeg", 'multipart/related; type="image/jpeg"']))
    quoted = urllib.parse.quote(frames, safe=data.draw(st.sampled_from(["", ",", ",+-_."])))
    assume(quoted)
    status, _, body = request(srv, "GET", f"{base}/frames/{quoted}{tail}", [("Accept", accept)] if accept else [])
    check(srv, status, body, frames[:80])
    if status == 200 and tail == "":
        nums = [int(x) for x in frames.split(",")]
        assert all(1 <= n <= 12 for n in nums) and frames.isascii()


# -- rendered / thumbnail parameters ----------------------------------------------------------------

dim = st.one_of(st.integers(0, 600), st.sampled_from([0, 1, 2, 4096, 4097, 99999999, 10**12, -1]))
viewport_st = st.one_of(
    st.lists(dim, min_size=0, max_size=8).map(lambda xs: ",".join(map(str, xs))),
    st.tuples(st.integers(1, 300), st.integers(1, 300), dim, dim, dim, dim).map(lambda xs: ",".join(map(str, xs))),
    st.text(alphabet="0123456789,- .x\u0661", max_size=20),
    st.text(max_size=15),
)
render_params = st.lists(st.one_of(
    st.tuples(st.just("viewport"), viewport_st),
    st.tuples(st.just("quality"), st.one_of(st.integers(-5, 200).map(str), st.text(max_size=6))),
    st.tuples(st.just("iccprofile"), st.sampled_from(["yes", "no", "YES", "maybe", "", "srgb", "adobergb"])),
    st.tuples(st.sampled_from(["window", "annotation", "charset", "VIEWPORT", "Quality", "foo", "viewport "]),
              st.text(max_size=10)),
    st.tuples(st.text(max_size=8), st.text(max_size=8)),
), max_size=4)


@FUZZ
@given(data=st.data(), params=render_params)
def test_fuzz_rendered_and_thumbnail_parameters(srv, data, params):
    lvl, small = srv.files["levels"]
    st_, se, _ = _uids(lvl)
    path = data.draw(st.sampled_from([
        f"{_inst(srv, small)}/rendered", f"{_inst(srv, lvl)}/frames/1/rendered", f"{_inst(srv, srv.files['sc'])}/rendered",
        f"{_inst(srv, lvl)}/rendered", f"{_inst(srv, small)}/thumbnail", f"/dicomweb/studies/{st_}/series/{se}/thumbnail",
        f"/dicomweb/studies/{st_}/thumbnail"]))
    accept = data.draw(st.sampled_from([None, "image/png", "image/jpeg", "*/*", "image/gif", "image/png;q=0.5, image/jpeg"]))
    query = urllib.parse.urlencode(params, quote_via=urllib.parse.quote)
    status, hdrs, body = request(srv, "GET", f"{path}?{query}", [("Accept", accept)] if accept else [])
    check(srv, status, body, (path, params))
    if status == 200:
        assert hdrs["content-type"] in ("image/jpeg", "image/png", "image/gif")


# -- STOW bodies -----------------------------------------------------------------------------------

BCHARS = string.ascii_letters + string.digits + "'()+_,-./:=? "


def _mutate(data: bytes, draw) -> bytes:
    b = bytearray(data)
    for _ in range(draw(st.integers(0, 6))):
        if not b:
            break
        op = draw(st.sampled_from(["flip", "insert", "delete", "cut"]))
        pos = draw(st.integers(0, len(b) - 1))
        if op == "flip":
            b[pos] ^= draw(st.integers(1, 255))
        elif op == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=20))
        elif op == "delete":
            del b[pos:pos + draw(st.integers(1, 50))]
        else:
            del b[pos:]
    return bytes(b)


@st.composite
def stow_case(draw) -> tuple[bytes, bytes, int | None]:
    """(Content-Type header, body, number of parts when the framing is intact)."""
    sc = draw(st.sampled_from(STOW_TEMPLATES))
    bnd = draw(st.one_of(st.just("fuzzstow"), st.text(alphabet=BCHARS, min_size=1, max_size=72),
                         st.text(min_size=0, max_size=10)))
    n = draw(st.integers(0, 4))
    parts, raw_parts = [], []
    for _ in range(n):
        kind = draw(st.sampled_from(["good", "mutated", "random", "empty", "truncated", "boundary-inside"]))
        if kind == "good":
            p = sc
        elif kind == "mutated":
            p = _mutate(sc, draw)
        elif kind == "random":
            p = draw(st.binary(max_size=2000))
        elif kind == "empty":
            p = b""
        elif kind == "truncated":
            p = sc[: draw(st.integers(0, len(sc)))]
        else:
            p = sc[:200] + b"\r\n--" + bnd.encode("utf-8", "replace") + b"\r\n" + sc[200:]
        hdr_lines = draw(st.lists(st.sampled_from([
            b"Content-Type: application/dicom\r\n", b"Content-Type: application/dicom+json\r\n",
            b"Content-Type: multipart/related; boundary=inner\r\n", b"Content-Type: \r\n",
            b"Content-Length: -5\r\n", b"Content-Length: 0\r\n", b"Content-Length: 99999999999\r\n",
            f"Content-Length: {len(p)}\r\n".encode(), f"Content-Length: {len(p) + 1}\r\n".encode(),
            b"Content-Transfer-Encoding: base64\r\n", b"Content-Encoding: gzip\r\n", b"Content-Encoding: deflate\r\n",
            b"Content-Disposition: attachment; filename=\"x\"\r\n", b"X-Pad: " + b"a" * 9000 + b"\r\n",
            b"NoColonHeader\r\n", b": empty-name\r\n", b"Content-Type: application/dicom\xff\r\n",
            b"Content-Type: image/\xc3\x28\r\n", b"Content-Type: text/\x01\r\n"]), max_size=3))
        if not hdr_lines:
            hdr_lines = [b"Content-Type: application/dicom\r\n"]
        raw_parts.append(all(h == b"Content-Type: application/dicom\r\n" for h in hdr_lines) and kind != "boundary-inside")
        parts.append(b"--" + bnd.encode("utf-8", "replace") + b"\r\n" + b"".join(hdr_lines) + b"\r\n" + p + b"\r\n")
    body = b"".join(parts) + b"--" + bnd.encode("utf-8", "replace") + b"--\r\n"
    intact = (n > 0 and all(raw_parts) and 1 <= len(bnd) <= 70 and all(c in BCHARS for c in bnd)
              and not bnd.endswith(" ") and not bnd.startswith(" "))  # a leading space: refused, 400
    how = draw(st.sampled_from(["as is", "as is", "as is", "truncated", "garbage", "mutated", "random"]))
    if how == "truncated":
        body = body[: draw(st.integers(0, len(body)))]
        intact = False
    elif how == "garbage":
        body = draw(st.binary(max_size=50)) + body + draw(st.binary(max_size=50))
        intact = False
    elif how == "mutated":
        body = _mutate(body, draw)
        intact = False
    elif how == "random":
        body = draw(st.binary(max_size=3000))
        intact = False
    bq = f'"{bnd}"' if draw(st.booleans()) else bnd
    ct = draw(st.one_of(
        st.just(f'multipart/related; type="application/dicom"; boundary={bq}'),
        st.just(f"multipart/related; boundary={bnd}"),
        st.just(f'multipart/related; type="application/dicom"; boundary={bnd}; boundary=other'),
        st.just(f'multipart/related; type="application/dicom+json"; boundary={bnd}'),
        st.just('multipart/related; type="application/dicom"'),
        st.just(f"multipart/form-data; boundary={bnd}"),
        st.text(max_size=40),
    ))
    ct_b = ct.encode("utf-8", "replace").replace(b"\r", b"").replace(b"\n", b"")
    plain_ct = ct.startswith("multipart/related; type=\"application/dicom\"; boundary=") and "; boundary=other" not in ct
    return ct_b, body, (n if intact and plain_ct else None)


STOW_TEMPLATES: list[bytes] = []


@pytest.fixture(scope="module")
def stow_templates(srv, tmp_path_factory):
    root = tmp_path_factory.mktemp("stowtpl")
    STOW_TEMPLATES[:] = [srv.files["sc"].read_bytes(),
                         factory.secondary_capture(root / "a.dcm", patient_id="PFSTOW").read_bytes()]
    return STOW_TEMPLATES


@FUZZ
@given(case=stow_case(), xml=st.booleans())
def test_fuzz_stow_bodies(srv, stow_templates, case, xml):
    ct, body, n_parts = case
    headers = [("Content-Type", ct)] + ([("Accept", "application/dicom+xml")] if xml else [])
    status, hdrs, resp = request(srv, "POST", "/dicomweb/studies", headers, body)
    check(srv, status, resp, (ct, body[:200]))
    if status in (200, 202, 409, 413, 507):
        if xml:
            import xml.etree.ElementTree as ET

            root = ET.fromstring(resp)
            ns = "{http://dicom.nema.org/PS3.19/models/NativeDICOM}"
            counts = {}
            for tag in ("00081199", "00081198"):
                el = root.find(f"{ns}DicomAttribute[@tag='{tag}']")
                counts[tag] = 0 if el is None else len(el.findall(f"{ns}Item"))
            ref, fail = [None] * counts["00081199"], [None] * counts["00081198"]
        else:
            doc = json.loads(resp)
            ref = (doc.get("00081199") or {}).get("Value") or []
            fail = (doc.get("00081198") or {}).get("Value") or []
        doc = (status, len(ref), len(fail))
        assert (status == 200) == (bool(ref) and not fail), (status, doc)
        assert (status == 202) == (bool(ref) and bool(fail)), (status, doc)
        if status == 200:
            assert "warning" not in hdrs
        if n_parts is not None:  # intact framing: every part has its own answer
            assert len(ref) + len(fail) == n_parts, (n_parts, doc)


# -- afterwards ---------------------------------------------------------------------------------------

def test_zz_server_healthy_after_fuzz(srv):
    assert srv.proc.poll() is None
    status, _, _ = request(srv, "GET", "/dicomweb/studies")
    assert status == 200
    assert psutil.Process(srv.proc.pid).memory_info().rss < 1024 * MB
    tmp = srv.data_dir / "hot" / "tmp"
    assert [p for p in tmp.rglob("*") if p.is_file() and p.name != "lock"] == []
    log = srv.log()
    assert "Traceback" not in log, log[log.index("Traceback") - 2000: log.index("Traceback") + 3000]
