"""The coded concepts of consultation documents: one table shared by the writer and the reader.

Document titles are LOINC document codes (a pathology referral and a pathology consult note);
the items that have no standard code use the local coding scheme `99PATHPACS` (PS3.16 allows a
private scheme whose designator starts with "99"), so any SR reader shows them by meaning.
"""
from __future__ import annotations

from pydicom.sr.coding import Code

SCHEME = "99PATHPACS"

# Document titles (the root CONTAINER's concept name)
REQUEST_TITLE = Code("57133-1", "LN", "Referral note")
OPINION_TITLE = Code("60570-9", "LN", "Pathology Consult note")

# Content of a request
CONSULTATION_ID = Code("CONSULT-ID", SCHEME, "Consultation identifier")  # TEXT: the requester's job id
REQUESTER = Code("REQUESTER", SCHEME, "Requesting archive")  # TEXT: [consultation] name of the sender
REQUESTING_INSTITUTION = Code("REQ-INSTITUTION", SCHEME, "Requesting institution")  # TEXT
REQUESTING_PHYSICIAN = Code("REQ-PHYSICIAN", SCHEME, "Requesting physician")  # PNAME
REQUESTED_EXPERT = Code("EXPERT", SCHEME, "Requested consultant")  # TEXT: expert id (and name)
PRIORITY = Code("PRIORITY", SCHEME, "Consultation priority")  # CODE: one of PRIORITIES
CLINICAL_QUESTION = Code("QUESTION", SCHEME, "Clinical question")  # TEXT

PRIORITIES = {
    "routine": Code("ROUTINE", SCHEME, "Routine"),
    "urgent": Code("URGENT", SCHEME, "Urgent"),
    "frozen": Code("FROZEN", SCHEME, "Intraoperative frozen section"),
}

# Content of an opinion (answer)
OPINION_TEXT = Code("OPINION", SCHEME, "Consultation opinion")  # TEXT: the consultant's report
CONSULTANT = Code("CONSULTANT", SCHEME, "Consultant")  # PNAME
REGION = Code("REGION", SCHEME, "Region of interest")  # SCOORD (graphic on a slide), with a label
DECLINED = Code("DECLINED", SCHEME, "Consultation declined")  # TEXT: the reason (a decline is an answer)
ACCEPTED = Code("ACCEPTED", SCHEME, "Consultation accepted")  # DATETIME: when the consultant accepted
REQUEST = Code("REQUEST", SCHEME, "Consultation request")  # COMPOSITE: the request SR answered


def document_title(meta: dict) -> tuple[str, str] | None:
    """(code value, scheme) of a document's title (Concept Name Code Sequence) from its DICOM
    JSON, or None for no SR title."""
    seq = (meta.get("0040A043") or {}).get("Value") or []
    if not seq or not isinstance(seq[0], dict):
        return None
    value = ((seq[0].get("00080100") or {}).get("Value") or [None])[0]
    scheme = ((seq[0].get("00080102") or {}).get("Value") or [None])[0]
    return (str(value), str(scheme)) if value and scheme else None


def is_consultation_document(meta: dict) -> bool:
    """Whether an instance is a request or an opinion of some consultation: a case sent again
    leaves these out (an earlier opinion would tell the next consultant, or leak identity)."""
    return document_title(meta) in {(c.value, c.scheme_designator) for c in (REQUEST_TITLE, OPINION_TITLE)}
