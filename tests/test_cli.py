"""The admin CLI: import, ls, stats, verify, config errors — run as a user would."""
from __future__ import annotations

import subprocess
import threading

import pydicom
from pydicom.uid import generate_uid
from pynetdicom import AE

import factory
from conftest import need, run_cli


def test_import_summary_and_rejections(tmp_path):
    src = tmp_path / "in"
    files = factory.wsi_series(src / "slide")
    factory.secondary_capture(src / "other" / "sc.dcm")
    (src / "junk.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"garbage" * 20)
    data = tmp_path / "data"
    res = run_cli("import", "--quiet", str(src), data=data)
    assert res.returncode == 1  # one file was rejected
    assert "4 stored, 0 duplicate, 0 replaced, 1 rejected" in res.stdout
    assert "junk.dcm" in res.stderr and "Traceback" not in res.stderr

    res = run_cli("import", "--quiet", *map(str, files), data=data)
    assert res.returncode == 0
    assert "0 stored, 3 duplicate" in res.stdout

    out = run_cli("stats", data=data, check=True).stdout
    assert "instances  4" in out and "studies    2" in out and "patients   2" in out

    listing = run_cli("ls", data=data, check=True).stdout
    for f in files:
        assert str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) in listing
    assert "PATIENT P1" in listing and "[SM]" in listing


def test_import_missing_path_is_one_line(tmp_path):
    res = run_cli("import", str(tmp_path / "nope"), data=tmp_path / "data")
    assert res.returncode == 2
    assert res.stderr.strip().count("\n") == 0 and "no such file" in res.stderr


def test_verify_finds_rot_and_missing_blobs(tmp_path):
    data = tmp_path / "data"
    files = factory.wsi_series(tmp_path / "in")
    run_cli("import", "--quiet", str(tmp_path / "in"), data=data, check=True)
    assert run_cli("verify", "--quiet", data=data).returncode == 0
    blobs = sorted(p for p in (data / "hot" / "blobs").rglob("*") if p.is_file())
    assert len(blobs) == len(files)
    raw = bytearray(blobs[0].read_bytes())
    raw[len(raw) // 2] ^= 0x01
    blobs[0].write_bytes(bytes(raw))
    blobs[1].unlink()
    res = run_cli("verify", "--quiet", data=data)
    assert res.returncode == 1
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 2
    assert any(line.startswith("sha256 mismatch") for line in lines)
    assert any(line.startswith("missing") for line in lines)
    assert "1 intact, 2 bad" in res.stderr


def test_config_errors_are_one_line(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[archive]\nno_such_key = 1\n")
    res = run_cli("stats", "--config", str(cfg), data=tmp_path / "d")
    assert res.returncode == 2 and "unknown key archive.no_such_key" in res.stderr
    cfg.write_text("[nodes.x]\naet = \"X\"\n")
    res = run_cli("stats", "--config", str(cfg), data=tmp_path / "d")
    assert res.returncode == 2 and "nodes.x.host: Field required" in res.stderr
    assert "Traceback" not in res.stderr


def test_cli_works_while_server_runs(server, tmp_path):
    files = factory.wsi_series(tmp_path / "in")
    res = subprocess.run([need("dcmsend"), "-aec", server.aet, "127.0.0.1", str(server.dicom_port),
                          str(files[0])], capture_output=True, timeout=60)
    assert res.returncode == 0
    assert run_cli("import", "--quiet", str(files[1]), str(files[2]), data=server.data_dir).returncode == 0
    assert "instances  3" in run_cli("stats", data=server.data_dir, check=True).stdout
    # The server sees what the CLI imported (shared LMDB).
    out = tmp_path / "find"
    out.mkdir()
    sop = str(pydicom.dcmread(files[2], stop_before_pixels=True).SOPInstanceUID)
    res = subprocess.run([need("findscu"), "-aec", server.aet, "-S", "-X", "-od", str(out),
                          "-k", "QueryRetrieveLevel=IMAGE", "-k", f"SOPInstanceUID={sop}",
                          "127.0.0.1", str(server.dicom_port)], capture_output=True, timeout=60)
    assert res.returncode == 0 and len(list(out.iterdir())) == 1


def test_eight_concurrent_associations(server, tmp_path):
    """Several scanners at night: 8 associations storing at once, all succeed."""
    per_sender = []
    for s in range(8):
        study, series = generate_uid(), generate_uid()
        per_sender.append([factory.wsi_instance(study, series, 512, 512, seed=s * 10 + i) for i in range(3)])
    statuses: list[int] = []
    lock = threading.Lock()
    barrier = threading.Barrier(8)

    def send(datasets):
        ae = AE(ae_title="SCANNER")
        ae.add_requested_context(factory.WSI, ["1.2.840.10008.1.2.4.50"])
        a = ae.associate("127.0.0.1", server.dicom_port, ae_title=server.aet)
        assert a.is_established
        barrier.wait(timeout=30)
        for ds in datasets:
            st = a.send_c_store(ds)
            with lock:
                statuses.append(st.Status if st else -1)
        a.release()

    threads = [threading.Thread(target=send, args=(d,)) for d in per_sender]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert statuses == [0] * 24
    assert "instances  24" in run_cli("stats", data=server.data_dir, check=True).stdout


# -- hardening: every bad flag or config value is one line and exit 2, nothing is created ----------

BAD_FLAGS = [
    ["serve", "--dicom-port", "70000"], ["serve", "--dicom-port", "-1"], ["serve", "--http-port", "0"],
    ["serve", "--aet", "A" * 20], ["serve", "--aet", ""], ["serve", "--aet", "BAD\\AET"],
    ["serve", "--host", "not a host!"], ["serve", "--http-workers", "abc"], ["serve", "--http-workers", "0"],
    ["ls", "--level", "galaxy"], ["no-such-verb"],
]

BAD_CONFIGS = [
    ('[archive]\naet = "' + "A" * 40 + '"\n', "archive.aet"),
    ("[archive]\nhost = 5\n", "archive.host"),
    ("[archive]\ndata_dir = 5\n", "archive.data_dir"),
    ('[http]\nworkers = "abc"\n', "http.workers"),
    ('[nodes.x]\naet = 5\nhost = "h"\nport = 104\n', "nodes.x.aet"),
    ("[archive]\nlmdb_map_size_gb = -1\n", "archive.lmdb_map_size_gb"),
    ("[archive]\ndicom_port = true\n", "archive.dicom_port"),
    ("[archive]\nhttp_port = 24380.5\n", "archive.http_port"),
    ("[archive]\nmax_associations = -1\n", "archive.max_associations"),
    ("[dimse]\nmax_associations = 0\n", "dimse.max_associations"),
    ("[archive]\naet = 5\n", "archive.aet"),
    ('[nodes.x]\naet = "X"\nhost = "h"\nport = 99999\n', "nodes.x.port"),
    ("[dimse]\nacse_timeout = 0\n", "dimse.acse_timeout"),
    ("[dimse]\nmax_pdu = 0\n", "dimse.max_pdu"),
    ('[http]\ntrusted_proxies = ["somewhere"]\n', "http.trusted_proxies"),
    ('[http]\ncors_origins = "*"\n', "http.cors_origins"),
    ("[archive\n", "not valid TOML"),
]


def _one_line_error(res) -> str:
    assert res.returncode == 2, (res.returncode, res.stderr)
    assert "Traceback" not in res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("pathpacs:"), lines[0]
    return lines[0]


def test_bad_flags_are_one_line_exit_2(tmp_path):
    for argv in BAD_FLAGS:
        line = _one_line_error(run_cli(*argv, data=tmp_path / "d"))
        assert "error" in line
    assert not (tmp_path / "d").exists()


def test_bad_config_values_are_one_line_exit_2(tmp_path):
    cfg = tmp_path / "c.toml"
    for i, (text, where) in enumerate(BAD_CONFIGS):
        cfg.write_text(text)
        verb = "serve" if i % 4 == 0 else "stats"  # both load the same way; serve for a sample
        line = _one_line_error(run_cli(verb, "--config", str(cfg), data=tmp_path / "d"))
        assert where in line, (text, line)
    cfg.write_bytes(b"\x00\xff\xfe binary \x80\x81")
    assert "not UTF-8" in _one_line_error(run_cli("stats", "--config", str(cfg), data=tmp_path / "d"))
    assert "is a directory" in _one_line_error(run_cli("stats", "--config", str(tmp_path), data=tmp_path / "d"))
    assert not (tmp_path / "d").exists()


def test_read_only_verbs_create_nothing(tmp_path):
    for verb in ("ls", "stats", "verify"):
        target = tmp_path / f"new-{verb}"
        line = _one_line_error(run_cli(verb, data=target))
        assert "no archive in" in line
        assert not target.exists()


def test_old_dimse_keys_in_archive_section_still_work(tmp_path):
    """Config files written for the previous release ([archive] max_associations...) still load."""
    cfg = tmp_path / "c.toml"
    cfg.write_text("[archive]\nmax_associations = 8\ndimse_timeout = 30\nnetwork_timeout = 60\n")
    from archive.config import load

    c = load(cfg)
    assert (c.max_associations, c.dimse_timeout, c.network_timeout) == (8, 30.0, 60.0)
    cfg.write_text("[archive]\nmax_associations = 8\n[dimse]\nmax_associations = 12\n")
    assert load(cfg).max_associations == 12  # [dimse] wins
