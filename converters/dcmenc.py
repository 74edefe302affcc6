"""A small DICOM encoder (explicit VR little endian) for the converter's headers.

The converter writes a few dozen known attributes per instance; encoding them
here instead of with pydicom keeps ``pathpacs convert`` from importing pydicom
(~0.15 s of a sub-second conversion). pydicom still reads the files in tests.
"""

from __future__ import annotations

import hashlib
import struct
import uuid
from typing import Any, Iterable

# keyword -> (tag, VR), the attributes the converters write (from the DICOM data dictionary)
TABLE: dict[str, tuple[int, str]] = {
    "AccessionNumber": (0x00080050, "SH"),
    "AcquisitionContextSequence": (0x00400555, "SQ"),
    "AcquisitionDateTime": (0x0008002A, "DT"),
    "BarcodeValue": (0x22000005, "LT"),
    "BitsAllocated": (0x00280100, "US"),
    "BitsStored": (0x00280101, "US"),
    "BurnedInAnnotation": (0x00280301, "CS"),
    "CodeMeaning": (0x00080104, "LO"),
    "CodeValue": (0x00080100, "SH"),
    "CodingSchemeDesignator": (0x00080102, "SH"),
    "ColorSpace": (0x00282002, "CS"),
    "Columns": (0x00280011, "US"),
    "ContainerIdentifier": (0x00400512, "LO"),
    "ContainerTypeCodeSequence": (0x00400518, "SQ"),
    "ContentDate": (0x00080023, "DA"),
    "ContentTime": (0x00080033, "TM"),
    "DeviceSerialNumber": (0x00181000, "LO"),
    "DimensionIndexPointer": (0x00209165, "AT"),
    "DimensionIndexSequence": (0x00209222, "SQ"),
    "DimensionOrganizationSequence": (0x00209221, "SQ"),
    "DimensionOrganizationType": (0x00209311, "CS"),
    "DimensionOrganizationUID": (0x00209164, "UI"),
    "ExtendedDepthOfField": (0x00480012, "CS"),
    "FileMetaInformationGroupLength": (0x00020000, "UL"),
    "FileMetaInformationVersion": (0x00020001, "OB"),
    "FocusMethod": (0x00480011, "CS"),
    "FrameOfReferenceUID": (0x00200052, "UI"),
    "FrameType": (0x00089007, "CS"),
    "FunctionalGroupPointer": (0x00209167, "AT"),
    "HighBit": (0x00280102, "US"),
    "ICCProfile": (0x00282000, "OB"),
    "IlluminationColorCodeSequence": (0x00480108, "SQ"),
    "IlluminationTypeCodeSequence": (0x00220016, "SQ"),
    "ImageOrientationSlide": (0x00480102, "DS"),
    "ImageType": (0x00080008, "CS"),
    "ImagedVolumeDepth": (0x00480003, "FL"),
    "ImagedVolumeHeight": (0x00480002, "FL"),
    "ImagedVolumeWidth": (0x00480001, "FL"),
    "ImplementationClassUID": (0x00020012, "UI"),
    "ImplementationVersionName": (0x00020013, "SH"),
    "InstanceCreationDate": (0x00080012, "DA"),
    "InstanceCreationTime": (0x00080013, "TM"),
    "InstanceNumber": (0x00200013, "IS"),
    "InstitutionName": (0x00080080, "LO"),
    "IssuerOfTheContainerIdentifierSequence": (0x00400513, "SQ"),
    "IssuerOfTheSpecimenIdentifierSequence": (0x00400562, "SQ"),
    "LabelText": (0x22000002, "UT"),
    "LossyImageCompression": (0x00282110, "CS"),
    "LossyImageCompressionMethod": (0x00282114, "CS"),
    "LossyImageCompressionRatio": (0x00282112, "DS"),
    "Manufacturer": (0x00080070, "LO"),
    "ManufacturerModelName": (0x00081090, "LO"),
    "MediaStorageSOPClassUID": (0x00020002, "UI"),
    "MediaStorageSOPInstanceUID": (0x00020003, "UI"),
    "Modality": (0x00080060, "CS"),
    "NumberOfFrames": (0x00280008, "IS"),
    "NumberOfOpticalPaths": (0x00480302, "UL"),
    "ObjectiveLensPower": (0x00480112, "DS"),
    "OpticalPathIdentificationSequence": (0x00480207, "SQ"),
    "OpticalPathIdentifier": (0x00480106, "SH"),
    "OpticalPathSequence": (0x00480105, "SQ"),
    "PatientBirthDate": (0x00100030, "DA"),
    "PatientID": (0x00100020, "LO"),
    "PatientName": (0x00100010, "PN"),
    "PatientSex": (0x00100040, "CS"),
    "PhotometricInterpretation": (0x00280004, "CS"),
    "PixelMeasuresSequence": (0x00289110, "SQ"),
    "PixelRepresentation": (0x00280103, "US"),
    "PixelSpacing": (0x00280030, "DS"),
    "PlanarConfiguration": (0x00280006, "US"),
    "PositionReferenceIndicator": (0x00201040, "LO"),
    "ReferringPhysicianName": (0x00080090, "PN"),
    "Rows": (0x00280010, "US"),
    "SOPClassUID": (0x00080016, "UI"),
    "SOPInstanceUID": (0x00080018, "UI"),
    "SamplesPerPixel": (0x00280002, "US"),
    "SeriesDescription": (0x0008103E, "LO"),
    "SeriesInstanceUID": (0x0020000E, "UI"),
    "SeriesNumber": (0x00200011, "IS"),
    "SharedFunctionalGroupsSequence": (0x52009229, "SQ"),
    "SliceThickness": (0x00180050, "DS"),
    "SoftwareVersions": (0x00181020, "LO"),
    "SpecificCharacterSet": (0x00080005, "CS"),
    "SpecimenDescriptionSequence": (0x00400560, "SQ"),
    "SpecimenIdentifier": (0x00400551, "LO"),
    "SpecimenLabelInImage": (0x00480010, "CS"),
    "SpecimenPreparationSequence": (0x00400610, "SQ"),
    "SpecimenShortDescription": (0x00400600, "LO"),
    "SpecimenUID": (0x00400554, "UI"),
    "StudyDate": (0x00080020, "DA"),
    "StudyDescription": (0x00081030, "LO"),
    "StudyID": (0x00200010, "SH"),
    "StudyInstanceUID": (0x0020000D, "UI"),
    "StudyTime": (0x00080030, "TM"),
    "TotalPixelMatrixColumns": (0x00480006, "UL"),
    "TotalPixelMatrixFocalPlanes": (0x00480303, "UL"),
    "TotalPixelMatrixOriginSequence": (0x00480008, "SQ"),
    "TotalPixelMatrixRows": (0x00480007, "UL"),
    "TransferSyntaxUID": (0x00020010, "UI"),
    "VolumetricProperties": (0x00089206, "CS"),
    "WholeSlideMicroscopyImageFrameTypeSequence": (0x00400710, "SQ"),
    "XOffsetInSlideCoordinateSystem": (0x0040072A, "DS"),
    "YOffsetInSlideCoordinateSystem": (0x0040073A, "DS"),
}

_LONG_VRS = {"OB", "OD", "OF", "OL", "OV", "OW", "SQ", "UC", "UN", "UR", "UT"}
_PACK = {"US": "H", "UL": "I", "SS": "h", "SL": "i", "FL": "f", "FD": "d", "AT": "I"}


class Dataset:
    """Attribute bag with pydicom-like keyword access (only keywords in TABLE)."""

    def __init__(self) -> None:
        object.__setattr__(self, "_elems", {})

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in TABLE:
            raise AttributeError(f"unknown DICOM keyword {name}")
        self._elems[name] = value

    def __getattr__(self, name: str) -> Any:
        try:
            return self._elems[name]
        except KeyError:
            raise AttributeError(name) from None

    def __delattr__(self, name: str) -> None:
        del self._elems[name]

    def __contains__(self, name: str) -> bool:
        return name in self._elems

    def encode(self) -> bytes:
        items = sorted((TABLE[k][0], TABLE[k][1], v) for k, v in self._elems.items())
        return b"".join(_element(tag, vr, v) for tag, vr, v in items)


def Sequence(items: Iterable[Dataset] = ()) -> list[Dataset]:  # noqa: N802 (pydicom-like)
    return list(items)


def _text(vr: str, value: Any) -> bytes:
    if isinstance(value, (list, tuple)):
        value = "\\".join(_str(vr, v) for v in value)
    else:
        value = _str(vr, value)
    b = value.encode("utf-8")
    if len(b) & 1:
        b += b"\x00" if vr == "UI" else b" "
    return b


def _str(vr: str, v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.10g}"[:16]
    return str(v)


def _element(tag: int, vr: str, value: Any) -> bytes:
    group, elem = tag >> 16, tag & 0xFFFF
    if vr == "SQ":
        body = b"".join(
            b"\xfe\xff\x00\xe0" + struct.pack("<I", len(enc)) + enc
            for enc in (item.encode() for item in value))
    elif vr in _PACK:
        vals = value if isinstance(value, (list, tuple)) else [value]
        if vr == "AT":
            body = b"".join(struct.pack("<HH", v >> 16, v & 0xFFFF) for v in vals)
        else:
            body = struct.pack("<" + _PACK[vr] * len(vals), *vals)
    elif vr in ("OB", "OW", "UN", "OV", "OD", "OF", "OL"):
        body = bytes(value)
        if len(body) & 1:
            body += b"\x00"
    else:
        body = _text(vr, value)
    head = struct.pack("<HH", group, elem) + vr.encode()
    if vr in _LONG_VRS:
        return head + b"\x00\x00" + struct.pack("<I", len(body)) + body
    if len(body) > 0xFFFF:
        raise ValueError(f"value too long for {vr}")
    return head + struct.pack("<H", len(body)) + body


def encode_file(ds: Dataset, meta: Dataset) -> bytes:
    """Preamble + DICM + File Meta Information (group 2) + data set."""
    meta.FileMetaInformationVersion = b"\x00\x01"
    group = meta.encode()
    gl = _element(0x00020000, "UL", len(group))
    return bytes(128) + b"DICM" + gl + group + ds.encode()


def generate_uid(entropy: Iterable[str] | None = None) -> str:
    """A UUID-derived UID (2.25.<128-bit integer>); with entropy, the same inputs give the same UID."""
    if entropy is None:
        return f"2.25.{uuid.uuid4().int}"
    h = hashlib.sha256("\x1f".join(entropy).encode()).digest()[:16]
    return f"2.25.{int.from_bytes(h, 'big')}"
