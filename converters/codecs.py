"""Tile encoders for the re-encode path (``--codec``, ``--quality``)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from .errors import ConversionError

CODECS = ("jpeg", "jpeg2000", "htj2k")
DEFAULT_QUALITY = {"jpeg": 90, "jpeg2000": 90, "htj2k": 90}


@dataclass(frozen=True)
class Encoder:
    name: str
    quality: int
    transfer_syntax: str
    photometric: str
    lossy_method: str | None
    encode: Callable[[np.ndarray], bytes]


def make_encoder(codec: str = "jpeg", quality: int | None = None) -> Encoder:
    import imagecodecs

    if codec not in CODECS:
        raise ConversionError(f"unknown codec {codec!r} (use one of {', '.join(CODECS)})")
    q = DEFAULT_QUALITY[codec] if quality is None else int(quality)
    if not 1 <= q <= 100:
        raise ConversionError("--quality must be between 1 and 100")
    if codec == "jpeg":
        if q >= 100:
            q = 100

        def enc(a: np.ndarray) -> bytes:
            return imagecodecs.jpeg8_encode(a, level=q, subsampling="422")

        return Encoder(codec, q, "1.2.840.10008.1.2.4.50", "YBR_FULL_422", "ISO_10918_1", enc)
    if codec == "jpeg2000":
        if q >= 100:
            def enc(a: np.ndarray) -> bytes:
                return imagecodecs.jpeg2k_encode(a, level=0, codecformat="j2k", reversible=True, mct=True)

            return Encoder(codec, q, "1.2.840.10008.1.2.4.90", "YBR_RCT", None, enc)
        psnr = 45.0 + (q - 90) * 0.5  # q90 -> 45 dB, q50 -> 25 dB

        def enc(a: np.ndarray) -> bytes:
            return imagecodecs.jpeg2k_encode(a, level=psnr, codecformat="j2k", reversible=False, mct=True)

        return Encoder(codec, q, "1.2.840.10008.1.2.4.91", "YBR_ICT", "ISO_15444_1", enc)
    # High-Throughput JPEG 2000
    if q >= 100:
        def enc(a: np.ndarray) -> bytes:
            return imagecodecs.htj2k_encode(a, reversible=True)

        return Encoder(codec, q, "1.2.840.10008.1.2.4.201", "YBR_RCT", None, enc)
    qstep = 0.005 * 2 ** ((90 - q) / 10)  # quantisation step: q90 -> 0.005

    def enc(a: np.ndarray) -> bytes:
        return imagecodecs.htj2k_encode(a, level=qstep)

    return Encoder(codec, q, "1.2.840.10008.1.2.4.203", "YBR_ICT", "ISO_15444_15", enc)
