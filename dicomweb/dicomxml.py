"""DICOM JSON (PS3.18 F.2) -> Native DICOM Model XML (PS3.19 A.1).

pydicom has no XML writer; QIDO and metadata can answer application/dicom+xml with this.
"""
from __future__ import annotations

import re
from typing import Any
from xml.sax.saxutils import escape as _escape, quoteattr as _quoteattr

from pydicom.datadict import keyword_for_tag

NS = "http://dicom.nema.org/PS3.19/models/NativeDICOM"
_PN_GROUPS = ("Alphabetic", "Ideographic", "Phonetic")
_PN_COMPONENTS = ("FamilyName", "GivenName", "MiddleName", "NamePrefix", "NameSuffix")
# Characters XML 1.0 cannot hold at all (C0 controls but TAB/LF/CR, lone surrogates, U+FFFE/F):
# stored values may contain them (a PatientID with \x01), client text too (a STOW failure
# reason quoting a header with a non-UTF-8 byte). They become U+FFFD, so the document stays
# well-formed and encodable.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def escape(s: str) -> str:
    return _escape(_NOT_XML.sub("\ufffd", s))


def quoteattr(s: str) -> str:
    return _quoteattr(_NOT_XML.sub("\ufffd", s))


def _keyword(tag: str) -> str:
    try:
        return keyword_for_tag(int(tag, 16)) or ""
    except ValueError:
        return ""


def _attr(tag: str, el: dict[str, Any], out: list[str]) -> None:
    vr = el.get("vr", "UN")
    kw = _keyword(tag)
    head = f'<DicomAttribute tag="{tag.upper()}" vr="{vr}"'
    if kw:
        head += f' keyword="{kw}"'
    out.append(head + ">")
    if "BulkDataURI" in el:
        out.append(f"<BulkData uri={quoteattr(el['BulkDataURI'])}/>")
    elif "InlineBinary" in el:
        out.append(f"<InlineBinary>{escape(el['InlineBinary'])}</InlineBinary>")
    elif vr == "SQ":
        for i, item in enumerate(el.get("Value") or [], 1):
            out.append(f'<Item number="{i}">')
            _dataset(item or {}, out)
            out.append("</Item>")
    elif vr == "PN":
        for i, v in enumerate(el.get("Value") or [], 1):
            out.append(f'<PersonName number="{i}">')
            if isinstance(v, dict):
                for group in _PN_GROUPS:
                    if v.get(group) is None:
                        continue
                    comps = str(v[group]).split("^")
                    out.append(f"<{group}>")
                    for name, comp in zip(_PN_COMPONENTS, comps):
                        if comp:
                            out.append(f"<{name}>{escape(comp)}</{name}>")
                    out.append(f"</{group}>")
            out.append("</PersonName>")
    else:
        for i, v in enumerate(el.get("Value") or [], 1):
            if v is None:
                out.append(f'<Value number="{i}"/>')
            else:
                out.append(f'<Value number="{i}">{escape(str(v))}</Value>')
    out.append("</DicomAttribute>")


def _dataset(doc: dict[str, Any], out: list[str]) -> None:
    for tag in sorted(doc):
        _attr(tag, doc[tag], out)


def to_xml(doc: dict[str, Any]) -> bytes:
    out = ['<?xml version="1.0" encoding="UTF-8"?>\n', f'<NativeDicomModel xmlns="{NS}" xml:space="preserve">']
    _dataset(doc, out)
    out.append("</NativeDicomModel>\n")
    return "".join(out).encode("utf-8")
