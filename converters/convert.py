"""Scanner file -> DICOM VL Whole Slide Microscopy Image instances (Supplement 145).

Plan, then stream:

* every source level whose stored tiles DICOM can carry as they are (baseline
  JPEG, JPEG 2000 codestreams) at the output tile size is **copied**: tile
  bytes are read with ``pread`` by a thread pool and appended as one fragment
  per frame -- no decode, so the base level decodes to exactly the source
  pixels;
* levels that cannot be copied (uncompressed/LZW/deflate tiles, another tile
  size, photos) are decoded and **re-encoded** with ``--codec``/``--quality``;
* levels missing below the smallest source level are **generated** by 2x
  downsampling, band by band, down to a level that fits in one tile.

All instances share study, series, frame of reference and dimension
organisation. Each is written under a hidden temporary name in OUTDIR, fsync'd
and renamed only when every instance is complete; any failure removes them all.
"""

from __future__ import annotations

import collections
import math
import os
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .codecs import Encoder, make_encoder
from .dicomwriter import BOT_LIMIT, FrameWriter
from .errors import ConversionError
from .metadata import SeriesContext, build_dataset, empty_metadata, merge_metadata
from .sources import ArrayLevel, Level, Slide, open_slide

MAX_DECODED_TILE_BYTES = 256 << 20


@dataclass
class ConvertOptions:
    tile_size: int | None = None
    workers: int = 0  # 0 = one per CPU
    label: bool = True
    overview: bool = True
    thumbnail: bool = True
    levels: int | None = None
    codec: str = "jpeg"
    quality: int | None = None
    metadata: dict = field(default_factory=empty_metadata)
    progress: bool = False
    name: str | None = None  # output file prefix; default: input file stem
    uid_seed: str | None = None  # set: UIDs derived from it (same file -> same UIDs), else random

    @property
    def n_workers(self) -> int:
        return self.workers if self.workers and self.workers > 0 else (os.cpu_count() or 2)


@dataclass
class OutputInstance:
    path: Path
    kind: str  # VOLUME, LABEL, OVERVIEW, THUMBNAIL
    level: int | None
    width: int
    height: int
    frames: int
    mode: str  # copy, reencode, generate
    sop_instance_uid: str
    transfer_syntax: str
    size: int = 0


@dataclass
class ConversionResult:
    source: Path
    format: str
    instances: list[OutputInstance]
    seconds: float
    warnings: list[str] = field(default_factory=list)

    @property
    def files(self) -> list[Path]:
        return [i.path for i in self.instances]

    def summary(self) -> str:
        vol = [i for i in self.instances if i.kind == "VOLUME"]
        copied = sum(1 for i in vol if i.mode == "copy")
        extra = [i.kind.lower() for i in self.instances if i.kind != "VOLUME"]
        size = sum(i.size for i in self.instances)
        base = vol[0] if vol else None
        dims = f"{base.width}x{base.height}" if base else "?"
        parts = [f"{self.source.name} ({self.format}, {dims})", f"-> {len(self.instances)} instances",
                 f"{len(vol)} levels ({copied} copied losslessly)"]
        if extra:
            parts.append("+ " + ", ".join(extra))
        parts.append(f"{size / 1e6:.1f} MB in {self.seconds:.2f} s")
        return " ".join(parts[:2]) + ": " + ", ".join(parts[2:])


# --- planning -------------------------------------------------------------------------

@dataclass
class LevelPlan:
    index: int  # output level number (0 = base)
    width: int
    height: int
    tile_w: int
    tile_h: int
    mode: str  # "copy", "reencode", "generate"
    source: Level | None  # for copy / reencode


def _safe_stem(path: Path) -> str:
    stem = path.name
    for suf in (".ome.tiff", ".ome.tif"):
        if stem.lower().endswith(suf):
            stem = stem[: -len(suf)]
            break
    else:
        stem = Path(stem).stem
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", stem).strip("._") or "slide"
    return stem[:100]


def plan_levels(slide: Slide, opts: ConvertOptions) -> list[LevelPlan]:
    levels = slide.levels
    base = levels[0]
    if opts.tile_size is not None:
        t = int(opts.tile_size)
        if t < 16 or t > 4096 or t % 16:
            raise ConversionError("--tile-size must be a multiple of 16 between 16 and 4096")
        tile = (t, t)
    elif base.copy is not None:
        tile = (base.tile_w, base.tile_h)
    else:
        tile = (256, 256)
    plans: list[LevelPlan] = []
    for lv in levels:
        if lv.copy is not None and (lv.tile_w, lv.tile_h) == tile:
            plans.append(LevelPlan(len(plans), lv.width, lv.height, lv.tile_w, lv.tile_h, "copy", lv))
        else:
            if lv.tile_w * lv.tile_h * 3 > MAX_DECODED_TILE_BYTES and not isinstance(lv, ArrayLevel):
                raise ConversionError(f"{slide.path.name}: untiled {lv.width}x{lv.height} image is too large to "
                                      "convert in bounded memory")
            plans.append(LevelPlan(len(plans), lv.width, lv.height, tile[0], tile[1], "reencode", lv))
    # generated tiles are square and even-sized (bands of `t` rows halve exactly)
    gen_tile = tile[0] if tile[0] == tile[1] and tile[0] % 2 == 0 else 256
    w, h = plans[-1].width, plans[-1].height
    while w > gen_tile or h > gen_tile:
        w, h = (w + 1) // 2, (h + 1) // 2
        plans.append(LevelPlan(len(plans), w, h, gen_tile, gen_tile, "generate", None))
    if opts.levels is not None:
        if opts.levels < 1:
            raise ConversionError("--levels must be at least 1")
        plans = plans[: opts.levels]
    if plans[0].width > 2**32 - 1 or plans[0].height > 2**32 - 1:
        raise ConversionError("image too large")
    for p in plans:
        if p.tile_w > 65535 or p.tile_h > 65535:
            raise ConversionError("tile too large for DICOM")
    return plans


# --- pixel plumbing -----------------------------------------------------------------

class RowReader:
    """Decoded rows [y0, y1) of a level, decoding whole tile rows in parallel (one cached)."""

    def __init__(self, level: Level, pool: ThreadPoolExecutor):
        self.level = level
        self.pool = pool
        self._cache: dict[int, np.ndarray] = {}

    def _tile_row(self, ty: int) -> np.ndarray:
        row = self._cache.get(ty)
        if row is None:
            lv = self.level
            tiles = list(self.pool.map(lambda tx: lv.decode_tile(tx, ty), range(lv.tiles_x)))
            row = np.concatenate(tiles, axis=1) if len(tiles) > 1 else tiles[0]
            row = row[: min(lv.tile_h, lv.height - ty * lv.tile_h), : lv.width]
            self._cache = {ty: row}  # keep only the latest
        return row

    def rows(self, y0: int, y1: int) -> np.ndarray:
        th = self.level.tile_h
        parts = []
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            row = self._tile_row(ty)
            a, b = max(y0 - ty * th, 0), min(y1 - ty * th, row.shape[0])
            parts.append(row[a:b])
        return parts[0] if len(parts) == 1 else np.concatenate(parts, axis=0)


def downsample2(band: np.ndarray) -> np.ndarray:
    """2x2 box filter with rounding; odd edges replicate the last row/column."""
    h, w = band.shape[:2]
    if h % 2 or w % 2:
        band = np.pad(band, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
    b = band.astype(np.uint16)
    s = b[0::2, 0::2] + b[1::2, 0::2] + b[0::2, 1::2] + b[1::2, 1::2]
    return ((s + 2) >> 2).astype(np.uint8)


def _tiles_of_band(band: np.ndarray, tile: int) -> list[np.ndarray]:
    h, w = band.shape[:2]
    n = math.ceil(w / tile)
    if h != tile or w != n * tile:
        padded = np.full((tile, n * tile, 3), 255, np.uint8)
        padded[:h, :w] = band
        band = padded
    return [np.ascontiguousarray(band[:, i * tile:(i + 1) * tile]) for i in range(n)]


class BandPyramid:
    """Stream one decoded source level through re-encoding and 2x downsampling.

    ``writers[0]`` receives the re-encoded source level (or is None when it
    was copied); ``writers[k]`` the k-th generated level. Only one band of
    ``tile`` rows per level is held in memory.
    """

    def __init__(self, source: Level, tile: int, writers: list[FrameWriter | None], encoder: Encoder,
                 pool: ThreadPoolExecutor, tick: Callable[[int], None]):
        self.reader = RowReader(source, pool)
        self.source = source
        self.tile = tile
        self.writers = writers
        self.encoder = encoder
        self.pool = pool
        self.tick = tick
        self.buffers: list[list[np.ndarray]] = [[] for _ in writers]

    def run(self) -> None:
        h = self.source.height
        for y0 in range(0, h, self.tile):
            self._push(0, self.reader.rows(y0, min(y0 + self.tile, h)))
        for k in range(1, len(self.writers)):
            if self.buffers[k]:
                band = np.concatenate(self.buffers[k], axis=0)
                self.buffers[k] = []
                self._push(k, band)

    def _push(self, k: int, band: np.ndarray) -> None:
        w = self.writers[k]
        if w is not None:
            frames = list(self.pool.map(self.encoder.encode, _tiles_of_band(band, self.tile)))
            for f in frames:
                w.add(f)
            self.tick(len(frames))
        if k + 1 < len(self.writers):
            small = downsample2(band)
            buf = self.buffers[k + 1]
            buf.append(small)
            rows = sum(b.shape[0] for b in buf)
            if rows >= self.tile:
                merged = np.concatenate(buf, axis=0)
                self.buffers[k + 1] = [merged[self.tile:]] if rows > self.tile else []
                self._push(k + 1, merged[: self.tile])


def copy_frames(level: Level, writer: FrameWriter, pool: ThreadPoolExecutor, workers: int,
                tick: Callable[[int], None]) -> None:
    """Stored tiles -> frames, read ahead by a bounded window of pool tasks."""
    n = level.n_tiles
    if hasattr(level, "frame_source"):
        # TIFF tiles: kernel file-to-file copies at precomputed positions, in parallel,
        # in batches (bounded bookkeeping; background write-back between batches)
        batch = 4096
        for start in range(0, n, batch):
            ranges = []
            for i in range(start, min(start + batch, n)):
                src = level.frame_source(i)
                ranges.append(src if src is not None else level.blank_frame())
            writer.add_ranges(ranges, level.fd, pool, workers)
            if writer._pos - writer._synced >= (64 << 20):
                writer._background_sync()
            tick(len(ranges))
        return
    chunk = 64
    window = max(2, 2 * workers)
    read = level.raw_frame

    def read_chunk(start: int) -> list[bytes]:
        return [read(i) for i in range(start, min(start + chunk, n))]

    pending: collections.deque = collections.deque()
    starts = iter(range(0, n, chunk))
    for s in starts:
        pending.append(pool.submit(read_chunk, s))
        if len(pending) >= window:
            break
    while pending:
        frames = pending.popleft().result()
        nxt = next(starts, None)
        if nxt is not None:
            pending.append(pool.submit(read_chunk, nxt))
        for f in frames:
            writer.add(f)
        tick(len(frames))


# --- the conversion ----------------------------------------------------------------

class Conversion:
    def __init__(self, input_path: Path, outdir: Path, opts: ConvertOptions):
        self.input = Path(input_path)
        self.outdir = Path(outdir)
        self.opts = opts
        self.writers: list[FrameWriter] = []
        self.final: list[tuple[Path, Path]] = []  # (tmp, final)
        self.instances: list[OutputInstance] = []
        self.warnings: list[str] = []
        self.prefix = opts.name or _safe_stem(self.input)
        self._token = f"{os.getpid()}-{time.monotonic_ns() % 10**9}"

    def _prepare_outdir(self) -> None:
        missing = []
        d = self.outdir
        while not d.exists() and d != d.parent:
            missing.append(d)
            d = d.parent
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConversionError(f"cannot create output directory {self.outdir}: {exc.strerror}") from None
        self._created_dirs = missing  # removed again if the conversion fails
        if not self.outdir.is_dir():
            raise ConversionError(f"output path {self.outdir} is not a directory")
        if not os.access(self.outdir, os.W_OK | os.X_OK):
            raise ConversionError(f"output directory {self.outdir} is not writable")

    def _writer(self, name: str, ds, n_frames: int, ts: str, size_hint: int) -> FrameWriter:
        final = self.outdir / f"{self.prefix}_{name}.dcm"
        tmp = self.outdir / f".{self.prefix}_{name}.dcm.{self._token}.part"
        w = FrameWriter(tmp, ds, n_frames, ts, extended_offsets=size_hint >= BOT_LIMIT - (1 << 24))
        self.writers.append(w)
        self.final.append((tmp, final))
        return w

    def run(self) -> ConversionResult:
        t0 = time.perf_counter()
        self._created_dirs: list[Path] = []
        encoder = make_encoder(self.opts.codec, self.opts.quality)
        try:
            with open_slide(self.input) as slide:
                try:
                    self._prepare_outdir()
                    self._convert(slide, encoder)
                    self._commit()
                except BaseException:
                    self._rollback()
                    raise
        except ConversionError as exc:
            msg = str(exc)
            if not msg.startswith(self.input.name) and not msg.startswith(str(self.input)):
                msg = f"{self.input.name}: {msg}"
            raise ConversionError(msg) from None
        return ConversionResult(self.input, slide.format, self.instances, time.perf_counter() - t0, self.warnings)

    def _convert(self, slide: Slide, encoder: Encoder) -> None:
        opts = self.opts
        md = merge_metadata(empty_metadata(), opts.metadata)
        ctx = SeriesContext.create(slide, md, opts.uid_seed)
        if ctx.mpp_assumed:
            self.warnings.append("pixel spacing unknown: assumed 1.0 µm/pixel (set image.mpp in --metadata)")
        plans = plan_levels(slide, opts)
        base = plans[0]
        bx, by = ctx.mpp[0] / 1000.0, ctx.mpp[1] / 1000.0  # mm per base pixel

        associated = []
        for a in slide.associated:
            if (a.kind == "LABEL" and not opts.label) or (a.kind == "OVERVIEW" and not opts.overview) or \
                    (a.kind == "THUMBNAIL" and not opts.thumbnail):
                continue
            associated.append(a)

        total = sum(math.ceil(p.width / p.tile_w) * math.ceil(p.height / p.tile_h) for p in plans) + len(associated)
        bar = None
        if opts.progress:
            from tqdm import tqdm

            bar = tqdm(total=total, unit="tile", file=sys.stderr, desc=self.input.name[:30], leave=False,
                       dynamic_ncols=True, mininterval=0.25)
        tick = bar.update if bar is not None else (lambda n: None)

        inst_no = 1
        writers_by_level: dict[int, FrameWriter] = {}
        for p in plans:
            nx, ny = math.ceil(p.width / p.tile_w), math.ceil(p.height / p.tile_h)
            spacing = (bx * base.width / p.width, by * base.height / p.height)
            copy = p.source.copy if p.mode == "copy" else None
            resampled = p.index > 0
            image_type = ["DERIVED" if resampled else "ORIGINAL", "PRIMARY", "VOLUME",
                          "RESAMPLED" if resampled else "NONE"]
            ds = build_dataset(
                ctx, kind="VOLUME", instance_number=inst_no, image_type=image_type,
                width=p.width, height=p.height, tile_w=p.tile_w, tile_h=p.tile_h, n_frames=nx * ny,
                photometric=copy.photometric if copy else encoder.photometric,
                samples=copy.samples if copy else 3, spacing_mm=spacing,
                lossy_method=copy.lossy_method if copy else encoder.lossy_method, lossy_ratio=None)
            ts = copy.transfer_syntax if copy else encoder.transfer_syntax
            hint = p.source.raw_size_estimate() if copy else p.width * p.height * 3
            w = self._writer(f"level-{p.index}", ds, nx * ny, ts, hint)
            writers_by_level[p.index] = w
            self.instances.append(OutputInstance(self.final[-1][1], "VOLUME", p.index, p.width, p.height, nx * ny,
                                                 p.mode, ds.SOPInstanceUID, ts))
            inst_no += 1

        with ThreadPoolExecutor(max_workers=opts.n_workers, thread_name_prefix="convert") as pool:
            i = 0
            while i < len(plans):
                p = plans[i]
                # the run of generated levels that follows this source level, if any
                j = i + 1
                while j < len(plans) and plans[j].mode == "generate":
                    j += 1
                if p.mode == "copy":
                    copy_frames(p.source, writers_by_level[p.index], pool, opts.n_workers, tick)
                if p.mode == "reencode" or j > i + 1:
                    writers = [writers_by_level[p.index] if p.mode == "reencode" else None]
                    writers += [writers_by_level[k] for k in range(i + 1, j)]
                    tile = plans[i + 1].tile_w if j > i + 1 else p.tile_w
                    if p.mode == "reencode" and p.tile_w != tile:
                        tile = p.tile_w
                    BandPyramid(p.source, tile, writers, encoder, pool, tick).run()
                i = j

            for a in associated:
                img = a.read()
                h, w_ = img.shape[:2]
                if a.kind == "THUMBNAIL":
                    spacing = (bx * base.width / w_, by * base.height / h)
                    image_type = ["DERIVED", "PRIMARY", "THUMBNAIL", "RESAMPLED"]
                else:
                    # Pixel Measures are required but no scanner says how large its label/macro
                    # pixels are: nominal values, a 25 mm label and a 76 mm long slide.
                    nominal = 25.0 if a.kind == "LABEL" else 76.0
                    s_mm = nominal / max(w_, h)
                    spacing = (s_mm, s_mm)
                    image_type = ["ORIGINAL", "PRIMARY", a.kind, "NONE"]
                ds = build_dataset(
                    ctx, kind=a.kind, instance_number=inst_no, image_type=image_type, width=w_, height=h,
                    tile_w=w_, tile_h=h, n_frames=1, photometric=encoder.photometric, samples=3,
                    spacing_mm=spacing, lossy_method=encoder.lossy_method, lossy_ratio=None)
                wr = self._writer(a.kind.lower(), ds, 1, encoder.transfer_syntax, w_ * h * 3)
                wr.add(encoder.encode(np.ascontiguousarray(img)))
                self.instances.append(OutputInstance(self.final[-1][1], a.kind, None, w_, h, 1, "reencode",
                                                     ds.SOPInstanceUID, encoder.transfer_syntax))
                inst_no += 1
                tick(1)
        if bar is not None:
            bar.close()

    def _commit(self) -> None:
        for w in self.writers:
            w.finish()
        for (tmp, final), inst in zip(self.final, self.instances):
            os.replace(tmp, final)
            inst.size = final.stat().st_size
        fd = os.open(self.outdir, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        self.writers = []

    def _rollback(self) -> None:
        for w in self.writers:
            w.abort()
        for tmp, final in self.final:
            for p in (tmp,):
                try:
                    p.unlink()
                except FileNotFoundError:
                    pass
        self.writers = []
        for d in self._created_dirs:  # innermost first
            try:
                d.rmdir()
            except OSError:
                break


def convert(input_path: Path | str, outdir: Path | str, options: ConvertOptions | None = None,
            **kwargs: Any) -> ConversionResult:
    """Convert one scanner file into DICOM WSI instances in ``outdir``."""
    opts = options or ConvertOptions(**kwargs)
    return Conversion(Path(input_path), Path(outdir), opts).run()
