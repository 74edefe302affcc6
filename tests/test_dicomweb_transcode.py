"""WADO-RS instance retrieval in another transfer syntax: produced on request, else 406."""
from __future__ import annotations

import io

import numpy as np
import pydicom
import requests

import factory
from conftest import run_cli


def _parts(resp: requests.Response) -> list[tuple[str, bytes]]:
    ctype = resp.headers["Content-Type"]
    bnd = ctype.split("boundary=")[1].split(";")[0].strip('"')
    out = []
    for chunk in resp.content.split(f"--{bnd}".encode())[1:-1]:
        head, _, body = chunk.partition(b"\r\n\r\n")
        out.append((head.decode(), body[:-2]))
    return out


def test_instance_as_jpeg_baseline_and_explicit_le(server, tmp_path):
    sc = factory.secondary_capture(tmp_path / "sc.dcm", patient_id="TC")
    wsi = factory.wsi_series(tmp_path / "w", levels=((512, 256),))[0]
    run_cli("import", "--quiet", str(sc), str(wsi), data=server.data_dir, check=True)
    ds = pydicom.dcmread(sc)
    url = (f"{server.dicomweb_url}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}"
           f"/instances/{ds.SOPInstanceUID}")

    r = requests.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; '
                                             "transfer-syntax=1.2.840.10008.1.2.4.50"}, timeout=30)
    assert r.status_code == 200
    [(head, body)] = _parts(r)
    assert "transfer-syntax=1.2.840.10008.1.2.4.50" in head
    got = pydicom.dcmread(io.BytesIO(body))
    assert got.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
    assert got.SOPInstanceUID == ds.SOPInstanceUID and got.LossyImageCompression == "01"
    diff = np.abs(got.pixel_array.astype(int) - ds.pixel_array.astype(int))
    assert diff.mean() < 4  # lossy, but the same picture

    # The stored JPEG WSI level asked for in its own syntax comes back byte-identical.
    w = pydicom.dcmread(wsi)
    r = requests.get(f"{server.dicomweb_url}/studies/{w.StudyInstanceUID}/series/{w.SeriesInstanceUID}"
                     f"/instances/{w.SOPInstanceUID}",
                     headers={"Accept": 'multipart/related; type="application/dicom"; '
                                        "transfer-syntax=1.2.840.10008.1.2.4.50"}, timeout=30)
    assert r.status_code == 200
    assert _parts(r)[0][1] == wsi.read_bytes()

    # ...and decoded on request.
    r = requests.get(f"{server.dicomweb_url}/studies/{w.StudyInstanceUID}/series/{w.SeriesInstanceUID}"
                     f"/instances/{w.SOPInstanceUID}",
                     headers={"Accept": 'multipart/related; type="application/dicom"; '
                                        "transfer-syntax=1.2.840.10008.1.2.1"}, timeout=30)
    assert r.status_code == 200
    plain = pydicom.dcmread(io.BytesIO(_parts(r)[0][1]))
    assert plain.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1"
    assert np.array_equal(plain.pixel_array, w.pixel_array)

    # A syntax we cannot produce: 406 with a reason.
    r = requests.get(url, headers={"Accept": 'multipart/related; type="application/dicom"; '
                                             "transfer-syntax=1.2.840.10008.1.2.4.80"}, timeout=30)
    assert r.status_code == 406
    assert "1.2.840.10008.1.2.4.50" in r.text
