# pathpacs — the two commands: `make run` and `make test`. Both set themselves up.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
SYSTEM_TOOLS := dcmsend:dcmtk dciodvfy:dicom3tools Orthanc:orthanc OrthancWSIDicomizer:orthanc-wsi chromium:chromium zbarimg:zbar-tools tc:iproute2 haproxy:haproxy
APT_PACKAGES := dcmtk dicom3tools orthanc orthanc-dicomweb orthanc-wsi libturbojpeg0 chromium zbar-tools iproute2 postgresql haproxy

BROWSER_STAMP := tests/browser/node_modules/.package-lock.json
VIEWER_STAMP := viewer/node_modules/.package-lock.json
NPM_CI := npm ci --ignore-scripts --no-audit --no-fund --loglevel=error

.PHONY: run test bench setup system-tools clean npm wheel

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test]'
	@touch $(STAMP)

setup: $(STAMP)

run: $(STAMP) $(VIEWER_STAMP)
	$(VENV)/bin/pathpacs serve --demo --data ./data --dicom-port 11112 --aet PATHPACS --http-port 8080

system-tools:
	@missing=""; for pair in $(SYSTEM_TOOLS); do tool=$${pair%%:*}; \
	  command -v $$tool >/dev/null 2>&1 || missing="$$missing $${pair#*:}"; done; \
	[ -e /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || missing="$$missing orthanc-dicomweb"; \
	ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1 || missing="$$missing postgresql"; \
	if [ -n "$$missing" ]; then \
	  echo "installing system tools:$$missing (and peers)"; \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $(APT_PACKAGES) >/dev/null; \
	fi

# Node and npm from Debian when missing (for the two npm ci below).
npm:
	@command -v npm >/dev/null 2>&1 || { SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq nodejs npm >/dev/null; }

# dicom-microscopy-viewer (Slim's library) for the browser test, pinned by the lockfile.
$(BROWSER_STAMP): tests/browser/package-lock.json | npm
	$(NPM_CI) --prefix tests/browser

# The viewer at /viewer: dicom-microscopy-viewer and dicomweb-client, pinned by viewer/package-lock.json,
# served from viewer/node_modules by dicomweb/viewer.py (no CDN, no network at run time).
$(VIEWER_STAMP): viewer/package-lock.json | npm
	$(NPM_CI) --prefix viewer

test: $(STAMP) system-tools $(BROWSER_STAMP) $(VIEWER_STAMP)
	$(PY) -m pytest -n 2 --dist loadfile -p no:cacheprovider --durations=15 tests; code=$$?; \
	if [ $$code -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$code

bench: $(STAMP) system-tools $(VIEWER_STAMP)
	$(PY) -m conformance.bench

# The wheel (dist/): the viewer's files (our JS/CSS, the npm packages' served dist files and their
# licences) are copied into dicomweb/static/viewer-dist/ first, so /viewer works installed from it;
# the copy is removed afterwards (a checkout serves viewer/ itself).
wheel: $(STAMP) $(VIEWER_STAMP)
	$(PY) -m dicomweb.viewer_dist
	$(PY) -m pip wheel --no-deps --no-build-isolation -q -w dist . ; code=$$?; \
	rm -rf dicomweb/static/viewer-dist; exit $$code

clean:
	rm -rf $(VENV) build dist *.egg-info tests/browser/node_modules viewer/node_modules dicomweb/static/viewer-dist
