"""The converters' command line: ``convert`` (``pathpacs convert``, ``python -m converters convert``).

A library CLI with no archive behind it: ``register(subparsers)`` adds the ``convert`` verb to
any argparse parser (``archive.cli`` adds it to ``pathpacs``), ``add_convert_options`` and
``options_from_args`` give the archive's ``import``/``watch`` verbs the same conversion flags.
Expected failures raise ``ConversionError`` internally and come out as one line on stderr with
a non-zero exit code.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .codecs import CODECS
from .errors import ConversionError

EXIT_FAILED = 2


def add_convert_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("conversion")
    g.add_argument("--metadata", type=Path, metavar="FILE.json",
                   help="patient/study/slide metadata (schema in docs/converters.md)")
    g.add_argument("--tile-size", type=int, metavar="N",
                   help="output tile size; default: the source's (re-encodes when different)")
    g.add_argument("--workers", type=int, default=0, metavar="N", help="threads (default: one per CPU)")
    g.add_argument("--no-label", action="store_true", help="leave out the label image")
    g.add_argument("--no-overview", action="store_true", help="leave out the overview (macro) image")
    g.add_argument("--levels", type=int, metavar="N", help="write at most N pyramid levels")
    g.add_argument("--codec", choices=CODECS, default="jpeg", help="codec for re-encoded tiles (default jpeg)")
    g.add_argument("--quality", type=int, metavar="Q",
                   help="1-100 for re-encoded tiles (default 90; 100 = lossless for jpeg2000/htj2k)")
    g.add_argument("--mpp", type=float, metavar="UM", help="pixel size in µm, when the file does not say")
    g.add_argument("--patient-id")
    g.add_argument("--patient-name")
    g.add_argument("--accession")
    g.add_argument("--study-id")
    g.add_argument("--specimen-id")
    g.add_argument("--container-id", help="slide (container) identifier; default: barcode or file name")


def options_from_args(args: argparse.Namespace, *, progress: bool | None = None):
    """argparse namespace (from convert, or the archive's watch or import) -> ConvertOptions."""
    from .convert import ConvertOptions
    from .metadata import load_metadata, merge_metadata, validate_metadata

    md = load_metadata(getattr(args, "metadata", None))
    flags = {
        "patient": {"id": getattr(args, "patient_id", None), "name": getattr(args, "patient_name", None)},
        "study": {"accession_number": getattr(args, "accession", None), "id": getattr(args, "study_id", None)},
        "slide": {"specimen_id": getattr(args, "specimen_id", None),
                  "container_id": getattr(args, "container_id", None)},
        "image": {"mpp": getattr(args, "mpp", None)},
    }
    flags = {g: {k: v for k, v in d.items() if v is not None} for g, d in flags.items()}
    flags = validate_metadata({g: d for g, d in flags.items() if d}, origin="command line")
    md = merge_metadata(md, flags)
    workers = getattr(args, "workers", 0) or 0
    if workers < 0:
        raise ConversionError("--workers must be positive")
    if progress is None:
        progress = not getattr(args, "quiet", False) and sys.stderr.isatty()
    return ConvertOptions(
        tile_size=getattr(args, "tile_size", None),
        workers=workers,
        label=not getattr(args, "no_label", False),
        overview=not getattr(args, "no_overview", False),
        levels=getattr(args, "levels", None),
        codec=getattr(args, "codec", None) or "jpeg",
        quality=getattr(args, "quality", None),
        metadata=md,
        progress=progress,
    )


def quiet_libraries() -> None:
    import logging

    # tifffile logs what it thinks of broken files; our one-line reason says it better
    logging.getLogger("tifffile").setLevel(logging.CRITICAL)


def fail(message: str) -> int:
    print(f"pathpacs: error: {message}", file=sys.stderr)
    return EXIT_FAILED


def cmd_convert(args: argparse.Namespace) -> int:
    from .convert import convert

    quiet_libraries()
    try:
        opts = options_from_args(args)  # progress bar: not with --quiet, only on a terminal
        result = convert(args.input, args.output, opts)
    except ConversionError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return fail("interrupted")
    except MemoryError:
        return fail("out of memory")
    except OSError as exc:
        return fail(f"{exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""))
    except Exception as exc:  # an unexpected bug still gets one line, not a traceback
        if os.environ.get("PATHPACS_DEBUG"):
            raise
        return fail(f"conversion failed ({type(exc).__name__}: {exc})")
    if not args.quiet:
        for w in result.warnings:
            print(f"pathpacs: warning: {w}", file=sys.stderr)
        print(result.summary())
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="convert a scanner file to DICOM WSI instances",
                              description="Convert a scanner file (SVS, NDPI, Philips TIFF, OME-TIFF, tiled "
                                          "TIFF, JPEG/PNG, OpenSlide formats) to DICOM VL Whole Slide "
                                          "Microscopy Image instances.")
    p.add_argument("input", type=Path)
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUTDIR")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress bar, no summary")
    add_convert_options(p)
    p.set_defaults(func=cmd_convert)
