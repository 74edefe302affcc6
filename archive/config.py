"""Configuration: embedded defaults, overridden by one TOML file, overridden by CLI flags.

The TOML file is validated against a schema (pydantic models below: types are strict, every
number has a range, unknown keys are errors), and so is the final `Config` after the CLI
flags are applied, so a bad value anywhere is one line and exit 2, never a traceback or a
silently accepted `dicom_port = true`. Every key is documented in README.md
("Configuration"); keep the two in step.
"""
from __future__ import annotations

import ipaddress
import re
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError

from .access import check_roles

MAX_PORT = 65535


class ConfigError(ValueError):
    pass


# -- value rules shared by the file schema and the CLI flags ---------------------------------

_AE_CHARS = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE: no backslash, no control chars
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?"
                       r"(\.[A-Za-z0-9]([A-Za-z0-9\-]{0,61}[A-Za-z0-9])?)*\.?$")


def check_aet(value: str) -> str:
    """An AE title (PS3.5 AE VR): 1-16 characters, no backslash or control characters, not blank."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    if not _AE_CHARS.match(value) or not value.strip():
        raise ValueError(f"{value[:40]!r} is not an AE title (1-16 characters, no backslash or control characters)")
    return value.strip()


def check_host(value: str) -> str:
    """An IP address or a host name to listen on or connect to."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    if not _HOSTNAME.match(value):
        raise ValueError(f"{value[:60]!r} is not an IP address or host name")
    return value


def check_network(value: str) -> str:
    """An IP address or network (CIDR) a request may come from."""
    if not isinstance(value, str):
        raise ValueError("must be a string")
    try:
        ipaddress.ip_network(value, strict=False)
    except ValueError:
        raise ValueError(f"{value[:60]!r} is not an IP address or network")
    return value


def _seconds(v: Any) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError("must be a number of seconds")
    return float(v)


Port = Annotated[StrictInt, Field(ge=1, le=MAX_PORT)]
Seconds = Annotated[float, BeforeValidator(_seconds), Field(gt=0, le=86400)]
AeTitle = Annotated[str, AfterValidator(check_aet)]
Host = Annotated[str, AfterValidator(check_host)]
Network = Annotated[str, AfterValidator(check_network)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ArchiveSection(_Section):
    data_dir: str = Field("./data", min_length=1, max_length=4096)
    aet: AeTitle = "PATHPACS"
    host: Host = "127.0.0.1"
    dicom_port: Port = 11112
    http_port: Port = 8080
    on_conflict: Literal["reject", "replace"] = "reject"
    lmdb_map_size_gb: Annotated[StrictInt, Field(ge=1, le=1 << 20)] = 1024
    # DIMSE keys that lived here before [dimse] existed; still read, [dimse] wins.
    max_associations: Annotated[StrictInt, Field(ge=1, le=1000)] | None = None
    max_pdu: Annotated[StrictInt, Field(ge=4096, le=1 << 26)] | None = None
    dimse_timeout: Seconds | None = None
    network_timeout: Seconds | None = None
    require_called_aet: StrictBool | None = None


class DimseSection(_Section):
    max_associations: Annotated[StrictInt, Field(ge=1, le=1000)] = 32
    max_pending: Annotated[StrictInt, Field(ge=1, le=10000)] = 256
    max_pdu: Annotated[StrictInt, Field(ge=4096, le=1 << 26)] = 4 << 20
    acse_timeout: Seconds = 10.0
    dimse_timeout: Seconds = 120.0
    network_timeout: Seconds = 120.0
    require_called_aet: StrictBool = False
    # Calling AEs that are no [nodes.*]: accepted when None and no node is declared.
    accept_unknown_ae: StrictBool | None = None
    tls_port: Annotated[StrictInt, Field(ge=0, le=MAX_PORT)] = 0  # 0: no TLS listener
    plain: StrictBool = True  # the plaintext listener on dicom_port


class HttpSection(_Section):
    workers: Annotated[StrictInt, Field(ge=1, le=64)] = 1
    cors_origins: list[Annotated[str, Field(min_length=1, max_length=512)]] = []
    trusted_proxies: list[Network] = []
    max_stow_mb: Annotated[StrictInt, Field(ge=1, le=1 << 20)] = 16384
    max_stow_parts: Annotated[StrictInt, Field(ge=1, le=100000)] = 10000
    max_results: Annotated[StrictInt, Field(ge=1, le=1000000)] = 10000
    read_timeout: Seconds = 60.0
    keepalive_timeout: Seconds = 75.0
    access_log: StrictBool = True
    tls: StrictBool = False  # HTTPS from [tls] cert and key


# What a calling node may do over DIMSE (archive.dimse.admission).
DimseService = Literal["store", "find", "get", "move", "commit", "reject"]
DIMSE_SERVICES: tuple[str, ...] = ("store", "find", "get", "move", "commit", "reject")


RoleName = Literal["viewer", "uploader", "ai", "sysadmin", "secadmin", "auditor"]


class OidcSection(_Section):
    issuer: Annotated[str, Field(min_length=1, max_length=1024)]
    audience: Annotated[str, Field(min_length=1, max_length=1024)]
    jwks_url: Annotated[str, Field(min_length=1, max_length=1024)] | None = None  # default: discovery
    algorithms: list[Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384",
                             "ES512", "EdDSA"]] = ["RS256", "ES256"]
    role_claim: Annotated[str, Field(min_length=1, max_length=256)] = "roles"  # dotted path: realm_access.roles
    role_map: dict[Annotated[str, Field(min_length=1, max_length=256)], list[RoleName]] = {}
    name_claim: Annotated[str, Field(min_length=1, max_length=256)] = "preferred_username"
    # the pages' login (authorization code + PKCE, a public client registered at the issuer)
    client_id: Annotated[str, Field(min_length=1, max_length=256)] | None = None
    scope: Annotated[str, Field(min_length=1, max_length=512)] = "openid profile"
    leeway_seconds: Annotated[StrictInt, Field(ge=0, le=300)] = 30
    jwks_refresh_minutes: Annotated[float, BeforeValidator(lambda v: _number(v, "minutes")), Field(gt=0, le=1440)] = 60.0
    # an unknown key id refetches the JWKS at most this often (a flood of bad tokens cannot
    # hammer the identity provider); a rotated key is picked up within it
    jwks_cooldown_seconds: Annotated[float, BeforeValidator(lambda v: _number(v, "seconds")), Field(ge=0, le=3600)] = 30.0


class AuthSection(_Section):
    mode: Literal["none", "token", "oidc"] = "none"
    allow_unauthenticated: StrictBool = False  # mode none on a non-loopback listener
    allow_combined_admin_roles: StrictBool = False  # sysadmin / secadmin / auditor in one principal
    cache_seconds: Annotated[float, BeforeValidator(lambda v: _number(v, "seconds")), Field(ge=0, le=10)] = 5.0
    oidc: OidcSection | None = None


class NodeSection(_Section):
    aet: AeTitle
    host: Host
    port: Port
    allow: list[DimseService] = list(DIMSE_SERVICES)
    check_host: StrictBool = False  # the calling peer's address must be `host` (resolved)
    cert_cn: Annotated[str, Field(min_length=1, max_length=256)] | None = None  # mutual TLS: client cert CN


class TlsSection(_Section):
    cert: Annotated[str, Field(min_length=1, max_length=4096)] | None = None  # PEM, relative to the config file
    key: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    ca: Annotated[str, Field(min_length=1, max_length=4096)] | None = None  # CA of client certificates
    require_client_cert: StrictBool = False


TierName = Annotated[str, Field(pattern=r"^[a-z][a-z0-9_-]{0,31}$")]  # pydantic-core regex: no \Z
Availability = Literal["ONLINE", "NEARLINE", "OFFLINE"]
Days = Annotated[float, BeforeValidator(lambda v: _number(v, "days")), Field(ge=0, le=365 * 100)]


def _number(v: Any, what: str) -> Any:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise ValueError(f"must be a number of {what}")
    return float(v)


class S3Section(_Section):
    endpoint: Annotated[str, Field(min_length=1, max_length=512, pattern=r"^https?://")]
    bucket: Annotated[str, Field(min_length=3, max_length=63)]
    region: str = "us-east-1"
    prefix: Annotated[str, Field(max_length=256)] = ""
    access_key: str | None = None  # else AWS_ACCESS_KEY_ID
    secret_key: str | None = None  # else AWS_SECRET_ACCESS_KEY
    timeout: Seconds = 30.0


class TierSection(_Section):
    path: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    s3: S3Section | None = None
    availability: Availability | None = None  # default: ONLINE for paths, NEARLINE for s3
    price_per_tb_month: Annotated[float, BeforeValidator(lambda v: _number(v, "currency units")), Field(ge=0)] = 0.0
    recall_on_access: StrictBool = False
    immutable: StrictBool = False
    retention_days: Annotated[StrictInt, Field(ge=1, le=365 * 100)] | None = None


class RuleSection(_Section):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    from_: TierName = Field(alias="from")
    to: TierName
    after_days_since_access: Days | None = None
    after_days_since_received: Days | None = None
    match: dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[str, Field(max_length=1024)]] = {}


class ReplicaSection(_Section):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    tier: TierName
    of: list[TierName]
    within_minutes: Annotated[float, BeforeValidator(lambda v: _number(v, "minutes")), Field(gt=0, le=60 * 24 * 365)] = 60.0


class FixitySection(_Section):
    every_days: Days = 30.0
    max_mb_per_s: Annotated[float, BeforeValidator(lambda v: _number(v, "MB/s")), Field(gt=0, le=100000)] = 50.0


class LifecycleSection(_Section):
    ingest_tier: TierName = "hot"
    access_interval_minutes: Annotated[float, BeforeValidator(lambda v: _number(v, "minutes")), Field(gt=0, le=1440)] = 10.0
    rules_every_minutes: Annotated[float, BeforeValidator(lambda v: _number(v, "minutes")), Field(gt=0, le=1440 * 30)] = 60.0
    background: StrictBool = True  # rules, replicas and fixity run inside `serve`


class DeletionSection(_Section):
    purge_after_days: Days = 30.0  # a reject becomes purgeable this long after it


class RetentionSection(_Section):
    model_config = ConfigDict(extra="forbid", strict=True, populate_by_name=True)

    match: dict[Annotated[str, Field(min_length=1, max_length=64)], Annotated[str, Field(max_length=1024)]] = {}
    years: Annotated[StrictInt, Field(ge=1, le=200)]
    from_: Literal["study_date", "last_access", "received"] = Field("study_date", alias="from")
class AuditSyslogSection(_Section):
    host: Host
    port: Port = 6514
    tls: StrictBool = False
    ca: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    cert: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    key: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    server_name: Host | None = None
    app_name: Annotated[str, Field(pattern=r"^[!-~]{1,48}$")] = "pathpacs"
    max_backlog: Annotated[StrictInt, Field(ge=1, le=100_000_000)] = 100_000
    retry_max_seconds: Seconds = 60.0
    connect_timeout: Seconds = 10.0


class AuditSection(_Section):
    enabled: StrictBool = True
    path: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    source_id: Annotated[str, Field(min_length=1, max_length=128)] | None = None
    site_id: Annotated[str, Field(max_length=128)] = ""
    flush_seconds: Annotated[float, BeforeValidator(_seconds), Field(ge=0.1, le=3600)] = 60.0
    segment_mb: Annotated[StrictInt, Field(ge=1, le=1 << 16)] = 64
    syslog: AuditSyslogSection | None = None


Url = Annotated[str, Field(pattern=r"^https?://[^\s]+$", max_length=2048)]
FilePath = Annotated[str, Field(min_length=1, max_length=4096)]
Text = Annotated[str, Field(min_length=1, max_length=1024)]


class PartnerOidcSection(_Section):
    """OAuth 2.0 client credentials for a partner's DICOMweb (token from issuer's token endpoint)."""

    issuer: Url
    client_id: Text
    client_secret: Text
    token_url: Url | None = None  # default: from the issuer's discovery document
    audience: Text | None = None
    scope: Text | None = None


class ExpertSection(_Section):
    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")]
    name: Text
    specialties: list[Annotated[str, Field(min_length=1, max_length=64)]] = []


class PartnerSection(_Section):
    """[partners.NAME]: another archive cases are sent to or answers come from (issue 12)."""

    dicomweb: Url | None = None
    token: Text | None = None
    token_file: FilePath | None = None
    oidc: PartnerOidcSection | None = None
    ca: FilePath | None = None  # the CA that signed the partner's HTTPS/DICOM TLS certificate
    cert: FilePath | None = None  # our client certificate (mutual TLS), with key
    key: FilePath | None = None
    aet: AeTitle | None = None  # DIMSE route: C-STORE + Storage Commitment
    host: Host | None = None
    port: Port | None = None
    tls: StrictBool = False
    commitment: StrictBool = True
    timeout: Seconds = 60.0
    experts: list[ExpertSection] = []


class ConsultationSection(_Section):
    """[consultation]: this archive as requester and consultant."""

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")] | None = None  # default: the AE title
    institution: Text | None = None  # InstitutionName in requests we send
    public_url: Url | None = None  # the base of share links; default http://host:http_port
    require_consent: StrictBool = False
    notify_command: Annotated[str, Field(min_length=1, max_length=4096)] | None = None
    webhook: Url | None = None
    retry_max_seconds: Seconds = 300.0
    max_send_mbps: Annotated[float, Field(gt=0, le=100000)] | None = None  # cap on a send's bandwidth (Mbit/s)


class DeidentifySection(_Section):
    """[deidentify]: the PS3.15 Annex E options of de-identified sends, exports, research views."""

    retain_dates: StrictBool = True
    retain_patient_characteristics: StrictBool = True
    retain_device_identity: StrictBool = True
    retain_institution_identity: StrictBool = False
    clean_descriptors: StrictBool = True
    retain_uids: StrictBool = False
    clean_structured_content: StrictBool = True
    clean_graphics: StrictBool = True
    keep_label: StrictBool = False
    keep_overview: StrictBool = False


class IndexSection(_Section):
    """[index]: where the index lives. "lmdb" (embedded, DATA/index) or "postgresql" (`dsn`: a
    libpq connection string or URI; the index of several nodes)."""

    backend: Literal["lmdb", "postgresql"] = "lmdb"
    dsn: str = Field("", max_length=4096)
    pool_size: Annotated[StrictInt, Field(ge=1, le=256)] = 16  # connections per process (postgresql)
    path: FilePath | None = None  # lmdb: the index directory (default DATA/index; nodes of one machine may share one)


class ClusterSection(_Section):
    """[cluster]: this node among several sharing one PostgreSQL index and S3 tiers."""

    node: str = Field("", pattern=r"^[A-Za-z0-9._-]{0,64}$")  # "" : the host name
    lease_seconds: Seconds = 30.0  # a node or a job unseen this long is taken as dead


class ConfigFile(_Section):
    index: IndexSection = IndexSection()
    cluster: ClusterSection = ClusterSection()
    archive: ArchiveSection = ArchiveSection()
    dimse: DimseSection = DimseSection()
    http: HttpSection = HttpSection()
    auth: AuthSection = AuthSection()
    nodes: dict[Annotated[str, Field(min_length=1, max_length=64)], NodeSection] = {}
    tls: TlsSection = TlsSection()
    tiers: dict[TierName, TierSection] = {}
    rules: list[RuleSection] = []
    replicas: list[ReplicaSection] = []
    fixity: FixitySection = FixitySection()
    lifecycle: LifecycleSection = LifecycleSection()
    deletion: DeletionSection = DeletionSection()
    retention: list[RetentionSection] = []
    audit: AuditSection = AuditSection()
    partners: dict[Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,64}$")], PartnerSection] = {}
    consultation: ConsultationSection = ConsultationSection()
    deidentify: DeidentifySection = DeidentifySection()


# -- the runtime configuration (flat: what the code reads) ----------------------------------

@dataclass(frozen=True)
class Node:
    """A remote DICOM application entity (C-MOVE destination, commitment requester)."""

    name: str
    aet: str
    host: str
    port: int
    allow: frozenset[str] = frozenset(DIMSE_SERVICES)  # DIMSE services it may ask for
    check_host: bool = False
    cert_cn: str | None = None


@dataclass(frozen=True)
class Tier:
    """A configured blob tier: a filesystem path or an S3 bucket."""

    name: str
    path: Path | None = None
    s3: dict[str, Any] | None = None
    availability: str = "ONLINE"
    price_per_tb_month: float = 0.0
    recall_on_access: bool = False
    immutable: bool = False
    retention_days: int | None = None


@dataclass(frozen=True)
class Rule:
    """A lifecycle rule: move a study's instances from one tier to another once due."""

    from_tier: str
    to_tier: str
    after_days_since_access: float | None = None
    after_days_since_received: float | None = None
    match: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Retention:
    """A retention rule: studies matching `match` (C-FIND matching, like lifecycle rules) are
    kept `years` from their study date, last access or receipt; purge is refused until then."""

    years: int
    from_: str = "study_date"
    match: dict[str, str] = field(default_factory=dict)


# Hospital rules when none are configured: slides, blocks and positive smears 15 years.
DEFAULT_RETENTION = (Retention(15, "study_date"),)


@dataclass(frozen=True)
class Replica:
    tier: str
    of: tuple[str, ...]
    within_minutes: float = 60.0


@dataclass(frozen=True)
class AuditSyslog:
    """Where the audit trail is forwarded (archive.audit.syslog)."""

    host: str
    port: int = 6514
    tls: bool = False
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    server_name: str | None = None
    app_name: str = "pathpacs"
    max_backlog: int = 100_000
    retry_max_seconds: float = 60.0
    connect_timeout: float = 10.0


@dataclass(frozen=True)
class AuditConfig:
    """[audit]: the trail (archive.audit)."""

    enabled: bool = True
    path: Path | None = None  # default DATA/audit
    source_id: str | None = None  # AuditSourceID; default the AE title
    site_id: str = ""
    flush_seconds: float = 60.0
    segment_mb: int = 64
    syslog: AuditSyslog | None = None


@dataclass(frozen=True)
class Expert:
    id: str
    name: str
    specialties: tuple[str, ...] = ()


@dataclass(frozen=True)
class Partner:
    """A partner archive (issue 12): a DICOMweb route and/or a DIMSE route, and its experts.
    Paths are resolved against the config file's directory."""

    name: str
    dicomweb: str | None = None
    token: str | None = None
    token_file: Path | None = None
    oidc: dict[str, Any] | None = None
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    aet: str | None = None
    host: str | None = None
    port: int | None = None
    tls: bool = False
    commitment: bool = True
    timeout: float = 60.0
    experts: tuple[Expert, ...] = ()

    @property
    def has_dimse(self) -> bool:
        return self.aet is not None


@dataclass(frozen=True)
class Consultation:
    """[consultation]: this archive's name to partners, share links' base, consent, notices."""

    name: str | None = None  # None: the AE title
    institution: str | None = None
    public_url: str | None = None
    require_consent: bool = False
    notify_command: str | None = None
    webhook: str | None = None
    retry_max_seconds: float = 300.0
    max_send_mbps: float | None = None  # None: as fast as the link goes


@dataclass(frozen=True)
class Deidentify:
    """[deidentify]: the configured profile, the options of archive.deid.DeidOptions (which
    adds what they mean; kept here so the config needs no pydicom)."""

    retain_dates: bool = True  # Retain Longitudinal Temporal Information, Modified Dates
    retain_patient_characteristics: bool = True
    retain_device_identity: bool = True
    retain_institution_identity: bool = False
    clean_descriptors: bool = True
    retain_uids: bool = False
    clean_structured_content: bool = True
    clean_graphics: bool = True
    keep_label: bool = False  # LABEL images (the slide label: names, barcodes) included
    keep_overview: bool = False  # OVERVIEW images (macro photo, often showing the label)


@dataclass
class Config:
    data_dir: Path = Path("./data")
    aet: str = "PATHPACS"
    host: str = "127.0.0.1"
    dicom_port: int = 11112
    http_port: int = 8080
    on_conflict: str = "reject"  # same SOP Instance UID, different bytes: "reject" | "replace"
    lmdb_map_size_gb: int = 1024
    # [index], [cluster]
    index_backend: str = "lmdb"
    index_dsn: str = ""
    index_pool_size: int = 16
    index_path: Path | None = None  # [index] path (lmdb): default DATA/index
    node_name: str = ""
    lease_seconds: float = 30.0
    # [dimse]
    max_associations: int = 32
    max_pending: int = 256  # connections still negotiating (they hold no association slot)
    max_pdu: int = 4 << 20
    acse_timeout: float = 10.0
    dimse_timeout: float = 120.0
    network_timeout: float = 120.0
    require_called_aet: bool = False
    accept_unknown_ae: bool | None = None  # None: true while no node is declared (accepts_unknown_ae)
    tls_port: int = 0
    dimse_plain: bool = True
    # [http]
    http_workers: int = 1
    cors_origins: list[str] = field(default_factory=list)  # no foreign origin unless listed
    trusted_proxies: list[str] = field(default_factory=list)
    max_stow_mb: int = 16384
    max_stow_parts: int = 10000
    max_results: int = 10000
    read_timeout: float = 60.0
    keepalive_timeout: float = 75.0
    access_log: bool = True
    # [auth]
    auth_mode: str = "none"
    allow_unauthenticated: bool = False
    allow_combined_admin_roles: bool = False
    auth_cache_seconds: float = 5.0
    oidc: dict[str, Any] | None = None
    http_tls: bool = False
    nodes: dict[str, Node] = field(default_factory=dict)
    # [tls]
    tls_cert: Path | None = None
    tls_key: Path | None = None
    tls_ca: Path | None = None
    tls_require_client_cert: bool = False
    # [tiers.*], [[rules]], [[replicas]], [fixity], [lifecycle]
    tiers: dict[str, Tier] = field(default_factory=dict)  # empty: one "hot" tier under data_dir
    rules: list[Rule] = field(default_factory=list)
    replicas: list[Replica] = field(default_factory=list)
    fixity_every_days: float = 30.0
    fixity_max_mb_per_s: float = 50.0
    ingest_tier: str = "hot"
    access_interval_minutes: float = 10.0
    rules_every_minutes: float = 60.0
    background: bool = True
    # [deletion], [[retention]] (empty: DEFAULT_RETENTION)
    purge_after_days: float = 30.0
    retention: list[Retention] = field(default_factory=list)

    def retention_rules(self) -> tuple[Retention, ...]:
        return tuple(self.retention) or DEFAULT_RETENTION
    # [audit]
    audit: AuditConfig = field(default_factory=AuditConfig)
    # [partners.*], [consultation]
    partners: dict[str, Partner] = field(default_factory=dict)
    consultation: Consultation = field(default_factory=Consultation)
    # [deidentify]
    deidentify: Deidentify = field(default_factory=Deidentify)

    def node(self) -> str:
        """This node's name in a cluster (cluster.node, else the host name): pending blobs,
        leases and audit segments carry it."""
        if self.node_name:
            return self.node_name
        import socket

        return socket.gethostname() or "node"

    def consultation_name(self) -> str:
        """What this archive calls itself to partners (consultation.name, else the AE title)."""
        return self.consultation.name or self.aet

    def public_url(self) -> str:
        """The base URL of links this archive hands out (share links)."""
        if self.consultation.public_url:
            return self.consultation.public_url.rstrip("/")
        scheme = "https" if self.http_tls else "http"
        host = "127.0.0.1" if self.host in ("0.0.0.0", "::", "") else self.host
        return f"{scheme}://{host}:{self.http_port}"

    def audit_dir(self) -> Path:
        """Where the audit trail lives: audit.path, else DATA/audit."""
        return self.audit.path if self.audit.path is not None else Path(self.data_dir) / "audit"

    def tier_configs(self) -> dict[str, Tier]:
        """The tiers, with the zero-config default (one filesystem tier "hot" in data_dir)."""
        if self.tiers:
            return self.tiers
        return {"hot": Tier("hot", path=Path(self.data_dir) / "hot")}

    @property
    def accepts_unknown_ae(self) -> bool:
        """Whether a calling AE that is no [nodes.*] is accepted: as configured, else only
        while no node is declared (an archive with no nodes keeps working for everyone)."""
        return self.accept_unknown_ae if self.accept_unknown_ae is not None else not self.nodes

    def node_by_aet(self, aet: str) -> Node | None:
        for node in self.nodes.values():
            if node.aet == aet:
                return node
        return None


_FLAT_NAMES = {f.name for f in fields(Config)}
_HTTP_RENAMES = {"workers": "http_workers", "tls": "http_tls"}
_DIMSE_RENAMES = {"plain": "dimse_plain"}


def _one_line(exc: ValidationError) -> str:
    """The first schema error as `section.key: what is wrong` (pydantic prints paragraphs)."""
    err = exc.errors(include_url=False)[0]
    where = ".".join(str(p) for p in err["loc"])
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"unknown key {where}" if "." in where else f"unknown config section [{where}]"
    shown = err["type"] not in ("missing", "value_error") and not isinstance(err.get("input"), dict)
    extra = f" (got {err['input']!r})" if shown else ""
    return f"{where}: {msg}{extra[:120]}"


def parse(raw: dict[str, Any]) -> ConfigFile:
    try:
        return ConfigFile.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_one_line(exc)) from None


def load(path: Path | None) -> Config:
    """Read and validate a TOML file into a Config; any problem is one ConfigError line."""
    cfg = Config()
    if path is None:
        return cfg
    try:
        with open(path, "rb") as fh:
            raw = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}")
    except IsADirectoryError:
        raise ConfigError(f"config file {path} is a directory")
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}")
    except UnicodeDecodeError:
        raise ConfigError(f"config file {path} is not UTF-8 text")
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}")
    return apply(cfg, raw, base_dir=Path(path).parent)


def apply(cfg: Config, raw: dict[str, Any], base_dir: Path = Path(".")) -> Config:
    """Validate `raw` (the TOML document) and copy its values onto `cfg`."""
    doc = parse(raw)
    given = raw.get("archive", {}) if isinstance(raw.get("archive"), dict) else {}
    for key in doc.archive.model_fields_set:
        value = getattr(doc.archive, key)
        if key == "data_dir":
            p = Path(value)
            value = p if p.is_absolute() else base_dir / p
        if value is not None and key in given:
            setattr(cfg, key, value)
    for key in doc.dimse.model_fields_set:
        setattr(cfg, _DIMSE_RENAMES.get(key, key), getattr(doc.dimse, key))
    for key in doc.http.model_fields_set:
        setattr(cfg, _HTTP_RENAMES.get(key, key), getattr(doc.http, key))
    if "auth" in raw:
        a = doc.auth
        cfg.auth_mode, cfg.allow_unauthenticated = a.mode, a.allow_unauthenticated
        cfg.allow_combined_admin_roles, cfg.auth_cache_seconds = a.allow_combined_admin_roles, a.cache_seconds
        cfg.oidc = a.oidc.model_dump() if a.oidc else None
        if a.mode == "oidc" and a.oidc is None:
            raise ConfigError("auth.mode = \"oidc\" needs an [auth.oidc] section (issuer, audience)")
        if a.oidc is not None:
            for claim, roles in a.oidc.role_map.items():
                try:
                    check_roles(roles, a.allow_combined_admin_roles)
                except ValueError as exc:
                    raise ConfigError(f"auth.oidc.role_map.{claim}: {exc}")
    if "index" in raw:
        cfg.index_backend, cfg.index_dsn, cfg.index_pool_size = doc.index.backend, doc.index.dsn, doc.index.pool_size
        if doc.index.path is not None:
            p = Path(doc.index.path)
            cfg.index_path = p if p.is_absolute() else base_dir / p
        if cfg.index_backend == "postgresql" and not cfg.index_dsn:
            raise ConfigError('index.backend = "postgresql" needs index.dsn (a libpq connection string)')
    if "cluster" in raw:
        cfg.node_name, cfg.lease_seconds = doc.cluster.node, doc.cluster.lease_seconds
    for name, node in doc.nodes.items():
        cfg.nodes[name] = Node(name, node.aet, node.host, node.port, frozenset(node.allow), node.check_host,
                               node.cert_cn)
    for key in ("cert", "key", "ca"):
        value = getattr(doc.tls, key)
        if value is not None:
            p = Path(value)
            setattr(cfg, f"tls_{key}", p if p.is_absolute() else base_dir / p)
    if "require_client_cert" in doc.tls.model_fields_set:
        cfg.tls_require_client_cert = doc.tls.require_client_cert
    for name, t in doc.tiers.items():
        if (t.path is None) == (t.s3 is None):
            raise ConfigError(f"tiers.{name}: give exactly one of path or s3")
        path = None
        if t.path is not None:
            p = Path(t.path)
            path = p if p.is_absolute() else base_dir / p
        if t.immutable and t.s3 is None:
            raise ConfigError(f"tiers.{name}.immutable: only an s3 tier can be immutable (S3 Object Lock)")
        if t.immutable and t.retention_days is None:
            raise ConfigError(f"tiers.{name}.retention_days: an immutable tier needs its retention")
        availability = t.availability or ("NEARLINE" if t.s3 is not None else "ONLINE")
        cfg.tiers[name] = Tier(name, path, t.s3.model_dump() if t.s3 else None, availability, t.price_per_tb_month,
                               t.recall_on_access, t.immutable, t.retention_days)
    cfg.rules = [Rule(r.from_, r.to, r.after_days_since_access, r.after_days_since_received, dict(r.match))
                 for r in doc.rules]
    cfg.replicas = [Replica(r.tier, tuple(r.of), r.within_minutes) for r in doc.replicas]
    if "fixity" in raw:
        cfg.fixity_every_days, cfg.fixity_max_mb_per_s = doc.fixity.every_days, doc.fixity.max_mb_per_s
    if "lifecycle" in raw:
        lc = doc.lifecycle
        cfg.ingest_tier, cfg.access_interval_minutes = lc.ingest_tier, lc.access_interval_minutes
        cfg.rules_every_minutes, cfg.background = lc.rules_every_minutes, lc.background
    if "deletion" in raw:
        cfg.purge_after_days = doc.deletion.purge_after_days
    if doc.retention:
        from .query import QueryError, tag_hex

        for i, r in enumerate(doc.retention):
            for name in r.match:
                try:
                    tag_hex(name)
                except QueryError as exc:
                    raise ConfigError(f"retention[{i}].match: {exc}") from None
        cfg.retention = [Retention(r.years, r.from_, dict(r.match)) for r in doc.retention]
    if "audit" in raw:
        cfg.audit = _audit(doc.audit, base_dir)
    for name, p in doc.partners.items():
        cfg.partners[name] = _partner(name, p, base_dir)
    if "consultation" in raw:
        c = doc.consultation
        cfg.consultation = Consultation(c.name, c.institution, c.public_url, c.require_consent, c.notify_command,
                                        c.webhook, c.retry_max_seconds, c.max_send_mbps)
    if "deidentify" in raw:
        cfg.deidentify = Deidentify(**doc.deidentify.model_dump())
    check_tiers(cfg)
    return validate(cfg)


def _partner(name: str, p: PartnerSection, base_dir: Path) -> Partner:
    def path(text: str | None) -> Path | None:
        if text is None:
            return None
        q = Path(text)
        return q if q.is_absolute() else base_dir / q

    where = f"partners.{name}"
    if p.dicomweb is None and p.aet is None:
        raise ConfigError(f"{where}: give dicomweb (a DICOMweb base URL) and/or aet, host, port (DIMSE)")
    if p.aet is not None and (p.host is None or p.port is None):
        raise ConfigError(f"{where}: a DIMSE route needs aet, host and port")
    if p.aet is None and (p.host is not None or p.port is not None):
        raise ConfigError(f"{where}: host and port need aet (the partner's AE title)")
    if sum(x is not None for x in (p.token, p.token_file, p.oidc)) > 1:
        raise ConfigError(f"{where}: give one of token, token_file or oidc")
    if (p.token or p.token_file or p.oidc) and p.dicomweb is None:
        raise ConfigError(f"{where}: credentials need dicomweb (the URL they are for)")
    if (p.cert is None) != (p.key is None):
        raise ConfigError(f"{where}: give both cert and key (mutual TLS) or neither")
    ids = [e.id for e in p.experts]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"{where}.experts: expert ids must be unique")
    return Partner(name, p.dicomweb.rstrip("/") if p.dicomweb else None, p.token, path(p.token_file),
                   p.oidc.model_dump() if p.oidc else None, path(p.ca), path(p.cert), path(p.key), p.aet,
                   p.host, p.port, p.tls, p.commitment, p.timeout,
                   tuple(Expert(e.id, e.name, tuple(e.specialties)) for e in p.experts))


def _audit(a: AuditSection, base_dir: Path) -> AuditConfig:
    def path(text: str | None) -> Path | None:
        if text is None:
            return None
        p = Path(text)
        return p if p.is_absolute() else base_dir / p

    syslog = None
    if a.syslog is not None:
        s = a.syslog
        if (s.cert is None) != (s.key is None):
            raise ConfigError("audit.syslog: give both cert and key (mutual TLS) or neither")
        if not s.tls and (s.ca or s.cert or s.server_name):
            raise ConfigError("audit.syslog: ca, cert, key and server_name need tls = true")
        syslog = AuditSyslog(s.host, s.port, s.tls, path(s.ca), path(s.cert), path(s.key), s.server_name,
                             s.app_name, s.max_backlog, s.retry_max_seconds, s.connect_timeout)
    return AuditConfig(a.enabled, path(a.path), a.source_id, a.site_id, a.flush_seconds, a.segment_mb, syslog)


def check_tiers(cfg: Config) -> None:
    """Rules and replicas name configured tiers, and the rules have no cycle (a study would
    move round and round)."""
    tiers = cfg.tier_configs()
    if cfg.ingest_tier not in tiers:
        raise ConfigError(f"lifecycle.ingest_tier: no tier named {cfg.ingest_tier!r} (tiers: {', '.join(tiers)})")
    for i, r in enumerate(cfg.rules):
        for key, name in (("from", r.from_tier), ("to", r.to_tier)):
            if name not in tiers:
                raise ConfigError(f"rules[{i}].{key}: no tier named {name!r} (tiers: {', '.join(tiers)})")
        if r.from_tier == r.to_tier:
            raise ConfigError(f"rules[{i}]: from and to are the same tier {r.from_tier!r}")
        if r.after_days_since_access is None and r.after_days_since_received is None and not r.match:
            raise ConfigError(f"rules[{i}]: give after_days_since_access, after_days_since_received or match")
        if tiers[r.to_tier].immutable:
            raise ConfigError(f"rules[{i}].to: {r.to_tier!r} is immutable: it takes replicas, not moves")
    edges: dict[str, set[str]] = {}
    for r in cfg.rules:
        edges.setdefault(r.from_tier, set()).add(r.to_tier)

    def cycle_from(start: str) -> list[str] | None:
        stack = [(start, [start])]
        while stack:
            node, path = stack.pop()
            for nxt in edges.get(node, ()):
                if nxt == start:
                    return path + [nxt]
                if nxt not in path:
                    stack.append((nxt, path + [nxt]))
        return None

    for name in edges:
        cyc = cycle_from(name)
        if cyc:
            raise ConfigError(f"rules: a cycle {' -> '.join(cyc)} would move studies round and round")
    for i, rep in enumerate(cfg.replicas):
        if rep.tier not in tiers:
            raise ConfigError(f"replicas[{i}].tier: no tier named {rep.tier!r}")
        for name in rep.of:
            if name not in tiers:
                raise ConfigError(f"replicas[{i}].of: no tier named {name!r}")
            if name == rep.tier:
                raise ConfigError(f"replicas[{i}]: a tier cannot hold replicas of itself ({name!r})")


def validate(cfg: Config) -> Config:
    """Check the final values (file + flags) against the same schema; ConfigError if one is off."""
    flat = {
        "archive": {"data_dir": str(cfg.data_dir), "aet": cfg.aet, "host": cfg.host,
                    "dicom_port": cfg.dicom_port, "http_port": cfg.http_port,
                    "on_conflict": cfg.on_conflict, "lmdb_map_size_gb": cfg.lmdb_map_size_gb},
        "dimse": {k: getattr(cfg, _DIMSE_RENAMES.get(k, k)) for k in DimseSection.model_fields},
        "http": {**{k: getattr(cfg, _HTTP_RENAMES.get(k, k)) for k in HttpSection.model_fields}},
    }
    doc = parse(flat)
    cfg.aet = doc.archive.aet
    check_listeners(cfg)
    return cfg


def check_listeners(cfg: Config) -> None:
    """The DIMSE and HTTP listeners and the TLS keys they need go together (the files
    themselves are read at start: archive.tls.check)."""
    if cfg.tls_port and cfg.tls_port in (cfg.dicom_port, cfg.http_port):
        raise ConfigError(f"dimse.tls_port: {cfg.tls_port} is already the "
                          f"{'DICOM' if cfg.tls_port == cfg.dicom_port else 'HTTP'} port")
    if not cfg.dimse_plain and not cfg.tls_port:
        raise ConfigError("dimse.plain = false needs dimse.tls_port: no DICOM listener would run")
    needs = [k for k, on in (("dimse.tls_port", bool(cfg.tls_port)), ("http.tls", cfg.http_tls)) if on]
    if needs and (cfg.tls_cert is None or cfg.tls_key is None):
        raise ConfigError(f"{needs[0]} needs tls.cert and tls.key")
    if cfg.tls_require_client_cert and cfg.tls_ca is None:
        raise ConfigError("tls.require_client_cert = true needs tls.ca (the CA of client certificates)")
