"""Blob tiers behind one interface (see base.BlobStore): filesystem now, S3 later."""
from .base import BlobError, BlobInfo, BlobNotFound, BlobStore
from .filesystem import FilesystemStore

__all__ = ["BlobError", "BlobInfo", "BlobNotFound", "BlobStore", "FilesystemStore"]
