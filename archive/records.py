"""The archive's records: what the index holds about each patient, study, series and instance.

Frozen dataclasses, so a record says what it holds and nobody edits one in place. Attribute
subsets (`attrs`) are DICOM JSON (PS3.18 F.2) as built once at ingest; read values with
`archive.metadata` (`first_value`, `string_values`, `int_value`), the one getter.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, NamedTuple

from . import metadata as md

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"


class BlobRef(NamedTuple):
    """Where an instance's bytes are: a tier and the key inside it. Recorded once per instance;
    moving a blob is one update of this. (NamedTuple, like the frame-path records below:
    immutable and the cheapest to make, one per frame request.)"""

    tier: str
    key: str


@dataclass(frozen=True)
class InstanceRecord:
    sop: str
    sop_class: str
    study: str
    series: str
    patient: str  # the patient key ("ID^issuer", or "~name" without an ID)
    ts: str  # the transfer syntax the bytes are stored in
    blob: BlobRef
    size: int
    sha256: str
    received: str  # ISO time of ingest (UTC)
    calling_aet: str = ""
    origin: str = ""
    n_frames: int = 0
    encapsulated: bool = False
    pixel_offset: int | None = None
    attrs: Mapping[str, Any] = field(default_factory=dict, repr=False, compare=False)

    def value(self, tag: str, default: Any = None) -> Any:
        v = md.first_value(self.attrs, tag)
        return default if v is None else v

    def int_value(self, tag: str, default: int = 0) -> int:
        return md.int_value(self.attrs, tag, default)

    @property
    def image_type(self) -> list[str]:
        return [v.upper() for v in md.string_values(self.attrs.get("00080008"))]

    @property
    def total_pixels(self) -> int:
        cols = self.int_value("00480006") or self.int_value("00280011")
        rows = self.int_value("00480007") or self.int_value("00280010")
        return cols * rows

    @property
    def decoded_size(self) -> int:
        """Bytes of all frames decoded (what a transcoding would hold in memory)."""
        return (self.int_value("00280010") * self.int_value("00280011") * max(1, self.int_value("00280002", 1))
                * max(1, self.int_value("00280100", 8) // 8) * max(1, self.n_frames))

    @property
    def jpeg_baseline_possible(self) -> bool:
        """JPEG baseline holds 8-bit greyscale or colour pixels only."""
        return self.n_frames > 0 and self.int_value("00280100") == 8 and self.int_value("00280002") in (1, 3)

    def to_json(self) -> dict[str, Any]:
        """The stored form (the index's JSON record); the location is kept beside it."""
        return {"sop": self.sop, "sop_class": self.sop_class, "study": self.study, "series": self.series,
                "patient": self.patient, "ts": self.ts, "blob": self.blob.key, "tier": self.blob.tier,
                "size": self.size, "sha256": self.sha256, "received": self.received,
                "calling_aet": self.calling_aet, "origin": self.origin, "n_frames": self.n_frames,
                "encapsulated": self.encapsulated, "pixel_offset": self.pixel_offset, "attrs": dict(self.attrs)}

    @classmethod
    def from_json(cls, d: Mapping[str, Any]) -> "InstanceRecord":
        return cls(d["sop"], d["sop_class"], d["study"], d["series"], d["patient"], d["ts"],
                   BlobRef(d["tier"], d["blob"]), d["size"], d["sha256"], d["received"],
                   d.get("calling_aet", ""), d.get("origin", ""), d.get("n_frames", 0),
                   d.get("encapsulated", False), d.get("pixel_offset"), d.get("attrs", {}))


@dataclass(frozen=True)
class SeriesRecord:
    uid: str
    study: str
    attrs: Mapping[str, Any] = field(repr=False, compare=False)
    n_instances: int = 0
    bytes: int = 0
    sop_classes: tuple[str, ...] = ()
    tiers: Mapping[str, int] = field(default_factory=dict, compare=False)  # instances per tier


@dataclass(frozen=True)
class StudyRecord:
    uid: str
    patient: str
    attrs: Mapping[str, Any] = field(repr=False, compare=False)
    n_series: int = 0
    n_instances: int = 0
    bytes: int = 0
    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()
    updated: str = ""
    tiers: Mapping[str, int] = field(default_factory=dict, compare=False)  # instances per tier


@dataclass(frozen=True)
class PatientRecord:
    key: str
    attrs: Mapping[str, Any] = field(repr=False, compare=False)
    n_studies: int = 0


class FrameTable(NamedTuple):
    """Where one instance's frames lie in its blob (read once at ingest), with their CRC32C."""

    blob: BlobRef
    ts: str
    n: int
    checked: bool = False  # frames carry CRC32C
    damaged: str | None = None  # the blob failed its sha256 when checksums were added


class Frames(NamedTuple):
    """Located frames: the table header and, per requested frame number, fragments and CRC."""

    table: FrameTable
    numbers: tuple[int, ...]
    fragments: list[list[tuple[int, int]] | None]
    crcs: list[int | None]


@dataclass
class Stats:
    patients: int
    studies: int
    series: int
    instances: int
    bytes: int
    by_tier: dict[str, int] = field(default_factory=dict)
