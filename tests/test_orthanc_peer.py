"""Orthanc as a peer PACS: it queries and retrieves from pathpacs, and receives C-MOVEs."""
from __future__ import annotations

import json
import urllib.request

import io

import pydicom

import factory
from conftest import run_cli


def _http(url: str, body: dict | None = None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="POST" if body is not None else "GET")
    with urllib.request.urlopen(req, timeout=120) as resp:
        raw = resp.read()
    try:
        return json.loads(raw)
    except ValueError:
        return raw


def test_orthanc_finds_and_moves_from_pathpacs(make_server, orthanc_factory, tmp_path):
    from conftest import free_port
    archive_port = free_port()
    orthanc = orthanc_factory(modalities={"pathpacs": ("PATHPACS", "127.0.0.1", archive_port)})
    srv = make_server(dicom_port=archive_port, config_text=(
        f'[nodes.orthanc]\naet = "ORTHANC"\nhost = "127.0.0.1"\nport = {orthanc.dicom_port}\n'))
    files = factory.wsi_series(tmp_path / "in", patient_id="ORTH1")
    run_cli("import", "--quiet", str(tmp_path / "in"), data=srv.data_dir, check=True)

    echo = _http(f"{orthanc.url}/modalities/pathpacs/echo", {})
    assert echo == {} or echo == b"{}" or echo == b""
    q = _http(f"{orthanc.url}/modalities/pathpacs/query",
              {"Level": "Study", "Query": {"PatientID": "ORTH1", "ModalitiesInStudy": ""}})
    answers = _http(f"{orthanc.url}/queries/{q['ID']}/answers?expand")
    assert len(answers) == 1
    assert answers[0]["0010,0020"]["Value"] == "ORTH1"
    _http(f"{orthanc.url}/queries/{q['ID']}/retrieve", {"TargetAet": "ORTHANC", "Synchronous": True})
    instances = _http(f"{orthanc.url}/instances")
    assert len(instances) == len(files)
    originals = {pydicom.dcmread(f).SOPInstanceUID: pydicom.dcmread(f).PixelData for f in files}
    for oid in instances:
        ds = pydicom.dcmread(io.BytesIO(_http(f"{orthanc.url}/instances/{oid}/file")))
        assert ds.PixelData == originals[ds.SOPInstanceUID]
