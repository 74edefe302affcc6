"""The attribute actions: PS3.15 Table E.1-1, Basic Profile column, plus the option columns.

The Basic Profile column comes from `dicom-anonymizer` (KitwareMedical, BSD): its
`dicomfields_2026c` tables are Table E.1-1 of the 2026c standard, every attribute with its
action (D, Z, X, U and the combined X/Z, X/D, Z/D, X/Z/D, X/Z/U*), kept up to date with the
standard. None of the maintained libraries carries the per-option columns (`dicognito` has
its own fixed rules, pydicom/deid recipes are site rules, `dicom-anonymizer` the basic column
only), so the columns of the options this archive offers are written out below for the
attributes they name that pathology objects can carry.

Actions: K keep, X remove, Z empty, D dummy value (a shifted date, a mapped UID where the VR is
UI), U replace the UID consistently (UidMap), C clean (keep, with identifying values found in
the instance replaced; sequences: every item processed by the same rules), S shift a date,
P the pseudonym (Patient's Name, Patient ID), M a mapped identifier (slide and specimen ids).
A combined action becomes the one that keeps the object valid (a value where the IOD may need
one): X/Z -> Z, X/D, Z/D, X/Z/D -> D, X/Z/U* -> U for UIDs, a kept sequence (its UIDs replaced
inside) for references, else Z.
"""
from __future__ import annotations

from functools import lru_cache

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _e1
from pydicom.datadict import tag_for_keyword

from .options import DeidOptions

_CATEGORY = {"D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "D", "X_Z_TAGS": "Z",
             "X_D_TAGS": "D", "X_Z_D_TAGS": "D", "X_Z_U_STAR_TAGS": "U*"}


def _basic() -> tuple[dict[int, str], list[tuple[int, int, int, int, str]]]:
    exact: dict[int, str] = {}
    masked: list[tuple[int, int, int, int, str]] = []
    for name, action in _CATEGORY.items():
        for entry in getattr(_e1, name):
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:
                masked.append((entry[0], entry[1], entry[2], entry[3], action))
    return exact, masked


BASIC, MASKED = _basic()


def _tags(*keywords: str) -> frozenset[int]:
    out = set()
    for k in keywords:
        t = tag_for_keyword(k)
        if t is None:
            raise KeyError(k)
        out.add(t)
    return frozenset(out)


# Always: the patient gets a pseudonym of the context; slide and specimen ids a mapped value
# (they are accession-like, and the specimen description items refer to them).
PSEUDONYM = _tags("PatientName", "PatientID")
MAPPED = _tags("ContainerIdentifier", "SpecimenIdentifier", "StudyID")  # Study ID: a DICOMDIR needs one

# The option columns of Table E.1-1 (K or C), for the attributes pathology objects carry.
PATIENT_CHARACTERISTICS_K = _tags(
    "PatientSex", "PatientAge", "PatientSize", "PatientWeight", "EthnicGroup", "SmokingStatus",
    "PregnancyStatus", "PatientSexNeutered", "PatientSpeciesDescription", "PatientSpeciesCodeSequence",
    "PatientBreedDescription", "PatientBreedCodeSequence", "PatientBodyMassIndex")
PATIENT_CHARACTERISTICS_C = _tags("AdditionalPatientHistory", "MedicalAlerts", "Allergies", "SpecialNeeds",
                                  "PatientState")
DEVICE_IDENTITY_K = _tags(
    "StationName", "DeviceSerialNumber", "DeviceUID", "DeviceID", "DeviceLabel", "DeviceDescription",
    "DetectorID", "PlateID", "GantryID", "CassetteID", "GeneratorID", "ManufacturerDeviceIdentifier",
    "DeviceAlternateIdentifier", "SourceSerialNumber", "PerformedStationName", "PerformedStationAETitle",
    "ScheduledStationName", "ScheduledStationAETitle", "PerformedLocation", "ScheduledProcedureStepLocation",
    "AcquisitionDeviceProcessingDescription", "SoftwareVersions")
INSTITUTION_IDENTITY_K = _tags("InstitutionName", "InstitutionAddress", "InstitutionalDepartmentName",
                               "InstitutionCodeSequence", "InstitutionalDepartmentTypeCodeSequence")
DESCRIPTORS_C = _tags(
    "StudyDescription", "SeriesDescription", "ImageComments", "ProtocolName", "AcquisitionComments",
    "AcquisitionContextDescription", "AcquisitionProtocolDescription", "DerivationDescription",
    "ContainerDescription", "ContainerComponentID", "SpecimenShortDescription", "SpecimenDetailedDescription",
    "SpecimenPreparationSequence", "PerformedProcedureStepDescription", "RequestedProcedureDescription",
    "ScheduledProcedureStepDescription", "ReasonForStudy", "RequestedContrastAgent", "CommentsOnThePerformedProcedureStep",
    "AdmittingDiagnosesDescription", "OpticalPathDescription", "IlluminationColorCodeSequence",
    "ContentLabel", "ContentDescription", "SegmentLabel", "SegmentDescription", "SegmentationFractionalType")
STRUCTURED_CONTENT_C = _tags("ContentSequence", "AcquisitionContextSequence")
GRAPHICS_C = _tags("GraphicAnnotationSequence", "TextObjectSequence", "GraphicObjectSequence",
                   "AnnotationGroupLabel", "AnnotationGroupDescription", "GraphicLayerDescription")

DATE_VRS = ("DA", "DT")
# Not moved by Retain Longitudinal Temporal Information (the option has no K/C for them).
NEVER_SHIFTED = _tags("PatientBirthDate", "PatientBirthTime", "PatientBirthDateInAlternativeCalendar",
                      "PatientDeathDateInAlternativeCalendar")


def basic_action(tag: int) -> str | None:
    """The Basic Profile column for `tag` (None: not named, kept)."""
    a = BASIC.get(tag)
    if a is not None:
        return a
    group, elem = tag >> 16, tag & 0xFFFF
    for g, e, gm, em, action in MASKED:
        if group & gm == g and elem & em == e:
            return action
    return None


@lru_cache(maxsize=8192)
def action(tag: int, vr: str, options: DeidOptions) -> str:
    """What happens to one attribute (see the module docstring for the letters)."""
    if tag in PSEUDONYM:
        return "P"
    if tag in MAPPED:
        return "M"
    basic = basic_action(tag)
    if options.retain_patient_characteristics:
        if tag in PATIENT_CHARACTERISTICS_K:
            return "K"
        if tag in PATIENT_CHARACTERISTICS_C:
            return "C"
    if options.retain_device_identity and tag in DEVICE_IDENTITY_K:
        return "K"
    if options.retain_institution_identity and tag in INSTITUTION_IDENTITY_K:
        return "K"
    if options.clean_descriptors and tag in DESCRIPTORS_C:
        return "C"
    if options.clean_structured_content and tag in STRUCTURED_CONTENT_C:
        return "C"
    if options.clean_graphics and tag in GRAPHICS_C:
        return "C"
    if basic is None:
        return "K"
    if basic == "U*":  # X/Z/U*: a sequence of references is kept, its UIDs replaced inside
        basic = "U" if vr == "UI" else "K" if vr == "SQ" else "Z"
    if basic == "U" and options.retain_uids:
        return "K"
    if tag in NEVER_SHIFTED:
        return basic
    if vr in DATE_VRS and options.retain_dates and basic in ("D", "Z", "X"):
        return "S"
    if vr == "TM" and options.retain_dates and basic in ("D", "Z", "X"):
        return "K"  # dates move by whole days: times of day stay
    return basic


def named(options: DeidOptions) -> dict[int, str]:
    """Every attribute the profile names with its action under `options` (tests check all)."""
    from pydicom.datadict import dictionary_VR

    out = {}
    for tag in list(BASIC) + list(PSEUDONYM | MAPPED):
        try:
            vr = dictionary_VR(tag)
        except KeyError:
            vr = "UN"
        out[tag] = action(tag, vr, options)
    return out
