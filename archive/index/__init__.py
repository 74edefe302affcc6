"""The index seam: the `Index` protocol (base.py) and its backends: lmdb.py (embedded, the default)
and postgresql.py (several nodes over one PostgreSQL)."""
from __future__ import annotations

from pathlib import Path

from .base import AddResult, FixityEvent, Index, NewInstance
from ..status import out_of_space
from .lmdb import LmdbIndex

__all__ = ["AddResult", "FixityEvent", "Index", "LmdbIndex", "NewInstance", "open_index", "index_exists",
           "out_of_space"]


def open_index(path: Path, *, map_size_gb: int = 1024, readonly: bool = False, backend: str = "lmdb",
               dsn: str = "", pool_size: int = 16) -> Index:
    """The configured backend: LMDB in `path`, or PostgreSQL at `dsn` (psycopg is imported only
    then, so the embedded default never loads it)."""
    if backend == "postgresql":
        from .postgresql import PostgresIndex

        return PostgresIndex(dsn, readonly=readonly, pool_size=pool_size)
    return LmdbIndex(path, map_size=map_size_gb << 30, readonly=readonly)


def index_exists(path: Path, *, backend: str = "lmdb", dsn: str = "") -> bool:
    """Whether there is an index to open read-only (LMDB: its data file; PostgreSQL: the schema)."""
    if backend == "postgresql":
        from .postgresql import schema_exists

        return schema_exists(dsn)
    return (Path(path) / "data.mdb").is_file()
