"""TLS for the DICOM TLS listener and HTTPS: the server context, and client certificates to nodes.

One `ssl.SSLContext` is built from `[tls]` (cert, key, optional client CA) with the standard
library's defaults for a server (`ssl.create_default_context(Purpose.CLIENT_AUTH)`: its cipher
list, no compression) and TLS 1.2 as the floor. With `ca` a client certificate is verified when
presented (`require_client_cert = true`: demanded); only that CA is trusted for clients, never
the system store. `check` runs at `serve` start so a missing file, a key that is not the
certificate's or an encrypted key is one line, not a traceback from a listener thread.
"""
from __future__ import annotations

import socket
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .config import ConfigError

if TYPE_CHECKING:
    from .config import Config, Node


class _EncryptedKey(Exception):
    pass


def _no_password() -> str:
    # OpenSSL would otherwise prompt on the terminal for an encrypted key.
    raise _EncryptedKey()


def server_context(cfg: "Config", demand_client_cert: bool | None = None) -> ssl.SSLContext:
    """The server-side context of a TLS listener; ConfigError (one line) if a file is off.
    `demand_client_cert`: refuse clients without a certificate (default: `[tls]
    require_client_cert`); a presented certificate is verified against `[tls] ca` either way."""
    if cfg.tls_cert is None or cfg.tls_key is None:
        raise ConfigError("TLS needs tls.cert and tls.key")
    for key, path in (("tls.cert", cfg.tls_cert), ("tls.key", cfg.tls_key), ("tls.ca", cfg.tls_ca)):
        if path is not None and not Path(path).is_file():
            raise ConfigError(f"{key}: no such file {path}")
    try:
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH,
                                         cafile=str(cfg.tls_ca) if cfg.tls_ca is not None else None)
    except ssl.SSLError as exc:
        raise ConfigError(f"tls.ca: {cfg.tls_ca} holds no usable CA certificate ({exc.reason or exc})")
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(str(cfg.tls_cert), str(cfg.tls_key), password=_no_password)
    except _EncryptedKey:
        raise ConfigError(f"tls.key: {cfg.tls_key} is encrypted; give an unencrypted key (chmod 600)")
    except ssl.SSLError as exc:
        reason = str(exc.reason or exc)
        if "MISMATCH" in reason.upper():
            raise ConfigError(f"tls.key: {cfg.tls_key} is not the key of the certificate {cfg.tls_cert}")
        raise ConfigError(f"tls.cert/tls.key: cannot load {cfg.tls_cert} and {cfg.tls_key} ({reason})")
    except OSError as exc:
        raise ConfigError(f"tls.cert/tls.key: cannot read {cfg.tls_cert} / {cfg.tls_key}: {exc.strerror or exc}")
    if cfg.tls_ca is not None:
        demand = cfg.tls_require_client_cert if demand_client_cert is None else demand_client_cert
        ctx.verify_mode = ssl.CERT_REQUIRED if demand else ssl.CERT_OPTIONAL
    return ctx


def check(cfg: "Config") -> ssl.SSLContext | None:
    """At start: the context when a TLS listener is configured (DIMSE tls_port or HTTPS)."""
    if not cfg.tls_port and not cfg.http_tls:
        return None
    return server_context(cfg)


def http_context(cfg: "Config") -> ssl.SSLContext | None:
    """The context aiohttp serves HTTPS with, None for plain HTTP. A client certificate is
    verified when presented but never demanded: HTTP callers authenticate with tokens or OIDC
    (browsers have no client certificate); `require_client_cert` is for the DICOM TLS port."""
    return server_context(cfg, demand_client_cert=False) if cfg.http_tls else None


def common_name(peercert: dict[str, Any] | None) -> str | None:
    """The subject CN of a verified peer certificate (`SSLSocket.getpeercert()`), if any."""
    for rdn in (peercert or {}).get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


def node_of_certificate(cfg: "Config", peercert: dict[str, Any] | None) -> "Node | None":
    """The node a verified client certificate belongs to: the one whose `cert_cn` is the
    certificate's subject CN. (Only certificates the `[tls] ca` verified reach here: the
    standard library returns an empty dict for an unverified one.)"""
    cn = common_name(peercert)
    if cn is None:
        return None
    for node in cfg.nodes.values():
        if node.cert_cn is not None and node.cert_cn == cn:
            return node
    return None


def deferred_handshake(server, ctx: ssl.SSLContext, on_failure: Callable[[str, str], None]) -> None:
    """Make a pynetdicom AssociationServer do the TLS handshake in each connection's own thread
    instead of its accept loop (pynetdicom's `get_request` handshakes there, with no timeout:
    one silent client would stop every other from connecting). The handshake runs under the
    socket timeout the connection guard set (`acse_timeout`, archive.dimse.connections); when it
    fails (no or an untrusted client certificate, a plaintext peer, a timeout) `on_failure(address,
    reason)` is told and the connection is shut, then handed on as usual so the guard logs its end."""

    def get_request() -> tuple[socket.socket, Any]:
        raw, address = server.socket.accept()
        return ctx.wrap_socket(raw, server_side=True, do_handshake_on_connect=False), address

    original = server.finish_request

    def finish_request(request, client_address) -> None:
        try:
            request.do_handshake()
        except ssl.SSLEOFError:  # closed before a word (a port probe): the guard logs it, no refusal
            pass
        except (OSError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, ssl.SSLError) and exc.reason else (str(exc) or type(exc).__name__)
            on_failure(str(client_address[0]), f"TLS handshake failed: {reason}"[:200])
            try:
                request.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        original(request, client_address)

    server.get_request = get_request
    server.finish_request = finish_request
