"""Answers arriving at the requester: mapped back to the original case before they are stored.

A case may have gone de-identified (archive.deid: new UIDs per job, the map kept here in the
"uidmap" table under the job id). The consultant answers in the study it has, so an opinion
or decline SR whose consultation id is one of our sent jobs is rewritten on the ingest path,
before anything is stored: every UID it carries that the job's map knows (Study Instance UID,
the slides its regions reference, the request SR, the evidence sequences) becomes the original
again, and the patient and study attributes are copied from the original study, so the answer
joins the case under the original UIDs. Then `answer_arrived` records it on the job:
requested -> accepted (the consultant's acceptance notice) -> answered (or declined), with times.
"""
from __future__ import annotations

import copy
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Callable

from pydicom import Dataset
from pydicom.dataelem import DataElement
from pydicom.uid import generate_uid

from ..metadata import header_dataset
from .opinion import SR_SOP_CLASSES, ConsultOpinion, read_opinion

if TYPE_CHECKING:
    from ..service import Archive

log = logging.getLogger("pathpacs.consult.answers")
JOBS = "consult"

# identity of the patient and the study, restored from the original study
RESTORED = ("PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientSex", "PatientAge",
            "OtherPatientIDsSequence", "StudyDate", "StudyTime", "AccessionNumber", "StudyID",
            "ReferringPhysicianName", "StudyDescription")


def _job_for(archive: "Archive", consultation_id: str) -> dict | None:
    job = archive.index.record(JOBS, consultation_id) if consultation_id else None
    if job is None or job.get("kind", "request") != "request":
        return None
    return job


def _original_of(archive: "Archive", job_id: str) -> Callable[[str], str | None]:
    """The job's UID map (empty for a case sent without de-identification)."""
    from ..deid import UidMap

    return UidMap(archive.index, job_id).original


def _map_uids(ds: Dataset, original: Callable[[str], str | None]) -> int:
    """Replace, in place and at every depth, each UI value the map knows; returns how many."""
    n = 0

    def visit(d: Dataset) -> None:
        nonlocal n
        for elem in d:
            if elem.VR == "SQ":
                for item in elem.value:
                    visit(item)
            elif elem.VR == "UI" and elem.value:
                values = list(elem.value) if elem.VM > 1 else [elem.value]
                mapped = [original(str(v)) or str(v) for v in values]
                if mapped != [str(v) for v in values]:
                    n += sum(1 for a, b in zip(mapped, values) if a != str(b))
                    elem.value = mapped if elem.VM > 1 else mapped[0]

    visit(ds)
    return n


def map_back(archive: "Archive", ds: Dataset) -> Dataset | None:
    """The answer rewritten into the original case (a new Dataset), or None when `ds` is no
    answer to one of our requests (then it is stored as it came)."""
    if str(ds.get("SOPClassUID", "")) not in SR_SOP_CLASSES:
        return None
    op = read_opinion(ds)
    if op is None:
        return None
    job = _job_for(archive, op.consultation_id)
    if job is None:
        return None
    out = copy.deepcopy(ds)
    n = _map_uids(out, _original_of(archive, job.get("id") or op.consultation_id))
    study = job.get("study")
    if study and str(out.get("StudyInstanceUID", "")) != study:
        log.warning("answer %s to consultation %s names study %s: stored in the case's study %s",
                    op.sop_instance_uid, op.consultation_id, out.get("StudyInstanceUID"), study)
        out.StudyInstanceUID = study
        n += 1
    if job.get("deidentify"):  # a plain case went with its identity: the answer carries it already
        n += _restore_identity(archive, out, study)
    if n == 0:  # already the original case's (a plain send): stored as it came, bytes unchanged
        return None
    # A changed object is another instance: its own SOP Instance and Series UIDs, derived from the
    # partner's (the same answer arriving twice is the same instance here, a duplicate), so the
    # partner's copy and ours never hold one UID with two contents (a later send of the case).
    for kw in ("SOPInstanceUID", "SeriesInstanceUID"):
        setattr(out, kw, generate_uid(entropy_srcs=["pathpacs consultation answer", op.consultation_id,
                                                    str(ds.get(kw, ""))]))
    log.info("answer %s to consultation %s mapped back to study %s (%d values restored)",
             op.sop_instance_uid, op.consultation_id, study, n)
    return out


def _restore_identity(archive: "Archive", ds: Dataset, study: str | None) -> int:
    """Patient and study attributes of the original study into `ds`; how many changed."""
    st = archive.index.study(study) if study else None
    if st is None:
        return 0
    raw = archive.index.metadata_under(study) or []
    if not raw:
        return 0
    header = header_dataset(raw[0])
    n = 0
    for kw in RESTORED:
        if kw in header:
            elem = header.data_element(kw)
            if kw not in ds or str(ds.data_element(kw).value) != str(elem.value):
                ds[elem.tag] = DataElement(elem.tag, elem.VR, elem.value)
                n += 1
        elif kw in ds and kw.startswith("Patient") and ds.data_element(kw).value not in (None, ""):
            del ds[kw]  # what the original case does not carry, the answer does not add
            n += 1
    if "SpecificCharacterSet" in header and n:
        ds.SpecificCharacterSet = header.SpecificCharacterSet
    return n


def answer_arrived(archive: "Archive", op: ConsultOpinion) -> None:
    """Record a stored answer on its job: state, times, the consultant, the opinion's SOP UID."""
    if _job_for(archive, op.consultation_id) is None:
        return
    t = datetime.now(timezone.utc).isoformat(timespec="milliseconds")

    def change(old: dict | None) -> dict | None:
        if old is None:
            return None
        new = dict(old)
        new["accepted"] = old.get("accepted") or op.accepted or t
        if op.kind == "accepted":  # the notice: only the state and time, never over an answer
            if old.get("answer_state") not in ("answered", "declined"):
                new["answer_state"] = "accepted"
            new.update(accept_sop=op.sop_instance_uid, consultant=old.get("consultant") or op.consultant)
            return new
        if op.declined is not None:
            new.update(answer_state="declined", declined=t, decline_reason=op.declined)
        else:
            new.update(answer_state="answered", answered=t)
        new.update(answer_sop=op.sop_instance_uid, consultant=op.consultant)
        return new

    archive.index.update_record(JOBS, op.consultation_id, change)
    log.info("consultation %s %s by %s (SR %s)", op.consultation_id, op.kind, op.consultant or "?",
             op.sop_instance_uid)
