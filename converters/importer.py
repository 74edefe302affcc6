"""Convert a scanner file straight into the archive (``pathpacs import``/``watch``).

Instances are written into a directory under ``arc.tmp_dir`` (same filesystem
as the hot tier) and ingested with ``take_ownership=True``: the ingest renames
them into place, so a slide never exists twice on disk.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from .convert import ConvertOptions, convert


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
