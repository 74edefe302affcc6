"""De-identified copies of instances: the profile's actions applied to a pydicom Dataset.

`Deidentifier(options, uids)` is one context's engine (a consultation job, an export, the
research view): the same UidMap, pseudonym, mapped ids and date shift for every instance it
touches, so a study stays a study and its references (inside sequences too) still resolve.
Pixel data is never decoded: its element is carried over as it is (`stream.py` copies it from
the stored file without reading it into memory).
"""
from __future__ import annotations

import base64
import re
from datetime import date, timedelta
from typing import Any, Iterator

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.dataset import FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID_dictionary

from . import profile
from .options import DeidOptions
from .uidmap import UidMap


class DeidError(Exception):
    """An instance that cannot be de-identified (the reason says why): its caller fails the
    whole send or export rather than leave it out silently or send it identified."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# SOP classes whose identifying content the profile knows how to handle.
KNOWN_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.77.1.6": "VL Whole Slide Microscopy Image",
    "1.2.840.10008.5.1.4.1.1.77.1.2": "VL Microscopic Image",
    "1.2.840.10008.5.1.4.1.1.77.1.3": "VL Slide-Coordinates Microscopic Image",
    "1.2.840.10008.5.1.4.1.1.91.1": "Microscopy Bulk Simple Annotations",
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.88.11": "Basic Text SR",
    "1.2.840.10008.5.1.4.1.1.88.22": "Enhanced SR",
    "1.2.840.10008.5.1.4.1.1.88.33": "Comprehensive SR",
    "1.2.840.10008.5.1.4.1.1.88.34": "Comprehensive 3D SR",
    "1.2.840.10008.5.1.4.1.1.88.59": "Key Object Selection",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
    "1.2.840.10008.5.1.4.1.1.11.2": "Color Softcopy Presentation State",
    "1.2.840.10008.5.1.4.1.1.7": "Secondary Capture Image",
    "1.2.840.10008.5.1.4.1.1.7.4": "Multi-frame True Color Secondary Capture Image",
}
# Image classes without a Burned In Annotation = NO of their own may show anything.
NEEDS_BURNED_IN_NO = {"1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.4",
                      "1.2.840.10008.5.1.4.1.1.77.1.2", "1.2.840.10008.5.1.4.1.1.77.1.3"}

PIXEL_TAGS = {0x7FE00010, 0x7FE00008, 0x7FE00009, 0x7FE00001, 0x7FE00002}
TEXT_VRS = {"LO", "SH", "ST", "LT", "UT", "UC", "PN"}
# Attributes whose values identify the patient, the case or the slide: collected from each
# instance and replaced wherever they appear in text that is kept (descriptors, content items).
IDENTIFYING = ("PatientName", "PatientID", "OtherPatientIDs", "OtherPatientNames", "PatientBirthName",
               "PatientMotherBirthName", "AccessionNumber", "StudyID", "PatientBirthDate", "MedicalRecordLocator",
               "ContainerIdentifier", "SpecimenIdentifier", "BarcodeValue", "LabelText", "ReferringPhysicianName",
               "PatientAddress", "PatientTelephoneNumbers", "IssuerOfPatientID", "AdmissionID", "ServiceEpisodeID",
               "RequestedProcedureID", "PerformedProcedureStepID", "ScheduledProcedureStepID")
_IDENTIFYING_TAGS = frozenset(profile._tags(*IDENTIFYING))
_INSTITUTION_TAGS = frozenset(profile._tags("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName"))

DUMMY = "ANONYMIZED"
REMOVED = "[removed]"
BULK_MARK = b"\x00PATHPACS-BULK:"


def _registered(uid: str) -> bool:
    """A UID of the standard (SOP classes, transfer syntaxes, coding schemes): never replaced."""
    return uid in UID_dictionary or uid.startswith("1.2.840.10008.")


def image_flavor(obj: Any) -> str:
    """Value 3 of Image Type (VOLUME, LABEL, OVERVIEW, THUMBNAIL), upper case; "" when none."""
    if isinstance(obj, Dataset):
        values = list(obj.get("ImageType", []) or [])
    elif isinstance(obj, dict):
        values = list((obj.get("00080008") or {}).get("Value", []))
    else:  # an InstanceRecord
        values = list(getattr(obj, "image_type", []) or [])
    return str(values[2]).upper() if len(values) > 2 else ""


class _Context:
    """What one instance contributes: its identifying values and their replacements."""

    def __init__(self) -> None:
        self.replacements: dict[str, str] = {}
        self._pattern: re.Pattern[str] | None = None

    def add(self, value: str, replacement: str, min_len: int = 3) -> None:
        value = value.strip()
        if len(value) >= min_len and value.upper() not in (DUMMY, REMOVED.upper()):
            self.replacements.setdefault(value, replacement)
            self._pattern = None

    def clean(self, text: str) -> str:
        if not self.replacements:
            return text
        if self._pattern is None:
            alts = sorted(self.replacements, key=len, reverse=True)
            self._pattern = re.compile("|".join(re.escape(a) for a in alts), re.IGNORECASE)
        lower = {k.lower(): v for k, v in self.replacements.items()}
        return self._pattern.sub(lambda m: lower.get(m.group(0).lower(), REMOVED), text)


class Deidentifier:
    """One context's de-identification (see the module docstring)."""

    def __init__(self, options: DeidOptions, uids: UidMap) -> None:
        self.options = options
        self.uids = uids
        self._shift: int | None = None

    # -- what is left out, what cannot be done ---------------------------------------------
    def excluded(self, obj: Any) -> str | None:
        """Why an instance is left out of a de-identified set ("LABEL image"), or None.
        Takes a Dataset, its DICOM JSON or an InstanceRecord."""
        flavor = image_flavor(obj)
        if flavor == "LABEL" and not self.options.keep_label:
            return "LABEL image"
        if flavor == "OVERVIEW" and not self.options.keep_overview:
            return "OVERVIEW image"
        return None

    def check(self, ds: Dataset) -> None:
        """DeidError when `ds` cannot be de-identified by this profile."""
        sop_class = str(ds.get("SOPClassUID", "") or "")
        if sop_class not in KNOWN_SOP_CLASSES:
            raise DeidError(f"SOP class {sop_class or '(none)'} has no de-identification rules here")
        burned = str(ds.get("BurnedInAnnotation", "") or "").upper()
        if burned == "YES":
            raise DeidError(f"instance {ds.get('SOPInstanceUID', '?')} has burned-in annotation (its pixels may "
                            "show identity; pixel data is never altered)")
        flavor = image_flavor(ds)
        if burned != "NO" and (sop_class in NEEDS_BURNED_IN_NO or flavor in ("LABEL", "OVERVIEW")):
            raise DeidError(f"instance {ds.get('SOPInstanceUID', '?')} ({flavor or KNOWN_SOP_CLASSES[sop_class]}) "
                            "does not state Burned In Annotation = NO")

    # -- the context's replacements ----------------------------------------------------------
    @property
    def shift_days(self) -> int:
        """Days every date moves back in this context (1..3650, from the context's secret)."""
        if self._shift is None:
            self._shift = 1 + int(self.uids.digest("date shift", "")[:8], 16) % 3650
        return self._shift

    def pseudonym(self, patient_id: str) -> str:
        """The replacement Patient ID (and name) of a patient in this context."""
        return "PP" + self.uids.digest("patient", patient_id.strip())[:12].upper()

    def mapped_id(self, value: str) -> str:
        """The replacement of a slide or specimen identifier (consistent in the context)."""
        return "S" + self.uids.digest("id", value.strip())[:12].upper()

    def uid(self, value: str) -> str:
        value = str(value).strip().rstrip("\0")
        if not value or self.options.retain_uids or _registered(value):
            return value
        return self.uids.new(value)

    def shift_date(self, value: str) -> str:
        """A DA value moved back by the context's shift (partial or bad dates: a dummy)."""
        v = value.strip()
        if len(v) == 8 and v.isdigit():
            try:
                d = date(int(v[:4]), int(v[4:6]), int(v[6:8])) - timedelta(days=self.shift_days)
                return d.strftime("%Y%m%d")
            except ValueError:
                pass
        return "19000101" if v else v

    def shift_datetime(self, value: str) -> str:
        v = value.strip()
        if len(v) >= 8 and v[:8].isdigit():
            return self.shift_date(v[:8]) + v[8:]
        return "19000101000000" if v else v

    # -- the dataset -------------------------------------------------------------------------
    def dataset(self, ds: Dataset, *, check: bool = True) -> Dataset:
        """A de-identified copy of `ds` (pixel data element carried over, never decoded).
        check=False for partial objects (query results) that name no SOP class."""
        if check:
            self.check(ds)
        ctx = _Context()
        self._collect(ds, ctx)
        out = self._walk(ds, ctx, cleaning=False)
        self._mark(out)
        meta = getattr(ds, "file_meta", None)
        if meta is not None:
            new_meta = FileMetaDataset()
            new_meta.MediaStorageSOPClassUID = out.get("SOPClassUID", meta.get("MediaStorageSOPClassUID"))
            new_meta.MediaStorageSOPInstanceUID = out.get("SOPInstanceUID", "")
            if "TransferSyntaxUID" in meta:
                new_meta.TransferSyntaxUID = meta.TransferSyntaxUID
            new_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            new_meta.ImplementationVersionName = "PATHPACS_DEID"
            out.file_meta = new_meta
            out.preamble = b"\0" * 128
        return out

    def json(self, doc: dict[str, Any], *, check: bool = True) -> dict[str, Any]:
        """A de-identified copy of a DICOM JSON object (research views); BulkDataURIs kept
        for what stays."""
        try:
            ds = Dataset.from_json(doc, bulk_data_uri_handler=lambda tag, vr, uri: BULK_MARK + uri.encode())
        except Exception as exc:  # pydicom raises many kinds on odd values
            raise DeidError(f"metadata cannot be read: {type(exc).__name__}: {exc}") from exc
        out = self.dataset(ds, check=check)
        js = out.to_json_dict(bulk_data_threshold=1 << 62)
        _restore_uris(js)
        return js

    def _collect(self, ds: Dataset, ctx: _Context) -> None:
        for elem in ds:
            if elem.VR == "SQ":
                for item in elem.value or []:
                    self._collect(item, ctx)
                continue
            if elem.tag not in _IDENTIFYING_TAGS and not (elem.tag in _INSTITUTION_TAGS
                                                         and not self.options.retain_institution_identity):
                continue
            if elem.value in (None, ""):
                continue
            values = elem.value if elem.VM > 1 else [elem.value]
            for v in values:
                text = str(v)
                if elem.keyword == "PatientID":
                    ctx.add(text, self.pseudonym(text))
                elif elem.keyword in ("ContainerIdentifier", "SpecimenIdentifier", "StudyID"):
                    ctx.add(text, self.mapped_id(text))
                elif elem.VR == "PN":
                    ctx.add(text, DUMMY)
                    for group in text.split("="):  # alphabetic, ideographic, phonetic
                        parts = [p.strip() for p in group.split("^") if p.strip()]
                        for joined in (" ".join(parts), "".join(parts), " ".join(reversed(parts)),
                                       "".join(reversed(parts))):
                            ctx.add(joined, REMOVED, min_len=2)  # 王丽, Li Wang, Wang Li
                        for part in parts:
                            ctx.add(part, REMOVED)
                else:
                    ctx.add(text, REMOVED)

    def _walk(self, ds: Dataset, ctx: _Context, cleaning: bool) -> Dataset:
        out = Dataset()
        patient_id = str(ds.get("PatientID", "") or "")
        for elem in ds:
            tag = int(elem.tag)
            if elem.tag.is_private:
                continue  # private attributes: removed (no safe-private list is kept)
            if tag in PIXEL_TAGS or elem.tag.group == 0x0002:
                out.add(elem) if elem.tag.group != 0x0002 else None
                continue
            act = profile.action(tag, elem.VR, self.options)
            if cleaning and act in ("X", "Z", "D") and elem.VR in TEXT_VRS - {"PN"}:
                act = "C"  # inside cleaned structured content, text is cleaned, not dropped
            new = self._apply(elem, act, ctx, cleaning, patient_id)
            if new is not None:
                out.add(new)
        return out

    def _apply(self, elem: DataElement, act: str, ctx: _Context, cleaning: bool, patient_id: str) -> DataElement | None:
        vr = elem.VR
        if act == "X":
            return None
        if act == "Z":
            return DataElement(elem.tag, vr, Sequence() if vr == "SQ" else None)
        if vr == "SQ":
            items = Sequence([self._walk(item, ctx, cleaning or act == "C") for item in elem.value or []])
            return DataElement(elem.tag, vr, items)
        value = elem.value
        if act == "P":
            pid = self.pseudonym(patient_id) if patient_id else "PP" + self.uids.digest("patient", "")[:12].upper()
            return DataElement(elem.tag, vr, f"ANON^{pid}" if vr == "PN" else pid)
        if act == "M":
            return DataElement(elem.tag, vr, self._each(value, self.mapped_id) if value not in (None, "") else value)
        if act == "U" or (vr == "UI" and act in ("K", "C", "D")):
            return DataElement(elem.tag, vr, self._each(value, self.uid) if value not in (None, "") else value)
        if act == "S":
            fn = self.shift_date if vr == "DA" else self.shift_datetime
            return DataElement(elem.tag, vr, self._each(value, fn) if value not in (None, "") else value)
        if act == "D":
            return DataElement(elem.tag, vr, _dummy(vr, value))
        if vr == "UN":
            return None  # a value of unknown encoding cannot be cleaned: removed
        # K and C: kept; identifying values found in the instance replaced in any kept text
        if vr in TEXT_VRS and value not in (None, ""):
            if vr == "PN":
                return DataElement(elem.tag, vr, self._each(value, lambda v: _pn_clean(ctx, v)))
            return DataElement(elem.tag, vr, self._each(value, ctx.clean))
        return elem

    @staticmethod
    def _each(value: Any, fn) -> Any:
        from pydicom.multival import MultiValue

        if isinstance(value, (list, tuple, MultiValue)):
            return [fn(str(v)) for v in value]
        return fn(str(value))

    def _mark(self, out: Dataset) -> None:
        """Patient Identity Removed, the method and its CID 7050 codes, what became of dates."""
        out.PatientIdentityRemoved = "YES"
        out.DeidentificationMethod = self.options.method_text()
        codes = []
        for value, meaning in self.options.method_codes():
            item = Dataset()
            item.CodeValue = value
            item.CodingSchemeDesignator = "DCM"
            item.CodeMeaning = meaning
            codes.append(item)
        out.DeidentificationMethodCodeSequence = Sequence(codes)
        out.LongitudinalTemporalInformationModified = "MODIFIED" if self.options.retain_dates else "REMOVED"

    def walk_json_uris(self, doc: dict) -> Iterator[str]:
        """Every BulkDataURI of a DICOM JSON object (the bulk paths a research view may read)."""
        for el in doc.values():
            if "BulkDataURI" in el:
                yield el["BulkDataURI"]
            for item in el.get("Value", []) if el.get("vr") == "SQ" else []:
                yield from self.walk_json_uris(item)

    def instance_chunks(self, archive, rec) -> Iterator[bytes]:
        """Part 10 bytes of the de-identified instance `rec`, pixel data copied as stored, in
        bounded memory (see stream.py)."""
        from .stream import deidentified_chunks

        return deidentified_chunks(self, archive, rec)


def _pn_clean(ctx: _Context, value: str) -> str:
    cleaned = ctx.clean(value)
    return DUMMY if cleaned != value else value


def _dummy(vr: str, value: Any) -> Any:
    if value in (None, ""):
        return value
    if vr in ("DS", "IS"):
        return "0"
    if vr in ("US", "SS", "UL", "SL", "FL", "FD", "UV", "SV"):
        return 0
    if vr in ("OB", "OW", "OF", "OD", "OL", "OV", "UN"):
        return b""
    if vr == "DA":
        return "19000101"
    if vr == "DT":
        return "19000101000000"
    if vr == "TM":
        return "000000"
    if vr == "AS":
        return "000Y"
    if vr == "UR":
        return ""
    return DUMMY


def _restore_uris(doc: dict[str, Any]) -> None:
    """Bulk placeholders (from `json`) back into BulkDataURIs."""
    mark = base64.b64encode(BULK_MARK)[:16].decode()
    for el in doc.values():
        inline = el.get("InlineBinary")
        if isinstance(inline, str) and inline.startswith(mark):
            raw = base64.b64decode(inline)
            if raw.startswith(BULK_MARK):
                del el["InlineBinary"]
                el["BulkDataURI"] = raw[len(BULK_MARK):].decode()
        if el.get("vr") == "SQ":
            for item in el.get("Value", []):
                _restore_uris(item)
