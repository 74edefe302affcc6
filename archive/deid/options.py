"""What a de-identification keeps: the PS3.15 Annex E options (CID 7050) and pathology choices.

One frozen value per call: `DeidOptions.from_config(cfg)` is the configured profile
(`[deidentify]`), `.replace(...)` a per-call variant (`pathpacs export --keep-label`, a
partner's needs). The codes written to De-identification Method Code Sequence follow from it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from ..config import Deidentify

# CID 7050 "De-identification Method" (scheme DCM)
BASIC_PROFILE = ("113100", "Basic Application Confidentiality Profile")
CODES = {
    "clean_graphics": ("113103", "Clean Graphics Option"),
    "clean_structured_content": ("113104", "Clean Structured Content Option"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
    "retain_device_identity": ("113109", "Retain Device Identity Option"),
    "retain_uids": ("113110", "Retain UIDs Option"),
    "retain_institution_identity": ("113112", "Retain Institution Identity Option"),
}


@dataclass(frozen=True)
class DeidOptions(Deidentify):
    """The Basic Application Level Confidentiality Profile plus the options of `[deidentify]`
    (archive.config.Deidentify: the fields and their defaults).

    The defaults are what a pathology consultation needs: dates shifted (intervals kept),
    sex/age/size kept, the scanner kept (its identity is Type 1 in the WSI IOD and matters for
    colour and focus questions), descriptors and structured content cleaned, not removed;
    institution removed, UIDs replaced, LABEL and OVERVIEW images left out.
    """

    @classmethod
    def from_config(cls, cfg: Any) -> "DeidOptions":
        """The profile of `[deidentify]` (defaults when the config has none)."""
        section = getattr(cfg, "deidentify", None)
        return cls() if section is None else cls(**dataclasses.asdict(section))

    def replace(self, **changes: bool) -> "DeidOptions":
        """This profile with some options changed (per call); unknown names are a TypeError."""
        return dataclasses.replace(self, **changes)

    def method_codes(self) -> list[tuple[str, str]]:
        """(code value, meaning) of CID 7050 for De-identification Method Code Sequence."""
        return [BASIC_PROFILE] + [code for name, code in CODES.items() if getattr(self, name)]

    def method_text(self) -> str:
        """De-identification Method (0012,0063): LO, at most 64 characters."""
        return f"PS3.15 E.1 Basic Profile, {len(self.method_codes()) - 1} options (0012,0064)"
