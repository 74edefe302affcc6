"""DICOMweb against a running `pathpacs serve`, with real clients (dicomweb-client, wsidicom,
raw HTTP the way Slim / dicom-microscopy-viewer ask), bytes compared with the stored files."""
from __future__ import annotations

import gzip
import io
import json
import socket
import uuid
from pathlib import Path

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image
from pydicom.encaps import generate_frames
from pydicom.uid import generate_uid

import factory
from conftest import Server, free_port

JPEG_TS = "1.2.840.10008.1.2.4.50"
ELE_TS = "1.2.840.10008.1.2.1"
ICC = bytes(range(256)) * 8  # 2 KiB: above the bulk threshold, so a BulkDataURI


# -- fixtures ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    """A WSI study (3 levels + THUMBNAIL + LABEL + OVERVIEW), a native WSI, and an SC study."""
    root = tmp_path_factory.mktemp("dwdata")
    study, series = generate_uid(), generate_uid()
    levels = factory.wsi_series(root / "wsi", study=study, series=series, patient_id="PW1",
                                patient_name="Slide^Sam", accession="ACCW", icc_profile=ICC)
    extra = []
    frame_ref = pydicom.dcmread(levels[0], stop_before_pixels=True).FrameOfReferenceUID
    for i, kind in enumerate(("THUMBNAIL", "LABEL", "OVERVIEW")):
        ds = factory.wsi_instance(study, series, 200, 150, 256, image_type=kind, seed=10 + i,
                                  patient_id="PW1", patient_name="Slide^Sam", accession="ACCW",
                                  frame_of_reference=frame_ref, instance_number=10 + i, icc_profile=ICC)
        p = root / "wsi" / f"{kind}.dcm"
        ds.save_as(p, enforce_file_format=True)
        extra.append(p)
    _add_pixel_spacing(levels + extra)
    native = factory.wsi_series(root / "native", levels=((512, 256),), patient_id="PN1",
                                transfer_syntax=ELE_TS, accession="ACCN")
    sc = factory.secondary_capture(root / "sc.dcm", patient_id="P2", patient_name="Other^Olga",
                                   study_date="20250315", accession="ACCS")
    return {"study": study, "series": series, "levels": levels, "extra": extra, "native": native,
            "sc": sc, "root": root}


def _add_pixel_spacing(paths: list[Path]) -> None:
    """The factory writes no Pixel Measures; wsidicom needs them to build levels."""
    from pydicom.dataset import Dataset
    from pydicom.sequence import Sequence

    base = pydicom.dcmread(paths[0], stop_before_pixels=True)
    width_mm, height_mm = float(base.ImagedVolumeWidth), float(base.ImagedVolumeHeight)
    for p in paths:
        ds = pydicom.dcmread(p)
        ds.ImagedVolumeWidth, ds.ImagedVolumeHeight = width_mm, height_mm
        spacing = width_mm / int(ds.TotalPixelMatrixColumns)
        pm = Dataset()
        pm.PixelSpacing = [spacing, spacing]
        pm.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([pm])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        ds.save_as(p, enforce_file_format=True)


def _start(tmp: Path, config_text: str | None = None) -> Server:
    cfg = None
    if config_text:
        cfg = tmp / "config.toml"
        cfg.write_text(config_text)
    return Server(tmp / "data", free_port(), free_port(), config=cfg).start()


@pytest.fixture(scope="module")
def srv(tmp_path_factory, corpus) -> Server:
    # The tests reach the server from 127.0.0.1, playing the reverse proxy for X-Forwarded-*;
    # viewers on other origins (Slim's pattern) are allowed, as a site lists them.
    s = _start(tmp_path_factory.mktemp("dwsrv"), '[http]\ntrusted_proxies = ["127.0.0.1"]\ncors_origins = ["*"]\n')
    yield s
    s.stop()


@pytest.fixture(scope="module")
def client(srv):
    from dicomweb_client.api import DICOMwebClient

    return DICOMwebClient(url=srv.dicomweb_url)


@pytest.fixture(scope="module")
def loaded(srv, client, corpus) -> dict:
    files = corpus["levels"] + corpus["extra"] + corpus["native"] + [corpus["sc"]]
    datasets = [pydicom.dcmread(f) for f in files]
    resp = client.store_instances(datasets)
    assert len(resp.ReferencedSOPSequence) == len(files)
    assert "FailedSOPSequence" not in resp
    by_sop = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID: f for f in files}
    return {**corpus, "by_sop": by_sop}


def _uids(path: Path) -> tuple[str, str, str]:
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    return ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID


def _frames(path: Path) -> list[bytes]:
    ds = pydicom.dcmread(path)
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    n = int(getattr(ds, "NumberOfFrames", 1))
    size = len(ds.PixelData) // n
    return [ds.PixelData[i * size:(i + 1) * size] for i in range(n)]


def _parts(resp: requests.Response) -> list[tuple[dict, bytes]]:
    ct = resp.headers["Content-Type"]
    assert ct.startswith("multipart/related"), ct
    bnd = [p.split("=", 1)[1].strip('"') for p in ct.split(";") if p.strip().startswith("boundary=")][0]
    body = resp.content
    out = []
    for chunk in body.split(b"--" + bnd.encode())[1:]:
        if chunk.startswith(b"--"):
            break
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        hdrs = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if line)
        out.append((hdrs, data[:-2]))
    return out


def _multipart(parts: list[bytes], bnd: str = "pathpacsboundary") -> tuple[bytes, str]:
    body = b"".join(b"--" + bnd.encode() + b"\r\nContent-Type: application/dicom\r\n\r\n" + p + b"\r\n" for p in parts)
    return body + b"--" + bnd.encode() + b"--\r\n", f'multipart/related; type="application/dicom"; boundary={bnd}'


# -- STOW-RS -------------------------------------------------------------------------

def test_stow_referenced_with_retrieve_urls(loaded, srv):
    st, se, sop = _uids(loaded["levels"][0])
    body, ct = _multipart([loaded["levels"][0].read_bytes()])
    r = requests.post(f"{srv.dicomweb_url}/studies/{st}", data=body, headers={"Content-Type": ct})
    assert r.status_code == 200  # duplicate of identical bytes is a success
    doc = r.json()
    item = doc["00081199"]["Value"][0]
    assert item["00081155"]["Value"] == [sop]
    assert item["00081190"]["Value"] == [f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}"]
    assert doc["00081190"]["Value"] == [f"{srv.dicomweb_url}/studies/{st}"]


def test_stow_garbage_part_all_failed_409(loaded, srv):
    body, ct = _multipart([b"this is not dicom" * 100])
    r = requests.post(f"{srv.dicomweb_url}/studies", data=body, headers={"Content-Type": ct})
    assert r.status_code == 409
    failed = r.json()["00081198"]["Value"]
    assert failed[0]["00081197"]["Value"] == [0xC000]
    assert "Warning" in r.headers


def test_stow_partial_202(loaded, srv, tmp_path):
    good = factory.secondary_capture(tmp_path / "g.dcm", patient_id="PSTOW")
    body, ct = _multipart([good.read_bytes(), b"\x00" * 500])
    r = requests.post(f"{srv.dicomweb_url}/studies", data=body, headers={"Content-Type": ct})
    assert r.status_code == 202
    doc = r.json()
    assert len(doc["00081199"]["Value"]) == 1 and len(doc["00081198"]["Value"]) == 1
    assert requests.get(f"{srv.dicomweb_url}/studies", params={"PatientID": "PSTOW"}).json()


def test_stow_study_mismatch_409(loaded, srv, tmp_path):
    other = factory.secondary_capture(tmp_path / "o.dcm", patient_id="PMIS")
    body, ct = _multipart([other.read_bytes()])
    r = requests.post(f"{srv.dicomweb_url}/studies/{loaded['study']}", data=body, headers={"Content-Type": ct})
    assert r.status_code == 409
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xA900]
    assert requests.get(f"{srv.dicomweb_url}/studies", params={"PatientID": "PMIS"}).json() == []


def test_stow_truncated_instance_in_complete_part_409(loaded, srv, tmp_path):
    data = loaded["levels"][1].read_bytes()
    body, ct = _multipart([data[: len(data) - 5000]])
    r = requests.post(f"{srv.dicomweb_url}/studies", data=body, headers={"Content-Type": ct})
    assert r.status_code == 409
    assert r.json()["00081198"]["Value"][0]["00081197"]["Value"] == [0xC000]
    assert "truncated" in r.headers["Warning"]


def test_stow_wrong_media_type_415(srv, loaded):
    r = requests.post(f"{srv.dicomweb_url}/studies", data=b"{}", headers={"Content-Type": "application/json"})
    assert r.status_code == 415
    r = requests.post(f"{srv.dicomweb_url}/studies", data=b"x",
                      headers={"Content-Type": 'multipart/related; type="application/dicom+json"; boundary=x'})
    assert r.status_code == 415


def test_stow_no_parts_400(srv, loaded):
    r = requests.post(f"{srv.dicomweb_url}/studies", data=b"--b--\r\n",
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=b'})
    assert r.status_code == 400


def test_stow_truncated_upload_stores_nothing(srv, loaded, tmp_path):
    inst = factory.secondary_capture(tmp_path / "t.dcm", patient_id="PTRUNC").read_bytes()
    body, ct = _multipart([inst])
    cut = body[: len(body) // 2]
    port = srv.http_port
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall((f"POST /dicomweb/studies HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Type: {ct}\r\n"
                   f"Content-Length: {len(body)}\r\n\r\n").encode() + cut)
        s.shutdown(socket.SHUT_WR)
        s.settimeout(10)
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
    # nothing partial, and the server still serves
    r = requests.get(f"{srv.dicomweb_url}/studies", params={"PatientID": "PTRUNC"})
    assert r.status_code == 200 and r.json() == []
    tmp_dirs = list((srv.data_dir / "hot" / "tmp").glob("*/stow-*"))
    assert tmp_dirs == []


# -- QIDO-RS -------------------------------------------------------------------------

def test_qido_studies_modalities_sm(loaded, client):
    found = client.search_for_studies(search_filters={"ModalitiesInStudy": "SM"})
    uids = [d["0020000D"]["Value"][0] for d in found]
    assert loaded["study"] in uids
    doc = next(d for d in found if d["0020000D"]["Value"][0] == loaded["study"])
    assert doc["00201208"]["Value"] == [6]  # NumberOfStudyRelatedInstances
    assert doc["00201206"]["Value"] == [1]
    assert doc["00081190"]["Value"][0].endswith(f"/dicomweb/studies/{loaded['study']}")
    for d in found:
        assert "SM" in d["00080061"]["Value"]


def test_qido_matching_rules(loaded, client, srv):
    u = srv.dicomweb_url
    assert [d["00100020"]["Value"][0] for d in requests.get(f"{u}/studies", params={"PatientID": "PW1"}).json()] == ["PW1"]
    assert len(requests.get(f"{u}/studies", params={"PatientName": "slide*"}).json()) == 1  # PN case-insensitive wildcard
    assert requests.get(f"{u}/studies", params={"PatientName": "sa"}).json() == []
    fz = requests.get(f"{u}/studies", params={"PatientName": "sa", "fuzzymatching": "true"}).json()
    assert [d["00100020"]["Value"][0] for d in fz] == ["PW1"]
    rng = requests.get(f"{u}/studies", params={"StudyDate": "20250101-20251231"}).json()
    assert {d["00100020"]["Value"][0] for d in rng} == {"P2"}
    by_tag = requests.get(f"{u}/studies", params={"00080050": "ACCN"}).json()
    assert [d["00100020"]["Value"][0] for d in by_tag] == ["PN1"]
    uid_list = requests.get(f"{u}/studies", params={"StudyInstanceUID": f"{loaded['study']},1.2.3"}).json()
    assert len(uid_list) == 1


def test_qido_series_and_instances_resources(loaded, client, srv):
    st, se = loaded["study"], loaded["series"]
    series = client.search_for_series(st)
    assert [s["0020000E"]["Value"][0] for s in series] == [se]
    assert series[0]["00080060"]["Value"] == ["SM"] and series[0]["00201209"]["Value"] == [6]
    all_series = client.search_for_series(search_filters={"Modality": "SM"})
    s0 = next(s for s in all_series if s["0020000E"]["Value"][0] == se)
    assert s0["0020000D"]["Value"] == [st] and "00100020" in s0  # study attributes for /series
    insts = client.search_for_instances(st, se)
    assert len(insts) == 6
    assert {i["00280008"]["Value"][0] for i in insts} >= {12, 4, 1}
    insts_study = client.search_for_instances(st, fields=["AvailableTransferSyntaxUID"],
                                              search_filters={"SOPClassUID": factory.WSI,
                                                              "SeriesInstanceUID": [se], "Modality": "SM"})
    assert len(insts_study) == 6 and insts_study[0]["00083002"]["Value"] == [JPEG_TS]
    every = requests.get(f"{srv.dicomweb_url}/instances", params={"PatientID": "PW1"}).json()
    assert len(every) == 6 and "00100020" in every[0] and "00080060" in every[0]


def test_qido_includefield_limit_offset(loaded, srv):
    u = f"{srv.dicomweb_url}/studies/{loaded['study']}/series/{loaded['series']}/instances"
    d = requests.get(u, params={"includefield": "ImageType,00480006", "limit": "2"}).json()
    assert len(d) == 2 and "00080008" in d[0] and "00480006" in d[0]
    d2 = requests.get(u, params=[("includefield", "ContainerIdentifier"), ("includefield", "ImagedVolumeWidth")]).json()
    assert "00400512" in d2[0] and "00480001" in d2[0]  # the latter only in full metadata
    page = requests.get(u, params={"limit": "2", "offset": "4"}).json()
    full = requests.get(u).json()
    assert [x["00080018"] for x in page] == [x["00080018"] for x in full[4:6]]
    r = requests.get(u, params={"limit": "1"})
    assert "additional results" in r.headers.get("Warning", "")
    a = requests.get(u, params={"includefield": "all"}).json()
    assert "00480105" in a[0]  # OpticalPathSequence from the full metadata
    icc = a[0]["00480105"]["Value"][0]["00282000"]["BulkDataURI"]
    assert icc.startswith(srv.dicomweb_url + "/studies/")


@pytest.mark.parametrize("params", [
    {"StudyDate": "2026"}, {"StudyDate": "20261301x"}, {"NoSuchKeyword": "1"},
    {"limit": "-1"}, {"limit": "ten"}, {"offset": "-5"}, {"fuzzymatching": "maybe"},
    {"includefield": "NotAnAttribute"},
])
def test_qido_invalid_parameters_400(srv, loaded, params):
    r = requests.get(f"{srv.dicomweb_url}/studies", params=params)
    assert r.status_code == 400
    assert r.text.strip()


def test_qido_empty_result_is_200_empty_list(srv, loaded, client):
    r = requests.get(f"{srv.dicomweb_url}/studies", params={"PatientID": "NOBODY"})
    assert r.status_code == 200 and r.json() == []
    assert client.search_for_studies(search_filters={"PatientID": "NOBODY"}) == []


def test_qido_xml(srv, loaded):
    r = requests.get(f"{srv.dicomweb_url}/studies", params={"PatientID": "PW1"},
                     headers={"Accept": 'multipart/related; type="application/dicom+xml"'})
    assert r.status_code == 200
    parts = _parts(r)
    assert len(parts) == 1 and parts[0][0]["Content-Type"] == "application/dicom+xml"
    import xml.etree.ElementTree as ET
    root = ET.fromstring(parts[0][1])
    ns = {"n": "http://dicom.nema.org/PS3.19/models/NativeDICOM"}
    pid = root.find("n:DicomAttribute[@tag='00100020']/n:Value", ns)
    assert pid is not None and pid.text == "PW1"
    fam = root.find("n:DicomAttribute[@keyword='PatientName']/n:PersonName/n:Alphabetic/n:FamilyName", ns)
    assert fam is not None and fam.text == "Slide"
    r = requests.get(f"{srv.dicomweb_url}/studies", headers={"Accept": "text/html"})
    assert r.status_code == 406


# -- WADO-RS: frames -------------------------------------------------------------------

def test_frames_stored_bytes_via_dicomweb_client(loaded, client):
    for path in loaded["levels"]:
        st, se, sop = _uids(path)
        expected = _frames(path)
        nums = list(range(1, len(expected) + 1))
        got = client.retrieve_instance_frames(st, se, sop, nums, media_types=(("application/octet-stream", "*"),))
        assert got == expected
        got = client.retrieve_instance_frames(st, se, sop, [1], media_types=(("image/jpeg", JPEG_TS),))
        assert got == expected[:1]
        assert client.retrieve_instance_frames(st, se, sop, [1]) == expected[:1]  # default */*


def test_frames_in_request_order_and_content_types(loaded, srv):
    path = loaded["levels"][0]
    st, se, sop = _uids(path)
    expected = _frames(path)
    u = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}/frames/5,1,12,1"
    r = requests.get(u, headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'})
    assert r.status_code == 200
    parts = _parts(r)
    assert [d for _, d in parts] == [expected[4], expected[0], expected[11], expected[0]]
    assert parts[0][0]["Content-Type"] == f"application/octet-stream; transfer-syntax={JPEG_TS}"
    r = requests.get(u, headers={"Accept": 'multipart/related; type="image/jpeg"; transfer-syntax=*'})
    assert r.status_code == 200 and _parts(r)[0][0]["Content-Type"] == f"image/jpeg; transfer-syntax={JPEG_TS}"
    # single part for one frame
    r = requests.get(u.replace("5,1,12,1", "3"), headers={"Accept": "image/jpeg"})
    assert r.status_code == 200 and r.content == expected[2] and r.headers["Content-Type"].startswith("image/jpeg")


def test_frames_decoded_explicit_le(loaded, srv):
    path = loaded["levels"][1]
    st, se, sop = _uids(path)
    u = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}/frames/2"
    r = requests.get(u, headers={"Accept": f'multipart/related; type="application/octet-stream"; transfer-syntax={ELE_TS}'})
    assert r.status_code == 200
    (hdr, data), = _parts(r)
    assert hdr["Content-Type"] == f"application/octet-stream; transfer-syntax={ELE_TS}"
    ref = pydicom.dcmread(path).pixel_array[1]
    got = np.frombuffer(data, np.uint8).reshape(ref.shape)
    assert np.abs(got.astype(int) - ref.astype(int)).max() <= 2


def test_frames_native_pass_through_and_jpeg_transcode(loaded, srv):
    path = loaded["native"][0]
    st, se, sop = _uids(path)
    expected = _frames(path)
    u = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}/frames/2"
    for accept in ('multipart/related; type="application/octet-stream"',
                   f'multipart/related; type="application/octet-stream"; transfer-syntax={ELE_TS}',
                   'multipart/related; type="application/octet-stream"; transfer-syntax=*'):
        r = requests.get(u, headers={"Accept": accept})
        assert r.status_code == 200 and _parts(r)[0][1] == expected[1]
    r = requests.get(u, headers={"Accept": 'multipart/related; type="image/jpeg"'})
    assert r.status_code == 200
    img = np.asarray(Image.open(io.BytesIO(_parts(r)[0][1])).convert("RGB"))
    assert img.shape == (256, 256, 3)


def test_frames_errors(loaded, srv):
    st, se, sop = _uids(loaded["levels"][0])
    base = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances"
    ts_any = {"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*'}
    assert requests.get(f"{base}/{sop}/frames/13", headers=ts_any).status_code == 404
    assert requests.get(f"{base}/{sop}/frames/0", headers=ts_any).status_code == 400
    assert requests.get(f"{base}/{sop}/frames/1,x", headers=ts_any).status_code == 400
    assert requests.get(f"{base}/1.2.3.4/frames/1", headers=ts_any).status_code == 404
    assert requests.get(f"{srv.dicomweb_url}/studies/1.2.3/series/{se}/instances/{sop}/frames/1",
                        headers=ts_any).status_code == 404
    r = requests.get(f"{base}/{sop}/frames/1", headers={"Accept": 'multipart/related; type="image/jp2"'})
    assert r.status_code == 406 and r.text.strip()


# -- WADO-RS: metadata, bulk data, instances ---------------------------------------------

def test_series_metadata_and_bulkdata(loaded, client, srv):
    st, se = loaded["study"], loaded["series"]
    meta = client.retrieve_series_metadata(st, se)
    assert len(meta) == 6
    for m in meta:
        sop = m["00080018"]["Value"][0]
        assert m["7FE00010"]["BulkDataURI"] == f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}/frames"
        icc_uri = m["00480105"]["Value"][0]["00282000"]["BulkDataURI"]
        r = requests.get(icc_uri, headers={"Accept": "application/octet-stream"})
        assert r.status_code == 200 and r.content == ICC
        r = requests.get(icc_uri)  # default multipart
        assert r.status_code == 200 and _parts(r)[0][1] == ICC
    bulk = client.retrieve_bulkdata(meta[0]["00480105"]["Value"][0]["00282000"]["BulkDataURI"])
    assert bulk == [ICC]
    # the Pixel Data BulkDataURI resolves to all frames, in order
    base_meta = next(m for m in meta if m["00080018"]["Value"][0] == _uids(loaded["levels"][1])[2])
    frames = client.retrieve_bulkdata(base_meta["7FE00010"]["BulkDataURI"],
                                      media_types=(("application/octet-stream", "*"),))
    assert frames == _frames(loaded["levels"][1])


def test_metadata_etag_gzip_and_forwarded_base(loaded, srv):
    u = f"{srv.dicomweb_url}/studies/{loaded['study']}/series/{loaded['series']}/metadata"
    r = requests.get(u)
    assert r.status_code == 200 and r.headers["Content-Type"] == "application/dicom+json"
    assert r.headers.get("Content-Encoding") == "gzip"  # requests sends Accept-Encoding: gzip
    etag = r.headers["ETag"]
    r2 = requests.get(u, headers={"If-None-Match": etag})
    assert r2.status_code == 304 and r2.content == b""
    r3 = requests.get(u, headers={"Accept-Encoding": "identity"})
    assert "Content-Encoding" not in r3.headers and json.loads(r3.content) == r.json()
    r4 = requests.get(u, headers={"X-Forwarded-Proto": "https", "X-Forwarded-Host": "pacs.example.org"})
    assert r4.json()[0]["7FE00010"]["BulkDataURI"].startswith("https://pacs.example.org/dicomweb/studies/")
    assert r4.headers["ETag"] != etag
    assert requests.get(u.replace(loaded["series"], "1.2.3")).status_code == 404
    assert requests.get(f"{srv.dicomweb_url}/studies/1.2.3/metadata").status_code == 404


def test_retrieve_instance_series_study_bytes(loaded, client, srv):
    st, se = loaded["study"], loaded["series"]
    r = requests.get(f"{srv.dicomweb_url}/studies/{st}/series/{se}",
                     headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert r.status_code == 200
    got = {pydicom.dcmread(io.BytesIO(d), stop_before_pixels=True).SOPInstanceUID: d for _, d in _parts(r)}
    assert len(got) == 6
    for sop, data in got.items():
        assert data == loaded["by_sop"][sop].read_bytes()
    ds = client.retrieve_instance(*_uids(loaded["sc"]))
    assert ds.SOPInstanceUID == _uids(loaded["sc"])[2]
    study_all = client.retrieve_study(st)
    assert len(study_all) == 6


def test_retrieve_instance_explicit_le_transcode(loaded, srv):
    path = loaded["levels"][2]
    st, se, sop = _uids(path)
    r = requests.get(f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}",
                     headers={"Accept": f'multipart/related; type="application/dicom"; transfer-syntax={ELE_TS}'})
    assert r.status_code == 200
    (hdr, data), = _parts(r)
    assert hdr["Content-Type"] == f"application/dicom; transfer-syntax={ELE_TS}"
    ds = pydicom.dcmread(io.BytesIO(data))
    assert ds.file_meta.TransferSyntaxUID == ELE_TS
    ref = pydicom.dcmread(path).pixel_array
    assert np.abs(ds.pixel_array.astype(int) - ref.astype(int)).max() <= 2
    r = requests.get(f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}",
                     headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.4.90'})
    assert r.status_code == 406
    assert requests.get(f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/1.2.3").status_code == 404


# -- rendered / thumbnails (Slim's LABEL / OVERVIEW requests) ---------------------------------

def _by_type(loaded, kind):
    return next(p for p in loaded["extra"] if p.stem == kind)


def test_rendered_label_overview_viewport(loaded, srv):
    for kind in ("LABEL", "OVERVIEW"):
        st, se, sop = _uids(_by_type(loaded, kind))
        u = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}/rendered"
        r = requests.get(u, headers={"Accept": "image/jpeg"})
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == (200, 150)
        r = requests.get(u, params={"viewport": "100,100"}, headers={"Accept": "image/png"})
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/png"
        assert Image.open(io.BytesIO(r.content)).size == (100, 75)
        r = requests.get(u, params={"iccprofile": "yes", "quality": "50"})
        assert Image.open(io.BytesIO(r.content)).info.get("icc_profile") == ICC
        assert "icc_profile" not in Image.open(io.BytesIO(requests.get(u).content)).info


def test_rendered_frame_and_errors(loaded, srv):
    st, se, sop = _uids(loaded["levels"][0])
    u = f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}"
    r = requests.get(f"{u}/frames/3/rendered", headers={"Accept": "image/png"})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (256, 256)
    assert requests.get(f"{u}/rendered", params={"quality": "0"}).status_code == 400
    assert requests.get(f"{u}/rendered", params={"viewport": "a,b"}).status_code == 400
    assert requests.get(f"{u}/rendered", params={"iccprofile": "maybe"}).status_code == 400
    assert requests.get(f"{u}/rendered", headers={"Accept": "image/tiff"}).status_code == 406
    assert requests.get(f"{u}/frames/99/rendered").status_code == 404
    r = requests.get(f"{u}/rendered", params={"viewport": "128,128"})  # whole 1024x768 level
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (128, 96)


def test_thumbnails(loaded, srv):
    st, se = loaded["study"], loaded["series"]
    thumb = _by_type(loaded, "THUMBNAIL")
    for u in (f"/studies/{st}/thumbnail", f"/studies/{st}/series/{se}/thumbnail"):
        r = requests.get(srv.dicomweb_url + u)
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
        assert Image.open(io.BytesIO(r.content)).size == (200, 150)  # the THUMBNAIL image, not a level
    st2, se2, sop2 = _uids(loaded["native"][0])
    r = requests.get(f"{srv.dicomweb_url}/studies/{st2}/series/{se2}/thumbnail", params={"viewport": "64,64"})
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (64, 32)
    r = requests.get(f"{srv.dicomweb_url}/studies/{st2}/series/{se2}/instances/{sop2}/thumbnail")
    assert r.status_code == 200
    assert requests.get(f"{srv.dicomweb_url}/studies/1.2.3/thumbnail").status_code == 404
    assert thumb.exists()


# -- viewers and AI nodes --------------------------------------------------------------

def test_slim_request_pattern(loaded, srv):
    """What Slim / dicom-microscopy-viewer send, in order, with their headers."""
    u = srv.dicomweb_url
    origin = {"Origin": "http://localhost:8008"}
    studies = requests.get(f"{u}/studies", params={"ModalitiesInStudy": "SM", "limit": "25", "offset": "0",
                                                   "fuzzymatching": "false", "includefield": "StudyDescription"},
                           headers={"Accept": "application/dicom+json", **origin})
    assert studies.status_code == 200 and studies.headers["Access-Control-Allow-Origin"] == "*"
    st = loaded["study"]
    series = requests.get(f"{u}/studies/{st}/series", params={"Modality": "SM"},
                          headers={"Accept": "application/dicom+json", **origin}).json()
    se = series[0]["0020000E"]["Value"][0]
    meta = requests.get(f"{u}/studies/{st}/series/{se}/metadata",
                        headers={"Accept": "application/dicom+json", **origin}).json()
    vol = [m for m in meta if "VOLUME" in m["00080008"]["Value"]]
    assert len(vol) == 3
    base = max(vol, key=lambda m: m["00480006"]["Value"][0])
    sop = base["00080018"]["Value"][0]
    r = requests.get(f"{u}/studies/{st}/series/{se}/instances/{sop}/frames/7",
                     headers={"Accept": 'multipart/related; type="image/jpeg"; transfer-syntax=*', **origin})
    assert r.status_code == 200 and _parts(r)[0][1] == _frames(loaded["by_sop"][sop])[6]
    r = requests.get(f"{u}/studies/{st}/series/{se}/instances/{sop}/frames/7",
                     headers={"Accept": 'multipart/related; type="application/octet-stream"; transfer-syntax=*', **origin})
    assert _parts(r)[0][1] == _frames(loaded["by_sop"][sop])[6]
    label = next(m for m in meta if "LABEL" in m["00080008"]["Value"])
    r = requests.get(f"{u}/studies/{st}/series/{se}/instances/{label['00080018']['Value'][0]}/rendered",
                     params={"viewport": "300,300"}, headers={"Accept": "image/jpeg", **origin})
    assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "*"


def test_cors_preflight_with_authorization(srv, loaded):
    r = requests.options(f"{srv.dicomweb_url}/studies", headers={
        "Origin": "https://viewer.example", "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, accept"})
    assert r.status_code == 204
    assert r.headers["Access-Control-Allow-Origin"] == "*"
    assert "authorization" in r.headers["Access-Control-Allow-Headers"].lower()
    assert "GET" in r.headers["Access-Control-Allow-Methods"] and "POST" in r.headers["Access-Control-Allow-Methods"]


def test_cors_default_allows_no_foreign_origin(tmp_path, corpus):
    s = _start(tmp_path)
    try:
        u = s.dicomweb_url
        r = requests.options(f"{u}/studies", headers={"Origin": "https://viewer.example",
                                                       "Access-Control-Request-Method": "GET"})
        assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
        assert "http.cors_origins" in r.text
        r = requests.get(f"{u}/studies", headers={"Origin": "https://viewer.example"})
        assert r.status_code == 200 and "Access-Control-Allow-Origin" not in r.headers
    finally:
        s.stop()


def test_cors_configured_origins(tmp_path, corpus):
    s = _start(tmp_path, '[http]\ncors_origins = ["https://viewer.example"]\n')
    try:
        u = s.dicomweb_url
        pre = {"Access-Control-Request-Method": "GET", "Access-Control-Request-Headers": "Authorization"}
        r = requests.options(f"{u}/studies", headers={"Origin": "https://viewer.example", **pre})
        assert r.status_code == 204 and r.headers["Access-Control-Allow-Origin"] == "https://viewer.example"
        assert r.headers["Access-Control-Allow-Headers"] == "Authorization"
        r = requests.options(f"{u}/studies", headers={"Origin": "https://evil.example", **pre})
        assert r.status_code == 403 and "Access-Control-Allow-Origin" not in r.headers
        r = requests.get(f"{u}/studies", headers={"Origin": "https://viewer.example", "Authorization": "Bearer x"})
        assert r.status_code == 200 and r.headers["Access-Control-Allow-Origin"] == "https://viewer.example"
        assert "Origin" in r.headers["Vary"]
        r = requests.get(f"{u}/studies", headers={"Origin": "https://evil.example"})
        assert "Access-Control-Allow-Origin" not in r.headers
    finally:
        s.stop()


def test_wsidicom_region_over_web_equals_local(loaded, srv):
    from wsidicom import WsiDicom, WsiDicomWebClient

    client = WsiDicomWebClient.create_client(srv.dicomweb_url)
    with WsiDicom.open_web(client, loaded["study"], loaded["series"]) as web, \
            WsiDicom.open(loaded["levels"] + loaded["extra"]) as local:
        assert len(web.levels) == len(local.levels) == 3
        for level in (0, 1):
            a = np.asarray(web.read_region((100, 90), level, (300, 200)))
            b = np.asarray(local.read_region((100, 90), level, (300, 200)))
            assert np.array_equal(a, b)
        assert np.array_equal(np.asarray(web.read_label()), np.asarray(local.read_label()))
        assert np.array_equal(np.asarray(web.read_tile(0, (2, 1))), np.asarray(local.read_tile(0, (2, 1))))


def test_index_page_and_unknown_routes(srv, loaded):
    r = requests.get(srv.http_url + "/")
    # a static shell (the study list comes from QIDO in the browser): no patient data in it
    assert r.status_code == 200 and 'src="static/browser/browser.js"' in r.text and loaded["study"] not in r.text
    assert r.headers["Cache-Control"] == "no-store" and "default-src 'self'" in r.headers["Content-Security-Policy"]
    assert "script-src 'self'" in r.headers["Content-Security-Policy"] and "unsafe-inline" not in r.headers["Content-Security-Policy"]
    js = requests.get(srv.http_url + "/static/browser/browser.js")  # public: it holds no data
    assert js.status_code == 200 and "api/whoami" in js.text and "javascript" in js.headers["Content-Type"]
    assert requests.get(srv.dicomweb_url + "/nothing/here").status_code == 404


def test_server_survives_bad_requests(srv, loaded):
    u = srv.dicomweb_url
    for _ in range(3):
        requests.post(f"{u}/studies", data=b"\xff" * 1000,
                      headers={"Content-Type": 'multipart/related; type="application/dicom"; boundary=zz'})
        requests.get(f"{u}/studies/{'9' * 70}/series")
    assert requests.get(f"{u}/studies").status_code == 200
