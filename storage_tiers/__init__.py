"""Blob tiers behind one interface (base.BlobStore) and local staging for incoming bytes."""
from .base import BlobError, BlobInfo, BlobNotFound, BlobStore, StoreUnavailable
from .filesystem import FilesystemStore
from .staging import Spool, Spooled, Staging

__all__ = ["BlobError", "BlobInfo", "BlobNotFound", "BlobStore", "FilesystemStore", "Spool", "Spooled",
           "Staging", "StoreUnavailable"]
