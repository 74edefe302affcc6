"""DIMSE services (pynetdicom): thin handlers that call archive.ingest / query / store.

`DimseServer` wires the handlers to one pynetdicom AE; each service lives in its own module.
"""
from .server import DimseServer

__all__ = ["DimseServer"]
