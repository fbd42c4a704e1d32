"""Where exports and backups go: an S3 bucket, or a local directory with the same keys."""

from ooni_pipeline.object_store.resource import ObjectStoreResource
from ooni_pipeline.object_store.stores import LocalObjectStore, ObjectStore, S3ObjectStore
from ooni_pipeline.object_store.upload import UploadResult, stream_upload

__all__ = [
    "LocalObjectStore",
    "ObjectStore",
    "ObjectStoreResource",
    "S3ObjectStore",
    "UploadResult",
    "stream_upload",
]
