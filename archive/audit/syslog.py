"""Forwarding the trail to a syslog collector: RFC 5424 messages over TCP (RFC 6587 octet
counting), TLS optional (RFC 5425), each carrying one ATNA XML message (IHE ITI-20).

The trail is the spool: the forwarder reads records after a persisted cursor
(`forward.cursor`) and sends them in order, so a collector that is down loses nothing and
nothing piles up in memory (one batch at a time). TCP says nothing about what the collector
read, so a sent batch counts as delivered only once the connection is still up a moment later
(`CONFIRM_SECONDS`); a connection found closed or reset sends again from the last confirmed
record (at least once, in order; the `seq` structured-data parameter lets a collector drop
repeats). Reconnects back off up to `retry_max_seconds`. A backlog above `max_backlog`
records logs one error and counts an alarm (`forward.status`, `pathpacs audit status`,
`pathpacs stats`). One process per trail forwards (a flock on `forward.lock`); the others
stand by and take over if it dies.
"""
from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import ssl
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .events import AuditEvent, now_iso
from .trail import Record, Tailer, Trail

log = logging.getLogger("pathpacs.audit.syslog")

CONFIRM_SECONDS = 0.5
PRI = 10 * 8 + 5  # facility authpriv (10), severity notice (5)
MSGID = "IHE+RFC-3881"
SD_ID = "pathpacs@32473"


@dataclass(frozen=True)
class SyslogTarget:
    host: str
    port: int
    tls: bool = False
    ca: str | None = None  # CA file that signs the collector's certificate (TLS)
    cert: str | None = None  # our client certificate (mutual TLS)
    key: str | None = None
    server_name: str | None = None  # name checked in the collector's certificate (default host)
    app_name: str = "pathpacs"
    max_backlog: int = 100_000  # unsent records before the alarm
    retry_max_seconds: float = 60.0
    connect_timeout: float = 10.0


def frame(rec: Record, hostname: str, app: str, procid: str) -> bytes:
    """One RFC 6587 octet-counted RFC 5424 message for a trail record."""
    xml = AuditEvent.from_dict(rec.event).to_xml()
    head = (f"<{PRI}>1 {rec.time} {hostname[:255] or '-'} {app[:48]} {procid[:128]} {MSGID} "
            f'[{SD_ID} seq="{rec.seq}" hash="{rec.hash}"] ').encode()
    msg = head + b"\xef\xbb\xbf" + xml  # MSG-UTF8: BOM + UTF-8 (RFC 5424 6.4)
    return f"{len(msg)} ".encode() + msg


def read_status(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((Path(directory) / "forward.status").read_text())
    except (OSError, ValueError):
        return None


def read_cursor(directory: Path) -> tuple[int, str]:
    try:
        d = json.loads((Path(directory) / "forward.cursor").read_text())
        return int(d["seq"]), str(d.get("hash", ""))
    except (OSError, ValueError, KeyError):
        return 0, ""


def _write_json(path: Path, doc: dict[str, Any], sync: bool) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    with open(tmp, "w") as fh:
        json.dump(doc, fh)
        if sync:
            fh.flush()
            os.fsync(fh.fileno())
    os.replace(tmp, path)


class Forwarder:
    """The background sender of one process (started by `serve`)."""

    def __init__(self, trail: Trail, target: SyslogTarget) -> None:
        self.trail = trail
        self.target = target
        self.hostname = socket.gethostname().replace(" ", "-")
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.confirmed = 0
        self.confirmed_hash = ""
        self.alarm = False
        self.alarms = 0
        self.last_error = ""
        self._status_at = 0.0
        self._head = 0
        self._head_at = 0.0

    def start(self) -> None:
        self.trail.dir.mkdir(parents=True, exist_ok=True)
        self._thread = threading.Thread(target=self._run, name="audit-syslog", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self, timeout: float = 10.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the loop ----------------------------------------------------------------------------
    def _run(self) -> None:
        lock = os.open(self.trail.dir / "forward.lock", os.O_RDWR | os.O_CREAT, 0o640)
        try:
            while not self._stop.is_set():
                try:
                    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:  # another process forwards this trail
                    self._stop.wait(2.0)
            if self._stop.is_set():
                return
            try:
                self._forward()
            except Exception:
                log.exception("audit forwarding stopped")
        finally:
            self._close()
            os.close(lock)

    def _forward(self) -> None:
        t = self.target
        self.confirmed, self.confirmed_hash = read_cursor(self.trail.dir)
        tailer = Tailer(self.trail, self.confirmed)
        pending: list[tuple[int, str, float]] = []
        backoff = 0.5
        stopping_since: float | None = None
        while True:
            if self._stop.is_set():
                stopping_since = stopping_since or time.monotonic()
                if self._sock is None or time.monotonic() - stopping_since > 5.0:
                    return
            if self._sock is None:
                try:
                    self._sock = self._connect()
                except (OSError, ssl.SSLError) as exc:
                    self._problem(f"cannot reach {t.host}:{t.port}: {exc}")
                    self._status(force=True, sent=self.confirmed)
                    if self._stop.wait(backoff):
                        return
                    backoff = min(t.retry_max_seconds, backoff * 2)
                    continue
                backoff = 0.5
                log.info("audit forwarding to %s:%d%s from record %d", t.host, t.port, " (TLS)" if t.tls else "",
                         self.confirmed + 1)
                self.last_error = ""
                tailer.seek(self.confirmed)
                pending.clear()
            if _peer_gone(self._sock, t.connect_timeout):
                self._problem(f"{t.host}:{t.port} closed the connection")
                self._close()
                continue
            now = time.monotonic()
            done = [p for p in pending if p[2] <= now - CONFIRM_SECONDS]
            if done:
                del pending[:len(done)]
                self.confirmed, self.confirmed_hash = done[-1][0], done[-1][1]
                _write_json(self.trail.dir / "forward.cursor",
                            {"seq": self.confirmed, "hash": self.confirmed_hash, "target": f"{t.host}:{t.port}"},
                            sync=False)
            self._status(sent=pending[-1][0] if pending else self.confirmed)
            recs = tailer.read(200)  # when stopping too: what was written before the stop goes out
            if not recs:
                if self._stop.is_set() and not pending:
                    return
                self._wake.wait(CONFIRM_SECONDS / 2 if pending else 1.0)
                self._wake.clear()
                continue
            data = b"".join(frame(r, self.hostname, t.app_name, str(os.getpid())) for r in recs)
            try:
                self._sock.sendall(data)
            except (OSError, ssl.SSLError) as exc:
                self._problem(f"sending to {t.host}:{t.port} failed: {exc}")
                self._close()
                continue
            sent_at = time.monotonic()
            pending.extend((r.seq, r.hash, sent_at) for r in recs)

    def _connect(self) -> socket.socket:
        t = self.target
        sock = socket.create_connection((t.host, t.port), timeout=t.connect_timeout)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            if t.tls:
                ctx = ssl.create_default_context(cafile=t.ca)
                ctx.minimum_version = ssl.TLSVersion.TLSv1_2
                if t.cert:
                    ctx.load_cert_chain(t.cert, t.key)
                sock = ctx.wrap_socket(sock, server_hostname=t.server_name or t.host)
            sock.settimeout(t.connect_timeout)
            return sock
        except BaseException:
            sock.close()
            raise

    def _close(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None

    def _problem(self, text: str) -> None:
        if text != self.last_error:
            log.warning("audit forwarding: %s (records stay in the trail and are sent later)", text)
        self.last_error = text

    def _status(self, force: bool = False, sent: int = 0) -> None:
        """Write forward.status (at most once a second); raise or clear the backlog alarm.
        The backlog is what is not sent yet (records in flight on a live connection are not)."""
        now = time.monotonic()
        if not force and now - self._status_at < 1.0:
            return
        self._status_at = now
        if now - self._head_at >= 1.0:
            self._head = self.trail.head()[0]
            self._head_at = now
        backlog = max(0, self._head - max(sent, self.confirmed))
        t = self.target
        if backlog > t.max_backlog and not self.alarm:
            self.alarm = True
            self.alarms += 1
            log.error("audit forwarding: %d records not delivered to %s:%d (more than audit.syslog.max_backlog "
                      "= %d); they are kept in the trail: is the collector down?", backlog, t.host, t.port,
                      t.max_backlog)
        elif self.alarm and backlog <= t.max_backlog:
            self.alarm = False
            log.info("audit forwarding: backlog back to %d records", backlog)
        try:
            _write_json(self.trail.dir / "forward.status", {
                "target": f"{t.host}:{t.port}", "tls": t.tls, "connected": self._sock is not None,
                "delivered": self.confirmed, "head": self._head, "backlog": backlog, "max_backlog": t.max_backlog,
                "alarm": self.alarm, "alarms": self.alarms, "last_error": self.last_error, "updated": now_iso(),
                "pid": os.getpid()}, sync=False)
        except OSError:
            pass


def _peer_gone(sock: socket.socket, timeout: float) -> bool:
    """True when the collector closed or reset the connection (it never sends us anything)."""
    try:
        sock.setblocking(False)
        try:
            data = sock.recv(4096)
        finally:
            sock.settimeout(timeout)
    except (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError):
        return False
    except (OSError, ssl.SSLError):
        return True
    return data == b""
