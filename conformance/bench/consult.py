"""Consultation sending (issue 12): a 300 MB case A -> B.

- loopback: `pathpacs consult send --wait` (its own process: job, STOW-RS per instance,
  streamed from A's store, verified by QIDO) vs a bare STOW-RS of the same files, one request
  per instance, with dicomweb-client (the limit: nothing but reading the files and posting
  them); target >= 80% of the limit. The sender's peak RSS (VmHWM sampled until it exits,
  the queueing before its exec apart);
  target < 200 MB.
- `frozen` priority on the shaped link (100 Mbit/s, 50 ms RTT; conformance.shaped_link): from
  the send request (A's pages API, A's background worker) until B can display the slide's
  overview level: the smallest pyramid level of the first slide found by QIDO at B and its
  first frame retrieved; target < 5 s. The whole case's arrival for comparison.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import requests

from conformance import shaped_link, synthetic

from .peers import ROOT, peak_rss_mb, start_pathpacs


def _cli(*args: str, data: Path, config: Path | None = None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "archive", *args, "--data", str(data)]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(*args: str, data: Path, config: Path | None = None) -> str:
    p = _cli(*args, data=data, config=config)
    out, err = p.communicate(timeout=1800)
    if p.returncode != 0:
        raise RuntimeError(f"pathpacs {' '.join(args)}: {p.returncode}: {err.strip()[-500:]}")
    return out


def _token(data: Path) -> str:
    return _run("token", "create", "--role", "uploader", "--role", "viewer", "--name", "bench A", data=data).strip()


def _b(work: Path, name: str, **kw):
    token = _token(work / name)
    srv = start_pathpacs(work / name, config_text='[auth]\nmode = "token"\n', aet=name.upper(), quiet=True, **kw)
    return srv, token


def _seconds(start: str, end: str) -> float:
    from datetime import datetime

    parse = lambda s: datetime.fromisoformat(s.replace("Z", "+00:00"))  # noqa: E731
    return (parse(end) - parse(start)).total_seconds()


def bare_stow(url: str, token: str, files: list[Path]) -> float:
    """dicomweb-client, one STOW-RS per file (read with pydicom: what a script would do)."""
    from dicomweb_client.api import DICOMwebClient

    client = DICOMwebClient(url=url, headers={"Authorization": f"Bearer {token}"})
    t = time.perf_counter()
    for f in files:
        client.store_instances([pydicom.dcmread(f)])
    return time.perf_counter() - t


def consult_send(a: Path, cfg: Path, study: str, partner: str) -> tuple[float, float, float, dict]:
    """`consult send --wait` in its own process: (seconds, peak RSS MB while queueing, peak RSS
    MB while sending, the job record). Queueing builds the request SR (highdicom) and then the
    process re-executes itself to send (archive.consult.commands): its VmHWM starts again at
    the exec, which is how the two phases are told apart here."""
    t = time.perf_counter()
    p = _cli("consult", "send", "--study", study, "--to", partner, "--wait", "--quiet", data=a, config=cfg)
    queue_peak = send_peak = last = 0.0
    sending = False
    while p.poll() is None:
        try:
            hwm = peak_rss_mb(p.pid)
        except (OSError, ValueError):
            hwm = None
        if hwm is not None:
            if hwm < last:  # the high-water mark fell: a new image (the exec to send)
                sending = True
            last = hwm
            if sending:
                send_peak = max(send_peak, hwm)
            else:
                queue_peak = max(queue_peak, hwm)
        time.sleep(0.05)
    dt = time.perf_counter() - t
    out, err = p.communicate()
    if p.returncode != 0:
        raise RuntimeError(f"consult send: {p.returncode}: {err.strip()[-500:]}")
    job_id = out.split()[0]
    jobs = {j["id"]: j for j in json.loads(_run("consult", "list", "--json", data=a))}
    if not sending:  # no exec seen (it ran in one image): the whole peak is the sender's
        send_peak = queue_peak
    return dt, queue_peak, send_peak, jobs[job_id]


def overview_of(files: list[Path]) -> tuple[str, str, str]:
    """(study, series, SOP) of the smallest VOLUME level of the first slide."""
    best = None
    for f in files:
        ds = pydicom.dcmread(f, stop_before_pixels=True)
        if ds.SeriesNumber != 1:
            continue
        key = int(ds.TotalPixelMatrixColumns)
        if best is None or key < best[0]:
            best = (key, ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    return best[1], best[2], best[3]


def frozen_on_shaped_link(work: Path, case: Path, files: list[Path], study: str) -> list[dict]:
    why = shaped_link.available()
    if why is not None:
        return [{"benchmark": "frozen: overview level displayable at B", "system": "shaped link",
                 "value": "skipped", "note": why}]
    _, series, sop = overview_of(files)
    rows = []
    with shaped_link.ShapedLink(rate="100mbit") as link:
        token = _token(work / "Bfar")
        b = shaped_link.start_far_pathpacs(link, work / "Bfar", config_text='[auth]\nmode = "token"\n',
                                           aet="BFAR", quiet=True)
        relay = shaped_link.Relay(link.far_ip, b.http_port, delay=0.025).start()
        a = None
        try:
            a_data = work / "Afar"
            _run("import", "--quiet", str(case), data=a_data)
            a = start_pathpacs(a_data, aet="AFAR", quiet=True, config_text=(
                f'[partners.b]\ndicomweb = "http://127.0.0.1:{relay.port}/dicomweb"\ntoken = "{token}"\n'))
            h = {"Authorization": f"Bearer {token}"}
            at_b = f"http://{link.far_ip}:{b.http_port}/dicomweb"
            t0 = time.perf_counter()
            r = requests.post(a.http_url + "/api/consult/send",
                              json={"study": study, "partner": "b", "priority": "frozen"}, timeout=30)
            r.raise_for_status()
            job_id = r.json()["id"]
            shown = None
            while time.perf_counter() - t0 < 300:
                q = requests.get(f"{at_b}/studies/{study}/instances", params={"SOPInstanceUID": sop},
                                 headers=h | {"Accept": "application/dicom+json"}, timeout=30)
                if q.status_code == 200 and q.json():
                    f = requests.get(f"{at_b}/studies/{study}/series/{series}/instances/{sop}/frames/1",
                                     headers=h | {"Accept": 'multipart/related; type="application/octet-stream"; '
                                                            'transfer-syntax=*'}, timeout=30)
                    if f.status_code == 200 and len(f.content) > 0:
                        shown = time.perf_counter() - t0
                        break
                time.sleep(0.05)
            done = None
            while time.perf_counter() - t0 < 600:
                job = requests.get(f"{a.http_url}/api/consult/jobs/{job_id}", timeout=30).json()
                if job["state"] in ("done", "failed", "cancelled"):
                    done = time.perf_counter() - t0 if job["state"] == "done" else None
                    break
                time.sleep(0.2)
            total = sum(p.stat().st_size for p in files)
            rows.append({"benchmark": "frozen: overview level displayable at B (QIDO + first frame)",
                         "system": "pathpacs, 100 Mbit/s, 50 ms RTT",
                         "value": f"{shown:.2f} s" if shown is not None else "never",
                         "note": "target < 5 s; from the send request (pages API) to the frame at B"})
            rows.append({"benchmark": f"frozen: whole {total / 1e6:.0f} MB case done (verified)",
                         "system": "pathpacs, 100 Mbit/s, 50 ms RTT",
                         "value": f"{done:.1f} s" if done is not None else f"job {job['state']}",
                         "note": f"{total * 8 / 1e6 / done:.0f} Mbit/s of 100" if done else job.get("error", "")})
        finally:
            relay.stop()
            if a is not None:
                a.stop()
            b.stop()
    return rows


def run(workdir: Path, quick: bool) -> list[dict]:
    total = (60 if quick else 300) << 20
    case = workdir / "case"
    study, files = synthetic.large_case(case, total)
    size = sum(p.stat().st_size for p in files)
    rows: list[dict] = []

    b_limit, t_limit = _b(workdir, "blimit")
    try:
        limit = bare_stow(b_limit.dicomweb_url, t_limit, files)
    finally:
        b_limit.stop()
    rows.append({"benchmark": f"{size / 1e6:.0f} MB case, {len(files)} instances, loopback", "system":
                 "bare STOW-RS (dicomweb-client, one request per instance; the limit)",
                 "value": f"{size / 1e6 / limit:.0f} MB/s ({limit:.2f} s)", "note": ""})

    b, token = _b(workdir, "b")
    try:
        a = workdir / "A"
        _run("import", "--quiet", str(case), data=a)
        cfg = workdir / "A.toml"
        cfg.write_text(f'[partners.b]\ndicomweb = "{b.dicomweb_url}"\ntoken = "{token}"\n')
        dt, queue_peak, peak, job = consult_send(a, cfg, study, "b")
    finally:
        b.stop()
    job_s = _seconds(job["started"], job["finished"])
    rows.append({"benchmark": f"{size / 1e6:.0f} MB case, {len(files)} instances, loopback",
                 "system": "pathpacs consult send --wait: the job (request SR, streamed, QIDO-verified)",
                 "value": f"{size / 1e6 / job_s:.0f} MB/s ({job_s:.2f} s)",
                 "note": f"{limit / job_s:.0%} of the limit (target >= 80%); job started -> finished; {job['state']}"})
    rows.append({"benchmark": f"{size / 1e6:.0f} MB case, {len(files)} instances, loopback",
                 "system": "pathpacs consult send --wait: the whole command",
                 "value": f"{size / 1e6 / dt:.0f} MB/s ({dt:.2f} s)",
                 "note": f"{limit / dt:.0%} of the limit; with interpreter start, imports, archive open and exit"})
    rows.append({"benchmark": "sender peak RSS during that send", "system": "pathpacs consult send --wait",
                 "value": f"{peak:.0f} MB", "note": "target < 200 MB (VmHWM of the sending process, after its exec)"})
    rows.append({"benchmark": "peak RSS while queueing that send", "system": "pathpacs consult send --wait",
                 "value": f"{queue_peak:.0f} MB",
                 "note": "before the exec: checks, and the request SR built with highdicom (its tables of the standard)"})
    rows += frozen_on_shaped_link(workdir, case, files, study)
    return rows
