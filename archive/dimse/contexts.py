"""Which SOP classes and transfer syntaxes the archive accepts."""
from __future__ import annotations

from pynetdicom import AllStoragePresentationContexts
from pynetdicom.sop_class import (
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StorageCommitmentPushModel,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pydicom.uid import AllTransferSyntaxes

# Store in whatever syntax it arrives in: every syntax pydicom knows. pynetdicom accepts the
# first of *our* list that the peer proposes in a context, so compressed syntaxes come first:
# a peer offering JPEG and uncompressed in one context can send either, and the compressed
# bytes are what a WSI scanner (or a C-GET requestor asking for them) wants kept as they are.
_NEWER = [
    "1.2.840.10008.1.2.4.110",  # JPEG XL Lossless
    "1.2.840.10008.1.2.4.111",  # JPEG XL JPEG Recompression
    "1.2.840.10008.1.2.4.112",  # JPEG XL
    "1.2.840.10008.1.2.1.98",   # Encapsulated Uncompressed Explicit VR Little Endian
    "1.2.840.10008.1.2.8.1",    # Deflated Image Frame Compression
]
_UNCOMPRESSED = ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.1.99", "1.2.840.10008.1.2.2"]
STORAGE_TRANSFER_SYNTAXES = list(dict.fromkeys(
    [str(ts) for ts in AllTransferSyntaxes if str(ts) not in _UNCOMPRESSED] + _NEWER + _UNCOMPRESSED
))
STORAGE_SOP_CLASSES = [str(cx.abstract_syntax) for cx in AllStoragePresentationContexts]
# Classes pynetdicom's list may predate; WSI annotations and friends.
for extra in (
    "1.2.840.10008.5.1.4.1.1.91.1",   # Microscopy Bulk Simple Annotations
    "1.2.840.10008.5.1.4.1.1.77.1.6",  # VL Whole Slide Microscopy Image
    "1.2.840.10008.5.1.4.1.1.66.4",    # Segmentation
    "1.2.840.10008.5.1.4.1.1.88.34",   # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.22",   # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",   # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.11.1",    # Grayscale Softcopy Presentation State
):
    if extra not in STORAGE_SOP_CLASSES:
        STORAGE_SOP_CLASSES.append(extra)

FIND_MODELS = {
    str(PatientRootQueryRetrieveInformationModelFind): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelFind): "STUDY",
}
GET_MODELS = {
    str(PatientRootQueryRetrieveInformationModelGet): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelGet): "STUDY",
}
MOVE_MODELS = {
    str(PatientRootQueryRetrieveInformationModelMove): "PATIENT",
    str(StudyRootQueryRetrieveInformationModelMove): "STUDY",
}
VERIFICATION = str(Verification)
STORAGE_COMMITMENT = str(StorageCommitmentPushModel)
