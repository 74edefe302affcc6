"""The archive over a store that has no local files and no inline reads (as object storage
is): every reader takes the streaming path, behind the BlobStore interface. A real C-GET
(pynetdicom SCU) and real frame reads, in-process, over such a store."""
from __future__ import annotations

import asyncio
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import generate_frames
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelGet

import factory
from archive.config import Config
from archive.dimse import DimseServer
from archive.service import Archive, AsyncArchive
from archive.status import Damaged
from conftest import free_port
from storage_tiers import FilesystemStore


class NoLocalFiles(FilesystemStore):
    """The filesystem store without its two local shortcuts: it hands out no file path and
    its ranged reads are not cheap enough to run on an event loop."""

    inline_reads = False

    def local_path(self, key: str) -> Path | None:
        return None


@pytest.fixture
def arc(tmp_path):
    data = tmp_path / "data"
    cfg = Config(data_dir=data, host="127.0.0.1", dicom_port=free_port())
    a = Archive(cfg, tiers={"hot": NoLocalFiles(data / "hot", name="hot")})
    yield a
    a.close()


def _frames(path: Path) -> list[bytes]:
    ds = pydicom.dcmread(path)
    return list(generate_frames(ds.PixelData, number_of_frames=int(ds.NumberOfFrames)))


def test_frames_and_instances_without_local_files(arc, tmp_path):
    files = factory.wsi_series(tmp_path / "in", levels=((512, 512),))
    assert arc.ingest_file(files[0]).ok
    sop = str(pydicom.dcmread(files[0], stop_before_pixels=True).SOPInstanceUID)
    rec = arc.instance(sop)
    aarc = AsyncArchive(arc)
    try:
        table, datas = asyncio.run(aarc.frames(sop, [1, 2, 3, 4]))  # on a thread: reads not inline
    finally:
        aarc.close()
    assert datas == _frames(files[0])
    assert b"".join(arc.instance_chunks(rec)) == files[0].read_bytes()
    with arc.instance_file(rec) as path:  # a verified staging copy, removed afterwards
        assert path.read_bytes() == files[0].read_bytes() and path.parent == arc.tmp_dir
    assert not path.exists()


@pytest.fixture(params=["no local files", "local files"])
def any_arc(request, tmp_path):
    data = tmp_path / "data"
    cfg = Config(data_dir=data, host="127.0.0.1", dicom_port=free_port())
    store = NoLocalFiles if request.param == "no local files" else FilesystemStore
    a = Archive(cfg, tiers={"hot": store(data / "hot", name="hot")})
    yield a
    a.close()


def test_c_get_never_sends_a_damaged_instance(any_arc, tmp_path):
    """From a store without local files (a verified staging copy is sent) and from the
    filesystem store (its file is hashed while pynetdicom reads it, and a mismatch fails the
    sub-operation before its last fragment): the damaged instance is a counted failure."""
    arc = any_arc
    files = factory.wsi_series(tmp_path / "in")
    for f in files:
        assert arc.ingest_file(f).ok
    ds0 = pydicom.dcmread(files[0], stop_before_pixels=True)
    # rot the second instance: it must be counted as a failed sub-operation, not sent
    bad = pydicom.dcmread(files[1], stop_before_pixels=True)
    rec = arc.instance(str(bad.SOPInstanceUID))
    blob = arc.tiers["hot"].path_of(rec.blob.key)
    raw = bytearray(blob.read_bytes())
    raw[-200] ^= 0xFF
    blob.write_bytes(bytes(raw))
    with pytest.raises(Damaged):
        with arc.instance_file(rec):
            pass
    arc._reported.clear()  # so the send reports it again (one fixity line per problem and process)

    server = DimseServer(arc)
    server.start()
    received: dict[str, bytes] = {}

    def on_store(event):
        # in this process pynetdicom receives data sets into a file (the server set that up)
        received[str(event.request.AffectedSOPInstanceUID)] = Path(event.dataset_path).read_bytes()
        return 0x0000

    try:
        ae = AE(ae_title="GETSCU")
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        ae.add_requested_context(factory.WSI, ["1.2.840.10008.1.2.4.50"])
        role = build_role(factory.WSI, scp_role=True)
        assoc = ae.associate("127.0.0.1", arc.config.dicom_port, ae_title=arc.config.aet, ext_neg=[role],
                             evt_handlers=[(evt.EVT_C_STORE, on_store)])
        assert assoc.is_established
        q = pydicom.Dataset()
        q.QueryRetrieveLevel = "STUDY"
        q.StudyInstanceUID = ds0.StudyInstanceUID
        last = None
        for status, ident in assoc.send_c_get(q, StudyRootQueryRetrieveInformationModelGet):
            last = (status, ident)
        assoc.release()
    finally:
        server.stop()
    status, ident = last
    assert str(bad.SOPInstanceUID) not in received
    by_sop = {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in files}
    for sop, got in received.items():  # whatever arrived arrived whole, as stored
        assert _frames(by_sop[sop])[0] in got
    if isinstance(arc.tiers["hot"], NoLocalFiles):
        # proven before sending: a clean failed sub-operation, the others complete
        assert status.Status == 0xB000 and status.NumberOfFailedSuboperations == 1
        assert status.NumberOfCompletedSuboperations == len(files) - 1
        failed = ident.FailedSOPInstanceUIDList
        assert str(bad.SOPInstanceUID) in ([failed] if isinstance(failed, str) else list(failed))
        assert len(received) == len(files) - 1
    else:
        # found while sending: the message cannot be completed, the association is aborted
        assert assoc.is_aborted and "Status" not in status  # no final (success) response
