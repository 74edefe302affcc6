"""The demo slide of `pathpacs serve --demo`: something to look at on the first run.

A small Aperio-like TIFF is generated here (tifffile + numpy: product dependencies) and turned
into DICOM WSI instances by our own converter, so the demo is a real pyramid with a label and an
overview, made the way a scanner file would be. It lives in the product, not in `conformance`
(test and bench support, left out of the wheel), because an installed `pathpacs` must be able
to make it. It is imported only into an archive without a single study: plain `serve` never
adds data, and `--demo` never adds data to an archive that holds some.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np
import tifffile

log = logging.getLogger("pathpacs.demo")

PATIENT_NAME = "Demo^Slide"
PATIENT_ID = "PATHPACS-DEMO"
ACCESSION = "DEMO-0001"
STAIN = "H&E"


def _tissue(height: int, width: int) -> np.ndarray:
    """Pink-and-purple blobs on white: reads as an H&E section at a glance, with texture at
    every level so a wrong tile shows."""
    rng = np.random.default_rng(11)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.full((height, width, 3), 245, np.float32)
    for _ in range(9):
        cy, cx = rng.uniform(0.2, 0.8) * height, rng.uniform(0.2, 0.8) * width
        ry, rx = rng.uniform(0.1, 0.25) * height, rng.uniform(0.1, 0.25) * width
        inside = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        img[inside] = (230, 150, 190)  # eosin
    nuclei = rng.uniform(0, 1, size=(height, width)) > 0.997
    for dy in range(-3, 4):
        for dx in range(-3, 4):
            if dy * dy + dx * dx <= 9:
                img[np.roll(np.roll(nuclei, dy, 0), dx, 1) & (img[..., 1] < 200)] = (110, 60, 150)  # haematoxylin
    img += rng.normal(0, 5, size=img.shape).astype(np.float32)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_tiff(path: Path, width: int = 3072, height: int = 2048, tile: int = 256) -> Path:
    """An Aperio-style SVS: tiled base and a 4x level, a label and a macro (overview)."""
    base = _tissue(height, width)
    small = base.reshape(height // 4, 4, width // 4, 4, 3).mean((1, 3)).astype(np.uint8)
    head = "Aperio Image Library v12.0.15 \r\n"
    desc = (f"{head}{width}x{height} [0,0 {width}x{height}] ({tile}x{tile}) JPEG/RGB Q=85|AppMag = 20"
            f"|ScanScope ID = DEMO|Filename = pathpacs-demo|Date = 01/02/24|Time = 09:30:00|MPP = 0.5")
    with tifffile.TiffWriter(path) as tw:
        tw.write(base, tile=(tile, tile), compression="jpeg", compressionargs={"level": 85},
                 photometric="rgb", description=desc, subfiletype=0, metadata=None)
        tw.write(small, tile=(tile, tile), compression="jpeg", compressionargs={"level": 85}, photometric="rgb",
                 description=f"{head}{width}x{height} -> {small.shape[1]}x{small.shape[0]} - ({tile}x{tile})",
                 subfiletype=0, metadata=None)
        label = np.full((300, 320, 3), 250, np.uint8)
        label[40:80, 30:290] = 20  # a printed bar, a barcode-ish stripe pattern below
        label[120:260, 30:290:6] = 0
        tw.write(label, compression="lzw", photometric="rgb", description=f"{head}label 320x300",
                 subfiletype=1, metadata=None)
        macro = small[::2, ::2].copy()
        tw.write(macro, compression="jpeg", compressionargs={"level": 90}, photometric="rgb",
                 description=f"{head}macro {macro.shape[1]}x{macro.shape[0]}", subfiletype=9, metadata=None)
    return path


def seed(arc) -> int:
    """Import the demo slide into `arc` when it holds no study; returns the instances added
    (0 when the archive already holds data: nothing is added then)."""
    from converters.convert import ConvertOptions, convert
    from converters.metadata import empty_metadata

    if next(iter(arc.studies()), None) is not None:
        log.info("demo: the archive already holds studies; nothing added")
        return 0
    meta = empty_metadata()
    meta["patient"].update({"name": PATIENT_NAME, "id": PATIENT_ID})
    meta["study"].update({"accession_number": ACCESSION, "description": "pathpacs demo slide",
                          "date": "20240102"})
    meta["slide"].update({"specimen_description": STAIN, "label_text": "pathpacs demo"})
    added = 0
    with tempfile.TemporaryDirectory(dir=arc.tmp_dir) as tmp:
        src = write_tiff(Path(tmp) / "pathpacs-demo.svs")
        out = Path(tmp) / "dicom"
        result = convert(src, out, ConvertOptions(metadata=meta, uid_seed="pathpacs-demo", workers=2))
        for inst in result.instances:
            res = arc.ingest_file(inst.path, source="demo")
            if not res.ok:  # a full disk, say: serve says so in one line and does not start
                raise RuntimeError(f"the demo slide was not stored: {res.reason}")
            added += 1
    log.info("demo: imported the demo slide (%d instances)", added)
    return added
