"""The ingest function itself: frame tables for every fragment layout, crash sweeps, shutdown."""
from __future__ import annotations

import signal
import struct

import pydicom
import pytest
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.uid import generate_uid

import factory
from archive.records import BlobRef
from archive.service import Archive
from archive.status import NotFound, Outcome


def _frames_from_archive(arc: Archive, sop: str, n: int) -> list[bytes]:
    out = []
    for i in range(1, n + 1):
        out.append(arc.frames(sop, [i])[1][0])
    for k in (n + 1, 0):
        with pytest.raises(NotFound):
            arc.frames(sop, [k])
    return out


def _instance(tmp_path, name: str, pixel_data: bytes, n: int, extra=None):
    ds = factory.wsi_instance(generate_uid(), generate_uid(), 256 * n, 256)
    ds.NumberOfFrames = n
    ds.PixelData = pixel_data
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
    if extra:
        extra(ds)
    p = tmp_path / f"{name}.dcm"
    ds.save_as(p, enforce_file_format=True)
    return p, ds


@pytest.fixture
def arc(tmp_path):
    a = Archive.open(tmp_path / "data")
    yield a
    a.close()


def _tiles(n: int) -> list[bytes]:
    return [factory.jpeg_tile(100 + i, 256) for i in range(n)]


def test_one_fragment_per_frame_with_bot(arc, tmp_path):
    tiles = _tiles(4)
    p, ds = _instance(tmp_path, "bot", encapsulate(tiles, has_bot=True), 4)
    assert arc.ingest_file(p).outcome is Outcome.STORED
    assert _frames_from_archive(arc, ds.SOPInstanceUID, 4) == [t + b"\0" * (len(t) % 2) for t in tiles]


def test_several_fragments_per_frame_with_bot(arc, tmp_path):
    tiles = _tiles(3)
    p, ds = _instance(tmp_path, "multi", encapsulate(tiles, fragments_per_frame=3, has_bot=True), 3)
    assert arc.ingest_file(p).outcome is Outcome.STORED
    expected = list(generate_frames(pydicom.dcmread(p).PixelData, number_of_frames=3))
    assert _frames_from_archive(arc, ds.SOPInstanceUID, 3) == expected


def test_several_fragments_per_frame_with_extended_offset_table(arc, tmp_path):
    tiles = _tiles(3)
    # pydicom's extended encapsulation: one fragment per frame; split each into two by hand.
    items = []
    for t in tiles:
        t = t + b"\0" * (len(t) % 2)
        half = (len(t) // 4) * 2
        items.append([t[:half], t[half:]])
    body = b""
    offsets = []
    for frags in items:
        offsets.append(len(body))
        for f in frags:
            body += struct.pack("<HHI", 0xFFFE, 0xE000, len(f)) + f
    pixel = struct.pack("<HHI", 0xFFFE, 0xE000, 0) + body + struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    lengths = [sum(len(f) for f in frags) for frags in items]

    def add_eot(ds):
        ds.ExtendedOffsetTable = struct.pack(f"<{len(offsets)}Q", *offsets)
        ds.ExtendedOffsetTableLengths = struct.pack(f"<{len(lengths)}Q", *lengths)

    # pydicom would re-wrap PixelData; write the encapsulated value verbatim.
    p, ds = _instance(tmp_path, "eot", encapsulate(tiles, has_bot=False), 3, add_eot)
    raw = p.read_bytes()
    start = raw.rindex(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12
    p.write_bytes(raw[:start] + pixel)
    assert arc.ingest_file(p).outcome is Outcome.STORED
    assert _frames_from_archive(arc, ds.SOPInstanceUID, 3) == [b"".join(f) for f in items]


def test_no_offset_table_split_by_jpeg_markers(arc, tmp_path):
    tiles = _tiles(3)
    frags = []
    for t in tiles:
        t = t + b"\0" * (len(t) % 2)
        half = (len(t) // 4) * 2
        frags += [t[:half], t[half:]]
    pixel = struct.pack("<HHI", 0xFFFE, 0xE000, 0)
    for f in frags:
        pixel += struct.pack("<HHI", 0xFFFE, 0xE000, len(f)) + f
    pixel += struct.pack("<HHI", 0xFFFE, 0xE0DD, 0)
    p, ds = _instance(tmp_path, "markers", encapsulate(tiles, has_bot=False), 3)
    raw = p.read_bytes()
    start = raw.rindex(b"\xe0\x7f\x10\x00OB\x00\x00\xff\xff\xff\xff") + 12
    p.write_bytes(raw[:start] + pixel)
    assert arc.ingest_file(p).outcome is Outcome.STORED
    assert _frames_from_archive(arc, ds.SOPInstanceUID, 3) == [t + b"\0" * (len(t) % 2) for t in tiles]


def test_native_frames(arc, tmp_path):
    ds = factory.wsi_instance(generate_uid(), generate_uid(), 512, 256, transfer_syntax="1.2.840.10008.1.2.1")
    p = tmp_path / "native.dcm"
    ds.save_as(p, enforce_file_format=True)
    assert arc.ingest_file(p).outcome is Outcome.STORED
    size = 256 * 256 * 3
    assert _frames_from_archive(arc, ds.SOPInstanceUID, 2) == [ds.PixelData[:size], ds.PixelData[size:]]


def test_metadata_is_precomputed_with_bulk_data_out_of_line(arc, tmp_path):
    icc = bytes(range(256)) * 20
    p = factory.wsi_series(tmp_path / "s", levels=((512, 512),), icc_profile=icc)[0]
    assert arc.ingest_file(p).outcome is Outcome.STORED
    import json
    sop = str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
    doc = json.loads(arc.index.metadata([sop])[0])
    op = doc["00480105"]["Value"][0]
    uri = op["00282000"]["BulkDataURI"]
    assert uri.endswith("/bulkdata/00480105/0/00282000")
    assert arc.index.bulk(sop, "00480105/0/00282000") == icc
    assert "BulkDataURI" in doc["7FE00010"] and "InlineBinary" not in doc["7FE00010"]


def test_sweep_removes_dead_sessions_and_uncommitted_blobs(tmp_path):
    data = tmp_path / "data"
    a = Archive.open(data)
    # Simulate a crash between the rename into blobs/ and the index commit.
    a.index.add_pending(BlobRef("hot", "deadbeef" * 4), "no-such-session")
    blob = a.tiers["hot"].path_of("deadbeef" * 4)
    blob.parent.mkdir(parents=True, exist_ok=True)
    blob.write_bytes(b"partial")
    stale = a.staging.root / "0123456789abcdef"
    stale.mkdir()
    (stale / "x.part").write_bytes(b"half")
    a.close()
    b = Archive.open(data)
    try:
        assert not blob.exists()
        assert not stale.exists()
        assert b.index.pending() == []
    finally:
        b.close()


def test_live_session_is_not_swept(tmp_path):
    from conftest import archive_config

    data = tmp_path / "data"
    a = Archive(archive_config(data))  # the index the CLI below opens too (LMDB, or PostgreSQL with --index)
    marker = a.tmp_dir / "in-flight.part"
    marker.write_bytes(b"x")
    try:
        from conftest import run_cli
        run_cli("stats", data=data, check=True)  # another process opens (and sweeps) the archive
        assert marker.exists()
    finally:
        a.close()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_serve_stops_cleanly(make_server, sig):
    srv = make_server()
    assert srv.stop(sig) == 0
    assert "Traceback" not in srv.log()


def test_older_index_is_migrated_on_open(tmp_path):
    """An index written before PatientName was a study key gets that key rebuilt on open."""
    from archive.index import LmdbIndex
    from archive.query import Key, Searcher

    data = tmp_path / "data"
    a = Archive.open(data)
    for p in factory.wsi_series(tmp_path / "in", patient_name="Older^Anna", levels=((256, 256),)):
        assert a.ingest_file(p).ok
    with a.index.env.begin(write=True) as txn:  # make it look like schema 1 (LMDB backend internals)
        txn.delete(b"schema", db=a.index.db["state"])
        txn.drop(a.index.db["study_idx"], delete=False)
    a.close()
    idx = LmdbIndex(data / "index")
    try:
        hits = list(Searcher(idx).search("STUDY", [Key("00100010", "PN", ["older*"])]))
        assert len(hits) == 1
        hits = list(Searcher(idx).search("STUDY", [Key("00100020", "LO", ["P1"])]))
        assert len(hits) == 1
    finally:
        idx.close()
