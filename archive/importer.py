"""Convert a scanner file straight into the archive (``pathpacs import``/``watch``).

The converters library turns the file into DICOM instances in a directory under
``arc.tmp_dir`` (same filesystem as the hot tier); each is ingested with
``take_ownership=True``: the ingest renames it into place, so a slide never exists twice on
disk. Only ``arc.tmp_dir`` and ``arc.ingest_file`` of the Archive are used.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from converters.commands import options_from_args, quiet_libraries
from converters.convert import ConvertOptions, convert


def import_slide(arc, path: Path, options: ConvertOptions | None = None) -> list:
    """Convert ``path`` and ingest each instance; returns the IngestResults.

    Raises ``ConversionError`` when the file cannot be converted (nothing is
    stored then). Instances are ingested VOLUME levels first, then label,
    overview, thumbnail.
    """
    options = options or ConvertOptions()
    tmp = Path(tempfile.mkdtemp(prefix="convert-", dir=arc.tmp_dir))
    try:
        result = convert(path, tmp, options)
        return [arc.ingest_file(inst.path, take_ownership=True, source="convert") for inst in result.instances]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def import_path(arc, path: Path, args: argparse.Namespace | None = None) -> list:
    """Convert a non-DICOM file and ingest its instances (``pathpacs import``); the conversion
    flags, if any, come from ``args``."""
    quiet_libraries()
    opts = options_from_args(args or argparse.Namespace(), progress=False)
    return import_slide(arc, Path(path), opts)
