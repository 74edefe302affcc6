"""Audit events as DICOM audit messages (PS3.15 A.5, the IHE ATNA schema).

An `AuditEvent` is what the trail stores (as plain JSON, hashed) and what a collector receives
(as ATNA XML, `to_xml`). Rendering is a pure function of the stored fields, so the XML of a
record is covered by the record's hash. Codes are those of PS3.16 CID 400-405 (DCM) and
RFC 3881 (ParticipantObjectTypeCode, ParticipantObjectIDTypeCode for patients).
"""
from __future__ import annotations

import base64
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple


class Code(NamedTuple):
    """A coded value (ATNA CodedValueType: csd-code, codeSystemName, originalText)."""

    code: str
    scheme: str
    meaning: str


def _dcm(code: str, meaning: str) -> Code:
    return Code(code, "DCM", meaning)


# EventID (CID 400)
APPLICATION_ACTIVITY = _dcm("110100", "Application Activity")
AUDIT_LOG_USED = _dcm("110101", "Audit Log Used")
INSTANCES_ACCESSED = _dcm("110103", "DICOM Instances Accessed")
INSTANCES_TRANSFERRED = _dcm("110104", "DICOM Instances Transferred")
STUDY_DELETED = _dcm("110105", "DICOM Study Deleted")
EXPORT = _dcm("110106", "Export")
QUERY = _dcm("110112", "Query")
SECURITY_ALERT = _dcm("110113", "Security Alert")
USER_AUTHENTICATION = _dcm("110114", "User Authentication")
PATIENT_RECORD = _dcm("110110", "Patient Record")  # consent recorded / withdrawn (archive.consent)

# EventTypeCode (CID 401)
APPLICATION_START = _dcm("110120", "Application Start")
APPLICATION_STOP = _dcm("110121", "Application Stop")
LOGIN = _dcm("110122", "Login")
LOGOUT = _dcm("110123", "Logout")
NODE_AUTHENTICATION = _dcm("110126", "Node Authentication")
NETWORK_CONFIGURATION = _dcm("110128", "Network Configuration")
SECURITY_CONFIGURATION = _dcm("110129", "Security Configuration")
SOFTWARE_CONFIGURATION = _dcm("110131", "Software Configuration")
USE_OF_RESTRICTED_FUNCTION = _dcm("110132", "Use of Restricted Function")
SECURITY_ROLES_CHANGED = _dcm("110136", "Security Roles Changed")
USER_SECURITY_ATTRIBUTES_CHANGED = _dcm("110137", "User Security Attributes Changed")

# RoleIDCode (CID 402)
ROLE_APPLICATION = _dcm("110150", "Application")
ROLE_LAUNCHER = _dcm("110151", "Application Launcher")
ROLE_DESTINATION = _dcm("110152", "Destination Role ID")
ROLE_SOURCE = _dcm("110153", "Source Role ID")

# ParticipantObjectIDTypeCode (CID 404 and RFC 3881)
ID_PATIENT = Code("2", "RFC-3881", "Patient Number")
ID_STUDY = _dcm("110180", "Study Instance UID")
ID_SOP_CLASS = _dcm("110181", "SOP Class UID")
ID_NODE = _dcm("110182", "Node ID")
ID_USER = Code("11", "RFC-3881", "User Identifier")
ID_URI = Code("12", "RFC-3881", "URI")

# EventOutcomeIndicator
SUCCESS, MINOR_FAILURE, SERIOUS_FAILURE, MAJOR_FAILURE = 0, 4, 8, 12
OUTCOMES = {"success": SUCCESS, "minor failure": MINOR_FAILURE, "serious failure": SERIOUS_FAILURE,
            "major failure": MAJOR_FAILURE}

# ParticipantObjectTypeCode / ParticipantObjectTypeCodeRole (RFC 3881)
PERSON, SYSTEM_OBJECT, ORGANIZATION, OTHER = 1, 2, 3, 4
ROLE_PATIENT, ROLE_REPORT, ROLE_RESOURCE, ROLE_USER, ROLE_SECURITY_RESOURCE, ROLE_QUERY = 1, 3, 4, 6, 13, 24

# AuditSourceTypeCode 4: Application Server process tier in a multi-tier system
SOURCE_APPLICATION_SERVER = Code("4", "DCM", "Application Server Process")


@dataclass
class Participant:
    """An ActiveParticipant: a user, a node (AE title in AlternativeUserID), or the archive."""

    user_id: str
    user_name: str = ""
    requestor: bool = False
    address: str = ""  # NetworkAccessPointID
    aet: str = ""  # AlternativeUserID "AETITLES=..."
    roles: list[Code] = field(default_factory=list)  # RoleIDCode
    user_roles: list[str] = field(default_factory=list)  # the principal's pathpacs roles

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"user_id": self.user_id}
        for k in ("user_name", "address", "aet"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.requestor:
            d["requestor"] = True
        if self.roles:
            d["roles"] = [list(c) for c in self.roles]
        if self.user_roles:
            d["user_roles"] = list(self.user_roles)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Participant":
        return cls(d["user_id"], d.get("user_name", ""), bool(d.get("requestor")), d.get("address", ""),
                   d.get("aet", ""), [Code(*c) for c in d.get("roles", [])], list(d.get("user_roles", [])))


@dataclass
class ParticipantObject:
    """A ParticipantObjectIdentification: a patient, a study (with SOP classes and counts), a
    query, a user or a security resource."""

    id: str
    type: int
    role: int
    id_type: Code
    name: str = ""
    query: str = ""  # ParticipantObjectQuery (stored as text, sent base64-encoded)
    sop_classes: dict[str, int] = field(default_factory=dict)  # SOP Class UID -> NumberOfInstances
    instances: list[str] = field(default_factory=list)  # SOP Instance UIDs (bounded by the caller)
    detail: dict[str, str] = field(default_factory=dict)  # ParticipantObjectDetail type -> value
    lifecycle: str = ""  # ParticipantObjectDataLifeCycle

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"id": self.id, "type": self.type, "role": self.role, "id_type": list(self.id_type)}
        for k in ("name", "query", "lifecycle"):
            if getattr(self, k):
                d[k] = getattr(self, k)
        if self.sop_classes:
            d["sop_classes"] = dict(self.sop_classes)
        if self.instances:
            d["instances"] = list(self.instances)
        if self.detail:
            d["detail"] = dict(self.detail)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ParticipantObject":
        return cls(d["id"], int(d["type"]), int(d["role"]), Code(*d["id_type"]), d.get("name", ""),
                   d.get("query", ""), dict(d.get("sop_classes", {})), list(d.get("instances", [])),
                   dict(d.get("detail", {})), d.get("lifecycle", ""))


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass
class AuditEvent:
    """One audit message: what happened (event id, action, outcome), who took part, to what."""

    kind: str  # our short name: "stored", "retrieved", "queried", "login", ... (for filtering)
    event_id: Code
    action: str  # EventActionCode: C R U D E
    outcome: int = SUCCESS
    outcome_text: str = ""
    time: str = field(default_factory=now_iso)
    types: list[Code] = field(default_factory=list)  # EventTypeCode
    participants: list[Participant] = field(default_factory=list)
    objects: list[ParticipantObject] = field(default_factory=list)
    detail: dict[str, Any] = field(default_factory=dict)  # ours: counts, windows, reasons
    source_id: str = ""  # AuditSourceID
    site_id: str = ""  # AuditEnterpriseSiteID

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"kind": self.kind, "time": self.time, "event_id": list(self.event_id),
                             "action": self.action, "outcome": self.outcome,
                             "participants": [p.to_dict() for p in self.participants],
                             "objects": [o.to_dict() for o in self.objects], "source_id": self.source_id}
        if self.outcome_text:
            d["outcome_text"] = self.outcome_text
        if self.types:
            d["types"] = [list(t) for t in self.types]
        if self.detail:
            d["detail"] = self.detail
        if self.site_id:
            d["site_id"] = self.site_id
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "AuditEvent":
        return cls(d["kind"], Code(*d["event_id"]), d["action"], int(d.get("outcome", 0)), d.get("outcome_text", ""),
                   d["time"], [Code(*t) for t in d.get("types", [])],
                   [Participant.from_dict(p) for p in d.get("participants", [])],
                   [ParticipantObject.from_dict(o) for o in d.get("objects", [])], dict(d.get("detail", {})),
                   d.get("source_id", ""), d.get("site_id", ""))

    # -- questions the CLI asks ------------------------------------------------------------------
    def ids(self, id_type: Code) -> list[str]:
        return [o.id for o in self.objects if o.id_type.code == id_type.code and o.id_type.scheme == id_type.scheme]

    @property
    def studies(self) -> list[str]:
        return self.ids(ID_STUDY)

    @property
    def patients(self) -> list[str]:
        return [o.id for o in self.objects if o.role == ROLE_PATIENT]

    @property
    def requestor(self) -> Participant | None:
        return next((p for p in self.participants if p.requestor), None)

    # -- ATNA XML ----------------------------------------------------------------------------
    def to_element(self) -> ET.Element:
        msg = ET.Element("AuditMessage")
        ev = ET.SubElement(msg, "EventIdentification", {
            "EventActionCode": self.action, "EventDateTime": self.time,
            "EventOutcomeIndicator": str(self.outcome)})
        _code(ev, "EventID", self.event_id)
        for t in self.types:
            _code(ev, "EventTypeCode", t)
        if self.outcome_text:
            ET.SubElement(ev, "EventOutcomeDescription").text = self.outcome_text
        for p in self.participants:
            attrs = {"UserID": p.user_id, "UserIsRequestor": "true" if p.requestor else "false"}
            if p.aet:
                attrs["AlternativeUserID"] = f"AETITLES={p.aet}"
            if p.user_name:
                attrs["UserName"] = p.user_name
            if p.address:
                attrs["NetworkAccessPointID"] = p.address
                attrs["NetworkAccessPointTypeCode"] = "2" if _is_ip(p.address) else "1"
            ap = ET.SubElement(msg, "ActiveParticipant", attrs)
            for r in p.roles:
                _code(ap, "RoleIDCode", r)
        src_attrs = {"AuditSourceID": self.source_id or "pathpacs"}
        if self.site_id:
            src_attrs["AuditEnterpriseSiteID"] = self.site_id
        src = ET.SubElement(msg, "AuditSourceIdentification", src_attrs)
        _code(src, "AuditSourceTypeCode", SOURCE_APPLICATION_SERVER)
        for o in self.objects:
            attrs = {"ParticipantObjectID": o.id, "ParticipantObjectTypeCode": str(o.type),
                     "ParticipantObjectTypeCodeRole": str(o.role)}
            if o.lifecycle:
                attrs["ParticipantObjectDataLifeCycle"] = o.lifecycle
            po = ET.SubElement(msg, "ParticipantObjectIdentification", attrs)
            _code(po, "ParticipantObjectIDTypeCode", o.id_type)
            if o.name:
                ET.SubElement(po, "ParticipantObjectName").text = o.name
            if o.query:
                ET.SubElement(po, "ParticipantObjectQuery").text = base64.b64encode(o.query.encode()).decode()
            for k, v in o.detail.items():
                ET.SubElement(po, "ParticipantObjectDetail",
                              {"type": k, "value": base64.b64encode(str(v).encode()).decode()})
            if o.sop_classes:
                desc = ET.SubElement(po, "ParticipantObjectDescription")
                for uid, n in o.sop_classes.items():
                    sc = ET.SubElement(desc, "SOPClass", {"UID": uid, "NumberOfInstances": str(n)})
                    for sop in o.instances if len(o.sop_classes) == 1 else ():
                        ET.SubElement(sc, "Instance", {"UID": sop})
        return msg

    def to_xml(self) -> bytes:
        """The ATNA message, UTF-8, with an XML declaration."""
        return ET.tostring(self.to_element(), encoding="utf-8", xml_declaration=True)


def _code(parent: ET.Element, tag: str, c: Code) -> ET.Element:
    return ET.SubElement(parent, tag, {"csd-code": c.code, "codeSystemName": c.scheme, "originalText": c.meaning})


def _is_ip(text: str) -> bool:
    import ipaddress

    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        return False
