"""Slide metadata -> the DICOM attributes of a VL Whole Slide Microscopy Image.

Sources, lowest to highest precedence: scanner metadata read from the file,
the ``--metadata`` JSON document, command-line flags. The JSON schema is in
docs/converters.md and checked by ``load_metadata`` (unknown keys are errors,
so a typo never silently drops a patient ID).
"""

from __future__ import annotations

import datetime as _dt
import json
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from .dcmenc import Dataset, Sequence, generate_uid

from .errors import ConversionError
from .sources import Slide

VL_WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"
RATIO_PLACEHOLDER = "99999999.999"  # 12 characters, DS
CONVERTER_NAME = "pathpacs-convert"
CONVERTER_VERSION = "0.1.0"

# key -> (type, DICOM VR max length or None)
SCHEMA: dict[str, dict[str, tuple[type | tuple[type, ...], int | None]]] = {
    "patient": {"id": (str, 64), "name": (str, 64), "birth_date": (str, 8), "sex": (str, 16)},
    "study": {"instance_uid": (str, 64), "id": (str, 16), "accession_number": (str, 16), "date": (str, 8),
              "time": (str, 14), "description": (str, 64), "referring_physician": (str, 64)},
    "series": {"instance_uid": (str, 64), "number": (int, None), "description": (str, 64)},
    "slide": {"container_id": (str, 64), "specimen_id": (str, 64), "specimen_uid": (str, 64),
              "specimen_description": (str, 64), "barcode": (str, 64), "label_text": (str, 64)},
    "equipment": {"manufacturer": (str, 64), "model": (str, 64), "serial_number": (str, 64),
                  "software_versions": (str, 64), "institution": (str, 64)},
    "image": {"mpp": ((int, float, list), None), "magnification": ((int, float), None),
              "acquisition_datetime": (str, 32), "origin_mm": (list, None), "focus_method": (str, 16)},
}

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DATE_RE = re.compile(r"^\d{8}$")
_TIME_RE = re.compile(r"^\d{2}(\d{2}(\d{2}(\.\d{1,6})?)?)?$")


def empty_metadata() -> dict[str, dict[str, Any]]:
    return {k: {} for k in SCHEMA}


def validate_metadata(doc: Any, origin: str = "metadata") -> dict[str, dict[str, Any]]:
    if not isinstance(doc, dict):
        raise ConversionError(f"{origin}: the top level must be a JSON object")
    out = empty_metadata()
    for group, values in doc.items():
        if group not in SCHEMA:
            raise ConversionError(f"{origin}: unknown section {group!r} (known: {', '.join(SCHEMA)})")
        if not isinstance(values, dict):
            raise ConversionError(f"{origin}: {group!r} must be an object")
        for key, value in values.items():
            spec = SCHEMA[group].get(key)
            if spec is None:
                raise ConversionError(f"{origin}: unknown key {group}.{key}")
            typ, maxlen = spec
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, typ):
                raise ConversionError(f"{origin}: {group}.{key} has the wrong type")
            if isinstance(value, str):
                if maxlen and len(value) > maxlen:
                    raise ConversionError(f"{origin}: {group}.{key} is longer than {maxlen} characters")
                if "\\" in value:
                    raise ConversionError(f"{origin}: {group}.{key} must not contain a backslash")
            out[group][key] = value
    for k in ("instance_uid",):
        for g in ("study", "series"):
            v = out[g].get(k)
            if v and not _UID_RE.match(v):
                raise ConversionError(f"{origin}: {g}.{k} is not a valid UID")
    v = out["slide"].get("specimen_uid")
    if v and not _UID_RE.match(v):
        raise ConversionError(f"{origin}: slide.specimen_uid is not a valid UID")
    for g, k in (("patient", "birth_date"), ("study", "date")):
        v = out[g].get(k)
        if v and not _DATE_RE.match(v):
            raise ConversionError(f"{origin}: {g}.{k} must be YYYYMMDD")
    v = out["study"].get("time")
    if v and not _TIME_RE.match(v):
        raise ConversionError(f"{origin}: study.time must be HHMMSS")
    v = out["patient"].get("sex")
    if v and v not in ("M", "F", "O"):
        raise ConversionError(f"{origin}: patient.sex must be M, F or O")
    mpp = out["image"].get("mpp")
    if mpp is not None:
        vals = mpp if isinstance(mpp, list) else [mpp, mpp]
        if len(vals) != 2 or not all(isinstance(x, (int, float)) and 0 < x < 1000 for x in vals):
            raise ConversionError(f"{origin}: image.mpp must be a positive number or [x, y]")
        out["image"]["mpp"] = (float(vals[0]), float(vals[1]))
    o = out["image"].get("origin_mm")
    if o is not None:
        if len(o) != 2 or not all(isinstance(x, (int, float)) for x in o):
            raise ConversionError(f"{origin}: image.origin_mm must be [x, y]")
    v = out["image"].get("acquisition_datetime")
    if v:
        try:
            out["image"]["acquisition_datetime"] = _dt.datetime.fromisoformat(v)
        except ValueError:
            raise ConversionError(f"{origin}: image.acquisition_datetime must be ISO 8601") from None
    return out


def load_metadata(path: Path | None) -> dict[str, dict[str, Any]]:
    if path is None:
        return empty_metadata()
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConversionError(f"cannot read metadata file {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise ConversionError(f"metadata file {path} is not UTF-8 text") from None
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConversionError(f"metadata file {path}: invalid JSON ({exc.msg} at line {exc.lineno})") from None
    return validate_metadata(doc, origin=Path(path).name)


def merge_metadata(base: dict, override: dict) -> dict:
    out = {g: dict(v) for g, v in base.items()}
    for g, values in override.items():
        for k, v in values.items():
            if v is not None:
                out.setdefault(g, {})[k] = v
    return out


def code(value: str, scheme: str, meaning: str) -> Dataset:
    ds = Dataset()
    ds.CodeValue = value
    ds.CodingSchemeDesignator = scheme
    ds.CodeMeaning = meaning
    return ds


@lru_cache(maxsize=1)
def srgb_profile() -> bytes:
    from PIL import ImageCms

    icc = bytearray(ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes())
    # LittleCMS stamps the creation time into the header: fix it (and clear the MD5 profile ID,
    # "not computed") so that the same slide always converts to the same bytes.
    icc[24:36] = (2000).to_bytes(2, "big") + bytes([0, 1, 0, 1]) + bytes(6)
    icc[84:100] = bytes(16)
    return bytes(icc)


def _lo(v: str | None, n: int = 64) -> str:
    v = " ".join(str(v or "").replace("\\", "/").split())
    return v[:n]


@dataclass
class SeriesContext:
    """Everything the instances of one converted slide share."""

    md: dict
    slide: Slide
    study_uid: str
    series_uid: str
    frame_of_reference_uid: str
    dimension_org_uid: str
    specimen_uid: str
    container_id: str
    specimen_id: str
    mpp: tuple[float, float]
    mpp_assumed: bool
    now: _dt.datetime = field(default_factory=_dt.datetime.now)
    acquired: _dt.datetime | None = None
    icc: bytes = b""
    uid_seed: str | None = None

    def uid(self, role: str) -> str:
        """A fresh UID, or with a seed (watch folders) the same UID for the same file and role."""
        if self.uid_seed is None:
            return generate_uid()
        return generate_uid([self.uid_seed, role])

    @classmethod
    def create(cls, slide: Slide, md: dict, uid_seed: str | None = None) -> "SeriesContext":
        def new_uid(role: str) -> str:
            return generate_uid() if uid_seed is None else generate_uid([uid_seed, role])

        img = md.get("image", {})
        mpp = img.get("mpp") or slide.mpp
        assumed = mpp is None
        if mpp is None:
            mpp = (1.0, 1.0)
        sl = md.get("slide", {})
        container = sl.get("container_id") or sl.get("barcode") or slide.barcode or _lo(slide.path.stem)
        specimen = sl.get("specimen_id") or container
        acquired = img.get("acquisition_datetime") or slide.acquired
        if acquired is None:
            # Type 1 in the WSI module; the file's modification time is the best stand-in
            try:
                acquired = _dt.datetime.fromtimestamp(slide.path.stat().st_mtime).replace(microsecond=0)
            except OSError:
                acquired = _dt.datetime.now().replace(microsecond=0)
        if isinstance(acquired, _dt.datetime) and acquired.tzinfo is not None:
            acquired = acquired.replace(tzinfo=None)
        extra = {}
        if uid_seed is not None:
            # reproducible output: the same file converts to the same bytes (watch-folder restarts)
            try:
                extra["now"] = _dt.datetime.fromtimestamp(slide.path.stat().st_mtime).replace(microsecond=0)
            except OSError:
                pass
        return cls(
            **extra,
            md=md, slide=slide,
            study_uid=md.get("study", {}).get("instance_uid") or new_uid("study"),
            series_uid=md.get("series", {}).get("instance_uid") or new_uid("series"),
            frame_of_reference_uid=new_uid("frame-of-reference"),
            dimension_org_uid=new_uid("dimension-organization"),
            specimen_uid=sl.get("specimen_uid") or new_uid("specimen"),
            container_id=_lo(container), specimen_id=_lo(specimen),
            mpp=(float(mpp[0]), float(mpp[1])), mpp_assumed=assumed,
            acquired=acquired,
            icc=slide.icc_profile or srgb_profile(),
            uid_seed=uid_seed,
        )


def _da(d: _dt.datetime) -> str:
    return d.strftime("%Y%m%d")


def _tm(d: _dt.datetime) -> str:
    return d.strftime("%H%M%S")


def build_dataset(ctx: SeriesContext, *, kind: str, instance_number: int, image_type: list[str],
                  width: int, height: int, tile_w: int, tile_h: int, n_frames: int,
                  photometric: str, samples: int, spacing_mm: tuple[float, float] | None,
                  lossy_method: str | None, lossy_ratio: float | None) -> Dataset:
    """The full header of one instance (no pixel data).

    ``kind`` is VOLUME, LABEL, OVERVIEW or THUMBNAIL; ``spacing_mm`` is
    (column spacing x, row spacing y) in mm.
    """
    md, slide = ctx.md, ctx.slide
    pat, study, series = md.get("patient", {}), md.get("study", {}), md.get("series", {})
    eq, sl, img = md.get("equipment", {}), md.get("slide", {}), md.get("image", {})
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.ImageType = image_type
    ds.InstanceCreationDate = _da(ctx.now)
    ds.InstanceCreationTime = _tm(ctx.now)
    ds.SOPClassUID = VL_WSI_SOP_CLASS
    ds.SOPInstanceUID = ctx.uid(f"instance:{instance_number}:{kind}")
    study_dt = ctx.acquired or ctx.now
    ds.StudyDate = study.get("date") or _da(study_dt)
    ds.ContentDate = _da(ctx.acquired or ctx.now)
    ds.StudyTime = study.get("time") or _tm(study_dt)
    ds.ContentTime = _tm(ctx.acquired or ctx.now)
    ds.AcquisitionDateTime = (ctx.acquired or ctx.now).strftime("%Y%m%d%H%M%S")
    ds.AccessionNumber = study.get("accession_number", "")
    ds.Modality = "SM"
    ds.Manufacturer = _lo(eq.get("manufacturer") or slide.manufacturer or "Unknown")
    if eq.get("institution"):
        ds.InstitutionName = eq["institution"]
    ds.ReferringPhysicianName = study.get("referring_physician", "")
    if study.get("description"):
        ds.StudyDescription = study["description"]
    ds.SeriesDescription = series.get("description") or _lo(f"{slide.path.name}")
    ds.ManufacturerModelName = _lo(eq.get("model") or slide.model or "Unknown")
    ds.VolumetricProperties = "VOLUME"
    ds.PatientName = pat.get("name", "")
    ds.PatientID = pat.get("id", "")
    ds.PatientBirthDate = pat.get("birth_date", "")
    ds.PatientSex = pat.get("sex", "")
    ds.DeviceSerialNumber = _lo(eq.get("serial_number") or slide.serial or "Unknown")
    sw = eq.get("software_versions") or slide.software
    ds.SoftwareVersions = [_lo(sw), f"{CONVERTER_NAME} {CONVERTER_VERSION}"] if sw else \
        [f"{CONVERTER_NAME} {CONVERTER_VERSION}"]
    ds.StudyInstanceUID = ctx.study_uid
    ds.SeriesInstanceUID = ctx.series_uid
    ds.StudyID = study.get("id", "")
    ds.SeriesNumber = int(series.get("number", 1))
    ds.InstanceNumber = instance_number
    ds.FrameOfReferenceUID = ctx.frame_of_reference_uid
    ds.PositionReferenceIndicator = "SLIDE_CORNER"
    ds.DimensionOrganizationType = "TILED_FULL"
    dim_org = Dataset()
    dim_org.DimensionOrganizationUID = ctx.dimension_org_uid
    ds.DimensionOrganizationSequence = Sequence([dim_org])
    idx = []
    for pointer in (0x0048021E, 0x0048021F):  # column, row position in total image pixel matrix
        d = Dataset()
        d.DimensionOrganizationUID = ctx.dimension_org_uid
        d.DimensionIndexPointer = pointer
        d.FunctionalGroupPointer = 0x0048021A  # Plane Position (Slide) Sequence
        idx.append(d)
    ds.DimensionIndexSequence = Sequence(idx)

    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = 0
    ds.NumberOfFrames = n_frames
    ds.Rows = tile_h
    ds.Columns = tile_w
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.BurnedInAnnotation = "YES" if kind in ("LABEL", "OVERVIEW") else "NO"
    ds.SpecimenLabelInImage = "YES" if kind in ("LABEL", "OVERVIEW") else "NO"
    ds.FocusMethod = img.get("focus_method", "AUTO") if img.get("focus_method") in ("AUTO", "MANUAL") else "AUTO"
    ds.ExtendedDepthOfField = "NO"
    if lossy_method:
        ds.LossyImageCompression = "01"
        # a fixed-width placeholder, patched in place by the writer once the size is known
        ds.LossyImageCompressionRatio = f"{lossy_ratio:12.3f}" if lossy_ratio else RATIO_PLACEHOLDER
        ds.LossyImageCompressionMethod = lossy_method
    else:
        ds.LossyImageCompression = "00"

    ds.TotalPixelMatrixColumns = width
    ds.TotalPixelMatrixRows = height
    ds.TotalPixelMatrixFocalPlanes = 1
    origin = img.get("origin_mm") or slide.origin_mm or (0.0, 0.0)
    o = Dataset()
    o.XOffsetInSlideCoordinateSystem = f"{float(origin[0]):.6g}"
    o.YOffsetInSlideCoordinateSystem = f"{float(origin[1]):.6g}"
    ds.TotalPixelMatrixOriginSequence = Sequence([o])
    ds.ImageOrientationSlide = [0, -1, 0, -1, 0, 0]
    if spacing_mm is not None:
        ds.ImagedVolumeWidth = float(width * spacing_mm[0])
        ds.ImagedVolumeHeight = float(height * spacing_mm[1])
        ds.ImagedVolumeDepth = 1

    # Acquisition context, specimen
    ds.AcquisitionContextSequence = Sequence([])
    ds.ContainerIdentifier = ctx.container_id
    ds.IssuerOfTheContainerIdentifierSequence = Sequence([])
    ds.ContainerTypeCodeSequence = Sequence([code("433466003", "SCT", "Microscope slide")])
    spec = Dataset()
    spec.SpecimenIdentifier = ctx.specimen_id
    spec.SpecimenUID = ctx.specimen_uid
    spec.IssuerOfTheSpecimenIdentifierSequence = Sequence([])
    spec.SpecimenPreparationSequence = Sequence([])
    if sl.get("specimen_description"):
        spec.SpecimenShortDescription = sl["specimen_description"]
    ds.SpecimenDescriptionSequence = Sequence([spec])

    # Optical path
    ds.NumberOfOpticalPaths = 1
    op = Dataset()
    op.OpticalPathIdentifier = "0"
    op.IlluminationTypeCodeSequence = Sequence([code("111744", "DCM", "Brightfield illumination")])
    op.IlluminationColorCodeSequence = Sequence([code("414298005", "SCT", "Full Spectrum")])
    if samples == 3:
        op.ICCProfile = ctx.icc
        op.ColorSpace = "SRGB" if not slide.icc_profile else ""
        if not op.ColorSpace:
            del op.ColorSpace
    mag = img.get("magnification") or slide.magnification
    if mag and kind == "VOLUME":
        op.ObjectiveLensPower = f"{float(mag):g}"
    ds.OpticalPathSequence = Sequence([op])

    # Shared functional groups
    shared = Dataset()
    if spacing_mm is not None:
        pm = Dataset()
        pm.PixelSpacing = [f"{spacing_mm[1]:.10g}"[:16], f"{spacing_mm[0]:.10g}"[:16]]
        pm.SliceThickness = "0.001"
        shared.PixelMeasuresSequence = Sequence([pm])
    ft = Dataset()
    ft.FrameType = image_type
    shared.WholeSlideMicroscopyImageFrameTypeSequence = Sequence([ft])
    opi = Dataset()
    opi.OpticalPathIdentifier = "0"
    shared.OpticalPathIdentificationSequence = Sequence([opi])
    ds.SharedFunctionalGroupsSequence = Sequence([shared])

    if kind == "LABEL":
        ds.BarcodeValue = _lo(sl.get("barcode") or slide.barcode or "")
        ds.LabelText = _lo(sl.get("label_text") or "")
    return ds
