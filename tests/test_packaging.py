"""It installs as a package: the wheel (built as `pip wheel .` would, without the network) holds
every subpackage and data file of the product packages and no test/bench code, and `pathpacs
serve` installed from it into a fresh venv, run outside the repository, answers C-ECHO and QIDO.

The fresh venv gets the wheel only (`--no-deps`); its dependencies come from this test's venv
through a .pth line naming its site-packages (a line in a .pth adds a directory to sys.path but
does not run the .pth files inside it, so this venv's editable pathpacs stays out)."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, Server, need

PRODUCT = ("archive", "dicomweb", "storage_tiers", "converters")
PROBE = Path("dicomweb") / "static" / "packaging-probe" / "probe.js"  # package-data of a later viewer
VIEWER_DIST = Path("dicomweb") / "static" / "viewer-dist"
DMV = "node_modules/dicom-microscopy-viewer/dist"


def _run(cmd: list, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PIP_INDEX_URL", "PIP_FIND_LINKS")}
    res = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, cwd=cwd, env=env,
                         timeout=timeout)
    assert res.returncode == 0, f"{cmd}:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


def _product_files(tree: Path) -> set[str]:
    return {p.relative_to(tree).as_posix() for pkg in PRODUCT for p in (tree / pkg).rglob("*")
            if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict:
    """The wheel of a copy of the source tree (the build writes build/ and *.egg-info beside it)."""
    try:
        from setuptools.command import bdist_wheel  # noqa: F401  (setuptools >= 70.1)
    except ImportError:
        try:
            import wheel  # noqa: F401
        except ImportError:
            pytest.fail("building a wheel needs setuptools>=70.1 in the test venv (pip install -e '.[test]')")
    base = tmp_path_factory.mktemp("packaging")
    src = base / "src"
    src.mkdir()
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for pkg in (*PRODUCT, "conformance", "tests"):  # conformance and tests must stay out of the wheel
        shutil.copytree(ROOT / pkg, src / pkg, ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    (src / PROBE).parent.mkdir(parents=True, exist_ok=True)
    (src / PROBE).write_text("// a static file of the pages\n")
    shutil.rmtree(src / VIEWER_DIST, ignore_errors=True)
    # the build step `make wheel` runs first: the viewer's served files into the package data
    if not (ROOT / "viewer" / "node_modules").is_dir():
        pytest.fail("the viewer's packages are not installed: npm ci --prefix viewer (make test does)")
    _run([sys.executable, "-m", "dicomweb.viewer_dist", "--quiet", "--viewer", ROOT / "viewer", "--out",
          src / VIEWER_DIST], cwd=src)
    dist = base / "dist"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", dist, src], cwd=base)
    wheels = list(dist.glob("pathpacs-*.whl"))
    assert len(wheels) == 1, wheels
    return {"base": base, "src": src, "wheel": wheels[0]}


@pytest.fixture(scope="module")
def venv(built) -> Path:
    """A fresh venv with the wheel installed (no index, no dependencies) and this venv's
    site-packages on its path for the dependencies."""
    env_dir = built["base"] / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", env_dir], cwd=built["base"])
    py = env_dir / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", py, "install", "-q", "--no-deps", "--no-index",
          built["wheel"]], cwd=built["base"])
    site = Path(_run([py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=built["base"]).stdout.strip())
    (site / "deps-from-the-test-venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir


def test_wheel_holds_every_subpackage_and_data_file(built):
    with zipfile.ZipFile(built["wheel"]) as zf:
        names = {n for n in zf.namelist() if not n.startswith("pathpacs-")}
    expected = _product_files(built["src"])
    # a folder of modules without __init__.py is no package (namespaces = false): it would be left out
    assert expected - names == set(), "missing from the wheel"
    assert PROBE.as_posix() in names  # dicomweb/static/** is package data
    viewer = {n[len(VIEWER_DIST.as_posix()) + 1:] for n in names if n.startswith(VIEWER_DIST.as_posix() + "/")}
    assert {"app/viewer.js", "app/boot.js", "dmv/dicomMicroscopyViewer.bundle.min.js", "dmv/LICENSE.txt",
            "dmv/dynamic-import/dataLoader.worker.min.js", "dmv/dynamic-import/libjpegturbowasm_decode.wasm",
            "dwc/dicomweb-client.js", "dwc/LICENSE.txt", "dcmjs/dcmjs.js", "dcmjs/LICENSE.txt"} <= viewer
    assert not [n for n in viewer if n.endswith(".map")], "source maps stay out"
    assert len(viewer) < 30, viewer  # only what the page serves, not the packages' whole dist
    for init in ("archive/dimse/__init__.py", "archive/__init__.py", "dicomweb/__init__.py",
                 "storage_tiers/__init__.py", "converters/__init__.py"):
        assert init in names
    assert {n.split("/")[0] for n in names} == set(PRODUCT), "only the product packages"


def test_installed_pathpacs_serves_outside_the_repository(venv, tmp_path):
    echoscu = need("echoscu")
    run_dir = tmp_path / "elsewhere"
    run_dir.mkdir()
    py = venv / "bin" / "python"
    where = _run([py, "-c", "import archive, archive.dimse, dicomweb.app, storage_tiers, converters.convert\n"
                  "print(archive.__file__)\n"
                  "try:\n    import conformance\nexcept ImportError:\n    print('no conformance')\n"
                  "else:\n    print(conformance.__file__)"], cwd=run_dir).stdout.splitlines()
    assert Path(where[0]).is_relative_to(venv), f"archive imported from {where[0]}, not from the wheel"
    assert where[1] == "no conformance"

    srv = Server(tmp_path / "data", program=[str(venv / "bin" / "pathpacs")], cwd=run_dir,
                 env={"PYTHONPATH": None}).start()
    try:
        res = subprocess.run([echoscu, "-aec", srv.aet, "127.0.0.1", str(srv.dicom_port)],
                             capture_output=True, text=True, timeout=30)
        assert res.returncode == 0, res.stderr + srv.log()[-2000:]
        with urllib.request.urlopen(f"{srv.dicomweb_url}/studies", timeout=30) as resp:
            assert resp.status == 200
            assert resp.read().strip() in (b"[]", b"")
        # the viewer's page and its files come from the wheel's package data (no viewer/ here)
        with urllib.request.urlopen(f"{srv.http_url}/viewer?study=1.2.3", timeout=30) as resp:
            assert resp.status == 200 and b"dicomMicroscopyViewer.bundle.min.js" in resp.read()
        for rel, src in (("dmv/dicomMicroscopyViewer.bundle.min.js", f"{DMV}/dicomMicroscopyViewer.bundle.min.js"),
                         ("dmv/dynamic-import/libjpegturbowasm_decode.wasm",
                          f"{DMV}/dynamic-import/libjpegturbowasm_decode.wasm"),
                         ("app/viewer.js", "viewer.js")):
            with urllib.request.urlopen(f"{srv.http_url}/static/viewer/{rel}", timeout=30) as resp:
                assert resp.status == 200 and resp.read() == (ROOT / "viewer" / src).read_bytes(), rel
    finally:
        code = srv.stop()
    assert code == 0, srv.log()[-3000:]
    assert "Traceback" not in srv.log()
