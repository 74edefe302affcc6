"""Synthetic instances for tests and benchmarks: multi-level VL WSI series with JPEG tiles, and friends.

Everything is generated here; nothing is downloaded. Tiles carry a pattern that differs per
frame so byte comparisons catch a frame served from the wrong place.
"""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    VLWholeSlideMicroscopyImageStorage,
    generate_uid,
)

WSI = VLWholeSlideMicroscopyImageStorage
SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


def jpeg_tile(seed: int, size: int, quality: int = 85) -> bytes:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 255, size=(8, 8, 3), dtype=np.uint8)
    img = np.kron(base, np.ones((size // 8, size // 8, 1), dtype=np.uint8))
    out = io.BytesIO()
    Image.fromarray(img, "RGB").save(out, format="JPEG", quality=quality)
    return out.getvalue()


def _base(study: str, series: str, sop_class: str, sop: str, patient_id: str, **kw) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.PatientID = patient_id
    ds.PatientName = kw.get("patient_name", "Doe^Jane")
    ds.PatientBirthDate = kw.get("birth_date", "19700101")
    ds.PatientSex = kw.get("sex", "F")
    ds.StudyDate = kw.get("study_date", "20260102")
    ds.StudyTime = kw.get("study_time", "101500")
    ds.AccessionNumber = kw.get("accession", "ACC1")
    ds.StudyID = kw.get("study_id", "S1")
    ds.StudyDescription = kw.get("study_description", "Biopsy")
    ds.ReferringPhysicianName = ""
    ds.Modality = kw.get("modality", "SM")
    ds.SeriesNumber = kw.get("series_number", 1)
    ds.InstanceNumber = kw.get("instance_number", 1)
    ds.Manufacturer = "pathpacs-tests"
    return ds


def wsi_instance(
    study: str, series: str, width: int, height: int, tile: int = 256, *,
    sop: str | None = None, patient_id: str = "P1", seed: int = 0, image_type: str = "VOLUME",
    frame_of_reference: str | None = None, transfer_syntax: str = JPEGBaseline8Bit, **kw,
) -> Dataset:
    """One pyramid level, TILED_FULL, as a full Part 10 data set with file meta."""
    sop = sop or generate_uid()
    ds = _base(study, series, WSI, sop, patient_id, **kw)
    cols = -(-width // tile)
    rows = -(-height // tile)
    n = cols * rows
    ds.ImageType = ["ORIGINAL", "PRIMARY", image_type, "NONE"]
    ds.Rows = tile
    ds.Columns = tile
    ds.SamplesPerPixel = 3
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PlanarConfiguration = 0
    ds.NumberOfFrames = n
    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    ds.DimensionOrganizationType = "TILED_FULL"
    ds.FrameOfReferenceUID = frame_of_reference or generate_uid()
    ds.ContainerIdentifier = kw.get("container", "SLIDE-1")
    ds.BurnedInAnnotation = "NO"
    ds.SpecimenLabelInImage = "NO"
    ds.ContentDate = ds.StudyDate
    ds.ContentTime = ds.StudyTime
    ds.AcquisitionDateTime = ds.StudyDate + ds.StudyTime
    ds.ImagedVolumeWidth = width * 0.00025
    ds.ImagedVolumeHeight = height * 0.00025
    ds.ImagedVolumeDepth = 0.001
    ds.TotalPixelMatrixFocalPlanes = 1
    ds.NumberOfOpticalPaths = 1
    op = Dataset()
    op.OpticalPathIdentifier = "1"
    op.ICCProfile = kw.get("icc_profile", b"\x00" * 4096)
    ds.OpticalPathSequence = Sequence([op])
    if transfer_syntax == JPEGBaseline8Bit:
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.LossyImageCompression = "01"
        frames = [jpeg_tile(seed * 100000 + i, tile) for i in range(n)]
        ds.PixelData = encapsulate(frames, has_bot=True)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True  # so in-memory sends encode it encapsulated
    else:
        ds.PhotometricInterpretation = "RGB"
        rng = np.random.default_rng(seed)
        ds.PixelData = rng.integers(0, 255, size=(n, tile, tile, 3), dtype=np.uint8).tobytes()
        ds["PixelData"].VR = "OB"
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = WSI
    meta.MediaStorageSOPInstanceUID = sop
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    return ds


def wsi_series(outdir: Path, *, levels=((1024, 768), (512, 384), (256, 192)), tile: int = 256,
               patient_id: str = "P1", study: str | None = None, series: str | None = None,
               **kw) -> list[Path]:
    """Write a multi-level WSI series; returns the file paths, base level first."""
    outdir.mkdir(parents=True, exist_ok=True)
    study = study or generate_uid()
    series = series or generate_uid()
    frame_ref = generate_uid()
    paths = []
    for i, (w, h) in enumerate(levels):
        ds = wsi_instance(study, series, w, h, tile, patient_id=patient_id, seed=i,
                          frame_of_reference=frame_ref, instance_number=i + 1, **kw)
        p = outdir / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(p, enforce_file_format=True)
        paths.append(p)
    return paths


def secondary_capture(path: Path, *, study: str | None = None, patient_id: str = "P2",
                      transfer_syntax: str = ExplicitVRLittleEndian, **kw) -> Path:
    study = study or generate_uid()
    ds = _base(study, generate_uid(), SECONDARY_CAPTURE, generate_uid(), patient_id,
               modality=kw.pop("modality", "OT"), **kw)
    ds.Rows = 16
    ds.Columns = 16
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.ConversionType = "WSD"
    ds.PixelData = bytes(range(256))
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SECONDARY_CAPTURE
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    ds.file_meta = meta
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_streamed(path: Path, header: Dataset, frames, number_of_frames: int) -> int:
    """Write a Part 10 file with encapsulated frames from an iterator, never all in memory.
    `header` must not contain Pixel Data; returns the file size."""
    import struct

    header.NumberOfFrames = number_of_frames
    with open(path, "wb") as fh:
        header.save_as(fh, enforce_file_format=True)
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        fh.write(struct.pack("<HHI", 0xFFFE, 0xE000, 0))
        for frame in frames:
            if len(frame) % 2:
                frame = frame + b"\0"
            fh.write(struct.pack("<HHI", 0xFFFE, 0xE000, len(frame)))
            fh.write(frame)
        fh.write(struct.pack("<HHI", 0xFFFE, 0xE0DD, 0))
        return fh.tell()


def wsi_header(study: str, series: str, width: int, height: int, tile: int, **kw) -> Dataset:
    """A WSI level's header (no Pixel Data), JPEG baseline, for write_streamed."""
    ds = wsi_instance(study, series, tile, tile, tile, **kw)
    del ds.PixelData
    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    return ds


def viewer_attributes(ds: Dataset, icc: bytes) -> None:
    """What a WSI viewer reads and the generated headers leave out, set as a scanner writes it:
    the slide orientation and origin (C.8.12.4), the optical path's illumination codes
    (C.8.12.5) and a real ICC profile (the generated one is zero bytes). Tests and the viewer
    bench share it."""
    def code(value: str, scheme: str, meaning: str) -> Dataset:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
        return item

    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    origin = Dataset()
    origin.XOffsetInSlideCoordinateSystem = 20.0
    origin.YOffsetInSlideCoordinateSystem = 40.0
    ds.TotalPixelMatrixOriginSequence = Sequence([origin])
    op = ds.OpticalPathSequence[0]
    op.IlluminationTypeCodeSequence = Sequence([code("111744", "DCM", "Brightfield illumination")])
    op.IlluminationColorCodeSequence = Sequence([code("414298005", "SCT", "Full Spectrum")])
    op.ICCProfile = icc


def large_case(outdir: Path, total_bytes: int = 300 << 20, *, slides: int = 4, levels: int = 4, tile: int = 512,
               frame_bytes: int = 96 << 10, patient_id: str = "PLARGE", seed: int = 7) -> tuple[str, list[Path]]:
    """A case of `slides` WSI series, `levels` pyramid levels each (VOLUME, base level first),
    about `total_bytes` in all, written in seconds: the frames are a small pool of random
    (incompressible) JPEG-framed bytes reused, streamed to disk (`write_streamed`). Returns
    (Study Instance UID, the files). For transfer tests and benchmarks, not for decoding."""
    rng = np.random.default_rng(seed)
    pool = [b"\xff\xd8\xff\xe0" + rng.bytes(frame_bytes - 6) + b"\xff\xd9" for _ in range(32)]
    per_slide = total_bytes // slides
    # frames per level: n, n/4, n/16, ... summing to per_slide / frame_bytes
    weights = [4.0 ** -k for k in range(levels)]
    base_frames = per_slide / frame_bytes / sum(weights)
    outdir.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    paths: list[Path] = []
    for s in range(slides):
        series, frame_ref = generate_uid(), generate_uid()
        for k in range(levels):
            n = max(1, round(base_frames * weights[k]))
            cols = max(1, round((n * 4 / 3) ** 0.5))
            rows = -(-n // cols)
            header = wsi_header(study, series, cols * tile, rows * tile, tile, patient_id=patient_id,
                                frame_of_reference=frame_ref, instance_number=k + 1, series_number=s + 1,
                                container=f"SLIDE-{s + 1}")
            path = outdir / f"slide{s + 1}-level{k}.dcm"
            write_streamed(path, header, (pool[(i * 7 + k + s) % len(pool)] for i in range(cols * rows)),
                           cols * rows)
            paths.append(path)
    return study, paths


def dataset_bytes(data: bytes) -> bytes:
    """A Part 10 file's bytes after its file meta group (preamble, DICM, group 0002): what a
    DIMSE peer keeps of what was sent (it writes its own file meta)."""
    import struct

    pos = 132
    while True:
        group, _elem = struct.unpack_from("<HH", data, pos)
        if group != 0x0002:
            return data[pos:]
        vr = data[pos + 4:pos + 6]
        if vr in (b"OB", b"OW", b"OF", b"SQ", b"UT", b"UN"):
            pos += 12 + struct.unpack_from("<I", data, pos + 8)[0]
        else:
            pos += 8 + struct.unpack_from("<H", data, pos + 6)[0]
