"""DICOM TLS (a second listener) and HTTPS, with certificates the test makes: dcmtk's echoscu and
storescu with +tls, pynetdicom with an ssl context, dicomweb-client over HTTPS."""
from __future__ import annotations

import socket
import ssl
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pynetdicom import AE
from pynetdicom.sop_class import Verification

import factory
from certs import make_ca
from conftest import free_port, need, run_cli


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = make_ca(folder, "ca")
    other = make_ca(folder, "other")
    return {
        "ca": ca, "other": other,
        "server": ca.issue("pathpacs.test", server=True),
        "scanner": ca.issue("scanner-1"),       # mapped to node "scanner" by cert_cn
        "stranger": other.issue("scanner-1"),  # same CN, another CA
        "folder": folder,
    }


def https_client(srv, ca_bundle: Path):
    """dicomweb-client over HTTPS, trusting `ca_bundle` only."""
    from dicomweb_client.api import DICOMwebClient
    from dicomweb_client.session_utils import add_certs_to_session, create_session

    session = create_session()
    session.trust_env = False  # REQUESTS_CA_BUNDLE in the environment would win over ca_bundle
    session = add_certs_to_session(session, ca_bundle=str(ca_bundle))
    return DICOMwebClient(url=f"https://127.0.0.1:{srv.http_port}/dicomweb", session=session)


def tls_config(pki, tls_port: int, *, require: bool = True, http_tls: bool = True, plain: bool = True,
               nodes: str = "") -> str:
    return (f"[dimse]\ntls_port = {tls_port}\nplain = {str(plain).lower()}\n"
            f"[http]\ntls = {str(http_tls).lower()}\n"
            f'[tls]\ncert = "{pki["server"].cert}"\nkey = "{pki["server"].key}"\nca = "{pki["ca"].cert}"\n'
            f"require_client_cert = {str(require).lower()}\n" + nodes)


@pytest.fixture(scope="module")
def tls_server(pki, tmp_path_factory):
    from conftest import Server

    tls_port = free_port()
    folder = tmp_path_factory.mktemp("tlssrv")
    cfg = folder / "config.toml"
    cfg.write_text(tls_config(pki, tls_port, nodes=(
        '[nodes.scanner]\naet = "SCANNER"\nhost = "127.0.0.1"\nport = 11999\ncert_cn = "scanner-1"\n'
        '[nodes.other]\naet = "OTHER"\nhost = "127.0.0.1"\nport = 11998\n')))
    srv = Server(folder / "data", free_port(), free_port(), config=cfg)
    srv.tls_port = tls_port
    srv.wait_ports = (srv.dicom_port, tls_port, srv.http_port)
    srv.start()
    yield srv
    srv.stop()


def echoscu_tls(srv, pki, client: str = "scanner", aet: str = "SCANNER", port: int | None = None):
    issued = pki[client]
    return subprocess.run(
        [need("echoscu"), "-aet", aet, "-aec", srv.aet, "+tls", str(issued.key), str(issued.cert),
         "+cf", str(pki["ca"].cert), "127.0.0.1", str(port or srv.tls_port)],
        capture_output=True, text=True, timeout=30)


def plain_echo(srv, aet: str = "SCANNER") -> subprocess.CompletedProcess:
    return subprocess.run([need("echoscu"), "-aet", aet, "-aec", srv.aet, "127.0.0.1", str(srv.dicom_port)],
                          capture_output=True, text=True, timeout=30)


def test_serve_says_which_listeners_run(tls_server):
    log = tls_server.log()
    assert (f"on DICOM port {tls_server.dicom_port} (plain) and {tls_server.tls_port} "
            f"(TLS, client certificate required), HTTPS on port {tls_server.http_port}") in log


def test_echoscu_over_tls_with_a_client_certificate(tls_server, pki):
    res = echoscu_tls(tls_server, pki)
    assert res.returncode == 0, res.stdout + res.stderr


def test_storescu_over_tls_then_https_wado_returns_the_bytes(tls_server, pki, tmp_path):
    sc = factory.secondary_capture(tmp_path / "sc.dcm", patient_id="TLS1")
    issued = pki["scanner"]
    res = subprocess.run(
        [need("storescu"), "-aet", "SCANNER", "-aec", tls_server.aet, "+tls", str(issued.key), str(issued.cert),
         "+cf", str(pki["ca"].cert), "127.0.0.1", str(tls_server.tls_port), str(sc)],
        capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr
    ds = pydicom.dcmread(sc)
    client = https_client(tls_server, pki["ca"].cert)
    found = client.search_for_instances(search_filters={"PatientID": "TLS1"})
    assert [f["00080018"]["Value"][0] for f in found] == [ds.SOPInstanceUID]
    got = client.retrieve_instance(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID)
    assert got.PixelData == ds.PixelData == bytes(range(256))
    frames = client.retrieve_instance_frames(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, [1])
    assert frames == [bytes(range(256))]


def test_https_client_not_trusting_the_server_certificate_fails(tls_server, pki):
    client = https_client(tls_server, pki["other"].cert)
    with pytest.raises(requests.exceptions.SSLError):
        client.search_for_studies()
    with pytest.raises(requests.exceptions.ConnectionError):  # plain HTTP to the HTTPS port
        requests.get(f"http://127.0.0.1:{tls_server.http_port}/dicomweb/studies", timeout=10)


def test_plaintext_echoscu_to_the_tls_port_fails(tls_server, pki):
    res = subprocess.run([need("echoscu"), "-to", "5", "-aet", "SCANNER", "-aec", tls_server.aet,
                          "127.0.0.1", str(tls_server.tls_port)], capture_output=True, text=True, timeout=60)
    assert res.returncode != 0
    assert "Association Request Failed: 0006:0317 Peer aborted Association (or never connected)" in res.stderr
    assert echoscu_tls(tls_server, pki).returncode == 0  # the listener still serves
    assert "refused - from 127.0.0.1: TLS handshake failed: WRONG_VERSION_NUMBER" in tls_server.log()


def test_client_certificate_of_another_ca_is_refused(tls_server, pki):
    res = echoscu_tls(tls_server, pki, client="stranger")
    assert res.returncode != 0
    assert "Association Request Failed: 0006:0317 Peer aborted Association (or never connected)" in res.stderr
    assert "refused - from 127.0.0.1: TLS handshake failed: CERTIFICATE_VERIFY_FAILED" in tls_server.log()
    assert echoscu_tls(tls_server, pki).returncode == 0


def test_client_without_certificate_is_refused_when_required(tls_server, pki):
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"].cert))
    ctx.check_hostname = False
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", tls_server.tls_port, ae_title=tls_server.aet, tls_args=(ctx, None))
    assert not assoc.is_established
    assert "refused - from 127.0.0.1: TLS handshake failed: PEER_DID_NOT_RETURN_A_CERTIFICATE" in tls_server.log()
    # the same client with its certificate is admitted
    ctx.load_cert_chain(str(pki["scanner"].cert), str(pki["scanner"].key))
    assoc = ae.associate("127.0.0.1", tls_server.tls_port, ae_title=tls_server.aet, tls_args=(ctx, None))
    assert assoc.is_established
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()


def test_certificate_binds_the_calling_ae(tls_server, pki):
    """scanner-1's certificate belongs to node "scanner" (AE SCANNER): calling as OTHER, another
    configured node, with it is refused; OTHER over plain DIMSE is admitted."""
    res = echoscu_tls(tls_server, pki, aet="OTHER")
    assert res.returncode != 0
    assert "Called AE Title Not Recognized" not in res.stdout + res.stderr
    assert "Calling AE Title Not Recognized" in res.stdout + res.stderr, res.stdout + res.stderr
    assert plain_echo(tls_server, "OTHER").returncode == 0
    assert "is not 'SCANNER', the AE of node 'scanner' its client certificate belongs to" in tls_server.log()


def test_a_silent_tls_client_does_not_block_others(tls_server, pki):
    """The handshake runs in the connection's thread, not in the accept loop."""
    idle = socket.create_connection(("127.0.0.1", tls_server.tls_port))
    try:
        assert echoscu_tls(tls_server, pki).returncode == 0
    finally:
        idle.close()


def test_plain_listener_can_be_disabled(pki, make_server, tmp_path):
    tls_port, dicom_port = free_port(), free_port()
    srv = make_server(config_text=tls_config(pki, tls_port, require=False, http_tls=False, plain=False),
                      dicom_port=dicom_port, wait_ports=(tls_port,))
    srv.tls_port = tls_port
    line = f"on DICOM port {tls_port} (TLS), HTTP on port {srv.http_port}"
    deadline = time.monotonic() + 20  # printed once every listener is up, a moment after the DICOM port
    while line not in srv.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert line in srv.log()
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", dicom_port), timeout=5).close()
    assert echoscu_tls(srv, pki).returncode == 0  # no node is declared: any AE, with a certificate
    # require_client_cert = false: a client without a certificate is admitted too
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki["ca"].cert))
    ctx.check_hostname = False
    ae = AE(ae_title="NOCERT")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", tls_port, ae_title=srv.aet, tls_args=(ctx, None))
    assert assoc.is_established
    assoc.release()


def _serve_error(tmp_path: Path, text: str) -> str:
    cfg = tmp_path / "bad.toml"
    cfg.write_text(text)
    res = run_cli("serve", "--config", str(cfg), "--data", str(tmp_path / "data"), "--host", "127.0.0.1",
                  "--dicom-port", str(free_port()), "--http-port", str(free_port()), timeout=60)
    assert res.returncode == 2, res.stdout + res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    return lines[0]


def test_tls_config_errors_are_one_line(pki, tmp_path):
    server, ca = pki["server"], pki["ca"]
    scanner = pki["scanner"]
    port = free_port()
    base = f"[dimse]\ntls_port = {port}\n"
    assert _serve_error(tmp_path, base + f'[tls]\ncert = "{tmp_path}/none.crt"\nkey = "{server.key}"\n') == \
        f"pathpacs: config error: tls.cert: no such file {tmp_path}/none.crt"
    assert _serve_error(tmp_path, base + f'[tls]\ncert = "{server.cert}"\nkey = "{scanner.key}"\n') == \
        f"pathpacs: config error: tls.key: {scanner.key} is not the key of the certificate {server.cert}"
    encrypted = pki["ca"].issue("locked", server=True, key_encrypted=True)
    assert _serve_error(tmp_path, base + f'[tls]\ncert = "{encrypted.cert}"\nkey = "{encrypted.key}"\n') == \
        f"pathpacs: config error: tls.key: {encrypted.key} is encrypted; give an unencrypted key (chmod 600)"
    assert _serve_error(tmp_path, base) == "pathpacs: config error: dimse.tls_port needs tls.cert and tls.key"
    assert _serve_error(tmp_path, '[http]\ntls = true\n') == \
        "pathpacs: config error: http.tls needs tls.cert and tls.key"
    assert _serve_error(tmp_path, f'[dimse]\nplain = false\n') == \
        "pathpacs: config error: dimse.plain = false needs dimse.tls_port: no DICOM listener would run"
    assert _serve_error(tmp_path, base + f'[tls]\ncert = "{server.cert}"\nkey = "{server.key}"\n'
                        'require_client_cert = true\n') == \
        "pathpacs: config error: tls.require_client_cert = true needs tls.ca (the CA of client certificates)"
    cfg = tmp_path / "same.toml"
    cfg.write_text(f'[dimse]\ntls_port = {port}\n[tls]\ncert = "{server.cert}"\nkey = "{server.key}"\n')
    res = run_cli("serve", "--config", str(cfg), "--data", str(tmp_path / "d"), "--dicom-port", str(port),
                  "--http-port", str(free_port()), timeout=60)
    assert res.returncode == 2
    assert res.stderr.strip() == f"pathpacs: config error: dimse.tls_port: {port} is already the DICOM port"
    assert ca.cert.exists()
