"""PS3.4 C.2.2.2 matching rules as implemented in archive.query (shared by C-FIND and QIDO)."""
from __future__ import annotations

import pytest

from archive.query import Key, QueryError, match_doc, validate

DOC = {
    "00100010": {"vr": "PN", "Value": [{"Alphabetic": "Smith^John^A"}]},
    "00100020": {"vr": "LO", "Value": ["P-123"]},
    "00080020": {"vr": "DA", "Value": ["20260115"]},
    "00080030": {"vr": "TM", "Value": ["101530.25"]},
    "00080061": {"vr": "CS", "Value": ["SM", "SR"]},
    "0020000D": {"vr": "UI", "Value": ["1.2.3"]},
    "00400275": {"vr": "SQ", "Value": [
        {"00401001": {"vr": "SH", "Value": ["RP-1"]}, "00321060": {"vr": "LO", "Value": ["biopsy"]}},
        {"00401001": {"vr": "SH", "Value": ["RP-2"]}, "00321060": {"vr": "LO", "Value": ["resection"]}},
    ]},
}


@pytest.mark.parametrize("key,expected", [
    (Key("00100020", "LO", ["P-123"]), True),
    (Key("00100020", "LO", ["p-123"]), False),          # single value: case-sensitive for LO
    (Key("00100020", "LO", ["P-1*"]), True),
    (Key("00100020", "LO", ["P-12?"]), True),
    (Key("00100020", "LO", ["P-12"]), False),
    (Key("00100020", "LO", None), True),                # universal
    (Key("00100010", "PN", ["smith^john^a"]), True),    # PN case-insensitive
    (Key("00100010", "PN", ["SMITH*"]), True),
    (Key("00100010", "PN", ["Jones*"]), False),
    (Key("00080020", "DA", ["20260101-20260131"]), True),
    (Key("00080020", "DA", ["-20260114"]), False),
    (Key("00080020", "DA", ["20260115-"]), True),
    (Key("00080020", "DA", ["20260115"]), True),
    (Key("00080030", "TM", ["1000-1100"]), True),
    (Key("00080030", "TM", ["1100-"]), False),
    (Key("00080061", "CS", ["SR"]), True),              # any value of a multi-valued attribute
    (Key("00080061", "CS", ["CT"]), False),
    (Key("0020000D", "UI", ["9.9", "1.2.3"]), True),    # list of UIDs
    (Key("0020000D", "UI", ["1.2.*"]), False),          # no wildcards on UIDs
    (Key("00400275", "SQ", None, [[Key("00401001", "SH", ["RP-2"]), Key("00321060", "LO", ["resection"])]]), True),
    (Key("00400275", "SQ", None, [[Key("00401001", "SH", ["RP-2"]), Key("00321060", "LO", ["biopsy"])]]), False),
    (Key("00081030", "LO", ["x"]), False),              # absent attribute never matches a value
])
def test_matching(key, expected):
    assert match_doc(DOC, [key]) is expected


def test_fuzzy_person_names():
    assert match_doc(DOC, [Key("00100010", "PN", ["joh"])], fuzzy=True)
    assert match_doc(DOC, [Key("00100010", "PN", ["smi joh"])], fuzzy=True)
    assert not match_doc(DOC, [Key("00100010", "PN", ["ohn"])], fuzzy=True)


@pytest.mark.parametrize("vr,value", [("DA", "2026-01-01"), ("DA", "20261"), ("TM", "25x"), ("DA", "-")])
def test_invalid_values_are_query_errors(vr, value):
    with pytest.raises(QueryError):
        validate(Key("00080020", vr, [value]))
