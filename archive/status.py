"""What an archive operation can answer: DIMSE statuses, ingest outcomes, and the errors the
archive raises, each carrying its kind so protocol layers map kinds to statuses in one table
(never by reading a message).
"""
from __future__ import annotations

import enum
import errno
from typing import Callable


class DimseStatus(enum.IntEnum):
    """DIMSE status codes we answer with (PS3.7 C, PS3.4 B.2.3, C.4, J). Names follow
    pynetdicom's status tables where it has them."""

    SUCCESS = 0x0000
    PENDING = 0xFF00
    PENDING_WARNING = 0xFF01
    CANCEL = 0xFE00
    WARNING_SUBOPS_FAILED = 0xB000  # C-GET/C-MOVE: one or more sub-operations failed
    PROCESSING_FAILURE = 0x0110
    DUPLICATE_SOP_INSTANCE = 0x0111  # refused: the UID is stored with other content
    NO_SUCH_OBJECT_INSTANCE = 0x0112
    NO_SUCH_ACTION_TYPE = 0x0123
    MISSING_ATTRIBUTE = 0x0120
    CLASS_INSTANCE_CONFLICT = 0x0119
    OUT_OF_RESOURCES = 0xA700
    OUT_OF_RESOURCES_SUBOPS = 0xA702  # C-GET/C-MOVE: unable to perform sub-operations
    NOT_AUTHORIZED = 0x0124  # refused: not authorized (PS3.7 C.5.2)
    MOVE_DESTINATION_UNKNOWN = 0xA801
    DATASET_MISMATCH = 0xA900  # data set does not match SOP class / identifier does not match
    CANNOT_UNDERSTAND = 0xC000


class Outcome(enum.Enum):
    """What ingest did with one instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # the same bytes were already stored: a success, nothing written
    REPLACED = "replaced"  # on_conflict = "replace": the new bytes replaced the old
    REJECTED = "rejected"

    @property
    def ok(self) -> bool:
        return self is not Outcome.REJECTED


class ErrorKind(enum.Enum):
    """Why an archive operation failed; each protocol maps a kind to its status."""

    NOT_FOUND = "not found"
    INVALID = "invalid request"  # a bad query key, level, frame number, parameter...
    LEVEL = "invalid query/retrieve level"
    MISMATCH = "does not match"  # SOP class vs context, study vs URL, identifier vs model
    CONFLICT = "conflict"  # same SOP Instance UID, other bytes
    CANNOT_UNDERSTAND = "cannot understand"  # malformed or truncated data
    OUT_OF_SPACE = "out of space"
    DAMAGED = "damaged"  # stored bytes failed their checksum, or are missing
    UNAVAILABLE = "unavailable"  # the tier holding the data cannot be reached
    UNAUTHENTICATED = "unauthenticated"  # no, invalid or expired credentials
    FORBIDDEN = "forbidden"  # valid credentials without the right
    RETAINED = "retained"  # under retention or legal hold: refused until it ends
    INTERNAL = "internal"


class ArchiveError(Exception):
    """An archive operation failed for a reason a client may be told."""

    kind: ErrorKind = ErrorKind.INTERNAL

    def __init__(self, reason: str, kind: ErrorKind | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        if kind is not None:
            self.kind = kind


class NotFound(ArchiveError):
    kind = ErrorKind.NOT_FOUND


class InvalidRequest(ArchiveError):
    kind = ErrorKind.INVALID


class Damaged(ArchiveError):
    """Stored bytes are not the bytes received (checksum, size) or are gone: never served."""

    kind = ErrorKind.DAMAGED

    def __init__(self, sop: str, what: str) -> None:
        super().__init__(f"instance {sop} is damaged on storage ({what})")
        self.sop = sop
        self.what = what


class Unavailable(ArchiveError):
    kind = ErrorKind.UNAVAILABLE


class Retained(ArchiveError):
    """Deletion refused: retention has not ended, or a legal hold is set."""

    kind = ErrorKind.RETAINED


# One table per protocol: ErrorKind -> status.
DIMSE_STATUS_OF = {
    ErrorKind.NOT_FOUND: DimseStatus.NO_SUCH_OBJECT_INSTANCE,
    ErrorKind.INVALID: DimseStatus.CANNOT_UNDERSTAND,
    ErrorKind.LEVEL: DimseStatus.DATASET_MISMATCH,
    ErrorKind.MISMATCH: DimseStatus.DATASET_MISMATCH,
    ErrorKind.CONFLICT: DimseStatus.DUPLICATE_SOP_INSTANCE,
    ErrorKind.CANNOT_UNDERSTAND: DimseStatus.CANNOT_UNDERSTAND,
    ErrorKind.OUT_OF_SPACE: DimseStatus.OUT_OF_RESOURCES,
    ErrorKind.DAMAGED: DimseStatus.PROCESSING_FAILURE,
    ErrorKind.UNAVAILABLE: DimseStatus.OUT_OF_RESOURCES,
    ErrorKind.UNAUTHENTICATED: DimseStatus.NOT_AUTHORIZED,
    ErrorKind.FORBIDDEN: DimseStatus.NOT_AUTHORIZED,
    ErrorKind.RETAINED: DimseStatus.PROCESSING_FAILURE,
    ErrorKind.INTERNAL: DimseStatus.PROCESSING_FAILURE,
}

HTTP_STATUS_OF = {
    ErrorKind.NOT_FOUND: 404,
    ErrorKind.INVALID: 400,
    ErrorKind.LEVEL: 400,
    ErrorKind.MISMATCH: 409,
    ErrorKind.CONFLICT: 409,
    ErrorKind.CANNOT_UNDERSTAND: 400,
    ErrorKind.OUT_OF_SPACE: 507,
    ErrorKind.DAMAGED: 500,
    ErrorKind.UNAVAILABLE: 503,
    ErrorKind.UNAUTHENTICATED: 401,
    ErrorKind.FORBIDDEN: 403,
    ErrorKind.RETAINED: 409,
    ErrorKind.INTERNAL: 500,
}


# Backends register how their own errors say "disk full" (LMDB: MapFullError, ENOSPC texts).
SPACE_CHECKS: list[Callable[[BaseException], bool]] = []


def out_of_space(exc: BaseException) -> bool:
    """True when `exc` means a disk (or an index's map) is full: answered 0xA700 / 507."""
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
        return True
    return any(check(exc) for check in SPACE_CHECKS)
