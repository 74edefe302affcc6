"""Patient consent to send, share or research a case: recorded, checked, withdrawn (issue 12).

A consent record (index table "consents", keyed by its id) covers one study, or every study of
a patient when it names a Patient ID only. It says who consented (the patient, or for a
patient under 14 a guardian, whose name and relationship are then required), when, for which
purposes (`PURPOSES`), with which reference (a paper form number, an e-signature id), who
recorded it and, once withdrawn, when and by whom. Records are never deleted: a withdrawn
consent stays as evidence. With `[consultation] require_consent = true`, sending a case
(archive.consult) and making a share link (archive.shares) call `Consents.require` first.
Withdrawing revokes the share links made under the consent (refused everywhere within
`auth.cache_seconds`, <= 10 s). Every record and withdrawal is audited as a Patient Record
event (DCM 110110).
"""
from __future__ import annotations

import secrets
from datetime import date, datetime, timezone
from typing import Any, Iterable

from . import metadata as md
from .access import SYSTEM, Forbidden, Principal
from .audit import events as ev
from .audit.events import AuditEvent, Participant, ParticipantObject
from .status import InvalidRequest, NotFound

TABLE = "consents"
PURPOSES = ("consult", "share", "research")
GUARDIAN_AGE = 14  # below this age a guardian consents for the patient


def _now() -> str:
    # microseconds: consents recorded within one second still list in the order they were made
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _da(value: Any) -> date | None:
    """A DICOM DA value (YYYYMMDD) as a date; None when absent or malformed."""
    text = str(value or "").strip()
    try:
        return datetime.strptime(text[:8], "%Y%m%d").date() if len(text) >= 8 else None
    except ValueError:
        return None


def age_on(birth: date, day: date) -> int:
    """Whole years of age on `day`."""
    return day.year - birth.year - ((day.month, day.day) < (birth.month, birth.day))


def check_scope(scope: Iterable[str]) -> list[str]:
    """The purposes, checked (InvalidRequest naming the unknown one)."""
    out = sorted({s.strip() for s in scope if s.strip()})
    if not out:
        raise InvalidRequest(f"a consent needs a scope: one or more of {', '.join(PURPOSES)}")
    for s in out:
        if s not in PURPOSES:
            raise InvalidRequest(f"unknown consent scope {s!r} (scopes: {', '.join(PURPOSES)})")
    return out


def participant(who: Principal | str, roles: list[ev.Code] | None = None) -> Participant:
    """The requesting user of an audit event (as archive.audit.recorder records principals)."""
    if isinstance(who, str):
        return Participant(who, who, True, "", "", list(roles or []))
    return Participant(who.id, who.name, True, who.address, "", list(roles or []), sorted(who.roles))


def record_event(archive, kind: str, event_id: ev.Code, action: str, who: Principal | str,
                 objects: list[ParticipantObject], detail: dict[str, Any], types: list[ev.Code] | None = None) -> None:
    """Queue one audit event of this module (and of archive.shares) on the archive's trail."""
    audit = archive.audit
    if not getattr(audit, "enabled", True):
        return
    host = getattr(audit, "host", "")
    me = Participant(f"{audit.source_id}@{host}", audit.source_id, False, host, audit.source_id,
                     [ev.ROLE_APPLICATION], [])
    audit.record(AuditEvent(kind, event_id, action, ev.SUCCESS, types=list(types or []),
                            participants=[participant(who), me], objects=objects,
                            detail={k: v for k, v in detail.items() if v not in (None, "")},
                            source_id=audit.source_id, site_id=audit.site_id))


def valid(rec: dict, purpose: str) -> bool:
    return not rec.get("withdrawn") and purpose in rec.get("scope", ())


class Consents:
    """Consent records over the archive's index (`Consents(archive)`)."""

    def __init__(self, archive) -> None:
        self.arc = archive
        self.index = archive.index

    @property
    def required(self) -> bool:
        return bool(self.arc.config.consultation.require_consent)

    # -- what the index knows about the patient ----------------------------------------------
    def _patient_of(self, study_uid: str) -> tuple[str, dict]:
        """(Patient ID, patient attributes) of a stored study; NotFound when it is not stored."""
        st = self.arc.study(study_uid)
        if st is None:
            raise NotFound(f"study {study_uid} is not in this archive")
        pat = self.index.patient(st.patient)
        attrs = dict(pat.attrs) if pat is not None else {}
        pid = md.first_value(attrs, "00100020") or md.first_value(st.attrs, "00100020") or ""
        return str(pid), attrs

    def _studies_of_patient_id(self, patient_id: str) -> list:
        return [st for p in self.arc.patients() if str(md.first_value(p.attrs, "00100020") or "") == patient_id
                for st in self.arc.studies_of_patient(p.key)]

    def patient_age(self, study_uid: str | None = None, patient_id: str | None = None) -> int | None:
        """Age in years from PatientBirthDate on the StudyDate (today for a patient-wide
        consent, or when the study has no date); None when the birth date is not recorded."""
        if study_uid:
            _, attrs = self._patient_of(study_uid)
            st = self.arc.study(study_uid)
            on = _da(md.first_value(st.attrs, "00080020")) or datetime.now(timezone.utc).date()
        else:
            studies = self._studies_of_patient_id(patient_id or "")
            if not studies:
                return None
            pat = self.index.patient(studies[0].patient)
            attrs = dict(pat.attrs) if pat is not None else {}
            on = datetime.now(timezone.utc).date()
        birth = _da(md.first_value(attrs, "00100030"))
        return age_on(birth, on) if birth else None

    # -- records -----------------------------------------------------------------------------
    def add(self, *, study: str | None = None, patient: str | None = None, recorded_by: str,
            scope: Iterable[str], guardian: str = "", relationship: str = "", reference: str = "",
            who: Principal = SYSTEM) -> dict:
        """Record a consent for a study (or for every study of a Patient ID). InvalidRequest
        for a bad scope, a missing name, or a patient under 14 without a guardian; NotFound
        for a study or patient the archive does not hold."""
        purposes = check_scope(scope)
        recorded_by = recorded_by.strip()
        guardian, relationship = guardian.strip(), relationship.strip()
        if not recorded_by:
            raise InvalidRequest("say who records the consent (--by NAME)")
        if not study and not patient:
            raise InvalidRequest("a consent is for a study (--study UID) or a patient (--patient ID)")
        if bool(guardian) != bool(relationship):
            raise InvalidRequest("a guardian's consent needs both --guardian NAME and --relationship "
                                 "(e.g. mother, father, legal guardian)")
        if study:
            pid, _ = self._patient_of(study)
            if patient and pid and patient != pid:
                raise InvalidRequest(f"study {study} belongs to patient {pid}, not {patient}")
            patient = patient or pid or None
        elif not self._studies_of_patient_id(patient or ""):
            raise NotFound(f"no study of patient {patient} is in this archive")
        age = self.patient_age(study, patient)
        if age is not None and age < GUARDIAN_AGE and not guardian:
            raise InvalidRequest(f"the patient is {age} years old: a consent for a patient under {GUARDIAN_AGE} "
                                 "is given by a guardian (--guardian NAME --relationship R)")
        rec = {"id": secrets.token_hex(8), "study": study or None, "patient": patient or None,
               "consented_by": guardian or "patient", "guardian": guardian or None,
               "relationship": relationship or None, "patient_age": age, "time": _now(), "scope": purposes,
               "reference": reference.strip() or None, "recorded_by": recorded_by, "entered_by": who.name,
               "withdrawn": None, "withdrawn_by": None}
        self.index.put_record(TABLE, rec["id"], rec)
        self._audit("consent recorded", "C", rec, who)
        return rec

    def get(self, consent_id: str) -> dict | None:
        return self.index.record(TABLE, consent_id) if consent_id else None

    def list(self, study: str | None = None) -> list[dict]:
        """Every consent (or those covering `study`: its own and its patient's), oldest first."""
        recs = [r for _, r in self.index.records(TABLE)]
        if study:
            try:
                pid, _ = self._patient_of(study)
            except NotFound:
                pid = ""
            recs = [r for r in recs if r.get("study") == study or (not r.get("study") and pid and r.get("patient") == pid)]
        return sorted(recs, key=lambda r: (r.get("time", ""), r["id"]))

    def covering(self, study_uid: str, purpose: str) -> list[dict]:
        """Valid (not withdrawn) consents for this purpose that cover the study, newest first."""
        return sorted((r for r in self.list(study_uid) if valid(r, purpose)), key=lambda r: r.get("time", ""),
                      reverse=True)

    def find(self, ref: str, study_uid: str, purpose: str) -> dict:
        """The consent named by id or by its reference, checked to cover the study for the
        purpose (Forbidden naming why not)."""
        recs = self.list(study_uid)
        hit = next((r for r in recs if r["id"] == ref), None) or next(
            (r for r in reversed(recs) if r.get("reference") == ref and valid(r, purpose)), None) or next(
            (r for r in reversed(recs) if r.get("reference") == ref), None)
        if hit is None:
            raise Forbidden(f"no consent {ref!r} on record for study {study_uid}")
        if hit.get("withdrawn"):
            raise Forbidden(f"consent {hit['id']} was withdrawn at {hit['withdrawn']}")
        if purpose not in hit.get("scope", ()):
            raise Forbidden(f"consent {hit['id']} covers {', '.join(hit.get('scope', ()))}, not {purpose}")
        return hit

    def require(self, study_uid: str, purpose: str) -> dict | None:
        """The consent that allows `purpose` on the study. Forbidden("no consent on record for
        ...") when `consultation.require_consent` is set and none is valid; None when consent
        is not required (a consent named explicitly is checked with `find`)."""
        if purpose not in PURPOSES:
            raise ValueError(f"unknown purpose {purpose!r}")
        found = self.covering(study_uid, purpose) if self.required else []
        if found:
            return found[0]
        if self.required:
            raise Forbidden(f"no consent on record for {purpose} of study {study_uid} "
                            "(consultation.require_consent is set: pathpacs consent add)")
        return None

    def withdraw(self, consent_id: str, who: Principal = SYSTEM) -> dict:
        """Withdraw a consent (NotFound when unknown; withdrawing twice keeps the first time)
        and revoke the share links made under it. Returns the record, with "revoked_links"."""
        def change(old: dict | None) -> dict | None:
            if old is None or old.get("withdrawn"):
                return old
            return {**old, "withdrawn": _now(), "withdrawn_by": who.name}

        before = self.get(consent_id)
        rec = self.index.update_record(TABLE, consent_id, change) if before is not None else None
        if rec is None:
            raise NotFound(f"no consent {consent_id} (see pathpacs consent list)")
        from .shares import ShareLinks

        revoked = ShareLinks(self.arc).revoke_consent(consent_id, who)
        if not before.get("withdrawn"):
            self._audit("consent withdrawn", "U", rec, who, {"revoked_links": ",".join(revoked)})
        return {**rec, "revoked_links": revoked}

    def _audit(self, kind: str, action: str, rec: dict, who: Principal, extra: dict | None = None) -> None:
        detail = {"consent": rec["id"], "scope": ",".join(rec["scope"]), "consented_by": rec["consented_by"],
                  "relationship": rec.get("relationship"), "reference": rec.get("reference"),
                  "recorded_by": rec["recorded_by"], **(extra or {})}
        objs = [ParticipantObject(f"consent:{rec['id']}", ev.OTHER, ev.ROLE_SECURITY_RESOURCE, ev.ID_URI,
                                  name="consent", detail={k: str(v) for k, v in detail.items() if v})]
        if rec.get("study"):
            objs.append(ParticipantObject(rec["study"], ev.SYSTEM_OBJECT, ev.ROLE_REPORT, ev.ID_STUDY))
        if rec.get("patient"):
            objs.append(ParticipantObject(rec["patient"], ev.PERSON, ev.ROLE_PATIENT, ev.ID_PATIENT))
        record_event(self.arc, kind, ev.PATIENT_RECORD, action, who, objs, detail)
