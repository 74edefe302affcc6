"""The audit trail (issue 10): every access and change as a DICOM audit message (PS3.15 A.5).

`events` the messages and their ATNA XML, `trail` the hash-chained append-only files,
`recorder` the `Audit` API the archive owns (`Archive.audit`), `syslog` forwarding to a
collector, `commands` the `pathpacs audit` verbs. `build_audit(cfg, ...)` makes the `Audit` of
a configuration.
"""
from __future__ import annotations

from pathlib import Path

from .events import AuditEvent, Code, Participant, ParticipantObject
from .recorder import Audit, ClassResolver, NullAudit, Resolver
from .trail import Trail, VerifyResult

__all__ = ["Audit", "AuditEvent", "Code", "NullAudit", "Participant", "ParticipantObject", "Trail",
           "VerifyResult", "build_audit", "trail_of"]


def trail_of(cfg) -> Trail:
    """The trail of a configuration (audit.path, else DATA/audit)."""
    return Trail(Path(cfg.audit_dir()), segment_bytes=cfg.audit.segment_mb << 20, node=cfg.node())


def build_audit(cfg, resolve: Resolver | None = None, resolve_classes: ClassResolver | None = None) -> Audit:
    """The `Audit` of a configuration (a `NullAudit` when `[audit] enabled = false`). Nothing
    is created on disk until the first record."""
    if not cfg.audit.enabled:
        return NullAudit()
    return Audit(trail_of(cfg), source_id=cfg.audit.source_id or cfg.aet, site_id=cfg.audit.site_id,
                 flush_seconds=cfg.audit.flush_seconds, resolve=resolve, resolve_classes=resolve_classes)


def start_forwarding(audit: Audit, cfg) -> None:
    """Start the syslog forwarder of this process when `[audit.syslog]` is configured (serve)."""
    s = cfg.audit.syslog
    if s is None or not audit.enabled:
        return
    from .syslog import Forwarder, SyslogTarget

    target = SyslogTarget(s.host, s.port, s.tls, str(s.ca) if s.ca else None, str(s.cert) if s.cert else None,
                          str(s.key) if s.key else None, s.server_name, s.app_name, s.max_backlog,
                          s.retry_max_seconds, s.connect_timeout)
    audit.forwarder = Forwarder(audit.trail, target)
    audit.forwarder.start()


def local_principal():
    """The person at the console of a CLI verb (import, watch, tier move): the OS login."""
    from ..access import Principal
    from .recorder import _os_user

    user = _os_user()
    return Principal(f"os:{user}", user, frozenset(), "cli")


def configuration_detail(cfg) -> dict:
    """What the start record says about the configuration (never secrets)."""
    tiers = {name: ("s3 " + str((t.s3 or {}).get("endpoint", "")) + "/" + str((t.s3 or {}).get("bucket", ""))
                    if t.s3 else str(t.path)) for name, t in cfg.tier_configs().items()}
    out = {"aet": cfg.aet, "host": cfg.host, "dicom_port": cfg.dicom_port, "http_port": cfg.http_port,
           "http_workers": cfg.http_workers, "data_dir": str(cfg.data_dir), "on_conflict": cfg.on_conflict,
           "require_called_aet": cfg.require_called_aet, "cors_origins": list(cfg.cors_origins),
           "nodes": sorted(n.aet for n in cfg.nodes.values()), "tiers": tiers,
           "audit_path": str(cfg.audit_dir()), "pid": __import__("os").getpid()}
    s = cfg.audit.syslog
    if s is not None:
        out["audit_syslog"] = f"{s.host}:{s.port}{' tls' if s.tls else ''}"
    for name in ("auth_mode", "allow_unauthenticated", "tls_port", "accept_unknown_ae"):
        if hasattr(cfg, name):  # keys of the other parts of issue 10, when present
            out[name] = getattr(cfg, name)
    return out
