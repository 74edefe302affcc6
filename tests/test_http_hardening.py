"""Regressions for the HTTP-side hardening issue (bad input and faults against `pathpacs serve`).

Each test reproduces one reported defect against a real server and checks the exact answer,
that the server still answers afterwards and, where data is written, that the data directory
holds nothing extra (staging, DATA/hot/tmp/<session>/, holds only its `lock` when idle).
One server per module; a second one only where the configuration differs (trusted proxies,
short read timeout, small max_results) and a third on a 4 MB tmpfs for the out-of-space case.
"""
from __future__ import annotations

import http.client
import json
import os
import re
import socket
import subprocess
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import psutil
import pydicom
import pytest
import requests
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.uid import generate_uid

import factory
from conftest import Server, free_port

MB = 1 << 20
ELE_TS = "1.2.840.10008.1.2.1"
OUT_OF_RESOURCES = 0xA700
PART_ACCEPT = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
DICOM_ACCEPT = {"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'}
HEX32 = re.compile(r"(?<![0-9a-f])[0-9a-f]{32}(?![0-9a-f])")
EXC_TEXT = re.compile(r"Traceback|File \"|\b[A-Z][A-Za-z]*(Error|Exception)\b")


# -- helpers ---------------------------------------------------------------------------

def uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def inst_url(srv: Server, path: Path) -> str:
    st_, se, sop = uids(path)
    return f"{srv.dicomweb_url}/studies/{st_}/series/{se}/instances/{sop}"


def multipart(parts: list[bytes], bnd: str = "hardeningboundary", part_headers: list[bytes] | None = None,
              ) -> tuple[bytes, str]:
    """A STOW body built by hand: `part_headers[i]` (raw header lines, CRLF-terminated) go
    into part i after its Content-Type."""
    out = []
    for i, p in enumerate(parts):
        extra = part_headers[i] if part_headers and i < len(part_headers) else b""
        out.append(b"--" + bnd.encode() + b"\r\nContent-Type: application/dicom\r\n" + extra + b"\r\n" + p + b"\r\n")
    return b"".join(out) + b"--" + bnd.encode() + b"--\r\n", \
        f'multipart/related; type="application/dicom"; boundary={bnd}'


def stow(srv: Server, parts: list[bytes], **kw) -> requests.Response:
    body, ct = multipart(parts, **kw)
    return requests.post(f"{srv.dicomweb_url}/studies", data=body, headers={"Content-Type": ct}, timeout=60)


def seq(resp: requests.Response, tag: str) -> list[dict]:
    return (resp.json().get(tag) or {}).get("Value") or []


def referenced(resp):
    return seq(resp, "00081199")


def failed(resp):
    return seq(resp, "00081198")


def assert_clean_error(resp_or_text) -> None:
    """Error answers name the problem, never an internal blob key or Python exception text."""
    text = resp_or_text if isinstance(resp_or_text, str) else resp_or_text.text
    warning = "" if isinstance(resp_or_text, str) else resp_or_text.headers.get("Warning", "")
    for t in (text, warning):
        assert not HEX32.search(t), t
        assert not EXC_TEXT.search(t), t


def alive(srv: Server) -> None:
    """The process is up and a QIDO answers 200 promptly."""
    assert srv.proc is not None and srv.proc.poll() is None, srv.log()[-3000:]
    r = requests.get(f"{srv.dicomweb_url}/studies", params={"limit": "1"}, timeout=10)
    assert r.status_code == 200


def rss(srv: Server) -> int:
    return psutil.Process(srv.proc.pid).memory_info().rss


class PeakRss:
    """Samples the server's RSS every 20 ms while the block runs."""

    def __init__(self, srv: Server) -> None:
        self.proc = psutil.Process(srv.proc.pid)
        self.peak = 0
        self._stop = threading.Event()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.peak = max(self.peak, self.proc.memory_info().rss)
            except psutil.Error:
                return
            time.sleep(0.02)

    def __enter__(self) -> "PeakRss":
        self.peak = self.proc.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._t.join()


def data_usage(srv: Server) -> tuple[int, int]:
    """(files, bytes) under the data directory, the index excluded."""
    n = size = 0
    for root, dirs, files in os.walk(srv.data_dir):
        if Path(root) == srv.data_dir and "index" in dirs:
            dirs.remove("index")
        for f in files:
            n += 1
            size += os.stat(os.path.join(root, f)).st_size
    return n, size


def staging(srv: Server) -> list[str]:
    """Files in the session temp dirs other than their `lock`."""
    tmp = srv.data_dir / "hot" / "tmp"
    return sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file() and p.name != "lock")


def wait_staging_idle(srv: Server, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while staging(srv) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert staging(srv) == []


def raw_http(port: int, data: bytes, timeout: float = 20.0) -> tuple[int, dict[str, str], bytes]:
    """Send raw request bytes (headers requests/http.client would refuse to encode) and read
    the answer until the server closes (the request should say Connection: close)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        buf = b""
        try:
            while chunk := s.recv(65536):
                buf += chunk
        except OSError:
            pass
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        k, _, v = line.partition(":")
        headers[k.strip().lower()] = v.strip()
    return status, headers, body


def get_raw(srv: Server, url: str, headers: dict | None = None) -> tuple[int, dict, bytes, bool]:
    """GET with http.client: (status, headers, body so far, whether the body ended cleanly)."""
    path = url.removeprefix(srv.http_url)
    conn = http.client.HTTPConnection("127.0.0.1", srv.http_port, timeout=30)
    try:
        conn.request("GET", path, headers=headers or {})
        r = conn.getresponse()
        hdrs = {k.lower(): v for k, v in r.getheaders()}
        try:
            body = r.read()
            complete = True
        except http.client.IncompleteRead as exc:
            body, complete = exc.partial, False
        except (ConnectionError, http.client.HTTPException):
            body, complete = b"", False
        return r.status, hdrs, body, complete
    finally:
        conn.close()


def wait_log(srv: Server, pattern: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while True:
        text = srv.log()
        if re.search(pattern, text):
            return text
        if time.monotonic() > deadline:
            raise AssertionError(f"{pattern!r} not in the server log:\n{text[-3000:]}")
        time.sleep(0.05)


def start_server(tmp: Path, config_text: str | None = None, data_dir: Path | None = None) -> Server:
    cfg = None
    if config_text:
        cfg = tmp / "config.toml"
        cfg.write_text(config_text)
    return Server(data_dir or tmp / "data", free_port(), free_port(), config=cfg).start()


# -- fixtures ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """One WSI series (1024x768, 512x384, 256x192 levels) + one SC image, and small WSI
    instances in their own series to damage on disk."""
    root = tmp_path_factory.mktemp("hardening")
    study, series = generate_uid(), generate_uid()
    levels = factory.wsi_series(root / "wsi", study=study, series=series, patient_id="PH1",
                                patient_name="Hardening^Harriet^Quinn")
    sc = factory.secondary_capture(root / "sc.dcm", patient_id="PH2", patient_name="Other^Olga")
    vstudy = generate_uid()

    def series_of(name: str, n: int) -> list[Path]:
        return factory.wsi_series(root / name, levels=((512, 384),) * n, study=vstudy, patient_id="PVICTIM")

    victims = {
        "flip": series_of("flip", 2),  # [victim, good neighbour]
        "trunc": series_of("trunc", 2),
        "del": series_of("del", 1),
        "del_cached": series_of("del_cached", 1),
    }
    return {"study": study, "series": series, "levels": levels, "sc": sc, "victims": victims, "root": root}


def _load(srv: Server, files: list[Path]) -> None:
    r = stow(srv, [f.read_bytes() for f in files])
    assert r.status_code == 200, r.text
    assert len(referenced(r)) == len(files)


@pytest.fixture(scope="module")
def srv(tmp_path_factory, corpus) -> Server:
    """Default configuration: no trusted proxies."""
    s = start_server(tmp_path_factory.mktemp("hsrv"))
    _load(s, corpus["levels"] + [corpus["sc"]] + [p for v in corpus["victims"].values() for p in v])
    yield s
    s.stop()


@pytest.fixture(scope="module")
def proxied(tmp_path_factory, corpus) -> Server:
    """127.0.0.1 is a trusted proxy; short read timeout; at most 2 QIDO results."""
    s = start_server(tmp_path_factory.mktemp("hsrv2"),
                     '[http]\ntrusted_proxies = ["127.0.0.1"]\nread_timeout = 1.5\nmax_results = 2\n')
    _load(s, corpus["levels"] + [corpus["sc"]])
    _load(s, [factory.secondary_capture(corpus["root"] / f"p{i}.dcm", patient_id=f"PPROXY{i}") for i in range(2)])
    yield s
    s.stop()


def new_sc(tmp: Path, **kw) -> bytes:
    return factory.secondary_capture(tmp / f"{uuid.uuid4().hex}.dcm", **kw).read_bytes()


# -- 1. rendered/thumbnail viewport bounds ----------------------------------------------------

def test_viewport_sides_bounded_400_and_memory_stays_bounded(srv, corpus):
    u = inst_url(srv, corpus["levels"][0])  # the 1024x768 level
    st_ = corpus["study"]
    rss0 = rss(srv)
    with PeakRss(srv) as peak:
        r = requests.get(f"{u}/rendered", params={"viewport": "100000,100000"}, timeout=30)
        assert r.status_code == 400 and "viewport" in r.text and "4096" in r.text
        assert_clean_error(r)
        r = requests.get(f"{u}/thumbnail", params={"viewport": "99999999,99999999"}, timeout=30)
        assert r.status_code == 400 and "viewport" in r.text
        for url, vp in ((f"{u}/frames/1/rendered", "4097,16"), (f"{u}/rendered", "16,4097"),
                        (f"{srv.dicomweb_url}/studies/{st_}/thumbnail", "99999999,99999999"),
                        (f"{u}/rendered", "100000,100000,0,0,1024,768"), (f"{u}/rendered", "0,10")):
            r = requests.get(url, params={"viewport": vp}, timeout=30)
            assert r.status_code == 400, (url, vp, r.status_code)
            assert_clean_error(r)
        # the largest allowed answer, several at once: served, memory stays bounded
        with ThreadPoolExecutor(6) as ex:
            got = list(ex.map(lambda _: requests.get(f"{u}/rendered", params={"viewport": "4096,4096"},
                                                     timeout=60), range(6)))
        for r in got:
            assert r.status_code == 200
            assert Image.open(__import__("io").BytesIO(r.content)).size == (4096, 3072)
    assert peak.peak < rss0 + 700 * MB, (rss0 >> 20, peak.peak >> 20)
    assert rss(srv) < 1500 * MB
    alive(srv)


def test_thumbnail_cache_does_not_hold_big_answers(srv, tmp_path):
    """Each distinct viewport is a new thumbnail cache key; at viewport=4096,4096 a noisy
    image's answer is ~14 MB (JPEG q=100): the cache must not keep 256 of them."""
    ds = factory.wsi_instance(generate_uid(), generate_uid(), 1024, 768, transfer_syntax=ELE_TS, patient_id="PNOISE")
    p = tmp_path / "noise.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert stow(srv, [p.read_bytes()]).status_code == 200
    u = f"{inst_url(srv, p)}/thumbnail"

    def thumb(k: int) -> int:
        r = requests.get(u, params={"viewport": f"4096,{4096 - k}", "quality": "100"}, timeout=30)
        assert r.status_code == 200
        return len(r.content)

    assert thumb(0) > 8 * MB
    thumb(1)
    before = rss(srv)
    for k in range(2, 32):
        thumb(k)
    assert rss(srv) - before < 150 * MB, ((rss(srv) - before) >> 20, "MB more for 30 thumbnails")
    alive(srv)


# -- 2. wildcard matching: linear, off the event loop -------------------------------------------

def test_star_pattern_answers_fast_and_does_not_block_others(srv, corpus):
    u = f"{srv.dicomweb_url}/studies"
    stars = "*" * 20 + "x"
    t0 = time.monotonic()
    r = requests.get(u, params={"PatientName": stars}, timeout=30)
    assert r.status_code == 200 and r.json() == []
    assert time.monotonic() - t0 < 2.0
    r = requests.get(u, params={"PatientName": "*" * 20 + "n"}, timeout=30)  # ...Quinn
    assert [d["00100020"]["Value"][0] for d in r.json()] == ["PH1"]
    r = requests.get(u, params={"PatientName": "h*a*r*d*e*n*i*n*g*^*h*a*r*r*i*e*t*^*q*u*i*n*n"}, timeout=30)
    assert [d["00100020"]["Value"][0] for d in r.json()] == ["PH1"]

    stop = threading.Event()
    statuses: list[int] = []

    def hammer() -> None:
        with requests.Session() as s:
            while not stop.is_set():
                statuses.append(s.get(u, params={"PatientName": stars, "StudyDescription": "*" * 30 + "?z"},
                                      timeout=30).status_code)

    threads = [threading.Thread(target=hammer) for _ in range(6)]
    for t in threads:
        t.start()
    try:
        time.sleep(0.2)
        for _ in range(3):
            t0 = time.monotonic()
            r = requests.get(u, params={"limit": "1"}, timeout=30)
            assert r.status_code == 200 and len(r.json()) == 1
            assert time.monotonic() - t0 < 2.0
            t0 = time.monotonic()
            r = requests.get(f"{inst_url(srv, corpus['levels'][0])}/frames/1", headers=PART_ACCEPT, timeout=30)
            assert r.status_code == 200 and time.monotonic() - t0 < 2.0
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert statuses and set(statuses) == {200}
    alive(srv)


def _reference(pattern: str, text: str, ignore_case: bool) -> bool:
    rx = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(rx, text, re.DOTALL | (re.IGNORECASE if ignore_case else 0)) is not None


@settings(max_examples=500, deadline=None, database=None)
@given(pattern=st.text(alphabet="aAbB^ *?é", max_size=14), text=st.text(alphabet="aAbB^ *?éÉ", max_size=14),
       ignore_case=st.booleans())
def test_wildcard_match_equals_reference_regex(pattern, text, ignore_case):
    from archive.query import wildcard_match

    assert wildcard_match(pattern, text, ignore_case) == _reference(pattern, text, ignore_case)


# (a list of characters, not st.text: text() merges character strategies into one uniform range)
_ODD = st.lists(st.one_of(st.characters(codec="utf-8"), st.sampled_from("İıſςΣKẞßaA*?")), max_size=12).map("".join)


@settings(max_examples=300, deadline=None, database=None)
@given(text=_ODD, ignore_case=st.booleans())
def test_wildcard_question_mark_is_one_character_of_any_text(text, ignore_case):
    """'?' is any one character and '*' any run, whatever the characters (PN matching folds
    case without changing lengths)."""
    from archive.query import wildcard_match

    assert wildcard_match("?" * len(text), text, ignore_case)
    assert not wildcard_match("?" * (len(text) + 1), text, ignore_case)
    assert wildcard_match("*", text, ignore_case)
    assert wildcard_match(text.replace("*", "?"), text, ignore_case)
    if text:
        assert wildcard_match("*" + "?" * (len(text) - 1), text, ignore_case)


def test_wildcard_match_adversarial_is_fast():
    from archive.query import match_value, Key, wildcard_match

    t0 = time.monotonic()
    assert not wildcard_match("a*" * 200 + "b", "a" * 1000)
    assert not wildcard_match("*" * 500 + "x", "y" * 1024, ignore_case=True)
    assert wildcard_match("*a?" * 100, "ab" * 150)
    assert match_value(["Hardening^Harriet"], Key("00100010", "PN", ["*" * 20 + "T"]))
    assert time.monotonic() - t0 < 1.0


# -- 4. duplicates and aborted uploads leave nothing behind ----------------------------------

def test_stow_duplicates_leave_no_staged_copies(srv, corpus, tmp_path):
    level = corpus["levels"][0].read_bytes()  # already stored: a duplicate from the first STOW on
    fresh = new_sc(tmp_path, patient_id="PDUP")
    r = stow(srv, [fresh])
    assert r.status_code == 200
    before = data_usage(srv)
    for _ in range(5):
        r = stow(srv, [level])
        assert r.status_code == 200 and len(referenced(r)) == 1 and not failed(r)
        r = stow(srv, [fresh])
        assert r.status_code == 200 and len(referenced(r)) == 1
    assert data_usage(srv) == before
    assert staging(srv) == []
    alive(srv)


@pytest.mark.parametrize("how", ["close", "reset"])
def test_stow_aborted_mid_body_leaves_nothing(srv, tmp_path, how):
    pid = f"PABORT{how}"
    big = factory.wsi_instance(generate_uid(), generate_uid(), 1024, 1024, patient_id=pid,
                               transfer_syntax=ELE_TS)  # 3 MB: the server spools part of it
    p = tmp_path / "big.dcm"
    big.save_as(p, enforce_file_format=True)
    body, ct = multipart([p.read_bytes()])
    before = data_usage(srv)
    s = socket.create_connection(("127.0.0.1", srv.http_port))
    s.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ct}\r\n"
               f"Content-Length: {len(body)}\r\n\r\n").encode() + body[: len(body) * 2 // 3])
    time.sleep(0.5)
    if how == "reset":
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    s.close()
    wait_staging_idle(srv)
    assert data_usage(srv) == before
    r = requests.get(f"{srv.dicomweb_url}/studies", params={"PatientID": pid}, timeout=10)
    assert r.status_code == 200 and r.json() == []
    alive(srv)


def test_stow_stalled_upload_is_answered_and_leaves_nothing(proxied, tmp_path):
    """read_timeout = 1.5 s: a client that stops sending mid-part gets an answer naming the
    stall, and the spooled bytes are gone."""
    good = new_sc(tmp_path, patient_id="PSTALL1")
    big = factory.wsi_instance(generate_uid(), generate_uid(), 1024, 1024, patient_id="PSTALL2",
                               transfer_syntax=ELE_TS)
    big.save_as(tmp_path / "big.dcm", enforce_file_format=True)
    body, ct = multipart([good, (tmp_path / "big.dcm").read_bytes()])
    # Well inside the 3 MB second part: aiohttp's part reader looks ahead (up to 1 MB) past
    # a part's closing boundary before it ends the part, so a stall right behind it would
    # also fail the first part (reported failed, never a false success).
    cut = len(body) // 2
    before = data_usage(proxied)
    with socket.create_connection(("127.0.0.1", proxied.http_port), timeout=20) as s:
        s.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {ct}\r\n"
                   f"Accept: application/dicom+json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body[:cut])
        t0 = time.monotonic()
        buf = b""
        while True:
            head, sep, payload = buf.partition(b"\r\n\r\n")
            m = re.search(rb"Content-Length: (\d+)", head)
            if sep and m and len(payload) >= int(m.group(1)):
                break
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
        elapsed = time.monotonic() - t0
    assert head.startswith(b"HTTP/1.1 202"), head
    assert 1.0 < elapsed < 10
    assert b"part 2: upload stalled" in head
    doc = json.loads(payload)
    assert len(doc["00081199"]["Value"]) == 1 and len(doc["00081198"]["Value"]) == 1
    wait_staging_idle(proxied)
    n_files, _ = data_usage(proxied)
    assert n_files == before[0] + 1  # the first part's blob
    alive(proxied)


# -- 5. a part that cannot be read is answered, not dropped ---------------------------------

@pytest.mark.parametrize("bad_header", [b"Content-Type: application/dicom\r\n", b"Content-Length: 3\r\nContent-Length: 4\r\n"],
                         ids=["duplicate-content-type", "duplicate-content-length"])
def test_stow_part_with_bad_headers_does_not_cost_the_later_parts(srv, tmp_path, bad_header):
    """A part whose headers HTTP forbids (a duplicated singleton) fails alone: the framing still
    holds, so the parts before and after it are stored (found by the STOW fuzz)."""
    first, bad, last = (new_sc(tmp_path, patient_id=p) for p in ("PDUP1", "PDUP2", "PDUP3"))
    r = stow(srv, [first, bad, last], part_headers=[b"", bad_header, b""])
    assert r.status_code == 202, (r.status_code, r.text)
    assert len(referenced(r)) == 2 and len(failed(r)) == 1
    assert "malformed part headers" in failed(r)[0]["00000902"]["Value"][0]
    wait_staging_idle(srv)
    pids = {d["00100020"]["Value"][0] for d in requests.get(f"{srv.dicomweb_url}/studies", timeout=10).json()}
    assert {"PDUP1", "PDUP3"} <= pids and "PDUP2" not in pids
    alive(srv)


@pytest.mark.parametrize("bad_header", [b"Content-Length: -5\r\n", b"X-Pad: " + b"a" * 20000 + b"\r\n"],
                         ids=["negative-content-length", "20KB-header-line"])
def test_stow_malformed_part_is_a_failure_not_dropped(srv, tmp_path, bad_header):
    good = new_sc(tmp_path, patient_id="PMAL1")
    bad = new_sc(tmp_path, patient_id="PMAL2")
    r = stow(srv, [good, bad], part_headers=[b"", bad_header])
    assert r.status_code == 202, (r.status_code, r.text)
    assert len(referenced(r)) == 1 and len(failed(r)) == 1
    item = failed(r)[0]
    assert item["00081197"]["Value"][0] in (0xC000, 0xA700, 0x0110)
    assert "Warning" in r.headers and "part 2" in r.headers["Warning"]
    assert_clean_error(r)
    wait_staging_idle(srv)
    pids = {d["00100020"]["Value"][0] for d in requests.get(f"{srv.dicomweb_url}/studies", timeout=10).json()}
    assert "PMAL1" in pids and "PMAL2" not in pids
    alive(srv)


# -- 6. out of space on a real full filesystem -------------------------------------------------

@pytest.fixture
def small_fs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mnt = tmp_path / "small"
    mnt.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if res.returncode != 0:
        pytest.skip(f"cannot mount tmpfs here: {res.stderr.strip()}")
    srv = None
    try:
        srv = start_server(tmp_path, data_dir=mnt / "data")
        yield srv
    finally:
        if srv is not None:
            srv.stop()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_stow_out_of_space_507_every_part_answered(small_fs, tmp_path):
    srv = small_fs
    big = factory.wsi_instance(generate_uid(), generate_uid(), 1536, 1024, transfer_syntax=ELE_TS, patient_id="PBIG")
    p = tmp_path / "big.dcm"
    big.save_as(p, enforce_file_format=True)
    big_bytes = p.read_bytes()
    assert len(big_bytes) > 4 * MB
    smalls = [new_sc(tmp_path, patient_id=f"PSMALL{i}") for i in range(4)]
    before = data_usage(srv)

    r = stow(srv, [big_bytes, smalls[0], smalls[1]])
    assert r.status_code == 507, (r.status_code, r.text)
    assert not referenced(r)
    reasons = [f["00081197"]["Value"][0] for f in failed(r)]
    assert reasons == [OUT_OF_RESOURCES] * 3
    assert_clean_error(r)
    wait_staging_idle(srv)
    assert data_usage(srv) == before  # nothing half-written
    alive(srv)

    # the disk has room again for a small one; then a mix: stored, out of space, not stored
    r = stow(srv, [smalls[2], big_bytes, smalls[3]])
    assert r.status_code == 202, (r.status_code, r.text)
    assert len(referenced(r)) == 1
    assert [f["00081197"]["Value"][0] for f in failed(r)] == [OUT_OF_RESOURCES] * 2
    wait_staging_idle(srv)
    assert data_usage(srv)[0] == before[0] + 1
    pids = {d["00100020"]["Value"][0] for d in requests.get(f"{srv.dicomweb_url}/studies", timeout=10).json()}
    assert pids == {"PSMALL2"}
    alive(srv)


# -- 7. damaged blobs are never served as good ------------------------------------------------

def _record(srv: Server, sop: str) -> dict:
    from archive.config import Config
    from archive.service import Archive

    arc = Archive(Config(data_dir=srv.data_dir), readonly=True)
    try:
        rec = arc.instance(sop)
        loc = arc.index.all_frames(sop)
        return {**rec.to_json(), "frags": loc.fragments}
    finally:
        arc.close()


def _fixity_events(srv: Server) -> list[dict]:
    from archive.config import Config
    from archive.service import Archive

    arc = Archive(Config(data_dir=srv.data_dir), readonly=True)
    try:
        return [{"sop": e.sop, "blob": e.blob.key, "tier": e.blob.tier, "what": e.what, "source": e.source}
                for e in arc.fixity_events()]
    finally:
        arc.close()


def _blob_path(srv: Server, rec: dict) -> Path:
    b = rec["blob"]
    return srv.data_dir / "hot" / "blobs" / b[:2] / b[2:4] / b


def _series_url(srv: Server, path: Path) -> str:
    st_, se, _ = uids(path)
    return f"{srv.dicomweb_url}/studies/{st_}/series/{se}"


def _assert_damage_500(r, sop: str) -> None:
    assert r.status_code == 500, (r.status_code, r.content[:200])
    assert sop in r.text and "damaged" in r.text
    assert_clean_error(r)


def _frames_of(path: Path) -> list[bytes]:
    from pydicom.encaps import generate_frames

    ds = pydicom.dcmread(path)
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def test_flipped_byte_in_a_frame_is_never_served(srv, corpus):
    victim, neighbour = corpus["victims"]["flip"]
    sop = uids(victim)[2]
    u = inst_url(srv, victim)
    good = _frames_of(victim)
    r = requests.get(f"{u}/frames/1", headers=PART_ACCEPT, timeout=30)  # intact before
    assert r.status_code == 200 and good[0] in r.content
    rec = _record(srv, sop)
    off, length = rec["frags"][0][0]
    path = _blob_path(srv, rec)
    with open(path, "r+b") as fh:
        fh.seek(off + length // 2)
        b = fh.read(1)
        fh.seek(off + length // 2)
        fh.write(bytes([b[0] ^ 0xFF]))
    altered = bytearray(good[0])
    altered[length // 2] ^= 0xFF
    altered = bytes(altered)

    for url, hdrs in ((f"{u}/frames/1", PART_ACCEPT), (f"{u}/frames/2,1", PART_ACCEPT),
                      (f"{u}/frames/1", {"Accept": "image/jpeg"}), (f"{u}/frames", PART_ACCEPT),
                      (f"{u}/frames/1/rendered", {}), (f"{u}/rendered", {}), (f"{u}/thumbnail", {})):
        r = requests.get(url, headers=hdrs, timeout=30)
        _assert_damage_500(r, sop)
        assert altered not in r.content and altered[:length // 2 + 1] not in r.content
    r = requests.get(f"{u}/frames/2", headers=PART_ACCEPT, timeout=30)  # the other frames are intact
    assert r.status_code == 200 and good[1] in r.content

    # whole-instance streams: the size is right, the sha256 is not -> the stream is cut
    for url in (u, _series_url(srv, victim)):
        status, _hdrs, body, complete = get_raw(srv, url, DICOM_ACCEPT)
        assert status == 200 and not complete, (url, status, complete)
        assert not body.rstrip().endswith(b"--")
    # its neighbour is served
    r = requests.get(inst_url(srv, neighbour), headers=DICOM_ACCEPT, timeout=30)
    assert r.status_code == 200 and neighbour.read_bytes() in r.content
    text = wait_log(srv, rf"fixity: instance {re.escape(sop)} .*CRC32C")
    assert "Traceback" not in text
    # a cut stream still gets its access line
    wait_log(srv, rf'"GET /dicomweb/studies/[0-9.]+/series/[0-9.]+/instances/{re.escape(sop)}" 200 \d+')
    alive(srv)


def test_damage_found_mid_stream_cuts_all_frames(srv, tmp_path):
    """.../frames streams in batches of 256: damage in a later batch is found after the
    headers went out, so the connection is cut (never a complete multipart body), quietly."""
    ds = factory.wsi_instance(generate_uid(), generate_uid(), 16 * 17, 16 * 16, tile=16, patient_id="PLATE")
    p = tmp_path / "many.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert stow(srv, [p.read_bytes()]).status_code == 200
    sop = ds.SOPInstanceUID
    rec = _record(srv, sop)
    assert rec["n_frames"] == 272
    off, length = rec["frags"][269][0]
    with open(_blob_path(srv, rec), "r+b") as fh:
        fh.seek(off + length // 2)
        b = fh.read(1)
        fh.seek(off + length // 2)
        fh.write(bytes([b[0] ^ 0x55]))
    status, _hdrs, body, complete = get_raw(srv, f"{inst_url(srv, p)}/frames", PART_ACCEPT)
    assert status == 200 and not complete
    assert body.count(b"Content-Type: image/jpeg") <= 256 + 1
    r = requests.get(f"{inst_url(srv, p)}/frames/270", headers=PART_ACCEPT, timeout=10)
    _assert_damage_500(r, sop)
    assert requests.get(f"{inst_url(srv, p)}/frames/1,256,257,272", headers=PART_ACCEPT, timeout=10).status_code == 200
    text = wait_log(srv, rf"aborting response to GET \S+/instances/{re.escape(sop)}/frames: ")
    assert "Traceback" not in text
    alive(srv)


def test_truncated_blob_is_a_clean_500_before_any_byte(srv, corpus):
    victim, neighbour = corpus["victims"]["trunc"]
    sop = uids(victim)[2]
    u = inst_url(srv, victim)
    rec = _record(srv, sop)
    path = _blob_path(srv, rec)
    os.truncate(path, rec["size"] // 2)
    last = rec["n_frames"]
    assert rec["frags"][last - 1][0][0] > rec["size"] // 2  # the last frame is past the cut

    for url, hdrs in ((u, DICOM_ACCEPT), (_series_url(srv, victim), DICOM_ACCEPT),
                      (f"{u}/frames/{last}", PART_ACCEPT), (f"{u}/frames", PART_ACCEPT),
                      (f"{u}/rendered", {}),
                      (u, {"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ELE_TS}'})):
        r = requests.get(url, headers=hdrs, timeout=30)
        _assert_damage_500(r, sop)
        assert b"Content-Length" not in r.content  # no part header promising N bytes
    r = requests.get(inst_url(srv, neighbour), headers=DICOM_ACCEPT, timeout=30)
    assert r.status_code == 200
    wait_log(srv, rf"fixity: instance {re.escape(sop)} ")
    alive(srv)


def test_deleted_blob_is_a_clean_500(srv, corpus):
    (victim,) = corpus["victims"]["del"]  # never read before: no cached descriptor
    sop = uids(victim)[2]
    u = inst_url(srv, victim)
    rec = _record(srv, sop)
    _blob_path(srv, rec).unlink()
    for url, hdrs in ((f"{u}/frames/1", PART_ACCEPT), (f"{u}/frames", PART_ACCEPT), (f"{u}/rendered", {}),
                      (u, DICOM_ACCEPT), (_series_url(srv, victim), DICOM_ACCEPT)):
        r = requests.get(url, headers=hdrs, timeout=30)
        _assert_damage_500(r, sop)
        assert "missing" in r.text

    # a blob deleted while its descriptor is cached: frames still come from the (unlinked,
    # intact) file and are the stored bytes; whole-instance retrieve refuses before any byte
    (cached,) = corpus["victims"]["del_cached"]
    csop = uids(cached)[2]
    cu = inst_url(srv, cached)
    assert requests.get(f"{cu}/frames/1", headers=PART_ACCEPT, timeout=30).status_code == 200
    crec = _record(srv, csop)
    _blob_path(srv, crec).unlink()
    r = requests.get(f"{cu}/frames/2", headers=PART_ACCEPT, timeout=30)
    assert r.status_code in (200, 500)
    if r.status_code == 200:
        assert _frames_of(cached)[1] in r.content
    r = requests.get(cu, headers=DICOM_ACCEPT, timeout=30)
    _assert_damage_500(r, csop)
    wait_log(srv, rf"fixity: instance {re.escape(sop)} .*missing")
    alive(srv)


def test_fixity_events_recorded(srv, corpus):
    """Runs after the damage tests (file order): each damaged instance has an event."""
    want = {uids(corpus["victims"][k][0])[2] for k in ("flip", "trunc", "del", "del_cached")}
    deadline = time.monotonic() + 10
    while True:
        events = _fixity_events(srv)
        if want <= {e["sop"] for e in events} or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert want <= {e["sop"] for e in events}, events
    for e in events:
        assert e["what"] and e["source"]


# -- 8. client errors are 4xx, not 500 -------------------------------------------------------

def test_huge_limit_clamped_with_warning(srv, proxied):
    u = f"{srv.dicomweb_url}/studies"
    r = requests.get(u, params={"limit": "9223372036854775807"}, timeout=10)
    assert r.status_code == 200 and len(r.json()) >= 3
    assert "Warning" in r.headers and "max_results" in r.headers["Warning"]
    # max_results = 2 on the second server: two results and the "more results" warning
    r = requests.get(f"{proxied.dicomweb_url}/studies", params={"limit": "9223372036854775807"}, timeout=10)
    assert r.status_code == 200 and len(r.json()) == 2
    assert "additional results" in r.headers["Warning"]
    r = requests.get(f"{proxied.dicomweb_url}/studies", timeout=10)
    assert len(r.json()) == 2 and "additional results" in r.headers["Warning"]
    alive(srv)


@pytest.mark.parametrize("params", [{"offset": "1" + "0" * 30}, {"limit": "1" + "0" * 30},
                                    {"offset": "2147483648"}, {"limit": "1e3"}, {"limit": "٣"},
                                    {"PatientName": "x" * 5000}])
def test_qido_out_of_range_numbers_400(srv, params):
    r = requests.get(f"{srv.dicomweb_url}/studies", params=params, timeout=10)
    assert r.status_code == 400, r.text
    assert_clean_error(r)
    alive(srv)


def test_viewport_source_outside_image_400(srv, corpus):
    u = inst_url(srv, corpus["levels"][0])
    for vp in ("10,10,99999,99999,10,10", "10,10,1024,0,10,10", "10,10,0,768,1,1"):
        r = requests.get(f"{u}/rendered", params={"viewport": vp}, timeout=30)
        assert r.status_code == 400, (vp, r.status_code)
        assert_clean_error(r)
    r = requests.get(f"{u}/rendered", params={"viewport": "10,10,1023,767,99999,99999"}, timeout=30)
    assert r.status_code == 200  # a region running past the edge is clipped to the image
    alive(srv)


def test_stow_boundary_length(srv, tmp_path):
    inst = new_sc(tmp_path, patient_id="PBND")
    for n, want in ((71, 400), (200, 400), (70, 200)):
        bnd = "b" * n
        body, ct = multipart([inst], bnd=bnd)
        r = requests.post(f"{srv.dicomweb_url}/studies", data=body, headers={"Content-Type": ct}, timeout=30)
        assert r.status_code == want, (n, r.status_code, r.text)
        if want == 400:
            assert "boundary" in r.text
            assert_clean_error(r)
    # legal in RFC 2046 but stripped by the multipart parser: every part would fail; a 400 says why
    body, _ = multipart([inst], bnd=" lead")
    r = requests.post(f"{srv.dicomweb_url}/studies", data=body, timeout=30,
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=" lead"'})
    assert r.status_code == 400 and "starting with a space" in r.text
    wait_staging_idle(srv)
    alive(srv)


def test_non_utf8_header_bytes_400(srv, corpus):
    st_, se, sop = uids(corpus["levels"][0])
    port = srv.http_port
    for path in ("/dicomweb/studies", f"/dicomweb/studies/{st_}/series/{se}/instances/{sop}/frames/1",
                 f"/dicomweb/studies/{st_}/series/{se}/metadata"):
        status, hdrs, body = raw_http(port, (f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
                                             "Accept: application/dicom+json\xff\xfe\r\n\r\n").encode("latin-1"))
        assert status == 400, (path, status, body[:200])
        assert b"Accept" in body
        assert_clean_error(body.decode("utf-8", "replace"))
    inst = factory.secondary_capture(Path(corpus["root"]) / "nonutf8.dcm", patient_id="PNONUTF8").read_bytes()
    body, _ = multipart([inst], bnd="bb")
    for ct in (b'multipart/related; type="application/dicom"; boundary=b\xffb',
               b'multipart/related; type="application/dicom\xc3"; boundary=bb'):
        status, hdrs, resp = raw_http(port, b"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                            b"Connection: close\r\nContent-Type: " + ct +
                                      f"\r\nContent-Length: {len(body)}\r\n\r\n".encode() + body)
        assert status == 400, (ct, status, resp[:200])
        assert_clean_error(resp.decode("utf-8", "replace"))
    assert requests.get(f"{srv.dicomweb_url}/studies", params={"PatientID": "PNONUTF8"}, timeout=10).json() == []
    wait_staging_idle(srv)
    alive(srv)


# -- 11. strict Accept q-values and frame lists -------------------------------------------------

@pytest.mark.parametrize("accept", ["*/*;q=0", "image/jpeg;q=-1", "*/*; q=0.000", "application/dicom+json;q=abc",
                                    "*/*;q=0, image/jpeg;q=0"])
def test_accept_nothing_acceptable_406(srv, corpus, accept):
    u = inst_url(srv, corpus["levels"][0])
    for url in (f"{srv.dicomweb_url}/studies", f"{u}/frames/1", f"{u}/rendered", f"{u}/metadata",
                f"{u}/thumbnail", f"{u}/frames"):
        r = requests.get(url, headers={"Accept": accept}, timeout=30)
        assert r.status_code == 406, (url, accept, r.status_code)
        assert_clean_error(r)
    alive(srv)


@pytest.mark.parametrize("frames", ["1_0", "\u0661", "1\u0660", "+1", " 1", "1 ", "1,,2", "1%0A", "0x1",
                                    ",".join(["1"] * 1025), "1," * 1024 + "1", "99999999999"])
def test_frame_list_strict_400(srv, corpus, frames):
    u = inst_url(srv, corpus["levels"][0])
    quoted = requests.utils.quote(frames, safe=",%")
    r = requests.get(f"{u}/frames/{quoted}", headers=PART_ACCEPT, timeout=30)
    assert r.status_code == 400, (frames[:40], r.status_code)
    assert_clean_error(r)
    r = requests.get(f"{u}/frames/{quoted}/rendered", timeout=30)
    assert r.status_code == 400, (frames[:40], r.status_code)


def test_frame_list_of_1024_is_served(srv, corpus):
    u = inst_url(srv, corpus["levels"][0])
    r = requests.get(f"{u}/frames/{','.join(['1'] * 1024)}", headers=PART_ACCEPT, timeout=30)
    assert r.status_code == 200
    assert r.content.count(_frames_of(corpus["levels"][0])[0]) == 1024


# -- 12. posture: forwarded headers, Server header, access log, error bodies ---------------------

def _retrieve_urls(srv: Server, headers: dict, corpus, tmp_path) -> list[str]:
    out = []
    r = requests.get(f"{srv.dicomweb_url}/studies", params={"PatientID": "PH1"}, headers=headers, timeout=10)
    out.append(r.json()[0]["00081190"]["Value"][0])
    r = requests.get(f"{srv.dicomweb_url}/studies/{corpus['study']}/series/{corpus['series']}/metadata",
                     headers={**headers, "Accept-Encoding": "identity"}, timeout=10)
    out.append(r.json()[0]["7FE00010"]["BulkDataURI"])
    body, ct = multipart([new_sc(tmp_path, patient_id="PFWD")])
    r = requests.post(f"{srv.dicomweb_url}/studies", data=body, headers={"Content-Type": ct, **headers}, timeout=30)
    out.append(referenced(r)[0]["00081190"]["Value"][0])
    return out


FORWARDED = {"X-Forwarded-Host": "evil.example", "X-Forwarded-Proto": "https", "X-Forwarded-Prefix": "/x"}


def test_forwarded_headers_ignored_unless_trusted(srv, proxied, corpus, tmp_path):
    for url in _retrieve_urls(srv, FORWARDED, corpus, tmp_path):
        assert url.startswith(srv.dicomweb_url + "/studies/"), url
    for url in _retrieve_urls(proxied, FORWARDED, corpus, tmp_path):
        assert url.startswith("https://evil.example/x/dicomweb/studies/"), url
    for url in _retrieve_urls(proxied, {}, corpus, tmp_path):
        assert url.startswith(proxied.dicomweb_url + "/studies/"), url


def test_server_header_names_no_versions(srv, corpus):
    u = inst_url(srv, corpus["levels"][0])
    got = []
    for method, url, hdrs in (("GET", f"{srv.dicomweb_url}/studies", {}), ("GET", f"{srv.http_url}/", {}),
                              ("GET", f"{srv.dicomweb_url}/nothing", {}), ("GET", f"{u}/frames/x", {}),
                              ("GET", f"{u}/frames/1", {"Accept": "image/jp2"}), ("GET", u, DICOM_ACCEPT),
                              ("GET", f"{u}/frames", PART_ACCEPT),
                              ("OPTIONS", f"{srv.dicomweb_url}/studies",
                               {"Origin": "https://v.example", "Access-Control-Request-Method": "GET"}),
                              ("PUT", f"{srv.dicomweb_url}/studies", {}), ("DELETE", f"{srv.http_url}/", {}),
                              ("GET", f"{srv.http_url}/static/../../etc/passwd", {})):
        r = requests.request(method, url, headers=hdrs, timeout=30)
        got.append((method, url, r.status_code, r.headers.get("Server")))
    for st_, se, sop in [uids(corpus["victims"]["del"][0])]:  # a damaged instance: 500
        r = requests.get(f"{srv.dicomweb_url}/studies/{st_}/series/{se}/instances/{sop}", timeout=30)
        got.append(("GET", "damaged", r.status_code, r.headers.get("Server")))
    # answers aiohttp writes itself: a malformed request line, an oversized header
    for raw in (b"GARBAGE\r\n\r\n", b"GET /dicomweb/studies HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000 + b"\r\n\r\n",
                b"GET /dicomweb/studies HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n"):
        status, hdrs, _ = raw_http(srv.http_port, raw)
        got.append(("RAW", raw[:20], status, hdrs.get("server")))
    bad = [g for g in got if g[3] != "pathpacs"]
    assert not bad, bad
    alive(srv)


def test_access_log_and_stow_summary(srv, tmp_path):
    marker = f"1.2.999.{int(time.time() * 1000)}"
    r = requests.get(f"{srv.dicomweb_url}/studies/{marker}/series", params={"PatientName": "Secret^Name"}, timeout=10)
    assert r.status_code == 200
    text = wait_log(srv, rf'127\.0\.0\.1 "GET /dicomweb/studies/{re.escape(marker)}/series" 200 \d+ [\d.]+ms')
    assert "Secret" not in text  # no query strings (patient names) in the log
    # a client cannot forge log lines (CR/LF in the decoded path) or send terminal escapes
    for path in ("/dicomweb/studies/1.2%0D%0A2026-01-01 00:00:00,000 ERROR pathpacs.archive: FORGED/series",
                 "/dicomweb/nothing%0AFORGED%1b[31m", "/x%0d%0aFORGED"):
        status, _, _ = raw_http(srv.http_port, f"GET {path.replace(' ', '%20')} HTTP/1.1\r\nHost: x\r\n"
                                               "Connection: close\r\n\r\n".encode())
        assert status in (400, 404)
    text = wait_log(srv, r'"GET /x\\r\\nFORGED" 404')
    assert not re.search(r"^(\S* )?FORGED|^[^\n]*\x1b", text, re.M), text[-2000:]
    assert "\\nFORGED\\x1b[31m" in text
    r = stow(srv, [new_sc(tmp_path, patient_id="PLOG"), b"not dicom"])
    assert r.status_code == 202
    wait_log(srv, r'pathpacs\.http\.access: 127\.0\.0\.1 "POST /dicomweb/studies" 202 \d+ [\d.]+ms')
    wait_log(srv, r"STOW from 127\.0\.0\.1: 1 stored, 1 failed")


def test_client_gone_mid_stream_is_one_quiet_line(srv, tmp_path):
    big = factory.wsi_instance(generate_uid(), generate_uid(), 1024, 1024, patient_id="PGONE",
                               transfer_syntax=ELE_TS)
    p = tmp_path / "big.dcm"
    big.save_as(p, enforce_file_format=True)
    assert stow(srv, [p.read_bytes()]).status_code == 200
    url = inst_url(srv, p)
    path = url.removeprefix(srv.http_url)
    for _ in range(3):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", srv.http_port))
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        time.sleep(0.2)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        s.close()
    text = wait_log(srv, rf"client 127\.0\.0\.1 left during GET {re.escape(path)}")
    wait_log(srv, rf'"GET {re.escape(path)}" 200 \d+')
    assert "Traceback" not in text
    alive(srv)


def _xml_parts(resp) -> list[bytes]:
    bnd = resp.headers["Content-Type"].split("boundary=")[1].strip('"')
    chunks = resp.content.split(b"--" + bnd.encode())[1:-1]
    return [c.partition(b"\r\n\r\n")[2][:-2] for c in chunks]


def test_xml_answers_well_formed_with_control_characters(srv, tmp_path):
    """Stored values may hold characters XML 1.0 cannot (\x01, ESC, \x0b), and a STOW
    failure reason may quote a part header with a non-UTF-8 byte: the XML answers stay
    well-formed (the JSON ones were always fine)."""
    import xml.etree.ElementTree as ET

    path = factory.secondary_capture(tmp_path / "ctl.dcm", patient_id="PCTL\x01", patient_name="Ctl\x01^Name\x1b",
                                     study_description="desc\x0b\x7f")
    assert stow(srv, [path.read_bytes()]).status_code == 200
    xml_accept = {"Accept": 'multipart/related; type="application/dicom+xml"'}
    r = requests.get(f"{srv.dicomweb_url}/studies", params={"PatientID": "PCTL\x01"}, headers=xml_accept, timeout=10)
    assert r.status_code == 200
    (doc,) = _xml_parts(r)
    ET.fromstring(doc)
    st_, se, sop = uids(path)
    r = requests.get(f"{srv.dicomweb_url}/studies/{st_}/series/{se}/instances/{sop}/metadata", headers=xml_accept,
                     timeout=10)
    assert r.status_code == 200
    ET.fromstring(_xml_parts(r)[0])
    body = (b"--bb\r\nContent-Type: application/x\xff\xfe\r\n\r\n" + new_sc(tmp_path) + b"\r\n--bb--\r\n")
    r = requests.post(f"{srv.dicomweb_url}/studies", data=body, timeout=10,
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=bb',
                               "Accept": "application/dicom+xml"})
    assert r.status_code == 409, (r.status_code, r.text)
    ET.fromstring(r.content)
    assert "application/x" in r.text
    alive(srv)


def test_error_bodies_hold_no_internal_keys_or_exception_text(srv, corpus, tmp_path):
    u = inst_url(srv, corpus["levels"][0])
    answers = [
        requests.get(f"{srv.dicomweb_url}/studies", params={"StudyDate": "2026x"}, timeout=10),
        requests.get(f"{srv.dicomweb_url}/studies", params={"NoSuchKeyword": "1"}, timeout=10),
        requests.get(f"{u}/frames/99", headers=PART_ACCEPT, timeout=10),
        requests.get(f"{u}/bulkdata/nothing/here", timeout=10),
        requests.get(f"{u}/rendered", params={"quality": "0"}, timeout=10),
        requests.get(u, headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.3'}, timeout=10),
        requests.post(f"{srv.dicomweb_url}/studies", data=b"\xff" * 100,
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=zz'}, timeout=10),
        stow(srv, [b"\x00" * 300]),
        stow(srv, [new_sc(tmp_path)], part_headers=[b"Content-Length: -5\r\n"]),
        stow(srv, [new_sc(tmp_path)], part_headers=[b"X-Pad: " + b"a" * 20000 + b"\r\n"]),
        stow(srv, [corpus["levels"][1].read_bytes()[:-5000]]),
    ]
    for kind, frame in (("trunc", 4), ("flip", 1), ("del", 1)):  # damaged by the tests above
        st_, se, sop = uids(corpus["victims"][kind][0])
        answers.append(requests.get(f"{srv.dicomweb_url}/studies/{st_}/series/{se}/instances/{sop}/frames/{frame}",
                                    timeout=10))
    for r in answers:
        assert r.status_code >= 400, (r.url, r.status_code)
        assert_clean_error(r)
    wait_staging_idle(srv)
    alive(srv)
    assert "Traceback" not in srv.log()
