"""A scanner file through the whole pipe: `pathpacs import` (converters -> ingest), then
`pathpacs serve`, read over DICOMweb by wsidicom and compared with the stored files."""
from __future__ import annotations

import io

import numpy as np
import pydicom
import pytest
import requests
from PIL import Image

import slide_fixtures
from conftest import Server, free_port, run_cli


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("dwconv")
    svs = tmp / "slide.svs"
    slide_fixtures.write_svs(svs)
    data = tmp / "data"
    res = run_cli("import", str(svs), "-q", data=data)
    assert res.returncode == 0, res.stderr
    srv = Server(data, free_port(), free_port()).start()
    yield srv
    srv.stop()


def _local_files(srv) -> list:
    blobs = srv.data_dir / "hot" / "blobs"
    return sorted(p for p in blobs.rglob("*") if p.is_file())


def test_converted_slide_over_dicomweb_equals_files(converted):
    from wsidicom import WsiDicom, WsiDicomWebClient

    srv = converted
    studies = requests.get(f"{srv.dicomweb_url}/studies", params={"ModalitiesInStudy": "SM"}).json()
    assert len(studies) == 1
    st = studies[0]["0020000D"]["Value"][0]
    series = requests.get(f"{srv.dicomweb_url}/studies/{st}/series").json()
    series_uids = [s["0020000E"]["Value"][0] for s in series]
    files = _local_files(srv)
    client = WsiDicomWebClient.create_client(srv.dicomweb_url)
    with WsiDicom.open_web(client, st, series_uids) as web, WsiDicom.open(files) as local:
        assert len(web.levels) == len(local.levels)
        for level in range(len(local.levels)):
            a = np.asarray(web.read_region((37, 51), level, (300, 200)))
            b = np.asarray(local.read_region((37, 51), level, (300, 200)))
            assert np.array_equal(a, b)
        if local.labels:
            assert np.array_equal(np.asarray(web.read_label()), np.asarray(local.read_label()))


def test_converted_frames_are_the_stored_bytes(converted):
    srv = converted
    insts = requests.get(f"{srv.dicomweb_url}/instances", params={"includefield": "NumberOfFrames"}).json()
    files = {pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID: p for p in _local_files(srv)}
    big = max(insts, key=lambda d: d["00280008"]["Value"][0])
    st, se, sop = (big[t]["Value"][0] for t in ("0020000D", "0020000E", "00080018"))
    ds = pydicom.dcmread(files[sop])
    from pydicom.encaps import generate_frames
    expected = list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))
    r = requests.get(f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}/frames/1",
                     headers={"Accept": 'multipart/related; type="image/jpeg"; transfer-syntax=*'})
    assert r.status_code == 200
    assert expected[0] in r.content


def test_converted_thumbnail_and_label(converted):
    srv = converted
    st = requests.get(f"{srv.dicomweb_url}/studies").json()[0]["0020000D"]["Value"][0]
    r = requests.get(f"{srv.dicomweb_url}/studies/{st}/thumbnail")
    assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
    Image.open(io.BytesIO(r.content)).verify()
    insts = requests.get(f"{srv.dicomweb_url}/studies/{st}/instances", params={"includefield": "ImageType"}).json()
    for kind in ("LABEL", "OVERVIEW"):
        found = [d for d in insts if kind in d["00080008"]["Value"]]
        for d in found:
            se, sop = d["0020000E"]["Value"][0], d["00080018"]["Value"][0]
            r = requests.get(f"{srv.dicomweb_url}/studies/{st}/series/{se}/instances/{sop}/rendered",
                             params={"viewport": "128,128"}, headers={"Accept": "image/png"})
            assert r.status_code == 200
            assert max(Image.open(io.BytesIO(r.content)).size) == 128
