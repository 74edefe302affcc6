"""The index seam: the `Index` protocol (base.py) and its backends (lmdb.py; PostgreSQL later)."""
from __future__ import annotations

from pathlib import Path

from .base import AddResult, FixityEvent, Index, NewInstance
from ..status import out_of_space
from .lmdb import LmdbIndex

__all__ = ["AddResult", "FixityEvent", "Index", "LmdbIndex", "NewInstance", "open_index", "out_of_space"]


def open_index(path: Path, *, map_size_gb: int = 1024, readonly: bool = False) -> Index:
    """The configured backend (the embedded LMDB one for now)."""
    return LmdbIndex(path, map_size=map_size_gb << 30, readonly=readonly)
