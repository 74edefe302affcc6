"""How instances reach a partner: the `Route` protocol the sender drives, one instance at a time.

Two routes implement it: `stow_route.StowRoute` (STOW-RS per instance, DICOMweb) and
`dimse_route.DimseRoute` (C-STORE with Storage Commitment). The sender (`sender.py`) knows
nothing of either protocol: it hands an `Item` to `send`, records the `Confirmation`, and on a
`RouteError` retries (retryable) or fails the job with the reason (not retryable).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator, Protocol, runtime_checkable

if TYPE_CHECKING:
    from pydicom import Dataset

    from archive.config import Config, Partner


class RouteError(Exception):
    """A send (or check) that failed; `retryable` says whether trying again later may succeed
    (connection errors, timeouts, 5xx) or not (refused credentials, conflicts, bad objects)."""

    def __init__(self, reason: str, retryable: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class Item:
    """One instance to send. Either `chunks` (Part 10 bytes, a fresh stream at each call, so a
    retry starts again from the first byte and nothing is held in memory) or `dataset` (a
    document built in memory, e.g. the request SR)."""

    sop_uid: str
    sop_class_uid: str
    study_uid: str
    size: int = 0
    chunks: Callable[[], Iterator[bytes]] | None = None
    dataset: "Dataset | None" = field(default=None, compare=False)
    series_uid: str = ""

    def stream(self) -> Iterator[bytes]:
        """The Part 10 bytes of the instance (a dataset is encoded here, little endian explicit)."""
        if self.chunks is not None:
            return self.chunks()
        if self.dataset is None:
            raise ValueError(f"item {self.sop_uid} has neither chunks nor a dataset")
        from io import BytesIO

        buf = BytesIO()
        self.dataset.save_as(buf, enforce_file_format=True)
        return iter([buf.getvalue()])


@dataclass(frozen=True)
class Confirmation:
    """What the partner said about one stored instance: confirmed (the STOW response's
    ReferencedSOPSequence, or a C-STORE success awaiting commitment), with an optional warning."""

    sop_uid: str
    warning: str = ""
    committed: bool = True  # False: stored, but held only after `confirm` (Storage Commitment)


@runtime_checkable
class Route(Protocol):
    """One partner, one protocol."""

    name: str  # "dicomweb" | "dimse": shown in job records and logs

    def check(self) -> str | None:
        """None when the partner is reachable and lets us store; else one line saying what fails."""

    def send(self, item: Item) -> Confirmation:
        """Store one instance; raises `RouteError(reason, retryable)`."""

    def confirm(self, sop_uids: list[str], classes: "dict[str, str] | None" = None) -> set[str]:
        """Of these (sent) instances, those the partner confirms holding. `classes`: their SOP
        Class UIDs (Storage Commitment names each instance by class and UID, also for
        instances sent before a restart)."""

    def count(self, study_uid: str) -> int | None:
        """How many instances of the study the partner holds (QIDO); None when it cannot say."""

    def close(self) -> None:
        """Release connections (associations, HTTP sessions)."""


def route_for(partner: "Partner", cfg: "Config", archive=None) -> Route:
    """DICOMweb when the partner has it, else DIMSE. `archive`: for the DIMSE route, where a
    commitment report taken by this archive's DIMSE server in another process is found."""
    if partner.dicomweb:
        from archive.consult.stow_route import StowRoute

        return StowRoute(partner, cfg)
    if partner.has_dimse:
        from archive.consult.dimse_route import DimseRoute

        return DimseRoute(partner, cfg, archive)
    raise RouteError(f"partner {partner.name} has neither dicomweb nor aet/host/port", retryable=False)
