"""Who may do what: principals, roles with separated duties, rights, study scopes.

Every entry point (DICOMweb, pages, DIMSE, CLI) turns its caller into a `Principal` and asks
the same questions here (`can`, `require`, `sees`), so a rule is written once. The roles
follow the separation of duties of classified protection level 3 (三权分立): the system,
security and audit administrators are three roles no principal holds together unless the
configuration says so (`auth.allow_combined_admin_roles`).
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .status import ArchiveError, ErrorKind


class Right(enum.Enum):
    READ = "read"  # QIDO, WADO, pages, C-FIND, C-GET, C-MOVE
    DOWNLOAD = "download"  # whole instances, series, studies as application/dicom (a read-only share link lacks it)
    STORE = "store"  # STOW, C-STORE: any object
    STORE_DERIVED = "store derived"  # SR, SEG, annotations, presentation states, KOS only
    ADMIN = "admin"  # tiers, configuration, reject / restore / purge; sees rejected instances
    SECURITY = "security"  # tokens and role mappings
    AUDIT = "audit"  # the audit trail, and nothing else


ROLE_RIGHTS: dict[str, frozenset[Right]] = {
    "viewer": frozenset({Right.READ, Right.DOWNLOAD}),
    "uploader": frozenset({Right.STORE}),
    "ai": frozenset({Right.READ, Right.DOWNLOAD, Right.STORE_DERIVED}),
    "sysadmin": frozenset({Right.ADMIN, Right.READ, Right.DOWNLOAD}),
    "secadmin": frozenset({Right.SECURITY}),
    "auditor": frozenset({Right.AUDIT}),
    # reads de-identified views only (archive.deid.views): Principal.deidentified follows from it
    "research": frozenset({Right.READ, Right.DOWNLOAD}),  # de-identified views only (Principal.deidentified)
}
ROLES = tuple(ROLE_RIGHTS)
ADMIN_ROLES = frozenset({"sysadmin", "secadmin", "auditor"})
# Roles that read what is stored; a principal with one of them is not limited to research views.
IDENTIFIED_READERS = frozenset({"viewer", "ai", "sysadmin"})

KOS_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"

# What the `ai` role (Right.STORE_DERIVED) may store: derived objects, never images.
DERIVED_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.88.11",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.88.59",  # Key Object Selection
    "1.2.840.10008.5.1.4.1.1.66.4",  # Segmentation
    "1.2.840.10008.5.1.4.1.1.91.1",  # Microscopy Bulk Simple Annotations
    "1.2.840.10008.5.1.4.1.1.11.1",  # Grayscale Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.11.2",  # Color Softcopy Presentation State
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF (reports)
})


class Unauthenticated(ArchiveError):
    """No credentials, or credentials that are invalid or expired (HTTP 401)."""

    kind = ErrorKind.UNAUTHENTICATED


class Forbidden(ArchiveError):
    """Valid credentials without the right for this operation (HTTP 403, DIMSE refused)."""

    kind = ErrorKind.FORBIDDEN


def check_roles(roles: "frozenset[str] | set[str] | list[str]", allow_combined: bool = False) -> frozenset[str]:
    """The roles, checked: known names, and at most one administrator role unless allowed."""
    roles = frozenset(roles)
    unknown = sorted(roles - set(ROLES))
    if unknown:
        raise ValueError(f"unknown role {unknown[0]!r} (roles: {', '.join(ROLES)})")
    if "research" in roles and roles & IDENTIFIED_READERS:
        raise ValueError(f"role research (de-identified views) cannot be held with {sorted(roles & IDENTIFIED_READERS)[0]} "
                         "(identified reads); give a viewer token --deidentify instead")
    admin = sorted(roles & ADMIN_ROLES)
    if len(admin) > 1 and not allow_combined:
        raise ValueError(f"roles {' and '.join(admin)} are separated duties and cannot be held together "
                         "(auth.allow_combined_admin_roles = true allows it)")
    return roles


@dataclass(frozen=True)
class Principal:
    """A caller: a person or system behind a token, an OIDC subject, a DICOM node, the CLI.

    `studies` is None for no scope (the whole archive) or the Study Instance UIDs it may see.
    """

    id: str
    name: str
    roles: frozenset[str]
    via: str  # "token", "oidc", "node", "cli", "anonymous"
    studies: frozenset[str] | None = None
    address: str = ""
    rights: frozenset[Right] = field(default=frozenset(), compare=False)
    # True for a principal that may see only de-identified views (the research role, a share
    # link or token made with --deidentify): metadata and instances de-identified on retrieve,
    # LABEL/OVERVIEW hidden, frames unchanged (archive.deid)
    deidentified: bool = False

    def __post_init__(self) -> None:
        if not self.rights:
            rights: set[Right] = set()
            for role in self.roles:
                rights |= ROLE_RIGHTS.get(role, frozenset())
            object.__setattr__(self, "rights", frozenset(rights))
        if "research" in self.roles and not self.roles & IDENTIFIED_READERS:
            object.__setattr__(self, "deidentified", True)

    def can(self, right: Right) -> bool:
        return right in self.rights

    def require(self, right: Right, what: str) -> None:
        """Raise `Forbidden` naming what was refused when this principal lacks `right`."""
        if right not in self.rights:
            raise Forbidden(f"{self.name} ({', '.join(sorted(self.roles)) or 'no role'}) may not {what}")

    def sees(self, study: str | None) -> bool:
        """Whether a study is inside this principal's scope (and it may read at all)."""
        if Right.READ not in self.rights and Right.ADMIN not in self.rights:
            return False
        return self.studies is None or (study is not None and study in self.studies)

    def may_store(self, sop_class: str, study: str | None) -> bool:
        """Whether this principal may store an object of `sop_class` into `study`."""
        if self.studies is not None and study not in self.studies:
            return False
        if Right.STORE in self.rights:
            return True
        if Right.ADMIN in self.rights and sop_class == KOS_SOP_CLASS:
            return True  # an administrator sends IOCM rejection notes (Key Object Selection)
        return Right.STORE_DERIVED in self.rights and sop_class in DERIVED_SOP_CLASSES

    @property
    def sees_rejected(self) -> bool:
        return Right.ADMIN in self.rights

    def with_address(self, address: str) -> "Principal":
        return Principal(self.id, self.name, self.roles, self.via, self.studies, address, self.rights,
                         self.deidentified)


# The principal of the local CLI and of the archive's own background work: every right.
SYSTEM = Principal("system", "system", frozenset(ROLES), "cli", rights=frozenset(Right))
# Everyone, when `auth.mode = "none"` (loopback only, or explicitly allowed): what the archive
# allowed before authentication existed (read and store), not the administrator rights.
ANONYMOUS = Principal("anonymous", "anonymous", frozenset({"viewer", "uploader"}), "anonymous")
