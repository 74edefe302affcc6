"""C-STORE keeps whatever syntax arrives; C-GET returns the same bytes in the same syntax."""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian,
    JPEG2000Lossless, RLELossless, generate_uid,
)

import factory


def _make(tmp_path, ts) -> pydicom.Dataset:
    p = factory.secondary_capture(tmp_path / f"{ts}.dcm", patient_id=f"TS-{ts}")
    ds = pydicom.dcmread(p)
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.Rows = ds.Columns = 64
    ds.PixelData = (np.arange(64 * 64) % 251).astype(np.uint8).tobytes()
    if ts in (RLELossless, JPEG2000Lossless):
        ds.compress(ts, generate_instance_uid=False)
    else:
        ds.file_meta.TransferSyntaxUID = ts
    ds.save_as(p, enforce_file_format=True)
    return p


@pytest.mark.parametrize("ts", [ImplicitVRLittleEndian, ExplicitVRLittleEndian,
                                DeflatedExplicitVRLittleEndian, RLELossless, JPEG2000Lossless])
def test_stored_as_received(server, tmp_path, ts):
    p = _make(tmp_path, ts)
    # pynetdicom proposes exactly the file's syntax and sends its bytes as they are; dcmsend
    # would offer (and we'd accept) explicit VR LE for an implicit file.
    from pynetdicom import AE, _config
    ae = AE(ae_title="SENDER")
    ae.add_requested_context(factory.SECONDARY_CAPTURE, [ts])
    old, _config.STORE_SEND_CHUNKED_DATASET = _config.STORE_SEND_CHUNKED_DATASET, True
    try:
        a = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet)
        assert a.is_established
        status = a.send_c_store(p)
        a.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = old
    assert status.Status == 0x0000
    blobs = [b for b in (server.data_dir / "hot" / "blobs").rglob("*") if b.is_file()]
    assert len(blobs) == 1
    stored = pydicom.dcmread(blobs[0])
    assert stored.file_meta.TransferSyntaxUID == ts
    original = pydicom.dcmread(p)
    assert stored.PixelData == original.PixelData
    assert np.array_equal(stored.pixel_array, original.pixel_array)
