"""Turn a C-FIND/C-GET/C-MOVE identifier into archive.query keys, and results back."""
from __future__ import annotations

from typing import Any

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue

from archive.query import Key

SKIP = {0x00080052, 0x00080005, 0x00080056, 0x00080054}  # level, charset, availability, retrieve AE


def _strings(value: Any) -> list[str] | None:
    if value is None or value == "":
        return None
    if isinstance(value, (list, MultiValue)):
        vals = [str(v) for v in value]
        return vals if any(vals) else None
    return [str(value)]


def keys_from_identifier(ds: Dataset) -> list[Key]:
    keys: list[Key] = []
    for elem in ds:
        if elem.tag in SKIP or elem.tag.group in (0x0000, 0x0002) or elem.tag.is_private:
            continue
        tag = f"{int(elem.tag):08X}"
        if elem.VR == "SQ":
            items = [keys_from_identifier(item) for item in elem.value] or None
            keys.append(Key(tag, "SQ", None, items))
        else:
            keys.append(Key(tag, elem.VR, _strings(elem.value)))
    return keys


def response_dataset(doc: dict[str, Any], identifier: Dataset, level: str, aet: str) -> Dataset:
    """A C-FIND response: exactly the requested keys, filled from the result document."""
    wanted: dict[str, Any] = {}
    for elem in identifier:
        if elem.tag in SKIP or elem.tag.group in (0x0000, 0x0002) or elem.tag.is_private:
            continue
        tag = f"{int(elem.tag):08X}"
        wanted[tag] = doc.get(tag) or {"vr": elem.VR}
    for tag, el in list(wanted.items()):
        if "BulkDataURI" in el:
            wanted[tag] = {"vr": el["vr"]}
    out = Dataset.from_json(wanted)
    out.QueryRetrieveLevel = level
    if "SpecificCharacterSet" in identifier:
        out.SpecificCharacterSet = "ISO_IR 192"
    if 0x00080054 in identifier:
        out.RetrieveAETitle = aet
    if 0x00080056 in identifier:  # from the tiers the data is on (the least available wins)
        avail = (doc.get("00080056") or {}).get("Value") or ["ONLINE"]
        out.InstanceAvailability = avail[0]
    return out
