"""Blob tiers behind one interface (base.BlobStore): the filesystem, S3 object storage; and local
staging for incoming bytes."""
from .base import BlobError, BlobInfo, BlobNotFound, BlobStore, StoreUnavailable
from .filesystem import FilesystemStore
from .s3 import S3Store, create_bucket
from .staging import Spool, Spooled, Staging

__all__ = ["BlobError", "BlobInfo", "BlobNotFound", "BlobStore", "FilesystemStore", "S3Store", "Spool", "Spooled",
           "Staging", "StoreUnavailable", "create_bucket"]
